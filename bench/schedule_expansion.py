"""Expanding a term of capture plans for 2,000 rooms, and every unit's desired state.

100 schools of 20 rooms, each with a regular and an early-release bell schedule
of 8 periods, an A/B rotation, holidays and one term of 90 school days; every
room has a plan recording 2 periods a day, and 1 room in 10 a second plan
recording all 8. Times (a) ``expand`` over the whole term for every school and
(b) every unit's ``DesiredState`` for a 14-day horizon (expansion, per-unit
windows, the message and its JSON), beside a baseline measured in the same run:
a plain loop making the same (room, date, period, start, end) tuples with naive
datetimes, without zones or validation.

    .venv/bin/python bench/schedule_expansion.py [--schools 100] [--rounds 5]

Target: (a)+(b) under 5 s; every desired document within ``MAX_PAYLOAD_BYTES``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import at_most, describe_machine, report
from shared.messages import MAX_PAYLOAD_BYTES, DesiredState
from shared.schedule import (
    BellSchedule,
    CalendarDay,
    CapturePlan,
    DayType,
    Period,
    Room,
    School,
    SchoolCalendar,
    expand,
    unit_windows,
)

ROOMS_PER_SCHOOL = 20
PERIODS = 8
TERM_DAYS = 90
TERM_START = date(2027, 1, 4)  # a Monday
# The horizon crosses America's spring-forward Sunday.
HORIZON_START = date(2027, 3, 8)
HORIZON_DAYS = 14
HOLIDAYS = [date(2027, 1, 18), date(2027, 2, 15)] + [
    date(2027, 3, 29) + timedelta(days=n) for n in range(5)
]
AFTER_BREAK = date(2027, 4, 5)
ZONES = [
    "America/New_York",
    "America/Chicago",
    "America/Denver",
    "America/Los_Angeles",
    "Europe/London",
]
PRE_ROLL_S = 120
# With the pre-roll, more than the five-minute break: neighbours have to share it.
POST_ROLL_S = 240
TARGET_S = 5.0

Row = tuple[str, date, str, datetime, datetime]


def bells(name: str, length_min: int) -> BellSchedule:
    periods = []
    for n in range(PERIODS):
        start = datetime(2000, 1, 1, 8) + timedelta(minutes=n * (length_min + 5))
        end = start + timedelta(minutes=length_min)
        periods.append(Period(name=f"Period {n + 1}", start=start.time(), end=end.time()))
    return BellSchedule(name=name, periods=periods)


def term_last_day() -> date:
    """The date on which the term reaches its 90th school day."""
    day, counted = TERM_START, 0
    while True:
        if day.isoweekday() <= 5 and day not in HOLIDAYS:
            counted += 1
            if counted == TERM_DAYS:
                return day
        day += timedelta(days=1)


def early_release_days(last: date) -> list[date]:
    """Every other Wednesday."""
    first_wednesday = TERM_START + timedelta(days=2)
    return [
        day
        for day in (first_wednesday + timedelta(weeks=n) for n in range(0, 60, 2))
        if day <= last and day not in HOLIDAYS
    ]


def room_periods(room: int) -> list[str]:
    return [f"Period {room % PERIODS + 1}", f"Period {(room + 3) % PERIODS + 1}"]


def build(schools: int) -> tuple[list[School], dict[str, list[CapturePlan]]]:
    last = term_last_day()
    calendar = SchoolCalendar(
        first_day=TERM_START,
        last_day=last,
        default_day_type="Regular",
        rotation=["A", "B"],
        days=[CalendarDay(date=d, holiday=True) for d in HOLIDAYS]
        + [CalendarDay(date=d, day_type="Early release") for d in early_release_days(last)]
        + [CalendarDay(date=AFTER_BREAK, rotation="A", note="rotation restarts")],
    )
    result: list[School] = []
    plans: dict[str, list[CapturePlan]] = {}
    for s in range(schools):
        name = f"School {s:03d}"
        result.append(
            School(
                name=name,
                timezone=ZONES[s % len(ZONES)],
                bell_schedules=[bells("Regular bells", 45), bells("Early bells", 30)],
                day_types=[
                    DayType(name="Regular", bell_schedule="Regular bells"),
                    DayType(name="Early release", bell_schedule="Early bells"),
                ],
                calendar=calendar,
                rooms=[
                    Room(name=f"Room {r:02d}", device_id=f"unit-{s:03d}-{r:02d}")
                    for r in range(ROOMS_PER_SCHOOL)
                ],
            )
        )
        plans[name] = [plan(name, r, room_periods(r)) for r in range(ROOMS_PER_SCHOOL)] + [
            plan(name, r, [f"Period {n + 1}" for n in range(PERIODS)], "whole day")
            for r in range(0, ROOMS_PER_SCHOOL, 10)
        ]
    return result, plans


def plan(school: str, room: int, periods: list[str], what: str = "coaching") -> CapturePlan:
    return CapturePlan(
        name=f"Room {room:02d} {what}",
        school=school,
        rooms=[f"Room {room:02d}"],
        periods=periods,
        first_day=TERM_START,
        last_day=date(2027, 12, 31),
        pre_roll_s=PRE_ROLL_S,
        post_roll_s=POST_ROLL_S,
    )


def expand_term(schools: list[School], plans: dict[str, list[CapturePlan]]) -> int:
    assert schools[0].calendar is not None
    first, last = schools[0].calendar.first_day, schools[0].calendar.last_day
    return sum(len(expand(s, plans[s.name], first, last)) for s in schools)


def desired_states(schools: list[School], plans: dict[str, list[CapturePlan]]) -> list[int]:
    """The JSON size of every unit's desired state for the horizon."""
    last = HORIZON_START + timedelta(days=HORIZON_DAYS - 1)
    sizes = []
    for school in schools:
        windows = expand(school, plans[school.name], HORIZON_START, last)
        for schedule in unit_windows(windows).values():
            sizes.append(len(DesiredState(version=1, schedule=schedule).to_json()))
    return sizes


