"""Read-only snapshots of the controller's state, handed to the web layer and the CLI.

They are plain frozen dataclasses built inside a session, so nothing that holds
one can touch the database by accident (no lazy loads after the session ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")

Completeness = Literal["complete", "partial", "interrupted", "recording"]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass(frozen=True)
class DeviceView:
    id: str
    school: str
    room: str
    online: bool
    online_changed_at: datetime | None
    last_seen_at: datetime | None
    state: str | None
    recording_id: str | None
    agent_version: str | None
    health: dict[str, Any] | None
    health_at: datetime | None
    desired_version: int
    reported_version: int
    drift: bool
    open_alerts: list[str]
    snapshot_at: datetime | None
    created_at: datetime
    reported_error: str | None = None
    capabilities: list[str] | None = None


@dataclass(frozen=True)
class AlertView:
    id: int
    device_id: str
    school: str
    room: str
    kind: str
    severity: str
    message: str
    raised_at: datetime
    cleared_at: datetime | None


@dataclass(frozen=True)
class CommandView:
    id: str
    device_id: str
    action: str
    status: str
    reason: str | None
    created_by: str | None
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    accepted_at: datetime | None
    finished_at: datetime | None
    recording_id: str | None
    note: str | None


@dataclass(frozen=True)
class SegmentView:
    sequence: int
    key: str
    size: int
    sha256: str
    started_at: datetime
    ended_at: datetime
    state: str
    recovered: bool
    download_url: str | None


@dataclass(frozen=True)
class RecordingView:
    id: str
    device_id: str
    school: str
    room: str
    trigger: str | None
    window_id: str | None
    started_at: datetime
    ended_at: datetime | None
    status: str
    end_reason: str | None
    bookmarks: list[dict[str, Any]]
    gaps: list[dict[str, Any]]
    segments_reported: int
    segments_stored: int
    completeness: Completeness
    segments: list[SegmentView]
    manifest_key: str | None = None
    # The scheduled lesson it records ("school · room · date · period"), if any.
    title: str | None = None
