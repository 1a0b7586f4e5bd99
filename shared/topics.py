"""Topic names under ``classcap/v1/<device_id>/...``.

Every topic a unit uses lies inside its own subtree, so a broker ACL pattern
``classcap/v1/%u/#`` confines a unit to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

ROOT = "classcap/v1"
DEVICE_ID_PATTERN = r"[a-z0-9][a-z0-9-]{1,62}"
_DEVICE_ID = re.compile(rf"^{DEVICE_ID_PATTERN}$")


class Channel(StrEnum):
    """The last part(s) of a topic; the direction is fixed per channel."""

    # unit -> controller
    STATUS = "status"
    HEALTH = "health"
    REPORTED = "reported"
    COMMAND_RESULT = "command/result"
    SEGMENT = "segment"
    UPLOAD = "upload"
    RECORDING = "recording"
    EVENT = "event"
    SNAPSHOT = "snapshot"
    # controller -> unit
    DESIRED = "desired"
    COMMAND = "command"
    GRANT = "grant"
    STORED = "stored"


UNIT_PUBLISHES = frozenset(
    {
        Channel.STATUS,
        Channel.HEALTH,
        Channel.REPORTED,
        Channel.COMMAND_RESULT,
        Channel.SEGMENT,
        Channel.UPLOAD,
        Channel.RECORDING,
        Channel.EVENT,
        Channel.SNAPSHOT,
    }
)
UNIT_SUBSCRIBES = frozenset({Channel.DESIRED, Channel.COMMAND, Channel.GRANT, Channel.STORED})


class TopicError(ValueError):
    """A topic or device id that is not part of the contract."""


def validate_device_id(device_id: str) -> str:
    if not _DEVICE_ID.match(device_id):
        raise TopicError(
            f"invalid device id {device_id!r}: expected 2-63 of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return device_id


def topic(device_id: str, channel: Channel) -> str:
    return f"{ROOT}/{validate_device_id(device_id)}/{channel.value}"


def subscription(channel: Channel, device_id: str = "+") -> str:
    """A filter for one channel of one unit, or of every unit with ``+``."""
    if device_id != "+":
        validate_device_id(device_id)
    return f"{ROOT}/{device_id}/{channel.value}"


@dataclass(frozen=True)
class ParsedTopic:
    device_id: str
    channel: Channel


def parse(topic_name: str) -> ParsedTopic:
    prefix = ROOT + "/"
    if not topic_name.startswith(prefix):
        raise TopicError(f"topic {topic_name!r} is not under {ROOT}/")
    device_id, sep, rest = topic_name[len(prefix) :].partition("/")
    if not sep:
        raise TopicError(f"topic {topic_name!r} has no channel")
    validate_device_id(device_id)
    try:
        channel = Channel(rest)
    except ValueError:
        raise TopicError(f"topic {topic_name!r} has unknown channel {rest!r}") from None
    return ParsedTopic(device_id, channel)
