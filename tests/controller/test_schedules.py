"""The schedule store: schools as whole documents, plans that must fit them, units in one room
at most, and the unit's own school/room following its room."""

from __future__ import annotations

from datetime import date, time

import pytest
from sqlalchemy import select

from controller.alerts import AlertEngine
from controller.db import Database
from controller.models import CaptureWindowRow, SchoolRow
from controller.registry import Registry
from controller.schedules import (
    ScheduleConflict,
    ScheduleError,
    ScheduleNotFound,
    ScheduleStore,
    revalidated,
    with_bell_schedule,
    with_calendar,
    with_day_types,
    with_room,
    without_bell_schedule,
    without_room,
)
from shared.schedule import (
    BellSchedule,
    CalendarDay,
    CapturePlan,
    DayType,
    Period,
    Room,
    School,
    SchoolCalendar,
)
from tests.controller.conftest import FakeClock

NORTH = "North High"
ZONE = "America/New_York"


def bells(name: str = "Regular", **periods: tuple[time, time]) -> BellSchedule:
    periods = periods or {
        "P1": (time(8, 0), time(8, 50)),
        "P2": (time(9, 0), time(9, 50)),
        "P3": (time(10, 0), time(10, 50)),
    }
    return BellSchedule(
        name=name,
        periods=[Period(name=n, start=start, end=end) for n, (start, end) in periods.items()],
    )


def school(name: str = NORTH, rooms: list[Room] | None = None) -> School:
    """Mondays to Fridays from 2 March 2026, an A/B rotation, 6 March a holiday."""
    return School(
        name=name,
        timezone=ZONE,
        bell_schedules=[bells(), bells("Early", P1=(time(8, 0), time(8, 30)))],
        day_types=[
            DayType(name="Regular", bell_schedule="Regular"),
            DayType(name="Early release", bell_schedule="Early"),
        ],
        calendar=SchoolCalendar(
            first_day=date(2026, 3, 2),
            last_day=date(2026, 6, 30),
            default_day_type="Regular",
            rotation=["A", "B"],
            days=[CalendarDay(date=date(2026, 3, 6), holiday=True, note="snow day")],
        ),
        rooms=rooms if rooms is not None else [Room(name="204", device_id="room-204")],
    )


def plan(name: str = "Coaching", rooms: list[str] | None = None, **changes: object) -> CapturePlan:
    values: dict[str, object] = {
        "name": name,
        "school": "ignored: the store sets it",
        "rooms": rooms or ["204"],
        "periods": ["P2"],
        "first_day": date(2026, 3, 2),
        "last_day": date(2026, 3, 31),
        "teacher": "Ms Rivera",
    }
    values.update(changes)
    return CapturePlan.model_validate(values)


@pytest.fixture
def registry(db: Database, clock: FakeClock) -> Registry:
    registry = Registry(db, AlertEngine(db, clock=clock), clock=clock)
    registry.add_device("room-204", NORTH, "204")
    registry.add_device("room-205", NORTH, "205")
    registry.add_device("lab-1", "South Middle", "Lab 1")
    return registry


@pytest.fixture
def store(db: Database, clock: FakeClock, registry: Registry) -> ScheduleStore:
    return ScheduleStore(db, clock=clock)


def placed(registry: Registry, device_id: str) -> tuple[str, str]:
    view = registry.get(device_id)
    assert view is not None
    return view.school, view.room


# --- schools ---------------------------------------------------------------------------------


def test_schools_are_created_listed_read_and_deleted(
    store: ScheduleStore, clock: FakeClock
) -> None:
    north = store.create_school(school())
    south = store.create_school(school("South Middle", rooms=[]))
    assert north.school == school()
    assert north.created_at == north.updated_at == clock()
    assert [r.school.name for r in store.schools()] == [NORTH, "South Middle"]
    assert store.school(north.id) == north
    store.delete_school(south.id)
    assert [r.id for r in store.schools()] == [north.id]
    with pytest.raises(ScheduleNotFound, match=f"no school {south.id}"):
        store.school(south.id)
    with pytest.raises(ScheduleNotFound):
        store.delete_school(south.id)
    with pytest.raises(ScheduleNotFound):
        store.update_school(south.id, lambda s: s)


