"""The iCalendar reader and writer, and the per-unit capture feed built with them."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from controller import ical
from controller.ical import Component, ICalError, Property
from controller.schedule_export import PRODID, unit_calendar
from shared.schedule import PlannedWindow, window_id


def cal(*lines: str, newline: str = "\r\n") -> str:
    return newline.join(["BEGIN:VCALENDAR", "VERSION:2.0", *lines, "END:VCALENDAR", ""])


def problem(text: str) -> ICalError:
    with pytest.raises(ICalError) as caught:
        ical.parse(text)
    return caught.value


# -- unfolding and content lines -----------------------------------------------------------


@pytest.mark.parametrize("newline", ["\r\n", "\n", "\r"])
def test_unfold_keeps_the_line_each_content_line_starts_on(newline: str) -> None:
    text = newline.join(["A:one", " two", "\tthree", "", "B:x", "C:long", "  word", ""])
    assert list(ical.unfold(text)) == [(1, "A:onetwothree"), (5, "B:x"), (6, "C:long word")]


def test_a_continuation_with_nothing_before_it_is_an_error() -> None:
    with pytest.raises(ICalError) as caught:
        list(ical.unfold("\n continued"))
    assert caught.value.line == 2


def test_parameters_quoted_and_multi_valued() -> None:
    prop = ical.parse_line(
        4, 'attendee;ROLE=REQ-PARTICIPANT;DELEGATED-FROM="mailto:a@x",b;X-Q="a;b:c":mailto:c@x'
    )
    assert prop == Property(
        "ATTENDEE",
        "mailto:c@x",
        {"ROLE": ["REQ-PARTICIPANT"], "DELEGATED-FROM": ["mailto:a@x", "b"], "X-Q": ["a;b:c"]},
        4,
    )
    assert prop.param("role") == "REQ-PARTICIPANT"
    assert prop.param("tzid") is None


@pytest.mark.parametrize(
    "content",
    [
        "no colon here",
        ":value without a name",
        "DTSTART;TZID:20240901",
        'X;P="unclosed:value',
        "X;=a:b",
        "SUMMARY;:x",
        'X;P=a"b:c',
    ],
)
def test_malformed_content_lines(content: str) -> None:
    with pytest.raises(ICalError) as caught:
        ical.parse_line(9, content)
    assert caught.value.line == 9
    assert str(caught.value).startswith("line 9: ")


def test_a_value_may_contain_colons_and_semicolons() -> None:
    prop = ical.parse_line(1, "RRULE:FREQ=WEEKLY;BYDAY=MO")
    assert (prop.name, prop.value, prop.params) == ("RRULE", "FREQ=WEEKLY;BYDAY=MO", {})


# -- components ----------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_parse_nests_components(newline: str) -> None:
    text = cal(
        "BEGIN:VEVENT",
        "SUMMARY:Period 1",
        "BEGIN:VALARM",
        "ACTION:DISPLAY",
        "END:VALARM",
        "END:VEVENT",
        "begin:vtodo",
        "END:VTODO",
        newline=newline,
    )
    root = ical.parse("\ufeff" + text)
    assert root.name == "VCALENDAR" and root.line == 1
    assert [c.name for c in root.components] == ["VEVENT", "VTODO"]
    event = root.children("VEVENT")[0]
    assert event.line == 3
    assert event.single("summary") == Property("SUMMARY", "Period 1", line=4)
    assert event.children("VALARM")[0].all("ACTION")[0].line == 6


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (cal("BEGIN:VEVENT", "END:VTODO"), 4, "END:VTODO but BEGIN:VEVENT at line 3"),
        (cal("BEGIN:VEVENT", "SUMMARY:x"), 5, "END:VCALENDAR but BEGIN:VEVENT at line 3"),
        ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\n", 1, "BEGIN:VCALENDAR is never closed"),
        (cal() + "BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n", 4, "content after END:VCALENDAR"),
        ("END:VCALENDAR\r\n", 1, "without a BEGIN"),
        ("VERSION:2.0\r\nBEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n", 1, "not an iCalendar file"),
        ("BEGIN:VEVENT\r\nEND:VEVENT\r\n", 1, "not an iCalendar file"),
        ("\r\n\r\ndate,day_type\r\n", 3, "not an iCalendar file"),
        (cal("BEGIN:V EVENT", "END:V EVENT"), 3, "bad component name"),
    ],
)
def test_bad_structure_names_the_line(text: str, line: int, words: str) -> None:
    found = problem(text)
    assert found.line == line
    assert words in found.reason


def test_empty_text_is_not_a_calendar() -> None:
    found = problem("\r\n\r\n")
    assert found.line is None
    assert "not an iCalendar file" in str(found)


def test_a_property_allowed_once_that_appears_twice() -> None:
    event = ical.parse(cal("BEGIN:VEVENT", "DTSTART:20240901", "DTSTART:20240902", "END:VEVENT"))
    with pytest.raises(ICalError) as caught:
        event.children("VEVENT")[0].single("DTSTART")
    assert caught.value.line == 5


# -- values --------------------------------------------------------------------------------


def test_text_unescaping_and_lists() -> None:
    prop = ical.parse_line(1, r"CATEGORIES:No School,Closed\, all day,back\\slash\;x\nnew\Nline")
    assert prop.texts() == ["No School", "Closed, all day", "back\\slash;x\nnew\nline"]
    assert ical.parse_line(1, r"SUMMARY:a\,b\qc").text() == "a,bqc"


def test_escape_then_unescape_is_identity() -> None:
    value = "a, b; c\\d\nsecond\r\nthird"
    escaped = ical.escape_text(value)
    assert escaped == "a\\, b\\; c\\\\d\\nsecond\\nthird"
    assert ical.unescape_text(escaped) == value.replace("\r\n", "\n")


def when(content: str, *extra: str) -> date | datetime:
    root = ical.parse(cal(*extra, "BEGIN:VEVENT", content, "END:VEVENT"))
    prop = root.children("VEVENT")[0].properties[0]
    return ical.when(prop, root)


def test_dates_and_date_times() -> None:
    new_york = ZoneInfo("America/New_York")
    assert when("DTSTART;VALUE=DATE:20240902") == date(2024, 9, 2)
    assert when("DTSTART:20240902") == date(2024, 9, 2)
    assert when("DTSTART:20240902T081500Z") == datetime(2024, 9, 2, 8, 15, tzinfo=UTC)
    floating = when("DTSTART;VALUE=DATE-TIME:20240902T081500")
    assert floating == datetime(2024, 9, 2, 8, 15) and isinstance(floating, datetime)
    assert floating.tzinfo is None
    zoned = when("DTSTART;TZID=America/New_York:20240902T081500")
    assert zoned == datetime(2024, 9, 2, 8, 15, tzinfo=new_york)
    assert zoned == datetime(2024, 9, 2, 12, 15, tzinfo=UTC)
    # A VTIMEZONE naming its IANA zone stands in for a non-IANA TZID.
    outlook = when(
        'DTSTART;TZID="Eastern Standard Time":20250115T080000',
        "BEGIN:VTIMEZONE",
        "TZID:Eastern Standard Time",
        "X-LIC-LOCATION:America/New_York",
        "END:VTIMEZONE",
    )
    assert outlook == datetime(2025, 1, 15, 13, 0, tzinfo=UTC)
    assert when("DTSTART;TZID=/Europe/London:20250115T080000") == datetime(
        2025, 1, 15, 8, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("DTSTART:20240231", "not a real date"),
        ("DTSTART;VALUE=DATE:2024-09-02", "not a date (YYYYMMDD)"),
        ("DTSTART;VALUE=DATE:20240902T080000", "not a date (YYYYMMDD)"),
        ("DTSTART:20240902T256000Z", "not a real date"),
        ("DTSTART:20240902T0815Z", "not a date-time"),
        ("DTSTART;TZID=Mars/Olympus:20240902T081500", "unknown timezone TZID=Mars/Olympus"),
        ("DTSTART;VALUE=PERIOD:20240902T081500Z/PT1H", "unsupported VALUE=PERIOD"),
    ],
)
def test_bad_date_values_name_their_line(content: str, words: str) -> None:
    with pytest.raises(ICalError) as caught:
        when(content)
    assert caught.value.line == 4
    assert words in caught.value.reason


@pytest.mark.parametrize(
    ("value", "span"),
    [
        ("PT50M", timedelta(minutes=50)),
        ("PT1H30M15S", timedelta(hours=1, minutes=30, seconds=15)),
        ("P1D", timedelta(days=1)),
        ("P2W", timedelta(weeks=2)),
        ("-PT5M", timedelta(minutes=-5)),
        ("+P1DT2H", timedelta(days=1, hours=2)),
    ],
)
def test_durations(value: str, span: timedelta) -> None:
    assert ical.duration(Property("DURATION", value)) == span


@pytest.mark.parametrize("value", ["P", "PT", "50M", "P1H", "PT1D", "P1W2D"])
def test_bad_durations(value: str) -> None:
    with pytest.raises(ICalError):
        ical.duration(Property("DURATION", value, line=3))


# -- writing -------------------------------------------------------------------------------


def test_fold_limits_octets_and_never_splits_a_character() -> None:
    line = "DESCRIPTION:" + "é€😀x" * 40
    folded = ical.fold(line)
    pieces = folded.split("\r\n")
    assert len(pieces) > 1
    assert all(len(piece.encode()) <= ical.MAX_OCTETS for piece in pieces)
    assert all(piece.startswith(" ") for piece in pieces[1:])
    assert list(ical.unfold(folded)) == [(1, line)]
    assert ical.fold("SUMMARY:short") == "SUMMARY:short"
    exact = "X:" + "a" * 73
    assert ical.fold(exact) == exact


def test_serialize_round_trips_through_parse() -> None:
    root = Component(
        "VCALENDAR",
        [Property("VERSION", "2.0")],
        [
            Component(
                "VEVENT",
                [
                    Property("SUMMARY", ical.escape_text("Maths, Room 204; period 2\\3")),
                    Property("X-THING", "v", {"X-P": ["a:b", "plain"]}),
                ],
            )
        ],
    )
    text = ical.serialize(root)
    assert 'X-THING;X-P="a:b",plain:v\r\n' in text
    again = ical.parse(text)
    event = again.children("VEVENT")[0]
    assert event.single("SUMMARY") is not None
    assert event.all("SUMMARY")[0].text() == "Maths, Room 204; period 2\\3"
    assert event.all("X-THING")[0].params == {"X-P": ["a:b", "plain"]}


def test_format_utc_needs_an_aware_datetime() -> None:
    assert ical.format_utc(datetime(2024, 9, 2, 8, tzinfo=ZoneInfo("Europe/London"))) == (
        "20240902T070000Z"
    )
    with pytest.raises(ValueError, match="aware"):
        ical.format_utc(datetime(2024, 9, 2, 8))


# -- the per-unit feed ---------------------------------------------------------------------

NOW = datetime(2024, 9, 1, 18, 30, tzinfo=UTC)


def window(period: str, start: datetime, minutes: int, **changes: Any) -> PlannedWindow:
    found = PlannedWindow(
        window_id=window_id("Lincoln High", "Room 204", start.date(), period),
        school="Lincoln High",
        room="Room 204",
        device_id="unit-204",
        date=start.date(),
        period=period,
        start=start,
        end=start + timedelta(minutes=minutes),
        title=f"Lincoln High · Room 204 · {start:%Y-%m-%d} · {period}",
        teacher="Ms. Rivera",
        plans=["Algebra coaching"],
    )
    return replace(found, **changes)


def test_unit_calendar_round_trips_through_the_reader() -> None:
    later = window("Period 5", datetime(2024, 9, 3, 16, 15, tzinfo=UTC), 50)
    earlier = window(
        "Period 2",
        datetime(2024, 9, 3, 12, 55, tzinfo=UTC),
        50,
        teacher=None,
        plans=["Algebra coaching", "New teacher support"],
    )
    text = unit_calendar("unit-204", [later, earlier], NOW)
    assert text.endswith("\r\n")
    assert "\n" not in text.replace("\r\n", "")
    root = ical.parse(text)
    props = {p.name: p for p in root.properties}
    assert props["VERSION"].value == "2.0"
    assert props["PRODID"].value == PRODID == "-//classcap//capture schedule//EN"
    assert props["METHOD"].value == "PUBLISH"
    assert props["X-WR-CALNAME"].text() == "unit-204 captures"
    events = root.children("VEVENT")
    assert [e.all("UID")[0].value for e in events] == [
        f"{earlier.window_id}@classcap",
        f"{later.window_id}@classcap",
    ]
    first = events[0]
    assert ical.when(first.all("DTSTART")[0], root) == earlier.start
    assert ical.when(first.all("DTEND")[0], root) == earlier.end
    assert ical.when(first.all("DTSTAMP")[0], root) == NOW
    assert first.all("SUMMARY")[0].text() == earlier.title
    assert first.all("LOCATION")[0].text() == "Room 204"
    assert first.all("DESCRIPTION")[0].text() == (
        "School: Lincoln High\nPlans: Algebra coaching, New teacher support"
    )
    assert events[1].all("DESCRIPTION")[0].text() == (
        "School: Lincoln High\nTeacher: Ms. Rivera\nPlans: Algebra coaching"
    )


def test_unit_calendar_escapes_and_folds_titles() -> None:
    title = "Lincoln High · Room 204, Lab; \\ Chemistry\nsecond line " + "très long " * 12
    found = window("Period 1", datetime(2024, 9, 3, 12, tzinfo=UTC), 50, title=title)
    text = unit_calendar("unit-204", [found], NOW)
    lines = text.split("\r\n")
    assert all(len(line.encode()) <= 75 for line in lines)
    summary = next(i for i, line in enumerate(lines) if line.startswith("SUMMARY:"))
    assert lines[summary + 1].startswith(" ")
    assert lines[summary].startswith(
        "SUMMARY:Lincoln High · Room 204\\, Lab\\; \\\\ Chemistry\\nsecond line"
    )
    event = ical.parse(text).children("VEVENT")[0]
    assert event.all("SUMMARY")[0].text() == title


def test_unit_calendar_without_windows_is_still_a_calendar() -> None:
    root = ical.parse(unit_calendar("unit-9", [], NOW))
    assert root.components == []
    assert root.single("X-WR-CALNAME") is not None
