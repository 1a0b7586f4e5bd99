from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.segment_watcher import SegmentWatcher
from device.segmentlist import SEGMENT_LIST_NAME, ClosedSegment, format_line
from tests.support.processes import wait_for

# Long enough that only the observer (or an explicit scan) can deliver in these tests.
NO_RESCAN = 3600.0


class Collector:
    def __init__(self, fail_on: set[int] | None = None) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, int, float, float]] = []
        self._fail_on = fail_on or set()

    def __call__(self, recording_dir: Path, segment: ClosedSegment) -> None:
        assert segment.path.parent == recording_dir
        with self._lock:
            self._seen.append(
                (recording_dir.name, segment.sequence, segment.media_start_s, segment.media_end_s)
            )
        if segment.sequence in self._fail_on:
            raise RuntimeError(f"journal refused seq {segment.sequence}")

    @property
    def seen(self) -> list[tuple[str, int, float, float]]:
        with self._lock:
            return list(self._seen)

    def delivered(self) -> list[tuple[str, int]]:
        return [(name, seq) for name, seq, _, _ in self.seen]


def append(root: Path, recording_id: str, text: str) -> None:
    folder = root / recording_id
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / SEGMENT_LIST_NAME).open("a", encoding="utf-8") as handle:
        handle.write(text)


def line(seq: int) -> str:
    return format_line(seq, seq * 10.0, seq * 10.0 + 10.0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def watcher(root: Path, collector: Collector) -> Iterator[SegmentWatcher]:
    w = SegmentWatcher(root, collector, rescan_interval_s=NO_RESCAN)
    yield w
    w.stop()


def test_start_catches_up_on_existing_lists_then_follows(
    root: Path, collector: Collector, watcher: SegmentWatcher
) -> None:
    append(root, "rec-b", line(0))
    append(root, "rec-a", line(0) + line(1))
    watcher.start()
    assert collector.delivered() == [("rec-a", 0), ("rec-a", 1), ("rec-b", 0)]
    assert collector.seen[1] == ("rec-a", 1, 10.0, 20.0)

    append(root, "rec-a", line(2))
    assert wait_for(lambda: ("rec-a", 2) in collector.delivered(), timeout=10)
    watcher.scan()
    assert collector.delivered() == [("rec-a", 0), ("rec-a", 1), ("rec-b", 0), ("rec-a", 2)]


def test_a_torn_line_waits_for_its_newline(
    root: Path, collector: Collector, watcher: SegmentWatcher
) -> None:
    watcher.start()
    append(root, "rec-1", line(0) + "seg-00001.mp4,10.0")
    assert wait_for(lambda: collector.delivered() == [("rec-1", 0)], timeout=10)
    watcher.scan()
    assert collector.delivered() == [("rec-1", 0)]

    append(root, "rec-1", "00000,2")
    watcher.scan()
    assert collector.delivered() == [("rec-1", 0)]

    append(root, "rec-1", "0.000000\n")
    assert wait_for(lambda: len(collector.delivered()) == 2, timeout=10)
    watcher.scan()
    assert collector.seen == [("rec-1", 0, 0.0, 10.0), ("rec-1", 1, 10.0, 20.0)]


def test_scan_alone_reads_lists_without_the_observer(root: Path, collector: Collector) -> None:
    watcher = SegmentWatcher(root, collector, rescan_interval_s=NO_RESCAN)
    append(root, "rec-1", line(0) + line(1) + "seg-00002")
    watcher.scan()
    watcher.scan()
    assert collector.delivered() == [("rec-1", 0), ("rec-1", 1)]


def test_recording_folders_created_after_start_are_followed(
    root: Path, collector: Collector, watcher: SegmentWatcher
) -> None:
    watcher.start()
    # Written straight after mkdir, racing the observer's watch on the new folder.
    expected = []
    for n in range(5):
        append(root, f"rec-{n}", line(0) + line(1))
        expected += [(f"rec-{n}", 0), (f"rec-{n}", 1)]
    assert wait_for(lambda: sorted(collector.delivered()) == expected, timeout=10)
    append(root, "rec-4", line(2))
    assert wait_for(lambda: ("rec-4", 2) in collector.delivered(), timeout=10)
    assert len(collector.delivered()) == len(set(collector.delivered())) == 11


def test_the_root_itself_may_appear_after_construction(
    tmp_path: Path, collector: Collector
) -> None:
    root = tmp_path / "not" / "yet"
    watcher = SegmentWatcher(root, collector, rescan_interval_s=NO_RESCAN)
    try:
        watcher.start()
        append(root, "rec-1", line(0))
        assert wait_for(lambda: collector.delivered() == [("rec-1", 0)], timeout=10)
    finally:
        watcher.stop()


def test_a_bad_line_is_logged_and_skipped(
    root: Path, collector: Collector, watcher: SegmentWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    watcher.start()
    with caplog.at_level(logging.ERROR, logger="device.segment_watcher"):
        append(root, "rec-1", line(0) + "seg-00001.mp4,ten,twenty\n")
        with (root / "rec-1" / SEGMENT_LIST_NAME).open("ab") as handle:
            handle.write(b"seg-\xff\xfe.mp4,0,1\n")
        append(root, "rec-1", line(2))
        assert wait_for(lambda: ("rec-1", 2) in collector.delivered(), timeout=10)
    assert collector.delivered() == [("rec-1", 0), ("rec-1", 2)]
    bad = [r for r in caplog.records if "bad segment list line skipped" in r.getMessage()]
    assert len(bad) == 2
    assert "ten,twenty" in bad[0].getMessage()

    append(root, "rec-1", line(3))
    assert wait_for(lambda: ("rec-1", 3) in collector.delivered(), timeout=10)


def test_a_failing_callback_does_not_stop_the_watcher(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    collector = Collector(fail_on={0})
    watcher = SegmentWatcher(root, collector, rescan_interval_s=NO_RESCAN)
    try:
        with caplog.at_level(logging.ERROR, logger="device.segment_watcher"):
            watcher.start()
            append(root, "rec-1", line(0))
            assert wait_for(lambda: collector.delivered() == [("rec-1", 0)], timeout=10)
            append(root, "rec-1", line(1))
            assert wait_for(lambda: ("rec-1", 1) in collector.delivered(), timeout=10)
        assert any(
            "segment callback failed recording=rec-1 seq=0" in r.getMessage()
            for r in caplog.records
        )
        # Reported once per process even though the callback failed: a restart re-reads it.
        watcher.scan()
        assert collector.delivered() == [("rec-1", 0), ("rec-1", 1)]
    finally:
        watcher.stop()


def test_rescans_racing_the_observer_deliver_each_line_once(
    root: Path, collector: Collector
) -> None:
    watcher = SegmentWatcher(root, collector, rescan_interval_s=0.05)
    try:
        watcher.start()
        append(root, "rec-1", line(0))
        assert wait_for(lambda: collector.delivered() == [("rec-1", 0)], timeout=10)
        for seq in range(1, 20):
            append(root, "rec-1", line(seq))
        assert wait_for(lambda: len(collector.delivered()) == 20, timeout=10)
        assert collector.delivered() == [("rec-1", seq) for seq in range(20)]
    finally:
        watcher.stop()


def test_stop_ends_every_thread_it_started(root: Path, collector: Collector) -> None:
    before = set(threading.enumerate())
    watcher = SegmentWatcher(root, collector)
    watcher.start()
    names = {t.name for t in set(threading.enumerate()) - before}
    assert {"segment-watcher-observer", "segment-watcher-rescan"} <= names
    watcher.stop()
    watcher.stop()
    assert set(threading.enumerate()) - before == set()
