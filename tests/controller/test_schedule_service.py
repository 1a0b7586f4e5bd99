"""The schedule service: the rolling horizon stored and pushed as units' desired state only when
it changed, missed and at-risk captures with their likely cause, and the timeline."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from controller.alerts import AlertEngine, AlertKind
from controller.db import Database
from controller.models import CaptureWindowRow, Recording
from controller.registry import Registry
from controller.schedule_service import (
    ScheduleService,
    ScheduleSettings,
    TimelineEntry,
    WindowStatus,
)
from controller.schedules import (
    ScheduleError,
    ScheduleStore,
    revalidated,
    with_bell_schedule,
    with_room,
    without_room,
)
from shared.messages import DesiredSettings, DesiredState, RecorderState, ReportedState, Status
from shared.schedule import Room, window_id
from tests.controller.conftest import FakeClock, health
from tests.controller.test_schedules import NORTH, bells, plan, school
from tests.support.processes import wait_for

# 2026-03-03 is a Tuesday; New York is on EST (UTC-5) until 8 March.
TUESDAY = date(2026, 3, 3)
P1_START = datetime(2026, 3, 3, 13, 0, tzinfo=UTC)  # 08:00 EST
P2_START = datetime(2026, 3, 3, 14, 0, tzinfo=UTC)  # 09:00 EST


def wid(day: date, period: str, room: str = "204", school_name: str = NORTH) -> str:
    return window_id(school_name, room, day, period)


class Published(list[tuple[str, DesiredState]]):
    def devices(self) -> list[str]:
        return [device_id for device_id, _ in self]


@pytest.fixture
def alerts(db: Database, clock: FakeClock) -> AlertEngine:
    return AlertEngine(db, clock=clock)


@pytest.fixture
def registry(db: Database, alerts: AlertEngine, clock: FakeClock) -> Registry:
    registry = Registry(db, alerts, clock=clock)
    registry.add_device("room-204", NORTH, "204")
    registry.add_device("room-205", NORTH, "205")
    registry.add_device("lab-1", "South Middle", "Lab 1")
    return registry


@pytest.fixture
def store(db: Database, clock: FakeClock, registry: Registry) -> ScheduleStore:
    return ScheduleStore(db, clock=clock)


@pytest.fixture
def published() -> Published:
    return Published()


@pytest.fixture
def service(
    db: Database,
    store: ScheduleStore,
    registry: Registry,
    published: Published,
    clock: FakeClock,
) -> ScheduleService:
    return ScheduleService(
        db,
        store,
        registry,
        lambda device_id, state: published.append((device_id, state)),
        ScheduleSettings(horizon_days=14),
        clock,
    )


@pytest.fixture
def north(store: ScheduleStore) -> int:
    """North High with 204 (room-204) and 205 (room-205); a plan records 204 in P1 and P2."""
    record = store.create_school(
        school(
            rooms=[Room(name="204", device_id="room-204"), Room(name="205", device_id="room-205")]
        )
    )
    store.create_plan(record.id, plan(periods=["P1", "P2"]), "coach")
    return record.id


def schedule_of(registry: Registry, device_id: str) -> list[tuple[str, datetime]]:
    desired = registry.desired(device_id)
    assert desired is not None
    return [(w.window_id, w.start) for w in desired.schedule]


def rows(db: Database) -> dict[str, CaptureWindowRow]:
    with db.session(readonly=True) as session:
        return {row.window_id: row for row in session.scalars(select(CaptureWindowRow))}


def add_recording(
    db: Database,
    recording_id: str,
    window: str | None,
    started_at: datetime,
    *,
    device_id: str = "room-204",
    status: str = "complete",
    end_reason: str | None = "schedule",
    gaps: list[dict[str, Any]] | None = None,
) -> None:
    with db.session() as session:
        session.add(
            Recording(
                id=recording_id,
                device_id=device_id,
                school=NORTH,
                room="204",
                trigger="schedule" if window else "button",
                window_id=window,
                started_at=started_at,
                ended_at=None if status == "recording" else started_at + timedelta(minutes=50),
                status=status,
                end_reason=None if status == "recording" else end_reason,
                bookmarks=[],
                gaps=gaps or [],
                segments_reported=1,
                revision=1,
                manifest_revision=1,
            )
        )


def open_alert(alerts: AlertEngine, kind: AlertKind, device_id: str = "room-204") -> str | None:
    page = alerts.list(open_only=True, device_id=device_id, kind=kind.value)
    return page.items[0].message if page.items else None


def ready(registry: Registry, clock: FakeClock, device_id: str = "room-204", **bad: Any) -> None:
    """The unit online, running its latest desired version, with this health."""
    registry.on_status(device_id, Status(online=True, epoch=1, ts=clock()))
    view = registry.get(device_id)
    assert view is not None
    registry.on_reported(
        device_id, ReportedState(desired_version=view.desired_version, agent_version="0.1.0")
    )
    registry.on_health(device_id, health(clock, **bad))


# --- refresh -------------------------------------------------------------------------------------


def test_refresh_pushes_the_horizon_to_affected_units_only_when_it_changed(
    service: ScheduleService, registry: Registry, published: Published, north: int, db: Database
) -> None:
    result = service.refresh()
    # Monday 2 March (yesterday) to 17 March, less the 6 March holiday: 11 days, 2 periods.
    assert result.windows == 22
    assert result.pushed == ["room-204"] == published.devices()
    schedule = schedule_of(registry, "room-204")
    assert schedule[0] == (wid(date(2026, 3, 2), "P1"), datetime(2026, 3, 2, 13, 0, tzinfo=UTC))
    assert schedule[-1][0] == wid(date(2026, 3, 17), "P2")
    # after the spring-forward night 08:00 local is 12:00 UTC
    assert (wid(date(2026, 3, 9), "P1"), datetime(2026, 3, 9, 12, 0, tzinfo=UTC)) in schedule
    assert registry.desired("room-205") is None
    stored = rows(db)
    assert len(stored) == 22
    row = stored[wid(TUESDAY, "P2")]
    assert (row.device_id, row.room, row.period, row.teacher, row.plans) == (
        "room-204",
        "204",
        "P2",
        "Ms Rivera",
        ["Coaching"],
    )
    assert row.title == f"{NORTH} · 204 · 2026-03-03 · P2"

    again = service.refresh()
    assert (again.windows, again.pushed) == (22, [])
    assert service.refresh(school_ids=[north]).pushed == []
    assert len(published) == 1


def test_refresh_keeps_the_units_own_settings(
    service: ScheduleService, registry: Registry, north: int
) -> None:
    registry.set_desired("room-204", settings=DesiredSettings(health_interval_s=30))
    service.refresh()
    desired = registry.desired("room-204")
    assert desired is not None and desired.settings.health_interval_s == 30
    assert len(desired.schedule) == 22


def test_the_horizon_rolls_with_the_schools_date(
    service: ScheduleService, registry: Registry, clock: FakeClock, north: int, db: Database
) -> None:
    service.refresh()
    clock.advance(24 * 3600)  # Wednesday
    result = service.refresh()
    assert result.pushed == ["room-204"]
    schedule = schedule_of(registry, "room-204")
    assert schedule[0][0] == wid(TUESDAY, "P1")  # Monday dropped: it is no longer yesterday
    assert schedule[-1][0] == wid(date(2026, 3, 18), "P2")
    # rows outside the horizon are history: kept
    assert {wid(date(2026, 3, 2), "P1"), wid(date(2026, 3, 18), "P2")} <= rows(db).keys()


def test_moving_a_period_moves_the_units_window_under_the_same_id(
    service: ScheduleService, store: ScheduleStore, registry: Registry, north: int
) -> None:
    service.refresh()
    before = dict(schedule_of(registry, "room-204"))
    later = bells(
        P1=(time(8, 0), time(8, 50)), P2=(time(9, 10), time(10, 0)), P3=(time(10, 10), time(11, 0))
    )
    store.update_school(north, lambda s: with_bell_schedule(s, later))
    assert service.refresh(school_ids=[north]).pushed == ["room-204"]
    after = dict(schedule_of(registry, "room-204"))
    assert after.keys() == before.keys()
    moved = wid(TUESDAY, "P2")
    assert after[moved] == P2_START + timedelta(minutes=10)
    assert after[wid(TUESDAY, "P1")] == before[wid(TUESDAY, "P1")]


def test_deleting_a_plan_empties_the_schedule_and_keeps_only_recorded_rows(
    service: ScheduleService,
    store: ScheduleStore,
    registry: Registry,
    clock: FakeClock,
    north: int,
    db: Database,
) -> None:
    service.refresh()
    add_recording(db, "rec-p1", wid(TUESDAY, "P1"), P1_START)
    [record] = store.plans(north)
    store.delete_plan(record.id)
    result = service.refresh(school_ids=[north])
    assert (result.windows, result.pushed) == (0, ["room-204"])
    assert schedule_of(registry, "room-204") == []
    assert list(rows(db)) == [wid(TUESDAY, "P1")]
    assert service.refresh().pushed == []


def test_a_unit_taken_out_of_its_room_gets_an_empty_schedule(
    service: ScheduleService, store: ScheduleStore, registry: Registry, north: int
) -> None:
    service.refresh()
    store.update_school(north, lambda s: with_room(s, Room(name="204")))
    assert service.refresh(school_ids=[north]).pushed == ["room-204"]
    assert schedule_of(registry, "room-204") == []


def test_a_full_refresh_empties_a_unit_in_no_room(
    service: ScheduleService, store: ScheduleStore, registry: Registry, north: int
) -> None:
    service.refresh()
    # windows left from before its room was deleted (say, by a controller that was stopped)
    desired = registry.desired("room-204")
    assert desired is not None
    registry.set_desired("room-205", schedule=desired.schedule[:2])
    store.update_school(north, lambda s: without_room(s, "205"))
    assert service.refresh().pushed == ["room-205"]
    assert schedule_of(registry, "room-205") == []


def test_a_unit_moved_to_another_school_gets_that_schools_windows(
    service: ScheduleService, store: ScheduleStore, registry: Registry, north: int
) -> None:
    service.refresh()
    south = store.create_school(revalidated(school("South Middle"), rooms=[Room(name="Lab 1")]))
    store.create_plan(south.id, plan(rooms=["Lab 1"], periods=["P3"]), None)
    store.update_school(north, lambda s: with_room(s, Room(name="204")))
    store.update_school(south.id, lambda s: with_room(s, Room(name="Lab 1", device_id="room-204")))
    # the API refreshes the edited school; the unit's old school is found from its windows
    result = service.refresh(school_ids=[south.id])
    assert result.pushed == ["room-204"]
    assert {w for w, _ in schedule_of(registry, "room-204")} == {
        window_id("South Middle", "Lab 1", d, "P3")
        for d in (date(2026, 3, day) for day in (2, 3, 4, 5, 9, 10, 11, 12, 13, 16, 17))
    }


def test_a_publish_failure_is_logged_and_the_desired_state_kept(
    db: Database, store: ScheduleStore, registry: Registry, clock: FakeClock, north: int
) -> None:
    def broken(_device_id: str, _state: DesiredState) -> None:
        raise ConnectionError("broker gone")

    service = ScheduleService(db, store, registry, broken, ScheduleSettings(), clock)
    assert service.refresh().pushed == ["room-204"]
    assert len(schedule_of(registry, "room-204")) == 22


# --- missed captures --------------------------------------------------------------------------

CAUSES: list[tuple[str, dict[str, Any] | None, str]] = [
    ("offline", None, "unit offline since 2026-03-03 08:00 UTC"),
    ("not applied", {"apply": False}, "unit has not applied schedule version 1"),
    (
        "cannot record",
        {"can_record": False, "cannot_record_reason": "disk full"},
        "disk full",
    ),
    ("camera", {"camera_present": False}, "camera not detected"),
    ("clock", {"clock_synced": False}, "clock not synchronised"),
    (
        "busy",
        {"state": RecorderState.RECORDING, "recording_id": "manual-1"},
        "busy with recording manual-1",
    ),
    ("healthy", {}, "unit online and healthy; see its log"),
]


@pytest.mark.parametrize(("case", "unit", "cause"), CAUSES, ids=[c[0] for c in CAUSES])
def test_a_window_that_did_not_start_raises_capture_missed_with_the_likely_cause(
    service: ScheduleService,
    registry: Registry,
    alerts: AlertEngine,
    clock: FakeClock,
    db: Database,
    north: int,
    case: str,
    unit: dict[str, Any] | None,
    cause: str,
) -> None:
    service.refresh()
    if unit is not None:
        values = dict(unit)
        if values.pop("apply", True):
            ready(registry, clock, **values)
        else:
            registry.on_status("room-204", Status(online=True, epoch=1, ts=clock()))
            registry.on_health("room-204", health(clock))
    clock.now = P1_START + timedelta(seconds=119)
    service.check()
    assert open_alert(alerts, AlertKind.CAPTURE_MISSED) is None
    clock.advance(1)
    service.check()
    message = open_alert(alerts, AlertKind.CAPTURE_MISSED)
    assert message == f"{NORTH} · 204 · 2026-03-03 · P1 did not start: {cause}"
    row = rows(db)[wid(TUESDAY, "P1")]
    assert (row.missed_at, row.missed_reason) == (clock(), cause)
    # Monday's windows were planned only after they ended: never due, never missed
    assert rows(db)[wid(date(2026, 3, 2), "P1")].missed_at is None
    service.check()
    assert len(alerts.list(open_only=False, kind=AlertKind.CAPTURE_MISSED.value).items) == 1


def test_a_recorded_window_is_not_missed_and_a_later_scheduled_recording_clears_the_alert(
    service: ScheduleService,
    registry: Registry,
    alerts: AlertEngine,
    clock: FakeClock,
    db: Database,
    north: int,
) -> None:
    service.refresh()
    ready(registry, clock)
    add_recording(db, "rec-p1", wid(TUESDAY, "P1"), P1_START + timedelta(seconds=1))
    clock.now = P2_START + timedelta(minutes=5)
    service.check()
    assert rows(db)[wid(TUESDAY, "P1")].missed_at is None
    message = open_alert(alerts, AlertKind.CAPTURE_MISSED)
    assert message is not None and "P2 did not start" in message

    # Wednesday's P1 is recorded: the unit works again
    clock.now = datetime(2026, 3, 4, 13, 0, 30, tzinfo=UTC)
    add_recording(db, "rec-wed", wid(date(2026, 3, 4), "P1"), clock.now)
    service.check()
    assert open_alert(alerts, AlertKind.CAPTURE_MISSED) is None
    # the missed window stays missed in the history
    assert rows(db)[wid(TUESDAY, "P2")].missed_at is not None


def test_a_missed_window_recorded_late_clears_its_alert(
    service: ScheduleService,
    registry: Registry,
    alerts: AlertEngine,
    clock: FakeClock,
    db: Database,
    north: int,
) -> None:
    service.refresh()
    clock.now = P1_START + timedelta(minutes=5)
    service.check()
    assert open_alert(alerts, AlertKind.CAPTURE_MISSED) is not None
    # an offline unit recorded it on its own clock; the manifest arrives when it is back
    add_recording(db, "rec-p1", wid(TUESDAY, "P1"), P1_START)
    service.check()
    assert open_alert(alerts, AlertKind.CAPTURE_MISSED) is None


# --- at risk -------------------------------------------------------------------------------------


def test_an_unsynchronised_clock_raises_capture_at_risk_before_the_window_until_synced(
    service: ScheduleService,
    registry: Registry,
    alerts: AlertEngine,
    clock: FakeClock,
    north: int,
) -> None:
    service.refresh()
    ready(registry, clock, clock_synced=False)
    clock.now = P1_START - timedelta(seconds=1801)
    service.check()
    assert open_alert(alerts, AlertKind.CAPTURE_AT_RISK) is None
    clock.advance(1)
    service.check()
    assert open_alert(alerts, AlertKind.CAPTURE_AT_RISK) == (
        f"clock not synchronised; next capture {NORTH} · 204 · 2026-03-03 · P1 at 08:00 EST"
    )
    registry.on_health("room-204", health(clock, clock_synced=True))
    service.check()
    assert open_alert(alerts, AlertKind.CAPTURE_AT_RISK) is None
    assert open_alert(alerts, AlertKind.CAPTURE_MISSED) is None


def test_a_desired_state_just_pushed_is_no_risk_yet(
    service: ScheduleService,
    store: ScheduleStore,
    registry: Registry,
    alerts: AlertEngine,
    clock: FakeClock,
    north: int,
) -> None:
    service.refresh()
    ready(registry, clock)
    clock.now = P1_START - timedelta(minutes=20)
    store.update_school(
        north,
        lambda s: with_bell_schedule(
            s, bells(P1=(time(8, 5), time(8, 50)), P2=(time(9, 0), time(9, 50)))
        ),
    )
    service.refresh(school_ids=[north])
    service.check()
    assert open_alert(alerts, AlertKind.CAPTURE_AT_RISK) is None
    clock.advance(61)
    service.check()
    message = open_alert(alerts, AlertKind.CAPTURE_AT_RISK)
    assert message is not None and message.startswith("unit has not applied schedule version 2")
    view = registry.get("room-204")
    assert view is not None
    registry.on_reported(
        "room-204", ReportedState(desired_version=view.desired_version, agent_version="0.1.0")
    )
    service.check()
    assert open_alert(alerts, AlertKind.CAPTURE_AT_RISK) is None


# --- timeline, preview, upcoming --------------------------------------------------------------


def test_the_timeline_shows_what_became_of_each_window(
    service: ScheduleService,
    store: ScheduleStore,
    registry: Registry,
    clock: FakeClock,
    db: Database,
    north: int,
) -> None:
    [record] = store.plans(north)
    store.update_plan(record.id, plan(periods=["P1", "P2", "P3"]))
    service.refresh()
    ready(registry, clock)
    wednesday = date(2026, 3, 4)
    add_recording(db, "r1", wid(TUESDAY, "P1"), P1_START)
    add_recording(db, "r2", wid(TUESDAY, "P2"), P2_START, end_reason="button")
    add_recording(
        db,
        "r3",
        wid(TUESDAY, "P3"),
        P2_START + timedelta(hours=1, minutes=5),
        status="partial",
        gaps=[
            {"start": "x", "end": "y", "reason": "power loss"},
            {"start": "x", "end": "y", "reason": "late start"},
        ],
    )
    add_recording(
        db, "r4-old", wid(wednesday, "P1"), P1_START + timedelta(days=1), status="interrupted"
    )
    add_recording(
        db, "r4", wid(wednesday, "P1"), P1_START + timedelta(days=1, minutes=3), status="recording"
    )
    clock.now = P2_START + timedelta(days=1, minutes=5)
    registry.on_health("room-204", health(clock, camera_present=False))
    service.check()

    timeline = service.timeline(north, TUESDAY, wednesday)
    assert [(e.window_id, e.status, e.recording_id, e.reason) for e in timeline] == [
        (wid(TUESDAY, "P1"), WindowStatus.COMPLETED, "r1", None),
        (wid(TUESDAY, "P2"), WindowStatus.STOPPED_BY_TEACHER, "r2", None),
        (wid(TUESDAY, "P3"), WindowStatus.PARTIAL, "r3", "power loss; late start"),
        (wid(wednesday, "P1"), WindowStatus.RECORDING, "r4", None),
        (wid(wednesday, "P2"), WindowStatus.MISSED, None, "camera not detected"),
        (wid(wednesday, "P3"), WindowStatus.PLANNED, None, None),
    ]
    first = timeline[0]
    assert first == TimelineEntry(
        window_id=wid(TUESDAY, "P1"),
        school=NORTH,
        room="204",
        device_id="room-204",
        date=TUESDAY,
        period="P1",
        start=P1_START,
        end=P1_START + timedelta(minutes=50),
        title=f"{NORTH} · 204 · 2026-03-03 · P1",
        teacher="Ms Rivera",
        plans=["Coaching"],
        status=WindowStatus.COMPLETED,
        recording_id="r1",
        reason=None,
    )
    assert service.timeline(north, date(2026, 4, 1), date(2026, 4, 30)) == []
    with pytest.raises(ScheduleError, match="before the first"):
        service.timeline(north, wednesday, TUESDAY)


def test_preview_and_upcoming_expand_without_storing(
    service: ScheduleService, clock: FakeClock, north: int, db: Database
) -> None:
    windows = service.preview(north, date(2026, 3, 30), date(2026, 3, 31))
    assert [w.window_id for w in windows] == [
        wid(date(2026, 3, 30), "P1"),
        wid(date(2026, 3, 30), "P2"),
        wid(date(2026, 3, 31), "P1"),
        wid(date(2026, 3, 31), "P2"),
    ]
    with pytest.raises(ScheduleError, match="at most 400 days"):
        service.preview(north, date(2026, 1, 1), date(2027, 6, 1))
    clock.now = P1_START + timedelta(minutes=51)
    upcoming = service.upcoming("room-204", days=2)
    assert [w.window_id for w in upcoming] == [
        wid(TUESDAY, "P2"),
        wid(date(2026, 3, 4), "P1"),
        wid(date(2026, 3, 4), "P2"),
        wid(date(2026, 3, 5), "P1"),
        wid(date(2026, 3, 5), "P2"),
    ]
    assert service.upcoming("room-205") == []
    assert service.upcoming("lab-1") == []
    assert rows(db) == {}


# --- thread --------------------------------------------------------------------------------------


@pytest.fixture
def running(
    db: Database,
    store: ScheduleStore,
    registry: Registry,
    published: Published,
    clock: FakeClock,
) -> Iterator[ScheduleService]:
    service = ScheduleService(
        db,
        store,
        registry,
        lambda device_id, state: published.append((device_id, state)),
        ScheduleSettings(refresh_interval_s=0.05, check_interval_s=0.05),
        clock,
    )
    service.start()
    try:
        yield service
    finally:
        service.stop()


def test_the_thread_refreshes_periodically_and_stops(
    running: ScheduleService, store: ScheduleStore, published: Published, north: int
) -> None:
    assert wait_for(lambda: published.devices() == ["room-204"], 10)
    store.update_school(north, lambda s: with_room(s, Room(name="204")))
    assert wait_for(lambda: published.devices() == ["room-204", "room-204"], 10)
    assert published[-1][1].schedule == []
    running.stop()
    count = len(published)
    store.update_school(north, lambda s: with_room(s, Room(name="204", device_id="room-204")))
    assert not wait_for(lambda: len(published) > count, 0.3)
