"""Bell schedules and school calendars from CSV and iCalendar files.

Pure: each import takes the school as it is and returns a new, fully validated
``School``, or raises ``ImportProblem`` with the first bad line and why. Nothing
is half-imported; the caller stores the result. The formats are described for
IT staff in docs/schedules.md.

District calendar feeds carry many events that are neither holidays nor school
days (concerts, board meetings), so the calendar iCalendar import skips what it
does not recognise and lists it, while a file that is not well-formed fails.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any, ParamSpec, TypeVar

from pydantic import ValidationError

from controller import ical
from shared.schedule import (
    BellSchedule,
    CalendarDay,
    Period,
    School,
    SchoolCalendar,
    slug,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

MAX_IMPORT_BYTES = 2 * 1024 * 1024
MAX_PERIODS = 30
MAX_NAME = 60
MAX_NOTE = 200
HOLIDAY_CELLS = ("holiday", "no school")
# Whole words only, so "Breakfast with Santa" is not a break.
HOLIDAY_WORDS = re.compile(r"\b(holidays?|no school|closed|break|recess|vacation)\b", re.I)

_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class ImportProblem(ValueError):
    """Why a file was refused; ``line`` is its first bad line when there is one."""

    def __init__(self, line: int | None, reason: str) -> None:
        super().__init__(f"line {line}: {reason}" if line is not None else reason)
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Skipped:
    """An iCalendar event deliberately not imported, and why."""

    line: int
    summary: str
    reason: str


@dataclass(frozen=True)
class CalendarImport:
    school: School
    days: int  # exception days in the imported calendar
    skipped: list[Skipped]


def decode_upload(data: bytes) -> str:
    """An uploaded file's text: at most ``MAX_IMPORT_BYTES``, UTF-8 with or without a BOM."""
    _check_size(len(data))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ImportProblem(line, "the file is not UTF-8 text") from None


def _reporting_ical_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Reports the reader's ``ical.ICalError`` as an ``ImportProblem`` with the same line."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except ical.ICalError as exc:
            raise ImportProblem(exc.line, exc.reason) from None

    return wrapper


# -- bell schedules ------------------------------------------------------------------------


def import_bell_schedules_csv(school: School, text: str) -> School:
    """``schedule,period,start,end`` rows; each schedule named in the file replaces the
    school's schedule of that name (or is added), the others are kept."""
    builders: dict[str, _ScheduleBuilder] = {}
    for line, row in _csv_rows(_checked(text), ("schedule", "period", "start", "end"), ()):
        name = _name(line, row["schedule"], "schedule name")
        builder = builders.setdefault(slug(name), _ScheduleBuilder(name))
        period = _period(
            line,
            _name(line, row["period"], "period name"),
            _time(line, row["start"], "start"),
            _time(line, row["end"], "end"),
        )
        builder.add(line, period)
    if not builders:
        raise ImportProblem(None, "the file has no bell schedule rows")
    result = _with_schedules(school, [b.build() for b in builders.values()])
    log.info(
        "bell schedules imported school=%r format=csv schedules=%d", school.name, len(builders)
    )
    return result


@_reporting_ical_errors
def import_bell_schedule_ics(school: School, text: str, name: str) -> School:
    """One bell schedule called ``name`` from timed events on a single date: each event's
    SUMMARY is a period, its times are read as the school's wall-clock times."""
    name = _name(None, name, "schedule name")
    calendar = ical.parse(_checked(text))
    zone = school.zone
    builder = _ScheduleBuilder(name)
    first_date: date | None = None
    for event in calendar.children("VEVENT"):
        start_prop = _required(event, "DTSTART")
        start = ical.when(start_prop, calendar)
        end_prop, end = _end(event, calendar, start_prop, start)
        if not isinstance(start, datetime) or not isinstance(end, datetime):
            raise ImportProblem(
                start_prop.line, "an all-day event; a bell schedule needs start and end times"
            )
        local_start = start.astimezone(zone) if start.tzinfo else start
        local_end = end.astimezone(zone) if end.tzinfo else end
        first_date = first_date or local_start.date()
        if local_start.date() != first_date:
            raise ImportProblem(
                start_prop.line,
                f"starts on {local_start.date()}, but the first event is on {first_date}: "
                "put all periods on one date",
            )
        if local_end.date() != first_date:
            raise ImportProblem(end_prop.line, "ends on another day than it starts")
        summary = event.single("SUMMARY")
        if summary is None:
            raise ImportProblem(event.line, "an event without SUMMARY (the period name)")
        period = _period(
            start_prop.line,
            _name(summary.line, summary.text(), "period name"),
            local_start.time(),
            local_end.time(),
        )
        builder.add(start_prop.line, period)
    if not builder.periods:
        raise ImportProblem(None, "the file has no events")
    result = _with_schedules(school, [builder.build()])
    log.info("bell schedule imported school=%r format=ics schedule=%r", school.name, name)
    return result


