"""Follows every recording's ``segments.csv`` in the spool and reports each closed segment.

A line in the list is the capture backend's signal that a segment file is
complete. Only whole lines count: a line without its newline (still being
written, or torn by a power cut) waits. Each line is reported once per
process; after a restart the catch-up reads every list again from the start,
which is safe because the journal ignores segments it already has.

inotify can drop events when its queue overflows, so besides the watchdog
observer a slow rescan reads every list again; offsets make that free of
duplicates.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from device.segmentlist import SEGMENT_LIST_NAME, ClosedSegment, SegmentListError, parse_line

log = logging.getLogger(__name__)

OnClosed = Callable[[Path, ClosedSegment], None]

# Opened/closed-without-write events are left out: reading a list opens it,
# and reacting to that would read it again forever.
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]
_EVENT_TYPES = frozenset(cls.event_type for cls in _EVENTS)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: SegmentWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        # An exception escaping here would end the observer thread for good.
        try:
            self._watcher.handle_event(event)
        except Exception:
            log.exception("segment watcher event failed event=%s", event)


class SegmentWatcher:
    def __init__(self, root: Path, on_closed: OnClosed, *, rescan_interval_s: float = 10.0) -> None:
        if rescan_interval_s <= 0:
            raise ValueError(f"rescan_interval_s must be > 0, got {rescan_interval_s}")
        self._root = root.absolute()
        self._on_closed = on_closed
        self._rescan_interval_s = rescan_interval_s
        # Bytes of each segment list already reported, keyed by the list's path.
        self._offsets: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self._rescanner: threading.Thread | None = None

    def start(self) -> None:
        if self._observer is not None:
            raise RuntimeError("segment watcher already started")
        self._root.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        observer = Observer()
        observer.name = "segment-watcher-observer"
        observer.daemon = True
        # Watch first, then catch up: a line written in between is seen by both,
        # and the offsets make sure it is reported once.
        observer.schedule(_Handler(self), str(self._root), recursive=True, event_filter=_EVENTS)
        observer.start()
        self._observer = observer
        self.scan()
        self._rescanner = threading.Thread(
            target=self._rescan_loop, name="segment-watcher-rescan", daemon=True
        )
        self._rescanner.start()
        log.info("segment watcher started root=%s", self._root)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        if self._rescanner is not None:
            self._rescanner.join()
            self._rescanner = None
        log.info("segment watcher stopped root=%s", self._root)

    def scan(self) -> None:
        """Reads every segment list in the spool now (catch-up and safety net)."""
        try:
            folders = sorted(entry.path for entry in os.scandir(self._root) if entry.is_dir())
        except OSError:
            log.exception("segment watcher cannot list spool root=%s", self._root)
            return
        for folder in folders:
            self._read_list(Path(folder) / SEGMENT_LIST_NAME)
        with self._lock:
            for gone in [path for path in self._offsets if not path.parent.exists()]:
                del self._offsets[gone]

    def handle_event(self, event: FileSystemEvent) -> None:
        """Called on the observer thread for each file system event under the root."""
        if event.event_type not in _EVENT_TYPES:
            return
        for raw in (event.src_path, event.dest_path):
            if not raw:
                continue
            path = Path(os.fsdecode(raw))
            if event.is_directory:
                if path.parent == self._root:
                    self._list_changed(path / SEGMENT_LIST_NAME, event.event_type)
            elif path.name == SEGMENT_LIST_NAME and path.parent.parent == self._root:
                self._list_changed(path, event.event_type)

    def _list_changed(self, list_path: Path, event_type: str) -> None:
        # A recording folder made after start is read at once: its list may
        # have been written before the observer's watch on the folder existed.
        if event_type == "deleted":
            with self._lock:
                self._offsets.pop(list_path, None)
        else:
            self._read_list(list_path)

    def _rescan_loop(self) -> None:
        while not self._stop.wait(self._rescan_interval_s):
            try:
                self.scan()
            except Exception:
                log.exception("segment watcher rescan failed root=%s", self._root)

    def _read_list(self, list_path: Path) -> None:
        with self._lock:
            offset = self._offsets.get(list_path, 0)
            try:
                with list_path.open("rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    if size < offset:
                        log.warning(
                            "segment list shrank, reading it again path=%s size=%d offset=%d",
                            list_path,
                            size,
                            offset,
                        )
                        offset = 0
                    handle.seek(offset)
                    data = handle.read()
            except FileNotFoundError:
                return
            except OSError:
                log.exception("cannot read segment list path=%s", list_path)
                return
            end = data.rfind(b"\n") + 1
            self._offsets[list_path] = offset + end
            for raw_line in data[:end].splitlines():
                self._deliver(list_path.parent, raw_line)

    def _deliver(self, recording_dir: Path, raw_line: bytes) -> None:
        if not raw_line.strip():
            return
        try:
            segment = parse_line(recording_dir, raw_line.decode("utf-8"))
        except (UnicodeDecodeError, SegmentListError) as exc:
            log.error(
                "bad segment list line skipped recording=%s line=%r error=%s",
                recording_dir.name,
                raw_line[:200],
                exc,
            )
            return
        try:
            self._on_closed(recording_dir, segment)
        except Exception:
            log.exception(
                "segment callback failed recording=%s seq=%d; it is read again at the next start",
                recording_dir.name,
                segment.sequence,
            )
