"""Controller state fixtures: a migrated database per test, on SQLite and on PostgreSQL.

- ``db``: a migrated ``Database`` of the test's own, parametrized ``sqlite`` / ``postgresql``.
  SQLite copies a file migrated once per session; PostgreSQL creates a uniquely named
  database from a template migrated once per session (so per pytest-xdist worker) and
  drops it afterwards. Only databases these fixtures created are ever dropped.
- ``empty_db_url``: the URL of an empty, unmigrated database, for migration tests.
- ``clock``: a settable clock to inject wherever a service takes ``clock=``; ``health()``
  makes a healthy sample at its time, with any field overridden.

PostgreSQL comes from ``CLASSCAP_TEST_POSTGRES_URL`` (its database part is ignored;
the ``postgres`` maintenance database is used to create and drop); when it cannot be
reached the PostgreSQL cases are skipped with the reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from controller.db import Database
from shared.messages import Health, RecorderState

POSTGRES_URL = os.environ.get(
    "CLASSCAP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ("sqlite", "postgresql")


class FakeClock:
    """Aware UTC time that moves only when the test says so."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 3, 3, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def health(clock: FakeClock, **overrides: Any) -> Health:
    values: dict[str, Any] = {
        "ts": clock(),
        "state": RecorderState.IDLE,
        "soc_temp_c": 55.0,
        "disk_free_bytes": 20 * 1024**3,
        "disk_total_bytes": 32 * 1024**3,
        "can_record": True,
        "spool_segments": 0,
        "spool_bytes": 0,
        "camera_present": True,
        "mic_level_dbfs": -30.0,
        "clock_synced": True,
        "uptime_s": 100.0,
        "agent_version": "0.1.0",
        "rejected_messages": 0,
    }
    values.update(overrides)
    return Health(**values)


class PostgresAdmin:
    """Creates and drops the databases of this test session, through ``postgres``."""

    def __init__(self, url: str) -> None:
        self.base = make_url(url)
        self._engine: Engine = create_engine(
            self.base.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self._prefix = f"cc_test_{worker}_{os.getpid()}_"
        self._created: set[str] = set()

    def reachable(self) -> str | None:
        """None if reachable, else why not."""
        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError as exc:
            return f"PostgreSQL at {self.base.render_as_string()} not reachable: {exc.orig}"
        return None

    def url(self, name: str) -> URL:
        return self.base.set(database=name)

    def create(self, template: str | None = None) -> str:
        name = self._prefix + secrets.token_hex(4)
        clause = f" TEMPLATE {template}" if template else ""
        with self._engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}{clause}"))
        self._created.add(name)
        return name

    def drop(self, name: str) -> None:
        if name not in self._created:
            raise ValueError(f"{name} was not created by this session")
        with self._engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        self._created.discard(name)

    def close(self) -> None:
        for name in sorted(self._created):
            self.drop(name)
        self._engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[PostgresAdmin]:
    admin = PostgresAdmin(POSTGRES_URL)
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture(scope="session")
def postgres_template(postgres_admin: PostgresAdmin) -> str:
    reason = postgres_admin.reachable()
    if reason is not None:
        pytest.fail(f"PostgreSQL is required for these tests: {reason}")
    name = postgres_admin.create()
    database = Database(postgres_admin.url(name).render_as_string(hide_password=False))
    try:
        database.migrate()
    finally:
        # CREATE DATABASE ... TEMPLATE needs the template without connections.
        database.dispose()
    return name


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "controller.sqlite3"
    database = Database(f"sqlite:///{path}")
    try:
        database.migrate()
    finally:
        database.dispose()
    return path


def _postgres_admin_or_fail(request: pytest.FixtureRequest) -> PostgresAdmin:
    admin: PostgresAdmin = request.getfixturevalue("postgres_admin")
    reason = admin.reachable()
    if reason is not None:
        pytest.fail(f"PostgreSQL is required for these tests: {reason}")
    return admin


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "controller.sqlite3"
        shutil.copyfile(template, path)
        database = Database(f"sqlite:///{path}")
        try:
            yield database
        finally:
            database.dispose()
        return
    admin = _postgres_admin_or_fail(request)
    name = admin.create(template=request.getfixturevalue("postgres_template"))
    database = Database(admin.url(name).render_as_string(hide_password=False))
    try:
        yield database
    finally:
        database.dispose()
        admin.drop(name)


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    admin = _postgres_admin_or_fail(request)
    name = admin.create()
    try:
        yield admin.url(name).render_as_string(hide_password=False)
    finally:
        admin.drop(name)
