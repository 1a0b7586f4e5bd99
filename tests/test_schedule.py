"""The schedule model and its expansion into capture windows.

Property tests (hypothesis) of ``school_days``, ``expand``, ``unit_windows`` and
``local_to_utc`` on generated bell schedules and calendars, including the
daylight-saving days of America/New_York and Europe/London, then examples of
what the validators refuse.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.messages import MAX_PAYLOAD_BYTES, CaptureWindow, DesiredState
from shared.schedule import (
    MAX_ROLL_S,
    BellSchedule,
    CalendarDay,
    CapturePlan,
    DayType,
    Period,
    PlannedWindow,
    Room,
    School,
    SchoolCalendar,
    expand,
    local_to_utc,
    school_days,
    slug,
    unit_windows,
    window_id,
)

PROPERTY = settings(max_examples=60, deadline=None)
SCHOOL = "Lincoln High"
WEEK = [1, 2, 3, 4, 5]
EVERY_DAY = [1, 2, 3, 4, 5, 6, 7]
# (zone, the Sunday the clocks change, how far they move)
DST_CHANGES = [
    ("America/New_York", date(2027, 3, 14), timedelta(hours=1)),
    ("America/New_York", date(2027, 11, 7), timedelta(hours=-1)),
    ("Europe/London", date(2027, 3, 28), timedelta(hours=1)),
    ("Europe/London", date(2027, 10, 31), timedelta(hours=-1)),
]
# Changes at night, at midnight (Havana, Santiago) and by half an hour (Lord Howe).
NIGHT_CHANGES = [
    ("America/New_York", date(2027, 3, 14)),
    ("America/New_York", date(2027, 11, 7)),
    ("Europe/London", date(2027, 3, 28)),
    ("Europe/London", date(2027, 10, 31)),
    ("America/Havana", date(2027, 3, 14)),
    ("America/Havana", date(2027, 11, 7)),
    ("America/Santiago", date(2027, 9, 5)),
    ("America/Santiago", date(2027, 4, 3)),
    ("Australia/Lord_Howe", date(2027, 10, 3)),
    ("Australia/Lord_Howe", date(2027, 4, 4)),
]


# --- building schools ---------------------------------------------------------


def clock(minute: int) -> time:
    return time(minute // 60, minute % 60)


def days_from(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def make_school(
    calendar: SchoolCalendar,
    periods: Sequence[Period],
    *,
    zone: str = "America/New_York",
    other_periods: Sequence[Period] = (),
    rooms: Sequence[Room] = (Room(name="Room 204", device_id="unit-204"),),
) -> School:
    """A school whose "Regular" days follow ``periods`` and "Early" days ``other_periods``."""
    schedules = [BellSchedule(name="Regular bells", periods=list(periods))]
    types = [DayType(name="Regular", bell_schedule="Regular bells")]
    if other_periods:
        schedules.append(BellSchedule(name="Early bells", periods=list(other_periods)))
        types.append(DayType(name="Early", bell_schedule="Early bells"))
    return School(
        name=SCHOOL,
        timezone=zone,
        bell_schedules=schedules,
        day_types=types,
        calendar=calendar,
        rooms=list(rooms),
    )


def make_plan(
    periods: Sequence[str],
    first: date,
    last: date,
    *,
    name: str = "Coaching",
    rooms: Sequence[str] = ("Room 204",),
    **extra: Any,
) -> CapturePlan:
    return CapturePlan(
        name=name,
        school=SCHOOL,
        rooms=list(rooms),
        periods=list(periods),
        first_day=first,
        last_day=last,
        **extra,
    )


def wall(instant: datetime, zone: ZoneInfo) -> datetime:
    """What the school's clocks read at ``instant``."""
    return instant.astimezone(zone).replace(tzinfo=None)


# --- strategies -----------------------------------------------------------------


@st.composite
def bell_periods(
    draw: st.DrawFn,
    *,
    prefix: str = "Period",
    first_minute: int = 7 * 60,
    last_minute: int = 17 * 60,
    gaps: tuple[int, int] = (0, 45),
    lengths: tuple[int, int] = (5, 90),
) -> list[Period]:
    """Up to eight periods in time order between ``first_minute`` and ``last_minute``."""
    steps = draw(
        st.lists(st.tuples(st.integers(*gaps), st.integers(*lengths)), min_size=1, max_size=8)
    )
    periods: list[Period] = []
    at = first_minute
    for gap, length in steps:
        start, end = at + gap, at + gap + length
        if end > last_minute:
            break
        periods.append(
            Period(name=f"{prefix} {len(periods) + 1}", start=clock(start), end=clock(end))
        )
        at = end
    if not periods:
        periods.append(Period(name=f"{prefix} 1", start=clock(first_minute), end=clock(at + 5)))
    return periods


