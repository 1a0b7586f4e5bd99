"""The uploader end to end in process: journal and spool on disk, real SeaweedFS, grantor."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.storage.s3 import S3Storage
from device.config import UploadConfig
from device.journal import Journal, SegmentRow, SegmentState
from device.segmentlist import segment_filename
from device.spool import Spool
from device.uploader import Uploader, backoff_delay
from shared.clock import utcnow
from shared.messages import (
    Message,
    SegmentAnnouncement,
    StoredConfirmation,
    Trigger,
    UploadGrant,
    UploadResult,
)
from shared.topics import Channel
from tests.support.grantor import Answer, AnswerHook, Grantor, InProcessControl, RequestFilter
from tests.support.processes import wait_for
from tests.support.s3 import list_keys, make_storage
from tests.support.seaweed_server import SeaweedServer

DEVICE = "unit-h3"
FAST = UploadConfig(
    concurrency=2,
    retry_initial_s=0.05,
    retry_max_s=0.5,
    grant_timeout_s=2.0,
    request_timeout_s=10.0,
    spread_s=0.0,
)
WAIT_S = 60.0


@dataclass
class Rig:
    journal: Journal
    spool: Spool
    storage: S3Storage
    grantor: Grantor
    control: InProcessControl
    uploaders: list[Uploader] = field(default_factory=list)

    def uploader(self, config: UploadConfig = FAST) -> Uploader:
        """A started uploader wired to the control thread, as the agent wires it to MQTT."""
        uploader = Uploader(self.journal, self.spool, self.control.publish, config, DEVICE)
        self.control.connect(uploader.on_grant, uploader.on_stored)
        self.uploaders.append(uploader)
        uploader.set_online(True)
        uploader.start()
        return uploader

    def record(self, recording_id: str, count: int, size: int = 64 * 1024) -> list[SegmentRow]:
        started = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
        self.journal.begin_recording(recording_id, Trigger.BUTTON, started, "h264", "aac")
        folder = self.spool.recording_dir(recording_id)
        for sequence in range(count):
            path = folder / segment_filename(sequence)
            path.write_bytes(os.urandom(size))
            length, sha = self.spool.hash_file(path)
            self.journal.segment_closed(
                recording_id,
                sequence,
                path,
                length,
                sha,
                started + timedelta(seconds=10 * sequence),
                started + timedelta(seconds=10 * (sequence + 1)),
            )
        rows = [self.journal.segment(recording_id, n) for n in range(count)]
        return [row for row in rows if row is not None]

    def state(self, row: SegmentRow) -> SegmentState:
        current = self.journal.segment(row.recording_id, row.sequence)
        assert current is not None
        return current.state

    def all_stored(self) -> bool:
        return self.journal.backlog() == (0, 0)

    def key(self, row: SegmentRow) -> str:
        return self.grantor.key_for(row.recording_id, row.sequence)

    def published(self, kind: type[Message]) -> list[Message]:
        return [
            message for _channel, message in self.control.published if isinstance(message, kind)
        ]


@contextmanager
def _rig(
    tmp_path: Path,
    storage: S3Storage,
    accept: RequestFilter | None = None,
    deliver: AnswerHook | None = None,
) -> Iterator[Rig]:
    journal = Journal(tmp_path / "journal.sqlite3", DEVICE)
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    grantor = Grantor(storage, DEVICE)
    control = InProcessControl(grantor, accept=accept, deliver=deliver).start()
    rig = Rig(journal, spool, storage, grantor, control)
    try:
        yield rig
    finally:
        for uploader in rig.uploaders:
            uploader.stop()
        control.stop()
        journal.close()
    assert control.errors == []


@pytest.fixture
def rig(tmp_path: Path, s3_storage: S3Storage) -> Iterator[Rig]:
    with _rig(tmp_path, s3_storage) as rig:
        yield rig


def _assert_stored_once(rig: Rig, rows: list[SegmentRow], server: SeaweedServer) -> None:
    keys = sorted(rig.key(row) for row in rows)
    assert list_keys(server, rig.storage.bucket) == keys
    assert {key: rig.grantor.stored[key] for key in keys} == dict.fromkeys(keys, 1)
    for row in rows:
        assert rig.state(row) is SegmentState.STORED
        assert not row.path.exists()


# --- the normal path -------------------------------------------------------------------------


def test_segments_are_uploaded_verified_and_deleted(seaweedfs: SeaweedServer, rig: Rig) -> None:
    rows = rig.record("rec-a", 3) + rig.record("rec-b", 2, size=300_000)

    rig.uploader()

    assert wait_for(rig.all_stored, WAIT_S)
    _assert_stored_once(rig, rows, seaweedfs)
    assert all(rig.grantor.grants[rig.key(row)] == 1 for row in rows)
    results = rig.published(UploadResult)
    assert len(results) == len(rows)
    assert all(isinstance(r, UploadResult) and r.ok and r.http_status == 200 for r in results)
    for row in rows:
        stored = rig.storage.verify(rig.key(row), row.size or 0, row.sha256 or "")
        assert stored.ok


def test_a_segment_closed_while_running_is_uploaded_after_wake(
    seaweedfs: SeaweedServer, rig: Rig
) -> None:
    first = rig.record("rec-a", 1)
    uploader = rig.uploader()
    assert wait_for(rig.all_stored, WAIT_S)

    second = rig.record("rec-b", 2)
    uploader.wake()

    assert wait_for(rig.all_stored, WAIT_S)
    _assert_stored_once(rig, first + second, seaweedfs)


def test_offline_unit_announces_everything_once_back_online(
    seaweedfs: SeaweedServer, rig: Rig
) -> None:
    rows = rig.record("rec-a", 4)
    rig.control.online = False
    uploader = rig.uploader()
    uploader.set_online(False)
    rig.control.online = True  # the broker is back before the agent hears of it

    uploader.set_online(True)

    assert wait_for(rig.all_stored, WAIT_S)
    _assert_stored_once(rig, rows, seaweedfs)


def test_bandwidth_cap_can_change_while_uploading(seaweedfs: SeaweedServer, rig: Rig) -> None:
    rows = rig.record("rec-a", 2, size=200_000)
    uploader = rig.uploader(UploadConfig(**{**FAST.model_dump(), "bandwidth_kbps": 80}))
    assert wait_for(lambda: rig.state(rows[0]) is SegmentState.GRANTED, WAIT_S)

    uploader.set_bandwidth_kbps(0)  # at 80 kbit/s this would take 40 s

    assert wait_for(rig.all_stored, WAIT_S)
    _assert_stored_once(rig, rows, seaweedfs)
    with pytest.raises(ValueError, match="bandwidth"):
        uploader.set_bandwidth_kbps(-1)


# --- failures: nothing is deleted, everything arrives once -------------------------------------


def test_storage_down_retries_then_stores_each_segment_exactly_once(
    seaweedfs_private: SeaweedServer, tmp_path: Path
) -> None:
    storage = make_storage(seaweedfs_private)
    with _rig(tmp_path, storage) as rig:
        rows = rig.record("rec-a", 3)
        seaweedfs_private.stop()

        rig.uploader()
        # Every segment has failed at least once and one of them twice.
        assert wait_for(
            lambda: (
                len({r.sequence for r in rig.grantor.failed_results}) == 3
                and len(rig.grantor.failed_results) >= 4
            ),
            WAIT_S,
        )
        for row in rows:
            assert row.path.exists()
            assert rig.state(row) is not SegmentState.STORED
        assert all(r.http_status is None for r in rig.grantor.failed_results)
        assert all("refused" in (r.error or "") for r in rig.grantor.failed_results)

        seaweedfs_private.start()

        assert wait_for(rig.all_stored, WAIT_S)
        _assert_stored_once(rig, rows, seaweedfs_private)
        # Each grant was used for exactly one PUT: the failed ones and one success per segment.
        assert rig.grantor.grants_issued == len(rig.grantor.failed_results) + len(rows)


def test_file_changed_after_hashing_is_refused_and_kept(seaweedfs: SeaweedServer, rig: Rig) -> None:
    (row,) = rig.record("rec-a", 1)
    data = bytearray(row.path.read_bytes())
    data[100] ^= 0x01
    row.path.write_bytes(bytes(data))

    rig.uploader()

    assert wait_for(lambda: len(rig.grantor.failed_results) >= 2, WAIT_S)
    failure = rig.grantor.failed_results[0]
    assert failure.http_status == 400
    assert (failure.error or "").startswith("BadDigest")
    assert "no longer matches its recorded sha256" in (failure.error or "")
    assert row.path.read_bytes() == bytes(data)
    assert rig.state(row) is not SegmentState.STORED
    assert list_keys(seaweedfs, rig.storage.bucket) == []
    assert rig.grantor.stored_keys == set()


@pytest.mark.parametrize("noticed_by", ["unit", "store"])
def test_expired_grant_leads_to_a_new_grant(
    seaweedfs: SeaweedServer, tmp_path: Path, s3_storage: S3Storage, noticed_by: str
) -> None:
    """The first grant arrives after it expired; the unit must ask again, never give up."""
    delayed: list[UploadGrant] = []

    def deliver_first_grant_late(answer: Answer) -> Answer | None:
        if not isinstance(answer, UploadGrant) or delayed:
            return answer
        delayed.append(answer)
        grantor.expires_s = 900
        assert wait_for(lambda: utcnow() > answer.expires_at + timedelta(seconds=1.1), 10)
        if noticed_by == "store":
            # A unit clock running behind cannot tell: only the store's 403 says so.
            return answer.model_copy(update={"expires_at": utcnow() + timedelta(hours=1)})
        return answer

    # Long enough that the late grant is not taken for a lost one.
    config = UploadConfig(**{**FAST.model_dump(), "grant_timeout_s": 30})
    with _rig(tmp_path, s3_storage, deliver=deliver_first_grant_late) as rig:
        grantor = rig.grantor
        grantor.expires_s = 1
        (row,) = rig.record("rec-a", 1)
        rig.uploader(config)

        assert wait_for(rig.all_stored, WAIT_S)
        _assert_stored_once(rig, [row], seaweedfs)
        assert rig.grantor.grants[rig.key(row)] == 2
        if noticed_by == "unit":
            assert rig.grantor.failed_results == []
        else:
            (failure,) = rig.grantor.failed_results
            assert failure.http_status == 403
            assert failure.error == "AccessDenied: Request has expired"


def test_lost_announcement_is_repeated_after_the_grant_timeout(
    seaweedfs: SeaweedServer, tmp_path: Path, s3_storage: S3Storage
) -> None:
    dropped: list[Message] = []

    def lose_first_announcement(channel: Channel, message: Message) -> bool:
        if channel is Channel.SEGMENT and not dropped:
            dropped.append(message)
            return False
        return True

    config = UploadConfig(**{**FAST.model_dump(), "grant_timeout_s": 0.3})
    with _rig(tmp_path, s3_storage, accept=lose_first_announcement) as rig:
        (row,) = rig.record("rec-a", 1)
        rig.uploader(config)

        assert wait_for(rig.all_stored, WAIT_S)
        _assert_stored_once(rig, [row], seaweedfs)
        assert len(rig.published(SegmentAnnouncement)) == 2
        assert rig.grantor.announcements == 1


# --- restarts resume from the journal ------------------------------------------------------


def test_restart_during_a_put_resumes_from_the_journal(seaweedfs: SeaweedServer, rig: Rig) -> None:
    (row,) = rig.record("rec-a", 1, size=1024 * 1024)
    slow = UploadConfig(**{**FAST.model_dump(), "bandwidth_kbps": 200})  # about 40 s
    first = rig.uploader(slow)
    assert wait_for(lambda: rig.state(row) is SegmentState.GRANTED, WAIT_S)

    first.stop()  # aborts the PUT: a power cut would leave the same journal

    assert rig.state(row) is SegmentState.GRANTED
    assert row.path.exists()
    rig.uploader()
    assert wait_for(rig.all_stored, WAIT_S)
    _assert_stored_once(rig, [row], seaweedfs)
    assert rig.grantor.grants[rig.key(row)] == 2


def test_restart_after_upload_gets_confirmation_without_uploading_again(
    seaweedfs: SeaweedServer, tmp_path: Path, s3_storage: S3Storage
) -> None:
    confirmations_lost = [True]

    def lose_confirmations(answer: Answer) -> Answer | None:
        if isinstance(answer, StoredConfirmation) and confirmations_lost[0]:
            return None
        return answer

    with _rig(tmp_path, s3_storage, deliver=lose_confirmations) as rig:
        rows = rig.record("rec-a", 2)
        first = rig.uploader()
        assert wait_for(
            lambda: all(rig.state(row) is SegmentState.UPLOADED for row in rows), WAIT_S
        )
        first.stop()
        confirmations_lost[0] = False

        rig.uploader()

        assert wait_for(rig.all_stored, WAIT_S)
        _assert_stored_once(rig, rows, seaweedfs)
        assert all(rig.grantor.grants[rig.key(row)] == 1 for row in rows)


# --- answers the uploader must ignore ------------------------------------------------------------


@pytest.fixture
def idle_rig(tmp_path: Path, s3_storage: S3Storage) -> Iterator[Rig]:
    """No uploader thread runs: answers are fed by hand."""
    with _rig(tmp_path, s3_storage) as rig:
        yield rig


def _confirmation(row: SegmentRow, **changes: object) -> StoredConfirmation:
    fields: dict[str, object] = {
        "recording_id": row.recording_id,
        "sequence": row.sequence,
        "key": "classcap/x",
        "verified": True,
        "sha256": row.sha256,
        "size": row.size,
    }
    fields.update(changes)
    return StoredConfirmation.model_validate(fields)


def test_confirmation_that_does_not_match_the_journal_deletes_nothing(idle_rig: Rig) -> None:
    (row,) = idle_rig.record("rec-a", 1)
    uploader = Uploader(idle_rig.journal, idle_rig.spool, idle_rig.control.publish, FAST, DEVICE)

    uploader.on_stored(_confirmation(row, sha256="0" * 64))
    uploader.on_stored(_confirmation(row, size=(row.size or 0) + 1))
    uploader.on_stored(_confirmation(row, verified=False, sha256=None, size=None))

    assert row.path.exists()
    assert idle_rig.state(row) is SegmentState.CLOSED

    uploader.on_stored(_confirmation(row))

    assert not row.path.exists()
    assert idle_rig.state(row) is SegmentState.STORED


def test_answers_for_unknown_or_stored_segments_are_ignored(idle_rig: Rig) -> None:
    (row,) = idle_rig.record("rec-a", 1)
    uploader = Uploader(idle_rig.journal, idle_rig.spool, idle_rig.control.publish, FAST, DEVICE)
    uploader.on_stored(_confirmation(row))
    idle_rig.record("rec-b", 1)
    other = idle_rig.journal.segment("rec-b", 0)
    assert other is not None

    stranger = _confirmation(row, recording_id="rec-zz")
    uploader.on_stored(stranger)
    uploader.on_stored(_confirmation(row))  # a repeated confirmation
    uploader.on_grant(
        UploadGrant(
            recording_id="rec-zz",
            sequence=0,
            key="k",
            url="http://127.0.0.1:9/k",
            headers={},
            expires_at=utcnow() + timedelta(minutes=5),
        )
    )

    assert idle_rig.state(row) is SegmentState.STORED
    assert idle_rig.state(other) is SegmentState.CLOSED
    assert other.path.exists()


class _Highest(random.Random):
    """Always the top of the range: a spread hold of exactly ``spread_s``."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_hold_for_spread_defers_new_uploads_with_fixed_random(rig: Rig) -> None:
    rig.record("rec-a", 1)
    config = UploadConfig(**{**FAST.model_dump(), "spread_s": 3600})
    uploader = Uploader(rig.journal, rig.spool, rig.control.publish, config, DEVICE, rng=_Highest())
    rig.control.connect(uploader.on_grant, uploader.on_stored)
    rig.uploaders.append(uploader)
    uploader.hold_for_spread()
    uploader.set_online(True)
    uploader.start()
    uploader.wake()

    # Bounded look for something that must not happen while held.
    assert not wait_for(lambda: bool(rig.control.published), 1.0)
    assert rig.journal.backlog()[0] == 1


# --- backoff ------------------------------------------------------------------------------------


def test_backoff_starts_at_initial_and_stops_at_max() -> None:
    rng = random.Random(7)
    assert backoff_delay(0, 2.0, 300.0, rng) == 2.0
    assert all(2.0 <= backoff_delay(1, 2.0, 300.0, rng) <= 4.0 for _ in range(100))
    assert all(2.0 <= backoff_delay(50, 2.0, 300.0, rng) <= 300.0 for _ in range(100))
    assert max(backoff_delay(50, 2.0, 300.0, rng) for _ in range(200)) > 150.0


@given(
    failures=st.integers(min_value=0, max_value=10_000),
    initial=st.floats(min_value=0.01, max_value=100),
    maximum=st.floats(min_value=0.01, max_value=10_000),
    seed=st.integers(),
)
def test_backoff_is_always_within_bounds(
    failures: int, initial: float, maximum: float, seed: int
) -> None:
    delay = backoff_delay(failures, initial, maximum, random.Random(seed))
    assert min(initial, maximum) <= delay <= maximum + 1e-9
