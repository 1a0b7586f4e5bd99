"""The Pi camera through picamera2.

H.264 from ``H264Encoder`` (the hardware encoder on a Pi 4, libx264 through
libav on a Pi 5), audio through the encoder's own PyAV path so both share one
clock, muxed by ``PyavOutput`` into fragmented MP4 behind a
``SplittableOutput`` that switches files at a forced keyframe without dropping
a frame. Only imported when the configuration asks for this backend; needs
picamera2 0.3.32 or later (``PyavOutput`` options, ``force_key_frame``).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from picamera2 import Picamera2
from picamera2.encoders import H264Encoder
from picamera2.outputs import PyavOutput, SplittableOutput

from device.capture.base import (
    FRAGMENT_DURATION_US,
    MOVFLAGS,
    SYNC_INTERVAL_S,
    CaptureBackend,
    CaptureError,
    FrameClock,
    OpenSegmentSyncer,
    SegmentListWriter,
    SnapshotImage,
    snapshot_size,
)
from device.config import CaptureConfig
from shared.messages import MAX_SNAPSHOT_BYTES

logger = logging.getLogger(__name__)

if not hasattr(H264Encoder, "force_key_frame"):
    raise ImportError("picamera2 is too old: 0.3.32 or later is needed for force_key_frame")

_CAPTURE_TIMEOUT_S = 5.0
_SPLIT_TIMEOUT_S = 10.0
# A forced keyframe can reach the encoder before the splitter is waiting for
# it; asking again this often bounds how late a split can be.
_KEYFRAME_RETRY_S = 0.25
_JPEG_QUALITIES = (85, 70, 50, 30)
_MUX_OPTIONS = {
    "movflags": MOVFLAGS,
    "frag_duration": str(FRAGMENT_DURATION_US),
    "flush_packets": "1",
}


class _SegmentFile(PyavOutput):  # type: ignore[misc]
    """One segment's muxer; remembers the media time of its first and last video frame."""

    def __init__(
        self,
        path: Path,
        sequence: int,
        clock: FrameClock,
        on_error: Callable[[str], None],
    ) -> None:
        super().__init__(str(path), format="mp4", options=dict(_MUX_OPTIONS))
        self.sequence = sequence
        self.first_us: int | None = None
        self.last_us: int | None = None
        self._clock = clock
        self.error_callback = lambda exc: on_error(f"muxing {path.name} failed: {exc}")

    def outputframe(
        self,
        frame: Any,
        keyframe: bool = True,
        timestamp: int | None = None,
        packet: Any = None,
        audio: bool = False,
    ) -> None:
        if not audio and timestamp is not None:
            if self.first_us is None:
                self.first_us = timestamp
            self.last_us = timestamp
            self._clock.tick()
        super().outputframe(frame, keyframe, timestamp, packet, audio)


class _Recording:
    """One recording: the encoder, the splitter and the thread that splits on time."""

    def __init__(
        self,
        camera: Any,
        config: CaptureConfig,
        *,
        recording_dir: Path,
        first_sequence: int,
        clock: FrameClock,
        on_error: Callable[[str], None],
    ) -> None:
        self._camera = camera
        self._config = config
        self._writer = SegmentListWriter(recording_dir)
        self._clock = clock
        self._on_error = on_error
        self._frame_us = 1_000_000 // config.framerate
        self._encoder = H264Encoder(
            bitrate=config.bitrate_kbps * 1000, repeat=True, framerate=config.framerate
        )
        if config.audio:
            self._encoder.audio = True
            self._encoder.audio_input = _audio_input(config.audio_device)
            self._encoder.audio_output = {
                "codec_name": "aac",
                "bit_rate": config.audio_bitrate_kbps * 1000,
            }
        self._current = self._segment(first_sequence)
        self._splitter = SplittableOutput(output=self._current)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._split_loop, name=f"capture-split-{recording_dir.name}", daemon=True
        )
        self._syncer = OpenSegmentSyncer(
            self._writer, lambda: self._current.sequence, SYNC_INTERVAL_S
        )

    def _segment(self, sequence: int) -> _SegmentFile:
        return _SegmentFile(
            self._writer.segment_path(sequence), sequence, self._clock, self._on_error
        )

    def start(self) -> None:
        try:
            self._camera.start_recording(self._encoder, self._splitter)
        except Exception:
            # Leave neither the camera running nor a segment file open.
            for release in (self._camera.stop, self._splitter.stop):
                try:
                    release()
                except Exception:
                    logger.exception("cleanup after a failed start failed")
            raise
        self._thread.start()
        self._syncer.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("segment split still pending after %.0fs; stopping anyway", timeout)
        self._syncer.stop()
        current = self._current
        try:
            self._camera.stop_recording()
        except Exception:
            logger.exception("stopping the camera recording failed")
            self._writer.salvage(current.sequence, _seconds(current.first_us))
            return
        if current.first_us is None or current.last_us is None:
            logger.warning(
                "segment empty recording=%s seq=%d",
                self._writer.recording_dir.name,
                current.sequence,
            )
            return
        end_us = current.last_us + self._frame_us
        self._writer.append(current.sequence, _seconds(current.first_us), _seconds(end_us))

    def _split_loop(self) -> None:
        period = float(self._config.segment_seconds)
        next_split = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_split - time.monotonic())):
            next_split += period
            if not self._split():
                return

    def _split(self) -> bool:
        old = self._current
        new = self._segment(old.sequence + 1)
        switch = threading.Thread(
            target=self._splitter.split_output, args=(new,), name="capture-switch", daemon=True
        )
        switch.start()
        # Finished even when a stop is pending: an abandoned switch would leave a file open.
        deadline = time.monotonic() + _SPLIT_TIMEOUT_S
        while switch.is_alive() and time.monotonic() < deadline:
            self._encoder.force_key_frame()
            switch.join(_KEYFRAME_RETRY_S)
        if switch.is_alive():
            self._on_error(
                f"no keyframe to split segment {old.sequence} within {_SPLIT_TIMEOUT_S:.0f}s"
            )
            return False
        self._current = new
        if old.first_us is None or new.first_us is None:
            logger.warning(
                "segment empty recording=%s seq=%d", self._writer.recording_dir.name, old.sequence
            )
            return True
        self._writer.append(old.sequence, _seconds(old.first_us), _seconds(new.first_us))
        return True


