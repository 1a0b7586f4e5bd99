"""The unit's MQTT link: presence with epochs, its own subscriptions, validated delivery.

One thread owns the paho client and its socket. It takes a new presence epoch
before every connection attempt, sets the last will (a retained offline status
with that epoch) for exactly that attempt, runs paho's network loop while the
connection lives and backs off with jitter between attempts, so that a school's
units do not all reconnect in the same instant after a broker restart.

``on_message``, ``on_rejected`` and ``on_connection_change`` run on that thread:
they must not block, or every message and keepalive waits behind them. Hand
slow work to another thread (``device.commands.CommandProcessor`` has its own).
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device.config import BrokerConfig
from shared.codec import MODEL_FOR_CHANNEL, DecodeError, decode
from shared.messages import Message, Status
from shared.topics import (
    UNIT_PUBLISHES,
    UNIT_SUBSCRIBES,
    Channel,
    TopicError,
    parse,
    subscription,
    topic,
    validate_device_id,
)

log = logging.getLogger(__name__)

# The broker keeps the session (subscriptions and queued QoS 1 commands and grants)
# this long while the unit is away; each message's own expiry still applies.
SESSION_EXPIRY_S = 24 * 3600
CONNECT_TIMEOUT_S = 5.0
# A connection that lasts less than this does not reset the reconnect backoff, so a
# unit the broker keeps dropping (say, a second agent with the same id) backs off.
STABLE_CONNECTION_S = 10.0
# select() timeout of the network loop: how soon the thread notices a halt request.
_LOOP_TIMEOUT_S = 0.5

MessageHandler = Callable[[Channel, Message], None]
RejectHandler = Callable[[Channel, str, bytes], None]


class Link:
    """The unit's connection to the broker. ``start`` once, ``stop`` once."""

    def __init__(
        self,
        device_id: str,
        broker: BrokerConfig,
        *,
        next_epoch: Callable[[], int],
        agent_version: str,
        capabilities: list[str],
        on_message: MessageHandler,
        on_connection_change: Callable[[bool], None],
        on_rejected: RejectHandler | None = None,
    ) -> None:
        self._device_id = validate_device_id(device_id)
        self._broker = broker
        self._next_epoch = next_epoch
        self._agent_version = agent_version
        self._capabilities = list(capabilities)
        self._on_message = on_message
        self._on_connection_change = on_connection_change
        self._on_rejected = on_rejected
        self._status_topic = topic(device_id, Channel.STATUS)
        self._filters = sorted(subscription(channel, device_id) for channel in UNIT_SUBSCRIBES)
        # Filters of SUBSCRIBEs awaiting their SUBACK; touched only on the link thread.
        self._pending_subscriptions: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._connected = False
        self._connected_at: float | None = None
        self._epoch: int | None = None
        self._rejected = 0
        self._stop = threading.Event()  # no further connection attempts
        self._halt = threading.Event()  # leave the network loop even if connected
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    # --- public interface -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    @property
    def subscribed(self) -> bool:
        """Connected and the broker has acknowledged every subscription: from now on
        nothing sent to the unit is missed."""
        with self._lock:
            return self._connected and not self._pending_subscriptions

    @property
    def rejected_count(self) -> int:
        with self._lock:
            return self._rejected

    @property
    def epoch(self) -> int | None:
        """The epoch of the current or most recent connection attempt."""
        with self._lock:
            return self._epoch

    def start(self) -> None:
        """Returns at once; connects in the background and keeps reconnecting until ``stop``."""
        if self._thread is not None:
            raise RuntimeError("link already started")
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publishes the retained offline status with the current epoch, disconnects, joins.

        If the broker does not take part within ``timeout`` the connection is closed
        with MQTT 5's "disconnect with will message", so the broker still publishes
        the offline status from the will.
        """
        thread = self._thread
        if thread is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("Link.stop() must not be called from the link's own thread")
        deadline = time.monotonic() + timeout
        self._stop.set()
        with self._lock:
            connected, epoch = self._connected, self._epoch
        if connected and epoch is not None:
            offline = Status(online=False, epoch=epoch)
            info = self._client.publish(self._status_topic, offline.to_json(), qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()) / 2)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not published epoch=%d error=%s", epoch, exc)
            self._client.disconnect()
            thread.join(max(0.0, deadline - time.monotonic()) / 2)
        self._halt.set()
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.error("link thread did not stop within %.1fs", timeout)
        else:
            log.info("link stopped device=%s epoch=%s", self._device_id, epoch)

    def publish(
        self,
        channel: Channel,
        message: Message,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> bool:
        """Sends ``message`` on this unit's ``channel``; False when not connected.

        The caller keeps whatever it needs to send again later. A QoS 1 message
        accepted here but not yet acknowledged when the connection drops is sent
        again by paho after the reconnect, so a peer may see it twice.
        """
        if channel not in UNIT_PUBLISHES or channel is Channel.STATUS:
            raise ValueError(f"a unit does not publish on {channel.value!r} through publish()")
        expected = MODEL_FOR_CHANNEL[channel]
        if not isinstance(message, expected):
            raise TypeError(f"{channel.value} carries {expected.__name__}, not {type(message)}")
        if not self.connected:
            return False
        name = topic(self._device_id, channel)
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = expiry_s
        info = self._client.publish(
            name, message.to_json(), qos=qos, retain=retain, properties=props
        )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("publish failed topic=%s error=%s", name, mqtt.error_string(info.rc))
            return False
        return True

    # --- the link thread -------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        if self._broker.tls:
            ca = self._broker.ca_file
            client.tls_set(ca_certs=str(ca) if ca is not None else None)
        client.on_socket_open = _set_nodelay
        # With an event-loop callback registered, paho queues packets published from
        # other threads for the link thread instead of writing the socket on the
        # caller's thread, where two writers could interleave packets.
        client.on_socket_register_write = _wake_not_needed
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_message = self._handle_message
        return client

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                lasted = self._session()
            except Exception:
                log.exception("link session failed url=%s", self._broker.url)
                lasted = 0.0
            if self._stop.is_set():
                break
            failures = 0 if lasted >= STABLE_CONNECTION_S else failures + 1
            delay = self._backoff(failures)
            log.info("broker reconnect in %.2fs url=%s", delay, self._broker.url)
            self._stop.wait(delay)

    def _backoff(self, failures: int) -> float:
        ceiling = min(
            self._broker.reconnect_max_s, self._broker.reconnect_min_s * 2 ** min(failures, 30)
        )
        return random.uniform(ceiling / 2, ceiling)

    def _session(self) -> float:
        """One connection attempt and its lifetime; returns how many seconds it was up."""
        epoch = self._next_epoch()
        with self._lock:
            self._epoch = epoch
            self._connected_at = None
        client = self._client
        will_props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
        will_props.WillDelayInterval = self._broker.will_delay_s
        will = Status(online=False, epoch=epoch).to_json()
        client.will_set(self._status_topic, will, qos=1, retain=True, properties=will_props)
        if self._broker.username is not None:
            try:
                password = self._broker.resolved_password()
            except OSError as exc:
                log.error(
                    "broker password unreadable file=%s error=%s", self._broker.password_file, exc
                )
                return 0.0
            client.username_pw_set(self._broker.username, password)
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_props.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            client.connect(
                self._broker.host,
                self._broker.port,
                keepalive=self._broker.keepalive_s,
                clean_start=False,
                properties=connect_props,
            )
        except OSError as exc:
            log.warning(
                "broker connect failed device=%s url=%s epoch=%d error=%s",
                self._device_id,
                self._broker.url,
                epoch,
                exc,
            )
            return 0.0
        # paho itself gives up on a missing CONNACK after the keepalive interval.
        while client.socket() is not None:
            if self._halt.is_set():
                self._abandon()
                break
            if client.loop(_LOOP_TIMEOUT_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        with self._lock:
            connected_at = self._connected_at
        return 0.0 if connected_at is None else time.monotonic() - connected_at

    def _abandon(self) -> None:
        """Closes the connection so that the broker publishes the will (offline, this epoch)."""
        self._client.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        self._client.loop_write()

    # --- paho callbacks (link thread) --------------------------------------------------

    def _handle_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        with self._lock:
            epoch = self._epoch
        if reason.is_failure:
            log.warning(
                "broker refused connection device=%s url=%s epoch=%s reason=%s",
                self._device_id,
                self._broker.url,
                epoch,
                reason,
            )
            return
        assert epoch is not None
        online = Status(
            online=True,
            epoch=epoch,
            agent_version=self._agent_version,
            capabilities=self._capabilities,
        )
        client.publish(self._status_topic, online.to_json(), qos=1, retain=True)
        result, mid = client.subscribe([(f, 1) for f in self._filters])
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subscriptions[mid] = self._filters
        with self._lock:
            self._connected = True
            self._connected_at = time.monotonic()
        log.info(
            "link connected device=%s url=%s epoch=%d session_present=%s",
            self._device_id,
            self._broker.url,
            epoch,
            flags.session_present,
        )
        self._notify_connection(True)

    def _handle_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        with self._lock:
            was_connected = self._connected
            self._connected = False
            epoch = self._epoch
        if not was_connected:
            return
        if self._stop.is_set():
            log.info("link disconnected epoch=%s reason=%s", epoch, reason)
        else:
            log.warning(
                "link lost device=%s url=%s epoch=%s reason=%s",
                self._device_id,
                self._broker.url,
                epoch,
                reason,
            )
        self._notify_connection(False)

    def _handle_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        filters = self._pending_subscriptions.pop(mid, [])
        for name, reason in zip(filters, reasons, strict=False):
            if reason.is_failure:
                log.error("subscription refused topic=%s reason=%s", name, reason)

    def _handle_message(
        self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage
    ) -> None:
        try:
            self._dispatch(msg.topic, bytes(msg.payload))
        except Exception:
            log.exception("message handling failed mid=%d", msg.mid)

    def _dispatch(self, topic_name: str, payload: bytes) -> None:
        try:
            parsed = parse(topic_name)
        except TopicError as exc:
            self._reject(topic_name, str(exc), None, payload)
            return
        if parsed.device_id != self._device_id:
            self._reject(topic_name, f"addressed to unit {parsed.device_id}", None, payload)
            return
        if parsed.channel not in UNIT_SUBSCRIBES:
            self._reject(
                topic_name, f"a unit does not receive {parsed.channel.value}", None, payload
            )
            return
        if not payload:
            # A zero-length message is how a retained message is cleared; nothing to apply.
            log.info("ignored empty message topic=%s", topic_name)
            return
        try:
            message = decode(MODEL_FOR_CHANNEL[parsed.channel], payload)
        except DecodeError as exc:
            self._reject(topic_name, exc.reason, parsed.channel, payload)
            return
        try:
            self._on_message(parsed.channel, message)
        except Exception:
            log.exception("message handler failed topic=%s", topic_name)

    def _reject(
        self, topic_name: str, reason: str, channel: Channel | None, payload: bytes
    ) -> None:
        """Counts and logs a bad message; only payloads on the unit's own channels go to
        ``on_rejected``, which may answer them (a command id gets a rejection)."""
        log.warning(
            "rejected message topic=%s reason=%s bytes=%d", topic_name, reason, len(payload)
        )
        # Counted once logged, so whoever sees the count also finds the reason in the log.
        with self._lock:
            self._rejected += 1
        if channel is None or self._on_rejected is None:
            return
        try:
            self._on_rejected(channel, reason, payload)
        except Exception:
            log.exception("reject handler failed topic=%s", topic_name)

    def _notify_connection(self, connected: bool) -> None:
        try:
            self._on_connection_change(connected)
        except Exception:
            log.exception("connection change handler failed connected=%s", connected)


def _set_nodelay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    # A request/response round trip takes ~88 ms instead of ~0.7 ms when Nagle's
    # algorithm meets delayed ACKs; paho has no option for it.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wake_not_needed(_client: mqtt.Client, _userdata: object, _sock: object) -> None:
    """paho's loop() already selects on its wake-up socket pair and on pending writes."""