@dataclass
class _ScheduleBuilder:
    """One schedule's periods with their lines, checked as each arrives so the first bad
    line in the file is the one reported."""

    name: str
    periods: list[tuple[int, Period]] = field(default_factory=list)

    def add(self, line: int, period: Period) -> None:
        if len(self.periods) == MAX_PERIODS:
            raise ImportProblem(line, f"schedule {self.name!r} has more than {MAX_PERIODS} periods")
        for other_line, other in self.periods:
            if slug(other.name) == slug(period.name):
                raise ImportProblem(
                    line, f"period {period.name!r} of {self.name!r} is also on line {other_line}"
                )
            if period.start < other.end and other.start < period.end:
                raise ImportProblem(
                    line,
                    f"period {period.name!r} ({_hhmm(period)}) overlaps {other.name!r} "
                    f"({_hhmm(other)}) on line {other_line}",
                )
        self.periods.append((line, period))

    def build(self) -> BellSchedule:
        return BellSchedule(name=self.name, periods=[p for _, p in self.periods])


def _with_schedules(school: School, schedules: Sequence[BellSchedule]) -> School:
    # Matched by slug and keeping the school's spelling, so day types naming it stay valid.
    incoming = {slug(s.name): s for s in schedules}
    kept = []
    for existing in school.bell_schedules:
        new = incoming.pop(slug(existing.name), None)
        kept.append(existing if new is None else new.model_copy(update={"name": existing.name}))
    return _revalidated(
        school, bell_schedules=[s.model_dump() for s in [*kept, *incoming.values()]]
    )


def _period(line: int, name: str, start: time, end: time) -> Period:
    if end <= start:
        raise ImportProblem(line, f"period {name!r} ends at {end} but starts at {start}")
    return _model(line, lambda: Period(name=name, start=start, end=end))


def _hhmm(period: Period) -> str:
    return f"{period.start:%H:%M}-{period.end:%H:%M}"


# -- calendars -----------------------------------------------------------------------------


def import_calendar_csv(school: School, text: str) -> CalendarImport:
    """``date,day_type,rotation,note[,end_date]`` rows replace the calendar's exception
    days; the term, its weekdays, default day type and rotation are kept."""
    calendar = _calendar_of(school)
    days = _DayCollector(school, calendar, merge=False)
    rows = _csv_rows(_checked(text), ("date",), ("day_type", "rotation", "note", "end_date"))
    for line, row in rows:
        first = _date(line, row["date"], "date")
        last = _date(line, row["end_date"], "end_date") if row.get("end_date") else first
        if last < first:
            raise ImportProblem(line, f"end_date {last} is before date {first}")
        for day in (first, last):
            if not calendar.first_day <= day <= calendar.last_day:
                raise ImportProblem(line, f"{day} is outside the term ({_term(calendar)})")
        cell = " ".join(row.get("day_type", "").split())
        holiday = cell.lower() in HOLIDAY_CELLS
        day_type = None if holiday or not cell else days.day_type(line, cell)
        rotation = days.rotation(line, row["rotation"]) if row.get("rotation") else None
        if holiday and rotation:
            raise ImportProblem(line, "a holiday has no rotation day")
        if not (holiday or day_type or rotation):
            raise ImportProblem(line, "say holiday, a day type or a rotation day")
        if rotation and last > first:
            raise ImportProblem(line, "a rotation day is one date; leave end_date empty")
        note = row.get("note", "")
        if len(note) > MAX_NOTE:
            raise ImportProblem(line, f"the note is longer than {MAX_NOTE} characters")
        for day in days.dates(first, last):
            days.add(day, line, _Mark(holiday=holiday, day_type=day_type, rotation=rotation), note)
    return days.result("csv")


