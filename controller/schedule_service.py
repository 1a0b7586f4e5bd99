"""Turns the stored schools and plans into each unit's capture windows, pushes them as the
unit's desired state, and watches that the windows are recorded.

``refresh`` expands a rolling horizon (yesterday, today and ``horizon_days`` ahead, in
each school's own timezone), keeps it in the ``capture_windows`` table and gives a unit
a new desired version only when its windows changed. The unit then runs them on its
own clock. ``check`` raises "capture_missed" for a window that should have started
and did not, and "capture_at_risk" before a window whose unit looks unable to record,
each with the likely cause. Both run periodically on one thread; the API calls
``refresh`` after every edit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, delete, exists, insert, select, update
from sqlalchemy.orm import Session

from controller.alerts import AlertKind, set_alert
from controller.db import Database, in_chunks
from controller.models import Alert, CaptureWindowRow, Device, Recording, SchoolRow
from controller.registry import Registry, UnknownDevice
from controller.schedules import ScheduleError, ScheduleStore
from shared.clock import utcnow
from shared.messages import (
    CaptureWindow,
    DesiredState,
    EndReason,
    RecorderState,
    RecordingStatus,
)
from shared.schedule import CapturePlan, PlannedWindow, School, expand, unit_windows

__all__ = [
    "RefreshResult",
    "ScheduleService",
    "ScheduleSettings",
    "TimelineEntry",
    "WindowStatus",
]

log = logging.getLogger(__name__)

# A unit applies a new desired state within seconds; only one pending longer is a cause.
_APPLY_GRACE = timedelta(seconds=60)
_STOP_TIMEOUT_S = 10.0
# Windows older than this are history to the missed check (it runs every few seconds).
_MISSED_LOOKBACK = timedelta(days=2)
# Local dates lie within this of the same UTC date in every timezone (and rolls fit in too).
_ZONE_SLACK = timedelta(days=2)
# preview() and timeline() spans, like a term's.
_MAX_SPAN_DAYS = 400
_BUSY_STATES = frozenset({RecorderState.STARTING, RecorderState.RECORDING, RecorderState.STOPPING})


@dataclass(frozen=True)
class ScheduleSettings:
    horizon_days: int = 14  # days ahead pushed to units (plus yesterday and today)
    refresh_interval_s: float = 300  # periodic full refresh (the horizon rolls with the date)
    check_interval_s: float = 15  # missed / at-risk checks
    missed_grace_s: float = 120  # a window not started this long after its start is missed
    at_risk_before_s: float = 1800  # warn this long before a window whose unit cannot record

    def __post_init__(self) -> None:
        if self.horizon_days < 1:
            raise ValueError("horizon_days must be at least 1")
        if self.refresh_interval_s <= 0 or self.check_interval_s <= 0:
            raise ValueError("refresh_interval_s and check_interval_s must be positive")
        if self.missed_grace_s < 0 or self.at_risk_before_s < 0:
            raise ValueError("missed_grace_s and at_risk_before_s must not be negative")


class WindowStatus(StrEnum):
    PLANNED = "planned"
    RECORDING = "recording"
    COMPLETED = "completed"
    PARTIAL = "partial"
    MISSED = "missed"
    STOPPED_BY_TEACHER = "stopped_by_teacher"


@dataclass(frozen=True)
class TimelineEntry:
    window_id: str
    school: str
    room: str
    device_id: str | None
    date: date
    period: str
    start: datetime
    end: datetime
    title: str
    teacher: str | None
    plans: list[str]
    status: WindowStatus
    recording_id: str | None
    reason: str | None  # missed cause / gaps


@dataclass(frozen=True)
class RefreshResult:
    windows: int  # windows in the horizon after the refresh
    pushed: list[str] = field(default_factory=list)  # units that got a new desired version


# Columns refresh takes from the expansion; a change in any rewrites the row.
_WINDOW_FIELDS = (
    "school_id",
    "device_id",
    "room",
    "date",
    "period",
    "start",
    "end",
    "title",
    "teacher",
    "plans",
)


class ScheduleService:
    def __init__(  # noqa: PLR0917 (the agreed signature)
        self,
        db: Database,
        store: ScheduleStore,
        registry: Registry,
        publish_desired: Callable[[str, DesiredState], None] | None,
        settings: ScheduleSettings = ScheduleSettings(),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self._store = store
        self._registry = registry
        self._publish = publish_desired
        self.settings = settings
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Edits from several web threads and the periodic one: one refresh at a time, so two
        # never push versions of the same unit in the wrong order.
        self._refresh_lock = threading.Lock()

    # --- thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="schedules", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("schedule thread did not stop within %ss", _STOP_TIMEOUT_S)
            self._thread = None

    def _run(self) -> None:
        next_refresh = next_check = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_refresh:
                next_refresh = now + self.settings.refresh_interval_s
                self._guarded(self.refresh, "refresh")
            if now >= next_check:
                next_check = now + self.settings.check_interval_s
                self._guarded(self.check, "check")
            self._stop.wait(max(0.0, min(next_refresh, next_check) - time.monotonic()))

    @staticmethod
    def _guarded(step: Callable[[], object], name: str) -> None:
        try:
            step()
        except Exception:
            log.exception("schedule %s failed", name)

    # --- expansion ----------------------------------------------------------------------------

    def _horizon(self, school: School, now: datetime) -> tuple[date, date]:
        today = now.astimezone(school.zone).date()
        return today - timedelta(days=1), today + timedelta(days=self.settings.horizon_days)

    def preview(self, school_id: int, first: date, last: date) -> list[PlannedWindow]:
        """The windows the school's plans give between two local dates, without storing them."""
        _check_span(first, last)
        school = self._store.school(school_id).school
        return expand(school, [p.plan for p in self._store.plans(school_id)], first, last)

    def upcoming(self, device_id: str, days: int = 14) -> list[PlannedWindow]:
        """The unit's windows that have not ended yet, up to ``days`` ahead (for iCalendar)."""
        now = self._clock()
        windows: list[PlannedWindow] = []
        for school_id in self._store.school_ids_for_device(device_id):
            school = self._store.school(school_id).school
            today = now.astimezone(school.zone).date()
            plans = [p.plan for p in self._store.plans(school_id)]
            windows += [
                w
                for w in expand(
                    school, plans, today - timedelta(days=1), today + timedelta(days=days)
                )
                if w.device_id == device_id and w.end > now
            ]
        return sorted(windows, key=lambda w: w.start)

    # --- refresh ------------------------------------------------------------------------------

    def refresh(
        self, school_ids: Iterable[int] | None = None, devices: Iterable[str] = ()
    ) -> RefreshResult:
        """Recomputes the horizon of those schools (None: all) and of the named units (e.g.
        one just taken out of a room), stores it, and pushes every affected unit whose
        windows changed. A unit in no room gets an empty schedule."""
        with self._refresh_lock:
            return self._refresh(None if school_ids is None else set(school_ids), set(devices))

    def _refresh(self, school_ids: set[int] | None, named: set[str]) -> RefreshResult:
        now = self._clock()
        schools = {record.id: record.school for record in self._store.schools()}
        plans: dict[int, list[CapturePlan]] = defaultdict(list)
        for record in self._store.plans():
            plans[record.school_id].append(record.plan)
        owner = {
            room.device_id: school_id
            for school_id, school in schools.items()
            for room in school.rooms
            if room.device_id is not None
        }
        wanted = set(schools) if school_ids is None else school_ids & set(schools)
        # A unit's windows all come from the one school it is in: take in the schools of
        # every unit whose windows may change, until no new school appears.
        units = set(named)
        while True:
            units |= {d for d, school_id in owner.items() if school_id in wanted}
            units |= self._units_with_rows(wanted, now)
            more = {owner[d] for d in units if d in owner} - wanted
            if not more:
                break
            wanted |= more
        current = self._desired_schedules(None if school_ids is None else units)
        if school_ids is None:
            units |= {d for d, schedule in current.items() if schedule}

        per_unit: dict[str, list[CaptureWindow]] = {}
        total = 0
        for school_id in sorted(wanted):
            school = schools[school_id]
            first, last = self._horizon(school, now)
            windows = expand(school, plans[school_id], first, last)
            self._store_windows(school_id, first, last, windows, now)
            per_unit.update(unit_windows(windows))
            total += len(windows)

        pushed = [
            device_id
            for device_id in sorted(units)
            if self._push(device_id, per_unit.get(device_id, []), current)
        ]
        log.info(
            "schedule refresh schools=%d windows=%d pushed=%d", len(wanted), total, len(pushed)
        )
        return RefreshResult(total, pushed)

    def _units_with_rows(self, school_ids: set[int], now: datetime) -> set[str]:
        """Units named by stored windows of those schools from yesterday on: the ones whose
        windows may have moved elsewhere or gone."""
        if not school_ids:
            return set()
        # "Yesterday" in any timezone starts after this.
        since = _midnight(now.date() - timedelta(days=1)) - _ZONE_SLACK
        with self._db.session(readonly=True) as session:
            return set(
                session.scalars(
                    select(CaptureWindowRow.device_id)
                    .distinct()
                    .where(
                        CaptureWindowRow.school_id.in_(sorted(school_ids)),
                        CaptureWindowRow.start >= since,
                        CaptureWindowRow.device_id.is_not(None),
                    )
                )
            )

    def _desired_schedules(self, units: set[str] | None) -> dict[str, list[CaptureWindow] | None]:
        """Each enrolled unit's current desired schedule (None: no desired state yet), of
        ``units`` or of every unit."""
        found: dict[str, list[CaptureWindow] | None] = {}
        with self._db.session(readonly=True) as session:
            queries = (
                [select(Device.id, Device.desired)]
                if units is None
                else [
                    select(Device.id, Device.desired).where(Device.id.in_(chunk))
                    for chunk in in_chunks(sorted(units))
                ]
            )
            for query in queries:
                for device_id, document in session.execute(query):
                    found[device_id] = (
                        DesiredState.model_validate(document).schedule if document else None
                    )
        return found

    def _push(
        self,
        device_id: str,
        windows: list[CaptureWindow],
        current: dict[str, list[CaptureWindow] | None],
    ) -> bool:
        if device_id not in current:
            if windows:
                log.warning("schedule for unknown unit skipped device=%s", device_id)
            return False
        if current[device_id] == windows or (current[device_id] is None and not windows):
            return False
        try:
            state = self._registry.set_desired(device_id, schedule=windows)
        except UnknownDevice:
            log.warning("schedule for removed unit skipped device=%s", device_id)
            return False
        if self._publish is not None:
            try:
                self._publish(device_id, state)
            except Exception:
                # MqttService republishes it when the unit comes online (desired > reported).
                log.exception(
                    "desired publish failed device=%s version=%d", device_id, state.version
                )
        return True

    def _store_windows(
        self,
        school_id: int,
        first: date,
        last: date,
        windows: list[PlannedWindow],
        now: datetime,
    ) -> None:
        """Makes the school's rows between ``first`` and ``last`` the expansion's; a row a
        recording points to stays as history when its window is gone."""
        planned = {w.window_id: _row_values(school_id, w) for w in windows}
        columns = [
            getattr(CaptureWindowRow, name)
            for name in ("window_id", *_WINDOW_FIELDS, "missed_at", "missed_reason")
        ]
        with self._db.session() as session:
            rows = list(session.execute(select(*columns).where(*_in_span(school_id, first, last))))
            # A window id may still be held by an old row of another school (a renamed one).
            known = {row.window_id for row in rows}
            for chunk in in_chunks(sorted(planned.keys() - known)):
                rows += session.execute(
                    select(*columns).where(CaptureWindowRow.window_id.in_(chunk))
                )
            stored = {row.window_id: row._asdict() for row in rows}
            inserts = [
                {"window_id": wid, **values, "updated_at": now}
                for wid, values in planned.items()
                if wid not in stored
            ]
            updates = [
                _updated(stored[wid], values, now)
                for wid, values in planned.items()
                if wid in stored and any(stored[wid][k] != v for k, v in values.items())
            ]
            gone = sorted(stored.keys() - planned.keys())
            recorded = _recorded(session, gone)
            removed = [wid for wid in gone if wid not in recorded]
            if inserts:
                session.execute(insert(CaptureWindowRow), inserts)
            if updates:
                session.execute(update(CaptureWindowRow), updates)
            for chunk in in_chunks(removed):
                session.execute(
                    delete(CaptureWindowRow).where(CaptureWindowRow.window_id.in_(chunk))
                )
        if inserts or updates or removed:
            log.info(
                "capture windows stored school_id=%d added=%d changed=%d removed=%d",
                school_id,
                len(inserts),
                len(updates),
                len(removed),
            )

    # --- checks -------------------------------------------------------------------------------

    def check(self) -> None:
        """Marks windows that should have started and did not as missed, and raises or clears
        each unit's "capture_missed" and "capture_at_risk" alerts."""
        now = self._clock()
        missed_units = self._mark_missed(now)
        with self._db.session(readonly=True) as session:
            open_missed = _open_alerts(session, AlertKind.CAPTURE_MISSED)
            open_at_risk = _open_alerts(session, AlertKind.CAPTURE_AT_RISK)
            missed = {
                device_id: _missed_message(session, device_id)
                for device_id in missed_units | open_missed.keys()
            }
            at_risk = self._at_risk(session, now)
        self._set_alerts(AlertKind.CAPTURE_MISSED, missed, open_missed, now, "error")
        self._set_alerts(
            AlertKind.CAPTURE_AT_RISK,
            {device_id: at_risk.get(device_id) for device_id in at_risk.keys() | open_at_risk},
            open_at_risk,
            now,
            "warning",
        )

    def _set_alerts(
        self,
        kind: AlertKind,
        wanted: dict[str, str | None],
        current: dict[str, str],
        now: datetime,
        severity: str,
    ) -> None:
        """Raises, updates or clears (None) each unit's alert whose message is not as wanted."""
        for device_id, message in sorted(wanted.items()):
            if current.get(device_id) == message:
                continue
            with self._db.session() as session:
                if session.get(Device, device_id, with_for_update=True) is not None:
                    set_alert(session, device_id, kind, message, now=now, severity=severity)

    def _mark_missed(self, now: datetime) -> set[str]:
        """Marks the windows past their grace with no recording; returns their units."""
        cutoff = now - timedelta(seconds=self.settings.missed_grace_s)
        units: set[str] = set()
        with self._db.session() as session:
            rows = session.execute(
                select(CaptureWindowRow, Device)
                .join(Device, Device.id == CaptureWindowRow.device_id)
                .where(
                    CaptureWindowRow.start <= cutoff,
                    CaptureWindowRow.start > now - _MISSED_LOOKBACK,
                    CaptureWindowRow.missed_at.is_(None),
                    # planned only after it ended (e.g. a plan starting yesterday): never due
                    CaptureWindowRow.updated_at < CaptureWindowRow.end,
                    ~exists().where(Recording.window_id == CaptureWindowRow.window_id),
                )
                .order_by(CaptureWindowRow.start)
                .with_for_update(of=CaptureWindowRow)
            ).all()
            for window, device in rows:
                cause = self._cause(session, device, now, window.window_id)
                window.missed_at = now
                window.missed_reason = cause or "unit online and healthy; see its log"
                units.add(device.id)
                log.warning(
                    "capture missed window=%s device=%s cause=%s",
                    window.window_id,
                    device.id,
                    window.missed_reason,
                )
        return units

    def _at_risk(self, session: Session, now: datetime) -> dict[str, str]:
        """Units whose next window starts soon and that look unable to record it -> message."""
        until = now + timedelta(seconds=self.settings.at_risk_before_s)
        found: dict[str, str] = {}
        rows = session.execute(
            select(CaptureWindowRow, Device, SchoolRow.document)
            .join(Device, Device.id == CaptureWindowRow.device_id)
            .join(SchoolRow, SchoolRow.id == CaptureWindowRow.school_id)
            .where(CaptureWindowRow.start > now, CaptureWindowRow.start <= until)
            .order_by(CaptureWindowRow.start)
        ).all()
        for window, device, document in rows:
            if device.id in found:
                continue
            cause = self._cause(session, device, now, None)
            if cause is not None:
                local = window.start.astimezone(ZoneInfo(document["timezone"]))
                found[device.id] = f"{cause}; next capture {window.title} at {local:%H:%M %Z}"
        return found

    def _cause(
        self, session: Session, device: Device, now: datetime, window_id: str | None
    ) -> str | None:
        """Why the unit would not record, the likeliest first; None when it looks fine. For an
        upcoming window (``window_id`` None) a scheduled recording in progress is no cause:
        it ends with its own window."""
        if not device.online:
            since = device.online_changed_at or device.created_at
            return f"unit offline since {since:%Y-%m-%d %H:%M} UTC"
        if device.desired_version > device.reported_version and _pending_since(device) <= (
            now - _APPLY_GRACE
        ):
            return f"unit has not applied schedule version {device.desired_version}"
        health: dict[str, Any] = device.health or {}
        if health.get("can_record") is False:
            return str(health.get("cannot_record_reason") or "unit cannot record")
        if health.get("camera_present") is False:
            return "camera not detected"
        if health.get("clock_synced") is False:
            return "clock not synchronised"
        if device.state in _BUSY_STATES and device.recording_id is not None:
            recording = session.get(Recording, device.recording_id)
            window_of_recording = recording.window_id if recording is not None else None
            busy = (
                window_of_recording != window_id
                if window_id is not None
                else window_of_recording is None
            )
            if busy:
                return f"busy with recording {device.recording_id}"
        return None

    # --- timeline -----------------------------------------------------------------------------

    def timeline(self, school_id: int, first: date, last: date) -> list[TimelineEntry]:
        """The stored windows of the school between two local dates, by start, each with what
        became of it."""
        _check_span(first, last)
        school = self._store.school(school_id).school
        with self._db.session(readonly=True) as session:
            rows = session.execute(
                select(CaptureWindowRow, Recording)
                .outerjoin(Recording, Recording.window_id == CaptureWindowRow.window_id)
                .where(*_in_span(school_id, first, last))
                .order_by(CaptureWindowRow.start, CaptureWindowRow.window_id, Recording.started_at)
            ).all()
            # A window recorded twice (a restart) shows its latest recording.
            latest: dict[str, tuple[CaptureWindowRow, Recording | None]] = {}
            for window, recording in rows:
                latest[window.window_id] = (window, recording)
            return [_entry(school.name, window, recording) for window, recording in latest.values()]


