"""The spool directory: one folder per recording, its manifest file and the disk budget.

Layout: ``<root>/<recording_id>/`` holds ``seg-NNNNN.mp4`` files, the
``segments.csv`` list the capture backend appends to, and ``manifest.json``.
Nothing here deletes video on its own: a segment file goes only when the
caller has the controller's stored confirmation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from device.segmentlist import (
    MANIFEST_NAME,
    SEGMENT_LIST_NAME,
    SegmentListError,
    parse_line,
    sequence_of,
)
from shared.codec import DecodeError, decode
from shared.messages import RecordingManifest

log = logging.getLogger(__name__)

_HASH_BLOCK = 1024 * 1024
_MIB = 1024 * 1024
# Same rule as the wire contract's RecordingId, so an id can never climb out of the root.
_RECORDING_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TEMP_SUFFIX = ".tmp"
# What may be left in a recording folder once all its video is stored.
_BOOKKEEPING = frozenset({MANIFEST_NAME, SEGMENT_LIST_NAME, MANIFEST_NAME + _TEMP_SUFFIX})


class SpoolError(Exception):
    """A spool operation refused or failed; the message names the path."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path, min_free_bytes: int) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self._root = root.absolute()
        self._min_free_bytes = min_free_bytes
        self._root.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        return self._root

    def recording_dir(self, recording_id: str) -> Path:
        """``<root>/<recording_id>``, created (and made durable) if missing."""
        path = self._path_of(recording_id)
        if not path.is_dir():
            path.mkdir(exist_ok=True)
            _fsync_dir(self._root)
        return path

    def _path_of(self, recording_id: str) -> Path:
        if not _RECORDING_ID.match(recording_id):
            raise SpoolError(f"invalid recording id {recording_id!r} for a spool folder")
        return self._root / recording_id

    # --- manifest -------------------------------------------------------------------

    def write_manifest(self, manifest: RecordingManifest) -> None:
        """Replaces the manifest atomically: a power cut leaves the old or the new one whole."""
        folder = self.recording_dir(manifest.recording_id)
        target = folder / MANIFEST_NAME
        temp = folder / (MANIFEST_NAME + _TEMP_SUFFIX)
        try:
            with temp.open("wb") as handle:
                handle.write(manifest.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            temp.replace(target)
            _fsync_dir(folder)
        except OSError as exc:
            raise SpoolError(f"cannot write manifest {target}: {exc}") from exc

    def read_manifest(self, recording_id: str) -> RecordingManifest | None:
        """The stored manifest, None if there is none; SpoolError if it is unreadable."""
        path = self._path_of(recording_id) / MANIFEST_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SpoolError(f"cannot read manifest {path}: {exc}") from exc
        try:
            return decode(RecordingManifest, data)
        except DecodeError as exc:
            raise SpoolError(f"manifest {path} is invalid: {exc.reason}") from exc

    # --- disk budget ----------------------------------------------------------------

    def disk_usage(self) -> tuple[int, int]:
        """(free bytes available to the agent, total bytes) of the spool's filesystem."""
        usage = shutil.disk_usage(self._root)
        return usage.free, usage.total

    def can_record(self) -> tuple[bool, str | None]:
        """Whether a new recording may start; when not, a reason a person can act on."""
        try:
            free, _total = self.disk_usage()
        except OSError as exc:
            return False, f"spool {self._root} is unavailable: {exc}"
        if free < self._min_free_bytes:
            return False, (
                f"free disk {free // _MIB} MB is below the {self._min_free_bytes // _MIB} MB budget"
            )
        if not os.access(self._root, os.W_OK):
            return False, f"spool {self._root} is not writable"
        return True, None

    # --- segment files --------------------------------------------------------------

    def hash_file(self, path: Path) -> tuple[int, str]:
        """(size, sha256 hex) of exactly the bytes read, streamed in 1 MiB blocks."""
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
                size += len(block)
        return size, digest.hexdigest()

    def delete_stored_segment(self, path: Path) -> None:
        """Deletes a segment file; call only after the controller confirmed the stored object."""
        resolved = path.absolute()
        if resolved.parent.parent != self._root or sequence_of(resolved.name) is None:
            raise SpoolError(f"refusing to delete {path}: not a segment file in spool {self._root}")
        try:
            resolved.unlink()
            _fsync_dir(resolved.parent)
        except FileNotFoundError:
            log.warning("stored segment already gone path=%s", resolved)
            return
        except OSError as exc:
            raise SpoolError(f"cannot delete stored segment {resolved}: {exc}") from exc
        log.info("stored segment deleted path=%s", resolved)

    def remove_finished_recording(self, recording_id: str) -> bool:
        """Removes an ended recording's folder once only bookkeeping files remain.

        Returns False, keeping everything, while any other file is present.
        The caller must know the recording has ended: an open recording's
        folder can be momentarily empty between two segments.
        """
        folder = self._path_of(recording_id)
        try:
            names = {entry.name for entry in os.scandir(folder)}
        except FileNotFoundError:
            return True
        leftover = names - _BOOKKEEPING
        if leftover:
            log.info(
                "recording folder kept recording=%s files=%s",
                recording_id,
                ",".join(sorted(leftover)[:5]),
            )
            return False
        try:
            for name in names:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
            _fsync_dir(self._root)
        except OSError as exc:
            raise SpoolError(f"cannot remove recording folder {folder}: {exc}") from exc
        log.info("recording folder removed recording=%s", recording_id)
        return True

    def unlisted_segment_files(self, recording_id: str) -> list[Path]:
        """Segment files not named by a valid line of the segment list: cut short by a crash."""
        folder = self._path_of(recording_id)
        listed: set[str] = set()
        try:
            text = (folder / SEGMENT_LIST_NAME).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        # A torn last line does not count: its segment was not complete when written.
        complete = text[: text.rfind("\n") + 1]
        for line in complete.splitlines():
            if not line.strip():
                continue
            try:
                listed.add(parse_line(folder, line).path.name)
            except SegmentListError as exc:
                log.error("bad segment list line recording=%s error=%s", recording_id, exc)
        try:
            names = [entry.name for entry in os.scandir(folder) if entry.is_file()]
        except FileNotFoundError:
            return []
        found = [
            (seq, name)
            for name in names
            if (seq := sequence_of(name)) is not None and name not in listed
        ]
        return [folder / name for _seq, name in sorted(found)]

    def recording_ids(self) -> list[str]:
        """Recording folders in the spool, in name order (ids sort by creation time)."""
        return sorted(
            entry.name
            for entry in os.scandir(self._root)
            if entry.is_dir() and _RECORDING_ID.match(entry.name)
        )
