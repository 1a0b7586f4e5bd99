"""Commands end to end: controller -> Mosquitto -> Link -> CommandProcessor -> journal -> result."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from device.commands import INTERRUPTED_REASON, QUEUE_LIMIT, CommandProcessor, Outcome
from device.config import BrokerConfig
from device.journal import Journal
from device.link import Link
from shared.clock import utcnow
from shared.codec import decode
from shared.messages import (
    Command,
    CommandAction,
    CommandResult,
    CommandStatus,
    Message,
)
from shared.topics import Channel, topic
from tests.support.broker import MosquittoBroker, MqttTestClient
from tests.support.processes import wait_for

UNIT = "room-201"
COMMAND_TOPIC = topic(UNIT, Channel.COMMAND)
RESULT_TOPIC = topic(UNIT, Channel.COMMAND_RESULT)
_ids = itertools.count(1)


def make_command(
    action: CommandAction = CommandAction.BOOKMARK,
    *,
    expires_in: timedelta = timedelta(minutes=5),
    now: datetime | None = None,
) -> Command:
    now = now or utcnow()
    expires_at = now + expires_in
    return Command(
        id=f"cmd-{next(_ids)}",
        action=action,
        issued_at=min(now, expires_at - timedelta(seconds=1)),
        expires_at=expires_at,
    )


class Handlers:
    """The unit's side of each action; SNAPSHOT stands for a handler with a bug."""

    def __init__(self) -> None:
        self.calls: list[Command] = []
        self.release = threading.Event()
        self.release.set()
        self.running = threading.Event()

    def table(self) -> dict[CommandAction, Callable[[Command], Outcome]]:
        return {
            CommandAction.BOOKMARK: self.bookmark,
            CommandAction.START_RECORDING: self.start_recording,
            CommandAction.SNAPSHOT: self.snapshot,
        }

    def bookmark(self, command: Command) -> Outcome:
        self.calls.append(command)
        self.running.set()
        self.release.wait(30)
        return Outcome(CommandStatus.DONE)

    def start_recording(self, command: Command) -> Outcome:
        self.calls.append(command)
        return Outcome(CommandStatus.DONE, recording_id="rec-20260101T080000Z-0001")

    def snapshot(self, command: Command) -> Outcome:
        self.calls.append(command)
        raise RuntimeError("camera gone")


class Unit:
    """Link + CommandProcessor + real journal, wired the way the agent wires them."""

    def __init__(self, broker: MosquittoBroker, journal: Journal, handlers: Handlers) -> None:
        self.handlers = handlers
        self.processor = CommandProcessor(
            handlers.table(),
            reply=self._reply,
            remember_command=journal.remember_command,
            store_result=journal.store_command_result,
            last_result=journal.last_command_result,
        )
        self.link = Link(
            UNIT,
            BrokerConfig(url=broker.url, keepalive_s=5, reconnect_min_s=0.1, reconnect_max_s=0.5),
            next_epoch=journal.next_epoch,
            agent_version="1.0",
            capabilities=[],
            on_message=self._on_message,
            on_connection_change=lambda _connected: None,
            on_rejected=self._on_rejected,
        )

    def _reply(self, result: CommandResult) -> None:
        self.link.publish(Channel.COMMAND_RESULT, result)

    def _on_message(self, _channel: Channel, message: Message) -> None:
        if isinstance(message, Command):
            self.processor.submit(message)

    def _on_rejected(self, channel: Channel, reason: str, payload: bytes) -> None:
        if channel is Channel.COMMAND:
            self.processor.reject_undecodable(payload, reason)

    def start(self) -> None:
        self.processor.start()
        self.link.start()
        assert wait_for(lambda: self.link.connected, timeout=10), "unit did not connect"

    def stop(self) -> None:
        self.processor.stop()
        self.link.stop()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    journal = Journal(tmp_path / "journal.sqlite3", UNIT)
    yield journal
    journal.close()


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
def make_unit(
    broker: MosquittoBroker, journal: Journal, handlers: Handlers
) -> Iterator[Callable[[], Unit]]:
    units: list[Unit] = []

    def make() -> Unit:
        unit = Unit(broker, journal, handlers)
        units.append(unit)
        unit.start()
        return unit

    yield make
    for unit in units:
        unit.stop()


@pytest.fixture
def controller(
    broker: MosquittoBroker, mqtt_client: Callable[..., MqttTestClient]
) -> MqttTestClient:
    return mqtt_client(broker, RESULT_TOPIC)


def results(controller: MqttTestClient, count: int, command_id: str) -> list[CommandResult]:
    received = controller.wait_for(
        lambda m: (
            m.topic == RESULT_TOPIC and decode(CommandResult, m.payload).command_id == command_id
        ),
        count=count,
    )
    return [decode(CommandResult, m.payload) for m in received]


def all_results(controller: MqttTestClient) -> list[CommandResult]:
    return [decode(CommandResult, m.payload) for m in controller.messages(RESULT_TOPIC)]


