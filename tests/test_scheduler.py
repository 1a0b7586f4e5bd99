"""The window scheduler's decisions, driven tick by tick with an injected clock.

The recorder, journal and spool are the real ones; only the camera is a mock.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device.capture.base import CaptureBackend, CaptureError, SnapshotImage
from device.config import CaptureConfig
from device.journal import Journal
from device.recorder import Recorder
from device.scheduler import WindowScheduler, active_window, next_boundary
from device.spool import Spool
from shared.messages import (
    CaptureWindow,
    EndReason,
    Event,
    EventKind,
    RecorderState,
    RecordingManifest,
    RecordingStatus,
    Trigger,
)

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def window(window_id: str, start_s: float, end_s: float) -> CaptureWindow:
    return CaptureWindow(window_id=window_id, start=at(start_s), end=at(end_s))


class MockCamera(CaptureBackend):
    """Stands in for the camera: records nothing, can refuse to start."""

    def __init__(self) -> None:
        super().__init__(CaptureConfig(backend="synthetic"), on_failure=lambda _reason: None)
        self.broken = False
        self.starts = 0
        self._running = False

    def start(self, recording_dir: Path, first_sequence: int = 0) -> None:
        self.starts += 1
        if self.broken:
            raise CaptureError("no camera")
        self._running = True

    def stop(self, timeout: float = 15.0) -> None:
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def frames_arriving(self, within_s: float) -> bool:
        return self._running

    def snapshot(self) -> SnapshotImage:
        raise CaptureError("no snapshots from the mock camera")

    def camera_present(self) -> bool | None:
        return not self.broken

    def close(self) -> None:
        self._running = False


@dataclass
class Unit:
    tmp_path: Path
    journal: Journal
    camera: MockCamera = field(default_factory=MockCamera)
    windows: list[CaptureWindow] = field(default_factory=list)
    now: datetime = T0
    min_free_bytes: int = 0
    events: list[Event] = field(default_factory=list)
    recorder: Recorder = field(init=False)
    scheduler: WindowScheduler = field(init=False)

    def __post_init__(self) -> None:
        self.boot()

    def boot(self) -> None:
        """A fresh recorder and scheduler on the same journal, as after a restart."""
        self.recorder = Recorder(
            self.camera,
            self.journal,
            Spool(self.tmp_path / "spool", self.min_free_bytes),
            publish_event=self.events.append,
            publish_manifest=lambda _manifest: None,
            on_state=lambda _state: None,
            video_codec="h264",
            audio_codec=None,
        )
        self.scheduler = WindowScheduler(
            self.recorder, self.journal, lambda: list(self.windows), lambda: self.now
        )
        self.recorder.on_recording_ended(self.scheduler.recording_ended)

    def tick(self, seconds: float) -> None:
        self.now = at(seconds)
        self.scheduler.tick()

    def manifest(self, recording_id: str | None) -> RecordingManifest:
        assert recording_id is not None
        manifest = self.journal.manifest(recording_id)
        assert manifest is not None
        return manifest


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Unit]:
    journal = Journal(tmp_path / "journal.sqlite3", "unit-sched")
    yield Unit(tmp_path, journal)
    journal.close()


def test_active_window_and_next_boundary() -> None:
    windows = [window("a", 10, 20), window("b", 15, 30), window("c", 40, 50)]
    assert active_window(windows, at(5)) is None
    assert active_window(windows, at(10)) == windows[0]
    assert active_window(windows, at(16)) == windows[0]
    assert active_window(windows, at(20)) == windows[1]
    assert active_window(windows, at(50)) is None
    assert next_boundary(windows, at(0)) == at(10)
    assert next_boundary(windows, at(10)) == at(15)
    assert next_boundary(windows, at(30)) == at(40)
    assert next_boundary(windows, at(50)) is None


def test_mock_camera_window_records_from_start_to_end(unit: Unit) -> None:
    unit.windows = [window("lesson-1", 10, 70)]
    unit.tick(9)
    assert unit.recorder.state is RecorderState.IDLE
    unit.tick(10)
    recording_id = unit.recorder.recording_id
    started = unit.manifest(recording_id)
    assert (started.trigger, started.window_id, started.gaps) == (Trigger.SCHEDULE, "lesson-1", [])
    unit.tick(40)
    assert unit.recorder.recording_id == recording_id
    unit.tick(70)
    assert unit.recorder.state is RecorderState.IDLE
    ended = unit.manifest(recording_id)
    assert (ended.status, ended.end_reason) == (RecordingStatus.COMPLETE, EndReason.SCHEDULE)
    unit.tick(71)
    assert unit.recorder.state is RecorderState.IDLE
    assert unit.camera.starts == 1


def test_mock_camera_back_to_back_windows_both_record(unit: Unit) -> None:
    unit.windows = [window("p1", 0, 30), window("p2", 30, 60)]
    unit.tick(0)
    first = unit.recorder.recording_id
    unit.tick(30)
    second = unit.recorder.recording_id
    assert second is not None and second != first
    assert unit.manifest(first).status is RecordingStatus.COMPLETE
    assert unit.manifest(second).window_id == "p2"
    assert unit.manifest(second).gaps == []
    unit.tick(60)
    assert unit.manifest(second).status is RecordingStatus.COMPLETE


def test_mock_camera_a_little_late_is_not_a_gap(unit: Unit) -> None:
    unit.windows = [window("w", 0, 60)]
    unit.tick(3)
    recording_id = unit.recorder.recording_id
    unit.tick(60)
    manifest = unit.manifest(recording_id)
    assert (manifest.status, manifest.gaps) == (RecordingStatus.COMPLETE, [])


def test_mock_camera_late_start_records_gap_and_ends_partial(unit: Unit) -> None:
    unit.windows = [window("w", 0, 60)]
    unit.tick(25)
    recording_id = unit.recorder.recording_id
    [gap] = unit.manifest(recording_id).gaps
    assert (gap.start, gap.end, gap.reason) == (at(0), at(25), "started late")
    unit.tick(60)
    assert unit.manifest(recording_id).status is RecordingStatus.PARTIAL


def test_mock_camera_removed_window_stops_at_once(unit: Unit) -> None:
    unit.windows = [window("w", 0, 60)]
    unit.tick(1)
    recording_id = unit.recorder.recording_id
    unit.windows = []
    unit.tick(2)
    assert unit.recorder.state is RecorderState.IDLE
    assert unit.manifest(recording_id).end_reason is EndReason.SCHEDULE


def test_mock_camera_moved_window_records_at_new_time_only(unit: Unit) -> None:
    unit.windows = [window("w", 0, 60)]
    unit.tick(1)
    old = unit.recorder.recording_id
    unit.windows = [window("w", 100, 160)]
    unit.tick(2)
    assert unit.recorder.state is RecorderState.IDLE
    unit.tick(100)
    new = unit.recorder.recording_id
    assert new is not None and new != old
    assert unit.manifest(new).gaps == []
    unit.tick(160)
    assert unit.manifest(new).status is RecordingStatus.COMPLETE


def test_mock_camera_deleted_window_never_records(unit: Unit) -> None:
    unit.windows = [window("w", 10, 60)]
    unit.tick(5)
    unit.windows = []
    unit.tick(10)
    unit.tick(30)
    assert unit.camera.starts == 0


def test_mock_camera_button_stop_declines_window_across_restart(unit: Unit) -> None:
    unit.windows = [window("w", 0, 60)]
    unit.tick(0)
    scheduled = unit.recorder.recording_id
    assert unit.recorder.stop(EndReason.BUTTON).ok
    unit.tick(10)
    assert unit.recorder.state is RecorderState.IDLE
    assert unit.manifest(scheduled).status is RecordingStatus.COMPLETE

    unit.boot()
    unit.tick(20)
    assert unit.recorder.state is RecorderState.IDLE

    manual = unit.recorder.start(Trigger.BUTTON).recording_id
    unit.tick(60)
    assert unit.recorder.recording_id == manual
    assert unit.manifest(manual).trigger is Trigger.BUTTON


def test_mock_camera_manual_recording_is_left_alone(unit: Unit) -> None:
    manual = unit.recorder.start(Trigger.COMMAND).recording_id
    unit.windows = [window("w", 10, 60)]
    unit.tick(10)
    unit.tick(60)
    assert unit.recorder.recording_id == manual
    assert unit.camera.starts == 1


def test_mock_camera_refusal_retries_while_the_window_lasts(unit: Unit) -> None:
    unit.windows = [window("w", 0, 60)]
    unit.camera.broken = True
    unit.tick(0)
    unit.tick(2)
    assert unit.camera.starts == 1
    unit.tick(5)
    assert unit.camera.starts == 2
    unit.camera.broken = False
    unit.tick(10)
    recording_id = unit.recorder.recording_id
    assert unit.recorder.state is RecorderState.RECORDING
    [gap] = unit.manifest(recording_id).gaps
    assert (gap.start, gap.end) == (at(0), at(10))


def test_mock_camera_disk_refusal_is_announced_once_per_window_not_per_retry(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "journal.sqlite3", "unit-sched")
    try:
        unit = Unit(tmp_path, journal, min_free_bytes=1 << 60)
        unit.windows = [window("w", 0, 60)]
        for seconds in (0, 5, 10, 15):
            unit.tick(seconds)
        assert unit.recorder.state is RecorderState.IDLE
        assert [e.kind for e in unit.events] == [EventKind.RECORDING_REFUSED]
    finally:
        journal.close()


def test_mock_camera_restart_after_power_loss_records_the_rest(unit: Unit) -> None:
    unit.windows = [window("w", 0, 120)]
    unit.tick(0)
    first = unit.recorder.recording_id
    assert first is not None
    # What start-up recovery leaves after a power cut 30 s in.
    unit.journal.end_recording(first, at(30), RecordingStatus.INTERRUPTED, EndReason.POWER_LOSS)

    unit.boot()
    unit.tick(45)
    second = unit.recorder.recording_id
    assert second is not None and second != first
    manifest = unit.manifest(second)
    assert (manifest.trigger, manifest.window_id) == (Trigger.SCHEDULE, "w")
    [gap] = manifest.gaps
    assert (gap.start, gap.end, gap.reason) == (at(30), at(45), "resumed after power_loss")
    unit.tick(120)
    assert unit.manifest(second).status is RecordingStatus.PARTIAL