@st.composite
def calendars(draw: st.DrawFn, around: date = date(2027, 3, 1)) -> SchoolCalendar:
    """A term of up to six weeks with holidays, early-release days, extra school days and
    explicit rotation days."""
    first = around + timedelta(days=draw(st.integers(0, 30)))
    last = first + timedelta(days=draw(st.integers(0, 42)))
    rotation = draw(st.sampled_from([[], ["A", "B"], ["A", "B", "C"], ["Day 1"]]))
    term = days_from(first, last)
    kinds = ["holiday", "Early", "rotation"] if rotation else ["holiday", "Early"]
    days: list[CalendarDay] = []
    for day in draw(st.lists(st.sampled_from(term), unique=True, max_size=10)):
        kind = draw(st.sampled_from(kinds))
        if kind == "holiday":
            days.append(CalendarDay(date=day, holiday=True))
        elif kind == "Early":
            days.append(CalendarDay(date=day, day_type="Early"))
        else:
            days.append(CalendarDay(date=day, rotation=draw(st.sampled_from(rotation))))
    return SchoolCalendar(
        first_day=first,
        last_day=last,
        weekdays=draw(st.lists(st.integers(1, 7), min_size=1, max_size=7, unique=True)),
        default_day_type="Regular",
        rotation=rotation,
        days=days,
    )


def date_ranges(around: date = date(2027, 3, 1)) -> st.SearchStrategy[tuple[date, date]]:
    return st.tuples(st.integers(-5, 80), st.integers(0, 60)).map(
        lambda t: (around + timedelta(days=t[0]), around + timedelta(days=t[0] + t[1]))
    )


# --- school days ----------------------------------------------------------------


@PROPERTY
@given(calendar=calendars(), span=date_ranges())
def test_school_days_are_exactly_the_calendars(
    calendar: SchoolCalendar, span: tuple[date, date]
) -> None:
    school = make_school(
        calendar,
        [Period(name="Period 1", start=time(8), end=time(9))],
        other_periods=[Period(name="Period 1", start=time(8), end=time(8, 30))],
    )
    exceptions = {d.date: d for d in calendar.days}
    expected = [
        day
        for day in days_from(calendar.first_day, calendar.last_day)
        if not (day in exceptions and exceptions[day].holiday)
        and (day.isoweekday() in calendar.weekdays or day in exceptions)
    ]
    whole_term = list(school_days(school, calendar.first_day, calendar.last_day))
    assert [d.date for d in whole_term] == expected

    position = -1
    for day in whole_term:
        exception = exceptions.get(day.date)
        assert day.day_type == ((exception and exception.day_type) or "Regular")
        assert day.bell_schedule.name == f"{day.day_type} bells"
        if not calendar.rotation:
            assert day.rotation is None
            continue
        # The rotation advances one step per school day; a set rotation day restarts it.
        if exception is not None and exception.rotation:
            position = calendar.rotation.index(exception.rotation)
        else:
            position = (position + 1) % len(calendar.rotation)
        assert day.rotation == calendar.rotation[position]

    # Asking for part of the term gives that part, with the same rotation labels.
    first, last = span
    assert list(school_days(school, first, last)) == [
        d for d in whole_term if first <= d.date <= last
    ]


@PROPERTY
@given(
    calendar=calendars(),
    span=date_ranges(),
    plan_span=date_ranges(),
    rotation_days=st.sampled_from([[], ["A"], ["B", "C"], ["Day 1"]]),
    wanted=st.lists(st.sampled_from(["Period 1", "Period 2", "Period 3"]), min_size=1, unique=True),
)
def test_windows_fall_only_on_the_plans_school_days(
    calendar: SchoolCalendar,
    span: tuple[date, date],
    plan_span: tuple[date, date],
    rotation_days: list[str],
    wanted: list[str],
) -> None:
    regular = [
        Period(name="Period 1", start=time(8), end=time(8, 50)),
        Period(name="Period 2", start=time(9), end=time(9, 50)),
        Period(name="Period 3", start=time(10), end=time(10, 50)),
    ]
    # Early-release days have no Period 3.
    early = [
        Period(name="Period 1", start=time(8), end=time(8, 30)),
        Period(name="Period 2", start=time(8, 40), end=time(9, 10)),
    ]
    school = make_school(calendar, regular, other_periods=early)
    plan = make_plan(wanted, *plan_span, rotation_days=rotation_days)
    first, last = span

    windows = expand(school, [plan], first, last)

    holidays = {d.date for d in calendar.days if d.holiday}
    extra_days = {d.date for d in calendar.days if not d.holiday}
    for window in windows:
        assert calendar.first_day <= window.date <= calendar.last_day
        assert first <= window.date <= last
        assert plan.first_day <= window.date <= plan.last_day
        assert window.date not in holidays
        assert window.date.isoweekday() in calendar.weekdays or window.date in extra_days
    expected = {
        (day.date, period.name)
        for day in school_days(school, max(first, plan.first_day), min(last, plan.last_day))
        if not rotation_days or day.rotation in rotation_days
        for period in day.bell_schedule.periods
        if period.name in wanted
    }
    assert {(w.date, w.period) for w in windows} == expected


