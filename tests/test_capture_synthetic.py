"""Capture backends: the ffmpeg-simulated camera on real media, the picamera2 adapter on a mock."""

from __future__ import annotations

import importlib.util
import io
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

import device.capture
from device.capture import CaptureError, SnapshotImage, create_backend
from device.capture.synthetic import SyntheticBackend
from device.config import CaptureConfig
from device.mp4 import recover_fragmented_mp4
from device.segmentlist import (
    SEGMENT_LIST_NAME,
    ClosedSegment,
    format_line,
    read_segment_list,
    segment_filename,
)
from shared.messages import MAX_SNAPSHOT_BYTES
from tests.support.media import probe
from tests.support.processes import stop_process, wait_for

FRAMERATE = 10
FRAME_S = 1 / FRAMERATE


def small_config(segment_seconds: int, *, audio: bool = True) -> CaptureConfig:
    return CaptureConfig(
        backend="synthetic",
        width=320,
        height=240,
        framerate=FRAMERATE,
        bitrate_kbps=300,
        segment_seconds=segment_seconds,
        audio=audio,
        audio_bitrate_kbps=64,
    )


class Failures:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        with self._lock:
            self.reasons.append(reason)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def failures() -> Failures:
    return Failures()


@pytest.fixture
def backends(failures: Failures) -> Iterator[list[SyntheticBackend]]:
    """Backends made by a test, closed afterwards with their encoders checked gone."""
    made: list[SyntheticBackend] = []
    yield made
    for backend in made:
        pid = backend.encoder_pid
        backend.close()
        assert pid is None or not pid_alive(pid)


def make_backend(
    backends: list[SyntheticBackend], failures: Failures, config: CaptureConfig
) -> SyntheticBackend:
    backend = create_backend(config, failures)
    assert isinstance(backend, SyntheticBackend)
    backends.append(backend)
    return backend


def segment_files(recording_dir: Path) -> list[str]:
    return sorted(p.name for p in recording_dir.glob("seg-*.mp4"))


def assert_continuous(segments: list[ClosedSegment]) -> None:
    for before, after in itertools.pairwise(segments):
        assert after.sequence == before.sequence + 1
        assert after.media_start_s == pytest.approx(before.media_end_s, abs=FRAME_S)


def test_recording_25s_in_10s_segments_is_continuous_and_complete(
    tmp_path: Path, backends: list[SyntheticBackend], failures: Failures
) -> None:
    backend = make_backend(backends, failures, small_config(10))
    recording = tmp_path / "rec-1"

    began = time.monotonic()
    backend.start(recording)
    assert backend.running
    assert backend.frames_arriving(2.0)
    time.sleep(max(0.0, 25.0 - (time.monotonic() - began)))
    ended = time.monotonic()
    backend.stop()
    wall_s = ended - began

    assert not backend.running
    assert not backend.frames_arriving(60.0)
    segments = read_segment_list(recording)
    assert [s.sequence for s in segments] == [0, 1, 2]
    assert segment_files(recording) == [segment_filename(n) for n in (0, 1, 2)]
    assert segments[0].media_start_s == pytest.approx(0.0, abs=FRAME_S)
    assert_continuous(segments)
    video_s = []
    for segment in segments:
        probed = probe(segment.path)
        assert probed.codec_names == ["h264", "aac"]
        assert probed.stream("video").width == 320
        video_s.append(probed.duration_of("video"))
        listed_s = segment.media_end_s - segment.media_start_s
        assert probed.duration_of("video") == pytest.approx(listed_s, abs=FRAME_S)
    # Splits land on the forced keyframes: the first two segments are 10 s long.
    assert video_s[0] == pytest.approx(10.0, abs=FRAME_S)
    assert video_s[1] == pytest.approx(10.0, abs=FRAME_S)
    assert sum(video_s) == pytest.approx(wall_s, abs=1.0)
    assert failures.reasons == []


