"""What every capture backend offers the recorder, and the pieces they share."""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device.config import CaptureConfig
from device.mp4 import recover_fragmented_mp4
from device.segmentlist import SEGMENT_LIST_NAME, format_line, segment_filename
from shared.messages import MAX_SNAPSHOT_BYTES

logger = logging.getLogger(__name__)

# Fragmented MP4 with one-second fragments, flushed as written: a segment cut by
# a power loss or kill -9 keeps all but its last second or two.
FRAGMENT_DURATION_US = 250_000
MOVFLAGS = "+frag_keyframe+empty_moov+default_base_moof"
SYNC_INTERVAL_S = 2.0
# Snapshots are for a dashboard thumbnail: never wider than this.
SNAPSHOT_MAX_WIDTH = 640

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})


class CaptureError(Exception):
    """The capture cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class SnapshotImage:
    jpeg: bytes
    width: int
    height: int

    @classmethod
    def from_jpeg(cls, jpeg: bytes) -> SnapshotImage:
        """Validate a complete JPEG within the snapshot size limit."""
        if len(jpeg) > MAX_SNAPSHOT_BYTES:
            raise CaptureError(f"snapshot of {len(jpeg)} bytes exceeds {MAX_SNAPSHOT_BYTES}")
        width, height = jpeg_dimensions(jpeg)
        return cls(jpeg, width, height)


def jpeg_dimensions(jpeg: bytes) -> tuple[int, int]:
    """(width, height) from the frame header; raises CaptureError if not a whole JPEG."""
    if len(jpeg) < 4 or jpeg[:2] != b"\xff\xd8" or jpeg[-2:] != b"\xff\xd9":
        raise CaptureError("snapshot is not a complete JPEG")
    pos = 2
    while pos + 4 <= len(jpeg):
        if jpeg[pos] != 0xFF:
            break
        marker = jpeg[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        length = int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS and pos + 9 <= len(jpeg):
            height = int.from_bytes(jpeg[pos + 5 : pos + 7], "big")
            width = int.from_bytes(jpeg[pos + 7 : pos + 9], "big")
            if width and height:
                return width, height
            break
        if marker == 0xDA:  # image data starts before any frame header: not a valid JPEG
            break
        pos += 2 + length
    raise CaptureError("snapshot JPEG has no frame header")


def snapshot_size(width: int, height: int) -> tuple[int, int]:
    """Even dimensions no wider than SNAPSHOT_MAX_WIDTH, keeping the aspect ratio."""
    if width <= SNAPSHOT_MAX_WIDTH:
        return width - width % 2, height - height % 2
    scaled = round(height * SNAPSHOT_MAX_WIDTH / width)
    return SNAPSHOT_MAX_WIDTH, max(2, scaled - scaled % 2)


class SegmentListWriter:
    """Appends a recording's segments.csv line once its segment file is on disk.

    The segment file is fsynced before its line is written, and the line before
    it counts as written, so a power cut never leaves a line for missing data.
    """

    def __init__(self, recording_dir: Path) -> None:
        self.recording_dir = recording_dir
        self._path = recording_dir / SEGMENT_LIST_NAME

    def segment_path(self, sequence: int) -> Path:
        return self.recording_dir / segment_filename(sequence)

    def append(self, sequence: int, media_start_s: float, media_end_s: float) -> bool:
        """Write the line; False (logged) if the disk refused it."""
        line = format_line(sequence, media_start_s, max(media_start_s, media_end_s))
        try:
            _fsync_file(self.segment_path(sequence))
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            logger.exception(
                "segment list write failed recording=%s seq=%d", self.recording_dir.name, sequence
            )
            return False
        logger.info(
            "segment closed recording=%s seq=%d start=%.3f end=%.3f",
            self.recording_dir.name,
            sequence,
            media_start_s,
            media_end_s,
        )
        return True

    def salvage(self, sequence: int, media_start_s: float) -> bool:
        """List a segment the encoder left without a line, if it can be made playable."""
        path = self.segment_path(sequence)
        if not path.exists():
            return False
        result = recover_fragmented_mp4(path)
        recording = self.recording_dir.name
        if not result.playable or result.media_seconds is None:
            logger.error(
                "segment unplayable recording=%s seq=%d reason=%s",
                recording,
                sequence,
                result.reason,
            )
            return False
        logger.warning(
            "segment salvaged recording=%s seq=%d seconds=%.3f dropped_bytes=%d",
            recording,
            sequence,
            result.media_seconds,
            result.dropped_bytes,
        )
        return self.append(sequence, media_start_s, media_start_s + result.media_seconds)


class OpenSegmentSyncer:
    """fsyncs the segment being written every few seconds.

    ffmpeg and PyAV flush each fragment to the kernel; this bounds what a power
    cut can take from the page cache to the last few seconds.
    """

    def __init__(
        self, writer: SegmentListWriter, current_sequence: Callable[[], int], interval_s: float
    ) -> None:
        self._writer = writer
        self._current_sequence = current_sequence
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"capture-sync-{writer.recording_dir.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            path = self._writer.segment_path(self._current_sequence())
            try:
                _fsync_file(path)
            except FileNotFoundError:
                continue  # between segments
            except OSError as exc:
                logger.warning("segment sync failed path=%s error=%s", path, exc)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FrameClock:
    """Monotonic time of the latest encoded frame, shared between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: float | None = None
        self._count = 0

    def tick(self, count: int | None = None) -> None:
        """Record progress: ``count`` is a running total (only an increase counts)."""
        with self._lock:
            if count is None:
                count = self._count + 1
            if count > self._count:
                self._count = count
                self._last = time.monotonic()

    def reset(self) -> None:
        with self._lock:
            self._last = None
            self._count = 0

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def within(self, seconds: float) -> bool:
        with self._lock:
            return self._last is not None and time.monotonic() - self._last <= seconds


class CaptureBackend(ABC):
    """One camera (real or simulated) that records segments and takes snapshots.

    ``on_failure(reason)`` is called from a backend thread when the encoder dies
    unexpectedly while recording; never because of ``stop()``.
    """

    def __init__(self, config: CaptureConfig, on_failure: Callable[[str], None]) -> None:
        self.config = config
        self._on_failure = on_failure

    @abstractmethod
    def start(self, recording_dir: Path, first_sequence: int = 0) -> None:
        """Record ``seg-NNNNN.mp4`` files into ``recording_dir`` from ``first_sequence``.

        Each segment is ``config.segment_seconds`` long and starts at a forced
        keyframe; its segments.csv line (media seconds since this call) is
        appended once the file is complete. Returns once the encoder runs.
        """

    @abstractmethod
    def stop(self, timeout: float = 15.0) -> None:
        """Close the current segment cleanly and release the encoder; idempotent."""

    @property
    @abstractmethod
    def running(self) -> bool: ...

    @abstractmethod
    def frames_arriving(self, within_s: float) -> bool:
        """True if a frame was encoded in the last ``within_s`` seconds."""

    @abstractmethod
    def snapshot(self) -> SnapshotImage:
        """A JPEG of the current picture, without disturbing a recording."""

    @abstractmethod
    def camera_present(self) -> bool | None:
        """Whether a camera is attached; None when that cannot be told."""

    @abstractmethod
    def close(self) -> None:
        """Stop any recording and release the camera; the backend is unusable afterwards."""

    def _report_failure(self, reason: str) -> None:
        logger.error("capture failed reason=%s", reason)
        try:
            self._on_failure(reason)
        except Exception:
            logger.exception("capture failure handler raised")
