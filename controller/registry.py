"""The fleet's units: enrolment, presence under the epoch rule, health, events, snapshots and
desired/reported state.

Every handler for a unit's message locks that unit's row (``SELECT ... FOR
UPDATE`` on PostgreSQL, the write lock on SQLite), so two controllers sharing a
fleet apply its messages one at a time.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller.alerts import AlertEngine, open_alerts_of
from controller.db import Database, affected, in_chunks, paginate
from controller.models import Alert, Device, DeviceEvent, HealthSample
from controller.views import DeviceView, Page
from shared.clock import utcnow
from shared.messages import (
    CaptureWindow,
    DesiredSettings,
    DesiredState,
    Event,
    Health,
    ReportedState,
    Snapshot,
    Status,
)
from shared.topics import validate_device_id

__all__ = ["DeviceExists", "DeviceView", "Page", "Registry", "UnknownDevice"]

log = logging.getLogger(__name__)

_MAX_NAME = 200
_JPEG_MAGIC = b"\xff\xd8\xff"


class DeviceExists(Exception):
    """A unit with that id is already enrolled."""


class UnknownDevice(Exception):
    """No unit with that id (or ids) is enrolled."""


def _name(what: str, value: str) -> str:
    value = value.strip()
    if not value or len(value) > _MAX_NAME:
        raise ValueError(f"{what} must be 1..{_MAX_NAME} characters, got {len(value)}")
    return value


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Registry:
    def __init__(
        self,
        db: Database,
        alerts: AlertEngine,
        clock: Callable[[], datetime] = utcnow,
        *,
        health_history_keep: int = 288,
        health_history_interval_s: float = 300.0,
        events_keep: int = 1000,
    ) -> None:
        if health_history_keep < 1 or events_keep < 1:
            raise ValueError("health_history_keep and events_keep must be >= 1")
        self._db = db
        self._alerts = alerts
        self._clock = clock
        # A sample every interval, the last ``keep`` of them: 24 h at the defaults.
        self._history_keep = health_history_keep
        self._history_interval = timedelta(seconds=health_history_interval_s)
        self._events_keep = events_keep

    # --- enrolment --------------------------------------------------------------------------

    def add_device(self, device_id: str, school: str, room: str) -> DeviceView:
        validate_device_id(device_id)
        school, room = _name("school", school), _name("room", room)
        try:
            with self._db.session() as session:
                if session.get(Device, device_id) is not None:
                    raise DeviceExists(device_id)
                device = Device(
                    id=device_id,
                    school=school,
                    room=room,
                    created_at=self._clock(),
                    online=False,
                    epoch=-1,
                    capabilities=[],
                    desired_version=0,
                    reported_version=0,
                )
                session.add(device)
                session.flush()
                view = _view(device, [])
        except IntegrityError:
            raise DeviceExists(device_id) from None
        log.info("device added device=%s school=%s room=%s", device_id, school, room)
        return view

    def remove_device(self, device_id: str) -> None:
        """Forgets the unit, its health, events, alerts and commands; its recordings stay."""
        with self._db.session() as session:
            removed = affected(session.execute(delete(Device).where(Device.id == device_id)))
        if not removed:
            raise UnknownDevice(device_id)
        log.info("device removed device=%s", device_id)

    # --- reading ----------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceView | None:
        with self._db.session(readonly=True) as session:
            device = session.get(Device, device_id)
            if device is None:
                return None
            return _view(device, sorted(_open_kinds(session, [device_id])[device_id]))

    def known(self, device_id: str) -> bool:
        return bool(self.known_among([device_id]))

    def known_among(self, device_ids: Iterable[str]) -> set[str]:
        """Which of these units are enrolled."""
        found: set[str] = set()
        with self._db.session(readonly=True) as session:
            for chunk in in_chunks(sorted(set(device_ids))):
                found.update(session.scalars(select(Device.id).where(Device.id.in_(chunk))))
        return found

    def device_ids(self, school: str | None = None) -> builtins.list[str]:
        query = select(Device.id).order_by(Device.id)
        if school is not None:
            query = query.where(Device.school == school)
        with self._db.session(readonly=True) as session:
            return builtins.list(session.scalars(query))

    def list(
        self,
        *,
        school: str | None = None,
        state: str | None = None,
        online: bool | None = None,
        alert: str | None = None,
        q: str | None = None,
        page: int = 1,
        per_page: int = 50,
    ) -> Page[DeviceView]:
        """One page of units ordered by school, room and id: three queries whatever the size."""
        query = select(Device)
        if school is not None:
            query = query.where(Device.school == school)
        if state is not None:
            query = query.where(Device.state == state)
        if online is not None:
            query = query.where(Device.online.is_(online))
        if alert is not None:
            query = query.where(
                exists().where(
                    and_(
                        Alert.device_id == Device.id,
                        Alert.kind == alert,
                        Alert.cleared_at.is_(None),
                    )
                )
            )
        if q:
            pattern = _like(q.strip().lower())
            query = query.where(
                or_(
                    func.lower(Device.id).like(pattern, escape="\\"),
                    func.lower(Device.school).like(pattern, escape="\\"),
                    func.lower(Device.room).like(pattern, escape="\\"),
                )
            )
        with self._db.session(readonly=True) as session:
            window = paginate(
                session, query, (Device.school, Device.room, Device.id), page, per_page
            )
            devices = session.scalars(window.query).all()
            kinds = _open_kinds(session, [device.id for device in devices])
            items = [_view(device, sorted(kinds[device.id])) for device in devices]
        return Page(items, window.total, window.page, window.per_page)

    def schools(self) -> builtins.list[tuple[str, int, int]]:
        """``(school, units, online)`` for every school, by name."""
        online = func.sum(case((Device.online.is_(True), 1), else_=0))
        query = (
            select(Device.school, func.count(), online)
            .group_by(Device.school)
            .order_by(Device.school)
        )
        with self._db.session(readonly=True) as session:
            return [(name, int(units), int(up or 0)) for name, units, up in session.execute(query)]

    # --- presence ---------------------------------------------------------------------------

    def on_status(self, device_id: str, status: Status) -> bool:
        """Applies a status unless it is stale; returns whether it was applied.

        A lower epoch is an older connection. With the same epoch a unit may go
        from online to offline (its own will or clean shutdown) but an online
        status never undoes the offline one of its own connection.
        """
        with self._db.session() as session:
            device = _locked(session, device_id)
            if device is None:
                log.warning("status for unknown device ignored device=%s", device_id)
                return False
            if status.epoch < device.epoch or (
                status.epoch == device.epoch and status.online and not device.online
            ):
                log.info(
                    "stale status ignored device=%s epoch=%d current=%d online=%s",
                    device_id,
                    status.epoch,
                    device.epoch,
                    status.online,
                )
                return False
            now = self._clock()
            device.epoch = status.epoch
            if status.online:
                device.last_seen_at = now
                device.capabilities = builtins.list(status.capabilities)
                if status.agent_version is not None:
                    device.agent_version = status.agent_version
            if device.online != status.online:
                device.online = status.online
                device.online_changed_at = now
                self._presence_event(session, device_id, status, now)
                if status.online:
                    self._alerts.device_online(session, device_id)
                log.info(
                    "device %s device=%s epoch=%d",
                    "online" if status.online else "offline",
                    device_id,
                    status.epoch,
                )
        return True

    def _presence_event(
        self, session: Session, device_id: str, status: Status, now: datetime
    ) -> None:
        session.add(
            DeviceEvent(
                device_id=device_id,
                ts=now,
                kind="online" if status.online else "offline",
                severity="info" if status.online else "warning",
                message=(
                    f"connected (epoch {status.epoch})"
                    if status.online
                    else f"disconnected (epoch {status.epoch})"
                ),
                data={"epoch": status.epoch},
            )
        )
        self._prune_events(session, device_id)

    # --- health -----------------------------------------------------------------------------

    def on_health(self, device_id: str, health: Health) -> None:
        self.on_health_batch([(device_id, health)])

    def on_health_batch(self, samples: Sequence[tuple[str, Health]]) -> None:
        """Stores samples of many units in one transaction, each unit's in the order given.

        At a fleet's scale the cost of a sample is its statements, not its data, so a batch
        reads every unit, open alert and last history stamp it needs in three queries."""
        if not samples:
            return
        ids = sorted({device_id for device_id, _ in samples})
        with self._db.session(durable=False) as session:
            devices: dict[str, Device] = {}
            for chunk in in_chunks(ids):
                # In id order, so two controllers locking overlapping batches cannot deadlock.
                rows = session.scalars(
                    select(Device).where(Device.id.in_(chunk)).order_by(Device.id).with_for_update()
                )
                devices.update((device.id, device) for device in rows)
            open_alerts = open_alerts_of(session, devices)
            last_history = self._last_history(session, list(devices))
            now = self._clock()
            sampled: set[str] = set()
            for device_id, health in samples:
                device = devices.get(device_id)
                if device is None:
                    log.warning("health for unknown device ignored device=%s", device_id)
                    continue
                if _newer_sample_kept(device, health):
                    log.info("out-of-order health ignored device=%s ts=%s", device_id, health.ts)
                    continue
                data = health.model_dump(mode="json", by_alias=True)
                device.state = health.state.value
                device.recording_id = health.recording_id
                device.health = data
                device.health_at = now
                device.last_seen_at = now
                device.agent_version = health.agent_version
                last = last_history.get(device_id)
                if last is None or now - last >= self._history_interval:
                    session.add(HealthSample(device_id=device_id, ts=now, data=data))
                    last_history[device_id] = now
                    sampled.add(device_id)
                self._alerts.evaluate_health(session, device, health, open_alerts[device_id])
            session.flush()
            for device_id in sorted(sampled):
                self._prune_history(session, device_id)

    def _last_history(
        self, session: Session, device_ids: builtins.list[str]
    ) -> dict[str, datetime]:
        last: dict[str, datetime] = {}
        for chunk in in_chunks(device_ids):
            rows = session.execute(
                select(HealthSample.device_id, func.max(HealthSample.ts))
                .where(HealthSample.device_id.in_(chunk))
                .group_by(HealthSample.device_id)
            )
            last.update((device_id, ts) for device_id, ts in rows)
        return last

    def _prune_history(self, session: Session, device_id: str) -> None:
        cutoff = session.execute(
            select(HealthSample.ts, HealthSample.id)
            .where(HealthSample.device_id == device_id)
            .order_by(HealthSample.ts.desc(), HealthSample.id.desc())
            .offset(self._history_keep)
            .limit(1)
        ).first()
        if cutoff is not None:
            session.execute(
                delete(HealthSample).where(
                    HealthSample.device_id == device_id,
                    or_(
                        HealthSample.ts < cutoff.ts,
                        and_(HealthSample.ts == cutoff.ts, HealthSample.id <= cutoff.id),
                    ),
                )
            )

    def health_history(self, device_id: str, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The latest samples, newest first: each a Health document plus ``received_at``."""
        with self._db.session(readonly=True) as session:
            samples = session.scalars(
                select(HealthSample)
                .where(HealthSample.device_id == device_id)
                .order_by(HealthSample.ts.desc(), HealthSample.id.desc())
                .limit(max(1, limit))
            )
            return [{**sample.data, "received_at": sample.ts} for sample in samples]

    # --- events and snapshots ---------------------------------------------------------------

    def on_event(self, device_id: str, event: Event) -> None:
        with self._db.session() as session:
            if _locked(session, device_id) is None:
                log.warning("event for unknown device ignored device=%s", device_id)
                return
            session.add(
                DeviceEvent(
                    device_id=device_id,
                    ts=event.ts,
                    kind=event.kind.value,
                    severity=event.severity.value,
                    recording_id=event.recording_id,
                    message=event.message,
                    data=dict(event.data),
                )
            )
            self._prune_events(session, device_id)

    def _prune_events(self, session: Session, device_id: str) -> None:
        session.flush()
        cutoff = session.scalar(
            select(DeviceEvent.id)
            .where(DeviceEvent.device_id == device_id)
            .order_by(DeviceEvent.id.desc())
            .offset(self._events_keep)
            .limit(1)
        )
        if cutoff is not None:
            session.execute(
                delete(DeviceEvent).where(
                    DeviceEvent.device_id == device_id, DeviceEvent.id <= cutoff
                )
            )

    def events(self, device_id: str, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The latest events, newest first (the unit's own and online/offline changes)."""
        with self._db.session(readonly=True) as session:
            rows = session.scalars(
                select(DeviceEvent)
                .where(DeviceEvent.device_id == device_id)
                .order_by(DeviceEvent.ts.desc(), DeviceEvent.id.desc())
                .limit(max(1, limit))
            )
            return [
                {
                    "id": row.id,
                    "ts": row.ts,
                    "kind": row.kind,
                    "severity": row.severity,
                    "recording_id": row.recording_id,
                    "message": row.message,
                    "data": row.data,
                }
                for row in rows
            ]

    def on_snapshot(self, device_id: str, snapshot: Snapshot) -> None:
        """Keeps the latest picture; raises ValueError (and keeps the old one) if it is no JPEG."""
        try:
            jpeg = base64.b64decode(snapshot.jpeg_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("snapshot is not valid base64") from None
        if not jpeg.startswith(_JPEG_MAGIC):
            raise ValueError("snapshot is not a JPEG")
        with self._db.session() as session:
            device = _locked(session, device_id)
            if device is None:
                log.warning("snapshot for unknown device ignored device=%s", device_id)
                return
            device.snapshot_jpeg = jpeg
            device.snapshot_at = self._clock()
        log.info("snapshot stored device=%s bytes=%d", device_id, len(jpeg))

    def snapshot(self, device_id: str) -> tuple[bytes, datetime] | None:
        with self._db.session(readonly=True) as session:
            row = session.execute(
                select(Device.snapshot_jpeg, Device.snapshot_at).where(Device.id == device_id)
            ).first()
        if row is None or row.snapshot_jpeg is None or row.snapshot_at is None:
            return None
        return row.snapshot_jpeg, row.snapshot_at

    # --- desired / reported -----------------------------------------------------------------

    def on_reported(self, device_id: str, reported: ReportedState) -> None:
        with self._db.session() as session:
            device = _locked(session, device_id)
            if device is None:
                log.warning("reported state for unknown device ignored device=%s", device_id)
                return
            device.reported_version = reported.desired_version
            device.reported_error = reported.error
            device.agent_version = reported.agent_version
        if reported.error:
            log.warning(
                "desired state not applied device=%s version=%d error=%s",
                device_id,
                reported.desired_version,
                reported.error,
            )

    def set_desired(
        self,
        device_id: str,
        settings: DesiredSettings | None = None,
        schedule: builtins.list[CaptureWindow] | None = None,
    ) -> DesiredState:
        """Stores a new desired document (None keeps that part as it was); the caller publishes
        it retained. Its version is above any the unit reported, so the unit will apply it."""
        with self._db.session() as session:
            device = _locked(session, device_id)
            if device is None:
                raise UnknownDevice(device_id)
            previous = DesiredState.model_validate(device.desired) if device.desired else None
            state = DesiredState(
                version=max(device.desired_version, device.reported_version) + 1,
                issued_at=self._clock(),
                settings=settings
                if settings is not None
                else (previous.settings if previous is not None else DesiredSettings()),
                schedule=schedule
                if schedule is not None
                else (previous.schedule if previous is not None else []),
            )
            device.desired = state.model_dump(mode="json", by_alias=True)
            device.desired_version = state.version
        log.info(
            "desired state set device=%s version=%d windows=%d",
            device_id,
            state.version,
            len(state.schedule),
        )
        return state

    def desired(self, device_id: str) -> DesiredState | None:
        with self._db.session(readonly=True) as session:
            document = session.scalar(select(Device.desired).where(Device.id == device_id))
        return DesiredState.model_validate(document) if document else None


# Samples a unit sent this close together may arrive swapped (across a reconnect); a sample
# further behind the kept one means the unit's clock was stepped back.
_REORDER_WINDOW = timedelta(minutes=5)


def _locked(session: Session, device_id: str) -> Device | None:
    return session.get(Device, device_id, with_for_update=True)


def _newer_sample_kept(device: Device, health: Health) -> bool:
    """Whether the stored latest sample is a little newer by the unit's own clock: samples
    reordered on the way. One far newer came from a clock that has since been stepped (set
    back after running ahead, or a bad time source): it must not hide every later sample."""
    if device.health is None:
        return False
    kept = device.health.get("ts")
    if not isinstance(kept, str):
        return False
    try:
        kept_ts = datetime.fromisoformat(kept)
    except ValueError:
        return False
    return timedelta(0) < kept_ts - health.ts <= _REORDER_WINDOW


def _open_kinds(session: Session, device_ids: builtins.list[str]) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = defaultdict(set)
    if device_ids:
        rows = session.execute(
            select(Alert.device_id, Alert.kind).where(
                Alert.device_id.in_(device_ids), Alert.cleared_at.is_(None)
            )
        )
        for device_id, kind in rows:
            kinds[device_id].add(kind)
    return kinds


def _view(device: Device, open_alerts: builtins.list[str]) -> DeviceView:
    return DeviceView(
        id=device.id,
        school=device.school,
        room=device.room,
        online=device.online,
        online_changed_at=device.online_changed_at,
        last_seen_at=device.last_seen_at,
        state=device.state,
        recording_id=device.recording_id,
        agent_version=device.agent_version,
        health=device.health,
        health_at=device.health_at,
        desired_version=device.desired_version,
        reported_version=device.reported_version,
        drift=device.desired_version > 0 and device.desired_version != device.reported_version,
        open_alerts=open_alerts,
        snapshot_at=device.snapshot_at,
        created_at=device.created_at,
        reported_error=device.reported_error,
        capabilities=builtins.list(device.capabilities or []),
    )
