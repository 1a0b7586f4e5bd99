"""The catalogue against real stores (LocalStorage and SeaweedFS): grants, verification of what
storage really holds, stored-exactly-once, and manifest.json beside the segments."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from botocore.exceptions import ClientError

from controller.alerts import AlertEngine
from controller.catalogue import Catalogue
from controller.db import Database
from controller.registry import Registry, UnknownDevice
from controller.storage.base import Storage
from controller.storage.local import LocalStorage
from controller.storage.s3 import S3Storage
from device.http_put import put_file
from shared.messages import (
    Bookmark,
    EndReason,
    RecordingManifest,
    RecordingStatus,
    SegmentAnnouncement,
    StoredConfirmation,
    Trigger,
    UploadGrant,
    UploadResult,
)
from tests.controller.conftest import FakeClock
from tests.support.s3 import make_storage, remove_bucket, storage_settings
from tests.support.seaweed_server import SeaweedServer

UNIT = "room-204"
REC = "rec-20260303T080000Z-1a2b3c4d"
SECRET = b"0123456789abcdef0123456789abcdef"


@dataclass
class Store:
    """A real store and the ways a unit and a person reach its objects."""

    storage: Storage
    put: Callable[[UploadGrant, bytes], int]
    read: Callable[[str], bytes | None]
    download: Callable[[str], bytes]


def _local_store(tmp_path: Path) -> Store:
    storage = LocalStorage(tmp_path / "objects", "http://127.0.0.1:9", SECRET)

    def split(url: str) -> tuple[str, dict[str, str]]:
        parts = urlsplit(url)
        return parts.path.removeprefix("/storage/objects/"), dict(parse_qsl(parts.query))

    def put(grant: UploadGrant, body: bytes) -> int:
        key, query = split(grant.url)
        status, _reason = storage.receive_upload(key, query, grant.headers, io.BytesIO(body))
        return status

    def read(key: str) -> bytes | None:
        path = storage.root / key
        return path.read_bytes() if path.is_file() else None

    def download(url: str) -> bytes:
        return storage.open_download(*split(url)).read_bytes()

    return Store(storage, put, read, download)


@pytest.fixture(scope="module")
def seaweed_bucket(seaweedfs: SeaweedServer) -> Iterator[str]:
    """One bucket for the module (SeaweedFS makes a volume per bucket); tests use own prefixes."""
    bucket = make_storage(seaweedfs).bucket
    yield bucket
    remove_bucket(seaweedfs, bucket)


def _seaweed_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    server: SeaweedServer = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("seaweed_bucket")
    storage = S3Storage(storage_settings(server, bucket, prefix=f"t-{secrets.token_hex(6)}"))
    client = server.client()

    def put(grant: UploadGrant, body: bytes) -> int:
        path = tmp_path / "upload.mp4"
        path.write_bytes(body)
        return put_file(grant.url, path, grant.headers, 20).status

    def read(key: str) -> bytes | None:
        try:
            return client.get_object(Bucket=storage.bucket, Key=key)["Body"].read()
        except ClientError:
            return None

    def download(url: str) -> bytes:
        with urllib.request.urlopen(url, timeout=20) as response:
            return bytes(response.read())

    return Store(storage, put, read, download)


@pytest.fixture(params=["local", "seaweedfs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return _local_store(tmp_path)
    return _seaweed_store(request, tmp_path)


@pytest.fixture
def registry(db: Database, clock: FakeClock) -> Registry:
    registry = Registry(db, AlertEngine(db, clock=clock), clock=clock)
    registry.add_device(UNIT, "North High", "204")
    registry.add_device("room-205", "South Middle", "205")
    return registry


@pytest.fixture
def catalogue(db: Database, store: Store, registry: Registry, clock: FakeClock) -> Catalogue:
    return Catalogue(db, store.storage, grant_expires_s=900, clock=clock)


def body_of(sequence: int, size: int = 4096) -> bytes:
    return (f"segment {sequence} ".encode() * size)[:size]


def announcement(
    clock: FakeClock, sequence: int, body: bytes, recording_id: str = REC
) -> SegmentAnnouncement:
    start = clock() + timedelta(seconds=10 * sequence)
    return SegmentAnnouncement(
        recording_id=recording_id,
        sequence=sequence,
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        started_at=start,
        ended_at=start + timedelta(seconds=10),
    )


def manifest(clock: FakeClock, *, ended: bool = False, segments: int = 0) -> RecordingManifest:
    return RecordingManifest(
        recording_id=REC,
        device_id=UNIT,
        trigger=Trigger.BUTTON,
        started_at=clock(),
        ended_at=clock() + timedelta(seconds=10 * segments) if ended else None,
        status=RecordingStatus.COMPLETE if ended else RecordingStatus.RECORDING,
        end_reason=EndReason.BUTTON if ended else None,
        segments=segments,
        bookmarks=[Bookmark(at=clock() + timedelta(seconds=3), source="button")],
        video="h264",
        audio="aac",
    )


def upload_result(grant: UploadGrant, status: int) -> UploadResult:
    return UploadResult(
        recording_id=grant.recording_id,
        sequence=grant.sequence,
        key=grant.key,
        ok=200 <= status < 300,
        http_status=status,
        error=None if 200 <= status < 300 else "BadDigest",
    )


def grant_for(catalogue: Catalogue, message: SegmentAnnouncement) -> UploadGrant:
    answer = catalogue.on_announcement(UNIT, message)
    assert isinstance(answer, UploadGrant), answer
    return answer


def store_segment(catalogue: Catalogue, store: Store, clock: FakeClock, sequence: int) -> str:
    body = body_of(sequence)
    grant = grant_for(catalogue, announcement(clock, sequence, body))
    status = store.put(grant, body)
    assert status == 200
    confirmation = catalogue.on_upload_result(UNIT, upload_result(grant, status))
    assert confirmation.verified, confirmation.reason
    return grant.key


# --- grants and verification -------------------------------------------------------------------


def test_an_announcement_gets_a_grant_bound_to_size_and_sha256(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    body = body_of(0)
    message = announcement(clock, 0, body)
    grant = grant_for(catalogue, message)
    assert grant.key == store.storage.key_for(UNIT, REC, "seg-00000.mp4")
    assert (grant.recording_id, grant.sequence, grant.method) == (REC, 0, "PUT")
    assert {name.lower() for name in grant.headers} >= {"content-length", "x-amz-checksum-sha256"}
    assert grant.headers["content-length"] == str(len(body))
    assert catalogue.pending_segments() == 1
    # the recording exists before its manifest arrives
    view = catalogue.get(REC)
    assert view is not None and view.status == "recording" and view.trigger is None
    assert [s.state for s in view.segments] == ["granted"]


def test_announced_twice_gets_a_grant_each_time_but_is_stored_once(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    body = body_of(0)
    message = announcement(clock, 0, body)
    first = grant_for(catalogue, message)
    second = grant_for(catalogue, message)
    assert first.key == second.key
    assert store.put(second, body) == 200
    stored = catalogue.on_upload_result(UNIT, upload_result(second, 200))
    assert stored == StoredConfirmation(
        recording_id=REC,
        sequence=0,
        key=first.key,
        verified=True,
        sha256=message.sha256,
        size=len(body),
    )
    # the unit missed the confirmation and asks again: no third grant, the same answer
    assert catalogue.on_announcement(UNIT, message) == stored
    assert catalogue.on_upload_result(UNIT, upload_result(first, 200)) == stored
    assert catalogue.pending_segments() == 0
    assert catalogue.stored_bytes() == len(body)
    assert store.read(first.key) == body


def test_a_body_the_store_refuses_is_not_stored(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    body = body_of(0)
    grant = grant_for(catalogue, announcement(clock, 0, body))
    status = store.put(grant, b"X" + body[1:])
    assert status == 400
    refused = catalogue.on_upload_result(UNIT, upload_result(grant, status))
    assert not refused.verified
    assert refused.reason is not None and "upload failed (BadDigest)" in refused.reason
    assert "not found" in refused.reason
    assert store.read(grant.key) is None
    assert catalogue.pending_segments() == 1
    view = catalogue.get(REC)
    assert view is not None and view.segments[0].state == "granted"
    assert view.segments[0].download_url is None


def test_a_wrong_object_in_storage_is_not_verified(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    body = body_of(0)
    grant = grant_for(catalogue, announcement(clock, 0, body))
    # something else put different bytes of the same length there
    store.storage.put_bytes(grant.key, b"Z" * len(body), "video/mp4")
    refused = catalogue.on_upload_result(UNIT, upload_result(grant, 200))
    assert not refused.verified and refused.reason is not None and "sha256" in refused.reason
    assert catalogue.pending_segments() == 1
    # the unit announces again, gets a fresh grant and uploads the real thing
    again = grant_for(catalogue, announcement(clock, 0, body))
    assert store.put(again, body) == 200
    assert catalogue.on_upload_result(UNIT, upload_result(again, 200)).verified
    assert store.read(grant.key) == body


def test_an_upload_the_unit_never_reported_is_found_on_the_next_announcement(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    body = body_of(0)
    message = announcement(clock, 0, body)
    grant = grant_for(catalogue, message)
    assert store.put(grant, body) == 200
    # the unit lost power before publishing its upload result
    answer = catalogue.on_announcement(UNIT, message)
    assert isinstance(answer, StoredConfirmation) and answer.verified
    assert catalogue.pending_segments() == 0


def test_other_content_for_a_stored_segment_is_refused_and_the_object_kept(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    key = store_segment(catalogue, store, clock, 0)
    other = announcement(clock, 0, b"different" * 100)
    answer = catalogue.on_announcement(UNIT, other)
    assert isinstance(answer, StoredConfirmation) and not answer.verified
    assert answer.reason is not None and "already stored" in answer.reason
    assert store.read(key) == body_of(0)


def test_results_for_segments_never_granted_are_refused(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    grant = grant_for(catalogue, announcement(clock, 0, body_of(0)))
    unknown = UploadResult(recording_id=REC, sequence=5, key=grant.key, ok=True)
    assert catalogue.on_upload_result(UNIT, unknown).reason == "segment not announced"
    other_unit = catalogue.on_upload_result("room-205", upload_result(grant, 200))
    assert other_unit.reason == "segment not announced"
    wrong_key = UploadResult(recording_id=REC, sequence=0, key="elsewhere/seg.mp4", ok=True)
    refused = catalogue.on_upload_result(UNIT, wrong_key)
    assert not refused.verified and "granted" in (refused.reason or "")


def test_a_recording_of_another_unit_or_an_unknown_unit_is_refused(
    catalogue: Catalogue, clock: FakeClock
) -> None:
    grant_for(catalogue, announcement(clock, 0, body_of(0)))
    with pytest.raises(ValueError, match="belongs to"):
        catalogue.on_announcement("room-205", announcement(clock, 1, body_of(1)))
    with pytest.raises(UnknownDevice):
        catalogue.on_announcement("room-999", announcement(clock, 0, body_of(0), "rec-other"))
    with pytest.raises(ValueError, match="came from"):
        catalogue.on_manifest("room-205", manifest(clock))


# --- manifests and views ------------------------------------------------------------------------


def read_manifest(store: Store) -> dict[str, Any]:
    data = store.read(store.storage.key_for(UNIT, REC, "manifest.json"))
    assert data is not None
    document: dict[str, Any] = json.loads(data)
    return document


def test_manifest_json_lies_beside_the_segments_with_each_sha256(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    catalogue.on_manifest(UNIT, manifest(clock))
    started = read_manifest(store)
    assert started["status"] == "recording" and started["segments"] == []
    keys = [store_segment(catalogue, store, clock, sequence) for sequence in range(2)]
    catalogue.on_manifest(UNIT, manifest(clock, ended=True, segments=2))
    document = read_manifest(store)
    assert document["recording_id"] == REC and document["device_id"] == UNIT
    assert (document["school"], document["room"]) == ("North High", "204")
    assert (document["status"], document["completeness"]) == ("complete", "complete")
    assert document["trigger"] == "button" and document["video"] == "h264"
    assert document["bookmarks"][0]["source"] == "button"
    assert [
        (s["sequence"], s["key"], s["size"], s["sha256"], s["stored"]) for s in document["segments"]
    ] == [
        (n, keys[n], len(body_of(n)), hashlib.sha256(body_of(n)).hexdigest(), True)
        for n in range(2)
    ]
    manifest_key = store.storage.key_for(UNIT, REC, "manifest.json")
    assert manifest_key.rsplit("/", 1)[0] == keys[0].rsplit("/", 1)[0]
    view = catalogue.get(REC)
    assert view is not None and view.manifest_key == manifest_key


def test_views_show_completeness_and_download_urls(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    catalogue.on_manifest(UNIT, manifest(clock))
    store_segment(catalogue, store, clock, 0)
    assert catalogue.get(REC).completeness == "recording"  # type: ignore[union-attr]
    catalogue.on_manifest(UNIT, manifest(clock, ended=True, segments=2))
    partial = catalogue.get(REC)
    assert partial is not None
    assert (partial.completeness, partial.segments_reported, partial.segments_stored) == (
        "partial",
        2,
        1,
    )
    store_segment(catalogue, store, clock, 1)
    complete = catalogue.get(REC)
    assert complete is not None and complete.completeness == "complete"
    assert (complete.trigger, complete.end_reason, complete.school) == (
        "button",
        "button",
        "North High",
    )
    for segment in complete.segments:
        assert segment.download_url is not None
        assert store.download(segment.download_url) == body_of(segment.sequence)
    listed = catalogue.list(device_id=UNIT)
    assert listed.total == 1
    assert (listed.items[0].segments_stored, listed.items[0].segments) == (2, [])


def test_an_older_manifest_does_not_reopen_an_ended_recording(
    catalogue: Catalogue, store: Store, clock: FakeClock
) -> None:
    catalogue.on_manifest(UNIT, manifest(clock, ended=True, segments=0))
    catalogue.on_manifest(UNIT, manifest(clock))
    view = catalogue.get(REC)
    assert view is not None and view.status == "complete"
    assert read_manifest(store)["status"] == "complete"


def test_recordings_list_filters_and_pages(
    catalogue: Catalogue, registry: Registry, clock: FakeClock
) -> None:
    for index in range(3):
        clock.advance(60)
        catalogue.on_manifest(
            UNIT,
            manifest(clock).model_copy(update={"recording_id": f"rec-{index}"}),
        )
    other = manifest(clock).model_copy(update={"recording_id": "rec-s", "device_id": "room-205"})
    catalogue.on_manifest("room-205", other)
    assert [r.id for r in catalogue.list(device_id=UNIT, per_page=2).items] == ["rec-2", "rec-1"]
    assert [r.id for r in catalogue.list(school="South Middle").items] == ["rec-s"]
    assert catalogue.list(status="complete").total == 0
    assert catalogue.list().total == 4
    # a recording outlives the unit that made it
    registry.remove_device("room-205")
    assert [r.id for r in catalogue.list(school="South Middle").items] == ["rec-s"]


def test_a_manifest_that_could_not_be_written_is_written_later(
    db: Database, registry: Registry, tmp_path: Path, clock: FakeClock
) -> None:
    store = _local_store(tmp_path)
    catalogue = Catalogue(db, store.storage, clock=clock)
    blocker = store.storage.root / UNIT / REC / "manifest.json"
    blocker.mkdir(parents=True)  # a directory where the file must go: every write fails
    catalogue.on_manifest(UNIT, manifest(clock, ended=True, segments=1))
    store_segment(catalogue, store, clock, 0)
    assert catalogue.write_pending_manifests() == 0
    blocker.rmdir()
    assert catalogue.write_pending_manifests() == 1
    assert catalogue.write_pending_manifests() == 0
    document = read_manifest(store)
    assert document["completeness"] == "complete" and document["segments"][0]["stored"]
