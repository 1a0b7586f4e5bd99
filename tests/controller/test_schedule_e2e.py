"""Scheduled capture through the whole system: a real controller (its own Mosquitto, SQLite,
local storage) turns a school's bell schedule and a capture plan into the desired state of a
real agent process, which records the windows on its own clock, in real time."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from controller.schedule_service import ScheduleService, TimelineEntry, WindowStatus
from controller.schedules import ScheduleStore, with_bell_schedule
from controller.service import ControllerService
from device.journal import SegmentState
from shared.clock import utcnow
from shared.messages import EndReason, RecordingStatus, Trigger
from shared.schedule import (
    BellSchedule,
    CapturePlan,
    DayType,
    Period,
    Room,
    School,
    SchoolCalendar,
)
from tests.support.agent_proc import AgentProcess
from tests.support.controller_proc import (
    controller_document,
    enrol_unit,
    running_controller,
    write_controller_config,
)
from tests.support.processes import wait_for

SCHOOL = "Harbour Middle"
ROOM = "Room 204"
# Wall-clock slack between the unit's timestamps and the plan's.
SLACK = timedelta(seconds=2)
# Zones far enough apart that one of them is always away from local midnight.
ZONES = ("America/New_York", "Europe/London", "Asia/Tokyo")


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerService]:
    document = controller_document(tmp_path)
    document["schedule"] = {
        "refresh_interval_s": 3600,
        "check_interval_s": 1,
        "missed_grace_s": 4,
        "at_risk_before_s": 60,
    }
    config = write_controller_config(tmp_path / "controller.toml", document)
    with running_controller(config) as service:
        yield service


def _zone() -> ZoneInfo:
    """A zone whose local time stays on today's date for the next ten minutes."""
    for name in ZONES:
        zone = ZoneInfo(name)
        local = utcnow().astimezone(zone)
        if (local + timedelta(minutes=10)).date() == local.date() and local.hour >= 1:
            return zone
    raise AssertionError("no zone away from midnight")


class Lessons:
    """A school in a real timezone whose bell schedule has periods seconds from now."""

    def __init__(self, service: ControllerService, device_id: str) -> None:
        self.service = service
        self.device_id = device_id
        self.zone = _zone()
        store, schedules = service.services.schedule_store, service.services.schedules
        assert store is not None and schedules is not None
        self.store: ScheduleStore = store
        self.schedules: ScheduleService = schedules
        today = utcnow().astimezone(self.zone).date()
        school = School(
            name=SCHOOL,
            timezone=str(self.zone),
            bell_schedules=[self._bells({"P1": (3600, 3610)})],
            day_types=[DayType(name="Regular", bell_schedule="Regular")],
            calendar=SchoolCalendar(
                first_day=today - timedelta(days=1),
                last_day=today + timedelta(days=30),
                weekdays=[1, 2, 3, 4, 5, 6, 7],
                default_day_type="Regular",
            ),
            rooms=[Room(name=ROOM, device_id=device_id)],
        )
        self.school_id = self.store.create_school(school).id
        self.today = today

    def _bells(self, periods: dict[str, tuple[float, float]]) -> BellSchedule:
        """Periods at these offsets in seconds from now, as local wall-clock times."""
        base = utcnow().astimezone(self.zone)
        return BellSchedule(
            name="Regular",
            periods=[
                Period(name=name, start=_local(base, start), end=_local(base, end))
                for name, (start, end) in periods.items()
            ],
        )

    def set_periods(self, periods: dict[str, tuple[float, float]]) -> None:
        bells = self._bells(periods)
        self.store.update_school(self.school_id, lambda s: with_bell_schedule(s, bells))
        self.refresh()

    def plan(self, periods: list[str]) -> int:
        record = self.store.create_plan(
            self.school_id,
            CapturePlan(
                name="coach",
                school=SCHOOL,
                rooms=[ROOM],
                periods=periods,
                first_day=self.today,
                last_day=self.today + timedelta(days=7),
            ),
            created_by="tests",
        )
        self.refresh()
        return record.id

    def delete_plan(self, plan_id: int) -> None:
        self.store.delete_plan(plan_id)
        self.refresh()

    def refresh(self) -> None:
        self.schedules.refresh(school_ids=[self.school_id])

    def _entry(self, period: str) -> TimelineEntry:
        timeline = self.schedules.timeline(self.school_id, self.today, self.today)
        [entry] = [e for e in timeline if e.period == period]
        return entry

    def window(self, period: str) -> tuple[datetime, datetime]:
        entry = self._entry(period)
        return entry.start, entry.end

    def status(self, period: str) -> WindowStatus:
        return self._entry(period).status

    def applied(self) -> bool:
        view = self.service.services.registry.get(self.device_id)
        return view is not None and view.reported_version == view.desired_version > 0


