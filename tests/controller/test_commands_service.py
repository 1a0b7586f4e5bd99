"""The command service: queued → sent → accepted → done/failed/rejected or expired, with
idempotent results and no stale command ever offered for sending."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from controller.alerts import AlertEngine
from controller.commands import CommandService
from controller.db import Database
from controller.registry import Registry, UnknownDevice
from shared.messages import (
    CommandAction,
    CommandResult,
    CommandStatus,
    DesiredState,
)
from tests.controller.conftest import FakeClock


@pytest.fixture
def commands(db: Database, clock: FakeClock) -> CommandService:
    registry = Registry(db, AlertEngine(db, clock=clock), clock=clock)
    for device_id in ("room-204", "room-205"):
        registry.add_device(device_id, "North High", device_id[-3:])
    return CommandService(db, clock=clock)


def result(command_id: str, status: CommandStatus, **kw: str) -> CommandResult:
    return CommandResult(command_id=command_id, status=status, **kw)  # type: ignore[arg-type]


def start(commands: CommandService, device_id: str = "room-204", expires_in_s: int = 60) -> str:
    (view,) = commands.create(
        [device_id], CommandAction.START_RECORDING, created_by="it", expires_in_s=expires_in_s
    )
    return view.id


def test_create_queues_one_command_per_unit(commands: CommandService, clock: FakeClock) -> None:
    views = commands.create(
        ["room-204", "room-205", "room-204"],
        CommandAction.BOOKMARK,
        created_by="alice",
        expires_in_s=30,
        note="group work",
    )
    assert [v.device_id for v in views] == ["room-204", "room-205"]
    assert len({v.id for v in views}) == 2
    for view in views:
        assert (view.action, view.status, view.created_by, view.note) == (
            "bookmark",
            "queued",
            "alice",
            "group work",
        )
        assert view.created_at == clock() and view.expires_at == clock() + timedelta(seconds=30)
        assert commands.get(view.id) == view


def test_unknown_units_are_named_and_nothing_is_queued(commands: CommandService) -> None:
    with pytest.raises(UnknownDevice, match="room-999"):
        commands.create(["room-204", "room-999"], CommandAction.SNAPSHOT, created_by="it")
    assert commands.list().total == 0


@pytest.mark.parametrize(
    ("action", "kwargs"),
    [
        (CommandAction.APPLY, {}),
        (CommandAction.START_RECORDING, {"desired": DesiredState(version=1)}),
        (CommandAction.BOOKMARK, {"note": "x" * 501}),
        (CommandAction.REBOOT, {"expires_in_s": 0}),
    ],
    ids=["apply-without-desired", "desired-without-apply", "long-note", "no-lifetime"],
)
def test_invalid_commands_are_refused(
    commands: CommandService, action: CommandAction, kwargs: dict[str, object]
) -> None:
    with pytest.raises((ValueError, ValidationError)):
        commands.create(["room-204"], action, created_by="it", **kwargs)  # type: ignore[arg-type]
    assert commands.list().total == 0


def test_the_wire_command_carries_id_action_and_expiry(
    commands: CommandService, clock: FakeClock
) -> None:
    desired = DesiredState(version=4, issued_at=clock())
    (view,) = commands.create(["room-204"], CommandAction.APPLY, created_by="it", desired=desired)
    message = commands.to_message(view.id)
    assert message is not None
    assert (message.id, message.action, message.desired) == (view.id, CommandAction.APPLY, desired)
    assert message.issued_at == clock() and message.expires_at == view.expires_at


def test_lifecycle_sent_accepted_done(commands: CommandService, clock: FakeClock) -> None:
    command_id = start(commands)
    clock.advance(1)
    commands.mark_sent(command_id)
    assert commands.to_message(command_id) is not None  # may be sent again
    clock.advance(1)
    commands.on_result("room-204", result(command_id, CommandStatus.ACCEPTED))
    assert commands.to_message(command_id) is None
    clock.advance(1)
    commands.on_result("room-204", result(command_id, CommandStatus.DONE, recording_id="rec-1"))
    view = commands.get(command_id)
    assert view is not None
    assert (view.status, view.recording_id, view.reason) == ("done", "rec-1", None)
    start_time = view.created_at
    assert view.sent_at == start_time + timedelta(seconds=1)
    assert view.accepted_at == start_time + timedelta(seconds=2)
    assert view.finished_at == start_time + timedelta(seconds=3)
    assert commands.latency_seconds() == [3.0]


def test_results_are_idempotent_and_never_regress(
    commands: CommandService, clock: FakeClock
) -> None:
    command_id = start(commands)
    commands.on_result("room-204", result(command_id, CommandStatus.DONE))
    finished = commands.get(command_id)
    clock.advance(5)
    commands.on_result("room-204", result(command_id, CommandStatus.DONE))
    commands.on_result("room-204", result(command_id, CommandStatus.ACCEPTED))
    commands.on_result("room-204", result(command_id, CommandStatus.FAILED, reason="late"))
    assert commands.get(command_id) == finished


@pytest.mark.parametrize("status", [CommandStatus.FAILED, CommandStatus.REJECTED])
def test_a_refusal_keeps_its_reason(commands: CommandService, status: CommandStatus) -> None:
    command_id = start(commands)
    commands.on_result("room-204", result(command_id, status, reason="camera missing"))
    view = commands.get(command_id)
    assert view is not None and (view.status, view.reason) == (status.value, "camera missing")


def test_a_result_from_another_unit_is_ignored(commands: CommandService) -> None:
    command_id = start(commands, "room-204")
    commands.on_result("room-205", result(command_id, CommandStatus.DONE))
    commands.on_result("room-205", result("cmd-unknown", CommandStatus.DONE))
    assert commands.get(command_id).status == "queued"  # type: ignore[union-attr]


def test_open_commands_expire_and_are_never_offered_again(
    commands: CommandService, clock: FakeClock
) -> None:
    queued = start(commands, expires_in_s=30)
    sent = start(commands, expires_in_s=30)
    commands.mark_sent(sent)
    accepted = start(commands, expires_in_s=30)
    commands.on_result("room-204", result(accepted, CommandStatus.ACCEPTED))
    done = start(commands, expires_in_s=30)
    commands.on_result("room-204", result(done, CommandStatus.DONE))
    later = start(commands, expires_in_s=120)
    clock.advance(29)
    assert commands.expire_due() == 0
    clock.advance(1)
    assert commands.to_message(queued) is None
    assert [c.id for c in commands.due_for("room-204")] == [later]
    assert commands.expire_due() == 3
    assert commands.expire_due() == 0
    statuses = {cid: commands.get(cid).status for cid in (queued, sent, accepted, done, later)}  # type: ignore[union-attr]
    assert statuses == {
        queued: "expired",
        sent: "expired",
        accepted: "expired",
        done: "done",
        later: "queued",
    }
    assert commands.get(queued).finished_at == clock()  # type: ignore[union-attr]


def test_an_answer_after_expiry_is_still_recorded(
    commands: CommandService, clock: FakeClock
) -> None:
    command_id = start(commands, expires_in_s=10)
    commands.mark_sent(command_id)
    clock.advance(10)
    commands.expire_due()
    commands.on_result("room-204", result(command_id, CommandStatus.DONE))
    assert commands.get(command_id).status == "done"  # type: ignore[union-attr]
    commands.mark_sent(command_id)
    assert commands.get(command_id).status == "done"  # type: ignore[union-attr]


def test_due_for_lists_queued_commands_oldest_first(
    commands: CommandService, clock: FakeClock
) -> None:
    first = start(commands)
    clock.advance(1)
    second = start(commands)
    clock.advance(1)
    sent = start(commands)
    commands.mark_sent(sent)
    start(commands, "room-205")
    assert [c.id for c in commands.due_for("room-204")] == [first, second]
    assert all(c.action is CommandAction.START_RECORDING for c in commands.due_for("room-204"))


def test_list_pages_newest_first(commands: CommandService, clock: FakeClock) -> None:
    ids = []
    for _ in range(5):
        ids.append(start(commands))
        clock.advance(1)
    start(commands, "room-205")
    page = commands.list(device_id="room-204", page=1, per_page=2)
    assert page.total == 5 and [v.id for v in page.items] == [ids[4], ids[3]]
    assert [v.id for v in commands.list(device_id="room-204", page=3, per_page=2).items] == [ids[0]]
    assert commands.list().total == 6
