"""A small reader and writer for the parts of iCalendar (RFC 5545) that schedules need.

Reading keeps the physical line number where each content line started (before
unfolding), so every problem can be reported as "line N: why". It checks that
BEGIN and END nest, parses parameters (quoted or not), unescapes TEXT and reads
DATE and DATE-TIME values: UTC ("Z"), floating (no zone) and ``TZID=`` with an
IANA name (or a VTIMEZONE whose X-LIC-LOCATION names one). Recurrence rules are
not expanded; callers decide what to do with events that have them.

Writing produces CRLF lines folded at 75 octets without splitting a UTF-8
character.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

T = TypeVar("T")

MAX_OCTETS = 75
CRLF = "\r\n"

_NAME = re.compile(r"[A-Za-z0-9-]+")
# Parameter values that must be quoted on output.
_NEEDS_QUOTES = re.compile(r"[:;,]")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_DATE_TIME = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(Z?)")
_DURATION = re.compile(
    r"([+-]?)P(?:(\d+)W|(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?)", re.ASCII
)
_NOT_ICALENDAR = "not an iCalendar file: it must begin with BEGIN:VCALENDAR"
_ESCAPES = {"\\": "\\", ";": ";", ",": ",", "n": "\n", "N": "\n"}


class ICalError(ValueError):
    """A malformed iCalendar text; ``line`` is the physical line where the problem is."""

    def __init__(self, line: int | None, reason: str) -> None:
        super().__init__(f"line {line}: {reason}" if line is not None else reason)
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Property:
    """One content line: ``NAME;PARAM=value:value``. ``value`` is kept as written (escaped)."""

    name: str
    value: str
    params: dict[str, list[str]] = field(default_factory=dict)
    line: int = 0

    def param(self, name: str) -> str | None:
        values = self.params.get(name.upper())
        return values[0] if values else None

    def text(self) -> str:
        """The value as TEXT, unescaped."""
        return unescape_text(self.value)

    def texts(self) -> list[str]:
        """The value as a comma-separated list of TEXT (e.g. CATEGORIES), unescaped."""
        return [unescape_text(part) for part in _split_unescaped_commas(self.value)]


@dataclass
class Component:
    """``BEGIN:NAME`` … ``END:NAME`` with its properties and nested components."""

    name: str
    properties: list[Property] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)
    line: int = 0

    def single(self, name: str) -> Property | None:
        """The property that may appear at most once; a second one is an error."""
        found = [p for p in self.properties if p.name == name.upper()]
        if len(found) > 1:
            raise ICalError(found[1].line, f"{name.upper()} appears twice in {self.name}")
        return found[0] if found else None

    def all(self, name: str) -> list[Property]:
        return [p for p in self.properties if p.name == name.upper()]

    def children(self, name: str) -> list[Component]:
        return [c for c in self.components if c.name == name.upper()]


# -- reading -------------------------------------------------------------------------------


def unfold(text: str) -> Iterator[tuple[int, str]]:
    """Content lines with the number of the physical line each starts on. CRLF, LF and CR
    line ends are all accepted; blank lines are skipped."""
    current: str | None = None
    start = 0
    for number, physical in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        if physical[:1] in (" ", "\t"):
            if current is None:
                raise ICalError(number, "a folded continuation line with nothing before it")
            current += physical[1:]
            continue
        if current is not None:
            yield start, current
            current = None
        if physical.strip():
            current, start = physical, number
    if current is not None:
        yield start, current


def parse_line(line: int, content: str) -> Property:
    """``NAME *(;PARAM=value[,value]) : value`` into a Property."""
    match = _NAME.match(content)
    if match is None:
        raise ICalError(line, f"expected NAME:value, found {_preview(content)}")
    name = match.group().upper()
    pos = match.end()
    params: dict[str, list[str]] = {}
    while pos < len(content) and content[pos] == ";":
        key = _NAME.match(content, pos + 1)
        if key is None or content[key.end() : key.end() + 1] != "=":
            raise ICalError(line, f"bad parameter in {name}: expected NAME=value")
        values: list[str] = []
        pos = key.end()
        while True:
            pos += 1  # past "=" or ","
            if content[pos : pos + 1] == '"':
                close = content.find('"', pos + 1)
                if close < 0:
                    raise ICalError(line, f"unclosed quote in a parameter of {name}")
                values.append(content[pos + 1 : close])
                pos = close + 1
            else:
                end = pos
                while end < len(content) and content[end] not in ';:,"':
                    end += 1
                values.append(content[pos:end])
                pos = end
            if content[pos : pos + 1] != ",":
                break
        params[key.group().upper()] = values
    if content[pos : pos + 1] != ":":
        raise ICalError(line, f"expected ':' after {name} and its parameters")
    return Property(name, content[pos + 1 :], params, line)


def parse(text: str) -> Component:
    """The one VCALENDAR in ``text``, with BEGIN/END nesting checked."""
    root: Component | None = None
    stack: list[Component] = []
    for line, content in unfold(text.removeprefix("\ufeff")):
        try:
            prop = parse_line(line, content)
        except ICalError:
            if root is None:
                raise ICalError(line, _NOT_ICALENDAR) from None
            raise
        if root is not None and not stack:
            raise ICalError(line, "content after END:VCALENDAR")
        if prop.name == "BEGIN":
            kind = prop.value.strip().upper()
            if not _NAME.fullmatch(kind):
                raise ICalError(line, f"bad component name {_preview(prop.value)}")
            if not stack and kind != "VCALENDAR":
                raise ICalError(line, _NOT_ICALENDAR)
            component = Component(kind, line=line)
            if stack:
                stack[-1].components.append(component)
            else:
                root = component
            stack.append(component)
        elif prop.name == "END":
            kind = prop.value.strip().upper()
            if not stack:
                raise ICalError(line, f"END:{kind} without a BEGIN")
            if kind != stack[-1].name:
                open_ = stack[-1]
                raise ICalError(
                    line, f"END:{kind} but BEGIN:{open_.name} at line {open_.line} is still open"
                )
            stack.pop()
        elif not stack:
            raise ICalError(line, _NOT_ICALENDAR)
        else:
            stack[-1].properties.append(prop)
    if stack:
        raise ICalError(stack[-1].line, f"BEGIN:{stack[-1].name} is never closed")
    if root is None:
        raise ICalError(None, "not an iCalendar file: it has no BEGIN:VCALENDAR")
    return root


def unescape_text(value: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            # Unknown escapes are kept as the character itself, as most readers do.
            out.append(_ESCAPES.get(following, following))
        else:
            out.append(char)
    return "".join(out)


def _split_unescaped_commas(value: str) -> list[str]:
    parts: list[str] = []
    start = 0
    escaped = False
    for pos, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append(value[start:pos])
            start = pos + 1
    parts.append(value[start:])
    return parts


def is_date(prop: Property) -> bool:
    """Whether a DTSTART/DTEND holds a DATE (an all-day value) rather than a DATE-TIME."""
    kind = (prop.param("VALUE") or "").upper()
    if kind:
        return kind == "DATE"
    return "T" not in prop.value.upper()


def when(prop: Property, calendar: Component) -> date | datetime:
    """A DATE or DATE-TIME value. UTC and TZID times are aware; floating times are naive."""
    value = prop.value.strip()
    kind = (prop.param("VALUE") or "").upper()
    if kind not in ("", "DATE", "DATE-TIME"):
        raise ICalError(prop.line, f"{prop.name} has unsupported VALUE={kind}")
    if is_date(prop):
        match = _DATE.fullmatch(value)
        if match is None:
            raise ICalError(prop.line, f"{prop.name} is not a date (YYYYMMDD): {_preview(value)}")
        year, month, day = map(int, match.groups())
        return _checked(prop, lambda: date(year, month, day))
    match = _DATE_TIME.fullmatch(value)
    if match is None:
        raise ICalError(
            prop.line, f"{prop.name} is not a date-time (YYYYMMDDTHHMMSS): {_preview(value)}"
        )
    year, month, day, hour, minute, second = map(int, match.groups()[:6])
    naive = _checked(prop, lambda: datetime(year, month, day, hour, minute, second))
    if match.group(7):
        return naive.replace(tzinfo=UTC)
    tzid = prop.param("TZID")
    if tzid is None:
        return naive
    return naive.replace(tzinfo=_zone(tzid, prop.line, calendar))


def duration(prop: Property) -> timedelta:
    """A DURATION value such as ``PT50M``, ``P1D`` or ``P2W``."""
    match = _DURATION.fullmatch(prop.value.strip())
    if match is None or not any(match.groups()[1:]):
        raise ICalError(prop.line, f"DURATION is not a duration: {_preview(prop.value)}")
    sign, weeks, days, hours, minutes, seconds = match.groups()
    span = timedelta(
        weeks=int(weeks or 0),
        days=int(days or 0),
        hours=int(hours or 0),
        minutes=int(minutes or 0),
        seconds=int(seconds or 0),
    )
    return -span if sign == "-" else span


def _checked(prop: Property, make: Callable[[], T]) -> T:
    try:
        return make()
    except ValueError:
        raise ICalError(prop.line, f"{prop.name} is not a real date: {prop.value}") from None


def _zone(tzid: str, line: int, calendar: Component) -> tzinfo:
    names = [tzid.lstrip("/")]
    for definition in calendar.children("VTIMEZONE"):
        own = definition.single("TZID")
        location = definition.single("X-LIC-LOCATION")
        if own is not None and location is not None and own.value == tzid:
            names.append(location.value)
    for name in names:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    raise ICalError(line, f"unknown timezone TZID={tzid} (use an IANA name)")


def _preview(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


# -- writing -------------------------------------------------------------------------------


def escape_text(value: str) -> str:
    value = value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
    return value.replace("\r\n", "\\n").replace("\r", "\\n").replace("\n", "\\n")


def format_utc(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("a UTC DATE-TIME needs an aware datetime")
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def fold(line: str) -> str:
    """``line`` split into CRLF + space continued pieces of at most 75 octets each."""
    pieces: list[str] = []
    current = ""
    size = 0
    for char in line:
        width = len(char.encode("utf-8"))
        if size + width > MAX_OCTETS:
            pieces.append(current)
            current, size = " ", 1
        current += char
        size += width
    pieces.append(current)
    return CRLF.join(pieces)


def content_line(prop: Property) -> str:
    params = "".join(
        f";{key}=" + ",".join(f'"{v}"' if _NEEDS_QUOTES.search(v) else v for v in values)
        for key, values in prop.params.items()
    )
    return fold(f"{prop.name}{params}:{prop.value}")


def serialize(component: Component) -> str:
    """The component as RFC 5545 text, CRLF line ends included."""
    return "".join(line + CRLF for line in _lines(component))


def _lines(component: Component) -> Iterator[str]:
    yield f"BEGIN:{component.name}"
    for prop in component.properties:
        yield content_line(prop)
    for child in component.components:
        yield from _lines(child)
    yield f"END:{component.name}"
