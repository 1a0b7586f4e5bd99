"""Command round trip through a real Mosquitto on loopback, beside a plain paho
request/response through the same broker.

Controller-side publish of a Command -> the unit's Link + CommandProcessor ->
``done`` CommandResult back at the controller; both it and the plain exchange use
QoS 1 both ways and TCP_NODELAY on every socket and in the broker. The unit runs
once with an in-memory journal (the cost of the link and the processor alone) and
once with the real SQLite journal (``synchronous=FULL``: every command is
remembered and two results are stored).

    .venv/bin/python bench/command_roundtrip.py [--rounds 500]
"""

from __future__ import annotations

import argparse
import itertools
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

# Run as a plain script: the checkout's tests.support is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import report
from device.commands import CommandProcessor, Outcome
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
from tests.support.broker import MosquittoBroker

WARMUP = 20
ROUND_TIMEOUT_S = 5.0
UNIT = "bench-unit"


class MemoryJournal:
    """The journal's command calls without a disk: isolates the link and processor."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._results: dict[str, CommandResult] = {}

    def remember_command(self, command_id: str, _expires_at: datetime) -> bool:
        with self._lock:
            new = command_id not in self._seen
            self._seen.add(command_id)
            return new

    def store_command_result(self, result: CommandResult) -> None:
        with self._lock:
            self._results[result.command_id] = result

    def last_command_result(self, command_id: str) -> CommandResult | None:
        with self._lock:
            return self._results.get(command_id)


def nodelay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextmanager
def paho_client(
    broker: MosquittoBroker, on_message: Callable[[mqtt.Client, mqtt.MQTTMessage], None]
) -> Iterator[mqtt.Client]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_socket_open = nodelay
    client.on_message = lambda c, _u, m: on_message(c, m)
    connected = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if not reason.is_failure:
            connected.set()

    client.on_connect = on_connect
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError(f"no connection to {broker.url}")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def subscribe(client: mqtt.Client, name: str) -> None:
    acked = threading.Event()
    client.on_subscribe = lambda *_args: acked.set()
    client.subscribe(name, qos=1)
    if not acked.wait(10):
        raise RuntimeError(f"no SUBACK for {name}")


def timed_rounds(rounds: int, one_round: Callable[[int], bool]) -> tuple[list[float], int]:
    """Milliseconds per completed round after a warm-up, and how many rounds timed out."""
    samples: list[float] = []
    lost = 0
    for index in range(WARMUP + rounds):
        started = time.perf_counter()
        ok = one_round(index)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if index < WARMUP:
            continue
        if ok:
            samples.append(elapsed_ms)
        else:
            lost += 1
    return samples, lost


def plain_request_response(broker: MosquittoBroker, rounds: int) -> tuple[list[float], int]:
    replied = threading.Event()
    expected = [b""]

    def respond(client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        client.publish("bench/reply", msg.payload, qos=1)

    def receive(_client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        if msg.payload == expected[0]:
            replied.set()

    with paho_client(broker, respond) as responder, paho_client(broker, receive) as requester:
        subscribe(responder, "bench/request")
        subscribe(requester, "bench/reply")

        def one_round(index: int) -> bool:
            replied.clear()
            expected[0] = f'{{"round": {index}}}'.encode()
            requester.publish("bench/request", expected[0], qos=1)
            return replied.wait(ROUND_TIMEOUT_S)

        return timed_rounds(rounds, one_round)


def unit_round_trip(
    broker: MosquittoBroker,
    rounds: int,
    remember: Callable[[str, datetime], bool],
    store: Callable[[CommandResult], None],
    last: Callable[[str], CommandResult | None],
) -> tuple[list[float], int]:
    link: Link | None = None

    def reply(result: CommandResult) -> None:
        assert link is not None
        link.publish(Channel.COMMAND_RESULT, result)

    processor = CommandProcessor(
        {CommandAction.BOOKMARK: lambda _command: Outcome(CommandStatus.DONE)},
        reply,
        remember_command=remember,
        store_result=store,
        last_result=last,
    )

    def on_message(_channel: Channel, message: Message) -> None:
        if isinstance(message, Command):
            processor.submit(message)

    link_connected = threading.Event()
    link = Link(
        UNIT,
        BrokerConfig(url=broker.url),
        next_epoch=itertools.count(1).__next__,
        agent_version="bench",
        capabilities=[],
        on_message=on_message,
        on_connection_change=lambda up: link_connected.set() if up else None,
    )
    done = threading.Event()
    expected = [""]

    def receive(_client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        result = decode(CommandResult, bytes(msg.payload))
        if result.command_id == expected[0] and result.status is CommandStatus.DONE:
            done.set()

    processor.start()
    link.start()
    try:
        if not link_connected.wait(10):
            raise RuntimeError("unit did not connect")
        with paho_client(broker, receive) as controller:
            subscribe(controller, topic(UNIT, Channel.COMMAND_RESULT))
            expiry = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            expiry.MessageExpiryInterval = 60
            run = time.strftime("%H%M%S")

            def one_round(index: int) -> bool:
                done.clear()
                now = utcnow()
                command = Command(
                    id=f"cmd-{run}-{index}",
                    action=CommandAction.BOOKMARK,
                    issued_at=now,
                    expires_at=now + timedelta(seconds=60),
                )
                expected[0] = command.id
                controller.publish(
                    topic(UNIT, Channel.COMMAND), command.to_json(), qos=1, properties=expiry
                )
                return done.wait(ROUND_TIMEOUT_S)

            return timed_rounds(rounds, one_round)
    finally:
        processor.stop()
        link.stop()


def summary(name: str, samples: list[float], lost: int) -> str:
    p95 = statistics.quantiles(samples, n=20)[18]
    return (
        f"{name:<34} {statistics.median(samples):8.3f} ms {p95:8.3f} ms {len(samples):6d} {lost:5d}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="classcap-bench-") as tmp:
        workdir = Path(tmp)
        with MosquittoBroker(workdir / "mosquitto") as broker:
            plain = plain_request_response(broker, args.rounds)
            memory = MemoryJournal()
            in_memory = unit_round_trip(
                broker,
                args.rounds,
                memory.remember_command,
                memory.store_command_result,
                memory.last_command_result,
            )
            journal = Journal(workdir / "journal.sqlite3", UNIT)
            try:
                on_disk = unit_round_trip(
                    broker,
                    args.rounds,
                    journal.remember_command,
                    journal.store_command_result,
                    journal.last_command_result,
                )
            finally:
                journal.close()

    print(f"command round trip, Mosquitto on loopback, QoS 1, {args.rounds} rounds each")
    print(f"{'':<34} {'median':>11} {'p95':>11} {'rounds':>6} {'lost':>5}")
    print(summary("plain paho request/response", *plain))
    print(summary("unit: Link+processor, memory", *in_memory))
    print(summary("unit: Link+processor, SQLite", *on_disk))
    base = statistics.median(plain[0])
    print(
        f"median ratio to plain paho: memory journal {statistics.median(in_memory[0]) / base:.2f}x,"
        f" SQLite journal {statistics.median(on_disk[0]) / base:.2f}x"
    )
    for name, (samples, _lost) in (
        ("command round trip: Link + processor, memory journal", in_memory),
        ("command round trip: Link + processor, SQLite journal", on_disk),
    ):
        report(
            name,
            statistics.median(samples),
            "ms",
            baseline=base,
            baseline_name="plain paho request/response, QoS 1",
            note=f"{args.rounds} rounds",
        )
    return 1 if plain[1] or in_memory[1] or on_disk[1] else 0


if __name__ == "__main__":
    sys.exit(main())
