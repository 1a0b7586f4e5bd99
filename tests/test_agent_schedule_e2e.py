"""Scheduled captures end to end: a real agent runs the windows of its retained desired state
against a real broker, real ffmpeg and SeaweedFS, with and without the controller reachable."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controller.storage.s3 import S3Storage
from device.journal import SegmentState
from shared.clock import utcnow
from shared.messages import (
    CaptureWindow,
    DesiredState,
    EndReason,
    RecordingManifest,
    RecordingStatus,
    ReportedState,
    Trigger,
)
from shared.topics import Channel, topic
from tests.support.agent_proc import AgentProcess, make_agent
from tests.support.processes import wait_for
from tests.support.standin_controller import StandinController

# Wall-clock slack for comparing the unit's timestamps with the test's.
SLACK = timedelta(seconds=1.5)


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
    agents: list[AgentProcess], tmp_path: Path, broker: Any, name: str
) -> AgentProcess:
    agent = make_agent(tmp_path, name, broker.url, segment_seconds=4)
    agents.append(agent)
    agent.start()
    return agent


def _window(window_id: str, start_in_s: float, length_s: float) -> CaptureWindow:
    start = utcnow() + timedelta(seconds=start_in_s)
    return CaptureWindow(window_id=window_id, start=start, end=start + timedelta(seconds=length_s))


def _publish_schedule(
    controller: StandinController, device_id: str, version: int, windows: list[CaptureWindow]
) -> None:
    desired = DesiredState(version=version, schedule=windows)
    controller.publish_raw(topic(device_id, Channel.DESIRED), desired.to_json(), retain=True)

    def applied() -> bool:
        reports = controller.of(device_id, Channel.REPORTED)
        return any(isinstance(r, ReportedState) and r.desired_version == version for r in reports)

    assert wait_for(applied, 15)


def _manifests(controller: StandinController, device_id: str) -> dict[str, RecordingManifest]:
    """The latest manifest the controller saw of each recording."""
    latest: dict[str, RecordingManifest] = {}
    for manifest in controller.of(device_id, Channel.RECORDING):
        latest[manifest.recording_id] = manifest
    return latest


def _ended(controller: StandinController, device_id: str, count: int) -> list[RecordingManifest]:
    def done() -> bool:
        found = _manifests(controller, device_id).values()
        return len(found) == count and all(m.ended_at is not None for m in found)

    assert wait_for(done, 60), _manifests(controller, device_id)
    return sorted(_manifests(controller, device_id).values(), key=lambda m: m.started_at)


def _all_stored(agent: AgentProcess, recording_id: str) -> bool:
    journal = agent.journal()
    try:
        rows = journal.all_segments(recording_id)
    finally:
        journal.close()
    return bool(rows) and all(r.state is SegmentState.STORED for r in rows)


def _wait_until(moment: datetime) -> None:
    assert wait_for(lambda: utcnow() >= moment, (moment - utcnow()).total_seconds() + 5)


def test_back_to_back_windows_make_two_complete_recordings(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-b2b")
    first = _window("period-1", 3, 9)
    second = CaptureWindow(
        window_id="period-2", start=first.end, end=first.end + (first.end - first.start)
    )
    _publish_schedule(controller, "unit-b2b", 1, [first, second])

    one, two = _ended(controller, "unit-b2b", 2)
    for manifest, window in ((one, first), (two, second)):
        assert manifest.trigger is Trigger.SCHEDULE
        assert manifest.window_id == window.window_id
        assert manifest.status is RecordingStatus.COMPLETE
        assert manifest.end_reason is EndReason.SCHEDULE
        assert manifest.gaps == []
        assert abs(manifest.started_at - window.start) < SLACK
        assert manifest.ended_at is not None and abs(manifest.ended_at - window.end) < SLACK
        assert wait_for(lambda m=manifest: _all_stored(agent, m.recording_id), 60), agent.log_tail()


def test_window_while_broker_is_down_is_recorded_and_uploaded_later(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-offline-sched")
    window = _window("lesson", 5, 9)
    _publish_schedule(controller, "unit-offline-sched", 1, [window])
    broker.stop()
    assert wait_for(lambda: agent.status()["state"] == "recording", 15), agent.log_tail()
    assert agent.status()["connected"] is False
    recording_id = str(agent.status()["recording_id"])
    _wait_until(window.end)
    assert wait_for(lambda: agent.status()["state"] == "idle", 10), agent.log_tail()
    broker.start()

    # Segments are announced again until stored; the manifests sent on reconnect may
    # reach the broker before the controller has subscribed again, so read the journal.
    assert wait_for(lambda: _all_stored(agent, recording_id), 60), agent.log_tail()
    journal = agent.journal()
    try:
        manifest = journal.manifest(recording_id)
    finally:
        journal.close()
    assert manifest is not None
    assert (manifest.trigger, manifest.window_id) == (Trigger.SCHEDULE, "lesson")
    assert (manifest.status, manifest.end_reason) == (RecordingStatus.COMPLETE, EndReason.SCHEDULE)


def test_restart_inside_a_window_records_the_rest_as_partial_with_a_gap(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-restart-sched")
    window = _window("lesson", 2, 22)
    _publish_schedule(controller, "unit-restart-sched", 1, [window])
    assert wait_for(lambda: agent.status()["state"] == "recording", 10), agent.log_tail()
    first_id = str(agent.status()["recording_id"])
    assert wait_for(lambda: utcnow() >= window.start + timedelta(seconds=6), 15)
    agent.kill9()
    agent.start()

    first, second = _ended(controller, "unit-restart-sched", 2)
    assert first.recording_id == first_id
    assert (first.status, first.end_reason) == (RecordingStatus.INTERRUPTED, EndReason.POWER_LOSS)
    assert (second.trigger, second.window_id) == (Trigger.SCHEDULE, "lesson")
    assert (second.status, second.end_reason) == (RecordingStatus.PARTIAL, EndReason.SCHEDULE)
    [gap] = second.gaps
    assert first.ended_at is not None and gap.start == first.ended_at
    assert abs(gap.end - second.started_at) < SLACK
    assert second.ended_at is not None and abs(second.ended_at - window.end) < SLACK
    assert wait_for(lambda: _all_stored(agent, second.recording_id), 60), agent.log_tail()


def test_window_deleted_before_it_starts_records_nothing(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-deleted")
    window = _window("cancelled", 5, 4)
    _publish_schedule(controller, "unit-deleted", 1, [window])
    _publish_schedule(controller, "unit-deleted", 2, [])
    seen: set[object] = set()

    def past_window() -> bool:
        seen.add(agent.status()["state"])
        return utcnow() >= window.end + timedelta(seconds=1)

    assert wait_for(past_window, 20, interval=0.2)
    assert seen == {"idle"}
    assert _manifests(controller, "unit-deleted") == {}


def test_window_moved_while_offline_is_recorded_at_its_new_time_only(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-moved")
    old = _window("lesson", 12, 4)
    _publish_schedule(controller, "unit-moved", 1, [old])
    broker.stop()
    assert wait_for(lambda: agent.status()["connected"] is False, 15)
    broker.start()
    assert wait_for(controller.client.is_connected, 15)
    new = CaptureWindow(
        window_id="lesson", start=old.end + timedelta(seconds=4), end=old.end + timedelta(seconds=9)
    )
    _publish_schedule(controller, "unit-moved", 2, [new])
    assert utcnow() < old.start, "the move reached the unit too late for this test to mean anything"

    [manifest] = _ended(controller, "unit-moved", 1)
    assert (manifest.trigger, manifest.window_id) == (Trigger.SCHEDULE, "lesson")
    assert manifest.status is RecordingStatus.COMPLETE
    assert abs(manifest.started_at - new.start) < SLACK
    assert manifest.ended_at is not None and abs(manifest.ended_at - new.end) < SLACK
    assert wait_for(lambda: _all_stored(agent, manifest.recording_id), 60), agent.log_tail()


def test_button_mock_pins_stop_a_scheduled_capture_that_is_not_restarted(
    tmp_path: Path, broker: Any, controller: StandinController, agents: list[AgentProcess]
) -> None:
    agent = _start_agent(agents, tmp_path, broker, "unit-button-sched")
    window = _window("lesson", 2, 14)
    _publish_schedule(controller, "unit-button-sched", 1, [window])
    assert wait_for(lambda: agent.status()["state"] == "recording", 10), agent.log_tail()
    scheduled_id = str(agent.status()["recording_id"])
    agent.press("short")
    assert wait_for(lambda: agent.status()["state"] == "idle", 10), agent.log_tail()

    seen: set[object] = set()

    def quiet_for_a_while() -> bool:
        seen.add(agent.status()["state"])
        return utcnow() >= window.start + timedelta(seconds=7)

    assert wait_for(quiet_for_a_while, 15, interval=0.2)
    assert seen == {"idle"}

    agent.press("short")
    assert wait_for(lambda: agent.status()["state"] == "recording", 10), agent.log_tail()
    manual_id = str(agent.status()["recording_id"])
    _wait_until(window.end + timedelta(seconds=2))
    assert agent.status()["recording_id"] == manual_id
    agent.press("short")
    assert wait_for(lambda: agent.status()["state"] == "idle", 10), agent.log_tail()

    manifests = {m.recording_id: m for m in _ended(controller, "unit-button-sched", 2)}
    scheduled, manual = manifests[scheduled_id], manifests[manual_id]
    assert (scheduled.trigger, scheduled.window_id) == (Trigger.SCHEDULE, "lesson")
    assert (scheduled.status, scheduled.end_reason) == (RecordingStatus.COMPLETE, EndReason.BUTTON)
    assert (manual.trigger, manual.window_id) == (Trigger.BUTTON, None)
    assert manual.end_reason is EndReason.BUTTON