def _local(base: datetime, offset_s: float) -> time:
    return (base + timedelta(seconds=offset_s)).time().replace(microsecond=0, tzinfo=None)


def _unit(
    service: ControllerService, tmp_path: Path, agents: list[AgentProcess], device_id: str
) -> AgentProcess:
    agent = enrol_unit(service, tmp_path, device_id, school=SCHOOL, room=ROOM, segment_seconds=4)
    agents.append(agent)
    agent.start()
    return agent


def _scheduled(service: ControllerService, device_id: str) -> list[Any]:
    page = service.services.catalogue.list(device_id=device_id, page=1, per_page=50)
    return sorted(
        (r for r in page.items if r.trigger == Trigger.SCHEDULE.value),
        key=lambda r: r.started_at,
    )


def _stored_whole(service: ControllerService, recording_id: str) -> bool:
    recording = service.services.catalogue.get(recording_id)
    return (
        recording is not None
        and recording.ended_at is not None
        and recording.segments_stored == recording.segments_reported > 0
    )


def _all_stored(agent: AgentProcess, recording_id: str) -> bool:
    journal = agent.journal()
    try:
        rows = journal.all_segments(recording_id)
    finally:
        journal.close()
    return bool(rows) and all(r.state is SegmentState.STORED for r in rows)


def _wait_until(moment: datetime) -> None:
    assert wait_for(lambda: utcnow() >= moment, (moment - utcnow()).total_seconds() + 5)


def test_back_to_back_periods_make_two_complete_recordings_named_by_their_windows(
    tmp_path: Path, controller: ControllerService, agents: list[AgentProcess]
) -> None:
    agent = _unit(controller, tmp_path, agents, "unit-bells")
    lessons = Lessons(controller, "unit-bells")
    lessons.set_periods({"Period 1": (12, 22), "Period 2": (22, 32)})
    lessons.plan(["Period 1", "Period 2"])
    assert wait_for(lessons.applied, 15), agent.log_tail()

    def both_stored() -> bool:
        found = _scheduled(controller, "unit-bells")
        return len(found) == 2 and all(_stored_whole(controller, r.id) for r in found)

    assert wait_for(both_stored, 90), agent.log_tail()
    one, two = _scheduled(controller, "unit-bells")
    for recording, period in ((one, "Period 1"), (two, "Period 2")):
        start, end = lessons.window(period)
        assert recording.window_id.endswith(period.lower().replace(" ", "-"))
        assert recording.title == f"{SCHOOL} · {ROOM} · {lessons.today:%Y-%m-%d} · {period}"
        assert recording.status == RecordingStatus.COMPLETE.value
        assert recording.end_reason == EndReason.SCHEDULE.value
        assert abs(recording.started_at - start) < SLACK
        assert recording.ended_at is not None and abs(recording.ended_at - end) < SLACK
        assert lessons.status(period) is WindowStatus.COMPLETED


def test_period_while_the_broker_is_down_is_recorded_and_uploaded_later(
    tmp_path: Path, controller: ControllerService, agents: list[AgentProcess]
) -> None:
    agent = _unit(controller, tmp_path, agents, "unit-nobroker")
    lessons = Lessons(controller, "unit-nobroker")
    lessons.set_periods({"Period 2": (15, 25)})
    lessons.plan(["Period 2"])
    assert wait_for(lessons.applied, 15), agent.log_tail()
    broker = controller.broker
    assert broker is not None
    broker.stop()
    start, end = lessons.window("Period 2")
    assert wait_for(lambda: agent.status()["state"] == "recording", 30), agent.log_tail()
    assert agent.status()["connected"] is False
    recording_id = str(agent.status()["recording_id"])
    _wait_until(end)
    assert wait_for(lambda: agent.status()["state"] == "idle", 10), agent.log_tail()
    broker.start()

    assert wait_for(lambda: _stored_whole(controller, recording_id), 90), agent.log_tail()
    assert wait_for(lambda: _all_stored(agent, recording_id), 30), agent.log_tail()
    recording = controller.services.catalogue.get(recording_id)
    assert recording is not None
    assert recording.status == RecordingStatus.COMPLETE.value
    assert abs(recording.started_at - start) < SLACK
    assert lessons.status("Period 2") is WindowStatus.COMPLETED