def send(controller: MqttTestClient, command: Command | bytes, expiry_s: int | None = 300) -> None:
    payload = command if isinstance(command, bytes) else command.to_json()
    controller.publish(COMMAND_TOPIC, payload, expiry_s=expiry_s)


# --- through the broker -----------------------------------------------------------------


def test_command_is_accepted_then_done_with_its_recording_id(
    make_unit: Callable[[], Unit], controller: MqttTestClient, handlers: Handlers
) -> None:
    unit = make_unit()
    command = make_command(CommandAction.START_RECORDING)
    send(controller, command)

    accepted, done = results(controller, 2, command.id)
    assert accepted.status is CommandStatus.ACCEPTED
    assert done.status is CommandStatus.DONE
    assert done.recording_id == "rec-20260101T080000Z-0001"
    assert [c.id for c in handlers.calls] == [command.id]
    assert unit.processor.counts["accepted"] == 1 and unit.processor.counts["done"] == 1


def test_expired_start_recording_is_rejected_and_never_runs(
    make_unit: Callable[[], Unit], controller: MqttTestClient, handlers: Handlers
) -> None:
    unit = make_unit()
    stale = make_command(
        CommandAction.START_RECORDING,
        now=utcnow() - timedelta(minutes=10),
        expires_in=timedelta(minutes=5),
    )
    send(controller, stale, expiry_s=None)

    [rejected] = results(controller, 1, stale.id)
    assert rejected.status is CommandStatus.REJECTED
    assert rejected.reason == f"expired at {stale.expires_at.isoformat()}"
    fresh = make_command()
    send(controller, fresh)
    results(controller, 2, fresh.id)
    assert [c.id for c in handlers.calls] == [fresh.id]
    assert unit.processor.counts["rejected_expired"] == 1


def test_replayed_command_runs_once_and_its_result_is_published_again(
    make_unit: Callable[[], Unit], controller: MqttTestClient, handlers: Handlers
) -> None:
    unit = make_unit()
    command = make_command()
    send(controller, command)
    accepted, done = results(controller, 2, command.id)

    send(controller, command)

    *_, again = results(controller, 3, command.id)
    assert again == done
    assert [c.id for c in handlers.calls] == [command.id]
    assert unit.processor.counts["duplicates"] == 1
    assert accepted.status is CommandStatus.ACCEPTED


def test_invalid_command_with_an_id_is_rejected_with_that_id_and_one_without_is_dropped(
    make_unit: Callable[[], Unit], controller: MqttTestClient, handlers: Handlers
) -> None:
    unit = make_unit()
    body = json.loads(make_command().to_json())
    unknown_action = json.dumps({**body, "action": "self_destruct"}).encode()
    no_id = json.dumps({k: v for k, v in body.items() if k != "id"}).encode()
    bad_id = json.dumps({**body, "id": "has spaces", "action": "nope"}).encode()
    send(controller, no_id)
    send(controller, bad_id)
    send(controller, unknown_action)
    follow_up = make_command()
    send(controller, follow_up)

    [rejected] = results(controller, 1, body["id"])
    assert rejected.status is CommandStatus.REJECTED
    assert rejected.reason is not None and "action" in rejected.reason
    results(controller, 2, follow_up.id)
    # Commands are answered in order, so nothing else can still be on its way.
    assert {r.command_id for r in all_results(controller)} == {body["id"], follow_up.id}
    assert unit.processor.counts["rejected_invalid"] == 3
    assert [c.id for c in handlers.calls] == [follow_up.id]


def test_raising_handler_fails_the_command_and_the_worker_keeps_going(
    make_unit: Callable[[], Unit], controller: MqttTestClient, handlers: Handlers
) -> None:
    unit = make_unit()
    broken = make_command(CommandAction.SNAPSHOT)
    after = make_command()
    send(controller, broken)
    send(controller, after)

    accepted, failed = results(controller, 2, broken.id)
    assert accepted.status is CommandStatus.ACCEPTED
    assert failed.status is CommandStatus.FAILED
    assert failed.reason == "RuntimeError: camera gone"
    assert [r.status for r in results(controller, 2, after.id)] == [
        CommandStatus.ACCEPTED,
        CommandStatus.DONE,
    ]
    assert unit.processor.counts["failed"] == 1


def test_action_without_a_handler_is_rejected_as_unsupported(
    make_unit: Callable[[], Unit], controller: MqttTestClient
) -> None:
    make_unit()
    reboot = make_command(CommandAction.REBOOT)
    send(controller, reboot)

    [rejected] = results(controller, 1, reboot.id)
    assert rejected.status is CommandStatus.REJECTED
    assert rejected.reason == "unsupported action reboot"