def naive_rows(schools: list[School], first: date, last: date) -> Iterator[Row]:
    """The baseline: weekdays minus holidays, wall-clock times taken as they are, rolls
    added, no rotation, zones, merging or validation."""
    holidays = set(HOLIDAYS)
    early = set(early_release_days(last))
    regular = {p.name: (p.start, p.end) for p in bells("Regular bells", 45).periods}
    short = {p.name: (p.start, p.end) for p in bells("Early bells", 30).periods}
    pre, post = timedelta(seconds=PRE_ROLL_S), timedelta(seconds=POST_ROLL_S)
    wanted = {
        r: sorted(set(room_periods(r)) | (set(regular) if r % 10 == 0 else set()))
        for r in range(ROOMS_PER_SCHOOL)
    }
    for _school in schools:
        day = first
        while day <= last:
            if day.isoweekday() <= 5 and day not in holidays:
                times = short if day in early else regular
                for room, periods in wanted.items():
                    for period in periods:
                        start, end = times[period]
                        yield (
                            f"Room {room:02d}",
                            day,
                            period,
                            datetime.combine(day, start) - pre,
                            datetime.combine(day, end) + post,
                        )
            day += timedelta(days=1)


@dataclass
class Timing:
    """Medians over the rounds: elapsed time, and this process's CPU time, which a busy
    machine inflates less."""

    wall: float
    cpu: float

    def __str__(self) -> str:
        return f"{self.wall:6.2f} s (cpu {self.cpu:5.2f} s)"


def timed(action: Callable[[], object], rounds: int) -> Timing:
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return Timing(statistics.median(walls), statistics.median(cpus))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--schools", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{describe_machine()}, load average {os.getloadavg()[0]:.1f}")

    start = time.perf_counter()
    schools, plans = build(args.schools)
    rooms = sum(len(s.rooms) for s in schools)
    print(
        f"{len(schools)} schools, {rooms} rooms, {sum(map(len, plans.values()))} plans, "
        f"term {TERM_START}..{term_last_day()} ({TERM_DAYS} school days): "
        f"built and validated in {time.perf_counter() - start:.2f} s"
    )

    horizon_last = HORIZON_START + timedelta(days=HORIZON_DAYS - 1)
    term_windows = expand_term(schools, plans)
    sizes = desired_states(schools, plans)
    term_rows = sum(1 for _ in naive_rows(schools, TERM_START, term_last_day()))
    horizon_rows = sum(1 for _ in naive_rows(schools, HORIZON_START, horizon_last))
    horizon_windows = sum(
        len(expand(s, plans[s.name], HORIZON_START, horizon_last)) for s in schools
    )
    if (term_rows, horizon_rows) != (term_windows, horizon_windows):
        print(f"baseline made {term_rows}/{horizon_rows} rows for {term_windows}/{horizon_windows}")
        return 1

    a = timed(lambda: expand_term(schools, plans), args.rounds)
    b = timed(lambda: desired_states(schools, plans), args.rounds)
    base_a = timed(lambda: list(naive_rows(schools, TERM_START, term_last_day())), args.rounds)
    base_b = timed(lambda: list(naive_rows(schools, HORIZON_START, horizon_last)), args.rounds)

    print(f"  (a) expand the term: {term_windows} windows")
    print(f"      median {a}   baseline {base_a}   ratio {a.wall / base_a.wall:4.1f}x")
    print(
        f"  (b) desired state, {HORIZON_DAYS}-day horizon: {len(sizes)} units, "
        f"{horizon_windows} windows"
    )
    print(f"      median {b}   baseline {base_b}   ratio {b.wall / base_b.wall:4.1f}x")
    total = a.wall + b.wall
    print(
        f"  (a)+(b) {total:.2f} s (cpu {a.cpu + b.cpu:.2f} s), target under {TARGET_S:.0f} s: "
        f"{'met' if total < TARGET_S else 'MISSED'}; "
        f"ratio to baseline {total / (base_a.wall + base_b.wall):.1f}x"
    )
    print(
        f"  largest desired document {max(sizes)} bytes "
        f"(limit MAX_PAYLOAD_BYTES {MAX_PAYLOAD_BYTES})"
    )

    baseline_name = "plain loop of naive (room, date, period, start, end) tuples"
    rooms_label = f"{rooms:,} rooms"
    report(
        f"schedule: expand a {TERM_DAYS}-day term, {rooms_label}",
        a.wall,
        "s",
        baseline=base_a.wall,
        baseline_name=baseline_name,
        note=f"{term_windows:,} windows; cpu {a.cpu:.2f} s",
    )
    report(
        f"schedule: every unit's desired state, {HORIZON_DAYS}-day horizon",
        b.wall,
        "s",
        baseline=base_b.wall,
        baseline_name=baseline_name,
        note=f"{len(sizes):,} units, {horizon_windows:,} windows; cpu {b.cpu:.2f} s",
    )
    report(
        f"schedule: term + desired states, {rooms_label}",
        total,
        "s",
        baseline=base_a.wall + base_b.wall,
        baseline_name=baseline_name,
        target=at_most(TARGET_S),
        note=f"cpu {a.cpu + b.cpu:.2f} s",
    )
    report(
        "schedule: largest desired document",
        max(sizes),
        "bytes",
        target=at_most(MAX_PAYLOAD_BYTES),
        note="MAX_PAYLOAD_BYTES is the limit",
    )
    return 0 if max(sizes) <= MAX_PAYLOAD_BYTES else 1


if __name__ == "__main__":
    raise SystemExit(main())