def test_unit_restarted_inside_a_period_records_the_rest_as_partial_with_the_gap(
    tmp_path: Path, controller: ControllerService, agents: list[AgentProcess]
) -> None:
    agent = _unit(controller, tmp_path, agents, "unit-restart")
    lessons = Lessons(controller, "unit-restart")
    lessons.set_periods({"Period 3": (10, 34)})
    lessons.plan(["Period 3"])
    assert wait_for(lessons.applied, 15), agent.log_tail()
    start, end = lessons.window("Period 3")
    assert wait_for(lambda: agent.status()["state"] == "recording", 30), agent.log_tail()
    _wait_until(start + timedelta(seconds=6))
    agent.kill9()
    agent.start()

    def two_ended() -> bool:
        found = _scheduled(controller, "unit-restart")
        return len(found) == 2 and all(r.ended_at is not None for r in found)

    assert wait_for(two_ended, 90), agent.log_tail()
    first, second = _scheduled(controller, "unit-restart")
    assert first.status == RecordingStatus.INTERRUPTED.value
    assert second.status == RecordingStatus.PARTIAL.value
    assert first.window_id == second.window_id
    assert len(second.gaps) == 1
    assert second.ended_at is not None and abs(second.ended_at - end) < SLACK
    assert wait_for(lambda: lessons.status("Period 3") is WindowStatus.PARTIAL, 30)


def test_period_deleted_before_it_starts_is_not_recorded(
    tmp_path: Path, controller: ControllerService, agents: list[AgentProcess]
) -> None:
    agent = _unit(controller, tmp_path, agents, "unit-cancel")
    lessons = Lessons(controller, "unit-cancel")
    lessons.set_periods({"Period 4": (12, 18)})
    plan_id = lessons.plan(["Period 4"])
    assert wait_for(lessons.applied, 15), agent.log_tail()
    _, end = lessons.window("Period 4")
    lessons.delete_plan(plan_id)
    assert wait_for(lessons.applied, 10), agent.log_tail()
    assert utcnow() < end - timedelta(seconds=6), "the deletion came too late to mean anything"

    seen: set[object] = set()

    def past_window() -> bool:
        seen.add(agent.status()["state"])
        return utcnow() >= end + timedelta(seconds=2)

    assert wait_for(past_window, 30, interval=0.2)
    assert seen == {"idle"}
    assert _scheduled(controller, "unit-cancel") == []


def test_period_moved_while_the_unit_is_offline_is_recorded_at_its_new_time_only(
    tmp_path: Path, controller: ControllerService, agents: list[AgentProcess]
) -> None:
    agent = _unit(controller, tmp_path, agents, "unit-moved")
    lessons = Lessons(controller, "unit-moved")
    lessons.set_periods({"Period 5": (20, 26)})
    lessons.plan(["Period 5"])
    assert wait_for(lessons.applied, 15), agent.log_tail()
    old_start, old_end = lessons.window("Period 5")
    agent.stop()
    lessons.set_periods({"Period 5": (30, 38)})
    new_start, new_end = lessons.window("Period 5")
    agent.start()
    assert wait_for(lessons.applied, 15), agent.log_tail()
    assert utcnow() < old_start, "the move reached the unit too late for this test to mean anything"

    def one_stored() -> bool:
        found = _scheduled(controller, "unit-moved")
        return len(found) == 1 and _stored_whole(controller, found[0].id)

    assert wait_for(one_stored, 90), agent.log_tail()
    [recording] = _scheduled(controller, "unit-moved")
    assert abs(recording.started_at - new_start) < SLACK
    assert recording.ended_at is not None and abs(recording.ended_at - new_end) < SLACK
    assert old_end < recording.started_at


def test_period_of_an_offline_unit_raises_a_missed_capture_alert_naming_the_cause(
    tmp_path: Path, controller: ControllerService, agents: list[AgentProcess]
) -> None:
    _unit(controller, tmp_path, agents, "unit-missing").stop()
    lessons = Lessons(controller, "unit-missing")
    lessons.set_periods({"Period 6": (3, 9)})
    lessons.plan(["Period 6"])

    def missed_alert() -> Any:
        page = controller.services.alerts.list(
            open_only=True, device_id="unit-missing", kind="capture_missed", page=1, per_page=5
        )
        return page.items[0] if page.items else None

    assert wait_for(lambda: missed_alert() is not None, 40)
    assert "offline" in missed_alert().message
    assert lessons.status("Period 6") is WindowStatus.MISSED


def test_offline_unit_is_flagged_at_risk_before_its_period(
    tmp_path: Path, controller: ControllerService, agents: list[AgentProcess]
) -> None:
    _unit(controller, tmp_path, agents, "unit-risk").stop()
    lessons = Lessons(controller, "unit-risk")
    lessons.set_periods({"Period 7": (40, 50)})
    lessons.plan(["Period 7"])
    start, _ = lessons.window("Period 7")

    def at_risk() -> bool:
        page = controller.services.alerts.list(
            open_only=True, device_id="unit-risk", kind="capture_at_risk", page=1, per_page=5
        )
        return bool(page.items)

    assert wait_for(at_risk, 20)
    assert utcnow() < start
