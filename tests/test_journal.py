from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from device.journal import (
    Journal,
    JournalError,
    SegmentState,
    SegmentStateError,
    UnknownRecordingError,
)
from shared.messages import (
    Bookmark,
    CommandResult,
    CommandStatus,
    EndReason,
    Gap,
    RecordingStatus,
    Trigger,
)

T0 = datetime(2024, 9, 2, 8, 30, tzinfo=UTC)
SHA = "a" * 64


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite3"


@pytest.fixture
def journal(journal_path: Path) -> Iterator[Journal]:
    j = Journal(journal_path, "room-101")
    yield j
    j.close()


def begin(journal: Journal, recording_id: str, started_at: datetime = T0) -> None:
    journal.begin_recording(recording_id, Trigger.BUTTON, started_at, "h264 1280x720", "aac")


def close_segment(journal: Journal, recording_id: str, seq: int, size: int = 1000) -> bool:
    start = T0 + timedelta(seconds=10 * seq)
    return journal.segment_closed(
        recording_id,
        seq,
        Path(f"/spool/{recording_id}/seg-{seq:05d}.mp4"),
        size,
        SHA,
        start,
        start + timedelta(seconds=10),
    )


def test_begin_and_end_recording_build_the_manifest(journal: Journal) -> None:
    manifest = journal.begin_recording(
        "rec-1", Trigger.SCHEDULE, T0, "h264", None, window_id="period-2"
    )
    assert manifest.device_id == "room-101"
    assert manifest.status is RecordingStatus.RECORDING
    assert manifest.window_id == "period-2"
    assert manifest.segments == 0
    assert journal.open_recordings() == ["rec-1"]

    ended = journal.end_recording(
        "rec-1", T0 + timedelta(minutes=45), RecordingStatus.COMPLETE, EndReason.SCHEDULE
    )
    assert ended.status is RecordingStatus.COMPLETE
    assert ended.end_reason is EndReason.SCHEDULE
    assert ended.ended_at == T0 + timedelta(minutes=45)
    assert journal.open_recordings() == []
    assert journal.manifest("rec-1") == ended
    assert journal.manifest("rec-unknown") is None


def test_bookmarks_and_gaps_are_kept_in_time_order(journal: Journal) -> None:
    begin(journal, "rec-1")
    journal.add_bookmark("rec-1", Bookmark(at=T0 + timedelta(minutes=5), source="command"))
    manifest = journal.add_bookmark(
        "rec-1", Bookmark(at=T0 + timedelta(minutes=1), source="button", note="good question")
    )
    assert [b.at for b in manifest.bookmarks] == [
        T0 + timedelta(minutes=1),
        T0 + timedelta(minutes=5),
    ]
    assert manifest.bookmarks[0].note == "good question"
    gap = Gap(start=T0 + timedelta(minutes=2), end=T0 + timedelta(minutes=3), reason="power_loss")
    assert journal.add_gap("rec-1", gap).gaps == [gap]


def test_bad_input_changes_nothing(journal: Journal) -> None:
    with pytest.raises(ValidationError):
        journal.begin_recording("../escape", Trigger.BUTTON, T0, "h264", None)
    with pytest.raises(ValidationError):
        journal.begin_recording("rec-1", Trigger.BUTTON, datetime(2024, 9, 2), "h264", None)
    assert journal.manifest("rec-1") is None
    begin(journal, "rec-1")
    naive = datetime(2024, 9, 2, 8, 30)
    with pytest.raises(ValueError, match="no timezone"):
        journal.segment_closed("rec-1", 0, Path("/s/seg-00000.mp4"), 1, SHA, naive, naive)
    assert journal.all_segments("rec-1") == []
    with pytest.raises(JournalError, match="already exists"):
        begin(journal, "rec-1")
    with pytest.raises(UnknownRecordingError):
        journal.add_bookmark("rec-2", Bookmark(at=T0, source="button"))
    with pytest.raises(UnknownRecordingError):
        close_segment(journal, "rec-2", 0)
    with pytest.raises(ValueError, match="final status"):
        journal.end_recording("rec-1", T0, RecordingStatus.RECORDING, EndReason.BUTTON)
    assert journal.open_recordings() == ["rec-1"]


def test_segment_moves_through_every_state(journal: Journal) -> None:
    begin(journal, "rec-1")
    path = Path("/spool/rec-1/seg-00000.mp4")
    assert journal.segment_opened("rec-1", 0, path, T0)
    assert not journal.segment_opened("rec-1", 0, path, T0)
    row = journal.segment("rec-1", 0)
    assert row is not None
    assert row.state is SegmentState.RECORDING
    assert row.size is None
    assert journal.manifest("rec-1").segments == 0  # type: ignore[union-attr]
    assert journal.backlog() == (0, 0)

    assert close_segment(journal, "rec-1", 0, size=4321)
    row = journal.segment("rec-1", 0)
    assert row is not None
    assert (row.state, row.size, row.sha256, row.recovered) == (
        SegmentState.CLOSED,
        4321,
        SHA,
        False,
    )
    assert row.ended_at == T0 + timedelta(seconds=10)
    assert journal.manifest("rec-1").segments == 1  # type: ignore[union-attr]

    journal.mark_granted("rec-1", 0, "room-101/rec-1/seg-00000.mp4")
    journal.mark_uploaded("rec-1", 0)
    assert journal.segment("rec-1", 0).state is SegmentState.UPLOADED  # type: ignore[union-attr]
    journal.mark_stored("rec-1", 0)
    row = journal.segment("rec-1", 0)
    assert row is not None
    assert row.state is SegmentState.STORED
    assert row.key == "room-101/rec-1/seg-00000.mp4"
    assert journal.backlog() == (0, 0)
    assert journal.manifest("rec-1").segments == 1  # type: ignore[union-attr]