def test_rotation_skips_holidays_and_restarts_on_a_set_day() -> None:
    calendar = SchoolCalendar(
        first_day=date(2027, 3, 1),  # a Monday
        last_day=date(2027, 3, 12),
        default_day_type="Regular",
        rotation=["A", "B"],
        days=[
            CalendarDay(date=date(2027, 3, 3), holiday=True),
            CalendarDay(date=date(2027, 3, 10), rotation="A"),
        ],
    )
    school = make_school(calendar, [Period(name="Period 2", start=time(9), end=time(10))])

    labels = {
        d.date.day: d.rotation for d in school_days(school, date(2027, 3, 1), date(2027, 3, 31))
    }
    assert labels == {1: "A", 2: "B", 4: "A", 5: "B", 8: "A", 9: "B", 10: "A", 11: "B", 12: "A"}

    a_days = make_plan(["Period 2"], date(2027, 3, 1), date(2027, 3, 31), rotation_days=["A"])
    windows = expand(school, [a_days], date(2027, 3, 1), date(2027, 3, 31))
    assert [w.date.day for w in windows] == [1, 4, 8, 10, 12]


def test_a_school_without_calendar_or_plans_has_no_windows() -> None:
    calendar = SchoolCalendar(
        first_day=date(2027, 3, 1), last_day=date(2027, 3, 5), default_day_type="Regular"
    )
    school = make_school(calendar, [Period(name="Period 1", start=time(8), end=time(9))])
    plan = make_plan(["Period 1"], date(2027, 3, 1), date(2027, 3, 5))
    no_calendar = school.model_copy(update={"calendar": None})

    assert expand(no_calendar, [plan], date(2027, 3, 1), date(2027, 3, 5)) == []
    assert expand(school, [], date(2027, 3, 1), date(2027, 3, 5)) == []
    other = plan.model_copy(update={"school": "Another School"})
    assert expand(school, [other], date(2027, 3, 1), date(2027, 3, 5)) == []
    unknown = make_plan(["Period 9"], date(2027, 3, 1), date(2027, 3, 5), rooms=["Room 999"])
    assert expand(school, [unknown], date(2027, 3, 1), date(2027, 3, 5)) == []


# --- daylight saving --------------------------------------------------------------


@pytest.mark.parametrize(("zone_name", "change", "shift"), DST_CHANGES)
@PROPERTY
@given(
    periods=bell_periods(gaps=(60, 90)),
    pre=st.integers(0, MAX_ROLL_S),
    post=st.integers(0, MAX_ROLL_S),
)
def test_wall_clock_times_hold_across_the_change(
    zone_name: str, change: date, shift: timedelta, periods: list[Period], pre: int, post: int
) -> None:
    # Gaps of an hour or more leave room for both rolls, so none is cut short.
    zone = ZoneInfo(zone_name)
    before, after = change - timedelta(days=1), change + timedelta(days=1)
    calendar = SchoolCalendar(
        first_day=before, last_day=after, weekdays=EVERY_DAY, default_day_type="Regular"
    )
    school = make_school(calendar, periods, zone=zone_name)
    plan = make_plan([p.name for p in periods], before, after, pre_roll_s=pre, post_roll_s=post)

    windows = expand(school, [plan], before, after)

    assert len(windows) == 3 * len(periods)
    bells = {p.name: p for p in periods}
    by_day: dict[date, dict[str, PlannedWindow]] = defaultdict(dict)
    for window in windows:
        period = bells[window.period]
        assert window.start.tzinfo is not None
        assert wall(window.start, zone) == datetime.combine(window.date, period.start) - timedelta(
            seconds=pre
        )
        assert wall(window.end, zone) == datetime.combine(window.date, period.end) + timedelta(
            seconds=post
        )
        by_day[window.date][window.period] = window
    for name in bells:
        first, changed, last = (by_day[d][name].start for d in (before, change, after))
        # School hours come after the change, so the Sunday already has the new offset.
        assert changed - first == timedelta(days=1) - shift
        assert last - changed == timedelta(days=1)
        offsets = [w.astimezone(zone).utcoffset() for w in (first, changed, last)]
        assert offsets[0] != offsets[1] == offsets[2]


