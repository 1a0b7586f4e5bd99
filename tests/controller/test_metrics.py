"""/metrics: Prometheus text format, fleet counts from the database, MQTT counters."""

from __future__ import annotations

import hashlib
import math
import re
from datetime import timedelta

from controller.web.metrics import CONTENT_TYPE, quantile
from shared.clock import utcnow
from shared.messages import (
    CommandAction,
    CommandResult,
    CommandStatus,
    RecorderState,
    RecordingManifest,
    RecordingStatus,
    SegmentAnnouncement,
    Status,
    Trigger,
)
from tests.support.web import WebStack, enrol, unit_health

_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)\})? (?P<value>\S+)$'
)


def parse(text: str) -> dict[str, float]:
    """Samples by ``name{labels}``, checking the exposition format line by line."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in {"gauge", "counter", "summary"}
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        matched = _SAMPLE.match(line)
        assert matched, f"not a sample line: {line!r}"
        base = re.sub(r"_(sum|count)$", "", matched["name"])
        assert matched["name"] in typed or base in typed, f"{line!r} has no TYPE"
        key = matched["name"] + (f"{{{matched['labels']}}}" if matched["labels"] else "")
        samples[key] = float(matched["value"])
    return samples


def test_metrics_need_no_login_and_count_the_fleet(web_stack: WebStack) -> None:
    enrol(web_stack, "north-101", "North High", "101")
    enrol(web_stack, "north-102", "North High", "102")
    enrol(web_stack, "south-201", "South Middle", "201", online=False)
    web_stack.registry.on_health(
        "north-102", unit_health(RecorderState.RECORDING, camera_present=False)
    )
    web_stack.registry.on_health("north-101", unit_health(camera_present=False, clock_synced=False))

    answer = web_stack.client().get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == CONTENT_TYPE
    metrics = parse(answer.get_data(as_text=True))
    assert metrics["classcap_units_total"] == 3
    assert metrics["classcap_units_online"] == 2
    assert metrics["classcap_units_recording"] == 1
    assert metrics['classcap_alerts_open{kind="camera_missing"}'] == 2
    assert metrics['classcap_alerts_open{kind="clock_unsynced"}'] == 1
    assert metrics['classcap_alerts_open{kind="disk_low"}'] == 0
    assert metrics["classcap_segments_pending"] == 0
    assert metrics["classcap_upload_bytes_total"] == 0
    assert metrics["classcap_command_latency_seconds_count"] == 0
    assert math.isnan(metrics['classcap_command_latency_seconds{quantile="0.5"}'])
    assert not any(name.startswith("classcap_mqtt_") for name in metrics)


def test_a_unit_that_goes_offline_while_recording_is_not_counted_as_recording(
    web_stack: WebStack,
) -> None:
    enrol(web_stack, "north-101", "North High", "101")
    web_stack.registry.on_health("north-101", unit_health(RecorderState.RECORDING))
    web_stack.registry.on_status("north-101", Status(online=False, epoch=1))
    metrics = parse(web_stack.client().get("/metrics").get_data(as_text=True))
    assert metrics["classcap_units_recording"] == 0
    assert metrics["classcap_units_online"] == 0


def test_segments_and_command_latency(web_stack: WebStack) -> None:
    enrol(web_stack, "north-101", "North High", "101")
    now = utcnow()
    web_stack.catalogue.on_manifest(
        "north-101",
        RecordingManifest(
            recording_id="rec-1",
            device_id="north-101",
            trigger=Trigger.BUTTON,
            started_at=now,
            status=RecordingStatus.RECORDING,
            segments=2,
            video="h264",
        ),
    )
    for sequence in range(2):
        data = bytes([sequence]) * 1000
        web_stack.catalogue.on_announcement(
            "north-101",
            SegmentAnnouncement(
                recording_id="rec-1",
                sequence=sequence,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                started_at=now,
                ended_at=now + timedelta(seconds=10),
            ),
        )
    (command,) = web_stack.commands.create(["north-101"], CommandAction.SNAPSHOT, created_by="test")
    web_stack.commands.mark_sent(command.id)
    web_stack.commands.on_result(
        "north-101", CommandResult(command_id=command.id, status=CommandStatus.DONE)
    )

    metrics = parse(web_stack.client().get("/metrics").get_data(as_text=True))
    assert metrics["classcap_segments_pending"] == 2
    assert metrics["classcap_command_latency_seconds_count"] == 1
    assert metrics['classcap_command_latency_seconds{quantile="0.99"}'] >= 0
    assert (
        metrics["classcap_command_latency_seconds_sum"]
        == metrics['classcap_command_latency_seconds{quantile="0.5"}']
    )


def test_mqtt_counters_come_from_the_service(web_stack: WebStack) -> None:
    web_stack.build(
        mqtt_metrics=lambda: {
            "messages_rejected_total": 7.0,
            "messages_received_total": 120.0,
            "mqtt_connected": 1.0,
        }
    )
    text = web_stack.client().get("/metrics").get_data(as_text=True)
    metrics = parse(text)
    assert metrics["classcap_mqtt_messages_rejected_total"] == 7
    assert metrics["classcap_mqtt_messages_received_total"] == 120
    assert metrics["classcap_mqtt_connected"] == 1
    assert "# TYPE classcap_mqtt_messages_rejected_total counter" in text
    assert "# TYPE classcap_mqtt_connected gauge" in text


def test_quantile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.5) == 50
    assert quantile(values, 0.9) == 90
    assert quantile(values, 0.99) == 99
    assert quantile([3.0], 0.5) == 3
    assert math.isnan(quantile([], 0.5))
