"""The recorder: one recording at a time, through idle → starting → recording → stopping.

It owns the recording's identity and manifest; the capture backend writes the
segments and the segment intake journals them as they close. The manifest is
written to the spool before the encoder starts, so a crash at any later moment
leaves a recording that start-up recovery can finish.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from device.capture.base import CaptureBackend, CaptureError
from device.journal import Journal
from device.spool import Spool
from shared.clock import utcnow
from shared.ids import new_recording_id
from shared.messages import (
    Bookmark,
    EndReason,
    Event,
    EventKind,
    Gap,
    RecorderState,
    RecordingManifest,
    RecordingStatus,
    Severity,
    Trigger,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureRun:
    """One uninterrupted encoder run inside a recording; segment times are relative to it."""

    recording_id: str
    first_sequence: int
    started_at: datetime


@dataclass(frozen=True)
class Result:
    ok: bool
    reason: str | None = None
    recording_id: str | None = None


class Recorder:
    def __init__(
        self,
        backend: CaptureBackend,
        journal: Journal,
        spool: Spool,
        *,
        publish_event: Callable[[Event], None],
        publish_manifest: Callable[[RecordingManifest], None],
        on_state: Callable[[RecorderState], None],
        video_codec: str,
        audio_codec: str | None,
    ) -> None:
        self._backend = backend
        self._journal = journal
        self._spool = spool
        self._publish_event = publish_event
        self._publish_manifest = publish_manifest
        self._on_state = on_state
        self._video = video_codec
        self._audio = audio_codec
        self._lock = threading.RLock()
        self._state = RecorderState.IDLE
        self._run: CaptureRun | None = None
        # A recording that started with a gap can at best end partial.
        self._partial = False
        self._ended_listeners: list[Callable[[str], None]] = []

    @property
    def state(self) -> RecorderState:
        return self._state

    @property
    def current_run(self) -> CaptureRun | None:
        return self._run

    @property
    def recording_id(self) -> str | None:
        run = self._run
        return run.recording_id if run else None

    def on_recording_ended(self, listener: Callable[[str], None]) -> None:
        self._ended_listeners.append(listener)

    def start(
        self,
        trigger: Trigger,
        window_id: str | None = None,
        gap: Gap | None = None,
        *,
        announce_refusal: bool = True,
    ) -> Result:
        """Starts a recording; ``gap`` is time its window lost before it (a late start).
        ``announce_refusal=False`` refuses without an event (a retry of an announced one)."""
        with self._lock:
            if self._state is not RecorderState.IDLE and self._state is not RecorderState.ERROR:
                return Result(False, f"already {self._state.value}", self.recording_id)
            allowed, why = self._spool.can_record()
            if not allowed:
                if announce_refusal:
                    self._event(
                        EventKind.RECORDING_REFUSED, Severity.ERROR, f"cannot record: {why}"
                    )
                return Result(False, why)
            self._set_state(RecorderState.STARTING)
            recording_id = new_recording_id()
            started_at = utcnow()
            manifest = self._journal.begin_recording(
                recording_id, trigger, started_at, self._video, self._audio, window_id
            )
            if gap is not None:
                manifest = self._journal.add_gap(recording_id, gap)
            self._partial = gap is not None
            self._spool.write_manifest(manifest)
            try:
                self._backend.start(self._spool.recording_dir(recording_id), first_sequence=0)
            except CaptureError as exc:
                log.error("capture failed to start recording=%s reason=%s", recording_id, exc)
                self._finish(recording_id, RecordingStatus.INTERRUPTED, EndReason.ERROR)
                self._event(
                    EventKind.CAPTURE_ERROR, Severity.ERROR, f"capture failed: {exc}", recording_id
                )
                self._set_state(RecorderState.ERROR)
                return Result(False, f"capture failed: {exc}", recording_id)
            self._run = CaptureRun(recording_id, 0, started_at)
            self._set_state(RecorderState.RECORDING)
        log.info(
            "recording started recording=%s trigger=%s window=%s",
            recording_id,
            trigger.value,
            window_id,
        )
        self._event(
            EventKind.RECORDING_STARTED,
            Severity.INFO,
            f"recording started by {trigger.value}",
            recording_id,
        )
        self._publish_manifest(manifest)
        return Result(True, None, recording_id)

    def stop(self, reason: EndReason) -> Result:
        with self._lock:
            run = self._run
            if run is None or self._state is not RecorderState.RECORDING:
                return Result(False, f"not recording (state {self._state.value})")
            self._set_state(RecorderState.STOPPING)
            try:
                self._backend.stop()
            except CaptureError as exc:
                log.error("capture failed to stop cleanly recording=%s: %s", run.recording_id, exc)
            if reason not in {EndReason.BUTTON, EndReason.COMMAND, EndReason.SCHEDULE}:
                status = RecordingStatus.INTERRUPTED
            elif self._partial:
                status = RecordingStatus.PARTIAL
            else:
                status = RecordingStatus.COMPLETE
            self._finish(run.recording_id, status, reason)
            self._run = None
            self._set_state(RecorderState.IDLE)
        log.info("recording stopped recording=%s reason=%s", run.recording_id, reason.value)
        self._event(
            EventKind.RECORDING_STOPPED,
            Severity.INFO,
            f"recording stopped by {reason.value}",
            run.recording_id,
        )
        return Result(True, None, run.recording_id)

    def bookmark(self, source: str, note: str | None = None) -> Result:
        with self._lock:
            run = self._run
            if run is None:
                return Result(False, "not recording")
            mark = Bookmark(
                at=utcnow(), source="button" if source == "button" else "command", note=note
            )
            manifest = self._journal.add_bookmark(run.recording_id, mark)
            self._spool.write_manifest(manifest)
        self._event(EventKind.BOOKMARK, Severity.INFO, "bookmark", run.recording_id)
        return Result(True, None, run.recording_id)

    def on_capture_failure(self, reason: str) -> None:
        """Called from the backend's thread when the encoder dies while recording."""
        with self._lock:
            run = self._run
            if run is None:
                return
            log.error("capture failed while recording recording=%s: %s", run.recording_id, reason)
            self._backend.stop()
            self._finish(run.recording_id, RecordingStatus.INTERRUPTED, EndReason.ERROR)
            self._run = None
            self._set_state(RecorderState.ERROR)
        self._event(
            EventKind.CAPTURE_ERROR, Severity.ERROR, f"capture failed: {reason}", run.recording_id
        )

    def _finish(self, recording_id: str, status: RecordingStatus, reason: EndReason) -> None:
        manifest = self._journal.end_recording(recording_id, utcnow(), status, reason)
        self._spool.write_manifest(manifest)
        self._publish_manifest(manifest)
        for listener in self._ended_listeners:
            listener(recording_id)

    def _set_state(self, state: RecorderState) -> None:
        self._state = state
        self._on_state(state)

    def _event(
        self, kind: EventKind, severity: Severity, message: str, recording_id: str | None = None
    ) -> None:
        self._publish_event(
            Event(kind=kind, severity=severity, message=message, recording_id=recording_id)
        )
