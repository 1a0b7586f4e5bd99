"""Recovery of fragmented MP4 segments cut short by a power loss or a killed encoder.

A fragmented MP4 is ``ftyp``, ``moov`` (track headers, no samples), then one
``moof`` + ``mdat`` pair per fragment, and on a clean close an ``mfra`` index.
Every complete pair is independently playable, so a file cut anywhere can be
made whole again by truncating it after the last complete pair.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_HEADER = 8
_LARGE_HEADER = 16
# Boxes we parse in full are small (track headers, fragment tables); anything
# claiming more is corrupt rather than a reason to read megabytes into memory.
_MAX_PARSED_BOX = 16 * 1024 * 1024
# Boxes that may legitimately follow the last fragment of a cleanly closed file.
_TRAILER_BOXES = frozenset({b"mfra", b"free", b"skip", b"udta", b"meta", b"sidx"})

_TFHD_BASE_DATA_OFFSET = 0x000001
_TFHD_SAMPLE_DESCRIPTION = 0x000002
_TFHD_DEFAULT_DURATION = 0x000008
_TFHD_DEFAULT_SIZE = 0x000010
_TRUN_DATA_OFFSET = 0x000001
_TRUN_FIRST_SAMPLE_FLAGS = 0x000004
_TRUN_SAMPLE_DURATION = 0x000100
_TRUN_SAMPLE_SIZE = 0x000200
_TRUN_SAMPLE_FLAGS = 0x000400
_TRUN_SAMPLE_CTO = 0x000800


@dataclass(frozen=True)
class RecoveryResult:
    """What recovery did to a file.

    ``kept_bytes``/``dropped_bytes`` describe the truncation; a file that is not
    playable is left untouched (all of it counts as kept). ``media_seconds`` is
    the longest track's duration in the kept fragments, when it could be read.
    """

    playable: bool
    kept_bytes: int
    dropped_bytes: int
    reason: str | None
    media_seconds: float | None = None


class _Corrupt(ValueError):
    pass


@dataclass
class _Track:
    timescale: int = 0
    default_duration: int = 0
    default_size: int = 0
    first_decode_time: int | None = None
    end_decode_time: int = 0


@dataclass
class _Timeline:
    tracks: dict[int, _Track] = field(default_factory=dict)

    def seconds(self) -> float | None:
        spans = [
            (t.end_decode_time - t.first_decode_time) / t.timescale
            for t in self.tracks.values()
            if t.timescale > 0 and t.first_decode_time is not None
        ]
        return max(spans) if spans else None


def recover_fragmented_mp4(path: Path) -> RecoveryResult:
    """Truncate ``path`` after its last complete fragment; never raises."""
    try:
        with path.open("r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            result = _recover(fh, size)
            if result.playable and result.dropped_bytes:
                fh.truncate(result.kept_bytes)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        return RecoveryResult(False, 0, 0, f"cannot open: {exc}")
    if result.dropped_bytes:
        logger.warning(
            "mp4 truncated path=%s kept=%d dropped=%d",
            path,
            result.kept_bytes,
            result.dropped_bytes,
        )
    if not result.playable:
        logger.warning("mp4 unplayable path=%s reason=%s", path, result.reason)
    return result


def _recover(fh: BinaryIO, size: int) -> RecoveryResult:
    timeline = _Timeline()
    seen_moov = False
    moof: _Box | None = None  # a complete moof still waiting for its mdat
    good_end = 0  # end of the last box known to belong in a playable file
    fragments = 0
    stop_reason: str | None = None
    offset = 0
    while offset < size:
        try:
            box = _read_header(fh, offset, size)
            if box.end > size:
                raise _Corrupt(f"incomplete {_name(box.kind)} box at {offset}")
            if box.kind == b"moov":
                _parse_moov(_read_payload(fh, box), timeline)
                seen_moov = True
                good_end = box.end
            elif box.kind == b"moof":
                if moof is not None:
                    raise _Corrupt(f"moof at {offset} follows a moof without mdat")
                moof = box
            elif box.kind == b"mdat" and moof is not None:
                _add_fragment(_read_payload(fh, moof), moof, box, timeline)
                moof = None
                fragments += 1
                good_end = box.end
            elif moof is not None:
                raise _Corrupt(f"{_name(box.kind)} at {offset} between moof and mdat")
            elif fragments and box.kind not in _TRAILER_BOXES:
                raise _Corrupt(f"unexpected {_name(box.kind)} box after fragments at {offset}")
            elif box.kind == b"mfra":
                _check_mfra(_read_payload(fh, box), box)
                good_end = box.end
            else:
                good_end = box.end
        except _Corrupt as exc:
            stop_reason = str(exc)
            break
        offset = box.end
    if moof is not None and stop_reason is None:
        stop_reason = "last moof has no mdat"
    if not seen_moov:
        return RecoveryResult(False, size, 0, stop_reason or "no moov box")
    if not fragments:
        return RecoveryResult(False, size, 0, stop_reason or "no complete fragment")
    return RecoveryResult(True, good_end, size - good_end, stop_reason, timeline.seconds())


@dataclass(frozen=True)
class _Box:
    kind: bytes
    start: int
    header_len: int
    end: int

    @property
    def payload_start(self) -> int:
        return self.start + self.header_len


def _read_header(fh: BinaryIO, offset: int, size: int) -> _Box:
    fh.seek(offset)
    raw = fh.read(_HEADER)
    if len(raw) < _HEADER:
        raise _Corrupt(f"incomplete box header at {offset}")
    box_size, kind = struct.unpack(">I4s", raw)
    if not all(0x20 <= byte < 0x7F for byte in kind):
        raise _Corrupt(f"garbage at {offset}")
    header_len = _HEADER
    if box_size == 1:
        large = fh.read(8)
        if len(large) < 8:
            raise _Corrupt(f"incomplete box header at {offset}")
        (box_size,) = struct.unpack(">Q", large)
        header_len = _LARGE_HEADER
    elif box_size == 0:
        box_size = size - offset  # "extends to end of file": only valid for the last box
    if box_size < header_len:
        raise _Corrupt(f"bad size {box_size} for {_name(kind)} box at {offset}")
    return _Box(kind, offset, header_len, offset + box_size)


def _name(kind: bytes) -> str:
    return kind.decode("ascii", "replace")


def _read_payload(fh: BinaryIO, box: _Box) -> bytes:
    length = box.end - box.payload_start
    if length > _MAX_PARSED_BOX:
        raise _Corrupt(f"{_name(box.kind)} at {box.start} too large to parse ({length} bytes)")
    fh.seek(box.payload_start)
    data = fh.read(length)
    if len(data) != length:
        raise _Corrupt(f"short read at {box.start}")
    return data


def _children(payload: bytes) -> list[tuple[bytes, bytes]]:
    """Child boxes of a container payload; raises on any inconsistency."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(payload):
        if pos + _HEADER > len(payload):
            raise _Corrupt("truncated child header")
        box_size, kind = struct.unpack_from(">I4s", payload, pos)
        header_len = _HEADER
        if box_size == 1:
            if pos + _LARGE_HEADER > len(payload):
                raise _Corrupt("truncated child header")
            (box_size,) = struct.unpack_from(">Q", payload, pos + _HEADER)
            header_len = _LARGE_HEADER
        elif box_size == 0:
            box_size = len(payload) - pos
        if box_size < header_len or pos + box_size > len(payload):
            raise _Corrupt(f"child {_name(kind)} overruns its parent")
        out.append((kind, payload[pos + header_len : pos + box_size]))
        pos += box_size
    return out


