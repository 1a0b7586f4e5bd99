"""The controller's MQTT service against a real Mosquitto, the real state layer on SQLite and
SeaweedFS as storage; a test client plays the unit on the wire."""

from __future__ import annotations

import base64
import hashlib
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from controller.alerts import AlertEngine
from controller.catalogue import Catalogue
from controller.commands import CommandService
from controller.config import ControllerConfig
from controller.db import Database
from controller.mqtt_service import MqttService
from controller.registry import Registry
from controller.service import alert_thresholds
from controller.sim.storage_proxy import ProxyMode, StorageProxy
from controller.storage.s3 import S3Storage
from device.http_put import put_file
from shared.clock import utcnow
from shared.codec import decode
from shared.messages import (
    Command,
    CommandAction,
    CommandResult,
    CommandStatus,
    DesiredSettings,
    DesiredState,
    Event,
    EventKind,
    Health,
    RecorderState,
    ReportedState,
    SegmentAnnouncement,
    Snapshot,
    Status,
    StoredConfirmation,
    UploadGrant,
    UploadResult,
)
from shared.topics import Channel, topic
from tests.support.broker import MosquittoBroker, MqttTestClient, Received
from tests.support.processes import free_port, wait_for
from tests.support.s3 import storage_settings
from tests.support.seaweed_server import SeaweedServer

UNIT = "unit-a"
_fences = itertools.count()


@dataclass
class Harness:
    broker: MosquittoBroker
    config: ControllerConfig
    db: Database
    registry: Registry
    commands: CommandService
    catalogue: Catalogue
    alerts: AlertEngine
    storage: S3Storage
    services: list[MqttService]

    def start_service(self, client_id: str = "controller-1") -> MqttService:
        config = self.config.model_copy(
            update={"broker": self.config.broker.model_copy(update={"client_id": client_id})}
        )
        service = MqttService(config, self.registry, self.commands, self.catalogue, self.alerts)
        self.services.append(service)
        service.start()
        assert service.wait_connected(10)
        return service


@pytest.fixture
def harness(tmp_path: Path, broker: MosquittoBroker, s3_storage: S3Storage) -> Iterator[Harness]:
    config = ControllerConfig.model_validate(
        {
            "data_dir": str(tmp_path / "cc"),
            "broker": {"mode": "external", "url": broker.url, "workers": 2},
            "alerts": {"sweep_interval_s": 0.2},
        }
    )
    db = Database(config.database.url)
    db.migrate()
    alerts = AlertEngine(db, alert_thresholds(config))
    registry = Registry(db, alerts)
    registry.add_device(UNIT, "North High", "101")
    registry.add_device("unit-b", "North High", "102")
    made = Harness(
        broker,
        config,
        db,
        registry,
        CommandService(db),
        Catalogue(db, s3_storage, grant_expires_s=120),
        alerts,
        s3_storage,
        [],
    )
    yield made
    for service in made.services:
        service.stop()
    db.dispose()


@pytest.fixture
def unit(broker: MosquittoBroker, mqtt_client: Callable[..., MqttTestClient]) -> MqttTestClient:
    """The unit's side of the wire: everything addressed to unit-a."""
    return mqtt_client(
        broker,
        *(
            topic(UNIT, c)
            for c in (Channel.DESIRED, Channel.COMMAND, Channel.GRANT, Channel.STORED)
        ),
    )


def _send(unit: MqttTestClient, channel: Channel, message: Any, device: str = UNIT) -> None:
    unit.publish(topic(device, channel), message.to_json(), retain=channel is Channel.STATUS)


def _on(channel: Channel) -> Callable[[Received], bool]:
    return lambda m: m.topic == topic(UNIT, channel)


