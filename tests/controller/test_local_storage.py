"""LocalStorage keeps the S3 grant contract: a PUT is accepted only as signed, with the body
it was signed for, and a refused one leaves nothing behind."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from controller.config import StorageConfig
from controller.storage.base import PresignedPut, StorageAccessError
from controller.storage.local import LocalStorage, make_storage
from controller.storage.s3 import S3Storage
from tests.controller.conftest import FakeClock

BASE_URL = "http://controller.example:8080"
SECRET = b"0123456789abcdef0123456789abcdef"
BODY = b"fragmented mp4 bytes " * 1000
SHA = hashlib.sha256(BODY).hexdigest()
KEY = "room-204/rec-1/seg-00000.mp4"


@pytest.fixture
def storage(tmp_path: Path, clock: FakeClock) -> LocalStorage:
    return LocalStorage(tmp_path / "objects", BASE_URL, SECRET, clock=clock)


def _split(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    prefix = "/storage/objects/"
    assert parts.path.startswith(prefix)
    return parts.path[len(prefix) :], dict(parse_qsl(parts.query))


def _put(
    storage: LocalStorage,
    grant: PresignedPut,
    body: bytes = BODY,
    *,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    key: str | None = None,
) -> tuple[int, str]:
    url_key, url_query = _split(grant.url)
    return storage.receive_upload(
        key or url_key,
        {**url_query, **(query or {})},
        grant.headers if headers is None else headers,
        io.BytesIO(body),
    )


def _files(storage: LocalStorage) -> list[str]:
    return sorted(str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if p.is_file())


def test_grant_url_and_headers_follow_the_s3_contract(storage: LocalStorage) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 900)
    key, query = _split(grant.url)
    assert grant.url.startswith(f"{BASE_URL}/storage/objects/{KEY}?")
    assert key == KEY
    assert set(query) == {"expires", "size", "sha256", "sig"}
    assert query["size"] == str(len(BODY)) and query["sha256"] == SHA
    assert grant.headers == {
        "content-length": str(len(BODY)),
        "x-amz-checksum-sha256": base64.b64encode(bytes.fromhex(SHA)).decode(),
    }


def test_the_granted_upload_is_stored_and_verifies(storage: LocalStorage) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 900)
    assert _put(storage, grant) == (200, "OK")
    assert (storage.root / KEY).read_bytes() == BODY
    assert _files(storage) == [KEY]
    verification = storage.verify(KEY, len(BODY), SHA)
    assert verification.ok and verification.size == len(BODY) and verification.sha256 == SHA


def test_header_names_are_matched_whatever_their_case(storage: LocalStorage) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 900)
    headers = {name.title(): value for name, value in grant.headers.items()}
    assert _put(storage, grant, headers=headers)[0] == 200


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        ({"query": {"sig": "0" * 64}}, "SignatureDoesNotMatch"),
        ({"query": {"size": str(len(BODY) + 1)}}, "SignatureDoesNotMatch"),
        ({"query": {"sha256": "0" * 64}}, "SignatureDoesNotMatch"),
        ({"query": {"expires": "4102444800"}}, "SignatureDoesNotMatch"),
        ({"key": "room-204/rec-1/seg-00001.mp4"}, "SignatureDoesNotMatch"),
        ({"query": {"sig": ""}}, "SignatureDoesNotMatch"),
    ],
    ids=["signature", "size", "sha256", "expiry", "other-key", "empty-signature"],
)
def test_a_tampered_url_is_refused_403_and_nothing_is_kept(
    storage: LocalStorage, tamper: dict[str, object], code: str
) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 900)
    status, reason = _put(storage, grant, **tamper)  # type: ignore[arg-type]
    assert status == 403
    assert reason.startswith(code)
    assert _files(storage) == []


def test_missing_signature_parameters_are_refused_403(storage: LocalStorage) -> None:
    status, reason = storage.receive_upload(KEY, {}, {}, io.BytesIO(BODY))
    assert status == 403 and reason.startswith("AccessDenied")
    assert _files(storage) == []


def test_an_expired_url_is_refused_403(storage: LocalStorage, clock: FakeClock) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 60)
    clock.advance(60)
    status, reason = _put(storage, grant)
    assert status == 403 and "expired" in reason
    assert _files(storage) == []


CHECKSUM = base64.b64encode(bytes.fromhex(SHA)).decode()


@pytest.mark.parametrize(
    "headers",
    [
        {"x-amz-checksum-sha256": CHECKSUM},
        {"content-length": str(len(BODY) - 1), "x-amz-checksum-sha256": CHECKSUM},
        {"content-length": str(len(BODY))},
        {"content-length": str(len(BODY)), "x-amz-checksum-sha256": "AAAA"},
    ],
    ids=["no-length", "other-length", "no-checksum", "other-checksum"],
)
def test_headers_that_differ_from_the_signed_ones_are_refused_403(
    storage: LocalStorage, headers: dict[str, str]
) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 900)
    status, reason = _put(storage, grant, headers=headers)
    assert status == 403 and reason.startswith("SignatureDoesNotMatch")
    assert _files(storage) == []


def test_a_body_with_another_sha256_is_refused_bad_digest(storage: LocalStorage) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 900)
    other = b"X" + BODY[1:]
    status, reason = _put(storage, grant, other)
    assert status == 400 and reason.startswith("BadDigest")
    assert _files(storage) == []


def test_a_short_body_is_refused_and_nothing_is_kept(storage: LocalStorage) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 900)
    status, reason = _put(storage, grant, BODY[:-10])
    assert status == 400 and reason.startswith("IncompleteBody")
    assert _files(storage) == []


def test_a_refused_upload_leaves_a_stored_object_intact(storage: LocalStorage) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 900)
    assert _put(storage, grant)[0] == 200
    assert _put(storage, grant, b"Y" * len(BODY))[0] == 400
    assert (storage.root / KEY).read_bytes() == BODY


@pytest.mark.parametrize(
    "key", ["../escape/seg.mp4", "a//b", "/abs/path", "a/./b", "room/.hidden", "a\\b/c", ""]
)
def test_unsafe_keys_are_refused(storage: LocalStorage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.presign_put(key, 1, SHA, 60)
    status, _reason = storage.receive_upload(key, {}, {}, io.BytesIO(b"x"))
    assert status in (400, 403)
    assert not (storage.root.parent / "escape").exists()


@pytest.mark.parametrize(
    ("device_id", "recording_id", "filename"),
    [("..", "rec", "f"), ("unit", "a/b", "f"), ("unit", "rec", ".part"), ("unit", "rec", "")],
)
def test_key_for_refuses_parts_that_are_not_one_safe_name(
    storage: LocalStorage, device_id: str, recording_id: str, filename: str
) -> None:
    with pytest.raises(ValueError):
        storage.key_for(device_id, recording_id, filename)


def test_key_layout_is_device_recording_file(storage: LocalStorage) -> None:
    assert storage.key_for("room-204", "rec-1", "seg-00003.mp4") == "room-204/rec-1/seg-00003.mp4"


def test_a_signed_download_opens_the_object(storage: LocalStorage, clock: FakeClock) -> None:
    storage.put_bytes(KEY, BODY, "video/mp4")
    key, query = _split(storage.presign_get(KEY, 300))
    assert storage.open_download(key, query).read_bytes() == BODY
    with pytest.raises(StorageAccessError) as bad:
        storage.open_download(key, {**query, "sig": "f" * 64})
    assert bad.value.status == 403
    with pytest.raises(StorageAccessError) as other:
        storage.open_download("room-204/rec-1/seg-00001.mp4", query)
    assert other.value.status == 403
    clock.advance(300)
    with pytest.raises(StorageAccessError) as expired:
        storage.open_download(key, query)
    assert expired.value.status == 403 and "expired" in expired.value.reason


def test_a_put_url_does_not_open_a_download(storage: LocalStorage) -> None:
    grant = storage.presign_put(KEY, len(BODY), SHA, 900)
    assert _put(storage, grant)[0] == 200
    key, query = _split(grant.url)
    with pytest.raises(StorageAccessError) as refused:
        storage.open_download(key, query)
    assert refused.value.status == 403


def test_a_signed_download_of_a_missing_object_is_404(storage: LocalStorage) -> None:
    key, query = _split(storage.presign_get(KEY, 300))
    with pytest.raises(StorageAccessError) as missing:
        storage.open_download(key, query)
    assert missing.value.status == 404


def test_verify_reports_missing_short_and_different_objects(storage: LocalStorage) -> None:
    missing = storage.verify(KEY, len(BODY), SHA)
    assert not missing.ok and missing.reason == "object not found"
    storage.put_bytes(KEY, BODY[:-1], "video/mp4")
    short = storage.verify(KEY, len(BODY), SHA)
    assert not short.ok and short.size == len(BODY) - 1 and "size" in (short.reason or "")
    storage.put_bytes(KEY, b"Z" + BODY[1:], "video/mp4")
    different = storage.verify(KEY, len(BODY), SHA)
    assert not different.ok and "sha256" in (different.reason or "")
    assert different.sha256 != SHA


def test_put_bytes_replaces_the_object_whole(storage: LocalStorage) -> None:
    key = "room-204/rec-1/manifest.json"
    storage.put_bytes(key, b'{"v": 1}', "application/json")
    storage.put_bytes(key, b'{"v": 2}', "application/json")
    assert (storage.root / key).read_bytes() == b'{"v": 2}'
    assert _files(storage) == [key]


def test_a_short_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        LocalStorage(tmp_path, BASE_URL, b"short")


def test_make_storage_builds_the_configured_store(tmp_path: Path) -> None:
    local = make_storage(StorageConfig(local_dir=tmp_path / "objects"), BASE_URL, SECRET)
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "objects"
    assert local.presign_get(KEY, 60).startswith(f"{BASE_URL}/storage/objects/{KEY}?")
    config = StorageConfig(
        backend="s3",
        endpoint_url="http://127.0.0.1:9",
        bucket="district-video",
        prefix="classcap",
        access_key="a",
        secret_key="s",
    )
    s3 = make_storage(config, BASE_URL, SECRET)
    assert isinstance(s3, S3Storage) and s3.bucket == "district-video"
    assert s3.key_for("room-204", "rec-1", "seg-00000.mp4") == "classcap/" + KEY


# --- listing and hashing (the reconciler's view of the store) -------------------------------


def test_list_objects_gives_every_key_under_a_prefix_but_no_upload_in_progress(
    storage: LocalStorage,
) -> None:
    from controller.storage.base import StoredObject

    bodies = {
        "u/rec-1/seg-00000.mp4": b"first segment",
        "u/rec-1/seg-00001.mp4": b"second, longer segment",
        "u/rec-1/manifest.json": b"{}",
        "u/rec-10/seg-00000.mp4": b"another recording",
    }
    for key, body in bodies.items():
        storage.put_bytes(key, body, "video/mp4")
    (storage.root / "u" / "rec-1" / ".seg-00002.mp4.1a2b.part").write_bytes(b"half")

    listed = sorted(storage.list_objects("u/rec-1/"), key=lambda o: o.key)

    assert listed == [
        StoredObject(key, len(bodies[key])) for key in sorted(bodies) if key.startswith("u/rec-1/")
    ]
    assert [o.key for o in storage.list_objects("u/rec-1/seg-")] == [
        "u/rec-1/seg-00000.mp4",
        "u/rec-1/seg-00001.mp4",
    ]
    assert len(list(storage.list_objects(""))) == 4
    assert list(storage.list_objects("nobody/")) == []
    with pytest.raises(ValueError, match="unsafe"):
        list(storage.list_objects("../outside/"))


def test_sha256_of_hashes_the_stored_file(storage: LocalStorage) -> None:
    from controller.storage.base import StorageError

    body = bytes(range(256)) * 9000  # several read blocks
    storage.put_bytes(KEY, body, "video/mp4")

    assert storage.sha256_of(KEY) == hashlib.sha256(body).hexdigest()
    with pytest.raises(StorageError, match="cannot read"):
        storage.sha256_of("room-204/rec-1/seg-00009.mp4")
