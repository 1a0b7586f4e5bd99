"""The unit's MQTT link against a real Mosquitto: presence epochs, wills, reconnects, bad input."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.config import BrokerConfig
from device.link import Link
from shared.clock import utcnow
from shared.codec import decode
from shared.messages import (
    Command,
    CommandAction,
    CommandResult,
    CommandStatus,
    DesiredState,
    Message,
    Status,
)
from shared.topics import Channel, topic
from tests.support.broker import MosquittoBroker, MqttTestClient, Received, make_tls_files
from tests.support.processes import stop_process, wait_for

REPO = Path(__file__).resolve().parents[1]
UNIT = "room-101"
WILL_DELAY_S = 1


def broker_config(broker: MosquittoBroker, **overrides: object) -> BrokerConfig:
    options: dict[str, object] = {
        "url": broker.url,
        "keepalive_s": 5,
        "will_delay_s": WILL_DELAY_S,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
    }
    options.update(overrides)
    return BrokerConfig.model_validate(options)


class Inbox:
    """What the link handed to the agent: messages, rejections, connection changes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.messages: list[tuple[Channel, Message]] = []
        self.rejected: list[tuple[Channel, str, bytes]] = []
        self.connection: list[bool] = []

    def on_message(self, channel: Channel, message: Message) -> None:
        with self._cond:
            self.messages.append((channel, message))
            self._cond.notify_all()

    def on_rejected(self, channel: Channel, reason: str, payload: bytes) -> None:
        with self._cond:
            self.rejected.append((channel, reason, payload))
            self._cond.notify_all()

    def on_connection_change(self, connected: bool) -> None:
        with self._cond:
            self.connection.append(connected)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[Inbox], bool], timeout: float = 30.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self), timeout), "condition not reached"


MakeLink = Callable[..., tuple[Link, Inbox]]


@pytest.fixture
def make_link() -> Iterator[MakeLink]:
    links: list[Link] = []

    def make(
        broker_cfg: BrokerConfig,
        device_id: str = UNIT,
        next_epoch: Callable[[], int] | None = None,
    ) -> tuple[Link, Inbox]:
        inbox = Inbox()
        link = Link(
            device_id,
            broker_cfg,
            next_epoch=next_epoch or itertools.count(1).__next__,
            agent_version="9.9.9",
            capabilities=["synthetic", "snapshot"],
            on_message=inbox.on_message,
            on_connection_change=inbox.on_connection_change,
            on_rejected=inbox.on_rejected,
        )
        links.append(link)
        link.start()
        return link, inbox

    yield make
    for link in links:
        link.stop()


def is_status(online: bool, epoch: int, device_id: str = UNIT) -> Callable[[Received], bool]:
    def match(m: Received) -> bool:
        if m.topic != topic(device_id, Channel.STATUS):
            return False
        status = decode(Status, m.payload)
        return status.online is online and status.epoch == epoch

    return match


def retained_status(mqtt_client: Callable[..., MqttTestClient], broker: MosquittoBroker) -> Status:
    """The status a newcomer (the dashboard after a restart) sees first."""
    observer = mqtt_client(broker, topic(UNIT, Channel.STATUS))
    [first] = observer.wait_for(lambda m: True)
    assert first.retain
    return decode(Status, first.payload)


_ids = itertools.count(1)


def command(action: CommandAction = CommandAction.BOOKMARK) -> Command:
    now = utcnow()
    return Command(
        id=f"cmd-{next(_ids)}", action=action, issued_at=now, expires_at=now + timedelta(minutes=5)
    )


# --- presence -------------------------------------------------------------------------


def test_connect_publishes_retained_online_status_and_stop_the_offline_one(
    broker: MosquittoBroker, mqtt_client: Callable[..., MqttTestClient], make_link: MakeLink
) -> None:
    watcher = mqtt_client(broker, topic(UNIT, Channel.STATUS))
    link, inbox = make_link(broker_config(broker), next_epoch=iter([7, 8, 9]).__next__)

    watcher.wait_for(is_status(True, 7))
    assert link.connected and link.epoch == 7
    inbox.wait(lambda i: i.connection == [True])
    online = retained_status(mqtt_client, broker)
    assert online.online and online.epoch == 7
    assert online.agent_version == "9.9.9"
    assert online.capabilities == ["synthetic", "snapshot"]

    link.stop()
    watcher.wait_for(is_status(False, 7))
    assert not link.connected
    assert inbox.connection == [True, False]
    offline = retained_status(mqtt_client, broker)
    assert not offline.online and offline.epoch == 7