def fence(harness: Harness, unit: MqttTestClient) -> None:
    """Returns once the controller has handled everything the unit sent before and the
    answers to it have arrived: an upload report for a segment never announced is
    answered (refused) after the unit's earlier messages reached the controller, which
    then finishes handling them."""
    marker = f"fence-{next(_fences)}"
    _send(
        unit,
        Channel.UPLOAD,
        UploadResult(recording_id=marker, sequence=0, key="none", ok=False),
    )
    unit.wait_for(lambda m: m.topic == topic(UNIT, Channel.STORED) and marker.encode() in m.payload)
    assert all(service.wait_idle(10) for service in harness.services)


def _answers(unit: MqttTestClient, channel: Channel) -> list[Received]:
    return [m for m in unit.messages(topic(UNIT, channel)) if b"fence-" not in m.payload]


def _online(harness: Harness, device: str = UNIT) -> bool:
    view = harness.registry.get(device)
    return view is not None and view.online


def test_presence_follows_the_epoch_rule_so_a_stale_will_never_wins(
    harness: Harness, unit: MqttTestClient
) -> None:
    harness.start_service()
    _send(unit, Channel.STATUS, Status(online=True, epoch=5, agent_version="0.1.0"))
    assert wait_for(lambda: _online(harness), 10)
    _send(unit, Channel.STATUS, Status(online=True, epoch=6))
    _send(unit, Channel.STATUS, Status(online=False, epoch=5))  # the old connection's will
    fence(harness, unit)
    view = harness.registry.get(UNIT)
    assert view is not None and view.online and view.agent_version == "0.1.0"
    _send(unit, Channel.STATUS, Status(online=False, epoch=6))
    assert wait_for(lambda: not _online(harness), 10)
    _send(unit, Channel.STATUS, Status(online=True, epoch=6))  # a replay of its own online
    fence(harness, unit)
    assert not _online(harness)


def test_retained_presence_is_read_when_the_controller_starts(
    harness: Harness, unit: MqttTestClient
) -> None:
    _send(unit, Channel.STATUS, Status(online=True, epoch=1))
    _send(unit, Channel.STATUS, Status(online=True, epoch=3), device="unit-b")
    harness.start_service()
    assert wait_for(lambda: _online(harness) and _online(harness, "unit-b"), 10)


def test_bad_messages_are_counted_and_the_service_keeps_working(
    harness: Harness, unit: MqttTestClient
) -> None:
    service = harness.start_service()
    unit.publish(topic(UNIT, Channel.HEALTH), b"{not json")
    unit.publish(topic(UNIT, Channel.STATUS), b'{"schema": 2, "online": true, "epoch": 1}')
    unit.publish(topic(UNIT, Channel.SEGMENT), b'{"schema": 1, "recording_id": "r"}')
    unit.publish("classcap/v1/Not_A_Unit/status", b'{"schema": 1}')
    _send(unit, Channel.STATUS, Status(online=True, epoch=1), device="unit-z")  # not enrolled
    unit.publish(topic(UNIT, Channel.EVENT), b"")  # a cleared retained message
    _send(unit, Channel.STATUS, Status(online=True, epoch=2))
    assert wait_for(lambda: _online(harness), 10)
    fence(harness, unit)
    # Unshared and shared subscriptions arrive in separate streams: the fence orders
    # only the unit's own worker, so wait for the counters to settle.
    assert wait_for(
        lambda: (
            service.metrics()["messages_rejected_total"] == 4
            and service.metrics()["messages_unknown_unit_total"] == 1
        ),
        10,
    ), service.metrics()
    metrics = service.metrics()
    assert metrics["handler_errors_total"] == 0
    assert metrics["mqtt_connected"] == 1
    assert not harness.registry.known("unit-z")


def _announcement(
    data: bytes, recording_id: str = "rec-1", sequence: int = 0
) -> SegmentAnnouncement:
    now = utcnow()
    return SegmentAnnouncement(
        recording_id=recording_id,
        sequence=sequence,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        started_at=now - timedelta(seconds=10),
        ended_at=now,
    )


