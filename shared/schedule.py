"""Schools, bell schedules, calendars and capture plans, and their expansion into the capture
windows each unit runs.

Pure: no I/O and no clock. The controller stores these models and pushes the
resulting windows to units as ``CaptureWindow``s in their desired state; a unit
never sees a bell schedule. Bell times are wall-clock times in the school's own
timezone, so a period at 08:15 is at 08:15 local on both sides of a
daylight-saving change. A local time the clocks skip (02:30 on a spring-forward
night) is taken as the same time after the jump; a repeated one (01:30 on a
fall-back night) as its first occurrence.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from shared.messages import CaptureWindow

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=60)]
# Rolls longer than this would swallow neighbouring lessons.
MAX_ROLL_S = 1800
# ISO weekdays: Monday is 1.
SCHOOL_WEEK = (1, 2, 3, 4, 5)


def slug(name: str) -> str:
    """The name as it appears in window ids: lowercase letters, digits and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _unique_slugs(names: Iterable[str], what: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        key = slug(name)
        if not key:
            raise ValueError(f"{what} {name!r} needs at least one letter or digit")
        if key in seen:
            raise ValueError(f"{what}s {seen[key]!r} and {name!r} are the same name")
        seen[key] = name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Period(_Model):
    """A named span of a school day, e.g. "Period 2" from 08:55 to 09:45."""

    name: Name
    start: time
    end: time

    @model_validator(mode="after")
    def _ordered(self) -> Period:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("period times are local wall-clock times without a zone")
        if self.end <= self.start:
            raise ValueError(f"period {self.name!r} must end after it starts")
        return self


class BellSchedule(_Model):
    """The periods of one kind of day; periods never overlap and are kept in time order."""

    name: Name
    periods: Annotated[list[Period], Field(min_length=1, max_length=30)]

    @field_validator("periods")
    @classmethod
    def _sorted_apart(cls, periods: list[Period]) -> list[Period]:
        _unique_slugs((p.name for p in periods), "period")
        ordered = sorted(periods, key=lambda p: p.start)
        for earlier, later in pairwise(ordered):
            if later.start < earlier.end:
                raise ValueError(f"periods {earlier.name!r} and {later.name!r} overlap")
        return ordered


class DayType(_Model):
    """A kind of school day ("Regular", "Early release") and the bell schedule it follows."""

    name: Name
    bell_schedule: Name


class CalendarDay(_Model):
    """One date that differs from the term's pattern: a holiday, another day type, a set
    rotation day, or a school day on a weekday that normally has none."""

    date: date
    holiday: bool = False
    day_type: Name | None = None
    rotation: Name | None = None
    note: Annotated[str, StringConstraints(max_length=200)] = ""

    @model_validator(mode="after")
    def _holiday_alone(self) -> CalendarDay:
        if self.holiday and (self.day_type or self.rotation):
            raise ValueError(f"{self.date}: a holiday has no day type or rotation day")
        if not (self.holiday or self.day_type or self.rotation):
            raise ValueError(f"{self.date}: say holiday, a day type or a rotation day")
        return self


class SchoolCalendar(_Model):
    """The term: its dates, the weekdays it has school, the usual day type, the A/B
    rotation (advancing one step each school day) and the dates that differ."""

    first_day: date
    last_day: date
    weekdays: Annotated[list[Annotated[int, Field(ge=1, le=7)]], Field(min_length=1)] = list(
        SCHOOL_WEEK
    )
    default_day_type: Name
    rotation: Annotated[list[Name], Field(max_length=10)] = Field(default_factory=list)
    days: Annotated[list[CalendarDay], Field(max_length=1000)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> SchoolCalendar:
        if self.last_day < self.first_day:
            raise ValueError("the term's last day is before its first")
        if self.last_day - self.first_day > timedelta(days=400):
            raise ValueError("a term spans at most 400 days")
        if len(set(self.rotation)) != len(self.rotation):
            raise ValueError("rotation days must differ")
        seen: set[date] = set()
        for day in self.days:
            if day.date in seen:
                raise ValueError(f"{day.date} is listed twice")
            seen.add(day.date)
            if not self.first_day <= day.date <= self.last_day:
                raise ValueError(f"{day.date} is outside the term")
            if day.rotation and day.rotation not in self.rotation:
                raise ValueError(
                    f"{day.date}: rotation day {day.rotation!r} is not in the rotation"
                )
        return self


class Room(_Model):
    name: Name
    device_id: str | None = None


class School(_Model):
    """Everything about one school that decides when its rooms record."""

    name: Name
    timezone: str
    bell_schedules: list[BellSchedule] = Field(default_factory=list)
    day_types: list[DayType] = Field(default_factory=list)
    calendar: SchoolCalendar | None = None
    rooms: list[Room] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown timezone {value!r} (use an IANA name such as America/New_York)"
            ) from None
        return value

    @model_validator(mode="after")
    def _references(self) -> School:
        _unique_slugs((b.name for b in self.bell_schedules), "bell schedule")
        _unique_slugs((d.name for d in self.day_types), "day type")
        _unique_slugs((r.name for r in self.rooms), "room")
        schedules = {b.name for b in self.bell_schedules}
        for day_type in self.day_types:
            if day_type.bell_schedule not in schedules:
                raise ValueError(
                    f"day type {day_type.name!r} uses unknown bell schedule "
                    f"{day_type.bell_schedule!r}"
                )
        devices = [r.device_id for r in self.rooms if r.device_id is not None]
        if len(set(devices)) != len(devices):
            raise ValueError("a unit can be assigned to one room only")
        if self.calendar is not None:
            types = {d.name for d in self.day_types}
            used = {self.calendar.default_day_type} | {
                d.day_type for d in self.calendar.days if d.day_type
            }
            missing = sorted(used - types)
            if missing:
                raise ValueError(f"the calendar uses unknown day type {missing[0]!r}")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class CapturePlan(_Model):
    """ "Record these rooms in these periods on school days from this date to that one."""

    name: Name
    school: Name
    rooms: Annotated[list[Name], Field(min_length=1, max_length=500)]
    periods: Annotated[list[Name], Field(min_length=1, max_length=30)]
    first_day: date
    last_day: date
    # Empty: every school day; otherwise only days of these rotation labels (e.g. ["A"]).
    rotation_days: list[Name] = Field(default_factory=list)
    pre_roll_s: int = Field(default=0, ge=0, le=MAX_ROLL_S)
    post_roll_s: int = Field(default=0, ge=0, le=MAX_ROLL_S)
    teacher: Annotated[str, StringConstraints(strip_whitespace=True, max_length=120)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> CapturePlan:
        if self.last_day < self.first_day:
            raise ValueError("the plan's last day is before its first")
        return self


@dataclass(frozen=True, slots=True)
class SchoolDay:
    date: date
    day_type: str
    bell_schedule: BellSchedule
    rotation: str | None


@dataclass(slots=True)
class PlannedWindow:
    """One capture the expansion produced: a room, a date and a period, in UTC."""

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
    plans: list[str] = field(default_factory=list)

    def capture_window(self) -> CaptureWindow:
        return CaptureWindow(
            window_id=self.window_id, start=self.start, end=self.end, title=self.title
        )


def window_id(school: str, room: str, day: date, period: str) -> str:
    """Stable across edits, so a moved lesson replaces its old window rather than adding one."""
    return f"{slug(school)}.{slug(room)}.{day:%Y%m%d}.{slug(period)}"


def local_to_utc(day: date, at: time, zone: ZoneInfo) -> datetime:
    # fold=0: a skipped time maps past the jump, a repeated one to its first occurrence.
    return datetime.combine(day, at, tzinfo=zone).astimezone(UTC)


def school_days(school: School, first: date, last: date) -> Iterator[SchoolDay]:
    """The school days between ``first`` and ``last`` (inclusive) with their day type, bell
    schedule and rotation label. The rotation counts from the term's first day, so it does
    not depend on ``first``."""
    calendar = school.calendar
    if calendar is None:
        return
    types = {d.name: d for d in school.day_types}
    schedules = {b.name: b for b in school.bell_schedules}
    exceptions = {d.date: d for d in calendar.days}
    weekdays = set(calendar.weekdays)
    step = -1
    day = calendar.first_day
    end = min(last, calendar.last_day)
    while day <= end:
        exception = exceptions.get(day)
        is_school_day = (day.isoweekday() in weekdays or exception is not None) and not (
            exception is not None and exception.holiday
        )
        if is_school_day:
            rotation: str | None = None
            if calendar.rotation:
                if exception is not None and exception.rotation:
                    step = calendar.rotation.index(exception.rotation)
                else:
                    step = (step + 1) % len(calendar.rotation)
                rotation = calendar.rotation[step]
            if day >= first:
                type_name = (exception.day_type if exception else None) or calendar.default_day_type
                day_type = types[type_name]
                yield SchoolDay(day, type_name, schedules[day_type.bell_schedule], rotation)
        day += timedelta(days=1)


def expand(
    school: School, plans: Sequence[CapturePlan], first: date, last: date
) -> list[PlannedWindow]:
    """Every capture window of ``school``'s rooms between ``first`` and ``last`` (inclusive
    local dates), ordered by room then start. Plans naming the same room, date and period
    give one window with the longest rolls; where rolls would make one room's windows
    overlap they meet halfway between the two periods instead."""
    rooms = {r.name: r for r in school.rooms}
    own = [p for p in plans if p.school == school.name]
    if not own:
        return []
    zone = school.zone
    wanted_periods = {name for p in own for name in p.periods}
    by_key: dict[tuple[str, date, str], PlannedWindow] = {}
    nominal: dict[tuple[str, date, str], tuple[datetime, datetime]] = {}
    for day in school_days(school, first, last):
        # One conversion per date and period, shared by every room.
        times = {
            p.name: (local_to_utc(day.date, p.start, zone), local_to_utc(day.date, p.end, zone))
            for p in day.bell_schedule.periods
            if p.name in wanted_periods
        }
        for plan in own:
            if not plan.first_day <= day.date <= plan.last_day:
                continue
            if plan.rotation_days and day.rotation not in plan.rotation_days:
                continue
            pre = timedelta(seconds=plan.pre_roll_s)
            post = timedelta(seconds=plan.post_roll_s)
            for period in plan.periods:
                span = times.get(period)
                if span is None:
                    continue
                start, end = span[0] - pre, span[1] + post
                for room_name in plan.rooms:
                    room = rooms.get(room_name)
                    if room is None:
                        continue
                    key = (room_name, day.date, period)
                    found = by_key.get(key)
                    if found is None:
                        by_key[key] = PlannedWindow(
                            window_id=window_id(school.name, room_name, day.date, period),
                            school=school.name,
                            room=room_name,
                            device_id=room.device_id,
                            date=day.date,
                            period=period,
                            start=start,
                            end=end,
                            title=f"{school.name} · {room_name} · {day.date:%Y-%m-%d} · {period}",
                            teacher=plan.teacher,
                            plans=[plan.name],
                        )
                        nominal[key] = span
                    else:
                        found.start = min(found.start, start)
                        found.end = max(found.end, end)
                        found.teacher = found.teacher or plan.teacher
                        found.plans.append(plan.name)
    return _separate(by_key, nominal)


def _separate(
    by_key: dict[tuple[str, date, str], PlannedWindow],
    nominal: dict[tuple[str, date, str], tuple[datetime, datetime]],
) -> list[PlannedWindow]:
    per_room: dict[str, list[tuple[PlannedWindow, tuple[datetime, datetime]]]] = defaultdict(list)
    for key, window in by_key.items():
        per_room[key[0]].append((window, nominal[key]))
    result: list[PlannedWindow] = []
    for room in sorted(per_room):
        entries = sorted(per_room[room], key=lambda e: e[1][0])
        for (earlier, span_a), (later, span_b) in pairwise(entries):
            if earlier.end > later.start:
                # Periods never overlap, so the halfway point keeps both lessons whole.
                meet = span_a[1] + (span_b[0] - span_a[1]) / 2
                earlier.end = meet
                later.start = meet
        result.extend(window for window, _ in entries)
    return result


def unit_windows(windows: Iterable[PlannedWindow]) -> dict[str, list[CaptureWindow]]:
    """The capture windows of each assigned unit, in start order."""
    per_unit: dict[str, list[PlannedWindow]] = defaultdict(list)
    for window in windows:
        if window.device_id is not None:
            per_unit[window.device_id].append(window)
    return {
        device_id: [w.capture_window() for w in sorted(found, key=lambda w: w.start)]
        for device_id, found in per_unit.items()
    }
