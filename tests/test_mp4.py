"""Fragmented-MP4 recovery on real ffmpeg output cut short, and on garbage."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.mp4 import recover_fragmented_mp4
from tests.support.media import decode_errors, make_fragmented_mp4, probe

SECONDS = 4.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mp4") / "clip.mp4"
    make_fragmented_mp4(path, SECONDS)
    return path


def top_level_boxes(path: Path) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each top-level box, read independently of device.mp4."""
    data = path.read_bytes()
    boxes = []
    offset = 0
    while offset < len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        boxes.append((kind, offset, offset + size))
        offset += size
    return boxes


def copy(clip: Path, tmp_path: Path, name: str = "seg.mp4") -> Path:
    target = tmp_path / name
    shutil.copyfile(clip, target)
    return target


def test_clean_file_is_kept_whole(clip: Path, tmp_path: Path) -> None:
    path = copy(clip, tmp_path)
    size = path.stat().st_size

    result = recover_fragmented_mp4(path)

    assert result.playable
    assert (result.kept_bytes, result.dropped_bytes) == (size, 0)
    assert path.stat().st_size == size
    assert result.media_seconds == pytest.approx(probe(path).duration, abs=0.001)


def test_clip_has_the_fragment_layout_recovery_relies_on(clip: Path) -> None:
    kinds = [kind for kind, _, _ in top_level_boxes(clip)]

    assert kinds[:2] == [b"ftyp", b"moov"]
    assert kinds.count(b"moof") >= SECONDS  # one-second fragments
    assert kinds[-1] == b"mfra"


def test_cut_inside_each_fragment_keeps_every_complete_fragment(clip: Path, tmp_path: Path) -> None:
    boxes = top_level_boxes(clip)
    mdats = [(start, end) for kind, start, end in boxes if kind == b"mdat"]
    full = probe(clip)
    for number, (start, end) in enumerate(mdats[1:-1], start=1):
        cut = (start + end) // 2
        path = copy(clip, tmp_path, f"cut-{number}.mp4")
        with path.open("r+b") as fh:
            fh.truncate(cut)

        result = recover_fragmented_mp4(path)

        previous_end = mdats[number - 1][1]
        assert result.playable, result.reason
        assert (result.kept_bytes, result.dropped_bytes) == (previous_end, cut - previous_end)
        assert path.stat().st_size == previous_end
        assert decode_errors(path) == ""
        probed = probe(path)
        assert probed.codec_names == ["h264", "aac"]
        assert 0 < probed.duration_of("video") < full.duration_of("video")
        assert result.media_seconds == pytest.approx(probed.duration, abs=0.001)


def test_cut_inside_a_moof_drops_that_fragment(clip: Path, tmp_path: Path) -> None:
    moofs = [(start, end) for kind, start, end in top_level_boxes(clip) if kind == b"moof"]
    start, end = moofs[2]
    path = copy(clip, tmp_path)
    with path.open("r+b") as fh:
        fh.truncate(start + (end - start) // 2)

    result = recover_fragmented_mp4(path)

    assert result.playable
    assert result.kept_bytes == start
    assert decode_errors(path) == ""


def test_cut_between_moof_and_mdat_drops_the_lonely_moof(clip: Path, tmp_path: Path) -> None:
    moofs = [(start, end) for kind, start, end in top_level_boxes(clip) if kind == b"moof"]
    start, end = moofs[1]
    path = copy(clip, tmp_path)
    with path.open("r+b") as fh:
        fh.truncate(end)

    result = recover_fragmented_mp4(path)

    assert result.playable
    assert result.kept_bytes == start
    assert result.reason == "last moof has no mdat"


def test_cut_inside_the_trailing_index_drops_the_index(clip: Path, tmp_path: Path) -> None:
    last_mdat_end = [e for kind, _, e in top_level_boxes(clip) if kind == b"mdat"][-1]
    path = copy(clip, tmp_path)
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 4)

    result = recover_fragmented_mp4(path)

    assert result.playable
    assert result.kept_bytes == last_mdat_end


def test_zero_filled_tail_after_power_loss_is_dropped(clip: Path, tmp_path: Path) -> None:
    path = copy(clip, tmp_path)
    size = path.stat().st_size
    with path.open("ab") as fh:
        fh.write(bytes(8192))

    result = recover_fragmented_mp4(path)

    assert result.playable
    assert (result.kept_bytes, result.dropped_bytes) == (size, 8192)
    assert path.read_bytes() == clip.read_bytes()