def test_a_school_name_and_its_slug_are_unique(store: ScheduleStore) -> None:
    north = store.create_school(school())
    with pytest.raises(ScheduleConflict, match="a school named 'North High' exists"):
        store.create_school(school(rooms=[]))
    with pytest.raises(ScheduleConflict, match="too close to 'North High'"):
        store.create_school(school("north-high", rooms=[]))
    other = store.create_school(school("East", rooms=[]))
    with pytest.raises(ScheduleConflict, match="a school named 'North High' exists"):
        store.update_school(other.id, lambda s: revalidated(s, name=NORTH))
    assert store.school(north.id).school.name == NORTH


def test_a_new_school_without_rooms_takes_the_units_enrolled_with_its_name(
    store: ScheduleStore, registry: Registry
) -> None:
    registry.add_device("room-206", NORTH, "Room/206 ")
    record = store.create_school(school(rooms=[]))
    assert record.school.rooms == [
        Room(name="204", device_id="room-204"),
        Room(name="205", device_id="room-205"),
        Room(name="Room/206", device_id="room-206"),
    ]
    # a unit already in a room of another school stays where it is
    south = store.create_school(school("South Middle", rooms=[]))
    assert south.school.rooms == [Room(name="Lab 1", device_id="lab-1")]


def test_edits_revalidate_the_whole_school_and_say_what_is_wrong(store: ScheduleStore) -> None:
    record = store.create_school(school())
    overlapping = {
        "name": "Regular",
        "periods": [
            {"name": "P1", "start": "08:00", "end": "09:00"},
            {"name": "P2", "start": "08:30", "end": "09:30"},
        ],
    }
    with pytest.raises(ScheduleError, match=r"bell_schedules\[0\]\.periods: periods 'P1' and 'P2'"):
        store.update_school(record.id, lambda s: revalidated(s, bell_schedules=[overlapping]))
    with pytest.raises(ScheduleError, match="unknown bell schedule 'Late'"):
        store.update_school(
            record.id,
            lambda s: with_day_types(s, [DayType(name="Late start", bell_schedule="Late")]),
        )
    with pytest.raises(ScheduleError, match="unknown timezone 'Mars/Olympus'"):
        store.update_school(record.id, lambda s: revalidated(s, timezone="Mars/Olympus"))
    with pytest.raises(ScheduleConflict, match="used by day type 'Early release'"):
        store.update_school(record.id, lambda s: without_bell_schedule(s, "Early"))
    with pytest.raises(ScheduleNotFound, match="no bell schedule 'Late'"):
        store.update_school(record.id, lambda s: without_bell_schedule(s, "Late"))
    with pytest.raises(ScheduleNotFound, match="no room '999'"):
        store.update_school(record.id, lambda s: without_room(s, "999"))
    assert store.school(record.id) == record


def test_helpers_add_or_replace_by_name(store: ScheduleStore, clock: FakeClock) -> None:
    record = store.create_school(school())
    clock.advance(60)
    later = bells(P1=(time(8, 15), time(9, 5)), P2=(time(9, 15), time(10, 5)))
    updated = store.update_school(record.id, lambda s: with_bell_schedule(s, later))
    assert [b.name for b in updated.school.bell_schedules] == ["Regular", "Early"]
    assert updated.school.bell_schedules[0] == later
    assert updated.updated_at == clock() > updated.created_at
    updated = store.update_school(record.id, lambda s: with_bell_schedule(s, bells("Exam")))
    assert [b.name for b in updated.school.bell_schedules] == ["Regular", "Early", "Exam"]
    updated = store.update_school(record.id, lambda s: with_calendar(s, None))
    assert updated.school.calendar is None
    updated = store.update_school(record.id, lambda s: without_room(s, "204"))
    assert updated.school.rooms == []