def test_kill_9_mid_segment_leaves_a_playable_listed_segment(
    tmp_path: Path, backends: list[SyntheticBackend], failures: Failures
) -> None:
    backend = make_backend(backends, failures, small_config(8))
    recording = tmp_path / "rec-kill"
    backend.start(recording)
    assert wait_for(lambda: len(read_segment_list(recording)) == 1, timeout=30)
    time.sleep(5.0)  # at least 5 s into segment 1
    pid = backend.encoder_pid
    assert pid is not None

    os.kill(pid, signal.SIGKILL)

    assert wait_for(lambda: failures.reasons != [], timeout=15)
    assert "-9" in failures.reasons[0]
    assert not backend.running
    assert not pid_alive(pid)
    killed = recording / segment_filename(1)
    result = recover_fragmented_mp4(killed)
    assert result.playable, result.reason
    probed = probe(killed)
    assert probed.codec_names == ["h264", "aac"]
    assert probed.duration_of("video") >= 3.0
    # The backend listed what survived, continuing the first segment's timeline.
    segments = read_segment_list(recording)
    assert [s.sequence for s in segments] == [0, 1]
    assert_continuous(segments)
    assert segments[1].media_end_s - segments[1].media_start_s == pytest.approx(
        probed.duration, abs=0.01
    )
    backend.stop()
    assert len(failures.reasons) == 1


def test_failure_handler_may_stop_the_backend_from_the_backend_thread(tmp_path: Path) -> None:
    handled: list[str] = []

    def on_failure(reason: str) -> None:
        backend.stop()
        handled.append(reason)

    backend = create_backend(small_config(2, audio=False), on_failure)
    assert isinstance(backend, SyntheticBackend)
    try:
        backend.start(tmp_path / "rec")
        pid = backend.encoder_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

        assert wait_for(lambda: handled != [], timeout=15)
        assert not backend.running
    finally:
        backend.close()