def _check_mfra(payload: bytes, box: _Box) -> None:
    """A complete index ends with an mfro repeating the mfra's size; a cut one does not."""
    children = _children(payload)
    if not children or children[-1][0] != b"mfro":
        raise _Corrupt(f"mfra at {box.start} has no mfro")
    _, _, fields = _full_box(children[-1][1])
    (size,) = _unpack(">I", fields, 0)
    if size != box.end - box.start:
        raise _Corrupt(f"mfra at {box.start} is incomplete")


def _full_box(payload: bytes) -> tuple[int, int, bytes]:
    if len(payload) < 4:
        raise _Corrupt("truncated full box")
    return payload[0], int.from_bytes(payload[1:4], "big"), payload[4:]


def _unpack(fmt: str, data: bytes, pos: int) -> tuple[int, ...]:
    try:
        return struct.unpack_from(fmt, data, pos)
    except struct.error:
        raise _Corrupt("truncated field") from None


def _parse_moov(payload: bytes, timeline: _Timeline) -> None:
    for kind, body in _children(payload):
        if kind == b"trak":
            _parse_trak(body, timeline)
        elif kind == b"mvex":
            for child_kind, child in _children(body):
                if child_kind == b"trex":
                    _, _, fields = _full_box(child)
                    track_id, _, duration, sample_size = _unpack(">IIII", fields, 0)
                    track = timeline.tracks.setdefault(track_id, _Track())
                    track.default_duration = duration
                    track.default_size = sample_size


