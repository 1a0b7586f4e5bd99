"""Health warnings a person should act on: raised from each health sample and by a periodic
sweep for units that stay offline, cleared when the cause goes away. The schedule service
raises and clears the capture kinds itself through ``set_alert``.

A unit has at most one open alert of a kind (a partial unique index holds even
with several controllers); while it stays open only its message follows the
latest values. Temperature and free disk clear with some hysteresis so a unit
hovering at a threshold does not flap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session

from controller.db import Database, affected, in_chunks, paginate
from controller.models import Alert, Device
from controller.views import AlertView, Page
from shared.clock import utcnow
from shared.messages import Health, RecorderState

__all__ = ["AlertEngine", "AlertKind", "AlertThresholds", "AlertView", "Page", "set_alert"]

log = logging.getLogger(__name__)

_MB = 1024 * 1024


class AlertKind(StrEnum):
    OFFLINE = "offline"
    DISK_LOW = "disk_low"
    TEMPERATURE = "temperature"
    UNDER_VOLTAGE = "under_voltage"
    CAMERA_MISSING = "camera_missing"
    MIC_SILENT = "mic_silent"
    UPLOAD_BACKLOG = "upload_backlog"
    CLOCK_UNSYNCED = "clock_unsynced"
    # raised by the schedule service, not from health samples
    CAPTURE_MISSED = "capture_missed"
    CAPTURE_AT_RISK = "capture_at_risk"


@dataclass(frozen=True)
class AlertThresholds:
    offline_after_s: float = 300
    disk_free_min_mb: int = 2048
    temp_max_c: float = 80
    backlog_max_segments: int = 30
    mic_silent_dbfs: float = -60
    # an open alert clears only this far on the good side of its threshold
    temp_hysteresis_c: float = 3.0
    disk_hysteresis_mb: int = 256


@dataclass(frozen=True)
class _Finding:
    """``active`` None: the sample says nothing about this kind (unknown on the hardware)."""

    kind: AlertKind
    active: bool | None
    severity: str = "warning"
    message: str = ""


class AlertEngine:
    def __init__(
        self,
        db: Database,
        thresholds: AlertThresholds | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self.thresholds = thresholds or AlertThresholds()
        self._clock = clock

    # --- from health ------------------------------------------------------------------------

    def evaluate_health(
        self, session: Session, device: Device, health: Health, open_alerts: dict[str, Alert]
    ) -> None:
        """Raises and clears the health kinds for ``device`` inside the caller's transaction.

        ``open_alerts`` is the unit's open alerts by kind (see ``open_alerts_of``); it is kept
        up to date, so one batch may hold several samples of a unit."""
        for finding in self._findings(health, open_alerts):
            current = open_alerts.get(finding.kind)
            if finding.active is None:
                continue
            if finding.active:
                if current is None:
                    open_alerts[finding.kind] = self._raise(session, device.id, finding)
                else:
                    current.message = finding.message
                    current.severity = finding.severity
            elif current is not None:
                self._clear(current)
                del open_alerts[finding.kind]

    def _findings(self, health: Health, open_alerts: dict[str, Alert]) -> list[_Finding]:
        t = self.thresholds
        findings: list[_Finding] = []

        free_mb = health.disk_free_bytes // _MB
        limit_mb = t.disk_free_min_mb + (
            t.disk_hysteresis_mb if AlertKind.DISK_LOW in open_alerts else 0
        )
        findings.append(
            _Finding(
                AlertKind.DISK_LOW,
                free_mb < limit_mb,
                "error" if not health.can_record else "warning",
                f"free disk {free_mb} MB (alert below {t.disk_free_min_mb} MB)",
            )
        )

        if health.soc_temp_c is None:
            findings.append(_Finding(AlertKind.TEMPERATURE, None))
        else:
            limit_c = t.temp_max_c - (
                t.temp_hysteresis_c if AlertKind.TEMPERATURE in open_alerts else 0
            )
            findings.append(
                _Finding(
                    AlertKind.TEMPERATURE,
                    health.soc_temp_c > limit_c,
                    "warning",
                    f"SoC temperature {health.soc_temp_c:.1f} °C (alert above {t.temp_max_c:g} °C)",
                )
            )

        throttling = health.throttling
        findings.append(
            _Finding(
                AlertKind.UNDER_VOLTAGE,
                None if throttling is None else throttling.under_voltage_now,
                "warning",
                "under-voltage: the power supply is too weak",
            )
        )
        findings.append(
            _Finding(
                AlertKind.CAMERA_MISSING,
                None if health.camera_present is None else not health.camera_present,
                "error",
                "camera not detected",
            )
        )

        level = health.mic_level_dbfs
        if health.state is not RecorderState.RECORDING:
            findings.append(_Finding(AlertKind.MIC_SILENT, False))
        elif level is None:
            findings.append(_Finding(AlertKind.MIC_SILENT, None))
        else:
            findings.append(
                _Finding(
                    AlertKind.MIC_SILENT,
                    level < t.mic_silent_dbfs,
                    "warning",
                    f"microphone silent while recording: {level:.1f} dBFS "
                    f"(below {t.mic_silent_dbfs:g} dBFS)",
                )
            )

        findings.append(
            _Finding(
                AlertKind.UPLOAD_BACKLOG,
                health.spool_segments > t.backlog_max_segments,
                "warning",
                f"{health.spool_segments} segments waiting for upload "
                f"(more than {t.backlog_max_segments})",
            )
        )
        findings.append(
            _Finding(
                AlertKind.CLOCK_UNSYNCED,
                None if health.clock_synced is None else not health.clock_synced,
                "warning",
                "clock not synchronised: recording times may be wrong",
            )
        )
        return findings

    def _raise(self, session: Session, device_id: str, finding: _Finding) -> Alert:
        alert = Alert(
            device_id=device_id,
            kind=finding.kind.value,
            severity=finding.severity,
            message=finding.message,
            raised_at=self._clock(),
        )
        session.add(alert)
        log.info(
            "alert raised device=%s kind=%s message=%s", device_id, finding.kind, finding.message
        )
        return alert

    def _clear(self, alert: Alert) -> None:
        alert.cleared_at = self._clock()
        log.info("alert cleared device=%s kind=%s", alert.device_id, alert.kind)

    # --- presence ---------------------------------------------------------------------------

    def device_online(self, session: Session, device_id: str) -> None:
        """The unit is back: its offline alert clears in the same transaction."""
        session.execute(
            update(Alert)
            .where(
                Alert.device_id == device_id,
                Alert.kind == AlertKind.OFFLINE.value,
                Alert.cleared_at.is_(None),
            )
            .values(cleared_at=self._clock())
        )

    def sweep(self) -> None:
        """Raises "offline" for units offline longer than ``offline_after_s`` (never-seen units
        count from when they were added) and clears it for units that are online."""
        now = self._clock()
        cutoff = now - timedelta(seconds=self.thresholds.offline_after_s)
        since = func.coalesce(Device.online_changed_at, Device.created_at)
        with self._db.session() as session:
            cleared = affected(
                session.execute(
                    update(Alert)
                    .where(
                        Alert.kind == AlertKind.OFFLINE.value,
                        Alert.cleared_at.is_(None),
                        Alert.device_id.in_(select(Device.id).where(Device.online.is_(True))),
                    )
                    .values(cleared_at=now)
                    .execution_options(synchronize_session=False)
                )
            )
            # Locking the rows makes a second controller's sweep wait, then see our alerts.
            candidates = session.execute(
                select(Device.id, since)
                .where(
                    Device.online.is_(False),
                    since <= cutoff,
                    ~exists().where(
                        and_(
                            Alert.device_id == Device.id,
                            Alert.kind == AlertKind.OFFLINE.value,
                            Alert.cleared_at.is_(None),
                        )
                    ),
                )
                .with_for_update(of=Device)
            ).all()
            raised = 0
            for chunk in in_chunks([(row[0], row[1]) for row in candidates]):
                already = set(
                    session.scalars(
                        select(Alert.device_id).where(
                            Alert.device_id.in_([device_id for device_id, _ in chunk]),
                            Alert.kind == AlertKind.OFFLINE.value,
                            Alert.cleared_at.is_(None),
                        )
                    )
                )
                for device_id, offline_since in chunk:
                    if device_id in already:
                        continue
                    session.add(
                        Alert(
                            device_id=device_id,
                            kind=AlertKind.OFFLINE.value,
                            severity="error",
                            message=f"offline since {offline_since:%Y-%m-%d %H:%M} UTC",
                            raised_at=now,
                        )
                    )
                    raised += 1
        if raised or cleared:
            log.info("offline sweep raised=%d cleared=%d", raised, cleared)

    # --- reading ----------------------------------------------------------------------------

    def list(
        self,
        *,
        open_only: bool = True,
        device_id: str | None = None,
        school: str | None = None,
        kind: str | None = None,
        page: int = 1,
        per_page: int = 100,
    ) -> Page[AlertView]:
        query = select(Alert, Device.school, Device.room).join(Device, Device.id == Alert.device_id)
        if open_only:
            query = query.where(Alert.cleared_at.is_(None))
        if device_id is not None:
            query = query.where(Alert.device_id == device_id)
        if school is not None:
            query = query.where(Device.school == school)
        if kind is not None:
            query = query.where(Alert.kind == kind)
        with self._db.session(readonly=True) as session:
            window = paginate(
                session, query, (Alert.raised_at.desc(), Alert.id.desc()), page, per_page
            )
            rows = session.execute(window.query).all()
            items = [
                AlertView(
                    id=alert.id,
                    device_id=alert.device_id,
                    school=school_name,
                    room=room,
                    kind=alert.kind,
                    severity=alert.severity,
                    message=alert.message,
                    raised_at=alert.raised_at,
                    cleared_at=alert.cleared_at,
                )
                for alert, school_name, room in rows
            ]
        return Page(items, window.total, window.page, window.per_page)

    def open_counts(self) -> dict[str, int]:
        """Open alerts per kind, every kind present (for /metrics)."""
        counts = dict.fromkeys((kind.value for kind in AlertKind), 0)
        with self._db.session(readonly=True) as session:
            for kind, count in session.execute(
                select(Alert.kind, func.count())
                .where(Alert.cleared_at.is_(None))
                .group_by(Alert.kind)
            ):
                counts[kind] = count
        return counts


def set_alert(
    session: Session,
    device_id: str,
    kind: AlertKind,
    message: str | None,
    *,
    now: datetime,
    severity: str = "warning",
) -> None:
    """Raises ``kind`` for the unit, or updates the open one's message; ``message`` None clears
    it. The caller holds the unit's row lock, so a second controller waits and sees ours."""
    current = session.scalar(
        select(Alert).where(
            Alert.device_id == device_id, Alert.kind == kind.value, Alert.cleared_at.is_(None)
        )
    )
    if message is None:
        if current is not None:
            current.cleared_at = now
            log.info("alert cleared device=%s kind=%s", device_id, kind)
        return
    if current is not None:
        current.message = message
        current.severity = severity
        return
    session.add(
        Alert(
            device_id=device_id,
            kind=kind.value,
            severity=severity,
            message=message,
            raised_at=now,
        )
    )
    log.info("alert raised device=%s kind=%s message=%s", device_id, kind, message)


def open_alerts_of(session: Session, device_ids: Iterable[str]) -> dict[str, dict[str, Alert]]:
    """Each unit's open alerts by kind, in one query (units with none map to an empty dict)."""
    ids = sorted(set(device_ids))
    found: dict[str, dict[str, Alert]] = {device_id: {} for device_id in ids}
    for chunk in in_chunks(ids):
        alerts = session.scalars(
            select(Alert).where(Alert.device_id.in_(chunk), Alert.cleared_at.is_(None))
        )
        for alert in alerts:
            found[alert.device_id][alert.kind] = alert
    return found
