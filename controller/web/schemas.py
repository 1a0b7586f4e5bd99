"""The REST API's request and response bodies as pydantic models (they also make the OpenAPI)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from controller.web.auth import MIN_PASSWORD_CHARS, USERNAME_PATTERN, Role
from shared.messages import CaptureWindow, DesiredSettings, RecorderState, RecordingStatus

MAX_PER_PAGE = 500

Page = Annotated[int, Field(ge=1, le=1_000_000, description="1-based page number")]
PerPage = Annotated[int, Field(ge=1, le=MAX_PER_PAGE, description="items per page")]
SearchText = Annotated[str, Field(min_length=1, max_length=200)]

# What a person may ask a unit to do; ``apply`` is the controller's own (desired state).
ApiAction = Literal["start_recording", "stop_recording", "snapshot", "reboot", "bookmark"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


# --- query parameters --------------------------------------------------------------------


class DeviceQuery(_In):
    school: SearchText | None = None
    state: RecorderState | None = None
    online: bool | None = None
    alert: Annotated[str, Field(min_length=1, max_length=40, description="alert kind")] | None = (
        None
    )
    q: Annotated[SearchText, Field(description="room or id contains")] | None = None
    page: Page = 1
    per_page: PerPage = 50


class HealthQuery(_In):
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class CommandQuery(_In):
    device_id: SearchText | None = None
    page: Page = 1
    per_page: PerPage = 50


class RecordingQuery(_In):
    device_id: SearchText | None = None
    school: SearchText | None = None
    status: RecordingStatus | None = None
    page: Page = 1
    per_page: PerPage = 50


class AlertQuery(_In):
    open_only: bool = True
    school: SearchText | None = None
    device_id: SearchText | None = None
    kind: Annotated[str, Field(min_length=1, max_length=40)] | None = None
    page: Page = 1
    per_page: PerPage = 100


# --- request bodies ---------------------------------------------------------------------------


class CommandIn(_In):
    action: ApiAction
    expires_in_s: Annotated[int, Field(ge=5, le=3600)] = 60
    note: Annotated[str, Field(max_length=500)] | None = None


class DesiredIn(_In):
    settings: DesiredSettings | None = None
    schedule: list[CaptureWindow] | None = None


class UserIn(_In):
    username: Annotated[str, Field(pattern=USERNAME_PATTERN)]
    password: Annotated[str, Field(min_length=MIN_PASSWORD_CHARS, max_length=500)]
    role: Role


class TokenIn(_In):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    role: Role


# --- responses -----------------------------------------------------------------------------------


class ErrorOut(BaseModel):
    error: str
    detail: Any = None


class DeviceOut(_Out):
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
    reported_error: str | None = None
    capabilities: list[str] | None = None


class AlertOut(_Out):
    id: int
    device_id: str
    school: str
    room: str
    kind: str
    severity: str
    message: str
    raised_at: datetime
    cleared_at: datetime | None


class CommandOut(_Out):
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


class DeviceLinks(BaseModel):
    health: str
    snapshot: str
    commands: str
    recordings: str
    alerts: str


class DeviceDetailOut(DeviceOut):
    alerts: list[AlertOut]
    latest_commands: list[CommandOut]
    desired: dict[str, Any] | None
    links: DeviceLinks


class HealthHistoryOut(BaseModel):
    device_id: str
    items: list[dict[str, Any]]


class SegmentOut(_Out):
    sequence: int
    key: str
    size: int
    sha256: str
    started_at: datetime
    ended_at: datetime
    state: str
    recovered: bool
    download_url: str | None


class RecordingOut(_Out):
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
    bookmarks: list[Any]
    gaps: list[Any]
    segments_reported: int
    segments_stored: int
    completeness: str
    title: str | None = None


class RecordingDetailOut(RecordingOut):
    segments: list[SegmentOut]


class SchoolOut(BaseModel):
    school: str
    units: int
    online: int


class SchoolsOut(BaseModel):
    items: list[SchoolOut]


class CommandBatchOut(BaseModel):
    count: int
    items: list[CommandOut]


class DesiredOut(BaseModel):
    device_id: str
    desired: dict[str, Any]


class UserOut(_Out):
    username: str
    role: Role
    created_at: datetime


class UsersOut(BaseModel):
    items: list[UserOut]


class TokenOut(_Out):
    id: str
    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokensOut(BaseModel):
    items: list[TokenOut]


class TokenCreatedOut(BaseModel):
    id: str
    name: str
    role: Role
    token: Annotated[str, Field(description="shown only now; keep it secret")]


class _PageOut(BaseModel):
    total: int
    page: int
    per_page: int


class DevicePageOut(_PageOut):
    items: list[DeviceOut]


class CommandPageOut(_PageOut):
    items: list[CommandOut]


class RecordingPageOut(_PageOut):
    items: list[RecordingOut]


class AlertPageOut(_PageOut):
    items: list[AlertOut]


class OkOut(BaseModel):
    ok: Literal[True] = True
