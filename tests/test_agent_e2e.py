"""A real agent process against a real broker, real ffmpeg and SeaweedFS as district storage."""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.storage.s3 import S3Storage
from device.journal import SegmentState
from shared.messages import (
    CommandAction,
    CommandStatus,
    DesiredSettings,
    DesiredState,
    EventKind,
    RecordingStatus,
)
from shared.topics import Channel, topic
from tests.support.agent_proc import AgentProcess, make_agent
from tests.support.media import probe
from tests.support.processes import wait_for
from tests.support.s3 import list_keys
from tests.support.seaweed_server import SeaweedServer
from tests.support.standin_controller import StandinController

FRAME_S = 0.1  # the simulated units record at 10 fps


@pytest.fixture
def controller(broker: Any, s3_storage: S3Storage) -> Iterator[StandinController]:
    standin = StandinController("127.0.0.1", broker.port, s3_storage)
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def _start_agent(
    agents: list[AgentProcess], tmp_path: Path, broker: Any, name: str, **cfg: Any
) -> AgentProcess:
    agent = make_agent(tmp_path, name, broker.url, **cfg)
    agents.append(agent)
    agent.start()
    return agent


def _press_to_record(agent: AgentProcess) -> str:
    agent.press("short")
    assert wait_for(lambda: agent.status()["state"] == "recording", 10)
    return str(agent.status()["recording_id"])


def _stored_segments(server: SeaweedServer, storage: S3Storage, device_id: str) -> list[str]:
    return [k for k in list_keys(server, storage.bucket) if f"/{device_id}/" in k and "/seg-" in k]


def _download(server: SeaweedServer, storage: S3Storage, key: str, dest: Path) -> Path:
    server.client().download_file(storage.bucket, key, str(dest))
    return dest


def _spool_segments(agent: AgentProcess) -> list[Path]:
    return sorted((agent.data_dir / "spool").glob("*/seg-*.mp4"))


def _all_stored(agent: AgentProcess, recording_id: str, expected: int | None = None) -> bool:
    journal = agent.journal()
    try:
        rows = journal.all_segments(recording_id)
    finally:
        journal.close()
    if expected is not None and len(rows) != expected:
        return False
    return bool(rows) and all(r.state is SegmentState.STORED for r in rows)


