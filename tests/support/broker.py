"""A real Mosquitto for tests: its own config, port and log in a temporary directory.

``MosquittoBroker`` is also used by the benchmarks, so it depends on nothing
pytest-specific; the fixtures at the bottom wrap it.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.processes import free_port, port_open, stop_process, wait_for

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")


class BrokerError(RuntimeError):
    """Mosquitto did not start; the message carries the end of its log."""


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls_files(directory: Path, name: str = "test") -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / f"{name}-ca.key", directory / f"{name}-ca.crt"
    key, csr, crt = (directory / f"{name}-server.{ext}" for ext in ("key", "csr", "crt"))
    ext = directory / f"{name}-server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_subject = ["-subj", f"/CN={name} CA", "-days", "2"]
    sign = ["-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2"]
    commands = [
        ["req", "-x509", *new_key, *ca_subject, "-keyout", str(ca_key), "-out", str(ca_crt)],
        ["req", *new_key, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), *sign, "-extfile", str(ext), "-out", str(crt)],
    ]
    for argv in commands:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)
    return TlsFiles(ca_crt, crt, key)


class MosquittoBroker:
    """One mosquitto process on 127.0.0.1; ``restart`` keeps the port so clients can come back.

    ``users`` (name -> password) turns anonymous access off and writes a password
    file; ``acl`` lines (e.g. ``pattern readwrite classcap/v1/%u/#``) go to an acl_file.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        acl: Sequence[str] | None = None,
        message_size_limit: int | None = None,
        tls: TlsFiles | None = None,
        extra_config: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self._users = dict(users or {})
        self._acl = list(acl) if acl is not None else None
        self._message_size_limit = message_size_limit
        self.tls = tls
        self._extra_config = list(extra_config)
        self._proc: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls is not None else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {self.host}",
            "set_tcp_nodelay true",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # Run as whoever runs the tests; as root mosquitto would otherwise switch
            # to the 'mosquitto' user, who cannot read files in the test's directory.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
        ]
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
            ]
        if self._message_size_limit is not None:
            lines.append(f"message_size_limit {self._message_size_limit}")
        if self._users:
            password_file = self.workdir / "passwords"
            password_file.unlink(missing_ok=True)
            for index, (name, password) in enumerate(self._users.items()):
                create = ["-c"] if index == 0 else []
                subprocess.run(
                    [str(MOSQUITTO_PASSWD), "-b", *create, str(password_file), name, password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self._acl is not None:
            acl_file = self.workdir / "acl"
            acl_file.write_text("\n".join(self._acl) + "\n")
            lines.append(f"acl_file {acl_file}")
        lines += self._extra_config
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            raise BrokerError(f"mosquitto already running pid={self.pid}")
        self._write_config()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        proc = self._proc
        if not wait_for(lambda: proc.poll() is not None or port_open(self.port), timeout):
            self.stop()
            raise BrokerError(f"mosquitto did not listen on {self.port}: {self.log_tail()}")
        if proc.poll() is not None:
            self._proc = None
            raise BrokerError(f"mosquitto exited with {proc.returncode}: {self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process this object started, SIGKILL after ``timeout``; always reaped."""
        if self._proc is not None:
            stop_process(self._proc, timeout)
            self._proc = None

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry_s: int | None


class MqttTestClient:
    """A paho MQTT 5 client on its own network thread that keeps every message it receives.

    It re-subscribes after a reconnect, so it keeps observing across a broker restart.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.broker = broker
        self.received: list[Received] = []
        self._filters: list[str] = []
        self._cond = threading.Condition()
        self._acks: dict[int, list[ReasonCode]] = {}
        self._connack: ReasonCode | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_socket_open = _nodelay
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(1, 2)

    def connect(self, timeout: float = 10.0) -> ReasonCode:
        """Connects and waits for CONNACK; returns its reason code (a refusal is not raised)."""
        self.client.connect(self.broker.host, self.broker.port, keepalive=30, clean_start=True)
        self.client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._connack is not None, timeout):
                raise TimeoutError(f"no CONNACK from {self.broker.url}")
            assert self._connack is not None
            return self._connack

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        with self._cond:
            reconnect = self._connack is not None
            self._connack = reason
            self._cond.notify_all()
        if reconnect and not reason.is_failure and self._filters:
            client.subscribe([(f, 1) for f in self._filters])

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        with self._cond:
            self.received.append(
                Received(msg.topic, bytes(msg.payload), msg.qos, msg.retain, expiry)
            )
            self._cond.notify_all()

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        with self._cond:
            self._acks[mid] = reasons
            self._cond.notify_all()

    def subscribe(self, *filters: str, qos: int = 1, timeout: float = 10.0) -> list[ReasonCode]:
        """Subscribes and waits for SUBACK; returns one reason code per filter."""
        self._filters.extend(filters)
        result, mid = self.client.subscribe([(f, qos) for f in filters])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise RuntimeError(f"subscribe failed: {mqtt.error_string(result)}")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, timeout):
                raise TimeoutError(f"no SUBACK for {filters}")
            return self._acks.pop(mid)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Publishes and, for QoS 1 and 2, waits until the broker acknowledged it."""
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = expiry_s
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic} not acknowledged")

    def messages(self, topic: str | None = None) -> list[Received]:
        with self._cond:
            return [m for m in self.received if topic is None or m.topic == topic]

    def wait_for(
        self, predicate: Callable[[Received], bool], timeout: float = 10.0, count: int = 1
    ) -> list[Received]:
        """The first ``count`` received messages matching ``predicate``; raises on timeout."""

        def matching() -> list[Received]:
            return [m for m in self.received if predicate(m)]

        with self._cond:
            if not self._cond.wait_for(lambda: len(matching()) >= count, timeout):
                raise TimeoutError(f"{len(matching())} of {count} expected messages arrived")
            return matching()[:count]


def _nodelay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Starts brokers with ``MosquittoBroker``'s keyword options; stops each one at teardown."""
    started: list[MosquittoBroker] = []

    def make(**options: Any) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto-{len(started)}", **options)
        started.append(broker)
        broker.start()
        return broker

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """An anonymous broker on a free port, stopped at teardown."""
    return broker_factory()


@pytest.fixture
def mqtt_client() -> Iterator[Callable[..., MqttTestClient]]:
    """``mqtt_client(broker, *filters, client_id=..., username=..., password=...)``: a
    connected, looping client already subscribed to ``filters``; stopped at teardown."""
    clients: list[MqttTestClient] = []

    def make(
        broker: MosquittoBroker,
        *filters: str,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
    ) -> MqttTestClient:
        client = MqttTestClient(broker, client_id, username, password)
        clients.append(client)
        reason = client.connect()
        if reason.is_failure:
            raise ConnectionError(f"broker refused test client: {reason}")
        if filters:
            client.subscribe(*filters)
        return client

    yield make
    for client in clients:
        client.stop()