def test_cut_inside_first_fragment_is_unplayable_and_left_alone(clip: Path, tmp_path: Path) -> None:
    first_mdat = next((s, e) for kind, s, e in top_level_boxes(clip) if kind == b"mdat")
    path = copy(clip, tmp_path)
    cut = first_mdat[1] - 10
    with path.open("r+b") as fh:
        fh.truncate(cut)

    result = recover_fragmented_mp4(path)

    assert not result.playable
    assert result.reason is not None and "mdat" in result.reason
    assert path.stat().st_size == cut


def test_header_only_segment_is_unplayable(clip: Path, tmp_path: Path) -> None:
    moov_end = next(e for kind, _, e in top_level_boxes(clip) if kind == b"moov")
    path = copy(clip, tmp_path)
    with path.open("r+b") as fh:
        fh.truncate(moov_end)

    result = recover_fragmented_mp4(path)

    assert not result.playable
    assert result.reason == "no complete fragment"


def test_fragments_without_moov_are_unplayable(clip: Path, tmp_path: Path) -> None:
    data = clip.read_bytes()
    moov = next((s, e) for kind, s, e in top_level_boxes(clip) if kind == b"moov")
    path = tmp_path / "nomoov.mp4"
    path.write_bytes(data[: moov[0]] + data[moov[1] :])

    result = recover_fragmented_mp4(path)

    assert not result.playable
    assert result.reason is not None
    assert path.stat().st_size == len(data) - (moov[1] - moov[0])


def test_empty_file_is_unplayable(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")

    result = recover_fragmented_mp4(path)

    assert not result.playable
    assert result.reason == "no moov box"
    assert (result.kept_bytes, result.dropped_bytes) == (0, 0)


def test_missing_file_is_unplayable_without_raising(tmp_path: Path) -> None:
    result = recover_fragmented_mp4(tmp_path / "absent.mp4")

    assert not result.playable
    assert result.reason is not None and "cannot open" in result.reason


def test_random_bytes_are_unplayable(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(os.urandom(100_000))

    result = recover_fragmented_mp4(path)

    assert not result.playable
    assert path.stat().st_size == 100_000


def test_corrupt_moof_inside_a_complete_box_stops_recovery(clip: Path, tmp_path: Path) -> None:
    moofs = [(start, end) for kind, start, end in top_level_boxes(clip) if kind == b"moof"]
    start, end = moofs[2]
    data = bytearray(clip.read_bytes())
    data[start + 8 : end] = b"\xff" * (end - start - 8)
    path = tmp_path / "badmoof.mp4"
    path.write_bytes(bytes(data))

    result = recover_fragmented_mp4(path)

    assert result.playable
    assert result.kept_bytes == start
    assert decode_errors(path) == ""


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.mp4"
    path.write_bytes(data)

    result = recover_fragmented_mp4(path)

    assert result.kept_bytes + result.dropped_bytes == len(data)
    assert path.stat().st_size == (result.kept_bytes if result.playable else len(data))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.floats(min_value=0.0, max_value=1.0), noise=st.binary(max_size=64))
def test_any_cut_of_a_real_segment_ends_on_a_fragment_boundary(
    clip: Path, tmp_path: Path, cut: float, noise: bytes
) -> None:
    data = clip.read_bytes()
    truncated = data[: int(len(data) * cut)] + noise
    path = tmp_path / "cut.mp4"
    path.write_bytes(truncated)
    boundaries = {e for kind, _, e in top_level_boxes(clip) if kind in {b"mdat", b"mfra"}}

    result = recover_fragmented_mp4(path)

    if result.playable:
        assert result.kept_bytes in boundaries
        assert path.read_bytes() == truncated[: result.kept_bytes]
    else:
        assert path.read_bytes() == truncated


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flips=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=1.0), st.integers(1, 255)),
        min_size=1,
        max_size=8,
    )
)
def test_corrupted_bytes_anywhere_never_raise(
    clip: Path, tmp_path: Path, flips: list[tuple[float, int]]
) -> None:
    data = bytearray(clip.read_bytes())
    for where, mask in flips:
        data[min(len(data) - 1, int(len(data) * where))] ^= mask
    path = tmp_path / "flipped.mp4"
    path.write_bytes(bytes(data))

    result = recover_fragmented_mp4(path)

    assert result.kept_bytes + result.dropped_bytes == len(data)
    assert path.stat().st_size == (result.kept_bytes if result.playable else len(data))