@pytest.mark.slow
def test_three_and_a_half_minutes_in_sixty_second_segments(
    tmp_path: Path,
    broker: Any,
    controller: StandinController,
    seaweedfs: SeaweedServer,
    s3_storage: S3Storage,
    agents: list[AgentProcess],
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-long", segment_seconds=60)
    start = controller.send_command("unit-long", CommandAction.START_RECORDING)
    done = controller.wait_result("unit-long", start.id, CommandStatus.DONE)
    began = time.monotonic()
    recording_id = done.recording_id
    assert recording_id is not None
    time.sleep(210 - (time.monotonic() - began))
    stop = controller.send_command("unit-long", CommandAction.STOP_RECORDING)
    controller.wait_result("unit-long", stop.id, CommandStatus.DONE)
    wall = time.monotonic() - began

    assert wait_for(lambda: _all_stored(agent, recording_id, 4), 90), agent.log_tail()
    journal = agent.journal()
    try:
        rows = journal.all_segments(recording_id)
    finally:
        journal.close()
    assert [r.sequence for r in rows] == [0, 1, 2, 3]
    for before, after in itertools.pairwise(rows):
        assert before.ended_at is not None
        gap = (after.started_at - before.ended_at).total_seconds()
        assert abs(gap) <= FRAME_S, (before, after)

    keys = sorted(_stored_segments(seaweedfs, s3_storage, "unit-long"))
    assert [k.rsplit("/", 1)[1] for k in keys] == [f"seg-0000{i}.mp4" for i in range(4)]
    total = 0.0
    for row, key in zip(rows, keys, strict=True):
        info = probe(_download(seaweedfs, s3_storage, key, tmp_path / f"{row.sequence}.mp4"))
        assert info.stream("video").codec_name == "h264"
        assert info.stream("audio").codec_name == "aac"
        total += info.duration_of("video")
    assert abs(total - wall) <= 1.0, (total, wall)
    assert wait_for(lambda: not _spool_segments(agent), 10)
    # Once storage has confirmed every segment of an ended recording its folder goes too.
    assert wait_for(lambda: not (agent.data_dir / "spool" / recording_id).exists(), 10)


def test_kill9_mid_segment_recovers_partial_segment_and_uploads_it(
    tmp_path: Path,
    broker: Any,
    controller: StandinController,
    seaweedfs: SeaweedServer,
    s3_storage: S3Storage,
    agents: list[AgentProcess],
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-crash", segment_seconds=10)
    recording_id = _press_to_record(agent)
    time.sleep(16)  # one whole segment, then 6 s into the second
    agent.kill9()
    rec_dir = agent.data_dir / "spool" / recording_id
    cut = rec_dir / "seg-00001.mp4"
    assert cut.exists()

    agent.start()
    journal = agent.journal()
    try:
        manifest = journal.manifest(recording_id)
        assert manifest is not None
        assert manifest.status is RecordingStatus.INTERRUPTED
        row = journal.segment(recording_id, 1)
        assert row is not None and row.recovered
    finally:
        journal.close()
    assert wait_for(lambda: _all_stored(agent, recording_id), 60), agent.log_tail()
    key = next(
        k
        for k in _stored_segments(seaweedfs, s3_storage, "unit-crash")
        if k.endswith("seg-00001.mp4")
    )
    info = probe(_download(seaweedfs, s3_storage, key, tmp_path / "cut.mp4"))
    assert info.stream("video").codec_name == "h264"
    assert info.stream("audio").codec_name == "aac"
    assert info.duration_of("video") >= 2.0
    recovered = controller.of("unit-crash", Channel.EVENT)
    assert any(e.kind is EventKind.RECORDING_RECOVERED for e in recovered)


@pytest.mark.slow
def test_broker_down_two_minutes_recording_continues_and_everything_uploads_once(
    tmp_path: Path,
    broker: Any,
    controller: StandinController,
    seaweedfs: SeaweedServer,
    s3_storage: S3Storage,
    agents: list[AgentProcess],
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-offline", segment_seconds=20)
    recording_id = _press_to_record(agent)
    time.sleep(5)
    broker.stop()
    time.sleep(120)
    assert agent.status()["state"] == "recording"
    assert not agent.status()["connected"]
    queued = len(_spool_segments(agent))
    assert queued >= 6
    broker.start()
    time.sleep(10)
    agent.press("short")
    assert wait_for(lambda: agent.status()["state"] == "idle", 15)
    assert wait_for(lambda: _all_stored(agent, recording_id), 90), agent.log_tail()

    journal = agent.journal()
    try:
        count = len(journal.all_segments(recording_id))
    finally:
        journal.close()
    keys = _stored_segments(seaweedfs, s3_storage, "unit-offline")
    assert len(keys) == len(set(keys)) == count
    grantor = controller.grantor("unit-offline")
    assert len(grantor.stored) == count
    assert set(grantor.stored.values()) == {1}
    assert not _spool_segments(agent)


def test_disk_budget_refuses_new_recording_and_keeps_segments(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    controller.answer_segments = False
    agent = _start_agent(agents, tmp_path, broker, "unit-disk", segment_seconds=4)
    agent.press("short")
    assert wait_for(lambda: agent.status()["state"] == "recording", 10)
    time.sleep(9)
    agent.press("short")
    assert wait_for(lambda: agent.status()["state"] == "idle", 15)
    kept = {p: p.stat().st_size for p in _spool_segments(agent)}
    assert len(kept) >= 2
    agent.stop()

    config = agent.config_path.read_text().replace("min_free_mb = 0", "min_free_mb = 100000000")
    agent.config_path.write_text(config)
    agent.start()
    command = controller.send_command("unit-disk", CommandAction.START_RECORDING)
    result = controller.wait_result("unit-disk", command.id, CommandStatus.REJECTED)
    assert result.reason is not None and "budget" in result.reason
    agent.press("short")
    time.sleep(2)
    assert agent.status()["state"] == "idle"
    assert agent.status()["light"] == "cannot_record"
    events = controller.of("unit-disk", Channel.EVENT)
    assert any(e.kind is EventKind.RECORDING_REFUSED for e in events)
    assert {p: p.stat().st_size for p in _spool_segments(agent)} == kept


def test_button_mock_pins_press_double_long_from_another_process(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-button", segment_seconds=10)
    agent.press("long")
    time.sleep(1.5)
    assert agent.status()["state"] == "idle"
    assert agent.status()["light_on"] is False

    agent.press("short")
    assert wait_for(lambda: agent.status()["state"] == "recording", 5)
    assert agent.status()["light_on"] is True
    recording_id = str(agent.status()["recording_id"])
    agent.press("double")
    time.sleep(1)
    assert agent.status()["state"] == "recording"
    agent.press("short")
    assert wait_for(lambda: agent.status()["state"] == "idle", 15)
    journal = agent.journal()
    try:
        manifest = journal.manifest(recording_id)
    finally:
        journal.close()
    assert manifest is not None
    assert len(manifest.bookmarks) == 1 and manifest.bookmarks[0].source == "button"
    assert manifest.end_reason is not None and manifest.end_reason.value == "button"


def test_bad_messages_are_rejected_counted_and_agent_keeps_working(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-bad", segment_seconds=10)
    base = "classcap/v1/unit-bad"
    controller.publish_raw(f"{base}/command", b"{not json")
    controller.publish_raw(f"{base}/command", b'{"schema": 2, "id": "c-v2"}')
    controller.publish_raw(
        f"{base}/command",
        b'{"schema": 1, "id": "c-unknown", "action": "self_destruct",'
        b' "expires_at": "2099-01-01T00:00:00Z"}',
    )
    controller.publish_raw(f"{base}/grant", b'{"schema": 1}')
    controller.publish_raw(f"{base}/desired", b"[]")
    unknown = controller.wait_result("unit-bad", "c-unknown", CommandStatus.REJECTED)
    assert unknown.reason is not None and "action" in unknown.reason

    expired = controller.send_command("unit-bad", CommandAction.START_RECORDING, expires_in_s=-5)
    rejected = controller.wait_result("unit-bad", expired.id, CommandStatus.REJECTED)
    assert rejected.reason is not None and "expired" in rejected.reason
    assert agent.status()["state"] == "idle"

    first = controller.send_command("unit-bad", CommandAction.BOOKMARK, command_id="c-replay")
    controller.wait_result("unit-bad", first.id, CommandStatus.REJECTED)
    controller.publish_raw(f"{base}/command", first.to_json())
    assert wait_for(lambda: len(controller.results("unit-bad", "c-replay")) >= 2, 10)

    assert wait_for(lambda: int(str(agent.status()["rejected_messages"])) >= 5, 10)
    start = controller.send_command("unit-bad", CommandAction.START_RECORDING)
    controller.wait_result("unit-bad", start.id, CommandStatus.DONE)
    stop = controller.send_command("unit-bad", CommandAction.STOP_RECORDING)
    controller.wait_result("unit-bad", stop.id, CommandStatus.DONE)


def test_snapshot_reboot_and_desired_state_through_the_broker(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-cmds", segment_seconds=10)
    recording_id = _press_to_record(agent)

    snap = controller.send_command("unit-cmds", CommandAction.SNAPSHOT)
    controller.wait_result("unit-cmds", snap.id, CommandStatus.DONE)
    assert wait_for(lambda: controller.of("unit-cmds", Channel.SNAPSHOT), 10)
    picture = controller.of("unit-cmds", Channel.SNAPSHOT)[0]
    jpeg = base64.b64decode(picture.jpeg_base64)
    assert jpeg[:2] == b"\xff\xd8" and picture.command_id == snap.id
    assert agent.status()["recording_id"] == recording_id

    reboot = controller.send_command("unit-cmds", CommandAction.REBOOT)
    done = controller.wait_result("unit-cmds", reboot.id, CommandStatus.DONE)
    assert done.reason is not None and "no reboot command" in done.reason
    assert agent.status()["state"] == "recording"

    desired = DesiredState(version=3, settings=DesiredSettings(health_interval_s=1))
    controller.publish_raw(topic("unit-cmds", Channel.DESIRED), desired.to_json(), retain=True)
    assert wait_for(
        lambda: any(r.desired_version == 3 for r in controller.of("unit-cmds", Channel.REPORTED)),
        10,
    )
    older = DesiredState(version=2)
    apply = controller.send_command("unit-cmds", CommandAction.APPLY, desired=older)
    controller.wait_result("unit-cmds", apply.id, CommandStatus.DONE)
    assert controller.of("unit-cmds", Channel.REPORTED)[-1].desired_version == 3

    # The unit keeps what it applied: with the retained document gone, a restarted
    # unit still reports version 3.
    controller.publish_raw(topic("unit-cmds", Channel.DESIRED), b"", retain=True)
    agent.stop()
    reported_before = len(controller.of("unit-cmds", Channel.REPORTED))
    agent.start()
    assert wait_for(lambda: len(controller.of("unit-cmds", Channel.REPORTED)) > reported_before, 10)
    assert controller.of("unit-cmds", Channel.REPORTED)[-1].desired_version == 3
    assert wait_for(lambda: controller.of("unit-cmds", Channel.HEALTH), 10), (
        controller.undecodable,
        agent.log_tail(),
    )
    health = controller.of("unit-cmds", Channel.HEALTH)[-1]
    assert health.agent_version and health.camera_present is True