def test_segment_is_granted_uploaded_verified_and_confirmed_once(
    harness: Harness, unit: MqttTestClient, tmp_path: Path
) -> None:
    service = harness.start_service()
    data = b"fragmented mp4 bytes " * 5000
    segment = tmp_path / "seg-00000.mp4"
    segment.write_bytes(data)
    announcement = _announcement(data)
    _send(unit, Channel.SEGMENT, announcement)
    (received,) = unit.wait_for(_on(Channel.GRANT))
    grant = decode(UploadGrant, received.payload)
    assert received.expiry_s is not None and 110 <= received.expiry_s <= 120
    assert grant.key == harness.storage.key_for(UNIT, "rec-1", "seg-00000.mp4")
    assert set(grant.headers) == {"content-length", "x-amz-checksum-sha256"}
    assert grant.expires_at > utcnow() + timedelta(seconds=60)

    response = put_file(grant.url, segment, grant.headers, 30)
    assert response.ok, response
    _send(
        unit,
        Channel.UPLOAD,
        UploadResult(recording_id="rec-1", sequence=0, key=grant.key, ok=True, http_status=200),
    )
    stored = [decode(StoredConfirmation, m.payload) for m in unit.wait_for(_on(Channel.STORED))]
    assert stored[0].verified and stored[0].sha256 == announcement.sha256
    assert stored[0].size == len(data)

    _send(unit, Channel.SEGMENT, announcement)  # again, as after a crash before deleting
    fence(harness, unit)
    confirmations = [decode(StoredConfirmation, m.payload) for m in _answers(unit, Channel.STORED)]
    assert [c.verified for c in confirmations] == [True, True]
    assert len(_answers(unit, Channel.GRANT)) == 1
    assert harness.storage.verify(grant.key, len(data), announcement.sha256).ok
    metrics = service.metrics()
    assert metrics["grants_issued_total"] == 1
    assert metrics["segments_confirmed_total"] == 2


def test_an_upload_that_never_landed_is_refused_so_the_unit_keeps_its_copy(
    harness: Harness, unit: MqttTestClient
) -> None:
    harness.start_service()
    data = b"never uploaded"
    _send(unit, Channel.SEGMENT, _announcement(data, "rec-2"))
    grant = decode(UploadGrant, unit.wait_for(_on(Channel.GRANT))[0].payload)
    _send(
        unit,
        Channel.UPLOAD,
        UploadResult(recording_id="rec-2", sequence=0, key=grant.key, ok=True, http_status=200),
    )
    fence(harness, unit)
    (refusal,) = [decode(StoredConfirmation, m.payload) for m in _answers(unit, Channel.STORED)]
    assert not refusal.verified
    assert refusal.reason is not None and "not found" in refusal.reason


def _command_messages(unit: MqttTestClient) -> list[tuple[Command, int | None]]:
    return [
        (decode(Command, m.payload), m.expiry_s)
        for m in unit.messages(topic(UNIT, Channel.COMMAND))
    ]


def test_command_waits_for_its_unit_then_goes_out_with_message_expiry(
    harness: Harness, unit: MqttTestClient
) -> None:
    service = harness.start_service()
    (queued,) = harness.commands.create(
        [UNIT], CommandAction.START_RECORDING, created_by="test", expires_in_s=300
    )
    service.send_command(queued.id)  # the unit is offline: it stays queued
    fence(harness, unit)
    assert _command_messages(unit) == []
    view = harness.commands.get(queued.id)
    assert view is not None and view.status == "queued"

    _send(unit, Channel.STATUS, Status(online=True, epoch=1))
    unit.wait_for(_on(Channel.COMMAND))
    ((command, expiry),) = _command_messages(unit)
    assert command.id == queued.id and command.action is CommandAction.START_RECORDING
    assert expiry is not None and 290 <= expiry <= 300
    assert wait_for(lambda: getattr(harness.commands.get(queued.id), "status", None) == "sent", 10)

    for status in (CommandStatus.ACCEPTED, CommandStatus.DONE, CommandStatus.ACCEPTED):
        _send(
            unit,
            Channel.COMMAND_RESULT,
            CommandResult(command_id=queued.id, status=status, recording_id="rec-9"),
        )
    fence(harness, unit)
    view = harness.commands.get(queued.id)
    assert view is not None and view.status == "done" and view.recording_id == "rec-9"

    # Online now: a new command goes out at once.
    (snapshot,) = harness.commands.create(
        [UNIT], CommandAction.SNAPSHOT, created_by="test", expires_in_s=30
    )
    service.send_command(snapshot.id)
    unit.wait_for(_on(Channel.COMMAND), count=2)
    assert service.metrics()["commands_sent_total"] == 2


