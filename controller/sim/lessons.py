"""The simulated school day: the scenario's periods (seconds from the run's start) become a
bell schedule in the school's timezone, created with its plans through the scheduling
REST API, as a district's staff would, so units get their capture windows the normal way."""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from controller.sim import procs
from controller.sim.api import ControllerApi
from controller.sim.scenario import Scenario
from shared.schedule import BellSchedule, DayType, Period, Room, School, SchoolCalendar

log = logging.getLogger(__name__)

DAY = "Simulated day"
_APPLIED_WAIT_S = 60.0


class LessonError(ValueError):
    """The scenario's lessons cannot be placed in the school's day; the message says why."""


def auto_zone(at: datetime) -> str:
    """A fixed-offset zone in which ``at`` falls between 09:00 and 10:00 local time."""
    shift = 9 - at.hour
    if shift < -12:
        shift += 24
    # Etc/GMT names count the other way: Etc/GMT-3 is three hours ahead of UTC.
    return "UTC" if shift == 0 else f"Etc/GMT{-shift:+d}"


def build_school(scenario: Scenario, rooms: dict[str, str], t0: datetime) -> School:
    """The school document: one simulated day (t0's local date) whose bell schedule holds the
    scenario's periods; ``rooms`` maps each unit to its room."""
    spec = scenario.school
    zone_name = auto_zone(t0) if spec.timezone == "auto" else spec.timezone
    zone = ZoneInfo(zone_name)
    day = t0.astimezone(zone).date()
    periods = []
    for period in spec.periods:
        start = (t0 + timedelta(seconds=round(period.start_s))).astimezone(zone)
        end = (t0 + timedelta(seconds=round(period.end_s))).astimezone(zone)
        if start.date() != day or end.date() != day:
            raise LessonError(
                f"period {period.name!r} falls outside {day} in {zone_name}: "
                'the run crosses local midnight; use timezone = "auto"'
            )
        periods.append(Period(name=period.name, start=start.time(), end=end.time()))
    return School(
        name=spec.name,
        timezone=zone_name,
        bell_schedules=[BellSchedule(name=DAY, periods=periods)],
        day_types=[DayType(name=DAY, bell_schedule=DAY)],
        calendar=SchoolCalendar(
            first_day=day, last_day=day, weekdays=list(range(1, 8)), default_day_type=DAY
        ),
        rooms=[Room(name=room, device_id=device) for device, room in rooms.items()],
    )


def create(api: ControllerApi, scenario: Scenario, rooms: dict[str, str], t0: datetime) -> int:
    """Creates the school and its plans; returns how many units were given lessons, once
    each of them runs the new schedule (or the wait ran out)."""
    school = build_school(scenario, rooms, t0)
    created = api.call("POST", "/scheduling/schools", school.model_dump(mode="json"))
    day: date = school.calendar.first_day if school.calendar else t0.date()
    planned: set[str] = set()
    for plan in scenario.school.plans:
        units = scenario.plan_units(plan)
        planned.update(units)
        body = {
            "school_id": created["id"],
            "name": plan.name,
            "rooms": [rooms[u] for u in units],
            "periods": plan.periods,
            "first_day": day.isoformat(),
            "last_day": day.isoformat(),
            "teacher": plan.teacher,
        }
        api.call("POST", "/scheduling/plans", body)
    log.info(
        "lessons created school=%r timezone=%s periods=%d plans=%d units=%d",
        school.name,
        school.timezone,
        len(scenario.school.periods),
        len(scenario.school.plans),
        len(planned),
    )

    def applied() -> bool:
        devices = {d["id"]: d for d in api.pages("/devices")}
        return all(
            devices[u]["desired_version"] > 0
            and devices[u]["reported_version"] >= devices[u]["desired_version"]
            for u in planned
        )

    if not procs.wait_for(applied, _APPLIED_WAIT_S, 1.0):
        log.warning("not every unit runs its schedule after %.0f s", _APPLIED_WAIT_S)
    return len(planned)
