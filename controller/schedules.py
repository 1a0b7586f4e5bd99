"""Schools and capture plans as the controller stores them; no MQTT.

Each school is one validated ``shared.schedule.School`` document (bell schedules,
day types, calendar, rooms and their units), so every edit revalidates the whole
aggregate. Plans are rows of their own that name their school; an edit to either
side is refused while a plan would name a room, period or rotation day the school
no longer has. A unit is in at most one room across all schools, and the room a
school gives it is copied onto the unit's own school/room columns so the fleet
pages agree with the schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller.db import Database, affected
from controller.models import CapturePlanRow, Device, SchoolRow
from shared.clock import utcnow
from shared.schedule import (
    BellSchedule,
    CapturePlan,
    DayType,
    Room,
    School,
    SchoolCalendar,
    slug,
)

__all__ = [
    "PlanRecord",
    "ScheduleConflict",
    "ScheduleError",
    "ScheduleNotFound",
    "ScheduleStore",
    "SchoolRecord",
    "plan_problems",
    "revalidated",
    "validation_reason",
    "with_bell_schedule",
    "with_calendar",
    "with_day_types",
    "with_room",
    "without_bell_schedule",
    "without_room",
]

log = logging.getLogger(__name__)


class ScheduleError(ValueError):
    """Bad input; ``str(exc)`` is a reason a person can act on."""


class ScheduleConflict(Exception):
    """The change clashes with what is stored: a name taken, something still in use, or a
    unit already in another room."""


class ScheduleNotFound(LookupError):
    """No school or plan with that id, or no item of that name in a school."""

    def __str__(self) -> str:
        # LookupError would quote the message like a dictionary key.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class SchoolRecord:
    id: int
    school: School
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class PlanRecord:
    id: int
    school_id: int
    # plan.school always equals the school's current name
    plan: CapturePlan
    created_by: str | None
    created_at: datetime
    updated_at: datetime


# --- building edited schools ----------------------------------------------------------------


def validation_reason(exc: ValidationError) -> str:
    """A pydantic error as one line, e.g. ``bell_schedules[0].periods: periods 'P1' and 'P2'
    overlap``."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ""
        for part in error["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def revalidated(school: School, **changes: object) -> School:
    """``school`` with ``changes``, validated as a whole; ScheduleError says what is wrong."""
    try:
        return School.model_validate({**school.model_dump(), **changes})
    except ValidationError as exc:
        raise ScheduleError(validation_reason(exc)) from None


_Named = TypeVar("_Named", BellSchedule, Room)


def _replaced(items: Sequence[_Named], item: _Named) -> list[_Named]:
    """``items`` with ``item`` in place of the one of its name, or appended."""
    if any(existing.name == item.name for existing in items):
        return [item if existing.name == item.name else existing for existing in items]
    appended = list(items)
    appended.append(item)
    return appended


def with_bell_schedule(school: School, schedule: BellSchedule) -> School:
    """Adds the bell schedule, or replaces the one of its name."""
    return revalidated(school, bell_schedules=_replaced(school.bell_schedules, schedule))


def without_bell_schedule(school: School, name: str) -> School:
    if all(b.name != name for b in school.bell_schedules):
        raise ScheduleNotFound(f"{school.name} has no bell schedule {name!r}")
    users = [d.name for d in school.day_types if d.bell_schedule == name]
    if users:
        raise ScheduleConflict(f"bell schedule {name!r} is used by day type {users[0]!r}")
    return revalidated(school, bell_schedules=[b for b in school.bell_schedules if b.name != name])


def with_day_types(school: School, day_types: list[DayType]) -> School:
    return revalidated(school, day_types=day_types)


def with_calendar(school: School, calendar: SchoolCalendar | None) -> School:
    return revalidated(school, calendar=calendar)


def with_room(school: School, room: Room) -> School:
    """Adds the room, or replaces the one of its name (its unit included)."""
    if room.device_id is not None:
        for other in school.rooms:
            if other.device_id == room.device_id and other.name != room.name:
                raise ScheduleConflict(
                    f"unit {room.device_id!r} is already in room {other.name!r}; "
                    "take it out of that room first"
                )
    return revalidated(school, rooms=_replaced(school.rooms, room))


def without_room(school: School, name: str) -> School:
    if all(r.name != name for r in school.rooms):
        raise ScheduleNotFound(f"{school.name} has no room {name!r}")
    return revalidated(school, rooms=[r for r in school.rooms if r.name != name])


def plan_problems(school: School, plan: CapturePlan) -> list[str]:
    """What ``plan`` names that ``school`` does not have; empty when it fits."""
    periods = {p.name for b in school.bell_schedules for p in b.periods}
    rotation = set(school.calendar.rotation) if school.calendar is not None else set()
    checks: tuple[tuple[str, list[str], set[str]], ...] = (
        (f"rooms not in {school.name}", plan.rooms, {r.name for r in school.rooms}),
        (f"periods in none of {school.name}'s bell schedules", plan.periods, periods),
        (f"rotation days not in {school.name}'s calendar", plan.rotation_days, rotation),
    )
    problems = []
    for what, names, known in checks:
        unknown = list(dict.fromkeys(n for n in names if n not in known))
        if unknown:
            problems.append(f"{what}: {', '.join(repr(n) for n in unknown)}")
    return problems


def _checked(school: School) -> School:
    """Revalidated: an edit may have built its result without validation (model_copy)."""
    return revalidated(school)


def _fitted(school: School, plan: CapturePlan) -> CapturePlan:
    try:
        plan = CapturePlan.model_validate({**plan.model_dump(), "school": school.name})
    except ValidationError as exc:
        raise ScheduleError(validation_reason(exc)) from None
    problems = plan_problems(school, plan)
    if problems:
        raise ScheduleError("; ".join(problems))
    return plan


def _document(model: School | CapturePlan) -> dict[str, Any]:
    return model.model_dump(mode="json")


def _school_record(row: SchoolRow) -> SchoolRecord:
    return SchoolRecord(row.id, School.model_validate(row.document), row.created_at, row.updated_at)


def _plan_record(row: CapturePlanRow) -> PlanRecord:
    return PlanRecord(
        id=row.id,
        school_id=row.school_id,
        plan=CapturePlan.model_validate(row.document),
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


# --- the store -------------------------------------------------------------------------------


class ScheduleStore:
    def __init__(self, db: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self._db = db
        self._clock = clock

    # --- schools ------------------------------------------------------------------------------

    def schools(self) -> list[SchoolRecord]:
        """Every school, by name."""
        with self._db.session(readonly=True) as session:
            rows = session.scalars(select(SchoolRow).order_by(SchoolRow.name))
            return [_school_record(row) for row in rows]

    def school(self, school_id: int) -> SchoolRecord:
        with self._db.session(readonly=True) as session:
            return _school_record(_school_row(session, school_id))

    def create_school(self, school: School) -> SchoolRecord:
        """Stores a new school. Without rooms, its rooms are the enrolled units that name it
        as their school (room name = the unit's room), except units already in a room."""
        school = _checked(school)
        now = self._clock()
        try:
            with self._db.session() as session:
                _check_name(session, school.name, None)
                if not school.rooms:
                    school = _rooms_from_units(session, school)
                _check_units(session, school, None, None)
                row = SchoolRow(
                    name=school.name, document=_document(school), created_at=now, updated_at=now
                )
                session.add(row)
                session.flush()
                _align_units(session, school)
                record = _school_record(row)
        except IntegrityError:
            raise ScheduleConflict(f"a school named {school.name!r} exists") from None
        log.info(
            "school created id=%d school=%s rooms=%d", record.id, school.name, len(school.rooms)
        )
        return record

    def update_school(self, school_id: int, edit: Callable[[School], School]) -> SchoolRecord:
        """Applies ``edit`` to the stored school under its row lock. ``edit`` raises
        ScheduleError, ScheduleConflict or ScheduleNotFound to refuse; the result is refused
        when a plan would no longer fit it, a unit is in a room elsewhere or unknown."""
        now = self._clock()
        try:
            with self._db.session() as session:
                row = _school_row(session, school_id, lock=True)
                current = School.model_validate(row.document)
                try:
                    school = _checked(edit(current))
                except ValidationError as exc:
                    raise ScheduleError(validation_reason(exc)) from None
                renamed = school.name != current.name
                if renamed:
                    _check_name(session, school.name, school_id)
                plans = session.scalars(
                    select(CapturePlanRow).where(CapturePlanRow.school_id == school_id)
                ).all()
                _check_plans_fit(school, plans)
                _check_units(session, school, current, school_id)
                row.name = school.name
                row.document = _document(school)
                row.updated_at = now
                if renamed:
                    for plan in plans:
                        plan.document = {**plan.document, "school": school.name}
                        plan.updated_at = now
                _align_units(session, school)
                record = _school_record(row)
        except IntegrityError:
            raise ScheduleConflict(f"a school named {school.name!r} exists") from None
        log.info("school updated id=%d school=%s", school_id, school.name)
        return record

    def delete_school(self, school_id: int) -> None:
        """Deletes a school without plans (its capture windows go with it)."""
        with self._db.session() as session:
            row = _school_row(session, school_id, lock=True)
            plans = session.scalar(
                select(func.count())
                .select_from(CapturePlanRow)
                .where(CapturePlanRow.school_id == school_id)
            )
            if plans:
                raise ScheduleConflict(f"{row.name!r} still has {plans} plan(s); delete them first")
            name = row.name
            session.delete(row)
        log.info("school deleted id=%d school=%s", school_id, name)

    def school_ids_for_device(self, device_id: str) -> list[int]:
        """The schools with a room assigned to the unit (at most one, by the store's rules)."""
        with self._db.session(readonly=True) as session:
            return sorted(
                school_id
                for device, (school_id, _, _) in _owners(session, None).items()
                if device == device_id
            )

    # --- plans --------------------------------------------------------------------------------

    def plans(self, school_id: int | None = None) -> list[PlanRecord]:
        """The plans of one school (None: of all), by school and name."""
        query = select(CapturePlanRow).order_by(CapturePlanRow.school_id, CapturePlanRow.name)
        with self._db.session(readonly=True) as session:
            if school_id is not None:
                _school_row(session, school_id)
                query = query.where(CapturePlanRow.school_id == school_id)
            return [_plan_record(row) for row in session.scalars(query)]

    def plan(self, plan_id: int) -> PlanRecord:
        with self._db.session(readonly=True) as session:
            return _plan_record(_plan_row(session, plan_id))

    def create_plan(self, school_id: int, plan: CapturePlan, created_by: str | None) -> PlanRecord:
        """Stores a plan of the school; ``plan.school`` is set to the school's name."""
        now = self._clock()
        try:
            with self._db.session() as session:
                # The school's lock keeps an edit of it from slipping in between the checks.
                school = School.model_validate(_school_row(session, school_id, lock=True).document)
                plan = _fitted(school, plan)
                _check_plan_name(session, school_id, plan.name, None)
                row = CapturePlanRow(
                    school_id=school_id,
                    name=plan.name,
                    document=_document(plan),
                    created_by=created_by,
                    created_at=now,
                    updated_at=now,
                )
                session.add(row)
                session.flush()
                record = _plan_record(row)
        except IntegrityError:
            raise ScheduleConflict(f"a plan named {plan.name!r} exists") from None
        log.info("plan created id=%d plan=%s school=%s", record.id, plan.name, plan.school)
        return record

    def update_plan(self, plan_id: int, plan: CapturePlan) -> PlanRecord:
        """Replaces the plan; it stays in its school (``plan.school`` is overwritten)."""
        now = self._clock()
        try:
            with self._db.session() as session:
                row = _plan_row(session, plan_id, lock=True)
                school = School.model_validate(
                    _school_row(session, row.school_id, lock=True).document
                )
                plan = _fitted(school, plan)
                _check_plan_name(session, row.school_id, plan.name, plan_id)
                row.name = plan.name
                row.document = _document(plan)
                row.updated_at = now
                record = _plan_record(row)
        except IntegrityError:
            raise ScheduleConflict(f"a plan named {plan.name!r} exists") from None
        log.info("plan updated id=%d plan=%s school=%s", plan_id, plan.name, plan.school)
        return record

    def delete_plan(self, plan_id: int) -> None:
        with self._db.session() as session:
            removed = affected(
                session.execute(delete(CapturePlanRow).where(CapturePlanRow.id == plan_id))
            )
        if not removed:
            raise ScheduleNotFound(f"no plan {plan_id}")
        log.info("plan deleted id=%d", plan_id)


# --- checks inside a transaction ---------------------------------------------------------------


def _school_row(session: Session, school_id: int, *, lock: bool = False) -> SchoolRow:
    row = session.get(SchoolRow, school_id, with_for_update=lock)
    if row is None:
        raise ScheduleNotFound(f"no school {school_id}")
    return row


def _plan_row(session: Session, plan_id: int, *, lock: bool = False) -> CapturePlanRow:
    row = session.get(CapturePlanRow, plan_id, with_for_update=lock)
    if row is None:
        raise ScheduleNotFound(f"no plan {plan_id}")
    return row


def _check_name(session: Session, name: str, own_id: int | None) -> None:
    """Names are unique, and so are their slugs: window ids start with the school's slug."""
    for other_id, other in session.execute(select(SchoolRow.id, SchoolRow.name)):
        if other_id == own_id:
            continue
        if other == name:
            raise ScheduleConflict(f"a school named {name!r} exists")
        if slug(other) == slug(name):
            raise ScheduleConflict(
                f"school name {name!r} is too close to {other!r} "
                f"(both are {slug(name)!r} in window ids)"
            )


def _check_plan_name(session: Session, school_id: int, name: str, own_id: int | None) -> None:
    query = select(CapturePlanRow.id).where(
        CapturePlanRow.school_id == school_id, CapturePlanRow.name == name
    )
    if own_id is not None:
        query = query.where(CapturePlanRow.id != own_id)
    if session.scalar(query) is not None:
        raise ScheduleConflict(f"the school already has a plan named {name!r}")


def _check_plans_fit(school: School, plans: Iterable[CapturePlanRow]) -> None:
    for row in plans:
        plan = CapturePlan.model_validate(row.document)
        problems = plan_problems(school, plan)
        if problems:
            raise ScheduleConflict(
                f"plan {plan.name!r} would no longer fit ({'; '.join(problems)}); "
                "edit or delete the plan first"
            )


def _owners(session: Session, exclude_id: int | None) -> dict[str, tuple[int, str, str]]:
    """Every assigned unit -> (school id, school name, room), read straight from the
    documents (validating each whole school would be wasted work here)."""
    owners: dict[str, tuple[int, str, str]] = {}
    for school_id, name, document in session.execute(
        select(SchoolRow.id, SchoolRow.name, SchoolRow.document)
    ):
        if school_id == exclude_id:
            continue
        for room in document.get("rooms", []):
            if room.get("device_id"):
                owners[room["device_id"]] = (school_id, name, room["name"])
    return owners


def _check_units(
    session: Session, school: School, previous: School | None, school_id: int | None
) -> None:
    """Newly assigned units must be enrolled; no unit may be in a room of another school."""
    assigned = {r.device_id: r.name for r in school.rooms if r.device_id is not None}
    if not assigned:
        return
    # Locking the units first makes a second school claiming one of them wait, then see ours.
    found = set(
        session.scalars(select(Device.id).where(Device.id.in_(sorted(assigned))).with_for_update())
    )
    before = {r.device_id for r in previous.rooms} if previous is not None else set()
    unknown = sorted(set(assigned) - found - before)
    if unknown:
        raise ScheduleError(f"unknown unit(s): {', '.join(repr(d) for d in unknown)}")
    owners = _owners(session, school_id)
    for device_id in sorted(assigned):
        if device_id in owners:
            _, other_school, other_room = owners[device_id]
            raise ScheduleConflict(
                f"unit {device_id!r} is already in room {other_room!r} of {other_school!r}"
            )


def _rooms_from_units(session: Session, school: School) -> School:
    taken = _owners(session, None)
    rooms: list[Room] = []
    seen: set[str] = set()
    devices = session.scalars(
        select(Device).where(Device.school == school.name).order_by(Device.room, Device.id)
    )
    for device in devices:
        try:
            room: Room | None = Room(name=device.room, device_id=device.id)
        except ValidationError:
            room = None
        key = slug(device.room)
        if room is None or device.id in taken or not key or key in seen:
            log.warning(
                "unit not given a room device=%s school=%s room=%s",
                device.id,
                school.name,
                device.room,
            )
            continue
        seen.add(key)
        rooms.append(room)
    return revalidated(school, rooms=rooms)


def _align_units(session: Session, school: School) -> None:
    """Copies each assigned room onto its unit's school/room columns."""
    rooms = {r.device_id: r.name for r in school.rooms if r.device_id is not None}
    if not rooms:
        return
    for device in session.scalars(select(Device).where(Device.id.in_(sorted(rooms)))):
        room = rooms[device.id]
        if (device.school, device.room) != (school.name, room):
            device.school, device.room = school.name, room
            log.info("unit placed device=%s school=%s room=%s", device.id, school.name, room)
