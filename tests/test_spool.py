from __future__ import annotations

import hashlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from device.segmentlist import MANIFEST_NAME, SEGMENT_LIST_NAME, format_line, segment_filename
from device.spool import Spool, SpoolError
from shared.messages import RecordingManifest, RecordingStatus, Trigger

T0 = datetime(2024, 9, 2, 8, 30, tzinfo=UTC)


def manifest(recording_id: str = "rec-1", segments: int = 0) -> RecordingManifest:
    return RecordingManifest(
        recording_id=recording_id,
        device_id="room-101",
        trigger=Trigger.BUTTON,
        started_at=T0,
        status=RecordingStatus.RECORDING,
        segments=segments,
        video="h264 1280x720",
        audio="aac",
    )


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", min_free_bytes=0)


def test_manifest_round_trip_replaces_the_old_one_whole(spool: Spool) -> None:
    assert spool.read_manifest("rec-1") is None
    spool.write_manifest(manifest(segments=1))
    spool.write_manifest(manifest(segments=2))
    folder = spool.recording_dir("rec-1")
    assert folder == spool.root / "rec-1"
    assert sorted(os.listdir(folder)) == [MANIFEST_NAME]
    assert spool.read_manifest("rec-1") == manifest(segments=2)


def test_a_temp_file_left_by_a_power_cut_does_not_matter(spool: Spool) -> None:
    spool.write_manifest(manifest(segments=1))
    folder = spool.recording_dir("rec-1")
    (folder / (MANIFEST_NAME + ".tmp")).write_bytes(b'{"schema": 1, "recor')
    assert spool.read_manifest("rec-1") == manifest(segments=1)
    spool.write_manifest(manifest(segments=2))
    assert spool.read_manifest("rec-1") == manifest(segments=2)
    assert sorted(os.listdir(folder)) == [MANIFEST_NAME]


def test_an_unreadable_manifest_is_a_clear_error(spool: Spool) -> None:
    (spool.recording_dir("rec-1") / MANIFEST_NAME).write_text('{"schema": 1, "recording_id"')
    with pytest.raises(SpoolError, match=r"manifest .*rec-1/manifest.json is invalid: not JSON"):
        spool.read_manifest("rec-1")


def test_ids_that_could_leave_the_spool_are_refused(spool: Spool) -> None:
    for bad in ("../etc", ".hidden", "a/b", ""):
        with pytest.raises(SpoolError, match="invalid recording id"):
            spool.recording_dir(bad)
    assert os.listdir(spool.root) == []


def test_disk_usage_is_the_real_filesystem(spool: Spool) -> None:
    free, total = spool.disk_usage()
    usage = shutil.disk_usage(spool.root)
    assert total == usage.total
    assert 0 < free <= total


def test_can_record_refuses_below_the_budget(tmp_path: Path) -> None:
    free, _ = Spool(tmp_path, 0).disk_usage()
    budget = free + 10 * 1024**3
    ok, reason = Spool(tmp_path, budget).can_record()
    assert not ok
    assert reason is not None
    assert f"below the {budget // 1024**2} MB budget" in reason
    assert reason.startswith("free disk ")
    assert Spool(tmp_path, 1024**2).can_record() == (True, None)


def test_hash_file_streams_large_files(spool: Spool, tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    assert spool.hash_file(path) == (len(data), hashlib.sha256(data).hexdigest())
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert spool.hash_file(empty) == (0, hashlib.sha256(b"").hexdigest())


def test_unlisted_segment_files_are_the_ones_a_crash_cut(spool: Spool) -> None:
    folder = spool.recording_dir("rec-1")
    for seq in range(5):
        (folder / segment_filename(seq)).write_bytes(b"x")
    (folder / "notes.txt").write_text("not a segment")
    (folder / SEGMENT_LIST_NAME).write_text(
        format_line(0, 0, 10)
        + "seg-00001.mp4,ten,twenty\n"  # a bad line does not vouch for its file
        + format_line(2, 20, 30)
        + "seg-00003.mp4,30.0,4"  # torn: the power went while this was written
    )
    assert spool.unlisted_segment_files("rec-1") == [
        folder / segment_filename(1),
        folder / segment_filename(3),
        folder / segment_filename(4),
    ]
    assert spool.unlisted_segment_files("rec-unknown") == []


def test_a_folder_without_a_list_has_every_segment_unlisted(spool: Spool) -> None:
    folder = spool.recording_dir("rec-1")
    (folder / segment_filename(0)).write_bytes(b"x")
    assert spool.unlisted_segment_files("rec-1") == [folder / segment_filename(0)]


def test_stored_segments_are_deleted_and_the_ended_folder_goes(spool: Spool) -> None:
    folder = spool.recording_dir("rec-1")
    spool.write_manifest(manifest())
    segments = [folder / segment_filename(seq) for seq in range(2)]
    for seq, path in enumerate(segments):
        path.write_bytes(b"video")
        with (folder / SEGMENT_LIST_NAME).open("a") as handle:
            handle.write(format_line(seq, seq * 10, seq * 10 + 10))

    spool.delete_stored_segment(segments[0])
    assert not segments[0].exists()
    spool.delete_stored_segment(segments[0])  # a repeated confirmation
    assert not spool.remove_finished_recording("rec-1")
    assert segments[1].exists()

    spool.delete_stored_segment(segments[1])
    assert spool.remove_finished_recording("rec-1")
    assert not folder.exists()
    assert spool.remove_finished_recording("rec-1")


def test_only_segment_files_inside_the_spool_are_deleted(spool: Spool, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victim = outside / segment_filename(0)
    victim.write_bytes(b"keep")
    manifest_path = spool.recording_dir("rec-1") / MANIFEST_NAME
    manifest_path.write_text("{}")
    for path in (
        victim,
        manifest_path,
        spool.root / "rec-1" / ".." / ".." / "elsewhere" / victim.name,
    ):
        with pytest.raises(SpoolError, match="refusing to delete"):
            spool.delete_stored_segment(path)
    assert victim.exists()
    assert manifest_path.exists()


def test_recording_ids_lists_recording_folders(spool: Spool) -> None:
    spool.recording_dir("rec-b")
    spool.recording_dir("rec-a")
    (spool.root / "stray-file").write_text("x")
    (spool.root / ".trash").mkdir()
    assert spool.recording_ids() == ["rec-a", "rec-b"]
