"""The registry: enrolment, presence under the epoch rule, health and its bounded history,
events, snapshots, desired/reported state, and listing a large fleet a page at a time."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert

from controller.alerts import AlertEngine, AlertThresholds
from controller.db import Database
from controller.models import Alert, Device
from controller.registry import DeviceExists, Registry, UnknownDevice
from shared.messages import (
    CaptureWindow,
    DesiredSettings,
    Event,
    EventKind,
    RecorderState,
    ReportedState,
    Severity,
    Snapshot,
    Status,
)
from shared.topics import TopicError
from tests.controller.conftest import FakeClock, health

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9"


def snapshot_of(jpeg: bytes, clock: FakeClock) -> Snapshot:
    return Snapshot(
        taken_at=clock(), width=320, height=240, jpeg_base64=base64.b64encode(jpeg).decode()
    )


@pytest.fixture
def registry(db: Database, clock: FakeClock) -> Registry:
    alerts = AlertEngine(db, AlertThresholds(), clock=clock)
    return Registry(db, alerts, clock=clock, health_history_keep=5, health_history_interval_s=60)


@pytest.fixture
def unit(registry: Registry) -> str:
    registry.add_device("room-204", "North High", "204")
    return "room-204"


# --- enrolment ------------------------------------------------------------------------------------


def test_an_added_unit_starts_offline_and_idle_with_no_drift(
    registry: Registry, clock: FakeClock
) -> None:
    view = registry.add_device("room-204", " North High ", "204")
    assert (view.id, view.school, view.room) == ("room-204", "North High", "204")
    assert not view.online and view.state is None and not view.drift
    assert view.open_alerts == [] and view.created_at == clock()
    assert registry.get("room-204") == view
    assert registry.known("room-204") and not registry.known("room-999")


def test_adding_a_unit_twice_is_refused(registry: Registry, unit: str) -> None:
    with pytest.raises(DeviceExists):
        registry.add_device(unit, "South", "1")
    assert registry.get(unit) is not None and registry.get(unit).school == "North High"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("device_id", "school", "room", "error"),
    [
        ("Room 204", "North", "204", TopicError),
        ("r", "North", "204", TopicError),
        ("room-204", "  ", "204", ValueError),
        ("room-204", "North", "x" * 201, ValueError),
    ],
)
def test_bad_enrolment_is_refused_and_changes_nothing(
    registry: Registry, device_id: str, school: str, room: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        registry.add_device(device_id, school, room)
    assert registry.list().total == 0


def test_removing_a_unit_forgets_it(registry: Registry, unit: str) -> None:
    registry.on_health(unit, health(FakeClock()))
    registry.remove_device(unit)
    assert registry.get(unit) is None and not registry.known(unit)
    assert registry.health_history(unit) == []
    with pytest.raises(UnknownDevice):
        registry.remove_device(unit)


# --- presence: the epoch rule ---------------------------------------------------------------------


def test_online_status_marks_the_unit_online_with_version_and_capabilities(
    registry: Registry, unit: str, clock: FakeClock
) -> None:
    status = Status(online=True, epoch=3, agent_version="0.2.0", capabilities=["record", "audio"])
    assert registry.on_status(unit, status)
    view = registry.get(unit)
    assert view is not None and view.online
    assert view.online_changed_at == clock() and view.last_seen_at == clock()
    assert view.agent_version == "0.2.0" and view.capabilities == ["record", "audio"]


def test_a_stale_will_never_marks_a_live_unit_offline(
    registry: Registry, unit: str, clock: FakeClock
) -> None:
    registry.on_status(unit, Status(online=True, epoch=7))
    clock.advance(30)
    # the will of the previous connection arrives late
    assert not registry.on_status(unit, Status(online=False, epoch=6))
    view = registry.get(unit)
    assert view is not None and view.online
    assert view.online_changed_at == clock() - timedelta(seconds=30)


def test_the_same_epoch_going_offline_is_a_real_disconnect(
    registry: Registry, unit: str, clock: FakeClock
) -> None:
    registry.on_status(unit, Status(online=True, epoch=7))
    clock.advance(30)
    assert registry.on_status(unit, Status(online=False, epoch=7))
    view = registry.get(unit)
    assert view is not None and not view.online and view.online_changed_at == clock()


def test_an_old_online_after_its_own_will_does_not_resurrect_the_unit(
    registry: Registry, unit: str
) -> None:
    registry.on_status(unit, Status(online=True, epoch=7))
    registry.on_status(unit, Status(online=False, epoch=7))
    assert not registry.on_status(unit, Status(online=True, epoch=7))
    assert not registry.get(unit).online  # type: ignore[union-attr]
    assert registry.on_status(unit, Status(online=True, epoch=8))
    assert registry.get(unit).online  # type: ignore[union-attr]


def test_a_repeated_online_status_is_applied_without_a_new_transition(
    registry: Registry, unit: str, clock: FakeClock
) -> None:
    registry.on_status(unit, Status(online=True, epoch=2))
    changed_at = clock()
    clock.advance(60)
    # a restarted controller receives the retained status again
    assert registry.on_status(unit, Status(online=True, epoch=2))
    view = registry.get(unit)
    assert view is not None and view.online_changed_at == changed_at
    assert view.last_seen_at == clock()


def test_presence_changes_are_listed_as_events(registry: Registry, unit: str) -> None:
    registry.on_status(unit, Status(online=True, epoch=1))
    registry.on_status(unit, Status(online=False, epoch=1))
    kinds = [entry["kind"] for entry in registry.events(unit)]
    assert kinds == ["offline", "online"]


def test_status_of_an_unknown_unit_is_not_applied(registry: Registry) -> None:
    assert not registry.on_status("room-999", Status(online=True, epoch=1))


# --- health ---------------------------------------------------------------------------------------


def test_health_updates_the_units_latest_state(
    registry: Registry, unit: str, clock: FakeClock
) -> None:
    registry.on_health(
        unit,
        health(clock, state=RecorderState.RECORDING, recording_id="rec-1", agent_version="0.3"),
    )
    view = registry.get(unit)
    assert view is not None
    assert (view.state, view.recording_id, view.agent_version) == ("recording", "rec-1", "0.3")
    assert view.health is not None and view.health["soc_temp_c"] == 55.0
    assert view.health_at == clock() and view.last_seen_at == clock()


def test_health_history_keeps_one_sample_per_interval_and_only_the_last_n(
    registry: Registry, unit: str, clock: FakeClock
) -> None:
    for minute in range(12):
        registry.on_health(unit, health(clock, uptime_s=float(minute * 60)))
        clock.advance(20)  # three samples a minute, one kept
        registry.on_health(unit, health(clock, uptime_s=float(minute * 60 + 20)))
        clock.advance(40)
    history = registry.health_history(unit, limit=100)
    assert [sample["uptime_s"] for sample in history] == [660.0, 600.0, 540.0, 480.0, 420.0]
    assert history[0]["received_at"] > history[-1]["received_at"]
    assert registry.health_history(unit, limit=2) == history[:2]


def test_an_older_health_sample_does_not_replace_a_newer_one(
    registry: Registry, unit: str, clock: FakeClock
) -> None:
    registry.on_health(unit, health(clock, spool_segments=5))
    late = health(clock, spool_segments=9, ts=clock() - timedelta(seconds=30))
    registry.on_health(unit, late)
    view = registry.get(unit)
    assert view is not None and view.health is not None and view.health["spool_segments"] == 5


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (timedelta(hours=1), timedelta(0)),  # ran ahead, then NTP set it right
        (timedelta(0), timedelta(days=-1)),  # stepped a day back by a bad time source
        (timedelta(0), timedelta(minutes=-6)),  # just beyond the reorder window
    ],
    ids=["ran-ahead-then-set-back", "set-a-day-back", "set-six-minutes-back"],
)
def test_health_after_a_units_clock_was_stepped_back_is_taken(
    registry: Registry, unit: str, clock: FakeClock, first: timedelta, then: timedelta
) -> None:
    registry.on_health(unit, health(clock, spool_segments=5, ts=clock() + first))
    clock.advance(10)
    registry.on_health(unit, health(clock, spool_segments=7, ts=clock() + then))
    view = registry.get(unit)
    assert view is not None and view.health is not None and view.health["spool_segments"] == 7


def test_a_batch_stores_every_units_last_sample_and_raises_each_alert_once(
    registry: Registry, unit: str, clock: FakeClock
) -> None:
    registry.add_device("room-300", "North", "300")
    hot = {"soc_temp_c": 90.0}
    registry.on_health_batch(
        [
            (unit, health(clock, spool_segments=1, **hot)),
            ("room-300", health(clock, spool_segments=2)),
            ("room-999", health(clock, spool_segments=3)),  # not enrolled: skipped
            (unit, health(clock, spool_segments=4, ts=clock() + timedelta(seconds=30), **hot)),
            (unit, health(clock, spool_segments=9, ts=clock() + timedelta(seconds=20))),  # late
        ]
    )
    first, second = registry.get(unit), registry.get("room-300")
    assert first is not None and first.health is not None and second is not None
    assert first.health["spool_segments"] == 4 and first.open_alerts == ["temperature"]
    assert second.health is not None and second.health["spool_segments"] == 2
    assert second.open_alerts == []
    assert len(registry.health_history(unit)) == 1
    clock.advance(60)
    registry.on_health_batch([(unit, health(clock)), (unit, health(clock, **hot))])
    assert registry.get(unit).open_alerts == ["temperature"]  # type: ignore[union-attr]


# --- events and snapshots -------------------------------------------------------------------------


def test_events_are_kept_newest_first_and_bounded(db: Database, clock: FakeClock) -> None:
    registry = Registry(db, AlertEngine(db, clock=clock), clock=clock, events_keep=3)
    registry.add_device("room-204", "North", "204")
    for index in range(5):
        clock.advance(1)
        registry.on_event(
            "room-204",
            Event(
                kind=EventKind.BOOKMARK,
                severity=Severity.INFO,
                ts=clock(),
                recording_id="rec-1",
                message=f"bookmark {index}",
                data={"index": index},
            ),
        )
    events = registry.events("room-204")
    assert [entry["message"] for entry in events] == ["bookmark 4", "bookmark 3", "bookmark 2"]
    assert events[0]["data"] == {"index": 4} and events[0]["recording_id"] == "rec-1"


def test_the_latest_snapshot_is_kept(registry: Registry, unit: str, clock: FakeClock) -> None:
    assert registry.snapshot(unit) is None
    registry.on_snapshot(unit, snapshot_of(JPEG, clock))
    clock.advance(5)
    newer = JPEG[:-2] + b"\x01\xff\xd9"
    registry.on_snapshot(unit, snapshot_of(newer, clock))
    assert registry.snapshot(unit) == (newer, clock())
    assert registry.get(unit).snapshot_at == clock()  # type: ignore[union-attr]


@pytest.mark.parametrize("payload", ["not base64!", base64.b64encode(b"GIF89a....").decode()])
def test_a_snapshot_that_is_no_jpeg_is_refused_and_the_old_one_kept(
    registry: Registry, unit: str, clock: FakeClock, payload: str
) -> None:
    registry.on_snapshot(unit, snapshot_of(JPEG, clock))
    bad = Snapshot(taken_at=clock(), width=1, height=1, jpeg_base64=payload)
    with pytest.raises(ValueError):
        registry.on_snapshot(unit, bad)
    assert registry.snapshot(unit) == (JPEG, clock())


# --- desired / reported ---------------------------------------------------------------------------


def test_desired_state_versions_and_drift(registry: Registry, unit: str, clock: FakeClock) -> None:
    window = CaptureWindow(
        window_id="p2", start=clock() + timedelta(hours=1), end=clock() + timedelta(hours=2)
    )
    first = registry.set_desired(unit, settings=DesiredSettings(health_interval_s=10))
    assert first.version == 1 and first.issued_at == clock()
    second = registry.set_desired(unit, schedule=[window])
    assert second.version == 2
    assert second.settings.health_interval_s == 10  # kept
    assert second.schedule == [window]
    assert registry.desired(unit) == second
    view = registry.get(unit)
    assert view is not None and view.drift and view.desired_version == 2
    registry.on_reported(unit, ReportedState(desired_version=2, agent_version="0.1.0"))
    assert not registry.get(unit).drift  # type: ignore[union-attr]


def test_a_new_desired_version_is_above_what_the_unit_runs(registry: Registry, unit: str) -> None:
    # the unit ran version 7 from an earlier controller database
    registry.on_reported(unit, ReportedState(desired_version=7, agent_version="0.1.0"))
    assert registry.set_desired(unit).version == 8


def test_a_reported_error_is_kept(registry: Registry, unit: str) -> None:
    registry.set_desired(unit, settings=DesiredSettings(health_interval_s=10))
    registry.on_reported(
        unit, ReportedState(desired_version=0, agent_version="0.1.0", error="bad window")
    )
    view = registry.get(unit)
    assert view is not None and view.drift and view.reported_error == "bad window"


def test_desired_state_of_an_unknown_unit_is_refused(registry: Registry) -> None:
    with pytest.raises(UnknownDevice):
        registry.set_desired("room-999")
    assert registry.desired("room-999") is None


# --- listing --------------------------------------------------------------------------------------


@pytest.fixture
def fleet(registry: Registry, clock: FakeClock) -> Registry:
    for school, rooms in (("North High", ("101", "102", "103")), ("South Middle", ("1", "2"))):
        for room in rooms:
            device_id = f"{school.split()[0].lower()}-{room}"
            registry.add_device(device_id, school, room)
    registry.on_status("north-101", Status(online=True, epoch=1))
    registry.on_status("north-102", Status(online=True, epoch=1))
    registry.on_status("south-1", Status(online=True, epoch=1))
    registry.on_health("north-102", health(clock, state=RecorderState.RECORDING, recording_id="r"))
    registry.on_health("south-1", health(clock, camera_present=False))
    return registry


def test_list_filters_and_pages(fleet: Registry) -> None:
    everyone = fleet.list()
    assert [view.id for view in everyone.items] == [
        "north-101",
        "north-102",
        "north-103",
        "south-1",
        "south-2",
    ]
    assert everyone.total == 5
    assert [v.id for v in fleet.list(school="South Middle").items] == ["south-1", "south-2"]
    assert [v.id for v in fleet.list(online=False).items] == ["north-103", "south-2"]
    assert [v.id for v in fleet.list(state="recording").items] == ["north-102"]
    assert [v.id for v in fleet.list(alert="camera_missing").items] == ["south-1"]
    assert fleet.list(alert="camera_missing").items[0].open_alerts == ["camera_missing"]
    assert [v.id for v in fleet.list(q="SOUTH").items] == ["south-1", "south-2"]
    assert [v.id for v in fleet.list(q="10").items] == ["north-101", "north-102", "north-103"]
    assert fleet.list(q="%").total == 0
    second = fleet.list(page=2, per_page=2)
    assert [v.id for v in second.items] == ["north-103", "south-1"]
    assert (second.total, second.page, second.per_page, second.pages) == (5, 2, 2, 3)


def test_schools_count_units_and_online_units(fleet: Registry) -> None:
    assert fleet.schools() == [("North High", 3, 2), ("South Middle", 2, 1)]
    assert fleet.device_ids("South Middle") == ["south-1", "south-2"]
    assert len(fleet.device_ids()) == 5


@pytest.fixture
def statements(db: Database) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    yield seen
    event.remove(db.engine, "before_cursor_execute", record)


def test_list_of_20000_units_reads_one_page_in_three_queries(
    db: Database, registry: Registry, clock: FakeClock, statements: list[str]
) -> None:
    rows = [
        {
            "id": f"unit-{index:05d}",
            "school": f"School {index // 500:02d}",
            "room": f"{index % 500:03d}",
            "created_at": clock(),
            "online": index % 3 == 0,
            "epoch": 1,
            "capabilities": [],
            "desired_version": 0,
            "reported_version": 0,
            "state": "recording" if index % 7 == 0 else "idle",
        }
        for index in range(20_000)
    ]
    alerts = [
        {
            "device_id": f"unit-{index:05d}",
            "kind": "disk_low",
            "severity": "warning",
            "message": "low",
            "raised_at": clock(),
        }
        for index in range(0, 20_000, 10)
    ]
    with db.session() as session:
        session.execute(insert(Device), rows)
        session.execute(insert(Alert), alerts)
    statements.clear()

    page = registry.list(school="School 07", online=True, page=3, per_page=50)

    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 3, selects
    assert any("LIMIT" in s.upper() for s in selects)
    expected = [f"unit-{i:05d}" for i in range(3500, 4000) if i % 3 == 0]
    assert page.total == len(expected)
    assert [view.id for view in page.items] == expected[100:150]
    assert all(view.online for view in page.items)
    assert next(v.open_alerts for v in page.items if int(v.id[5:]) % 10 == 0) == ["disk_low"]

    statements.clear()
    everyone = registry.list(alert="disk_low", q="unit-1", page=1, per_page=20)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 3
    assert everyone.total == 1000 and len(everyone.items) == 20
