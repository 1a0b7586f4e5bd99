"""The per-recording segment list: one CSV line per closed segment.

Every capture backend appends ``<file>,<start>,<end>`` (media seconds since the
recording began, ffmpeg's ``-segment_list_type csv`` format) once a segment file
is complete, so a line's presence is the signal that the file may be hashed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SEGMENT_LIST_NAME = "segments.csv"
MANIFEST_NAME = "manifest.json"
_SEGMENT_FILE = re.compile(r"^seg-(\d{5})\.mp4$")


@dataclass(frozen=True)
class ClosedSegment:
    path: Path
    sequence: int
    media_start_s: float
    media_end_s: float


class SegmentListError(ValueError):
    pass


def segment_filename(sequence: int) -> str:
    return f"seg-{sequence:05d}.mp4"


def sequence_of(filename: str) -> int | None:
    match = _SEGMENT_FILE.match(filename)
    return int(match.group(1)) if match else None


def format_line(sequence: int, media_start_s: float, media_end_s: float) -> str:
    return f"{segment_filename(sequence)},{media_start_s:.6f},{media_end_s:.6f}\n"


def parse_line(recording_dir: Path, line: str) -> ClosedSegment:
    parts = line.strip().split(",")
    if len(parts) != 3:
        raise SegmentListError(f"expected 'file,start,end', got {line.strip()!r}")
    name, start, end = parts
    sequence = sequence_of(name)
    if sequence is None:
        raise SegmentListError(f"unexpected segment file name {name!r}")
    try:
        media_start, media_end = float(start), float(end)
    except ValueError:
        raise SegmentListError(f"bad times in {line.strip()!r}") from None
    if media_end < media_start:
        raise SegmentListError(f"segment ends before it starts: {line.strip()!r}")
    return ClosedSegment(recording_dir / name, sequence, media_start, media_end)


def read_segment_list(recording_dir: Path) -> list[ClosedSegment]:
    """All complete lines; a torn last line (power cut mid-write) is left out."""
    path = recording_dir / SEGMENT_LIST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    return [parse_line(recording_dir, line) for line in complete.splitlines() if line.strip()]