@pytest.mark.parametrize(("zone_name", "change", "shift"), DST_CHANGES)
def test_a_weekend_school_day_on_the_change(zone_name: str, change: date, shift: timedelta) -> None:
    zone = ZoneInfo(zone_name)
    friday, saturday, monday = (change + timedelta(days=n) for n in (-2, -1, 1))
    calendar = SchoolCalendar(
        first_day=friday,
        last_day=monday,
        weekdays=WEEK,
        default_day_type="Regular",
        days=[CalendarDay(date=change, day_type="Early", note="make-up day")],
    )
    regular = [
        Period(name="Period 1", start=time(8, 15), end=time(9, 5)),
        Period(name="Period 2", start=time(9, 15), end=time(10, 5)),
    ]
    early = [
        Period(name="Period 1", start=time(8, 15), end=time(8, 45)),
        Period(name="Period 2", start=time(8, 55), end=time(9, 25)),
    ]
    school = make_school(calendar, regular, zone=zone_name, other_periods=early)
    plan = make_plan(["Period 1", "Period 2"], friday, monday, pre_roll_s=120, post_roll_s=60)

    windows = expand(school, [plan], friday, monday)

    assert sorted({w.date for w in windows}) == [friday, change, monday]
    assert saturday not in {w.date for w in windows}
    for window in windows:
        bells = early if window.date == change else regular
        period = next(p for p in bells if p.name == window.period)
        assert wall(window.start, zone) == datetime.combine(window.date, period.start) - (
            timedelta(minutes=2)
        )
        assert wall(window.end, zone) == datetime.combine(window.date, period.end) + timedelta(
            minutes=1
        )
    offsets = {w.date: w.start.astimezone(zone).utcoffset() for w in windows}
    assert offsets[change] == offsets[monday]
    assert offsets[change] - offsets[friday] == shift  # type: ignore[operator]
    state = DesiredState(version=1, schedule=unit_windows(windows)["unit-204"])
    assert len(state.schedule) == 6


@pytest.mark.parametrize(("zone_name", "change"), NIGHT_CHANGES)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_local_to_utc_never_runs_backwards(
    zone_name: str, change: date, data: st.DataObject
) -> None:
    zone = ZoneInfo(zone_name)
    day = data.draw(st.sampled_from([change - timedelta(days=1), change]))
    minutes = data.draw(st.lists(st.integers(0, 24 * 60 - 1), min_size=2, max_size=12))
    times = sorted(clock(m) for m in minutes)
    instants = [local_to_utc(day, t, zone) for t in times]
    assert instants == sorted(instants)
    for at, instant in zip(times, instants, strict=True):
        assert instant.tzinfo is UTC or instant.utcoffset() == timedelta(0)
        first, second = (datetime.combine(day, at, tzinfo=zone).replace(fold=f) for f in (0, 1))
        skipped = first.utcoffset() < second.utcoffset()  # type: ignore[operator]
        if not skipped:
            # An existing time, and on a fall-back night its first occurrence.
            assert wall(instant, zone) == datetime.combine(day, at)
            assert instant == min(first.astimezone(UTC), second.astimezone(UTC))
        else:
            # A skipped time is the moment the clocks jump past it.
            assert wall(instant, zone) > datetime.combine(day, at)
            assert wall(instant - timedelta(seconds=1), zone) < datetime.combine(day, at)


@pytest.mark.parametrize(("zone_name", "change"), NIGHT_CHANGES)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_night_periods_on_the_change_still_give_valid_windows(
    zone_name: str, change: date, data: st.DataObject
) -> None:
    # Night school around midnight and in the small hours, where the clocks change.
    first, last = data.draw(st.sampled_from([(0, 6 * 60), (18 * 60, 24 * 60 - 1)]))
    periods = data.draw(bell_periods(first_minute=first, last_minute=last, lengths=(1, 90)))
    calendar = SchoolCalendar(
        first_day=change, last_day=change, weekdays=EVERY_DAY, default_day_type="Regular"
    )
    school = make_school(calendar, periods, zone=zone_name)
    plan = make_plan([p.name for p in periods], change, change, pre_roll_s=300, post_roll_s=300)

    windows = expand(school, [plan], change, change)

    zone = school.zone
    # Only a period the clocks skip entirely has no window.
    missing = {p.name for p in periods} - {w.period for w in windows}
    for name in missing:
        period = next(p for p in periods if p.name == name)
        assert local_to_utc(change, period.start, zone) == local_to_utc(change, period.end, zone)
    schedule = unit_windows(windows).get("unit-204", [])
    assert len(schedule) == len(windows)
    for earlier, later in pairwise(schedule):
        assert earlier.end <= later.start
    DesiredState(version=1, schedule=schedule)