def run_unit_child() -> None:
    """Entry point of the unit process that test_killed_unit... kills with SIGKILL."""
    url, device_id, epoch_file = sys.argv[1:4]
    path = Path(epoch_file)

    def next_epoch() -> int:
        value = int(path.read_text() or "0") + 1 if path.exists() else 1
        path.write_text(str(value))
        return value

    link = Link(
        device_id,
        BrokerConfig(url=url, keepalive_s=5, will_delay_s=WILL_DELAY_S, reconnect_min_s=0.1),
        next_epoch=next_epoch,
        agent_version="child",
        capabilities=[],
        on_message=lambda _channel, _message: None,
        on_connection_change=lambda _connected: None,
    )
    link.start()
    sys.stdin.read()  # until the test closes stdin (or kills this process)
    link.stop()


def start_unit_process(broker: MosquittoBroker, epoch_file: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from tests.test_link import run_unit_child; run_unit_child()",
            broker.url,
            UNIT,
            str(epoch_file),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
    )


def test_killed_unit_gets_its_will_with_the_same_epoch_and_next_connect_takes_a_new_one(
    broker: MosquittoBroker, mqtt_client: Callable[..., MqttTestClient], tmp_path: Path
) -> None:
    watcher = mqtt_client(broker, topic(UNIT, Channel.STATUS))
    epoch_file = tmp_path / "epoch"
    unit = start_unit_process(broker, epoch_file)
    try:
        watcher.wait_for(is_status(True, 1))
        unit.kill()
        unit.wait(timeout=10)
        # The broker publishes the will once the will delay has passed.
        watcher.wait_for(is_status(False, 1))
        gone = retained_status(mqtt_client, broker)
        assert not gone.online and gone.epoch == 1

        unit = start_unit_process(broker, epoch_file)
        watcher.wait_for(is_status(True, 2))
        current = retained_status(mqtt_client, broker)
        assert current.online and current.epoch == 2
    finally:
        stop_process(unit)


def test_reconnects_by_itself_after_a_broker_restart_with_a_new_epoch(
    broker: MosquittoBroker, mqtt_client: Callable[..., MqttTestClient], make_link: MakeLink
) -> None:
    link, inbox = make_link(broker_config(broker))
    inbox.wait(lambda i: i.connection == [True])
    first = link.epoch
    assert first is not None

    broker.restart()

    inbox.wait(lambda i: i.connection == [True, False, True], timeout=20)
    assert link.connected
    epoch = link.epoch
    assert epoch is not None and epoch > first
    current = retained_status(mqtt_client, broker)
    assert current.online and current.epoch == epoch


def test_keeps_retrying_while_the_broker_is_down_and_connects_when_it_comes(
    broker: MosquittoBroker, make_link: MakeLink
) -> None:
    broker.stop()
    link, inbox = make_link(broker_config(broker))
    assert wait_for(lambda: (link.epoch or 0) >= 3, timeout=20), "no repeated attempts"
    assert not link.connected and inbox.connection == []

    broker.start()

    inbox.wait(lambda i: i.connection == [True], timeout=20)
    assert link.connected


# --- incoming messages ----------------------------------------------------------------


def test_valid_messages_on_the_units_channels_reach_the_handler(
    broker: MosquittoBroker, mqtt_client: Callable[..., MqttTestClient], make_link: MakeLink
) -> None:
    link, inbox = make_link(broker_config(broker))
    inbox.wait(lambda i: i.connection == [True])
    assert wait_for(lambda: link.subscribed, 30)
    controller = mqtt_client(broker)
    desired = DesiredState(version=3)
    controller.publish(topic(UNIT, Channel.DESIRED), desired.to_json(), retain=True)
    cmd = command()
    controller.publish(topic(UNIT, Channel.COMMAND), cmd.to_json())

    inbox.wait(lambda i: len(i.messages) == 2)
    assert inbox.messages == [(Channel.DESIRED, desired), (Channel.COMMAND, cmd)]
    assert link.rejected_count == 0


