"""docs/protocol.md and the models in shared/ must say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared import messages
from shared.codec import MODEL_FOR_CHANNEL, decode
from shared.topics import Channel

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
SECTION = re.compile(r"<!-- model: (\w+) -->\n(.*?)```json\n(.*?)\n```", re.S)


def _sections() -> dict[str, tuple[str, str]]:
    return {m.group(1): (m.group(2), m.group(3)) for m in SECTION.finditer(DOC)}


def test_every_channel_is_in_the_channel_table() -> None:
    for channel in Channel:
        model = MODEL_FOR_CHANNEL[channel]
        row = f"| {channel.value} | `classcap/v1/<id>/{channel.value}` |"
        assert row in DOC, f"channel {channel.value} missing from docs/protocol.md"
        assert f"[{model.__name__}]" in DOC.split(row, 1)[1].split("\n", 1)[0]


def test_every_wire_model_has_a_section() -> None:
    assert set(_sections()) == {m.__name__ for m in MODEL_FOR_CHANNEL.values()}


@pytest.mark.parametrize("name", sorted(_sections()))
def test_field_table_matches_model(name: str) -> None:
    table, _example = _sections()[name]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    model = getattr(messages, name)
    fields = {f.alias or n for n, f in model.model_fields.items()}
    assert documented == fields


@pytest.mark.parametrize("name", sorted(_sections()))
def test_example_is_a_valid_message(name: str) -> None:
    _table, example = _sections()[name]
    model = getattr(messages, name)
    decoded = decode(model, example.encode())
    assert decoded.schema_version == 1


def test_enum_values_are_documented() -> None:
    for enum in (
        messages.CommandAction,
        messages.CommandStatus,
        messages.EventKind,
        messages.EndReason,
        messages.RecordingStatus,
        messages.RecorderState,
    ):
        for value in enum:
            assert f"`{value.value}`" in DOC, f"{enum.__name__}.{value.name} undocumented"