def test_snapshots_while_recording_leave_the_recording_whole(
    tmp_path: Path, backends: list[SyntheticBackend], failures: Failures
) -> None:
    backend = make_backend(backends, failures, small_config(2))
    recording = tmp_path / "rec-snap"
    recording.mkdir()
    earlier = format_line(4, 0.0, 2.0)  # a previous run of the same recording
    (recording / SEGMENT_LIST_NAME).write_text(earlier, encoding="utf-8")

    backend.start(recording, first_sequence=5)
    snapshots = []
    deadline = time.monotonic() + 60
    while len(read_segment_list(recording)) < 4 and time.monotonic() < deadline:
        snapshots.append(backend.snapshot())
        time.sleep(0.3)
    backend.stop()

    assert len(snapshots) >= 5
    for number, snap in enumerate(snapshots[:: max(1, len(snapshots) // 4)]):
        assert 0 < len(snap.jpeg) <= MAX_SNAPSHOT_BYTES
        assert (snap.width, snap.height) == (320, 240)
        path = tmp_path / f"snap-{number}.jpg"
        path.write_bytes(snap.jpeg)
        assert probe(path).stream("video").codec_name == "mjpeg"
    assert (recording / SEGMENT_LIST_NAME).read_text(encoding="utf-8").startswith(earlier)
    segments = read_segment_list(recording)[1:]
    numbers = [s.sequence for s in segments]
    assert numbers == list(range(5, 5 + len(numbers)))
    assert len(numbers) >= 4
    assert segment_files(recording) == [segment_filename(n) for n in numbers]
    assert segments[0].media_start_s == pytest.approx(0.0, abs=FRAME_S)
    assert_continuous(segments)
    for segment in segments:
        assert probe(segment.path).codec_names == ["h264", "aac"]
    assert failures.reasons == []


def test_snapshot_while_idle_is_a_jpeg_of_the_configured_picture(
    tmp_path: Path, backends: list[SyntheticBackend], failures: Failures
) -> None:
    config = small_config(2).model_copy(update={"width": 1280, "height": 720})
    backend = make_backend(backends, failures, config)

    snap = backend.snapshot()

    assert not backend.running
    assert len(snap.jpeg) <= MAX_SNAPSHOT_BYTES
    assert (snap.width, snap.height) == (640, 360)
    path = tmp_path / "idle.jpg"
    path.write_bytes(snap.jpeg)
    assert probe(path).stream("video").width == 640


def test_video_only_recording_and_stop_is_idempotent(
    tmp_path: Path, backends: list[SyntheticBackend], failures: Failures
) -> None:
    backend = make_backend(backends, failures, small_config(2, audio=False))
    recording = tmp_path / "rec-video"
    backend.start(recording)
    with pytest.raises(CaptureError, match="already recording"):
        backend.start(recording)
    assert wait_for(lambda: len(read_segment_list(recording)) >= 1, timeout=15)

    backend.stop()
    backend.stop()

    assert not backend.running
    segments = read_segment_list(recording)
    assert len(segments) >= 2
    assert_continuous(segments)
    assert probe(segments[0].path).codec_names == ["h264"]
    assert failures.reasons == []


def test_capture_without_ffmpeg_on_path_raises(
    tmp_path: Path,
    backends: list[SyntheticBackend],
    failures: Failures,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = make_backend(backends, failures, small_config(2))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))

    with pytest.raises(CaptureError, match="ffmpeg not found"):
        backend.start(tmp_path / "rec")
    with pytest.raises(CaptureError, match="ffmpeg not found"):
        backend.snapshot()

    assert not backend.running
    assert backend.camera_present() is False
    assert failures.reasons == []


def test_encoder_that_dies_at_start_raises_with_its_error(
    tmp_path: Path,
    backends: list[SyntheticBackend],
    failures: Failures,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ffmpeg"
    fake.write_text("#!/bin/sh\necho 'Unknown encoder libx264' >&2\nexit 1\n", encoding="utf-8")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    backend = make_backend(backends, failures, small_config(2))

    with pytest.raises(CaptureError, match="status 1: Unknown encoder libx264"):
        backend.start(tmp_path / "rec")

    assert not backend.running
    assert failures.reasons == []


def test_recording_dir_that_cannot_be_created_raises(
    tmp_path: Path, backends: list[SyntheticBackend], failures: Failures
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory", encoding="utf-8")
    backend = make_backend(backends, failures, small_config(2))

    with pytest.raises(CaptureError, match="cannot create"):
        backend.start(blocker / "rec")


@pytest.mark.skipif(
    importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed here"
)
def test_picamera2_backend_without_picamera2_raises_capture_error() -> None:
    with pytest.raises(CaptureError, match="picamera2"):
        create_backend(CaptureConfig(backend="picamera2"), Failures())

    # The failed import leaves the rest of the package usable.
    assert isinstance(create_backend(small_config(2), Failures()), SyntheticBackend)


def test_frames_arriving_turns_false_while_the_encoder_is_stalled(
    tmp_path: Path, backends: list[SyntheticBackend], failures: Failures
) -> None:
    backend = make_backend(backends, failures, small_config(2, audio=False))
    backend.start(tmp_path / "rec-stall")
    pid = backend.encoder_pid
    assert pid is not None and backend.frames_arriving(2.0)

    os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_for(lambda: not backend.frames_arriving(1.0), timeout=10)
        assert backend.running
    finally:
        os.kill(pid, signal.SIGCONT)

    assert wait_for(lambda: backend.frames_arriving(1.0), timeout=10)
    backend.stop()
    assert failures.reasons == []


AGENT_SCRIPT = """
import sys, time
from pathlib import Path
from device.capture import create_backend
from device.config import CaptureConfig

config = CaptureConfig(backend="synthetic", width=320, height=240, framerate=10,
                       bitrate_kbps=300, segment_seconds=30)
backend = create_backend(config, lambda reason: None)
backend.start(Path(sys.argv[1]))
print(backend.encoder_pid, flush=True)
time.sleep(600)
"""


def process_gone(pid: int) -> bool:
    """Gone or a zombie waiting for a reaper that is not us."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_encoder_closes_its_segment_when_the_agent_dies(tmp_path: Path) -> None:
    recording = tmp_path / "rec-orphan"
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(recording)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    ffmpeg_pid: int | None = None
    try:
        assert agent.stdout is not None
        ffmpeg_pid = int(agent.stdout.readline())
        time.sleep(4.0)

        agent.kill()
        agent.wait(timeout=10)

        assert wait_for(lambda: process_gone(ffmpeg_pid), timeout=15)
    finally:
        stop_process(agent)
        if agent.stdout is not None:
            agent.stdout.close()
        if ffmpeg_pid is not None and not process_gone(ffmpeg_pid):
            os.kill(ffmpeg_pid, signal.SIGKILL)
    segment = recording / segment_filename(0)
    result = recover_fragmented_mp4(segment)
    assert result.playable, result.reason
    # SIGTERM lets ffmpeg write its last fragment and index: nothing to cut.
    assert result.dropped_bytes == 0
    assert probe(segment).duration_of("video") >= 3.0


def test_snapshot_image_accepts_only_whole_jpegs_within_the_limit(
    tmp_path: Path, backends: list[SyntheticBackend], failures: Failures
) -> None:
    jpeg = make_backend(backends, failures, small_config(2)).snapshot().jpeg

    assert SnapshotImage.from_jpeg(jpeg).width == 320
    with pytest.raises(CaptureError, match="not a complete JPEG"):
        SnapshotImage.from_jpeg(jpeg[: len(jpeg) // 2])
    with pytest.raises(CaptureError, match="no frame header"):
        SnapshotImage.from_jpeg(b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9")
    with pytest.raises(CaptureError, match="exceeds"):
        SnapshotImage.from_jpeg(jpeg[:-2] + bytes(MAX_SNAPSHOT_BYTES) + b"\xff\xd9")


# The picamera2 adapter against a mock camera: picamera2 only exists on a Pi, so
# these stand-ins follow its documented behaviour (SplittableOutput switches at
# the first video keyframe after split_output and returns once the old output
# is closed; encoders pass microsecond timestamps counted from the first frame).
MOCK_JPEG_HEAD = (  # SOI, then a baseline frame header for 640x360
    b"\xff\xd8\xff\xc0\x00\x11\x08\x01\x68\x02\x80\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
)


class MockOutput:
    def __init__(self) -> None:
        self.recording = False

    def start(self) -> None:
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def outputframe(
        self,
        frame: bytes,
        keyframe: bool = True,
        timestamp: int | None = None,
        packet: object = None,
        audio: bool = False,
    ) -> None:
        pass


class MockPyavOutput(MockOutput):
    def __init__(self, output_name: str, format: str | None = None, options: object = None) -> None:
        super().__init__()
        self.output_name = output_name
        self._file: BinaryIO | None = None

    def start(self) -> None:
        self._file = open(self.output_name, "wb")  # noqa: SIM115
        super().start()

    def stop(self) -> None:
        super().stop()
        if self._file is not None:
            self._file.close()
            self._file = None

    def outputframe(
        self,
        frame: bytes,
        keyframe: bool = True,
        timestamp: int | None = None,
        packet: object = None,
        audio: bool = False,
    ) -> None:
        if self._file is not None:
            self._file.write(frame)


class MockSplittableOutput(MockOutput):
    def __init__(self, output: MockOutput) -> None:
        super().__init__()
        self._output = output
        self._new_output: MockOutput | None = None
        self._done = threading.Event()

    def split_output(self, new_output: MockOutput) -> None:
        old = self._output
        new_output.start()
        self._new_output = new_output
        self._done.wait()
        self._done.clear()
        old.stop()

    def outputframe(
        self,
        frame: bytes,
        keyframe: bool = True,
        timestamp: int | None = None,
        packet: object = None,
        audio: bool = False,
    ) -> None:
        if self._new_output is not None and keyframe and not audio:
            self._output, self._new_output = self._new_output, None
            self._done.set()
        self._output.outputframe(frame, keyframe, timestamp, packet, audio)

    def start(self) -> None:
        super().start()
        self._output.start()

    def stop(self) -> None:
        super().stop()
        self._output.stop()


class MockH264Encoder:
    def __init__(self, bitrate: int, repeat: bool, framerate: int) -> None:
        self.framerate = framerate
        self.audio = False
        self.requested = 0

    def force_key_frame(self) -> None:
        self.requested += 1


class MockPicamera2:
    @staticmethod
    def global_camera_info() -> list[dict[str, object]]:
        return [{"Id": "mock", "Num": 0}]

    def __init__(self) -> None:
        self.options: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def create_video_configuration(self, **config: object) -> dict[str, object]:
        return config

    def configure(self, config: dict[str, object]) -> None:
        self.config = config

    def start_recording(self, encoder: MockH264Encoder, output: MockOutput) -> None:
        output.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._frames, args=(encoder, output))
        self._thread.start()

    def _frames(self, encoder: MockH264Encoder, output: MockOutput) -> None:
        frame_us = 1_000_000 // encoder.framerate
        number = served = 0
        while not self._stop.wait(frame_us / 1e6):
            keyframe = number == 0 or encoder.requested > served
            served = encoder.requested
            output.outputframe(b"frame", keyframe, number * frame_us)
            number += 1

    def stop_recording(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def capture_file(
        self, buffer: io.BytesIO, name: str = "main", format: str | None = None, wait: float = 0
    ) -> None:
        # Too big at high quality, so the adapter has to lower it.
        size = 2_000 if self.options["quality"] <= 50 else MAX_SNAPSHOT_BYTES
        buffer.write(MOCK_JPEG_HEAD + bytes(size) + b"\xff\xd9")

    def close(self) -> None:
        pass


ADAPTER = "device.capture.picamera2_backend"


@pytest.fixture
def mock_picamera2(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    modules = {
        "picamera2": {"Picamera2": MockPicamera2},
        "picamera2.encoders": {"H264Encoder": MockH264Encoder},
        "picamera2.outputs": {
            "Output": MockOutput,
            "PyavOutput": MockPyavOutput,
            "SplittableOutput": MockSplittableOutput,
        },
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, ADAPTER, raising=False)
    yield
    # The adapter imported against the mocks must not serve later imports.
    sys.modules.pop(ADAPTER, None)
    if hasattr(device.capture, "picamera2_backend"):
        delattr(device.capture, "picamera2_backend")


@pytest.mark.usefixtures("mock_picamera2")
def test_picamera2_mock_camera_splits_on_time_and_lists_each_segment(tmp_path: Path) -> None:
    failures = Failures()
    config = small_config(2).model_copy(
        update={"backend": "picamera2", "width": 1280, "height": 720}
    )
    backend = create_backend(config, failures)
    recording = tmp_path / "rec-pi"
    try:
        assert backend.camera_present() is True
        backend.start(recording, first_sequence=3)
        assert wait_for(lambda: backend.frames_arriving(1.0), timeout=5)
        assert wait_for(lambda: len(read_segment_list(recording)) >= 2, timeout=15)
        snap = backend.snapshot()
        backend.stop()
    finally:
        backend.close()

    assert (snap.width, snap.height) == (640, 360)
    assert len(snap.jpeg) <= MAX_SNAPSHOT_BYTES
    assert not backend.running
    segments = read_segment_list(recording)
    assert [s.sequence for s in segments] == list(range(3, 3 + len(segments)))
    assert segments[0].media_start_s == 0.0
    assert_continuous(segments)
    for segment in segments[:-1]:
        assert segment.media_end_s - segment.media_start_s == pytest.approx(2.0, abs=0.5)
    assert segment_files(recording) == [segment_filename(s.sequence) for s in segments]
    assert failures.reasons == []