# --- rooms and units -----------------------------------------------------------------------------


def test_assigning_a_unit_to_a_room_moves_it_and_its_own_school_and_room(
    store: ScheduleStore, registry: Registry
) -> None:
    north = store.create_school(school())
    store.update_school(north.id, lambda s: with_room(s, Room(name="Library")))
    assert placed(registry, "lab-1") == ("South Middle", "Lab 1")
    updated = store.update_school(
        north.id, lambda s: with_room(s, Room(name="Library", device_id="lab-1"))
    )
    assert Room(name="Library", device_id="lab-1") in updated.school.rooms
    assert placed(registry, "lab-1") == (NORTH, "Library")
    assert store.school_ids_for_device("lab-1") == [north.id]
    # a rename moves every unit of the school along
    store.update_school(north.id, lambda s: revalidated(s, name="North Academy"))
    assert placed(registry, "lab-1") == ("North Academy", "Library")
    assert placed(registry, "room-204") == ("North Academy", "204")


def test_a_unit_is_refused_a_second_room(store: ScheduleStore, registry: Registry) -> None:
    north = store.create_school(school())
    south = store.create_school(school("South Middle", rooms=[Room(name="Lab 1")]))
    with pytest.raises(ScheduleConflict, match="'room-204' is already in room '204'"):
        store.update_school(
            north.id, lambda s: with_room(s, Room(name="205", device_id="room-204"))
        )
    with pytest.raises(ScheduleConflict, match="'room-204' is already in room '204' of 'North"):
        store.update_school(
            south.id, lambda s: with_room(s, Room(name="Lab 1", device_id="room-204"))
        )
    with pytest.raises(ScheduleConflict, match="already in room"):
        store.create_school(school("West", rooms=[Room(name="1", device_id="room-204")]))
    with pytest.raises(ScheduleError, match=r"unknown unit.*'ghost'"):
        store.update_school(north.id, lambda s: with_room(s, Room(name="205", device_id="ghost")))
    assert placed(registry, "room-204") == (NORTH, "204")
    assert store.school_ids_for_device("room-204") == [north.id]
    assert store.school_ids_for_device("ghost") == []


def test_a_removed_unit_does_not_block_edits_of_its_old_school(
    store: ScheduleStore, registry: Registry
) -> None:
    north = store.create_school(school())
    registry.remove_device("room-204")
    updated = store.update_school(north.id, lambda s: with_bell_schedule(s, bells("Exam")))
    assert updated.school.rooms == [Room(name="204", device_id="room-204")]


# --- plans ---------------------------------------------------------------------------------------


def test_plans_are_created_read_updated_and_deleted(store: ScheduleStore, clock: FakeClock) -> None:
    north = store.create_school(school())
    created = store.create_plan(north.id, plan(), "coach@example.org")
    assert created.plan.school == NORTH
    assert created.plan == plan().model_copy(update={"school": NORTH})
    assert (created.school_id, created.created_by) == (north.id, "coach@example.org")
    assert store.plan(created.id) == created
    clock.advance(60)
    updated = store.update_plan(created.id, plan(periods=["P1", "P3"], school="whatever"))
    assert updated.plan.periods == ["P1", "P3"] and updated.plan.school == NORTH
    assert updated.updated_at > updated.created_at
    assert [p.id for p in store.plans(north.id)] == [created.id]
    assert [p.id for p in store.plans()] == [created.id]
    store.delete_plan(created.id)
    assert store.plans() == []
    with pytest.raises(ScheduleNotFound, match=f"no plan {created.id}"):
        store.plan(created.id)
    with pytest.raises(ScheduleNotFound):
        store.delete_plan(created.id)
    with pytest.raises(ScheduleNotFound):
        store.update_plan(created.id, plan())
    with pytest.raises(ScheduleNotFound):
        store.create_plan(9999, plan(), None)
    with pytest.raises(ScheduleNotFound):
        store.plans(9999)


