"""Decoding payloads into models with one kind of error that names what was wrong."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import ValidationError

from shared.messages import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Command,
    CommandResult,
    DesiredState,
    Event,
    Health,
    Message,
    RecordingManifest,
    ReportedState,
    SegmentAnnouncement,
    Snapshot,
    Status,
    StoredConfirmation,
    UploadGrant,
    UploadResult,
)
from shared.topics import Channel

M = TypeVar("M", bound=Message)

MODEL_FOR_CHANNEL: dict[Channel, type[Message]] = {
    Channel.STATUS: Status,
    Channel.HEALTH: Health,
    Channel.REPORTED: ReportedState,
    Channel.COMMAND_RESULT: CommandResult,
    Channel.SEGMENT: SegmentAnnouncement,
    Channel.UPLOAD: UploadResult,
    Channel.RECORDING: RecordingManifest,
    Channel.EVENT: Event,
    Channel.SNAPSHOT: Snapshot,
    Channel.DESIRED: DesiredState,
    Channel.COMMAND: Command,
    Channel.GRANT: UploadGrant,
    Channel.STORED: StoredConfirmation,
}


class DecodeError(ValueError):
    """A payload that is not a valid message; ``reason`` is short enough to log and count."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode(model: type[M], payload: bytes) -> M:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeError("payload is not a JSON object")
    version = data.get("schema")
    if version != SCHEMA_VERSION:
        raise DecodeError(f"unsupported schema version {version!r}, expected {SCHEMA_VERSION}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DecodeError(f"invalid {model.__name__}: {_summarise(exc)}") from None


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
