"""Fixtures for real components live in tests/support; each module is a pytest plugin."""

pytest_plugins = [
    "tests.support.processes",
    "tests.support.broker",
    "tests.support.s3",
    "tests.support.web",
]