def test_periods_in_the_skipped_and_repeated_hours() -> None:
    zone = ZoneInfo("America/New_York")
    spring, autumn = date(2027, 3, 14), date(2027, 11, 7)
    periods = [
        Period(name="Before", start=time(1, 30), end=time(2, 30)),
        Period(name="Inside", start=time(2, 35), end=time(2, 55)),
        Period(name="Across", start=time(2, 55), end=time(3, 30)),
    ]
    calendar = SchoolCalendar(
        first_day=spring, last_day=autumn, weekdays=[7], default_day_type="Regular"
    )
    school = make_school(calendar, periods)
    plan = make_plan([p.name for p in periods], spring, autumn)

    def spans(day: date) -> dict[str, tuple[datetime, datetime]]:
        return {w.period: (w.start, w.end) for w in expand(school, [plan], day, day)}

    def utc(hour: int, minute: int, day: date) -> datetime:
        return datetime.combine(day, time(hour, minute), tzinfo=UTC)

    # 02:00 becomes 03:00 EDT (07:00 UTC): "Inside" never happens, the others are cut there.
    assert spans(spring) == {
        "Before": (utc(6, 30, spring), utc(7, 0, spring)),
        "Across": (utc(7, 0, spring), utc(7, 30, spring)),
    }
    # 02:00 EDT becomes 01:00 EST: 01:30 is its first occurrence, 02:30 comes after both.
    assert spans(autumn) == {
        "Before": (utc(5, 30, autumn), utc(7, 30, autumn)),
        "Inside": (utc(7, 35, autumn), utc(7, 55, autumn)),
        "Across": (utc(7, 55, autumn), utc(8, 30, autumn)),
    }
    assert wall(utc(5, 30, autumn), zone) == datetime(2027, 11, 7, 1, 30)


# --- rolls, overlaps and one window per lesson --------------------------------------


ROOMS = (
    Room(name="Room 204", device_id="unit-204"),
    Room(name="Room 205", device_id="unit-205"),
    Room(name="Library"),  # no unit yet
)


@st.composite
def overlapping_plans(draw: st.DrawFn, periods: list[Period]) -> list[CapturePlan]:
    names = [p.name for p in periods]
    room_names = [r.name for r in ROOMS]
    count = draw(st.integers(1, 4))
    return [
        make_plan(
            draw(st.lists(st.sampled_from(names), min_size=1, unique=True)),
            date(2027, 4, 5) + timedelta(days=draw(st.integers(0, 4))),
            date(2027, 4, 9),
            name=f"Plan {n}",
            rooms=draw(st.lists(st.sampled_from(room_names), min_size=1, unique=True)),
            pre_roll_s=draw(st.sampled_from([0, 60, 300, 900, MAX_ROLL_S])),
            post_roll_s=draw(st.sampled_from([0, 60, 300, 900, MAX_ROLL_S])),
            teacher=draw(st.sampled_from([None, "Ms. Rivera"])),
        )
        for n in range(count)
    ]


@PROPERTY
@given(data=st.data())
def test_rolls_are_applied_without_overlap_or_losing_a_lesson(data: st.DataObject) -> None:
    periods = data.draw(bell_periods(gaps=(0, 40)))
    plans = data.draw(overlapping_plans(periods))
    first, last = date(2027, 4, 5), date(2027, 4, 9)  # Monday to Friday
    calendar = SchoolCalendar(first_day=first, last_day=last, default_day_type="Regular")
    school = make_school(calendar, periods, rooms=ROOMS)
    zone = school.zone

    windows = expand(school, plans, first, last)

    # One window per room, date and period, whichever plans name it.
    covering: dict[tuple[str, date, str], list[CapturePlan]] = defaultdict(list)
    for plan in plans:
        for day in days_from(plan.first_day, plan.last_day):
            for room_name in plan.rooms:
                for period_name in plan.periods:
                    covering[(room_name, day, period_name)].append(plan)
    assert len({w.window_id for w in windows}) == len(windows)
    assert {(w.room, w.date, w.period) for w in windows} == set(covering)

    requested: dict[str, tuple[datetime, datetime]] = {}
    for window in windows:
        plans_here = covering[(window.room, window.date, window.period)]
        assert window.plans == [p.name for p in plans_here]
        assert window.teacher == next((p.teacher for p in plans_here if p.teacher), None)
        assert window.window_id == window_id(SCHOOL, window.room, window.date, window.period)
        assert window.school == SCHOOL
        assert window.device_id == next(r.device_id for r in ROOMS if r.name == window.room)
        assert window.title == f"{SCHOOL} · {window.room} · {window.date} · {window.period}"
        bell = next(p for p in periods if p.name == window.period)
        start = local_to_utc(window.date, bell.start, zone)
        end = local_to_utc(window.date, bell.end, zone)
        pre = timedelta(seconds=max(p.pre_roll_s for p in plans_here))
        post = timedelta(seconds=max(p.post_roll_s for p in plans_here))
        requested[window.window_id] = (start - pre, end + post)
        # The whole lesson, and never more than its plans asked for.
        assert start - pre <= window.start <= start
        assert end <= window.end <= end + post

    per_room: dict[str, list[PlannedWindow]] = defaultdict(list)
    for window in windows:
        per_room[window.room].append(window)
    assert [w.room for w in windows] == sorted(w.room for w in windows)
    for room_windows in per_room.values():
        assert room_windows == sorted(room_windows, key=lambda w: w.start)
        for earlier, later in pairwise(room_windows):
            assert earlier.end <= later.start
        for window in room_windows:
            # Far from its neighbours, a window has exactly the rolls asked for.
            want = requested[window.window_id]
            others = [requested[w.window_id] for w in room_windows if w is not window]
            if all(o[1] <= want[0] or o[0] >= want[1] for o in others):
                assert (window.start, window.end) == want

    per_unit = unit_windows(windows)
    assert set(per_unit) <= {"unit-204", "unit-205"}
    for room in ROOMS:
        if room.device_id is None:
            continue
        schedule = per_unit.get(room.device_id, [])
        assert [c.window_id for c in schedule] == [w.window_id for w in per_room[room.name]]
        for earlier_c, later_c in pairwise(schedule):
            assert earlier_c.end <= later_c.start
        DesiredState(version=1, schedule=schedule)