@_reporting_ical_errors
def import_calendar_ics(school: School, text: str) -> CalendarImport:
    """All-day events that name a day type, a rotation day or a holiday replace the
    calendar's exception days; any other event is skipped and listed."""
    calendar = _calendar_of(school)
    parsed = ical.parse(_checked(text))
    days = _DayCollector(school, calendar, merge=True)
    for event in parsed.children("VEVENT"):
        found = _Event.read(event, parsed)
        skip = _skipper(days.skipped, found.line, found.title)
        if found.cancelled:
            skip("cancelled")
            continue
        if found.repeating:
            skip("a repeating event; list each date as its own event")
            continue
        if found.last is None:
            skip("has a time of day; only all-day events are read")
            continue
        mark = days.classify(found.texts)
        if mark is None:
            skip("not a holiday, day type or rotation day of this school")
            continue
        if found.last < calendar.first_day or found.first > calendar.last_day:
            skip(f"outside the term ({_term(calendar)})")
            continue
        if mark.rotation and found.last > found.first:
            skip("a rotation day is one date, this event spans several")
            continue
        first = max(found.first, calendar.first_day)
        dates = list(days.dates(first, min(found.last, calendar.last_day)))
        if not dates:
            skip("no school weekday in its dates")
            continue
        for day in dates:
            days.add(day, found.line, mark, found.summary)
    return days.result("ics")


@dataclass(frozen=True)
class _Event:
    """What the calendar import needs of one VEVENT."""

    line: int  # of its BEGIN:VEVENT
    first: date
    last: date | None  # inclusive; None for a timed event
    summary: str
    categories: list[str]
    cancelled: bool
    repeating: bool

    @property
    def texts(self) -> list[str]:
        return [t for t in (self.summary, *self.categories) if t]

    @property
    def title(self) -> str:
        return self.summary or ", ".join(self.categories) or "(no title)"

    @classmethod
    def read(cls, event: ical.Component, calendar: ical.Component) -> _Event:
        start_prop = _required(event, "DTSTART")
        last: date | None = None
        if ical.is_date(start_prop):
            start = ical.when(start_prop, calendar)
            last = _end(event, calendar, start_prop, start)[1] - timedelta(days=1)
        else:
            # Skipped whatever its zone, so only its syntax is checked.
            params = {k: v for k, v in start_prop.params.items() if k != "TZID"}
            start = ical.when(replace(start_prop, params=params), calendar)
        summary = event.single("SUMMARY")
        status = event.single("STATUS")
        return cls(
            line=event.line,
            first=start.date() if isinstance(start, datetime) else start,
            last=last,
            summary=summary.text().strip() if summary else "",
            categories=[c.strip() for p in event.all("CATEGORIES") for c in p.texts()],
            cancelled=status is not None and status.value.strip().upper() == "CANCELLED",
            repeating=bool(event.all("RRULE") or event.all("RDATE")),
        )


@dataclass(frozen=True)
class _Mark:
    """What one line says about a date."""

    holiday: bool = False
    day_type: str | None = None
    rotation: str | None = None

    def describe(self) -> str:
        if self.holiday:
            return "holiday"
        parts = [f"day type {self.day_type!r}"] if self.day_type else []
        parts += [f"rotation day {self.rotation!r}"] if self.rotation else []
        return " and ".join(parts)


@dataclass
class _Day:
    mark: _Mark
    lines: list[int]
    notes: list[str]


