"""Capture backends: the Pi camera through picamera2, or an ffmpeg-simulated camera."""

from __future__ import annotations

from collections.abc import Callable

from device.capture.base import CaptureBackend, CaptureError, SnapshotImage
from device.capture.synthetic import SyntheticBackend
from device.config import CaptureConfig

__all__ = ["CaptureBackend", "CaptureError", "SnapshotImage", "create_backend"]


def create_backend(config: CaptureConfig, on_failure: Callable[[str], None]) -> CaptureBackend:
    """The backend ``config.backend`` names; picamera2 is imported only when asked for."""
    if config.backend == "picamera2":
        # Imported here so that a machine without picamera2 can run everything else.
        try:
            from device.capture.picamera2_backend import Picamera2Backend
        except (ImportError, OSError) as exc:
            raise CaptureError(
                f"the picamera2 backend needs picamera2 (python3-picamera2): {exc}"
            ) from exc

        return Picamera2Backend(config, on_failure)
    return SyntheticBackend(config, on_failure)