BAD_COMMANDS = {
    "malformed JSON": b'{"schema": 1, "id": ',
    "not an object": b"[1, 2, 3]",
    "wrong schema version": json.dumps({**json.loads(command().to_json()), "schema": 2}).encode(),
    "unknown field": json.dumps({**json.loads(command().to_json()), "extra": 1}).encode(),
    "unknown action": json.dumps(
        {**json.loads(command().to_json()), "action": "self_destruct"}
    ).encode(),
    "oversized": json.dumps({**json.loads(command().to_json()), "note": "x" * 300_000}).encode(),
}
REASONS = {
    "malformed JSON": "not JSON",
    "not an object": "not a JSON object",
    "wrong schema version": "unsupported schema version 2",
    "unknown field": "extra",
    "unknown action": "action",
    "oversized": "exceeds",
}


def test_bad_payloads_are_counted_logged_and_handed_on_without_breaking_the_link(
    broker: MosquittoBroker,
    mqtt_client: Callable[..., MqttTestClient],
    make_link: MakeLink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="device.link")
    link, inbox = make_link(broker_config(broker))
    inbox.wait(lambda i: i.connection == [True])
    # A message the broker routes before it has the unit's subscription is not for the unit.
    assert wait_for(lambda: link.subscribed, 30)
    controller = mqtt_client(broker)

    for payload in BAD_COMMANDS.values():
        controller.publish(topic(UNIT, Channel.COMMAND), payload)
    inbox.wait(lambda i: len(i.rejected) == len(BAD_COMMANDS))

    assert link.rejected_count == len(BAD_COMMANDS)
    for (channel, reason, payload), (name, sent) in zip(
        inbox.rejected, BAD_COMMANDS.items(), strict=True
    ):
        assert channel is Channel.COMMAND
        assert REASONS[name] in reason, (name, reason)
        assert payload == sent
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    rejected = [w for w in warnings if w.startswith("rejected message topic=")]
    assert len(rejected) == len(BAD_COMMANDS)
    assert all(f"topic={topic(UNIT, Channel.COMMAND)} reason=" in w for w in rejected)

    good = command()
    controller.publish(topic(UNIT, Channel.COMMAND), good.to_json())
    inbox.wait(lambda i: (Channel.COMMAND, good) in i.messages)
    assert link.connected and inbox.connection == [True]