def test_closing_again_never_resets_an_upload(journal: Journal) -> None:
    begin(journal, "rec-1")
    assert close_segment(journal, "rec-1", 0)
    assert not close_segment(journal, "rec-1", 0)
    journal.mark_granted("rec-1", 0, "k0")
    assert not close_segment(journal, "rec-1", 0, size=1)
    row = journal.segment("rec-1", 0)
    assert row is not None
    assert (row.state, row.key, row.size) == (SegmentState.GRANTED, "k0", 1000)
    journal.mark_stored("rec-1", 0)
    assert not close_segment(journal, "rec-1", 0)
    assert journal.segment("rec-1", 0).state is SegmentState.STORED  # type: ignore[union-attr]


def test_repeated_confirmations_are_no_ops_and_steps_back_are_refused(journal: Journal) -> None:
    begin(journal, "rec-1")
    journal.segment_opened("rec-1", 0, Path("/spool/rec-1/seg-00000.mp4"), T0)
    with pytest.raises(SegmentStateError, match="state recording"):
        journal.mark_stored("rec-1", 0)
    with pytest.raises(SegmentStateError, match="not in the journal"):
        journal.mark_granted("rec-1", 7, "k")
    close_segment(journal, "rec-1", 0)
    with pytest.raises(SegmentStateError, match="mark uploaded"):
        journal.mark_uploaded("rec-1", 0)
    journal.mark_granted("rec-1", 0, "k1")
    journal.mark_granted("rec-1", 0, "k2")  # the controller answered a repeated announcement
    assert journal.segment("rec-1", 0).key == "k2"  # type: ignore[union-attr]
    journal.mark_uploaded("rec-1", 0)
    journal.mark_uploaded("rec-1", 0)
    journal.mark_stored("rec-1", 0)
    journal.mark_stored("rec-1", 0)
    journal.mark_uploaded("rec-1", 0)
    journal.reset_to_closed("rec-1", 0)
    with pytest.raises(SegmentStateError, match="grant"):
        journal.mark_granted("rec-1", 0, "k3")
    row = journal.segment("rec-1", 0)
    assert row is not None
    assert row.state is SegmentState.STORED
    assert row.attempts == 0


def test_a_crash_between_put_and_noting_it_can_still_be_confirmed(journal: Journal) -> None:
    begin(journal, "rec-1")
    close_segment(journal, "rec-1", 0)
    journal.mark_granted("rec-1", 0, "k")
    journal.mark_stored("rec-1", 0)
    assert journal.segment("rec-1", 0).state is SegmentState.STORED  # type: ignore[union-attr]


def test_reset_to_closed_counts_attempts_and_drops_the_key(journal: Journal) -> None:
    begin(journal, "rec-1")
    close_segment(journal, "rec-1", 0)
    journal.mark_granted("rec-1", 0, "k")
    journal.reset_to_closed("rec-1", 0)
    journal.mark_granted("rec-1", 0, "k")
    journal.mark_uploaded("rec-1", 0)
    journal.reset_to_closed("rec-1", 0)
    row = journal.segment("rec-1", 0)
    assert row is not None
    assert (row.state, row.key, row.attempts) == (SegmentState.CLOSED, None, 2)


def test_pending_segments_and_backlog(journal: Journal) -> None:
    begin(journal, "rec-b", T0 + timedelta(hours=1))
    begin(journal, "rec-a", T0)
    for seq in (2, 0, 1):
        close_segment(journal, "rec-b", seq, size=100 + seq)
    close_segment(journal, "rec-a", 0, size=10)
    journal.segment_opened("rec-b", 3, Path("/spool/rec-b/seg-00003.mp4"), T0)
    journal.mark_granted("rec-b", 1, "k")
    journal.mark_granted("rec-b", 2, "k")
    journal.mark_stored("rec-b", 2)

    pending = journal.pending_segments()
    assert [(s.recording_id, s.sequence) for s in pending] == [
        ("rec-a", 0),
        ("rec-b", 0),
        ("rec-b", 1),
    ]
    assert [s.state for s in pending] == [
        SegmentState.CLOSED,
        SegmentState.CLOSED,
        SegmentState.GRANTED,
    ]
    assert journal.backlog() == (3, 10 + 100 + 101)
    assert journal.recordings_with_pending_segments() == ["rec-a", "rec-b"]
    assert [s.sequence for s in journal.all_segments("rec-b")] == [0, 1, 2, 3]

    journal.mark_stored("rec-a", 0)
    assert journal.recordings_with_pending_segments() == ["rec-b"]
    assert journal.backlog() == (2, 201)


