"""Malformed and hostile MQTT traffic from an authenticated unit, sent with the unit's own
credentials: payloads of a wrong schema on its own topics (the controller must reject
each and carry on), an oversized payload (the broker must refuse it), and messages and
subscriptions on another unit's topics and on channels a unit may not publish (the
broker's ACL must refuse them, so nothing reaches the other unit or the controller)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.messages import MAX_PAYLOAD_BYTES, SegmentAnnouncement
from shared.topics import ROOT, Channel, topic

log = logging.getLogger(__name__)

_WAIT_S = 10.0
# Longer than a unit's health interval: a leak would show within it.
_LISTEN_S = 3.0


@dataclass(frozen=True)
class Probe:
    what: str
    topic: str
    # "rejected by controller" probes pass the broker and must be counted as rejected there.
    expect: str  # "controller rejects" | "broker refuses"
    outcome: str = ""
    # The broker did what ``expect`` says (for "controller rejects": let it through; the
    # controller's rejection shows in its counter).
    held: bool = False


def _wrong_schema(device_id: str) -> list[tuple[Probe, bytes]]:
    health = {"schema": 2, "state": "idle", "can_record": True}
    event = {"schema": 1, "kind": "no-such-kind", "surprise": True}
    announcement = {"schema": 1, "recording_id": "../../etc", "sequence": -1, "size": "big"}
    return [
        (Probe("schema version 2", topic(device_id, Channel.HEALTH), "controller rejects"),
         json.dumps(health).encode()),
        (Probe("not JSON", topic(device_id, Channel.SEGMENT), "controller rejects"),
         b"\xff\xfe\x00 not json at all"),
        (Probe("unknown fields", topic(device_id, Channel.EVENT), "controller rejects"),
         json.dumps(event).encode()),
        (Probe("wrong types", topic(device_id, Channel.SEGMENT), "controller rejects"),
         json.dumps(announcement).encode()),
        (Probe("JSON array", topic(device_id, Channel.RECORDING), "controller rejects"),
         b"[1, 2, 3]"),
    ]  # fmt: skip


def _out_of_bounds(device_id: str, victim: str) -> list[tuple[Probe, bytes]]:
    now = datetime.now(UTC)
    forged = SegmentAnnouncement(
        recording_id="forged",
        sequence=0,
        size=1,
        sha256="0" * 64,
        started_at=now,
        ended_at=now,
    ).to_json()
    return [
        (Probe("another unit's segment", topic(victim, Channel.SEGMENT), "broker refuses"),
         forged),
        (Probe("another unit's status", topic(victim, Channel.STATUS), "broker refuses"),
         b'{"schema": 1, "online": false, "epoch": 999999}'),
        (Probe("a command to itself", topic(device_id, Channel.COMMAND), "broker refuses"),
         b'{"schema": 1}'),
        (Probe("a stored confirmation", topic(device_id, Channel.STORED), "broker refuses"),
         b'{"schema": 1}'),
        (Probe("outside the tree", "classcap/v2/anything", "broker refuses"), b"{}"),
    ]  # fmt: skip


class _Session:
    """One MQTT v5 connection recording what the broker says to each packet."""

    def __init__(self, device_id: str, password: str, host: str, port: int) -> None:
        self.acks: dict[int, ReasonCode] = {}
        self.granted: list[ReasonCode] = []
        self.received: list[str] = []
        self.disconnect: ReasonCode | None = None
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._device_id = device_id
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        client.username_pw_set(device_id, password)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self._client = client
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        client.connect(host, port, keepalive=30, clean_start=True, properties=props)
        client.loop_start()
        if not self._connected.wait(_WAIT_S):
            self.close()
            raise ConnectionError(f"broker did not accept {device_id}'s credentials")

    def publish(self, probe: Probe, payload: bytes) -> Probe:
        info = self._client.publish(probe.topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            refused = probe.expect == "broker refuses"
            return _with(probe, f"not sent ({mqtt.error_string(info.rc)})", refused)
        with self._cond:
            self._cond.wait_for(
                lambda: info.mid in self.acks or self.disconnect is not None, _WAIT_S
            )
            ack = self.acks.get(info.mid)
            gone = self.disconnect
        if ack is not None:
            passed = not ack.is_failure
            return _with(probe, f"PUBACK {ack}", passed == (probe.expect == "controller rejects"))
        if gone is not None:
            return _with(
                probe, f"disconnected by the broker ({gone})", probe.expect != "controller rejects"
            )
        return _with(probe, "no PUBACK", False)

    def subscribe(self, probe: Probe) -> Probe:
        """Subscribes and listens a moment: no message of another unit may arrive."""
        own = f"{ROOT}/{self._device_id}/"
        result, _mid = self._client.subscribe(probe.topic, qos=1)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return _with(probe, f"not sent ({mqtt.error_string(result)})", True)
        with self._cond:
            self._cond.wait_for(lambda: bool(self.granted), _WAIT_S)
            granted = self.granted[-1] if self.granted else None
            self._cond.wait(_LISTEN_S)
            foreign = [t for t in self.received if not t.startswith(own)]
        refused = granted is not None and granted.is_failure
        return _with(
            probe,
            f"SUBACK {granted}; {len(foreign)} message(s) of others received",
            refused or not foreign,
        )

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, _c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_publish(
        self, _c: mqtt.Client, _u: object, mid: int, reason: ReasonCode, _p: object
    ) -> None:
        with self._cond:
            self.acks[mid] = reason
            self._cond.notify_all()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, _mid: int, reasons: list[ReasonCode], _p: object
    ) -> None:
        with self._cond:
            self.granted += reasons
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append(message.topic)
            self._cond.notify_all()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        with self._cond:
            self.disconnect = reason
            self._cond.notify_all()


def attack(host: str, port: int, device_id: str, password: str, victim: str) -> list[Probe]:
    """Sends every probe as ``device_id``; returns each with what the broker answered.
    The unit's own agent must not be connected meanwhile: the broker allows one
    connection per unit (the client id is the user name)."""
    done: list[Probe] = []
    session = _Session(device_id, password, host, port)
    try:
        for probe, payload in _wrong_schema(device_id) + _out_of_bounds(device_id, victim):
            done.append(session.publish(probe, payload))
        for name in (topic(victim, Channel.GRANT), f"{ROOT}/#"):
            done.append(
                session.subscribe(Probe("subscribe to others' messages", name, "broker refuses"))
            )
    finally:
        session.close()
    # Last, on a connection of its own: the broker may close the connection over it.
    oversized = Probe(
        f"{MAX_PAYLOAD_BYTES // 1024 + 64} KiB payload",
        topic(device_id, Channel.HEALTH),
        "broker refuses",
    )
    session = _Session(device_id, password, host, port)
    try:
        payload = b"x" * (MAX_PAYLOAD_BYTES + 64 * 1024)
        done.append(session.publish(oversized, payload))
    finally:
        session.close()
    for probe in done:
        log.info(
            "hostile probe what=%r topic=%s outcome=%s", probe.what, probe.topic, probe.outcome
        )
    return done


def _with(probe: Probe, outcome: str, held: bool) -> Probe:
    return Probe(probe.what, probe.topic, probe.expect, outcome, held)