def test_messages_outside_the_units_channels_are_rejected_without_a_handler_call(
    broker: MosquittoBroker,
    mqtt_client: Callable[..., MqttTestClient],
    make_link: MakeLink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A session left by an older agent may still hold wider subscriptions."""
    caplog.set_level(logging.INFO, logger="device.link")
    stale = ["classcap/v1/room-102/command", f"classcap/v1/{UNIT}/bogus", "elsewhere/x"]
    old_agent = MqttTestClient(broker, client_id=UNIT)
    old_agent.client.connect(
        broker.host, broker.port, clean_start=False, properties=_session_expiry(3600)
    )
    old_agent.client.loop_start()
    old_agent.subscribe(*stale)
    old_agent.stop()

    link, inbox = make_link(broker_config(broker))
    inbox.wait(lambda i: i.connection == [True])
    assert wait_for(lambda: link.subscribed, 30)
    controller = mqtt_client(broker)
    for name in stale:
        controller.publish(name, command().to_json())
    assert wait_for(lambda: link.rejected_count == len(stale), timeout=10)

    assert inbox.rejected == [] and inbox.messages == []
    text = caplog.text
    assert "topic=classcap/v1/room-102/command reason=addressed to unit room-102" in text
    assert f"topic=classcap/v1/{UNIT}/bogus reason=topic" in text
    assert "topic=elsewhere/x reason=topic 'elsewhere/x' is not under classcap/v1/" in text


def test_a_raising_message_handler_is_logged_and_the_link_keeps_delivering(
    broker: MosquittoBroker,
    mqtt_client: Callable[..., MqttTestClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    delivered: list[Message] = []

    def handler(_channel: Channel, message: Message) -> None:
        delivered.append(message)
        if len(delivered) == 1:
            raise RuntimeError("handler bug")

    link = Link(
        UNIT,
        broker_config(broker),
        next_epoch=itertools.count(1).__next__,
        agent_version="1",
        capabilities=[],
        on_message=handler,
        on_connection_change=lambda _up: None,
    )
    link.start()
    try:
        assert wait_for(lambda: link.connected, timeout=10)
        controller = mqtt_client(broker)
        for _ in range(2):
            controller.publish(topic(UNIT, Channel.COMMAND), command().to_json())
        assert wait_for(lambda: len(delivered) == 2, timeout=10)
        assert link.connected
        assert "message handler failed topic=" in caplog.text
        assert "RuntimeError: handler bug" in caplog.text
    finally:
        link.stop()


# --- outgoing messages ----------------------------------------------------------------


def test_publish_sends_on_the_units_topic_and_refuses_when_offline(
    broker: MosquittoBroker, mqtt_client: Callable[..., MqttTestClient], make_link: MakeLink
) -> None:
    result = CommandResult(command_id="cmd-1", status=CommandStatus.DONE)
    broker.stop()
    link, inbox = make_link(broker_config(broker))
    assert not link.publish(Channel.COMMAND_RESULT, result)

    broker.start()
    inbox.wait(lambda i: i.connection == [True], timeout=20)
    watcher = mqtt_client(broker, topic(UNIT, Channel.COMMAND_RESULT))
    assert link.publish(Channel.COMMAND_RESULT, result, expiry_s=60)

    [received] = watcher.wait_for(lambda m: True)
    assert decode(CommandResult, received.payload) == result
    assert received.qos == 1 and received.expiry_s is not None and received.expiry_s <= 60

    with pytest.raises(ValueError, match="does not publish"):
        link.publish(Channel.COMMAND, command())
    with pytest.raises(ValueError, match="does not publish"):
        link.publish(Channel.STATUS, Status(online=True, epoch=1))
    with pytest.raises(TypeError, match="carries CommandResult"):
        link.publish(Channel.COMMAND_RESULT, command())


# --- authentication and ACLs ----------------------------------------------------------


def test_password_file_and_acl_confine_the_unit_to_its_own_subtree(
    broker_factory: Callable[..., MosquittoBroker],
    mqtt_client: Callable[..., MqttTestClient],
    make_link: MakeLink,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="device.link")
    secured = broker_factory(
        users={UNIT: "unit-secret", "room-102": "other-secret", "controller": "ctl-secret"},
        acl=[
            "user controller",
            "topic readwrite classcap/v1/#",
            "pattern readwrite classcap/v1/%u/#",
        ],
    )
    password_file = tmp_path / "broker-password"
    password_file.write_text("unit-secret\n")
    controller = mqtt_client(secured, "classcap/v1/#", username="controller", password="ctl-secret")

    _link, inbox = make_link(broker_config(secured, username=UNIT, password_file=password_file))
    inbox.wait(lambda i: i.connection == [True])
    controller.wait_for(is_status(True, 1))
    assert "subscription refused" not in caplog.text

    # Another unit's identity cannot reach this unit's command topic.
    intruder = mqtt_client(secured, username="room-102", password="other-secret")
    intruder.publish(topic(UNIT, Channel.COMMAND), command().to_json())
    good = command()
    controller.publish(topic(UNIT, Channel.COMMAND), good.to_json())
    inbox.wait(lambda i: len(i.messages) >= 1)
    assert inbox.messages == [(Channel.COMMAND, good)]

    _unused, refused = make_link(
        broker_config(secured, username="room-103", password="wrong"), device_id="room-103"
    )
    # It keeps trying (each attempt with a new epoch) and never counts as connected.
    assert wait_for(lambda: len(_refusals(caplog, "room-103")) >= 2, timeout=10)
    assert refused.connection == []


def _session_expiry(seconds: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = seconds
    return props


def _refusals(caplog: pytest.LogCaptureFixture, device_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("broker refused connection") and device_id in r.getMessage()
    ]


def test_tls_verifies_the_broker_against_the_configured_ca(
    broker_factory: Callable[..., MosquittoBroker],
    make_link: MakeLink,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="device.link")
    tls = make_tls_files(tmp_path / "tls")
    secured = broker_factory(tls=tls)
    assert secured.url.startswith("mqtts://")

    link, inbox = make_link(broker_config(secured, ca_file=tls.ca_file))
    inbox.wait(lambda i: i.connection == [True])
    assert link.connected

    stranger = make_tls_files(tmp_path / "other", name="other")
    untrusting, refused = make_link(
        broker_config(secured, ca_file=stranger.ca_file), device_id="room-103"
    )
    assert wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in caplog.text, timeout=10)
    assert refused.connection == [] and not untrusting.connected