def test_a_roll_into_a_neighbour_meets_it_between_the_periods() -> None:
    periods = [
        Period(name="Period 1", start=time(8), end=time(8, 50)),
        Period(name="Period 2", start=time(9), end=time(9, 50)),
    ]
    day = date(2027, 4, 5)
    calendar = SchoolCalendar(first_day=day, last_day=day, default_day_type="Regular")
    school = make_school(calendar, periods)

    def bounds(*plans: CapturePlan) -> list[tuple[time, time]]:
        zone = school.zone
        return [
            (wall(w.start, zone).time(), wall(w.end, zone).time())
            for w in expand(school, plans, day, day)
        ]

    both = make_plan(["Period 1", "Period 2"], day, day, pre_roll_s=900, post_roll_s=900)
    assert bounds(both) == [(time(7, 45), time(8, 55)), (time(8, 55), time(10, 5))]
    # Only the second asks for a roll: it may take the whole break, the first gets none.
    first_plain = make_plan(["Period 1"], day, day, name="Plain")
    second_rolled = make_plan(["Period 2"], day, day, name="Rolled", pre_roll_s=900)
    assert bounds(first_plain, second_rolled) == [
        (time(8), time(8, 50)),
        (time(8, 50), time(9, 50)),
    ]
    # A short pre-roll is kept whole even though the first one's post-roll reaches past it.
    first_rolled = make_plan(["Period 1"], day, day, name="Long", post_roll_s=900)
    second_short = make_plan(["Period 2"], day, day, name="Short", pre_roll_s=120)
    assert bounds(first_rolled, second_short) == [
        (time(8), time(8, 58)),
        (time(8, 58), time(9, 50)),
    ]


def test_two_plans_on_one_lesson_give_one_window_with_the_longer_rolls() -> None:
    periods = [Period(name="Period 2", start=time(9), end=time(9, 50))]
    day = date(2027, 4, 5)
    calendar = SchoolCalendar(first_day=day, last_day=day, default_day_type="Regular")
    school = make_school(calendar, periods)
    coach = make_plan(["Period 2"], day, day, name="Coach", pre_roll_s=60, post_roll_s=600)
    review = make_plan(["Period 2"], day, day, name="Review", pre_roll_s=300, teacher="Mr. Okafor")

    (window,) = expand(school, [coach, review], day, day)

    assert window.plans == ["Coach", "Review"]
    assert window.teacher == "Mr. Okafor"
    assert wall(window.start, school.zone) == datetime(2027, 4, 5, 8, 55)
    assert wall(window.end, school.zone) == datetime(2027, 4, 5, 10, 0)
    assert window.window_id == "lincoln-high.room-204.20270405.period-2"


def test_a_moved_lesson_keeps_its_window_id() -> None:
    first, last = date(2027, 4, 5), date(2027, 4, 9)
    calendar = SchoolCalendar(first_day=first, last_day=last, default_day_type="Regular")
    before = [
        Period(name="Period 1", start=time(8), end=time(8, 50)),
        Period(name="Period 2", start=time(8, 55), end=time(9, 45)),
    ]
    after = [before[0], Period(name="Period 2", start=time(10, 10), end=time(11))]
    plan = make_plan(["Period 2"], first, last)

    old = expand(make_school(calendar, before), [plan], first, last)
    new = expand(make_school(calendar, after), [plan], first, last)

    assert [w.window_id for w in new] == [w.window_id for w in old]
    assert len(new) == 5
    for moved, original in zip(new, old, strict=True):
        assert moved.start - original.start == timedelta(minutes=75)


