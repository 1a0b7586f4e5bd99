"""Schools, bell schedules, calendars and capture plans, and their expansion into the capture
windows each unit runs.

Pure: no I/O and no clock. The controller stores these models and pushes the
resulting windows to units as ``CaptureWindow``s in their desired state; a unit
never sees a bell schedule. Bell times are wall-clock times in the school's own
timezone, so a period at 08:15 is at 08:15 local on both sides of a
daylight-saving change. A local time the clocks skip (02:30 on a spring-forward
night) is taken as the moment of the jump, so a period inside the skipped hour
has no window; a repeated one (01:30 on a fall-back night) as its first
occurrence.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from collections.abc import Container, Iterable, Iterator, Sequence
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

log = logging.getLogger(__name__)

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=60)]
# Rolls longer than this would swallow neighbouring lessons.
MAX_ROLL_S = 1800
# A period's start and end in UTC.
Span = tuple[datetime, datetime]
# ISO weekdays: Monday is 1.
SCHOOL_WEEK = (1, 2, 3, 4, 5)
# Three parts of this length, a date and three dots stay within a window id's 128 characters.
ID_PART_MAX = 36


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
    return _id_head(school, room) + _id_day(day) + _id_part(period)


# An id in pieces, so that a term's expansion makes each piece once per room, per day and
# per period rather than once per window.
def _id_head(school: str, room: str) -> str:
    return f"{_id_part(school)}.{_id_part(room)}."


def _id_day(day: date) -> str:
    return f"{day:%Y%m%d}."


def _id_part(name: str) -> str:
    # A long slug keeps its start and gets a digest of the whole, so it stays distinct.
    key = slug(name)
    if len(key) <= ID_PART_MAX:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{key[: ID_PART_MAX - 9].rstrip('-')}-{digest}"


def local_to_utc(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The instant ``zone``'s clocks read ``at`` on ``day``: the first of two on a fall-back
    night, the moment of the jump for a time a spring-forward night skips. Later wall-clock
    times therefore never map to earlier instants, so periods that do not overlap locally
    do not overlap in UTC either."""
    local = datetime.combine(day, at, tzinfo=zone)  # fold=0: the first occurrence
    instant = local.astimezone(UTC)
    new_offset = instant.astimezone(zone).utcoffset()
    if new_offset == local.utcoffset():
        return instant
    # Skipped: fold=0 read it with the offset before the jump and fold=1 with the one after,
    # so the jump lies between the two readings; find its second.
    before = int(local.replace(fold=1).timestamp())
    after = int(instant.timestamp())
    while after - before > 1:
        middle = (before + after) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == new_offset:
            after = middle
        else:
            before = middle
    return datetime.fromtimestamp(after, UTC)


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
    give one window with the longest rolls. Where rolls would make one room's windows
    overlap, the two meet as near halfway between the periods as their rolls reach, so
    neither grows past what its plans asked for."""
    own = [
        _Rolled(p, timedelta(seconds=p.pre_roll_s), timedelta(seconds=p.post_roll_s))
        for p in plans
        if p.school == school.name
    ]
    if not own:
        return []
    # Id pieces made once: each room's with the room, each period's by its name.
    rooms = {r.name: (r, _id_head(school.name, r.name)) for r in school.rooms}
    wanted = {name: _id_part(name) for p in own for name in p.plan.periods}
    per_room: dict[str, list[PlannedWindow]] = defaultdict(list)
    # Each room's latest window and its period's own span. Days come in order, a day's
    # periods too, and later local times are never earlier instants, so a room's windows
    # arrive in time order and each is trimmed against the one before it only.
    latest: dict[str, tuple[PlannedWindow, Span]] = {}
    for day in school_days(school, first, last):
        spans = _period_spans(school.name, day, wanted, school.zone)
        day_part = _id_day(day.date)
        tails = {period: day_part + wanted[period] for period in spans}
        lessons = _day_windows(school, day, spans=spans, tails=tails, plans=own, rooms=rooms)
        for period, windows in lessons.items():
            span = spans[period]
            for room, window in windows.items():
                previous = latest.get(room)
                if previous is not None and previous[0].end > window.start:
                    _meet(previous, (window, span))
                latest[room] = (window, span)
                per_room[room].append(window)
    return [window for room in sorted(per_room) for window in per_room[room]]


@dataclass(frozen=True, slots=True)
class _Rolled:
    plan: CapturePlan
    pre: timedelta
    post: timedelta


def _period_spans(
    school: str, day: SchoolDay, wanted: Container[str], zone: ZoneInfo
) -> dict[str, Span]:
    """The UTC span of each wanted period of ``day``, in time order; one conversion per
    date and period, shared by every room."""
    spans: dict[str, Span] = {}
    for period in day.bell_schedule.periods:
        if period.name not in wanted:
            continue
        start = local_to_utc(day.date, period.start, zone)
        end = local_to_utc(day.date, period.end, zone)
        if end > start:
            spans[period.name] = (start, end)
        else:
            log.info(
                "period skipped by the clocks school=%r date=%s period=%r",
                school,
                day.date,
                period.name,
            )
    return spans


def _day_windows(
    school: School,
    day: SchoolDay,
    *,
    spans: dict[str, Span],
    tails: dict[str, str],
    plans: list[_Rolled],
    rooms: dict[str, tuple[Room, str]],
) -> dict[str, dict[str, PlannedWindow]]:
    """Period (in time order), then room, to the one window the day's plans make of it."""
    stamp = day.date.isoformat()
    lessons: dict[str, dict[str, PlannedWindow]] = {period: {} for period in spans}
    for rolled in plans:
        plan = rolled.plan
        if not plan.first_day <= day.date <= plan.last_day:
            continue
        if plan.rotation_days and day.rotation not in plan.rotation_days:
            continue
        for period in plan.periods:
            windows = lessons.get(period)
            if windows is None:
                continue
            start, end = spans[period][0] - rolled.pre, spans[period][1] + rolled.post
            for room_name in plan.rooms:
                found = windows.get(room_name)
                if found is not None:
                    found.start = min(found.start, start)
                    found.end = max(found.end, end)
                    found.teacher = found.teacher or plan.teacher
                    found.plans.append(plan.name)
                    continue
                known = rooms.get(room_name)
                if known is None:
                    continue
                room, head = known
                # Positional, in field order: a term makes hundreds of thousands of these.
                windows[room_name] = PlannedWindow(
                    head + tails[period],
                    school.name,
                    room_name,
                    room.device_id,
                    day.date,
                    period,
                    start,
                    end,
                    f"{school.name} · {room_name} · {stamp} · {period}",
                    plan.teacher,
                    [plan.name],
                )
    return lessons


def _meet(earlier: tuple[PlannedWindow, Span], later: tuple[PlannedWindow, Span]) -> None:
    """Ends one window where the next begins, as near halfway between their periods as the
    rolls reach; periods never overlap, so any point between them keeps both whole."""
    (first, (_, first_end)), (second, (second_start, _)) = earlier, later
    halfway = first_end + (second_start - first_end) / 2
    meet = min(max(halfway, second.start), first.end)
    first.end = meet
    second.start = meet


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
