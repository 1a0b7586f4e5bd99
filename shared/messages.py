"""Every payload that crosses MQTT, as a pydantic model with a schema version.

Payloads are UTF-8 JSON objects. Each carries ``"schema": 1``; a payload with
another version, an unknown field or a wrong type is rejected whole.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from shared.clock import utcnow

SCHEMA_VERSION = 1
# Mosquitto accepts far larger messages; the broker configs we generate cap
# payloads here so a hostile or broken client cannot make every peer parse megabytes.
MAX_PAYLOAD_BYTES = 256 * 1024
# A snapshot JPEG must fit one message after base64 and the JSON around it.
MAX_SNAPSHOT_BYTES = 180 * 1024

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
RecordingId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
CommandId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
Timestamp = AwareDatetime


class Message(BaseModel):
    """Base of every wire message."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_version: Literal[1] = Field(default=1, alias="schema")

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


# --- presence -----------------------------------------------------------------


class Status(Message):
    """Retained on ``status``. The last will carries ``online: false`` with the same epoch."""

    online: bool
    epoch: int = Field(ge=0)
    ts: Timestamp = Field(default_factory=utcnow)
    agent_version: str | None = None
    capabilities: list[str] = Field(default_factory=list)


# --- health -------------------------------------------------------------------


class RecorderState(StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    RECORDING = "recording"
    STOPPING = "stopping"
    ERROR = "error"


class Throttling(BaseModel):
    """Decoded ``vcgencmd get_throttled`` bits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    raw: int = Field(ge=0)
    under_voltage_now: bool
    throttled_now: bool
    freq_capped_now: bool
    soft_temp_limit_now: bool
    under_voltage_occurred: bool
    throttled_occurred: bool
    freq_capped_occurred: bool
    soft_temp_limit_occurred: bool


class Health(Message):
    """Published on ``health`` at a fixed interval. ``None`` means unknown on this hardware."""

    ts: Timestamp = Field(default_factory=utcnow)
    state: RecorderState
    recording_id: RecordingId | None = None
    soc_temp_c: float | None = None
    throttling: Throttling | None = None
    disk_free_bytes: int = Field(ge=0)
    disk_total_bytes: int = Field(ge=0)
    can_record: bool
    cannot_record_reason: str | None = None
    spool_segments: int = Field(ge=0)
    spool_bytes: int = Field(ge=0)
    camera_present: bool | None = None
    mic_level_dbfs: float | None = None
    clock_synced: bool | None = None
    clock_offset_ms: float | None = None
    uptime_s: float = Field(ge=0)
    agent_version: str
    rejected_messages: int = Field(ge=0)


# --- desired / reported state --------------------------------------------------


class CaptureWindow(BaseModel):
    """A scheduled capture the unit runs on its own clock."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_id: Annotated[str, Field(min_length=1, max_length=128)]
    start: Timestamp
    end: Timestamp
    title: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> CaptureWindow:
        if self.end <= self.start:
            raise ValueError("window end must be after its start")
        return self


class DesiredSettings(BaseModel):
    """Settings the controller may change remotely; ``None`` keeps the unit's own config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    health_interval_s: float | None = Field(default=None, ge=1, le=3600)
    upload_bandwidth_kbps: int | None = Field(default=None, ge=0)


class DesiredState(Message):
    """Retained on ``desired``. A unit applies only a version newer than the one it runs."""

    version: int = Field(ge=1)
    issued_at: Timestamp = Field(default_factory=utcnow)
    settings: DesiredSettings = Field(default_factory=DesiredSettings)
    schedule: list[CaptureWindow] = Field(default_factory=list)


class ReportedState(Message):
    """Retained on ``reported``: what the unit runs now."""

    desired_version: int = Field(ge=0)
    applied_at: Timestamp | None = None
    agent_version: str
    error: str | None = None


# --- commands -------------------------------------------------------------------


class CommandAction(StrEnum):
    START_RECORDING = "start_recording"
    STOP_RECORDING = "stop_recording"
    BOOKMARK = "bookmark"
    SNAPSHOT = "snapshot"
    REBOOT = "reboot"
    APPLY = "apply"


class Command(Message):
    """Published on ``command`` with MQTT message expiry matching ``expires_at``."""

    id: CommandId
    action: CommandAction
    issued_at: Timestamp = Field(default_factory=utcnow)
    expires_at: Timestamp
    note: Annotated[str, Field(max_length=500)] | None = None
    desired: DesiredState | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Command:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if (self.action is CommandAction.APPLY) != (self.desired is not None):
            raise ValueError("'desired' is required for apply and allowed only there")
        return self


class CommandStatus(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DONE = "done"
    FAILED = "failed"


class CommandResult(Message):
    """Published on ``command/result``; a command may get ``accepted`` then ``done``/``failed``."""

    command_id: CommandId
    status: CommandStatus
    ts: Timestamp = Field(default_factory=utcnow)
    reason: str | None = None
    recording_id: RecordingId | None = None


# --- recordings and segments ------------------------------------------------------


class Trigger(StrEnum):
    BUTTON = "button"
    COMMAND = "command"
    SCHEDULE = "schedule"


class EndReason(StrEnum):
    BUTTON = "button"
    COMMAND = "command"
    SCHEDULE = "schedule"
    ERROR = "error"
    POWER_LOSS = "power_loss"
    DISK_FULL = "disk_full"
    SHUTDOWN = "shutdown"


class RecordingStatus(StrEnum):
    RECORDING = "recording"
    COMPLETE = "complete"
    PARTIAL = "partial"
    INTERRUPTED = "interrupted"


class Bookmark(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: Timestamp
    source: Literal["button", "command"]
    note: str | None = None


class Gap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    start: Timestamp
    end: Timestamp
    reason: str


class RecordingManifest(Message):
    """Published on ``recording`` at start, at end and after recovery; also kept as a file."""

    recording_id: RecordingId
    device_id: str
    trigger: Trigger
    window_id: str | None = None
    started_at: Timestamp
    ended_at: Timestamp | None = None
    status: RecordingStatus
    end_reason: EndReason | None = None
    segments: int = Field(ge=0)
    bookmarks: list[Bookmark] = Field(default_factory=list)
    gaps: list[Gap] = Field(default_factory=list)
    video: str
    audio: str | None = None


class SegmentAnnouncement(Message):
    """Published on ``segment`` for every closed segment, again until it is confirmed stored."""

    recording_id: RecordingId
    sequence: int = Field(ge=0)
    size: int = Field(gt=0)
    sha256: Sha256Hex
    started_at: Timestamp
    ended_at: Timestamp
    recovered: bool = False


class UploadGrant(Message):
    """Published on ``grant``: a short-lived URL bound to the announced size and sha256."""

    recording_id: RecordingId
    sequence: int = Field(ge=0)
    key: str
    url: str
    method: Literal["PUT"] = "PUT"
    headers: dict[str, str]
    expires_at: Timestamp


class UploadResult(Message):
    """Published on ``upload`` after each PUT attempt that the unit wants verified."""

    recording_id: RecordingId
    sequence: int = Field(ge=0)
    key: str
    ok: bool
    http_status: int | None = None
    error: str | None = None


class StoredConfirmation(Message):
    """Published on ``stored``. Only ``verified: true`` lets the unit delete its copy."""

    recording_id: RecordingId
    sequence: int = Field(ge=0)
    key: str
    verified: bool
    sha256: Sha256Hex | None = None
    size: int | None = Field(default=None, ge=0)
    reason: str | None = None


# --- events and snapshots -------------------------------------------------------


class EventKind(StrEnum):
    RECORDING_STARTED = "recording_started"
    RECORDING_STOPPED = "recording_stopped"
    RECORDING_REFUSED = "recording_refused"
    RECORDING_RECOVERED = "recording_recovered"
    BOOKMARK = "bookmark"
    SEGMENT_DISCARDED = "segment_discarded"
    CAPTURE_ERROR = "capture_error"
    DISK_LOW = "disk_low"
    DISK_OK = "disk_ok"
    MESSAGE_REJECTED = "message_rejected"
    CONFIG_APPLIED = "config_applied"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Event(Message):
    """Published on ``event``: something a person may need to know about."""

    kind: EventKind
    severity: Severity = Severity.INFO
    ts: Timestamp = Field(default_factory=utcnow)
    recording_id: RecordingId | None = None
    message: str
    data: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class Snapshot(Message):
    """Published on ``snapshot``: a JPEG of the current picture, base64 encoded."""

    taken_at: Timestamp
    command_id: CommandId | None = None
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    jpeg_base64: str = Field(max_length=(MAX_SNAPSHOT_BYTES * 4) // 3 + 4)


def is_expired(command: Command, now: datetime | None = None) -> bool:
    return (now or utcnow()) >= command.expires_at