def test_everything_survives_reopening(journal_path: Path) -> None:
    first = Journal(journal_path, "room-101")
    begin(first, "rec-1")
    first.add_bookmark("rec-1", Bookmark(at=T0, source="button"))
    close_segment(first, "rec-1", 0)
    first.segment_closed(
        "rec-1",
        1,
        Path("/spool/rec-1/seg-00001.mp4"),
        5,
        SHA,
        T0,
        T0 + timedelta(seconds=3),
        recovered=True,
    )
    first.mark_granted("rec-1", 0, "k")
    first.remember_command("cmd-1", T0 + timedelta(minutes=1))
    first.set_value("desired", '{"version": 3}')
    manifest = first.manifest("rec-1")
    segments = first.all_segments("rec-1")
    first.close()

    second = Journal(journal_path, "room-101")
    try:
        assert second.manifest("rec-1") == manifest
        assert second.all_segments("rec-1") == segments
        assert second.all_segments("rec-1")[1].recovered
        assert second.open_recordings() == ["rec-1"]
        assert not second.remember_command("cmd-1", T0 + timedelta(minutes=1))
        assert second.get_value("desired") == '{"version": 3}'
    finally:
        second.close()


def test_the_file_is_a_wal_journal_with_a_schema_version(journal_path: Path) -> None:
    Journal(journal_path, "room-101").close()
    conn = sqlite3.connect(journal_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()


def test_next_epoch_increases_strictly_across_reopening(journal_path: Path) -> None:
    epochs = []
    for _ in range(3):
        journal = Journal(journal_path, "room-101")
        epochs.append(journal.next_epoch())
        epochs.append(journal.next_epoch())
        journal.close()
    assert epochs == sorted(set(epochs))
    assert epochs[0] >= 1


def test_values_overwrite(journal: Journal) -> None:
    assert journal.get_value("reported_version") is None
    journal.set_value("reported_version", "3")
    journal.set_value("reported_version", "4")
    assert journal.get_value("reported_version") == "4"


def test_commands_run_once_and_keep_their_last_result(journal: Journal) -> None:
    expires = T0 + timedelta(minutes=5)
    assert journal.remember_command("cmd-1", expires)
    assert not journal.remember_command("cmd-1", expires)
    assert journal.last_command_result("cmd-1") is None
    accepted = CommandResult(command_id="cmd-1", status=CommandStatus.ACCEPTED, ts=T0)
    done = CommandResult(command_id="cmd-1", status=CommandStatus.DONE, ts=T0, recording_id="rec-1")
    journal.store_command_result(accepted)
    journal.store_command_result(done)
    assert journal.last_command_result("cmd-1") == done
    assert journal.last_command_result("cmd-2") is None


def test_prune_forgets_only_expired_commands(journal: Journal) -> None:
    journal.remember_command("cmd-old", T0)
    journal.remember_command("cmd-new", T0 + timedelta(hours=2))
    journal.store_command_result(
        CommandResult(command_id="cmd-rejected", status=CommandStatus.REJECTED, ts=T0)
    )
    assert journal.prune_commands(T0 + timedelta(hours=1)) == 2
    assert journal.remember_command("cmd-old", T0)
    assert not journal.remember_command("cmd-new", T0)


def test_threads_share_one_journal(journal: Journal) -> None:
    begin(journal, "rec-1")
    epochs: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(worker: int) -> None:
        try:
            for i in range(25):
                seq = worker * 100 + i
                assert close_segment(journal, "rec-1", seq, size=1)
                journal.mark_granted("rec-1", seq, f"k{seq}")
                epoch = journal.next_epoch()
                with lock:
                    epochs.append(epoch)
                journal.backlog()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(epochs) == list(range(1, 151))
    assert journal.backlog() == (150, 150)
    assert {s.state for s in journal.pending_segments()} == {SegmentState.GRANTED}


def test_a_file_that_is_not_a_journal_gives_a_clear_error(journal_path: Path) -> None:
    journal_path.write_bytes(b"this is not a database, just some bytes " * 200)
    with pytest.raises(JournalError, match=r"is corrupt or not a SQLite database.*move it aside"):
        Journal(journal_path, "room-101")


def test_a_damaged_page_gives_a_clear_error(journal_path: Path) -> None:
    journal = Journal(journal_path, "room-101")
    begin(journal, "rec-1")
    for seq in range(200):
        close_segment(journal, "rec-1", seq)
    journal.close()
    page_size = 4096
    data = bytearray(journal_path.read_bytes())
    assert len(data) > 4 * page_size
    # Overwrite every page after the schema page with garbage, keeping the header valid.
    data[page_size:] = b"\xa5" * (len(data) - page_size)
    journal_path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="is corrupt"):
        Journal(journal_path, "room-101")


def test_a_newer_schema_is_refused(journal_path: Path) -> None:
    Journal(journal_path, "room-101").close()
    conn = sqlite3.connect(journal_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(JournalError, match="schema version 99, newer"):
        Journal(journal_path, "room-101")
