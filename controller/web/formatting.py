"""How the dashboard shows times, sizes, durations and page numbers."""

from __future__ import annotations

from datetime import datetime

_BYTE_UNITS = ("B", "KB", "MB", "GB", "TB")


def ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "never"
    seconds = int((now - value).total_seconds())
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    size, index = float(value), 0
    while abs(size) >= 1024 and index < len(_BYTE_UNITS) - 1:
        size /= 1024
        index += 1
    return f"{size:.0f} B" if index == 0 else f"{size:.1f} {_BYTE_UNITS[index]}"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


def pager_pages(current: int, last: int) -> list[int | None]:
    """Page numbers to link, with None where a run is left out: 1 … 4 5 [6] 7 8 … 400."""
    shown = sorted({1, last, *range(max(1, current - 2), min(last, current + 2) + 1)})
    out: list[int | None] = []
    previous = 0
    for number in shown:
        if previous and number - previous > 1:
            out.append(None)
        out.append(number)
        previous = number
    return out