def test_commands_sent_while_the_unit_is_away_wait_at_the_broker_until_their_expiry(
    make_unit: Callable[[], Unit], controller: MqttTestClient, handlers: Handlers
) -> None:
    first = make_unit()
    first.stop()  # a clean stop keeps the session: the broker queues for the unit

    lapsed = make_command(CommandAction.START_RECORDING)
    send(controller, lapsed, expiry_s=1)
    time.sleep(2.5)  # Mosquitto counts expiry in whole seconds: 1 s can last up to 2 s
    waiting = make_command()
    send(controller, waiting, expiry_s=300)

    make_unit()

    assert [r.status for r in results(controller, 2, waiting.id)] == [
        CommandStatus.ACCEPTED,
        CommandStatus.DONE,
    ]
    # Queued messages arrive in order, so the lapsed one was dropped by the broker.
    assert [c.id for c in handlers.calls] == [waiting.id]
    assert {r.command_id for r in all_results(controller)} == {waiting.id}


# --- the processor on its own (real journal, no broker) ---------------------------------


@pytest.fixture
def replies() -> list[CommandResult]:
    return []


@pytest.fixture
def processor(
    journal: Journal, handlers: Handlers, replies: list[CommandResult]
) -> Iterator[CommandProcessor]:
    processor = CommandProcessor(
        handlers.table(),
        reply=replies.append,
        remember_command=journal.remember_command,
        store_result=journal.store_command_result,
        last_result=journal.last_command_result,
    )
    processor.start()
    yield processor
    handlers.release.set()
    processor.stop()


def test_expiry_is_checked_against_the_processors_clock(journal: Journal) -> None:
    replies: list[CommandResult] = []
    command = make_command()
    ran: list[Command] = []

    def bookmark(c: Command) -> Outcome:
        ran.append(c)
        return Outcome(CommandStatus.DONE)

    processor = CommandProcessor(
        {CommandAction.BOOKMARK: bookmark},
        reply=replies.append,
        remember_command=journal.remember_command,
        store_result=journal.store_command_result,
        last_result=journal.last_command_result,
        clock=lambda: command.expires_at,
    )
    processor.start()
    try:
        processor.submit(command)
        assert wait_for(lambda: len(replies) == 1, timeout=10)
    finally:
        processor.stop()
    assert replies[0].status is CommandStatus.REJECTED and ran == []
    assert journal.last_command_result(command.id) == replies[0]


def test_repeat_of_a_command_interrupted_by_a_restart_reports_an_unknown_outcome(
    journal: Journal, processor: CommandProcessor, replies: list[CommandResult], handlers: Handlers
) -> None:
    command = make_command()
    # What an earlier process left behind when it stopped inside the handler.
    assert journal.remember_command(command.id, command.expires_at)
    journal.store_command_result(
        CommandResult(command_id=command.id, status=CommandStatus.ACCEPTED)
    )

    processor.submit(command)

    assert wait_for(lambda: len(replies) == 1, timeout=10)
    assert replies[0].status is CommandStatus.FAILED
    assert replies[0].reason == INTERRUPTED_REASON
    assert handlers.calls == []
    assert journal.last_command_result(command.id) == replies[0]


def test_a_full_queue_refuses_at_once_and_stop_drops_what_waits(
    processor: CommandProcessor,
    replies: list[CommandResult],
    handlers: Handlers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handlers.release.clear()
    processor.submit(make_command())
    assert handlers.running.wait(10)
    for _ in range(QUEUE_LIMIT):
        processor.submit(make_command())
    overflow = make_command()

    processor.submit(overflow)

    busy = [r for r in replies if r.command_id == overflow.id]
    assert [r.status for r in busy] == [CommandStatus.REJECTED]
    assert processor.counts["rejected_busy"] == 1
    handlers.release.set()
    processor.stop()
    assert "commands dropped at stop count=" in caplog.text
    assert len(handlers.calls) < QUEUE_LIMIT


def test_outcome_cannot_claim_accepted() -> None:
    with pytest.raises(ValueError, match="not accepted"):
        Outcome(CommandStatus.ACCEPTED)


def test_journal_and_reply_failures_are_logged_and_the_worker_survives(
    journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="device.commands")
    replies: list[CommandResult] = []
    failing_reply = threading.Event()

    def reply(result: CommandResult) -> None:
        if failing_reply.is_set():
            raise ConnectionError("link gone")
        replies.append(result)

    processor = CommandProcessor(
        {CommandAction.BOOKMARK: lambda _c: Outcome(CommandStatus.DONE)},
        reply=reply,
        remember_command=journal.remember_command,
        store_result=journal.store_command_result,
        last_result=journal.last_command_result,
    )
    processor.start()
    try:
        failing_reply.set()
        lost = make_command()
        processor.submit(lost)
        assert wait_for(lambda: stored_status(journal, lost.id) is CommandStatus.DONE, timeout=10)
        failing_reply.clear()
        # The controller retries; the stored result answers it.
        processor.submit(lost)
        assert wait_for(lambda: len(replies) == 1, timeout=10)
    finally:
        processor.stop()
    assert replies[0].status is CommandStatus.DONE and replies[0].command_id == lost.id
    assert "command reply failed" in caplog.text


def stored_status(journal: Journal, command_id: str) -> CommandStatus | None:
    result = journal.last_command_result(command_id)
    return None if result is None else result.status
