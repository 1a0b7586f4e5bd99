"""Real SeaweedFS S3 fixtures (a pytest plugin, loaded by tests/conftest.py).

- ``seaweedfs``: one server per session (so one per pytest-xdist worker); never stop it.
- ``seaweedfs_private``: a server of the test's own, which it may ``stop()`` and
  ``start()`` again on the same ports to simulate storage going down and coming back.
- ``s3_storage``: an ``S3Storage`` on ``seaweedfs`` with a fresh bucket, emptied
  and removed afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.storage.s3 import S3Settings, S3Storage
from tests.support.seaweed_server import SeaweedServer

PREFIX = "classcap"


def new_bucket_name() -> str:
    return f"cc-{secrets.token_hex(6)}"


def storage_settings(
    server: SeaweedServer, bucket: str, *, prefix: str = PREFIX, sse: str | None = None
) -> S3Settings:
    return S3Settings(
        endpoint_url=server.endpoint_url,
        region=server.region,
        bucket=bucket,
        prefix=prefix,
        access_key=server.access_key,
        secret_key=server.secret_key,
        sse=sse,
    )


def make_storage(
    server: SeaweedServer, *, bucket: str | None = None, sse: str | None = None
) -> S3Storage:
    """An S3Storage on ``server`` whose bucket exists."""
    storage = S3Storage(storage_settings(server, bucket or new_bucket_name(), sse=sse))
    storage.ensure_bucket()
    return storage


def list_keys(server: SeaweedServer, bucket: str) -> list[str]:
    client = server.client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


def remove_bucket(server: SeaweedServer, bucket: str) -> None:
    """Deletes the bucket and its objects; SeaweedFS then drops the bucket's volume."""
    client = server.client()
    for key in list_keys(server, bucket):
        client.delete_object(Bucket=bucket, Key=key)
    client.delete_bucket(Bucket=bucket)


def _server(root: Path) -> Iterator[SeaweedServer]:
    server = SeaweedServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    yield from _server(tmp_path_factory.mktemp("seaweedfs"))


@pytest.fixture
def seaweedfs_private(tmp_path: Path) -> Iterator[SeaweedServer]:
    yield from _server(tmp_path / "seaweedfs")


@pytest.fixture
def s3_storage(seaweedfs: SeaweedServer) -> Iterator[S3Storage]:
    storage = make_storage(seaweedfs)
    yield storage
    remove_bucket(seaweedfs, storage.bucket)
