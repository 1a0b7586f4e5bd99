"""Controller health ingest, end to end: messages/s from the broker into the registry through a
real ``MqttService`` (SQLite, and PostgreSQL when reachable), against a plain paho subscriber
on the same broker that only receives and JSON-decodes the same messages.

Units are enrolled through ``Registry.add_device``. In each round several publisher
processes (paho, one connection each, each unit's samples in order on one of them) send every
unit's health as fast as the broker takes them; the clock stops when the last sample is
stored (controller) or received (baseline). Every round runs the baseline and each database
in turn, each with a fresh subscriber or service, so none sees another's messages.
Publishing is QoS 1 and the broker queues without limit, so nothing is dropped and the
count is exact (units send health at QoS 0). Afterwards every unit's stored health must be
its last sample. By default each unit sends one sample a round and each round's fresh
service looks every unit up once, much as at the agent's 30 s interval, which is also how
long the service remembers that a unit is enrolled.

    .venv/bin/python bench/controller_ingest.py [--units 2000] [--samples 1] [--rounds 3]

Reported as units a controller keeps up with at the agent's 30 s health interval.
Target: 20,000.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.queues import Queue as QueueType
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from queue import Empty
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import at_least, describe_machine, postgres_database, report
from controller.alerts import AlertEngine
from controller.catalogue import Catalogue
from controller.commands import CommandService
from controller.config import ControllerConfig
from controller.db import Database
from controller.models import Device
from controller.mqtt_service import MqttService
from controller.registry import Registry
from controller.service import alert_thresholds
from controller.storage.local import LocalStorage
from shared.clock import utcnow
from shared.messages import Health, RecorderState
from shared.topics import Channel, subscription, topic
from tests.support.broker import MosquittoBroker

HEALTH_INTERVAL_S = 30
TARGET_UNITS = 20_000
ROUND_TIMEOUT_S = 600.0
# A round fails once no message has been handled for this long.
STALL_S = 60.0
CONNECT_TIMEOUT_S = 30.0
PLAIN = "plain paho subscriber, json decode"

Batch = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Round:
    handled_s: float  # from release to the last message handled
    published_s: float  # from release to the publishers' last PUBACK


class Tally:
    """Counts handled messages and notes the moment the expected number is reached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected = 0
        self._count = 0
        self._finished_at = 0.0
        self._done = threading.Event()

    def expect(self, count: int) -> None:
        with self._lock:
            self._expected, self._count = count, 0
            self._done.clear()

    def add(self, count: int = 1) -> None:
        with self._lock:
            self._count += count
            if self._count >= self._expected and not self._done.is_set():
                self._finished_at = time.monotonic()
                self._done.set()

    def wait(self, what: str) -> float:
        """The moment the last message was handled; raises once progress stops."""
        last, since = -1, time.monotonic()
        while not self._done.wait(1.0):
            with self._lock:
                count = self._count
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since > STALL_S:
                raise RuntimeError(
                    f"{what}: {count} of {self._expected} messages, none for {STALL_S:.0f} s"
                )
        return self._finished_at


class CountingRegistry(Registry):
    """The real registry; counts health messages once handled, to stop the clock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tally = Tally()

    def on_health_batch(self, samples: Sequence[tuple[str, Health]]) -> None:
        super().on_health_batch(samples)
        self.tally.add(len(samples))


@dataclass
class Fleet:
    """One controller's state layer on one database, kept across rounds."""

    name: str
    config: ControllerConfig
    db: Database
    registry: CountingRegistry
    commands: CommandService
    catalogue: Catalogue
    alerts: AlertEngine
    enrol_s: float
    rounds_s: list[float] = field(default_factory=list)
    last_uptime: float = -1.0


def unit_id(index: int) -> str:
    return f"unit-{index:05d}"


def uptime(seq: int, sample: int, samples: int) -> float:
    """Marks sample ``sample`` of round ``seq``, so the last one stored is recognisable."""
    return float(seq * samples + sample)


def batches(units: int, samples: int, publishers: int, seq: int) -> list[Batch]:
    """Round ``seq``'s samples, sample by sample, each unit always on the same publisher."""
    start = utcnow() + timedelta(minutes=seq)
    out: list[Batch] = [[] for _ in range(publishers)]
    for k in range(samples):
        for i in range(units):
            health = Health(
                ts=start + timedelta(seconds=k),
                state=RecorderState.RECORDING if i % 7 == 0 else RecorderState.IDLE,
                soc_temp_c=50.0 + i % 20,
                disk_free_bytes=20 * 1024**3,
                disk_total_bytes=32 * 1024**3,
                can_record=True,
                spool_segments=i % 5,
                spool_bytes=0,
                camera_present=True,
                clock_synced=True,
                uptime_s=uptime(seq, k, samples),
                agent_version="bench",
                rejected_messages=0,
            )
            out[i % publishers].append((topic(unit_id(i), Channel.HEALTH), health.to_json()))
    return out


