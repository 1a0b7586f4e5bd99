"""Time helpers: every timestamp on the wire is an aware UTC datetime."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_timestamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
