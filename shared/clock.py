"""Time helpers: every timestamp on the wire is an aware UTC datetime.

The process-wide wall-clock offset exists for simulated units only (``classcap sim``
rehearses a unit whose clock jumps): a real unit's clock is the kernel's, and its offset
stays 0. File mtimes follow a unit's wall clock too, so ``from_timestamp`` adds it as well.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

# One assignment replaces it, so readers on other threads see the old or the new offset.
_offset = timedelta(0)


def utcnow() -> datetime:
    return datetime.now(UTC) + _offset


def from_timestamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC) + _offset


def set_offset(seconds: float) -> None:
    """Sets this process's wall clock ``seconds`` off the kernel's (negative: behind)."""
    global _offset  # noqa: PLW0603
    _offset = timedelta(seconds=seconds)


def offset() -> float:
    return _offset.total_seconds()