def test_plan_names_are_unique_within_a_school(store: ScheduleStore) -> None:
    north = store.create_school(school())
    south = store.create_school(school("South Middle", rooms=[Room(name="204")]))
    first = store.create_plan(north.id, plan(), None)
    store.create_plan(south.id, plan(), None)
    with pytest.raises(ScheduleConflict, match="already has a plan named 'Coaching'"):
        store.create_plan(north.id, plan(), None)
    other = store.create_plan(north.id, plan("Induction"), None)
    with pytest.raises(ScheduleConflict, match="'Coaching'"):
        store.update_plan(other.id, plan())
    store.update_plan(first.id, plan(periods=["P1"]))


def test_a_plan_naming_what_its_school_lacks_is_refused_naming_each(store: ScheduleStore) -> None:
    north = store.create_school(school())
    bad = plan(rooms=["204", "301", "302"], periods=["P2", "P9"], rotation_days=["A", "C"])
    with pytest.raises(ScheduleError) as caught:
        store.create_plan(north.id, bad, None)
    assert str(caught.value) == (
        "rooms not in North High: '301', '302'; "
        "periods in none of North High's bell schedules: 'P9'; "
        "rotation days not in North High's calendar: 'C'"
    )
    with pytest.raises(ScheduleError, match="last day is before its first"):
        store.create_plan(north.id, plan().model_copy(update={"last_day": date(2026, 3, 1)}), None)
    assert store.plans() == []


def test_a_school_edit_that_would_strand_a_plan_is_refused(store: ScheduleStore) -> None:
    north = store.create_school(school())
    store.update_school(north.id, lambda s: with_room(s, Room(name="205")))
    store.create_plan(north.id, plan(rooms=["204", "205"], rotation_days=["B"]), None)
    with pytest.raises(ScheduleConflict, match=r"plan 'Coaching' .*rooms not in North High: '205'"):
        store.update_school(north.id, lambda s: without_room(s, "205"))
    with pytest.raises(ScheduleConflict, match="periods in none"):
        store.update_school(
            north.id, lambda s: with_bell_schedule(s, bells(P1=(time(8, 0), time(8, 50))))
        )
    assert school_calendar_rotation(store, north.id) == ["A", "B"]
    with pytest.raises(ScheduleConflict, match="rotation days not in"):
        store.update_school(north.id, lambda s: with_calendar(s, None))
    # moving the period keeps the plan valid
    store.update_school(
        north.id,
        lambda s: with_bell_schedule(s, bells(P2=(time(9, 10), time(10, 0)))),
    )


def school_calendar_rotation(store: ScheduleStore, school_id: int) -> list[str]:
    calendar = store.school(school_id).school.calendar
    assert calendar is not None
    return calendar.rotation


def test_renaming_a_school_rewrites_its_plans(store: ScheduleStore) -> None:
    north = store.create_school(school())
    record = store.create_plan(north.id, plan(), None)
    store.update_school(north.id, lambda s: revalidated(s, name="North Academy"))
    assert store.plan(record.id).plan.school == "North Academy"
    assert store.school(north.id).school.name == "North Academy"


def test_a_school_with_plans_is_not_deleted_and_its_windows_go_with_it(
    store: ScheduleStore, db: Database, clock: FakeClock
) -> None:
    north = store.create_school(school())
    record = store.create_plan(north.id, plan(), None)
    with pytest.raises(ScheduleConflict, match="still has 1 plan"):
        store.delete_school(north.id)
    with db.session() as session:
        session.add(
            CaptureWindowRow(
                window_id="north-high.204.20260303.p2",
                school_id=north.id,
                device_id="room-204",
                room="204",
                date=date(2026, 3, 3),
                period="P2",
                start=clock(),
                end=clock(),
                title="t",
                plans=["Coaching"],
                updated_at=clock(),
            )
        )
    store.delete_plan(record.id)
    store.delete_school(north.id)
    with db.session(readonly=True) as session:
        assert session.scalars(select(CaptureWindowRow)).all() == []
        assert session.scalars(select(SchoolRow)).all() == []
