"""Runs the capture windows of the persisted desired state on the unit's own clock.

The scheduler needs no controller: it reads the schedule the unit last applied,
starts a recording when a window opens and stops it when the window closes. What
it must remember across restarts (which recording belongs to which window, which
windows a person ended early) lives in the journal's key/value store.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from device.journal import Journal
from device.recorder import Result
from shared.messages import CaptureWindow, EndReason, Gap, RecorderState, Trigger

log = logging.getLogger(__name__)

# A start this much after the window opened is late enough to be recorded as a gap.
LATE_START = timedelta(seconds=5)
RETRY_S = 5.0
_MAX_WAIT_S = 1.0
_RECORDINGS_KEY = "schedule_recordings"
_DECLINED_KEY = "schedule_declined"
# A person stopping a recording inside a window means "not this lesson".
_PERSON_STOPS = frozenset({EndReason.BUTTON, EndReason.COMMAND})


class ScheduleRecorder(Protocol):
    @property
    def state(self) -> RecorderState: ...

    @property
    def recording_id(self) -> str | None: ...

    def start(
        self,
        trigger: Trigger,
        window_id: str | None = None,
        gap: Gap | None = None,
        *,
        announce_refusal: bool = True,
    ) -> Result: ...

    def stop(self, reason: EndReason) -> Result: ...


def active_window(windows: list[CaptureWindow], now: datetime) -> CaptureWindow | None:
    """The window covering ``now``; of overlapping ones, the one that started first."""
    covering = [w for w in windows if w.start <= now < w.end]
    return min(covering, key=lambda w: (w.start, w.window_id), default=None)


def next_boundary(windows: list[CaptureWindow], now: datetime) -> datetime | None:
    """The next window start or end strictly after ``now``."""
    times = [t for w in windows for t in (w.start, w.end) if t > now]
    return min(times, default=None)


class WindowScheduler:
    def __init__(
        self,
        recorder: ScheduleRecorder,
        journal: Journal,
        windows: Callable[[], list[CaptureWindow]],
        clock: Callable[[], datetime],
    ) -> None:
        self._recorder = recorder
        self._journal = journal
        self._windows = windows
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        # Separate from _lock: the recorder calls recording_ended holding its own lock,
        # while tick holds _lock and calls into the recorder.
        self._declined_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._recordings: dict[str, str] = self._load_recordings()
        self._declined: set[str] = self._load_declined()
        # The scheduled recording this process started: (window id, recording id).
        self._current: tuple[str, str] | None = None
        self._retry_at: dict[str, datetime] = {}
        self._logged: set[tuple[str, str]] = set()

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Re-evaluate now, e.g. after a new desired state was applied."""
        self._wake.set()

    def _run(self) -> None:
        log.info("scheduler started windows=%d", len(self._windows()))
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            self._wake.wait(self._wait_s())
        log.info("scheduler stopped")

    def _wait_s(self) -> float:
        now = self._clock()
        boundary = next_boundary(self._windows(), now)
        if boundary is None:
            return _MAX_WAIT_S
        return max(0.0, min(_MAX_WAIT_S, (boundary - now).total_seconds()))

    # --- decisions --------------------------------------------------------------------

    def tick(self) -> None:
        """One decision: stop what should no longer record, then start what should."""
        with self._lock:
            now = self._clock()
            windows = self._windows()
            self._forget_removed(windows)
            if self._keep_current(windows, now):
                return
            window = active_window(windows, now)
            if window is None or self._is_declined(window.window_id):
                return
            if self._recorder.state in {
                RecorderState.RECORDING,
                RecorderState.STARTING,
                RecorderState.STOPPING,
            }:
                self._log_once(
                    window.window_id,
                    "busy",
                    "window %s opened while recording=%s runs; leaving it alone",
                    self._recorder.recording_id,
                )
                return
            retry_at = self._retry_at.get(window.window_id)
            if retry_at is not None and now < retry_at:
                return
            self._start(window, now)

    def recording_ended(self, recording_id: str) -> None:
        """Recorder listener: a person ending any recording inside a window declines it."""
        manifest = self._journal.manifest(recording_id)
        if manifest is None or manifest.end_reason not in _PERSON_STOPS:
            return
        window = active_window(self._windows(), self._clock())
        if window is None:
            return
        with self._declined_lock:
            if window.window_id in self._declined:
                return
            self._declined.add(window.window_id)
            self._save(_DECLINED_KEY, sorted(self._declined))
        log.info(
            "window declined window=%s recording=%s reason=%s",
            window.window_id,
            recording_id,
            manifest.end_reason.value if manifest.end_reason else None,
        )

    def _keep_current(self, windows: list[CaptureWindow], now: datetime) -> bool:
        """True while our recording should go on; stops it once its window is over or gone."""
        if self._current is None:
            return False
        window_id, recording_id = self._current
        if self._recorder.recording_id != recording_id:
            self._current = None
            return False
        window = next((w for w in windows if w.window_id == window_id), None)
        if window is not None and window.start <= now < window.end:
            return True
        why = "window ended" if window is not None and now >= window.end else "window removed"
        log.info(
            "scheduled recording stopping window=%s recording=%s: %s", window_id, recording_id, why
        )
        self._recorder.stop(EndReason.SCHEDULE)
        self._current = None
        return False

    def _start(self, window: CaptureWindow, now: datetime) -> None:
        gap = self._gap(window, now)
        # One refusal event per window, not one per retry.
        retrying = window.window_id in self._retry_at
        result = self._recorder.start(
            Trigger.SCHEDULE, window.window_id, gap, announce_refusal=not retrying
        )
        if not result.ok or result.recording_id is None:
            self._retry_at[window.window_id] = now + timedelta(seconds=RETRY_S)
            self._log_once(
                window.window_id,
                "refused",
                "scheduled recording refused window=%s reason=%s; retrying while the window lasts",
                result.reason,
                level=logging.WARNING,
            )
            return
        self._retry_at.pop(window.window_id, None)
        self._current = (window.window_id, result.recording_id)
        self._recordings[window.window_id] = result.recording_id
        self._save(_RECORDINGS_KEY, self._recordings)
        log.info(
            "scheduled recording started window=%s recording=%s gap=%s",
            window.window_id,
            result.recording_id,
            gap is not None,
        )

    def _gap(self, window: CaptureWindow, now: datetime) -> Gap | None:
        """What the window lost before this start: since it opened, or since its last recording."""
        earlier = self._recordings.get(window.window_id)
        manifest = self._journal.manifest(earlier) if earlier else None
        # An earlier recording counts only if it ran inside the window's current span (a
        # moved window starts afresh).
        if (
            manifest is not None
            and manifest.ended_at is not None
            and manifest.ended_at > window.start
        ):
            start = manifest.ended_at
            reason = f"resumed after {manifest.end_reason.value if manifest.end_reason else 'end'}"
            return Gap(start=start, end=now, reason=reason) if now > start else None
        if now - window.start > LATE_START:
            return Gap(start=window.start, end=now, reason="started late")
        return None

    def _forget_removed(self, windows: list[CaptureWindow]) -> None:
        ids = {w.window_id for w in windows}
        stale = [w for w in self._recordings if w not in ids]
        for window_id in stale:
            del self._recordings[window_id]
        if stale:
            self._save(_RECORDINGS_KEY, self._recordings)
        with self._declined_lock:
            if not self._declined <= ids:
                self._declined &= ids
                self._save(_DECLINED_KEY, sorted(self._declined))
        self._retry_at = {k: v for k, v in self._retry_at.items() if k in ids}
        self._logged = {k for k in self._logged if k[0] in ids}

    def _is_declined(self, window_id: str) -> bool:
        with self._declined_lock:
            return window_id in self._declined

    def _log_once(
        self, window_id: str, what: str, message: str, *args: object, level: int = logging.INFO
    ) -> None:
        if (window_id, what) in self._logged:
            return
        self._logged.add((window_id, what))
        log.log(level, message, window_id, *args)

    # --- persistence --------------------------------------------------------------------

    def _save(self, key: str, value: object) -> None:
        self._journal.set_value(key, json.dumps(value))

    def _load_recordings(self) -> dict[str, str]:
        raw = self._load(_RECORDINGS_KEY)
        if not isinstance(raw, dict):
            return {}
        return {str(k): str(v) for k, v in raw.items()}

    def _load_declined(self) -> set[str]:
        raw = self._load(_DECLINED_KEY)
        return {str(v) for v in raw} if isinstance(raw, list) else set()

    def _load(self, key: str) -> object:
        raw = self._journal.get_value(key)
        if raw is None:
            return None
        try:
            value: object = json.loads(raw)
        except ValueError:
            log.error("persisted %s is unreadable, ignoring it", key)
            return None
        return value