def test_expired_command_is_never_sent_and_is_marked_expired(
    harness: Harness, unit: MqttTestClient
) -> None:
    service = harness.start_service()
    (short,) = harness.commands.create(
        [UNIT], CommandAction.START_RECORDING, created_by="test", expires_in_s=1
    )
    service.send_command(short.id)
    assert wait_for(
        lambda: getattr(harness.commands.get(short.id), "status", None) == "expired", 10
    )
    _send(unit, Channel.STATUS, Status(online=True, epoch=1))
    assert wait_for(lambda: _online(harness), 10)
    service.send_command(short.id)
    fence(harness, unit)
    assert _command_messages(unit) == []


def test_desired_is_retained_and_sent_again_to_a_unit_that_runs_an_older_one(
    harness: Harness, unit: MqttTestClient, mqtt_client: Callable[..., MqttTestClient]
) -> None:
    service = harness.start_service()
    desired = harness.registry.set_desired(UNIT, settings=DesiredSettings(health_interval_s=15))
    service.publish_desired(UNIT, desired)
    (first,) = unit.wait_for(_on(Channel.DESIRED))
    assert decode(DesiredState, first.payload).version == desired.version
    late = mqtt_client(harness.broker, topic(UNIT, Channel.DESIRED))
    (retained,) = late.wait_for(lambda m: m.retain)
    assert decode(DesiredState, retained.payload) == desired

    _send(unit, Channel.REPORTED, ReportedState(desired_version=0, agent_version="0.1.0"))
    _send(unit, Channel.STATUS, Status(online=True, epoch=1))
    unit.wait_for(_on(Channel.DESIRED), count=2)  # drift: published again on connect
    _send(
        unit,
        Channel.REPORTED,
        ReportedState(desired_version=desired.version, agent_version="0.1.0"),
    )
    _send(unit, Channel.STATUS, Status(online=False, epoch=1))
    _send(unit, Channel.STATUS, Status(online=True, epoch=2))
    fence(harness, unit)
    assert len(unit.messages(topic(UNIT, Channel.DESIRED))) == 2
    view = harness.registry.get(UNIT)
    assert view is not None and not view.drift


def test_health_events_and_snapshots_reach_the_registry(
    harness: Harness, unit: MqttTestClient
) -> None:
    harness.start_service()
    _send(unit, Channel.STATUS, Status(online=True, epoch=1))
    _send(
        unit,
        Channel.HEALTH,
        Health(
            state=RecorderState.RECORDING,
            recording_id="rec-7",
            disk_free_bytes=10 * 2**30,
            disk_total_bytes=32 * 2**30,
            can_record=True,
            spool_segments=1,
            spool_bytes=1000,
            uptime_s=5,
            agent_version="0.1.0",
            rejected_messages=0,
        ),
    )
    _send(unit, Channel.EVENT, Event(kind=EventKind.BOOKMARK, message="group work starts"))
    jpeg = b"\xff\xd8\xff\xe0" + b"\x00" * 100 + b"\xff\xd9"
    _send(
        unit,
        Channel.SNAPSHOT,
        Snapshot(
            taken_at=utcnow(), width=320, height=240, jpeg_base64=base64.b64encode(jpeg).decode()
        ),
    )
    fence(harness, unit)
    view = harness.registry.get(UNIT)
    assert view is not None and view.state == "recording" and view.recording_id == "rec-7"
    assert any(e["message"] == "group work starts" for e in harness.registry.events(UNIT))
    snapshot = harness.registry.snapshot(UNIT)
    assert snapshot is not None and snapshot[0] == jpeg