def publish_batch(
    port: int,
    batch: Batch,
    ready: EventType,
    go: EventType,
    finished: QueueType[float],
    name: str,
) -> None:
    """One publisher process: connects, waits for ``go``, sends ``batch`` at QoS 1 and puts
    the (system-wide monotonic) time of its last PUBACK on ``finished``."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=name, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.max_queued_messages_set(0)
    connected, acked = threading.Event(), threading.Event()
    pending = [len(batch)]

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if not reason.is_failure:
            connected.set()

    def on_publish(_c: mqtt.Client, _u: object, _mid: int, _r: object, _p: object) -> None:
        pending[0] -= 1
        if pending[0] == 0:
            acked.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not connected.wait(CONNECT_TIMEOUT_S):
            raise RuntimeError("publisher did not connect")
        ready.set()
        go.wait()
        for name_, payload in batch:
            client.publish(name_, payload, qos=1)
        if not acked.wait(ROUND_TIMEOUT_S):
            raise RuntimeError(f"{pending[0]} publishes not acknowledged")
        finished.put(time.monotonic())
    finally:
        client.disconnect()
        client.loop_stop()


@contextmanager
def publishers(port: int, work: list[Batch]) -> Iterator[Callable[[Callable[[], float]], Round]]:
    """Publisher processes, connected and waiting; the function yielded releases them and
    returns the round's times, given how to wait for the last message to be handled.

    Forked before the subscriber or service under test starts, so no thread of theirs is
    copied, and without importing anything again."""
    ctx = multiprocessing.get_context("fork")
    go, finished = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in work]
    run_id = secrets.token_hex(3)
    procs = [
        ctx.Process(
            target=publish_batch,
            args=(port, batch, ready, go, finished, f"bench-publisher-{run_id}-{index}"),
            daemon=True,
        )
        for index, (batch, ready) in enumerate(zip(work, readies, strict=True))
    ]
    for proc in procs:
        proc.start()

    def release(wait_handled: Callable[[], float]) -> Round:
        started = time.monotonic()
        go.set()
        handled_at = wait_handled()
        try:
            published_at = max(finished.get(timeout=ROUND_TIMEOUT_S) for _ in procs)
        except Empty:
            raise RuntimeError("a publisher did not finish") from None
        return Round(handled_at - started, published_at - started)

    try:
        if not all(ready.wait(CONNECT_TIMEOUT_S) for ready in readies):
            raise RuntimeError("a publisher did not connect")
        yield release
    finally:
        for proc in procs:
            # Publishers never released would wait for ``go`` forever.
            proc.join(CONNECT_TIMEOUT_S if go.is_set() else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()


class PlainSubscriber:
    """The baseline: receives every health message and decodes its JSON, nothing more."""

    def __init__(self, broker: MosquittoBroker, expected: int) -> None:
        self.tally = Tally()
        self.tally.expect(expected)
        subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-plain-{secrets.token_hex(3)}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_args: subscribed.set()
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        self._client.subscribe(subscription(Channel.HEALTH), qos=1)
        if not subscribed.wait(CONNECT_TIMEOUT_S):
            self.stop()
            raise RuntimeError("plain subscriber got no SUBACK")

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        json.loads(msg.payload)
        self.tally.add()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@contextmanager
def fleet(name: str, url: str, root: Path, broker: MosquittoBroker, args: Any) -> Iterator[Fleet]:
    config = ControllerConfig.model_validate(
        {
            "data_dir": str(root / name),
            "database": {"url": url},
            # No session outlives its round: an offline member of the shared
            # subscription would otherwise be handed the next round's messages.
            "broker": {"mode": "external", "url": broker.url, "session_expiry_s": 0}
            | ({"workers": args.workers} if args.workers else {}),
        }
    )
    db = Database(url)
    try:
        db.migrate()
        alerts = AlertEngine(db, alert_thresholds(config))
        registry = CountingRegistry(db, alerts)
        started = time.perf_counter()
        for i in range(args.units):
            registry.add_device(unit_id(i), f"School {i // 500:03d}", f"{i % 500:03d}")
        enrol_s = time.perf_counter() - started
        storage = LocalStorage(
            root / name / "storage", "http://127.0.0.1:1", secrets.token_bytes(32)
        )
        yield Fleet(
            name,
            config,
            db,
            registry,
            CommandService(db),
            Catalogue(db, storage),
            alerts,
            enrol_s,
        )
    finally:
        db.dispose()


def plain_round(broker: MosquittoBroker, work: list[Batch], total: int) -> Round:
    with publishers(broker.port, work) as release:
        subscriber = PlainSubscriber(broker, total)
        try:
            return release(lambda: subscriber.tally.wait("plain"))
        finally:
            subscriber.stop()


def controller_round(
    broker: MosquittoBroker, target: Fleet, work: list[Batch], total: int, client_id: str
) -> Round:
    broker_config = target.config.broker.model_copy(update={"client_id": client_id})
    service = MqttService(
        target.config.model_copy(update={"broker": broker_config}),
        target.registry,
        target.commands,
        target.catalogue,
        target.alerts,
    )
    tally = target.registry.tally
    tally.expect(total)
    with publishers(broker.port, work) as release:
        service.start()
        try:
            if not service.wait_connected(CONNECT_TIMEOUT_S):
                raise RuntimeError(f"{target.name}: controller did not connect")
            result = release(lambda: tally.wait(target.name))
            metrics = service.metrics()
        finally:
            service.stop()
    if metrics["messages_rejected_total"] or metrics["handler_errors_total"]:
        raise RuntimeError(f"{target.name}: messages rejected or failed: {metrics}")
    return result


def check_stored(target: Fleet, units: int) -> None:
    with target.db.session(readonly=True) as session:
        rows = session.execute(select(Device.id, Device.health)).all()
    stale = [i for i, h in rows if h is None or h.get("uptime_s") != target.last_uptime]
    if len(rows) != units or stale:
        raise RuntimeError(
            f"{target.name}: {len(stale)} of {len(rows)} units lack their last health sample"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=1, help="health messages per unit a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=4, help="publisher processes")
    parser.add_argument("--workers", type=int, default=0, help="service workers (0: its default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # paho reports its own network loop ending after a requested disconnect as an error.
    logging.getLogger("controller.mqtt_service.paho").setLevel(logging.CRITICAL)
    total = args.units * args.samples

    plain_s: list[float] = []
    published_s: list[float] = []
    fleets: list[Fleet] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        # Mosquitto drops QoS 1 messages for a subscriber beyond 1,000 queued; a round
        # counting to its total would then never end.
        broker = stack.enter_context(
            MosquittoBroker(root / "mosquitto", extra_config=["max_queued_messages 0"])
        )
        fleets.append(
            stack.enter_context(
                fleet("sqlite", f"sqlite:///{root / 'controller.sqlite3'}", root, broker, args)
            )
        )
        url = stack.enter_context(postgres_database())
        if url is not None:
            fleets.append(stack.enter_context(fleet("postgresql", url, root, broker, args)))
        seq = 0
        for n in range(args.rounds):
            plain = plain_round(
                broker, batches(args.units, args.samples, args.publishers, seq), total
            )
            plain_s.append(plain.handled_s)
            published_s.append(plain.published_s)
            for target in fleets:
                seq += 1
                work = batches(args.units, args.samples, args.publishers, seq)
                measured = controller_round(
                    broker, target, work, total, f"bench-controller-{target.name}-{n}"
                )
                target.rounds_s.append(measured.handled_s)
                target.last_uptime = uptime(seq, args.samples - 1, args.samples)
                published_s.append(measured.published_s)
            seq += 1
        for target in fleets:
            check_stored(target, args.units)

    plain_rate = statistics.median(total / s for s in plain_s)
    publish_rate = statistics.median(total / s for s in published_s)
    workers = fleets[0].config.broker.workers
    print(f"controller health ingest ({describe_machine()})")
    print(
        f"{args.units} units, {args.samples} sample(s) each a round: {total} messages; "
        f"{args.rounds} rounds; {args.publishers} publishers at QoS 1; {workers} service workers"
    )
    print(f"  {'':<36}{'median msg/s':>14}   each round")
    print(f"  {PLAIN:<36}{plain_rate:>14,.0f}   " + ", ".join(f"{total / s:,.0f}" for s in plain_s))
    for target in fleets:
        rate = statistics.median(total / s for s in target.rounds_s)
        each = ", ".join(f"{total / s:,.0f}" for s in target.rounds_s)
        print(f"  {'MqttService -> registry, ' + target.name:<36}{rate:>14,.0f}   {each}")
        print(
            f"    enrolment {target.enrol_s:.1f} s; ratio to plain {rate / plain_rate:.2f}; at a "
            f"{HEALTH_INTERVAL_S} s health interval {rate * HEALTH_INTERVAL_S:,.0f} units "
            f"(target {TARGET_UNITS:,})"
        )
        setup = (
            f"{args.units} units, {args.samples} sample(s) each a round, {args.rounds} rounds, "
            f"{workers} workers"
        )
        report(
            f"controller ingest, {target.name}: health stored",
            rate,
            "msg/s",
            baseline=plain_rate,
            baseline_name=PLAIN,
            note=f"{setup}; publishers reached {publish_rate:,.0f} msg/s",
        )
        report(
            f"controller ingest, {target.name}: units at {HEALTH_INTERVAL_S} s health",
            rate * HEALTH_INTERVAL_S,
            "units",
            baseline=plain_rate * HEALTH_INTERVAL_S,
            baseline_name=PLAIN,
            target=at_least(TARGET_UNITS),
        )
    print(f"  publishers' own rate (to the last PUBACK): {publish_rate:,.0f} msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
