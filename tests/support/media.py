"""ffprobe/ffmpeg helpers for tests that check real media files."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.capture.base import FRAGMENT_DURATION_US, MOVFLAGS

PROBE_TIMEOUT_S = 60.0


class ProbeError(AssertionError):
    """ffprobe could not read the file; the message carries its error output."""


@dataclass(frozen=True)
class StreamInfo:
    index: int
    codec_type: str
    codec_name: str
    start_time: float | None
    duration: float | None
    width: int | None
    height: int | None


@dataclass(frozen=True)
class ProbeResult:
    format_name: str
    start_time: float | None
    duration: float | None
    streams: tuple[StreamInfo, ...]

    @property
    def codec_names(self) -> list[str]:
        return [stream.codec_name for stream in self.streams]

    def stream(self, codec_type: str) -> StreamInfo:
        """The first stream of ``codec_type`` ("video", "audio")."""
        for stream in self.streams:
            if stream.codec_type == codec_type:
                return stream
        raise ProbeError(f"no {codec_type} stream among {self.codec_names}")

    def duration_of(self, codec_type: str) -> float:
        duration = self.stream(codec_type).duration
        if duration is None:
            raise ProbeError(f"the {codec_type} stream has no duration")
        return duration


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) else None


def probe(path: Path) -> ProbeResult:
    """Streams and format of ``path`` as ffprobe sees them; raises ProbeError if unreadable."""
    done = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_format",
            "-show_streams",
            str(path),
        ],
        capture_output=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise ProbeError(f"ffprobe {path}: {done.stderr.decode('utf-8', 'replace').strip()}")
    data = json.loads(done.stdout)
    fmt = data.get("format", {})
    streams = tuple(
        StreamInfo(
            index=int(stream["index"]),
            codec_type=str(stream.get("codec_type", "")),
            codec_name=str(stream.get("codec_name", "")),
            start_time=_float(stream.get("start_time")),
            duration=_float(stream.get("duration")),
            width=_int(stream.get("width")),
            height=_int(stream.get("height")),
        )
        for stream in data.get("streams", [])
    )
    return ProbeResult(
        format_name=str(fmt.get("format_name", "")),
        start_time=_float(fmt.get("start_time")),
        duration=_float(fmt.get("duration")),
        streams=streams,
    )


def decode_errors(path: Path) -> str:
    """Everything ffmpeg complains about while decoding all of ``path`` ("" when clean)."""
    done = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    errors = done.stderr.decode("utf-8", "replace").strip()
    if done.returncode != 0 and not errors:
        errors = f"ffmpeg exited with status {done.returncode}"
    return errors


def make_fragmented_mp4(path: Path, seconds: float, *, audio: bool = True) -> None:
    """A fragmented H.264 (+ AAC) MP4 muxed like the capture backends mux, as fast as possible."""
    source = "testsrc2=size=320x240:rate=10"
    if audio:
        source += "[out0];sine=frequency=440:sample_rate=48000[out1]"
    audio_args = ["-c:a", "aac", "-b:a", "64k"] if audio else []
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            source,
            "-t",
            str(seconds),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            *audio_args,
            "-movflags",
            MOVFLAGS,
            "-frag_duration",
            str(FRAGMENT_DURATION_US),
            "-flush_packets",
            "1",
            str(path),
        ],
        check=True,
        capture_output=True,
        timeout=PROBE_TIMEOUT_S,
    )
