"""The embedded broker's generated config and ACL on a real Mosquitto: a unit is confined to
its own topics in the directions the contract gives them; the controller sees everything."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.broker import CONTROLLER_USER, set_password
from controller.config import ControllerConfig
from controller.service import EmbeddedBroker, broker_settings
from shared.topics import ROOT, UNIT_PUBLISHES, UNIT_SUBSCRIBES, Channel, topic
from tests.support.broker import MqttTestClient
from tests.support.controller_proc import Endpoint
from tests.support.processes import free_port

PASSWORDS = {CONTROLLER_USER: "controller-secret", "unit-a": "secret-a", "unit-b": "secret-b"}
# Long enough for a message the broker would deliver to arrive: the checks that
# something did NOT arrive come after a message sent later on the same path did.
SETTLE_S = 0.3


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    config = ControllerConfig.model_validate(
        {"data_dir": str(tmp_path / "cc"), "broker": {"embedded": {"port": free_port()}}}
    )
    broker = EmbeddedBroker(broker_settings(config))
    broker.write_config()
    for user, password in PASSWORDS.items():
        set_password(config.broker_password_file, user, password)
    broker.start()
    yield Endpoint("127.0.0.1", config.broker.embedded.port)
    broker.stop()


@pytest.fixture
def clients() -> Iterator[list[MqttTestClient]]:
    made: list[MqttTestClient] = []
    yield made
    for client in made:
        client.stop()


def _client(
    endpoint: Endpoint, clients: list[MqttTestClient], user: str, *filters: str
) -> MqttTestClient:
    client = MqttTestClient(endpoint, username=user, password=PASSWORDS[user])
    clients.append(client)
    reason = client.connect()
    assert not reason.is_failure, reason
    if filters:
        client.subscribe(*filters)
    return client


def _marker(channel: Channel, note: str) -> bytes:
    return f'{{"acl-test": "{channel.value} {note}"}}'.encode()


def test_unit_publishes_only_its_own_unit_channels(
    endpoint: Endpoint, clients: list[MqttTestClient]
) -> None:
    controller = _client(endpoint, clients, CONTROLLER_USER, f"{ROOT}/#")
    unit_a = _client(endpoint, clients, "unit-a")
    for channel in Channel:
        unit_a.publish(topic("unit-b", channel), _marker(channel, "as b"))
        if channel not in UNIT_PUBLISHES:
            unit_a.publish(topic("unit-a", channel), _marker(channel, "controller side"))
    for channel in sorted(UNIT_PUBLISHES):
        unit_a.publish(topic("unit-a", channel), _marker(channel, "own"))
    controller.wait_for(lambda m: m.topic.startswith(f"{ROOT}/unit-a/"), count=len(UNIT_PUBLISHES))
    time.sleep(SETTLE_S)
    got = sorted(m.topic for m in controller.messages())
    assert got == sorted(topic("unit-a", channel) for channel in UNIT_PUBLISHES)


def test_unit_reads_only_what_is_addressed_to_it(
    endpoint: Endpoint, clients: list[MqttTestClient]
) -> None:
    unit_a = _client(endpoint, clients, "unit-a", f"{ROOT}/#", "#")
    unit_b = _client(endpoint, clients, "unit-b", f"{ROOT}/unit-b/#")
    controller = _client(endpoint, clients, CONTROLLER_USER)
    # What unit-b says (its retained status included) is for the controller only.
    for channel in sorted(UNIT_PUBLISHES):
        unit_b.publish(topic("unit-b", channel), _marker(channel, "from b"), retain=True)
    for channel in Channel:
        controller.publish(topic("unit-b", channel), _marker(channel, "to b"))
    for channel in sorted(UNIT_SUBSCRIBES):
        controller.publish(topic("unit-a", channel), _marker(channel, "to a"))
    unit_a.wait_for(lambda m: m.topic.startswith(f"{ROOT}/unit-a/"), count=len(UNIT_SUBSCRIBES))
    unit_b.wait_for(lambda m: b"to b" in m.payload, count=len(UNIT_SUBSCRIBES))
    time.sleep(SETTLE_S)
    # Two overlapping filters may deliver a message twice; what matters is which arrived.
    assert {m.topic for m in unit_a.messages()} == {
        topic("unit-a", channel) for channel in UNIT_SUBSCRIBES
    }
    # A late subscriber sees no retained message of another unit either.
    late = _client(endpoint, clients, "unit-a", f"{ROOT}/unit-b/#")
    controller.publish(topic("unit-a", Channel.STORED), b'{"acl-test": "fence"}')
    time.sleep(SETTLE_S)
    assert late.messages() == []
    # Even in its own subtree a unit reads only the channels addressed to it.
    assert sorted(m.topic for m in unit_b.messages()) == sorted(
        topic("unit-b", channel) for channel in UNIT_SUBSCRIBES
    )
    assert all(b"to b" in m.payload for m in unit_b.messages())


def test_controller_sees_every_unit_and_retained_state(
    endpoint: Endpoint, clients: list[MqttTestClient]
) -> None:
    for unit in ("unit-a", "unit-b"):
        client = _client(endpoint, clients, unit)
        client.publish(topic(unit, Channel.STATUS), b'{"online": true}', retain=True)
    controller = _client(endpoint, clients, CONTROLLER_USER, f"{ROOT}/+/status")
    got = controller.wait_for(lambda m: m.retain, count=2)
    assert sorted(m.topic for m in got) == [
        topic("unit-a", Channel.STATUS),
        topic("unit-b", Channel.STATUS),
    ]


def test_anonymous_and_wrong_passwords_are_refused(endpoint: Endpoint) -> None:
    for username, password in ((None, None), ("unit-a", "secret-b"), ("nobody", "x")):
        client = MqttTestClient(endpoint, username=username, password=password)
        try:
            assert client.connect().is_failure, username
        finally:
            client.stop()


def test_a_unit_cannot_take_over_another_units_session(
    endpoint: Endpoint, clients: list[MqttTestClient]
) -> None:
    unit_b = _client(endpoint, clients, "unit-b")
    impostor = MqttTestClient(endpoint, client_id="unit-b", username="unit-a", password="secret-a")
    clients.append(impostor)
    assert not impostor.connect().is_failure
    # The client id is the user name: unit-b's connection and session stay its own.
    controller = _client(endpoint, clients, CONTROLLER_USER, f"{ROOT}/unit-b/status")
    unit_b.publish(topic("unit-b", Channel.STATUS), b'{"still": "here"}')
    assert controller.wait_for(lambda m: m.payload == b'{"still": "here"}')
    assert unit_b.client.is_connected()