names = st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "Nd", "Zs", "P"]),
    min_size=1,
    max_size=60,
).filter(lambda n: bool(slug(n)))


@PROPERTY
@given(
    school=names,
    rooms=st.lists(names, min_size=1, max_size=4, unique_by=slug),
    periods=st.lists(names, min_size=1, max_size=4, unique_by=slug),
)
def test_window_ids_are_distinct_and_fit_a_capture_window(
    school: str, rooms: list[str], periods: list[str]
) -> None:
    day = date(2027, 4, 5)
    ids = {window_id(school, room, day, period) for room in rooms for period in periods}
    assert len(ids) == len(rooms) * len(periods)
    for found in ids:
        assert len(found) <= 128
        assert found == found.lower()
        assert set(found) <= set("abcdefghijklmnopqrstuvwxyz0123456789-.")
        start = datetime(2027, 4, 5, 12, tzinfo=UTC)
        CaptureWindow(window_id=found, start=start, end=start + timedelta(hours=1))
    assert window_id("Lincoln High", "Room 204", day, "Period 2") == (
        "lincoln-high.room-204.20270405.period-2"
    )
    # Names of the longest kind are shortened, and stay apart when only their ends differ.
    long_a = window_id("S" * 60, "Room " + "x" * 54 + "1", day, "P" * 60)
    long_b = window_id("S" * 60, "Room " + "x" * 54 + "2", day, "P" * 60)
    assert long_a != long_b
    assert max(len(long_a), len(long_b)) <= 128


# --- validation ----------------------------------------------------------------------


def test_periods_are_kept_in_time_order() -> None:
    schedule = BellSchedule(
        name="Regular",
        periods=[
            Period(name="Period 2", start=time(9), end=time(9, 50)),
            Period(name="Period 1", start=time(8), end=time(8, 50)),
        ],
    )
    assert [p.name for p in schedule.periods] == ["Period 1", "Period 2"]


def _school(**changes: Any) -> School:
    fields: dict[str, Any] = {
        "name": SCHOOL,
        "timezone": "America/New_York",
        "bell_schedules": [
            BellSchedule(
                name="Regular bells", periods=[Period(name="P1", start=time(8), end=time(9))]
            )
        ],
        "day_types": [DayType(name="Regular", bell_schedule="Regular bells")],
        "calendar": SchoolCalendar(
            first_day=date(2027, 3, 1), last_day=date(2027, 3, 5), default_day_type="Regular"
        ),
        "rooms": [Room(name="Room 204", device_id="unit-204")],
    }
    fields.update(changes)
    return School(**fields)


def _calendar(**changes: Any) -> SchoolCalendar:
    fields: dict[str, Any] = {
        "first_day": date(2027, 3, 1),
        "last_day": date(2027, 3, 31),
        "default_day_type": "Regular",
    }
    fields.update(changes)
    return SchoolCalendar(**fields)


