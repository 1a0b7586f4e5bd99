"""S3Storage against a real SeaweedFS: grants, verification, small objects, buckets."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from controller.storage.s3 import S3Settings, S3Storage, StorageError
from device.http_put import put_file
from shared.clock import utcnow
from tests.support.processes import free_port
from tests.support.s3 import make_storage, new_bucket_name, remove_bucket
from tests.support.seaweed_server import SeaweedServer


def _settings(**overrides: object) -> S3Settings:
    values: dict[str, object] = {
        "endpoint_url": "http://127.0.0.1:9",
        "region": "us-east-1",
        "bucket": "district",
        "prefix": "classcap/",
        "access_key": "a",
        "secret_key": "s",
    }
    values.update(overrides)
    return S3Settings(**values)  # type: ignore[arg-type]


def _upload(storage: S3Storage, tmp_path: Path, key: str, data: bytes) -> str:
    path = tmp_path / "seg-00000.mp4"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    grant = storage.presign_put(key, len(data), sha, 60)
    response = put_file(grant.url, path, grant.headers, 20)
    assert response.status == 200, response.body
    return sha


# --- keys and grants ---------------------------------------------------------------------


def test_key_layout_is_prefix_device_recording_file() -> None:
    storage = S3Storage(_settings())
    assert (
        storage.key_for("unit-7", "rec-1", "seg-00003.mp4") == "classcap/unit-7/rec-1/seg-00003.mp4"
    )
    assert S3Storage(_settings(prefix="")).key_for("u1", "r", "f") == "u1/r/f"


@pytest.mark.parametrize(
    ("device_id", "recording_id", "filename"),
    [("a/b", "r", "f"), ("u", "..", "f"), ("u", "r", "x/../../f"), ("", "r", "f")],
)
def test_key_parts_cannot_escape_their_folder(
    device_id: str, recording_id: str, filename: str
) -> None:
    with pytest.raises(ValueError, match="cannot be a key segment"):
        S3Storage(_settings()).key_for(device_id, recording_id, filename)


def test_unknown_sse_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="sse"):
        S3Storage(_settings(sse="rot13"))


def test_grant_headers_are_exactly_the_signed_ones() -> None:
    storage = S3Storage(_settings())
    sha = hashlib.sha256(b"video").hexdigest()
    before = utcnow()

    grant = storage.presign_put("classcap/u/r/seg-00000.mp4", 5, sha, 300)

    query = parse_qs(urlsplit(grant.url).query)
    assert query["X-Amz-SignedHeaders"] == ["content-length;host;x-amz-checksum-sha256"]
    assert query["X-Amz-Expires"] == ["300"]
    assert grant.headers == {
        "content-length": "5",
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(b"video").digest()).decode(),
    }
    assert before + timedelta(seconds=299) <= grant.expires_at <= utcnow() + timedelta(seconds=300)


def test_grant_with_sse_signs_the_encryption_header() -> None:
    grant = S3Storage(_settings(sse="AES256")).presign_put("k", 1, "00" * 32, 60)

    assert grant.headers["x-amz-server-side-encryption"] == "AES256"
    signed = parse_qs(urlsplit(grant.url).query)["X-Amz-SignedHeaders"][0]
    assert "x-amz-server-side-encryption" in signed.split(";")


@pytest.mark.parametrize(
    ("size", "sha", "expires_s", "message"),
    [
        (-1, "00" * 32, 60, "size"),
        (1, "zz" * 32, 60, "not hex"),
        (1, "00" * 31, 60, "32 bytes"),
        (1, "00" * 32, 0, "expires_s"),
        (1, "00" * 32, 8 * 24 * 3600, "expires_s"),
    ],
)
def test_bad_grant_requests_are_refused(size: int, sha: str, expires_s: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S3Storage(_settings()).presign_put("k", size, sha, expires_s)


# --- verification --------------------------------------------------------------------------


def test_verify_accepts_the_granted_object(s3_storage: S3Storage, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    key = s3_storage.key_for("u1", "rec-1", "seg-00000.mp4")
    sha = _upload(s3_storage, tmp_path, key, data)

    result = s3_storage.verify(key, len(data), sha)

    assert result.ok
    assert (result.size, result.sha256, result.reason) == (len(data), sha, None)


def test_verify_reports_a_missing_object(s3_storage: S3Storage) -> None:
    result = s3_storage.verify("classcap/u1/rec-1/none.mp4", 10, "00" * 32)
    assert not result.ok
    assert result.reason == "object not found"


def test_verify_reports_size_and_checksum_mismatches(s3_storage: S3Storage, tmp_path: Path) -> None:
    data = os.urandom(1000)
    key = s3_storage.key_for("u1", "rec-1", "seg-00000.mp4")
    sha = _upload(s3_storage, tmp_path, key, data)

    wrong_size = s3_storage.verify(key, 999, sha)
    wrong_sha = s3_storage.verify(key, 1000, hashlib.sha256(b"other").hexdigest())

    assert not wrong_size.ok
    assert wrong_size.reason == "size 1000 differs from expected 999"
    assert not wrong_sha.ok
    assert wrong_sha.sha256 == sha
    assert "differs from expected" in (wrong_sha.reason or "")


def test_verify_reads_back_an_object_stored_without_sha256(
    seaweedfs: SeaweedServer, s3_storage: S3Storage, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(2_500_000)
    key = "classcap/u1/rec-1/plain.mp4"
    seaweedfs.client().put_object(Bucket=s3_storage.bucket, Key=key, Body=data)
    sha = hashlib.sha256(data).hexdigest()

    with caplog.at_level(logging.INFO, logger="controller.storage.s3"):
        good = s3_storage.verify(key, len(data), sha)
        bad = s3_storage.verify(key, len(data), "00" * 32)

    assert "no stored sha256, reading back" in caplog.text
    assert good.ok and good.sha256 == sha
    assert not bad.ok and bad.sha256 == sha


def test_verify_raises_when_the_store_is_unreachable() -> None:
    storage = S3Storage(_settings(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageError, match="cannot read"):
        storage.verify("k", 1, "00" * 32)


def test_verify_raises_on_bad_credentials(seaweedfs: SeaweedServer, s3_storage: S3Storage) -> None:
    storage = S3Storage(
        _settings(endpoint_url=seaweedfs.endpoint_url, bucket=s3_storage.bucket, secret_key="wrong")
    )
    with pytest.raises(StorageError):
        storage.verify("k", 1, "00" * 32)


# --- encryption, small objects, reading back -----------------------------------------------


@pytest.fixture
def sse_storage(seaweedfs: SeaweedServer) -> Iterator[S3Storage]:
    storage = make_storage(seaweedfs, sse="AES256")
    yield storage
    remove_bucket(seaweedfs, storage.bucket)


def test_sse_grant_stores_an_encrypted_object(
    seaweedfs: SeaweedServer, sse_storage: S3Storage, tmp_path: Path
) -> None:
    data = os.urandom(50_000)
    key = sse_storage.key_for("u1", "rec-1", "seg-00000.mp4")
    sha = _upload(sse_storage, tmp_path, key, data)

    head = seaweedfs.client().head_object(Bucket=sse_storage.bucket, Key=key)

    assert head.get("ServerSideEncryption") == "AES256"
    assert sse_storage.verify(key, len(data), sha).ok


def test_put_bytes_then_presigned_get(seaweedfs: SeaweedServer, s3_storage: S3Storage) -> None:
    key = s3_storage.key_for("u1", "rec-1", "manifest.json")
    s3_storage.put_bytes(key, b'{"segments": 3}', "application/json")

    url = s3_storage.presign_get(key, 60)
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
        content_type = response.headers["Content-Type"]

    assert body == b'{"segments": 3}'
    assert content_type == "application/json"


def test_ensure_bucket_creates_once_and_is_idempotent(seaweedfs: SeaweedServer) -> None:
    bucket = new_bucket_name()
    storage = S3Storage(
        _settings(
            endpoint_url=seaweedfs.endpoint_url,
            bucket=bucket,
            access_key=seaweedfs.access_key,
            secret_key=seaweedfs.secret_key,
        )
    )
    try:
        storage.ensure_bucket()
        storage.ensure_bucket()
        names = [b["Name"] for b in seaweedfs.client().list_buckets()["Buckets"]]
        assert names.count(bucket) == 1
    finally:
        remove_bucket(seaweedfs, bucket)


def test_ensure_bucket_raises_when_the_store_is_unreachable() -> None:
    storage = S3Storage(_settings(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageError, match="cannot check bucket"):
        storage.ensure_bucket()


# --- listing and hashing (the reconciler's view of the store) -------------------------------


def test_list_objects_gives_every_key_under_a_prefix_with_its_size(s3_storage: S3Storage) -> None:
    from controller.storage.s3 import StoredObject

    bodies = {
        "classcap/u/rec-1/seg-00000.mp4": b"first segment",
        "classcap/u/rec-1/seg-00001.mp4": b"second, longer segment",
        "classcap/u/rec-1/manifest.json": b"{}",
        "classcap/u/rec-10/seg-00000.mp4": b"another recording",
    }
    for key, body in bodies.items():
        s3_storage.put_bytes(key, body, "video/mp4")

    listed = list(s3_storage.list_objects("classcap/u/rec-1/"))

    assert listed == [
        StoredObject(key, len(bodies[key]))
        for key in sorted(bodies)
        if key.startswith("classcap/u/rec-1/")
    ]
    assert len(list(s3_storage.list_objects("classcap/u/"))) == 4
    assert list(s3_storage.list_objects("classcap/nobody/")) == []


def test_sha256_of_hashes_the_content_read_back(s3_storage: S3Storage) -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)  # several read blocks
    s3_storage.put_bytes("classcap/u/r/seg-00000.mp4", body, "video/mp4")

    assert s3_storage.sha256_of("classcap/u/r/seg-00000.mp4") == hashlib.sha256(body).hexdigest()
    with pytest.raises(StorageError, match="cannot read back"):
        s3_storage.sha256_of("classcap/u/r/seg-00001.mp4")


def test_list_objects_raises_when_the_store_is_unreachable() -> None:
    storage = S3Storage(_settings(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StorageError, match="cannot list"):
        list(storage.list_objects("classcap/"))