def _parse_trak(payload: bytes, timeline: _Timeline) -> None:
    track_id: int | None = None
    timescale = 0
    for kind, body in _children(payload):
        if kind == b"tkhd":
            version, _, fields = _full_box(body)
            # creation and modification times precede the id: 32 or 64 bits each
            (track_id,) = _unpack(">I", fields, 16 if version == 1 else 8)
        elif kind == b"mdia":
            for child_kind, child in _children(body):
                if child_kind == b"mdhd":
                    version, _, fields = _full_box(child)
                    (timescale,) = _unpack(">I", fields, 16 if version == 1 else 8)
    if track_id is None:
        raise _Corrupt("trak without tkhd")
    timeline.tracks.setdefault(track_id, _Track()).timescale = timescale


@dataclass
class _TrafSummary:
    track: _Track
    decode_time: int | None
    duration: int


def _add_fragment(payload: bytes, moof: _Box, mdat: _Box, timeline: _Timeline) -> None:
    """Check a moof against its mdat, then extend the timeline by it."""
    runs = [
        _parse_traf(body, moof, mdat, timeline)
        for kind, body in _children(payload)
        if kind == b"traf"
    ]
    if not runs:
        raise _Corrupt(f"moof at {moof.start} has no track fragment")
    for run in runs:
        start = run.track.end_decode_time if run.decode_time is None else run.decode_time
        if run.track.first_decode_time is None:
            run.track.first_decode_time = start
        run.track.end_decode_time = start + run.duration


def _parse_traf(payload: bytes, moof: _Box, mdat: _Box, timeline: _Timeline) -> _TrafSummary:
    track: _Track | None = None
    default_duration = default_size = 0
    base = moof.start
    decode_time: int | None = None
    duration = 0
    data_pos: int | None = None
    for kind, body in _children(payload):
        if kind == b"tfhd":
            _, flags, fields = _full_box(body)
            (track_id,) = _unpack(">I", fields, 0)
            track = timeline.tracks.get(track_id)
            if track is None:
                raise _Corrupt(f"fragment for unknown track {track_id}")
            default_duration, default_size = track.default_duration, track.default_size
            pos = 4
            if flags & _TFHD_BASE_DATA_OFFSET:
                (base,) = _unpack(">Q", fields, pos)
                pos += 8
            if flags & _TFHD_SAMPLE_DESCRIPTION:
                pos += 4
            if flags & _TFHD_DEFAULT_DURATION:
                (default_duration,) = _unpack(">I", fields, pos)
                pos += 4
            if flags & _TFHD_DEFAULT_SIZE:
                (default_size,) = _unpack(">I", fields, pos)
        elif kind == b"tfdt":
            version, _, fields = _full_box(body)
            (decode_time,) = _unpack(">Q" if version == 1 else ">I", fields, 0)
        elif kind == b"trun":
            if track is None:
                raise _Corrupt("trun before tfhd")
            run = _parse_trun(body, default_duration, default_size)
            start = base + run.data_offset if run.data_offset is not None else data_pos
            if start is None:
                start = base
            data_pos = start + run.data_size
            if start < mdat.payload_start or data_pos > mdat.end:
                raise _Corrupt(f"samples of the moof at {moof.start} lie outside its mdat")
            duration += run.duration
    if track is None:
        raise _Corrupt("traf without tfhd")
    return _TrafSummary(track, decode_time, duration)


@dataclass(frozen=True)
class _TrackRun:
    data_offset: int | None
    data_size: int
    duration: int


def _parse_trun(body: bytes, default_duration: int, default_size: int) -> _TrackRun:
    _, flags, fields = _full_box(body)
    (count,) = _unpack(">I", fields, 0)
    pos = 4
    data_offset: int | None = None
    if flags & _TRUN_DATA_OFFSET:
        (data_offset,) = _unpack(">i", fields, pos)
        pos += 4
    if flags & _TRUN_FIRST_SAMPLE_FLAGS:
        pos += 4
    fields_per_sample = [
        bit
        for bit in (_TRUN_SAMPLE_DURATION, _TRUN_SAMPLE_SIZE, _TRUN_SAMPLE_FLAGS, _TRUN_SAMPLE_CTO)
        if flags & bit
    ]
    stride = 4 * len(fields_per_sample)
    if pos + count * stride > len(fields):
        raise _Corrupt("trun shorter than its sample count")
    duration = count * default_duration
    size = count * default_size
    for column, bit in enumerate(fields_per_sample):
        if bit not in (_TRUN_SAMPLE_DURATION, _TRUN_SAMPLE_SIZE):
            continue
        total = sum(
            struct.unpack_from(">I", fields, pos + i * stride + 4 * column)[0] for i in range(count)
        )
        if bit == _TRUN_SAMPLE_DURATION:
            duration = total
        else:
            size = total
    return _TrackRun(data_offset, size, duration)