def test_two_controllers_share_the_fleet_and_answer_each_announcement_once(
    harness: Harness, unit: MqttTestClient
) -> None:
    first = harness.start_service("controller-1")
    second = harness.start_service("controller-2")
    count = 12
    for sequence in range(count):
        _send(unit, Channel.SEGMENT, _announcement(b"x" * (sequence + 1), "rec-3", sequence))
    unit.wait_for(_on(Channel.GRANT), count=count)
    fence(harness, unit)
    grants = [decode(UploadGrant, m.payload) for m in _answers(unit, Channel.GRANT)]
    assert sorted(g.sequence for g in grants) == list(range(count))

    def handled() -> list[float]:
        return [s.metrics()["grants_issued_total"] for s in (first, second)]

    # A controller counts a grant just after publishing it: wait for the count to settle.
    assert wait_for(lambda: sum(handled()) == count, 10), handled()
    assert min(handled()) > 0, handled()


def test_stop_leaves_no_thread_behind(harness: Harness) -> None:
    before = set(threading.enumerate())
    service = harness.start_service()
    harness.services.remove(service)
    service.stop()
    assert wait_for(lambda: set(threading.enumerate()) <= before, 10), threading.enumerate()
    assert not service.connected


def test_a_stalled_store_holds_up_only_storage_work_never_health_or_presence(
    harness: Harness, unit: MqttTestClient, seaweedfs: SeaweedServer
) -> None:
    proxy = StorageProxy(seaweedfs.ports.s3, free_port())
    proxy.start()
    try:
        settings = storage_settings(seaweedfs, harness.storage.bucket)
        stalled = S3Storage(replace(settings, endpoint_url=proxy.url))
        # Storage the controller reaches only through the proxy; the unit's own PUTs are not
        # part of this test.
        harness.catalogue = Catalogue(harness.db, stalled, grant_expires_s=120)
        harness.start_service()
        _send(unit, Channel.SEGMENT, _announcement(b"segment", recording_id="rec-s"))
        (granted,) = unit.wait_for(_on(Channel.GRANT))
        key = decode(UploadGrant, granted.payload).key
        proxy.set_mode(ProxyMode.STALL)
        report = UploadResult(recording_id="rec-s", sequence=0, key=key, ok=True, http_status=200)
        _send(unit, Channel.UPLOAD, report)  # its verification waits on the store
        assert wait_for(lambda: proxy.counts["stalled"] >= 1, 10)

        # Behind the stalled verification, on the same unit: still handled at once.
        _send(unit, Channel.STATUS, Status(online=True, epoch=1))
        _send(unit, Channel.HEALTH, _health(spool_segments=7))
        assert wait_for(lambda: _online(harness), 10)
        assert wait_for(lambda: _spool_segments(harness) == 7, 10)
        assert proxy.counts["passed"] == 0

        proxy.set_mode(ProxyMode.PASS)  # the stall ends: the report is answered, not lost
        (answer,) = unit.wait_for(_on(Channel.STORED), timeout=90)
        confirmation = decode(StoredConfirmation, answer.payload)
        assert confirmation.recording_id == "rec-s" and not confirmation.verified
    finally:
        proxy.stop()


def _health(spool_segments: int) -> Health:
    return Health(
        state=RecorderState.IDLE,
        disk_free_bytes=10 * 2**30,
        disk_total_bytes=32 * 2**30,
        can_record=True,
        spool_segments=spool_segments,
        spool_bytes=0,
        uptime_s=5,
        agent_version="0.1.0",
        rejected_messages=0,
    )


def _spool_segments(harness: Harness) -> object:
    view = harness.registry.get(UNIT)
    return None if view is None or view.health is None else view.health.get("spool_segments")