def _seconds(timestamp_us: int | None) -> float:
    return (timestamp_us or 0) / 1_000_000


def _audio_input(device: str) -> dict[str, str]:
    # ALSA PCM names carry a colon (hw:1,0, plughw:CARD=...); anything else is a Pulse source.
    return {"file": device, "format": "alsa" if ":" in device else "pulse"}


class Picamera2Backend(CaptureBackend):
    """The Raspberry Pi camera module."""

    def __init__(self, config: CaptureConfig, on_failure: Callable[[str], None]) -> None:
        super().__init__(config, on_failure)
        self._lock = threading.Lock()
        self._camera: Any = None
        self._recording: _Recording | None = None
        self._clock = FrameClock()
        self._failed = threading.Event()

    @property
    def running(self) -> bool:
        return self._recording is not None and not self._failed.is_set()

    def start(self, recording_dir: Path, first_sequence: int = 0) -> None:
        with self._lock:
            if self._recording is not None:
                raise CaptureError("capture is already recording")
            camera = self._open()
            try:
                recording_dir.mkdir(parents=True, exist_ok=True)
                camera.configure(self._video_configuration(camera))
            except Exception as exc:
                raise CaptureError(f"cannot configure the camera: {exc}") from exc
            self._clock.reset()
            self._failed.clear()
            recording = _Recording(
                camera,
                self.config,
                recording_dir=recording_dir,
                first_sequence=first_sequence,
                clock=self._clock,
                on_error=self._fail,
            )
            try:
                recording.start()
            except Exception as exc:
                raise CaptureError(f"cannot start recording: {exc}") from exc
            self._recording = recording

    def stop(self, timeout: float = 15.0) -> None:
        with self._lock:
            recording, self._recording = self._recording, None
            if recording is not None:
                recording.stop(timeout)

    def frames_arriving(self, within_s: float) -> bool:
        return self.running and self._clock.within(within_s)

    def snapshot(self) -> SnapshotImage:
        with self._lock:
            camera = self._open()
            if self._recording is not None:
                return self._capture_jpeg(camera)
            try:
                camera.configure(self._video_configuration(camera))
                camera.start()
            except Exception as exc:
                raise CaptureError(f"cannot start the camera: {exc}") from exc
            try:
                return self._capture_jpeg(camera)
            finally:
                camera.stop()

    def camera_present(self) -> bool | None:
        try:
            return bool(Picamera2.global_camera_info())
        except Exception:
            logger.exception("cannot list cameras")
            return None

    def close(self) -> None:
        self.stop()
        with self._lock:
            camera, self._camera = self._camera, None
            if camera is not None:
                try:
                    camera.close()
                except Exception:
                    logger.exception("closing the camera failed")

    def _open(self) -> Any:
        if self._camera is None:
            if not Picamera2.global_camera_info():
                raise CaptureError("no camera detected")
            try:
                self._camera = Picamera2()
            except Exception as exc:
                raise CaptureError(f"cannot open the camera: {exc}") from exc
        return self._camera

    def _video_configuration(self, camera: Any) -> Any:
        frame_us = 1_000_000 // self.config.framerate
        return camera.create_video_configuration(
            main={"size": (self.config.width, self.config.height), "format": "YUV420"},
            lores={
                "size": snapshot_size(self.config.width, self.config.height),
                "format": "YUV420",
            },
            controls={"FrameDurationLimits": (frame_us, frame_us)},
        )

    def _capture_jpeg(self, camera: Any) -> SnapshotImage:
        for quality in _JPEG_QUALITIES:
            camera.options["quality"] = quality
            buffer = io.BytesIO()
            try:
                camera.capture_file(buffer, name="lores", format="jpeg", wait=_CAPTURE_TIMEOUT_S)
            except Exception as exc:
                raise CaptureError(f"snapshot capture failed: {exc}") from exc
            jpeg = buffer.getvalue()
            if len(jpeg) <= MAX_SNAPSHOT_BYTES:
                return SnapshotImage.from_jpeg(jpeg)
        raise CaptureError(f"snapshot stays above {MAX_SNAPSHOT_BYTES} bytes")

    def _fail(self, reason: str) -> None:
        if self._failed.is_set():
            return
        self._failed.set()
        # Called on picamera2's encoder or our split thread: a handler that stops
        # the recording must not run on a thread that stopping waits for.
        threading.Thread(
            target=self._report_failure, args=(reason,), name="capture-failure", daemon=True
        ).start()