class _DayCollector:
    """The exception days of one import, with the line that set each part of each date."""

    def __init__(self, school: School, calendar: SchoolCalendar, merge: bool) -> None:
        # A CSV lists each date once; a feed may say "Early release" and "B Day" apart.
        self.merge = merge
        self.school = school
        self.calendar = calendar
        self.types = {slug(d.name): d.name for d in school.day_types}
        self.labels = {slug(label): label for label in calendar.rotation}
        self.by_date: dict[date, _Day] = {}
        self.skipped: list[Skipped] = []

    def day_type(self, line: int, cell: str) -> str:
        found = self.types.get(slug(cell))
        if found is None:
            known = ", ".join(sorted(self.types.values())) or "none yet"
            raise ImportProblem(
                line, f"unknown day type {cell!r} (known: {known}; or holiday / no school)"
            )
        return found

    def rotation(self, line: int, cell: str) -> str:
        found = self.labels.get(slug(cell))
        if found is None:
            known = ", ".join(self.calendar.rotation) or "the calendar has no rotation"
            raise ImportProblem(line, f"unknown rotation day {cell!r} ({known})")
        return found

    def classify(self, texts: Sequence[str]) -> _Mark | None:
        for text in texts:
            key = slug(text)
            if key in self.types:
                return _Mark(day_type=self.types[key])
            for label_key, label in self.labels.items():
                if key in (label_key, f"{label_key}-day", f"day-{label_key}"):
                    return _Mark(rotation=label)
            if HOLIDAY_WORDS.search(text):
                return _Mark(holiday=True)
        return None

    def dates(self, first: date, last: date) -> Iterator[date]:
        """One date as given; a range only on the term's school weekdays, so a break or an
        exam week never turns a weekend into a school day."""
        if first == last:
            yield first
            return
        weekdays = set(self.calendar.weekdays)
        day = first
        while day <= last:
            if day.isoweekday() in weekdays:
                yield day
            day += timedelta(days=1)

    def add(self, day: date, line: int, mark: _Mark, note: str) -> None:
        found = self.by_date.get(day)
        if found is None:
            self.by_date[day] = _Day(mark, [line], [note] if note else [])
            return
        if not self.merge:
            raise ImportProblem(line, f"{day} is also on line {found.lines[0]}")
        merged = _merge(found.mark, mark)
        if merged is None:
            raise ImportProblem(
                line,
                f"{day}: {mark.describe()} conflicts with {found.mark.describe()} "
                f"on line {', '.join(map(str, found.lines))}",
            )
        found.mark = merged
        found.lines.append(line)
        if note and note not in found.notes:
            found.notes.append(note)

    def result(self, kind: str) -> CalendarImport:
        entries = [_calendar_day(day, self.by_date[day]) for day in sorted(self.by_date)]
        calendar = self.calendar.model_dump()
        calendar["days"] = [e.model_dump() for e in entries]
        school = _revalidated(self.school, calendar=calendar)
        log.info(
            "calendar imported school=%r format=%s days=%d skipped=%d",
            self.school.name,
            kind,
            len(entries),
            len(self.skipped),
        )
        return CalendarImport(school=school, days=len(entries), skipped=self.skipped)


def _calendar_day(day: date, found: _Day) -> CalendarDay:
    note = "; ".join(found.notes)[:MAX_NOTE]
    try:
        return CalendarDay(
            date=day,
            holiday=found.mark.holiday,
            day_type=found.mark.day_type,
            rotation=found.mark.rotation,
            note=note,
        )
    except ValidationError as exc:
        raise ImportProblem(found.lines[0], _reason(exc)) from None


def _merge(old: _Mark, new: _Mark) -> _Mark | None:
    """Both marks on one date, or None when they contradict each other."""
    if old.holiday or new.holiday:
        return old if old == new else None
    if old.day_type and new.day_type and old.day_type != new.day_type:
        return None
    if old.rotation and new.rotation and old.rotation != new.rotation:
        return None
    return _Mark(day_type=old.day_type or new.day_type, rotation=old.rotation or new.rotation)


def _skipper(into: list[Skipped], line: int, summary: str) -> Callable[[str], None]:
    def skip(reason: str) -> None:
        into.append(Skipped(line=line, summary=summary, reason=reason))

    return skip


def _calendar_of(school: School) -> SchoolCalendar:
    if school.calendar is None:
        raise ImportProblem(None, f"{school.name} has no calendar yet: set the term first")
    return school.calendar


def _term(calendar: SchoolCalendar) -> str:
    return f"{calendar.first_day} to {calendar.last_day}"


# -- shared helpers ------------------------------------------------------------------------


def _check_size(size: int) -> None:
    if size > MAX_IMPORT_BYTES:
        raise ImportProblem(None, f"the file is larger than {MAX_IMPORT_BYTES // 1024 // 1024} MB")


def _checked(text: str) -> str:
    _check_size(len(text))  # cheap first: every character is at least one byte
    _check_size(len(text.encode("utf-8", "surrogatepass")))
    # Lone surrogates are what a byte that is not UTF-8 becomes under "surrogateescape".
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ImportProblem(text.count("\n", 0, bad.start()) + 1, "the file is not UTF-8 text")
    return text.removeprefix("\ufeff")


