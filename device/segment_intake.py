"""Closed segments into the journal: hash each one, place it in wall-clock time, wake the uploader.

Also start-up recovery: a recording left open by a crash or power cut gets its
cut segment repaired (or loudly discarded) and is marked interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from device.journal import Journal
from device.mp4 import recover_fragmented_mp4
from device.recorder import CaptureRun
from device.segmentlist import ClosedSegment, read_segment_list, sequence_of
from device.spool import Spool
from shared.clock import from_timestamp, utcnow
from shared.messages import (
    EndReason,
    Event,
    EventKind,
    RecordingManifest,
    RecordingStatus,
    Severity,
)

log = logging.getLogger(__name__)


class SegmentIntake:
    def __init__(
        self,
        journal: Journal,
        spool: Spool,
        *,
        current_run: Callable[[], CaptureRun | None],
        on_new_segment: Callable[[], None],
        publish_event: Callable[[Event], None],
        publish_manifest: Callable[[RecordingManifest], None],
    ) -> None:
        self._journal = journal
        self._spool = spool
        self._current_run = current_run
        self._on_new_segment = on_new_segment
        self._publish_event = publish_event
        self._publish_manifest = publish_manifest

    def on_closed(self, recording_dir: Path, segment: ClosedSegment) -> None:
        recording_id = recording_dir.name
        existing = self._journal.segment(recording_id, segment.sequence)
        if existing is not None and existing.sha256 is not None:
            return
        base = self._run_start(recording_id)
        if base is None:
            log.error(
                "segment closed for unknown recording=%s seq=%d path=%s",
                recording_id,
                segment.sequence,
                segment.path,
            )
            return
        try:
            size, sha256 = self._spool.hash_file(segment.path)
        except FileNotFoundError:
            self._discard(recording_id, segment.sequence, "listed segment file is missing")
            return
        started = base + timedelta(seconds=segment.media_start_s)
        ended = base + timedelta(seconds=segment.media_end_s)
        if self._journal.segment_closed(
            recording_id, segment.sequence, segment.path, size, sha256, started, ended
        ):
            log.info(
                "segment closed recording=%s seq=%d size=%d media=%.3f-%.3f",
                recording_id,
                segment.sequence,
                size,
                segment.media_start_s,
                segment.media_end_s,
            )
            self._on_new_segment()

    def recover_interrupted(self) -> list[str]:
        """Finish every recording a crash left open; returns their ids."""
        recovered = []
        for recording_id in self._journal.open_recordings():
            manifest = self._journal.manifest(recording_id)
            if manifest is None:
                continue
            recording_dir = self._spool.recording_dir(recording_id)
            for segment in read_segment_list(recording_dir):
                self.on_closed(recording_dir, segment)
            last_end = self._recover_cut_segments(recording_id, manifest.started_at)
            ended_at = last_end or manifest.started_at
            final = self._journal.end_recording(
                recording_id, ended_at, RecordingStatus.INTERRUPTED, EndReason.POWER_LOSS
            )
            self._spool.write_manifest(final)
            log.warning(
                "recording recovered as interrupted recording=%s segments=%d",
                recording_id,
                final.segments,
            )
            self._publish_event(
                Event(
                    kind=EventKind.RECORDING_RECOVERED,
                    severity=Severity.WARNING,
                    recording_id=recording_id,
                    message="recording was cut by a crash or power loss; recovered as interrupted",
                    data={"segments": final.segments},
                )
            )
            self._publish_manifest(final)
            recovered.append(recording_id)
        if recovered:
            self._on_new_segment()
        return recovered

    def _recover_cut_segments(self, recording_id: str, started_at: datetime) -> datetime | None:
        rows = self._journal.all_segments(recording_id)
        last_end = max((r.ended_at for r in rows if r.ended_at is not None), default=None)
        for path in self._spool.unlisted_segment_files(recording_id):
            sequence = sequence_of(path.name)
            if sequence is None or self._journal.segment(recording_id, sequence) is not None:
                continue
            result = recover_fragmented_mp4(path)
            if not result.playable:
                self._discard(recording_id, sequence, result.reason or "no playable media")
                path.unlink(missing_ok=True)
                continue
            size, sha256 = self._spool.hash_file(path)
            seg_start = last_end or started_at
            if result.media_seconds is not None:
                seg_end = seg_start + timedelta(seconds=result.media_seconds)
            else:
                seg_end = max(seg_start, from_timestamp(path.stat().st_mtime))
            self._journal.segment_closed(
                recording_id, sequence, path, size, sha256, seg_start, seg_end, recovered=True
            )
            log.warning(
                "cut segment recovered recording=%s seq=%d kept=%d dropped=%d",
                recording_id,
                sequence,
                result.kept_bytes,
                result.dropped_bytes,
            )
            last_end = seg_end
        return last_end

    def _run_start(self, recording_id: str) -> datetime | None:
        run = self._current_run()
        if run is not None and run.recording_id == recording_id:
            return run.started_at
        manifest = self._journal.manifest(recording_id)
        return manifest.started_at if manifest else None

    def _discard(self, recording_id: str, sequence: int, reason: str) -> None:
        log.error("segment discarded recording=%s seq=%d reason=%s", recording_id, sequence, reason)
        self._publish_event(
            Event(
                kind=EventKind.SEGMENT_DISCARDED,
                severity=Severity.ERROR,
                recording_id=recording_id,
                message=f"segment {sequence} discarded: {reason}",
                data={"sequence": sequence, "at": utcnow().isoformat()},
            )
        )