INVALID: list[tuple[str, Callable[[], object], str]] = [
    (
        "overlapping periods",
        lambda: BellSchedule(
            name="Regular",
            periods=[
                Period(name="P1", start=time(8), end=time(9)),
                Period(name="P2", start=time(8, 59), end=time(10)),
            ],
        ),
        "periods 'P1' and 'P2' overlap",
    ),
    (
        "period ending before it starts",
        lambda: Period(name="P1", start=time(9), end=time(9)),
        "must end after it starts",
    ),
    (
        "period time with a zone",
        lambda: Period(name="P1", start=time(9, tzinfo=UTC), end=time(10, tzinfo=UTC)),
        "without a zone",
    ),
    ("unknown timezone", lambda: _school(timezone="America/Springfield"), "unknown timezone"),
    ("not a timezone", lambda: _school(timezone="../etc/passwd"), "unknown timezone"),
    (
        "day type naming a missing bell schedule",
        lambda: _school(day_types=[DayType(name="Regular", bell_schedule="Late bells")]),
        "unknown bell schedule 'Late bells'",
    ),
    (
        "calendar defaulting to an unknown day type",
        lambda: _school(calendar=_calendar(default_day_type="Half day")),
        "unknown day type 'Half day'",
    ),
    (
        "calendar day using an unknown day type",
        lambda: _school(
            calendar=_calendar(days=[CalendarDay(date=date(2027, 3, 2), day_type="Assembly")])
        ),
        "unknown day type 'Assembly'",
    ),
    (
        "rooms the same by slug",
        lambda: _school(rooms=[Room(name="Room 204"), Room(name="room-204")]),
        "rooms 'Room 204' and 'room-204' are the same name",
    ),
    (
        "periods the same by slug",
        lambda: BellSchedule(
            name="Regular",
            periods=[
                Period(name="Period 1", start=time(8), end=time(9)),
                Period(name="PERIOD_1", start=time(9), end=time(10)),
            ],
        ),
        "are the same name",
    ),
    (
        "bell schedules the same by slug",
        lambda: _school(
            bell_schedules=[
                BellSchedule(name=n, periods=[Period(name="P1", start=time(8), end=time(9))])
                for n in ("Regular bells", "regular  bells")
            ]
        ),
        "bell schedules 'Regular bells' and 'regular  bells' are the same name",
    ),
    (
        "day types the same by slug",
        lambda: _school(
            day_types=[
                DayType(name="Regular", bell_schedule="Regular bells"),
                DayType(name="regular!", bell_schedule="Regular bells"),
            ]
        ),
        "are the same name",
    ),
    (
        "a name with no letter or digit",
        lambda: _school(rooms=[Room(name="---")]),
        "needs at least one letter or digit",
    ),
    (
        "a unit in two rooms",
        lambda: _school(
            rooms=[Room(name="Room 204", device_id="unit-1"), Room(name="Gym", device_id="unit-1")]
        ),
        "a unit can be assigned to one room only",
    ),
    (
        "holiday with a day type",
        lambda: CalendarDay(date=date(2027, 3, 2), holiday=True, day_type="Regular"),
        "a holiday has no day type or rotation day",
    ),
    (
        "holiday with a rotation day",
        lambda: CalendarDay(date=date(2027, 3, 2), holiday=True, rotation="A"),
        "a holiday has no day type or rotation day",
    ),
    (
        "calendar day saying nothing",
        lambda: CalendarDay(date=date(2027, 3, 2), note="?"),
        "say holiday, a day type or a rotation day",
    ),
    (
        "rotation label not in the rotation",
        lambda: _calendar(
            rotation=["A", "B"], days=[CalendarDay(date=date(2027, 3, 2), rotation="C")]
        ),
        "rotation day 'C' is not in the rotation",
    ),
    (
        "rotation label without a rotation",
        lambda: _calendar(days=[CalendarDay(date=date(2027, 3, 2), rotation="A")]),
        "is not in the rotation",
    ),
    ("repeated rotation label", lambda: _calendar(rotation=["A", "A"]), "must differ"),
    (
        "calendar day listed twice",
        lambda: _calendar(
            days=[CalendarDay(date=date(2027, 3, 2), holiday=True)] * 2,
        ),
        "listed twice",
    ),
    (
        "calendar day outside the term",
        lambda: _calendar(days=[CalendarDay(date=date(2027, 4, 2), holiday=True)]),
        "outside the term",
    ),
    (
        "term ending before it starts",
        lambda: _calendar(last_day=date(2027, 2, 28)),
        "last day is before its first",
    ),
    ("term too long", lambda: _calendar(last_day=date(2028, 6, 1)), "at most 400 days"),
    ("weekday eight", lambda: _calendar(weekdays=[8]), "less than or equal to 7"),
    (
        "plan ending before it starts",
        lambda: make_plan(["P1"], date(2027, 3, 5), date(2027, 3, 4)),
        "the plan's last day is before its first",
    ),
    (
        "plan roll too long",
        lambda: make_plan(["P1"], date(2027, 3, 1), date(2027, 3, 4), pre_roll_s=MAX_ROLL_S + 1),
        "less than or equal to 1800",
    ),
    (
        "plan with no rooms",
        lambda: make_plan(["P1"], date(2027, 3, 1), date(2027, 3, 4), rooms=[]),
        "at least 1 item",
    ),
    ("unknown field", lambda: _school(colour="red"), "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(
    ("build", "message"), [(b, m) for _, b, m in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_invalid_models_are_refused(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        build()


def test_a_valid_school_and_its_desired_state() -> None:
    school = _school()
    plan = make_plan(["P1"], date(2027, 3, 1), date(2027, 3, 5), teacher="  Ms. Rivera ")
    assert plan.teacher == "Ms. Rivera"

    per_unit = unit_windows(expand(school, [plan], date(2027, 3, 1), date(2027, 3, 5)))

    state = DesiredState(version=1, schedule=per_unit["unit-204"])
    assert len(state.schedule) == 5
    assert len(state.to_json()) < MAX_PAYLOAD_BYTES
    assert state.schedule[0].title == "Lincoln High · Room 204 · 2027-03-01 · P1"
