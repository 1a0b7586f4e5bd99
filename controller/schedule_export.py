"""A unit's upcoming capture windows as an iCalendar feed.

Lecture-capture systems and ordinary calendar apps can subscribe to it, so the
people who run a room see when it records. Times are in UTC; each window's UID
is stable across edits, so a moved lesson updates its event instead of adding
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from controller.ical import Component, Property, escape_text, format_utc, serialize
from shared.schedule import PlannedWindow

PRODID = "-//classcap//capture schedule//EN"


def unit_calendar(device_id: str, windows: Sequence[PlannedWindow], now: datetime) -> str:
    """RFC 5545 text with one VEVENT per window, in start order; ``now`` is the DTSTAMP."""
    calendar = Component(
        "VCALENDAR",
        [
            Property("VERSION", "2.0"),
            Property("PRODID", PRODID),
            Property("CALSCALE", "GREGORIAN"),
            Property("METHOD", "PUBLISH"),
            Property("X-WR-CALNAME", escape_text(f"{device_id} captures")),
        ],
    )
    stamp = format_utc(now)
    for window in sorted(windows, key=lambda w: (w.start, w.window_id)):
        calendar.components.append(_event(window, stamp))
    return serialize(calendar)


def _event(window: PlannedWindow, stamp: str) -> Component:
    details = [f"School: {window.school}"]
    if window.teacher:
        details.append(f"Teacher: {window.teacher}")
    details.append(f"Plans: {', '.join(window.plans)}")
    return Component(
        "VEVENT",
        [
            Property("UID", f"{window.window_id}@classcap"),
            Property("DTSTAMP", stamp),
            Property("DTSTART", format_utc(window.start)),
            Property("DTEND", format_utc(window.end)),
            Property("SUMMARY", escape_text(window.title)),
            Property("LOCATION", escape_text(window.room)),
            Property("DESCRIPTION", escape_text("\n".join(details))),
        ],
    )
