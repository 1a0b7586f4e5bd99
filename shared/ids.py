"""Identifiers: sortable by creation time so listings read in order."""

from __future__ import annotations

import secrets

from shared.clock import utcnow


def new_id(prefix: str) -> str:
    """``<prefix>-YYYYmmddTHHMMSSZ-<8 hex>``: unique, readable, ordered by time."""
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}-{stamp}-{secrets.token_hex(4)}"


def new_recording_id() -> str:
    return new_id("rec")


def new_command_id() -> str:
    return new_id("cmd")
