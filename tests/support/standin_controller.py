"""A test stand-in for the fleet controller's MQTT side: grants uploads, verifies them against
real S3 storage, sends commands, and records everything units say."""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from datetime import timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.storage.s3 import S3Storage
from shared.clock import utcnow
from shared.codec import MODEL_FOR_CHANNEL, DecodeError, decode
from shared.ids import new_command_id
from shared.messages import (
    Command,
    CommandAction,
    CommandResult,
    CommandStatus,
    Message,
    SegmentAnnouncement,
    StoredConfirmation,
    UploadResult,
)
from shared.topics import ROOT, Channel, parse, topic
from tests.support.grantor import Grantor
from tests.support.processes import wait_for


class StandinController:
    def __init__(self, host: str, port: int, storage: S3Storage | None) -> None:
        self._storage = storage
        self._grantors: dict[str, Grantor] = {}
        self.messages: dict[tuple[str, Channel], list[Message]] = defaultdict(list)
        self.undecodable: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._work: queue.Queue[tuple[str, Message] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run_worker, name="standin-worker", daemon=True)
        self.answer_segments = True
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="standin-controller", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._host, self._port = host, port

    def start(self) -> None:
        self._worker.start()
        self.client.connect_async(self._host, self._port, keepalive=10)
        self.client.reconnect_delay_set(0.2, 2)
        self.client.loop_start()
        assert wait_for(self.client.is_connected, 10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._work.put(None)
        self._worker.join(timeout=10)

    def grantor(self, device_id: str) -> Grantor:
        assert self._storage is not None
        with self._lock:
            if device_id not in self._grantors:
                self._grantors[device_id] = Grantor(self._storage, device_id)
            return self._grantors[device_id]

    # --- observing ------------------------------------------------------------------

    def of(self, device_id: str, channel: Channel) -> list[Any]:
        with self._lock:
            return list(self.messages[(device_id, channel)])

    def results(self, device_id: str, command_id: str) -> list[CommandResult]:
        return [r for r in self.of(device_id, Channel.COMMAND_RESULT) if r.command_id == command_id]

    def wait_result(
        self, device_id: str, command_id: str, status: CommandStatus, timeout: float = 20
    ) -> CommandResult:
        def found() -> bool:
            return any(r.status is status for r in self.results(device_id, command_id))

        assert wait_for(found, timeout), self.results(device_id, command_id)
        return next(r for r in self.results(device_id, command_id) if r.status is status)

    # --- acting ---------------------------------------------------------------------

    def send_command(
        self,
        device_id: str,
        action: CommandAction,
        *,
        expires_in_s: float = 30,
        command_id: str | None = None,
        **fields: Any,
    ) -> Command:
        now = utcnow()
        command = Command(
            id=command_id or new_command_id(),
            action=action,
            issued_at=now - timedelta(seconds=max(0.0, -expires_in_s) + 1),
            expires_at=now + timedelta(seconds=expires_in_s),
            **fields,
        )
        self.publish_raw(
            topic(device_id, Channel.COMMAND), command.to_json(), expiry_s=expires_in_s
        )
        return command

    def publish_raw(
        self,
        topic_name: str,
        payload: bytes,
        *,
        retain: bool = False,
        expiry_s: float | None = None,
    ) -> None:
        props = None
        if expiry_s is not None and expiry_s > 0:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry_s)
        self.client.publish(topic_name, payload, qos=1, retain=retain, properties=props)

    # --- internals ------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        client.subscribe(f"{ROOT}/+/#", qos=1)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            parsed = parse(msg.topic)
            message = decode(MODEL_FOR_CHANNEL[parsed.channel], msg.payload)
        except (ValueError, DecodeError) as exc:
            with self._lock:
                self.undecodable.append((msg.topic, str(exc)))
            return
        with self._lock:
            self.messages[(parsed.device_id, parsed.channel)].append(message)
        if parsed.channel in {Channel.SEGMENT, Channel.UPLOAD}:
            self._work.put((parsed.device_id, message))

    def _run_worker(self) -> None:
        while (item := self._work.get()) is not None:
            device_id, message = item
            if self._storage is None or not self.answer_segments:
                continue
            grantor = self.grantor(device_id)
            if isinstance(message, SegmentAnnouncement):
                answer: Message = grantor.on_announcement(message)
            elif isinstance(message, UploadResult):
                answer = grantor.on_upload_result(message)
            else:
                continue
            channel = Channel.STORED if isinstance(answer, StoredConfirmation) else Channel.GRANT
            self.client.publish(topic(device_id, channel), answer.to_json(), qos=1)