def _csv_rows(
    text: str, required: Sequence[str], optional: Sequence[str]
) -> Iterator[tuple[int, dict[str, str]]]:
    """Each non-blank row after the header as ``column -> stripped cell``, with the line it
    starts on. Columns may come in any order; header names ignore case."""
    # Strict, so an unclosed quote is an error rather than a cell that swallows every
    # row after it.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    previous_end = 0
    try:
        for row in reader:
            line, previous_end = previous_end + 1, reader.line_num
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if header is None:
                header = _header(line, cells, required, optional)
                continue
            if len(cells) > len(header) and any(cells[len(header) :]):
                raise ImportProblem(line, f"{len(cells)} cells but {len(header)} columns")
            cells += [""] * (len(header) - len(cells))
            yield line, dict(zip(header, cells, strict=False))
    except csv.Error as exc:
        raise ImportProblem(previous_end + 1, f"not valid CSV: {exc}") from None
    if header is None:
        raise ImportProblem(None, "the file is empty: expected a header row " + ",".join(required))


def _header(
    line: int, cells: list[str], required: Sequence[str], optional: Sequence[str]
) -> list[str]:
    names = [cell.lower().replace(" ", "_") for cell in cells]
    allowed = [*required, *optional]
    for pos, name in enumerate(names):
        if name not in allowed:
            raise ImportProblem(
                line, f"unknown column {cells[pos]!r} (columns: {', '.join(allowed)})"
            )
        if name in names[:pos]:
            raise ImportProblem(line, f"column {name!r} appears twice")
    missing = [name for name in required if name not in names]
    if missing:
        raise ImportProblem(
            line, f"the header has no {missing[0]!r} column (columns: {', '.join(allowed)})"
        )
    return names


def _required(event: ical.Component, name: str) -> ical.Property:
    found = event.single(name)
    if found is None:
        raise ical.ICalError(event.line, f"the VEVENT has no {name}")
    return found


def _end(
    event: ical.Component,
    calendar: ical.Component,
    start_prop: ical.Property,
    start: date | datetime,
) -> tuple[ical.Property, date | datetime]:
    """DTEND, or DTSTART + DURATION, or the RFC 5545 default: one day for a date, no
    length for a date-time. Checked to be the same kind as DTSTART and not before it."""
    end_prop = event.single("DTEND")
    if end_prop is not None:
        end = ical.when(end_prop, calendar)
    else:
        length = event.single("DURATION")
        end_prop = length or start_prop
        if length is not None:
            end = start + ical.duration(length)
        elif isinstance(start, datetime):
            end = start
        else:
            end = start + timedelta(days=1)
    if isinstance(start, datetime) != isinstance(end, datetime):
        raise ical.ICalError(end_prop.line, f"{end_prop.name} and DTSTART are not the same kind")
    if isinstance(start, datetime) and isinstance(end, datetime):
        if (start.tzinfo is None) != (end.tzinfo is None):
            raise ical.ICalError(
                end_prop.line, f"one of DTSTART and {end_prop.name} has a timezone, the other not"
            )
        if end < start:
            raise ical.ICalError(end_prop.line, f"{end_prop.name} is before DTSTART")
    elif end < start:
        raise ical.ICalError(end_prop.line, f"{end_prop.name} is before DTSTART")
    # Some feeds give all-day events an end equal to their start: one day, as intended.
    if not isinstance(end, datetime) and end == start:
        end = start + timedelta(days=1)
    return end_prop, end


def _name(line: int | None, value: str, what: str) -> str:
    name = " ".join(value.split())
    if not name:
        raise ImportProblem(line, f"no {what}")
    if len(name) > MAX_NAME:
        raise ImportProblem(line, f"the {what} is longer than {MAX_NAME} characters")
    if not slug(name):
        raise ImportProblem(line, f"the {what} {name!r} needs at least one letter or digit")
    return name


def _time(line: int, value: str, column: str) -> time:
    match = _TIME.fullmatch(value)
    if match is None:
        raise ImportProblem(line, f"{column} {value!r} is not a time (HH:MM or HH:MM:SS)")
    hour, minute, second = (int(part or 0) for part in match.groups())
    try:
        return time(hour, minute, second)
    except ValueError:
        raise ImportProblem(line, f"{column} {value!r} is not a time of day") from None


def _date(line: int, value: str, column: str) -> date:
    try:
        if _DATE.fullmatch(value) is None:
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise ImportProblem(line, f"{column} {value!r} is not a date (YYYY-MM-DD)") from None


def _model(line: int | None, make: Callable[[], T]) -> T:
    try:
        return make()
    except ValidationError as exc:
        raise ImportProblem(line, _reason(exc)) from None


def _revalidated(school: School, **changes: Any) -> School:
    return _model(None, lambda: School.model_validate({**school.model_dump(), **changes}))


def _reason(exc: ValidationError) -> str:
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {message}" if where else message
