"""Bell schedule and calendar imports: what a good file gives, and that a file with one bad
line is refused with that line named and nothing imported."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, time
from pathlib import Path

import pytest

from controller.schedule_import import (
    MAX_IMPORT_BYTES,
    CalendarImport,
    ImportProblem,
    Skipped,
    decode_upload,
    import_bell_schedule_ics,
    import_bell_schedules_csv,
    import_calendar_csv,
    import_calendar_ics,
)
from shared.schedule import (
    BellSchedule,
    CalendarDay,
    DayType,
    Period,
    School,
    SchoolCalendar,
    school_days,
)

DATA = Path(__file__).resolve().parent / "data"


def fixture(name: str, newline: str | None = None) -> str:
    text = (DATA / name).read_bytes().decode("utf-8").replace("\r\n", "\n")
    return text if newline is None else text.replace("\n", newline)


def bells(name: str, *spans: tuple[str, str, str]) -> BellSchedule:
    return BellSchedule(
        name=name,
        periods=[
            Period(name=n, start=time.fromisoformat(a), end=time.fromisoformat(b))
            for n, a, b in spans
        ],
    )


def lincoln(calendar: bool = True) -> School:
    return School(
        name="Lincoln High",
        timezone="America/New_York",
        bell_schedules=[
            bells("Regular", ("Period 1", "08:00", "08:50"), ("Period 2", "08:55", "09:45")),
            bells("Early Release", ("Period 1", "08:00", "08:30")),
            bells("Assembly", ("Assembly", "08:00", "09:00")),
        ],
        day_types=[
            DayType(name="Regular", bell_schedule="Regular"),
            DayType(name="Early release", bell_schedule="Early Release"),
            DayType(name="Assembly", bell_schedule="Assembly"),
        ],
        calendar=SchoolCalendar(
            first_day=date(2024, 8, 26),
            last_day=date(2025, 6, 13),
            default_day_type="Regular",
            rotation=["A", "B"],
            days=[CalendarDay(date=date(2024, 10, 1), holiday=True, note="old")],
        )
        if calendar
        else None,
    )


def refused(call: Callable[..., object], *args: object) -> ImportProblem:
    """The problem an import raised; the school it was given must be untouched."""
    school = args[0]
    assert isinstance(school, School)
    before = school.model_dump()
    with pytest.raises(ImportProblem) as caught:
        call(*args)
    assert school.model_dump() == before
    return caught.value


def schedule(school: School, name: str) -> BellSchedule:
    return next(b for b in school.bell_schedules if b.name == name)


def spans(found: BellSchedule) -> list[tuple[str, str, str]]:
    return [(p.name, f"{p.start:%H:%M:%S}", f"{p.end:%H:%M:%S}") for p in found.periods]


# -- bell schedules from CSV ---------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_bell_csv_replaces_the_schedules_it_names(newline: str) -> None:
    school = lincoln()
    imported = import_bell_schedules_csv(school, fixture("bells.csv", newline))
    assert [b.name for b in imported.bell_schedules] == ["Regular", "Early Release", "Assembly"]
    assert len(schedule(imported, "Regular").periods) == 7
    assert spans(schedule(imported, "Early Release"))[-1] == ("Period 6", "10:55:00", "11:25:30")
    assert schedule(imported, "Assembly") == schedule(school, "Assembly")
    assert imported.day_types == school.day_types
    assert imported.calendar == school.calendar


def test_bell_csv_header_any_case_and_order_bom_and_unsorted_periods() -> None:
    text = (
        "\ufeffEND, Start ,PERIOD,schedule\r\n"
        "\r\n"
        "09:40,8:50,P2,regular\r\n"
        "08:45,08:00,P1,regular\r\n"
    )
    imported = import_bell_schedules_csv(lincoln(), text)
    # Matched ignoring case, keeping the school's spelling that day types refer to.
    assert spans(schedule(imported, "Regular")) == [
        ("P1", "08:00:00", "08:45:00"),
        ("P2", "08:50:00", "09:40:00"),
    ]


def test_bell_csv_adds_a_new_schedule() -> None:
    text = "schedule,period,start,end\nTwo hour delay,Period 1,10:00,10:35\n"
    imported = import_bell_schedules_csv(lincoln(), text)
    assert [b.name for b in imported.bell_schedules][-1] == "Two hour delay"


GOOD_BELL_ROWS = [
    "schedule,period,start,end",
    "Regular,Period 1,08:00,08:50",
    "",
    "Regular,Period 2,08:55,09:45",
    "Early Release,Period 1,08:00,08:30",
]


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ("Regular,Period 3,8h15,09:00", "start '8h15' is not a time"),
        ("Regular,Period 3,09:50,25:00", "end '25:00' is not a time of day"),
        ("Regular,Period 3,09:50,09:50", "ends at 09:50:00 but starts at 09:50:00"),
        ("Regular,Period 3,10:40,09:50", "ends at 09:50:00 but starts at 10:40:00"),
        ("Regular,Period 3,09:40,10:30", "overlaps 'Period 2' (08:55-09:45) on line 4"),
        ("Regular,period-1,11:00,11:30", "'period-1' of 'Regular' is also on line 2"),
        (",Period 3,09:50,10:40", "no schedule name"),
        ("Regular,,09:50,10:40", "no period name"),
        ("Regular,Period 3,09:50,", "end '' is not a time"),
        ("Regular," + "x" * 61 + ",09:50,10:40", "longer than 60 characters"),
        ("Regular,***,09:50,10:40", "needs at least one letter or digit"),
        ("Regular,Period 3,09:50,10:40,extra", "5 cells but 4 columns"),
    ],
)
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_bell_csv_bad_row_among_good_ones(row: str, words: str, newline: str) -> None:
    text = newline.join([*GOOD_BELL_ROWS[:4], row, *GOOD_BELL_ROWS[4:], ""])
    found = refused(import_bell_schedules_csv, lincoln(), text)
    assert found.line == 5
    assert words in found.reason
    assert str(found) == f"line 5: {found.reason}"


def test_bell_csv_line_numbers_count_quoted_multiline_cells() -> None:
    text = 'schedule,period,start,end\nRegular,"Period\n1",08:00,08:50\nRegular,P2,9,10:00\n'
    found = refused(import_bell_schedules_csv, lincoln(), text)
    assert found.line == 4


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("", None, "the file is empty"),
        ("\n\n", None, "the file is empty"),
        ("schedule,period,start,end\n", None, "no bell schedule rows"),
        ("\nschedule,period,start\nRegular,P1,08:00\n", 2, "no 'end' column"),
        ("schedule,period,start,end,room\n", 1, "unknown column 'room'"),
        ("schedule,period,start,end,Start\n", 1, "column 'start' appears twice"),
    ],
)
def test_bell_csv_bad_files(text: str, line: int | None, words: str) -> None:
    found = refused(import_bell_schedules_csv, lincoln(), text)
    assert found.line == line
    assert words in found.reason


def test_bell_csv_more_than_thirty_periods() -> None:
    rows = [
        f"Long,P{i},{i // 2:02d}:{(i % 2) * 30:02d},{i // 2:02d}:{(i % 2) * 30 + 20:02d}"
        for i in range(31)
    ]
    found = refused(
        import_bell_schedules_csv, lincoln(), "\n".join(["schedule,period,start,end", *rows])
    )
    assert found.line == 32
    assert "more than 30 periods" in found.reason


def test_bell_csv_matches_schedule_names_ignoring_case_and_punctuation() -> None:
    text = "schedule,period,start,end\nEarly-release,P1,08:00,08:30\n"
    imported = import_bell_schedules_csv(lincoln(), text)
    assert [b.name for b in imported.bell_schedules] == ["Regular", "Early Release", "Assembly"]
    assert spans(schedule(imported, "Early Release")) == [("P1", "08:00:00", "08:30:00")]


# -- a bell schedule from iCalendar --------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_bell_ics_reads_wall_clock_times_in_the_school_zone(newline: str) -> None:
    imported = import_bell_schedule_ics(
        lincoln(), fixture("bells_early_release.ics", newline), "early release"
    )
    assert spans(schedule(imported, "Early Release")) == [
        ("Period 1", "08:00:00", "08:30:00"),  # TZID via the VTIMEZONE's X-LIC-LOCATION
        ("Period 2", "08:35:00", "09:05:00"),  # UTC, in EDT
        ("Period 3", "09:10:00", "09:40:00"),  # floating, with DURATION
        ("Advisory, Homeroom", "09:45:00", "10:15:00"),
    ]
    assert schedule(imported, "Regular") == schedule(lincoln(), "Regular")


def bell_ics(*events: tuple[str, ...]) -> str:
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//test//EN"]
    for event in events:
        lines += ["BEGIN:VEVENT", *event, "END:VEVENT"]
    return "\r\n".join([*lines, "END:VCALENDAR", ""])


P1 = ("SUMMARY:Period 1", "DTSTART:20250115T130000Z", "DTEND:20250115T135000Z")


def test_bell_ics_in_winter_uses_standard_time_and_adds_a_schedule() -> None:
    text = bell_ics(P1, ("SUMMARY:Period 2", "DTSTART:20250115T085500", "DTEND:20250115T094500"))
    imported = import_bell_schedule_ics(lincoln(), text, "  Winter  exams ")
    assert spans(schedule(imported, "Winter exams")) == [
        ("Period 1", "08:00:00", "08:50:00"),
        ("Period 2", "08:55:00", "09:45:00"),
    ]


# The second event's BEGIN:VEVENT is line 9, its first property line 10.
@pytest.mark.parametrize(
    ("second", "line", "words"),
    [
        (
            ("DTSTART:20250116T140000Z", "DTEND:20250116T144000Z", "SUMMARY:Period 2"),
            10,
            "starts on 2025-01-16, but the first event is on 2025-01-15",
        ),
        (
            ("DTSTART;VALUE=DATE:20250115", "SUMMARY:Period 2"),
            10,
            "an all-day event",
        ),
        (
            ("DTSTART:20250115T233000", "DTEND:20250116T003000", "SUMMARY:Late"),
            11,
            "ends on another day",
        ),
        (
            ("DTSTART:20250115T134000Z", "DTEND:20250115T143000Z", "SUMMARY:Period 2"),
            10,
            "overlaps 'Period 1' (08:00-08:50) on line 6",
        ),
        (
            ("DTSTART:20250115T140000Z", "DTEND:20250115T135500Z", "SUMMARY:Period 2"),
            11,
            "DTEND is before DTSTART",
        ),
        (
            ("DTSTART:20250115T140000Z", "DTEND:20250115T144000", "SUMMARY:Period 2"),
            11,
            "one of DTSTART and DTEND has a timezone, the other not",
        ),
        (
            ("DTSTART:20250115T140000Z", "DTEND;VALUE=DATE:20250116", "SUMMARY:Period 2"),
            11,
            "not the same kind",
        ),
        (
            ("DTSTART:20250115T140000Z", "DTEND:20250115T144000Z"),
            9,
            "without SUMMARY",
        ),
        (
            ("DTEND:20250115T144000Z", "SUMMARY:Period 2"),
            9,
            "the VEVENT has no DTSTART",
        ),
        (
            ("DTSTART:20250115T140000Z", "DTEND:20250115T144000Z", "SUMMARY:PERIOD 1"),
            10,
            "'PERIOD 1' of 'Early' is also on line 6",
        ),
        (
            ("DTSTART:20250132T140000Z", "DTEND:20250115T144000Z", "SUMMARY:Period 2"),
            10,
            "DTSTART is not a real date",
        ),
        (
            ("DTSTART;TZID=Pacific/Nowhere:20250115T090000", "SUMMARY:Period 2"),
            10,
            "unknown timezone",
        ),
        (
            ("DTSTART:20250115T140000Z", "DURATION:PT40", "SUMMARY:Period 2"),
            11,
            "DURATION is not a duration",
        ),
    ],
)
def test_bell_ics_bad_event_among_good_ones(second: tuple[str, ...], line: int, words: str) -> None:
    text = bell_ics(
        P1, second, ("SUMMARY:Period 3", "DTSTART:20250115T150000Z", "DTEND:20250115T155000Z")
    )
    found = refused(import_bell_schedule_ics, lincoln(), text, "Early")
    assert (found.line, words in found.reason) == (line, True), found


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (bell_ics(), None, "the file has no events"),
        ("schedule,period,start,end\r\n", 1, "not an iCalendar file"),
        (
            bell_ics(P1).replace("END:VEVENT", "END:VTODO"),
            8,
            "END:VTODO but BEGIN:VEVENT at line 4",
        ),
        (bell_ics(P1).replace("END:VCALENDAR\r\n", ""), 1, "BEGIN:VCALENDAR is never closed"),
    ],
)
def test_bell_ics_bad_files(text: str, line: int | None, words: str) -> None:
    found = refused(import_bell_schedule_ics, lincoln(), text, "Early")
    assert found.line == line
    assert words in found.reason


@pytest.mark.parametrize("name", ["", "   ", "!!!", "x" * 61])
def test_bell_ics_needs_a_usable_name(name: str) -> None:
    found = refused(import_bell_schedule_ics, lincoln(), bell_ics(P1), name)
    assert found.line is None


# -- calendars from CSV --------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_calendar_csv_replaces_the_exception_days(newline: str) -> None:
    school = lincoln()
    result = import_calendar_csv(school, fixture("calendar.csv", newline))
    assert isinstance(result, CalendarImport)
    assert result.skipped == []
    calendar = result.school.calendar
    assert calendar is not None and school.calendar is not None
    assert result.days == len(calendar.days) == 16
    kept = calendar.model_dump(exclude={"days"})
    assert kept == school.calendar.model_dump(exclude={"days"})
    by_date = {d.date: d for d in calendar.days}
    assert date(2024, 10, 1) not in by_date  # the old exception day is gone
    assert by_date[date(2024, 9, 2)] == CalendarDay(
        date=date(2024, 9, 2), holiday=True, note="Labor Day"
    )
    assert by_date[date(2024, 9, 16)].rotation == "A"
    assert by_date[date(2024, 11, 22)] == CalendarDay(
        date=date(2024, 11, 22),
        day_type="Early release",
        rotation="B",
        note="Early release, B day",
    )
    # A range covers the term's weekdays only: the fall break weekend stays a weekend.
    assert sorted(d for d in by_date if d.month == 10) == [date(2024, 10, 18), date(2024, 10, 21)]
    winter = [d for d in by_date if date(2024, 12, 23) <= d <= date(2025, 1, 3)]
    assert len(winter) == 10 and all(by_date[d].holiday for d in winter)


def test_calendar_csv_minimal_header_and_no_school_spelling() -> None:
    text = "Date,Day Type\n2024-09-02,NO   SCHOOL\n2024-09-07,assembly\n"
    result = import_calendar_csv(lincoln(), text)
    assert result.school.calendar is not None
    assert result.school.calendar.days == [
        CalendarDay(date=date(2024, 9, 2), holiday=True),
        # A single Saturday row makes that Saturday a school day.
        CalendarDay(date=date(2024, 9, 7), day_type="Assembly"),
    ]


GOOD_CALENDAR_ROWS = [
    "date,day_type,rotation,note,end_date",
    "2024-09-02,holiday,,Labor Day,",
    "2024-09-13,Early release,,,",
    "",
    "2024-11-25,Holiday,,Thanksgiving,2024-11-29",
]


@pytest.mark.parametrize(
    ("row", "line", "words"),
    [
        ("2024-08-23,holiday,,,", 4, "2024-08-23 is outside the term (2024-08-26 to 2025-06-13)"),
        ("2025-06-10,holiday,,,2025-06-20", 4, "2025-06-20 is outside the term"),
        ("2024-09-13,Assembly,,,", 4, "2024-09-13 is also on line 3"),
        # The Thanksgiving row after it repeats a date of this range.
        ("2024-11-20,holiday,,,2024-11-26", 6, "2024-11-25 is also on line 4"),
        ("2024-09-20,Half day,,,", 4, "unknown day type 'Half day' (known: Assembly, Early"),
        ("2024-09-20,,C,,", 4, "unknown rotation day 'C' (A, B)"),
        ("2024-09-20,holiday,A,,", 4, "a holiday has no rotation day"),
        ("2024-09-20,,,just a note,", 4, "say holiday, a day type or a rotation day"),
        ("2024-09-20,,A,,2024-09-23", 4, "a rotation day is one date"),
        ("20/09/2024,holiday,,,", 4, "date '20/09/2024' is not a date (YYYY-MM-DD)"),
        ("2024-09-31,holiday,,,", 4, "date '2024-09-31' is not a date"),
        ("2024-09-20,holiday,,,2024-09-19", 4, "end_date 2024-09-19 is before date 2024-09-20"),
        ("2024-09-20,holiday,," + "n" * 201 + ",", 4, "the note is longer than 200 characters"),
        ('2024-09-20,holiday,,"unclosed', 4, "not valid CSV: unexpected end of data"),
        ('2024-09-20,holiday,,"quoted"text,', 4, "not valid CSV: ',' expected after"),
    ],
)
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_calendar_csv_bad_row_among_good_ones(
    row: str, line: int, words: str, newline: str
) -> None:
    text = newline.join([*GOOD_CALENDAR_ROWS[:3], row, *GOOD_CALENDAR_ROWS[3:], ""])
    found = refused(import_calendar_csv, lincoln(), text)
    assert found.line == line
    assert words in found.reason


def test_calendar_csv_same_date_twice_names_both_lines() -> None:
    text = "date,day_type\n2024-09-02,holiday\n2024-09-03,Assembly\n\n2024-09-02,Early release\n"
    found = refused(import_calendar_csv, lincoln(), text)
    assert found.line == 5
    assert found.reason == "2024-09-02 is also on line 2"


def test_calendar_csv_needs_a_term() -> None:
    found = refused(import_calendar_csv, lincoln(calendar=False), "date,day_type\n")
    assert found.line is None
    assert found.reason.endswith("set the term first")


def test_calendar_csv_without_rows_clears_the_exception_days() -> None:
    result = import_calendar_csv(lincoln(), "date,day_type,rotation,note\n")
    assert result.days == 0
    assert result.school.calendar is not None and result.school.calendar.days == []


# -- calendars from iCalendar --------------------------------------------------------------


def event_line(text: str, uid: str) -> int:
    lines = text.split("\n")
    at = next(i for i, line in enumerate(lines) if line.strip() == f"UID:{uid}")
    return max(i for i in range(at) if lines[i].strip() == "BEGIN:VEVENT") + 1


def test_district_feed() -> None:
    text = fixture("district_2024_25.ics")
    results = {
        newline: import_calendar_ics(lincoln(), text.replace("\n", newline))
        for newline in ("\n", "\r\n")
    }
    assert results["\n"] == results["\r\n"]
    result = results["\n"]
    calendar = result.school.calendar
    assert calendar is not None
    by_date = {d.date: d for d in calendar.days}
    assert result.days == len(by_date) == 31
    holidays = sorted(d for d, day in by_date.items() if day.holiday)
    assert len(holidays) == 25
    for holiday in [
        date(2024, 9, 2),  # "Labor Day - No School"
        date(2024, 10, 14),  # CATEGORIES:No School
        date(2024, 11, 11),  # "Veterans Day\, Schools Closed"
        date(2024, 11, 29),  # last day of a three-day break
        date(2025, 1, 20),  # an en dash in the title
        date(2025, 5, 26),  # CATEGORIES:Holiday
    ]:
        assert holiday in holidays
    assert [d for d in holidays if d.month == 10] == [
        date(2024, 10, 14),
        date(2024, 10, 18),
        date(2024, 10, 21),
    ]
    assert by_date[date(2024, 11, 11)].note == "Veterans Day, Schools Closed"
    early = sorted(d for d, day in by_date.items() if day.day_type == "Early release")
    assert early == [date(2024, 9, 13), date(2024, 10, 10), date(2024, 11, 22), date(2025, 6, 13)]
    assert by_date[date(2024, 9, 16)].rotation == "A"
    assert by_date[date(2024, 9, 17)].rotation == "B"
    assert by_date[date(2024, 11, 22)] == CalendarDay(
        date=date(2024, 11, 22),
        day_type="Early release",
        rotation="B",
        note="Early Release; B Day",
    )
    assert result.skipped == [
        Skipped(event_line(text, uid), summary, reason)
        for uid, summary, reason in [
            (
                "first-day-2024@lincolnusd.example",
                "First Day of School",
                "not a holiday, day type or rotation day of this school",
            ),
            (
                "board-20240917@lincolnusd.example",
                "Board of Education Meeting",
                "has a time of day; only all-day events are read",
            ),
            (
                "picture-day-2024@lincolnusd.example",
                "Picture Day",
                "not a holiday, day type or rotation day of this school",
            ),
            (
                "football-2024@lincolnusd.example",
                "Varsity Football Home Game",
                "a repeating event; list each date as its own event",
            ),
            (
                "staff-meeting-20241119@lincolnusd.example",
                "Staff Meeting",
                "has a time of day; only all-day events are read",
            ),
            ("snow-makeup-2024@lincolnusd.example", "Snow Make-up Day (if needed)", "cancelled"),
            (
                "summer-2025@lincolnusd.example",
                "Summer Vacation",
                "outside the term (2024-08-26 to 2025-06-13)",
            ),
        ]
    ]
    # What the units will follow: no school on Labor Day, the early release bells on the
    # 13th, and the rotation set to A on the 16th whatever came before.
    september = list(school_days(result.school, date(2024, 9, 2), date(2024, 9, 17)))
    assert date(2024, 9, 2) not in [d.date for d in september]
    by_day = {d.date: d for d in september}
    assert by_day[date(2024, 9, 13)].bell_schedule.name == "Early Release"
    assert (by_day[date(2024, 9, 16)].rotation, by_day[date(2024, 9, 17)].rotation) == ("A", "B")


def calendar_ics(*events: tuple[str, ...]) -> str:
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//test//EN"]
    for event in events:
        lines += ["BEGIN:VEVENT", *event, "END:VEVENT"]
    return "\r\n".join([*lines, "END:VCALENDAR", ""])


# As the first event: BEGIN:VEVENT on line 4, the second event's on line 8.
LABOR_DAY = ("DTSTART;VALUE=DATE:20240902", "SUMMARY:Labor Day - No School")
EARLY = ("DTSTART;VALUE=DATE:20240913", "SUMMARY:early release")
BREAK = ("DTSTART;VALUE=DATE:20241125", "DTEND;VALUE=DATE:20241130", "SUMMARY:Thanksgiving Break")


def test_calendar_ics_classifies_summaries_then_categories() -> None:
    text = calendar_ics(
        ("DTSTART;VALUE=DATE:20240902", "SUMMARY:Labor Day", "CATEGORIES:Holidays"),
        ("DTSTART:20240903", "SUMMARY:Day-A"),
        ("DTSTART:20240904", "DURATION:P1D", "SUMMARY:b"),
        ("DTSTART:20240905", "DTEND:20240905", "SUMMARY:ASSEMBLY"),
        ("DTSTART:20240906", "SUMMARY:Breakfast with the Principal"),
        ("DTSTART:20240909", "SUMMARY:Spring recess", "CATEGORIES:Assembly"),
        ("DTSTART:20240910", "CATEGORIES:Fundraiser,A Day"),
        ("DTSTART:20240911", "SUMMARY:C Day"),
        ("DTSTART:20240912", "DTEND:20240914", "SUMMARY:B Day"),
        ("DTSTART:20240914", "DTEND:20240916", "SUMMARY:Weekend break"),
    )
    result = import_calendar_ics(lincoln(), text)
    assert result.school.calendar is not None
    assert [
        (d.date.day, d.holiday, d.day_type, d.rotation) for d in result.school.calendar.days
    ] == [
        (2, True, None, None),
        (3, False, None, "A"),
        (4, False, None, "B"),
        (5, False, "Assembly", None),
        (9, True, None, None),
        (10, False, None, "A"),
    ]
    assert [(s.summary, s.reason) for s in result.skipped] == [
        ("Breakfast with the Principal", "not a holiday, day type or rotation day of this school"),
        ("C Day", "not a holiday, day type or rotation day of this school"),
        ("B Day", "a rotation day is one date, this event spans several"),
        ("Weekend break", "no school weekday in its dates"),
    ]


def test_calendar_ics_clips_a_break_to_the_term() -> None:
    text = calendar_ics(("DTSTART:20250609", "DTEND:20250701", "SUMMARY:Summer Break"))
    result = import_calendar_ics(lincoln(), text)
    assert result.school.calendar is not None
    assert [d.date.day for d in result.school.calendar.days] == [9, 10, 11, 12, 13]


@pytest.mark.parametrize(
    ("first", "second", "words"),
    [
        (
            LABOR_DAY,
            ("DTSTART;VALUE=DATE:20240902", "SUMMARY:Assembly"),
            "2024-09-02: day type 'Assembly' conflicts with holiday on line 4",
        ),
        (
            EARLY,
            ("DTSTART;VALUE=DATE:20240913", "SUMMARY:Assembly"),
            "2024-09-13: day type 'Assembly' conflicts with day type 'Early release' on line 4",
        ),
        (
            EARLY,
            ("DTSTART;VALUE=DATE:20240913", "SUMMARY:No school"),
            "2024-09-13: holiday conflicts with day type 'Early release' on line 4",
        ),
    ],
)
def test_calendar_ics_conflicts_name_both_events(
    first: tuple[str, ...], second: tuple[str, ...], words: str
) -> None:
    found = refused(import_calendar_ics, lincoln(), calendar_ics(first, second, BREAK))
    assert (found.line, found.reason) == (8, words)


def test_calendar_ics_day_type_and_rotation_day_on_one_date_combine() -> None:
    text = calendar_ics(EARLY, ("DTSTART;VALUE=DATE:20240913", "SUMMARY:A Day"), EARLY)
    result = import_calendar_ics(lincoln(), text)
    assert result.school.calendar is not None
    assert result.school.calendar.days == [
        CalendarDay(
            date=date(2024, 9, 13),
            day_type="Early release",
            rotation="A",
            note="early release; A Day",
        )
    ]


def test_calendar_ics_two_rotation_days_on_one_date() -> None:
    text = calendar_ics(
        BREAK,
        ("DTSTART:20240916", "SUMMARY:A Day"),
        ("DTSTART:20240916", "SUMMARY:Early Release"),
        ("DTSTART:20240916", "SUMMARY:Day B"),
    )
    found = refused(import_calendar_ics, lincoln(), text)
    assert found.line == 17
    assert found.reason == (
        "2024-09-16: rotation day 'B' conflicts with day type 'Early release' and "
        "rotation day 'A' on line 9, 13"
    )


@pytest.mark.parametrize(
    ("bad", "line", "words"),
    [
        (("DTSTART;VALUE=DATE:20240231", "SUMMARY:Picture Day"), 9, "DTSTART is not a real date"),
        (("DTSTART;VALUE=DATE:2024-09-20", "SUMMARY:Picture Day"), 9, "not a date (YYYYMMDD)"),
        (("SUMMARY:No date",), 8, "the VEVENT has no DTSTART"),
        (("DTSTART:20240920", "DTSTART:20240921", "SUMMARY:x"), 10, "DTSTART appears twice"),
        (("DTSTART:20240920", "DTEND:20240919", "SUMMARY:x"), 10, "DTEND is before DTSTART"),
        (("DTSTART:20240920T250000", "SUMMARY:x"), 9, "not a real date"),
        (("DTSTART;TZID=Nowhere:20240920T0800", "SUMMARY:x"), 9, "not a date-time"),
        (
            ("DTSTART;VALUE=PERIOD:20240920T080000Z/PT1H", "SUMMARY:x"),
            9,
            "unsupported VALUE=PERIOD",
        ),
        (("DTSTART:20240920", "DURATION:one day", "SUMMARY:x"), 10, "DURATION is not a duration"),
        (
            ("DTSTART:20240920", "SUMMARY;LANGUAGE=en", "END:VEVENT"),
            10,
            "expected ':' after SUMMARY",
        ),
        (
            ("DTSTART:20240920", "BEGIN:VALARM", "END:VEVENT"),
            11,
            "END:VEVENT but BEGIN:VALARM at line 10",
        ),
    ],
)
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_calendar_ics_malformed_event_among_good_ones(
    bad: tuple[str, ...], line: int, words: str, newline: str
) -> None:
    text = calendar_ics(LABOR_DAY, bad, BREAK).replace("\r\n", newline)
    found = refused(import_calendar_ics, lincoln(), text)
    assert found.line == line
    assert words in found.reason


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("date,day_type\n2024-09-02,holiday\n", 1, "not an iCalendar file"),
        ("", None, "not an iCalendar file"),
        (
            "BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART:20240902\nEND:VEVENT\n",
            1,
            "BEGIN:VCALENDAR is never closed",
        ),
        (calendar_ics(LABOR_DAY) + "BEGIN:VEVENT\r\n", 9, "content after END:VCALENDAR"),
        (" continued\nBEGIN:VCALENDAR\nEND:VCALENDAR\n", 1, "continuation line"),
    ],
)
def test_calendar_ics_bad_files(text: str, line: int | None, words: str) -> None:
    found = refused(import_calendar_ics, lincoln(), text)
    assert found.line == line
    assert words in found.reason


def test_calendar_ics_needs_a_term() -> None:
    found = refused(import_calendar_ics, lincoln(calendar=False), calendar_ics(LABOR_DAY))
    assert (found.line, found.reason) == (
        None,
        "Lincoln High has no calendar yet: set the term first",
    )


# -- what every import refuses -------------------------------------------------------------


def test_uploads_must_be_utf8() -> None:
    assert decode_upload("\ufeffdate,day_type\n".encode()) == "date,day_type\n"
    with pytest.raises(ImportProblem) as caught:
        decode_upload(b"BEGIN:VCALENDAR\r\nSUMMARY:Caf\xe9\r\n")
    assert caught.value.line == 2
    assert "not UTF-8" in caught.value.reason


def test_text_with_undecodable_bytes_is_refused_with_its_line() -> None:
    text = b"date,day_type\n2024-09-02,holiday\n2024-09-03,Caf\xe9\n".decode(
        "utf-8", "surrogateescape"
    )
    found = refused(import_calendar_csv, lincoln(), text)
    assert found.line == 3
    assert "not UTF-8" in found.reason


@pytest.mark.parametrize(
    "call",
    [import_bell_schedules_csv, import_calendar_csv, import_calendar_ics],
)
def test_files_over_two_megabytes_are_refused(call: Callable[..., object]) -> None:
    huge = "x" * (MAX_IMPORT_BYTES + 1)
    found = refused(call, lincoln(), huge)
    assert (found.line, found.reason) == (None, "the file is larger than 2 MB")
    # Counted in UTF-8 bytes, not characters.
    wide = "é" * (MAX_IMPORT_BYTES // 2 + 1)
    assert refused(call, lincoln(), wide).reason == "the file is larger than 2 MB"
    with pytest.raises(ImportProblem):
        decode_upload(huge.encode())
    assert refused(import_bell_schedule_ics, lincoln(), huge, "x").line is None


def test_the_examples_in_the_docs_import() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "schedules.md").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", doc, re.S)
    bell_csv, calendar_csv = [body for kind, body in blocks if kind == "csv"]
    bell_ics = next(body for kind, body in blocks if "SUMMARY:Period 1" in body)
    school = import_bell_schedules_csv(lincoln(), bell_csv)
    assert [p.name for p in schedule(school, "Regular").periods] == [
        "Period 1",
        "Period 2",
        "Period 3",
        "Lunch",
    ]
    school = import_bell_schedule_ics(school, bell_ics, "Early Release")
    assert spans(schedule(school, "Early Release"))[1] == ("Period 2", "08:35:00", "09:05:00")
    assert import_calendar_csv(school, calendar_csv).days == 16