# --- helpers -------------------------------------------------------------------------------------


def _check_span(first: date, last: date) -> None:
    if last < first:
        raise ScheduleError("the last date is before the first")
    if (last - first).days > _MAX_SPAN_DAYS:
        raise ScheduleError(f"a span is at most {_MAX_SPAN_DAYS} days")


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _in_span(school_id: int, first: date, last: date) -> tuple[ColumnElement[bool], ...]:
    """The school's windows on local dates ``first`` to ``last``; the bounds on ``start`` only
    let the (school_id, start) index find them."""
    return (
        CaptureWindowRow.school_id == school_id,
        CaptureWindowRow.date.between(first, last),
        CaptureWindowRow.start >= _midnight(first) - _ZONE_SLACK,
        CaptureWindowRow.start < _midnight(last) + _ZONE_SLACK,
    )


def _row_values(school_id: int, window: PlannedWindow) -> dict[str, Any]:
    return {
        "school_id": school_id,
        "device_id": window.device_id,
        "room": window.room,
        "date": window.date,
        "period": window.period,
        "start": window.start,
        "end": window.end,
        "title": window.title,
        "teacher": window.teacher,
        "plans": list(window.plans),
    }


def _updated(stored: dict[str, Any], values: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The row's new values; a moved window is judged afresh by the missed check."""
    moved = stored["start"] != values["start"]
    return {
        "window_id": stored["window_id"],
        **values,
        "missed_at": None if moved else stored["missed_at"],
        "missed_reason": None if moved else stored["missed_reason"],
        "updated_at": now,
    }


def _recorded(session: Session, window_ids: list[str]) -> set[str]:
    found: set[str] = set()
    for chunk in in_chunks(window_ids):
        found |= {
            wid
            for wid in session.scalars(
                select(Recording.window_id).distinct().where(Recording.window_id.in_(chunk))
            )
            if wid is not None
        }
    return found


def _pending_since(device: Device) -> datetime:
    """When the unit's newest desired state was issued."""
    issued = (device.desired or {}).get("issued_at")
    if isinstance(issued, str):
        try:
            return datetime.fromisoformat(issued)
        except ValueError:
            pass
    return device.created_at


def _open_alerts(session: Session, kind: AlertKind) -> dict[str, str]:
    """Unit -> message of its open alert of ``kind``."""
    return {
        device_id: message
        for device_id, message in session.execute(
            select(Alert.device_id, Alert.message).where(
                Alert.kind == kind.value, Alert.cleared_at.is_(None)
            )
        )
    }


def _missed_message(session: Session, device_id: str) -> str | None:
    """The alert for the unit's latest window that stayed unrecorded, unless the unit has
    since recorded a scheduled window (it is working again); None: nothing to alert."""
    latest = session.execute(
        select(CaptureWindowRow.start, CaptureWindowRow.title, CaptureWindowRow.missed_reason)
        .where(
            CaptureWindowRow.device_id == device_id,
            CaptureWindowRow.missed_at.is_not(None),
            ~exists().where(Recording.window_id == CaptureWindowRow.window_id),
        )
        .order_by(CaptureWindowRow.start.desc())
        .limit(1)
    ).first()
    if latest is None:
        return None
    recovered = session.scalar(
        select(
            exists().where(
                and_(
                    Recording.device_id == device_id,
                    Recording.window_id.is_not(None),
                    Recording.started_at > latest.start,
                )
            )
        )
    )
    if recovered:
        return None
    return f"{latest.title} did not start: {latest.missed_reason}"


def _entry(school: str, window: CaptureWindowRow, recording: Recording | None) -> TimelineEntry:
    status, reason = _status(window, recording)
    return TimelineEntry(
        window_id=window.window_id,
        school=school,
        room=window.room,
        device_id=window.device_id,
        date=window.date,
        period=window.period,
        start=window.start,
        end=window.end,
        title=window.title,
        teacher=window.teacher,
        plans=list(window.plans),
        status=status,
        recording_id=recording.id if recording is not None else None,
        reason=reason,
    )


def _status(
    window: CaptureWindowRow, recording: Recording | None
) -> tuple[WindowStatus, str | None]:
    if recording is None:
        if window.missed_at is not None:
            return WindowStatus.MISSED, window.missed_reason
        return WindowStatus.PLANNED, None
    if recording.status == RecordingStatus.RECORDING.value:
        return WindowStatus.RECORDING, None
    # A teacher's stop ends a recording "complete"; it is told apart by its reason.
    if recording.end_reason == EndReason.BUTTON.value:
        return WindowStatus.STOPPED_BY_TEACHER, None
    if recording.status == RecordingStatus.COMPLETE.value:
        return WindowStatus.COMPLETED, None
    gaps = "; ".join(
        str(gap["reason"]) for gap in recording.gaps if isinstance(gap, dict) and gap.get("reason")
    )
    return WindowStatus.PARTIAL, gaps or recording.end_reason
