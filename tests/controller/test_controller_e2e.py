"""The whole system: the controller (its own Mosquitto, MQTT service, REST API under waitress,
SQLite), SeaweedFS as district storage and real agent processes as units."""

from __future__ import annotations

import base64
import hashlib
import http.client
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from controller.service import ControllerService
from controller.storage.s3 import PresignedPut, S3Storage, Verification
from device.journal import SegmentState
from shared.clock import utcnow
from shared.codec import decode
from shared.messages import (
    RecordingStatus,
    SegmentAnnouncement,
    StoredConfirmation,
    UploadGrant,
    UploadResult,
)
from shared.topics import Channel, topic
from tests.support.agent_proc import AgentProcess
from tests.support.broker import MqttTestClient
from tests.support.controller_proc import (
    ControllerProcess,
    Endpoint,
    admin_token,
    api,
    controller_document,
    enrol_unit,
    running_controller,
    write_controller_config,
)
from tests.support.processes import port_open, wait_for
from tests.support.s3 import list_keys, make_storage, new_bucket_name, remove_bucket
from tests.support.seaweed_server import SeaweedServer

KEEPALIVE_S = 5


@pytest.fixture
def bucket(seaweedfs: SeaweedServer) -> Iterator[S3Storage]:
    storage = make_storage(seaweedfs)
    yield storage
    remove_bucket(seaweedfs, storage.bucket)


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def _controller(tmp_path: Path, server: SeaweedServer, bucket: S3Storage, **options: Any) -> Any:
    document = controller_document(tmp_path, seaweed=server, bucket=bucket.bucket, **options)
    return write_controller_config(tmp_path / "controller.toml", document)


def _start(agents: list[AgentProcess], agent: AgentProcess) -> AgentProcess:
    agents.append(agent)
    agent.start()
    return agent


def _online(service: ControllerService, device_id: str) -> bool:
    view = service.services.registry.get(device_id)
    return view is not None and view.online


def _command_status(service: ControllerService, command_id: str) -> str | None:
    view = service.services.commands.get(command_id)
    return None if view is None else view.status


def _spool_segments(agent: AgentProcess) -> list[Path]:
    return sorted((agent.data_dir / "spool").glob("*/seg-*.mp4"))


def _journal_rows(agent: AgentProcess, recording_id: str) -> list[Any]:
    journal = agent.journal()
    try:
        return journal.all_segments(recording_id)
    finally:
        journal.close()


def _all_stored(agent: AgentProcess, recording_id: str) -> bool:
    rows = _journal_rows(agent, recording_id)
    return bool(rows) and all(r.state is SegmentState.STORED for r in rows)


def _stored_checksum(server: SeaweedServer, bucket: str, key: str) -> str:
    head = server.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    return base64.b64decode(head["ChecksumSHA256"]).hex()


def _check_recording_stored_once(
    service: ControllerService,
    server: SeaweedServer,
    storage: S3Storage,
    agent: AgentProcess,
    recording_id: str,
) -> int:
    """Every segment of the unit's recording is in the bucket exactly once, with the sha256
    the unit computed and the catalogue holds; returns how many segments it has."""
    rows = _journal_rows(agent, recording_id)
    recording = service.services.catalogue.get(recording_id)
    assert recording is not None
    catalogued = {s.sequence: s for s in recording.segments}
    assert sorted(catalogued) == [r.sequence for r in rows] == list(range(len(rows)))
    keys = [k for k in list_keys(server, storage.bucket) if f"/{recording_id}/" in k]
    segment_keys = sorted(k for k in keys if "/seg-" in k)
    assert segment_keys == sorted(s.key for s in catalogued.values())
    for row in rows:
        segment = catalogued[row.sequence]
        assert segment.state == "stored"
        assert (segment.size, segment.sha256) == (row.size, row.sha256)
        assert _stored_checksum(server, storage.bucket, segment.key) == segment.sha256
    assert storage.key_for(agent.device_id, recording_id, "manifest.json") in keys
    assert recording.segments_stored == len(rows)
    return len(rows)


# --- three units, two minutes, through the REST API ---------------------------------------------


@pytest.mark.slow
def test_three_units_record_two_minutes_through_the_api_and_every_segment_is_stored_once(
    tmp_path: Path, seaweedfs: SeaweedServer, bucket: S3Storage, agents: list[AgentProcess]
) -> None:
    config = _controller(tmp_path, seaweedfs, bucket)
    with running_controller(config) as service:
        token = admin_token(service)
        units = [
            _start(agents, enrol_unit(service, tmp_path, f"room-{n}", segment_seconds=20))
            for n in (101, 102, 103)
        ]
        for unit in units:
            assert wait_for(lambda u=unit: _online(service, u.device_id), 15)

        started: dict[str, str] = {}
        for unit in units:
            status, body = api(
                service.base_url,
                token,
                "POST",
                f"/devices/{unit.device_id}/commands",
                {"action": "start_recording", "expires_in_s": 30},
            )
            assert status == 202, body
            started[unit.device_id] = body["id"]
        for command_id in started.values():
            assert wait_for(lambda c=command_id: _command_status(service, c) == "done", 20)
        began = time.monotonic()
        recordings = {}
        for device_id, command_id in started.items():
            status, body = api(service.base_url, token, "GET", f"/commands/{command_id}")
            assert status == 200 and body["recording_id"], body
            recordings[device_id] = body["recording_id"]
        assert all(unit.status()["state"] == "recording" for unit in units)

        time.sleep(max(0.0, 120 - (time.monotonic() - began)))
        status, body = api(
            service.base_url,
            token,
            "POST",
            f"/schools/{quote('Test School')}/commands",
            {"action": "stop_recording"},
        )
        assert status == 202 and body["count"] == 3, body
        for item in body["items"]:
            assert wait_for(lambda c=item["id"]: _command_status(service, c) == "done", 30)

        for unit in units:
            recording_id = recordings[unit.device_id]
            assert wait_for(lambda u=unit, r=recording_id: _all_stored(u, r), 120), unit.log_tail()
            assert wait_for(lambda u=unit: not _spool_segments(u), 20)
            segments = _check_recording_stored_once(service, seaweedfs, bucket, unit, recording_id)
            assert segments >= 6  # two minutes in 20 s segments
            view = service.services.catalogue.get(recording_id)
            assert view is not None and view.status == RecordingStatus.COMPLETE.value
            assert view.completeness == "complete"


# --- presence ------------------------------------------------------------------------------------


def _presence_events(service: ControllerService, device_id: str) -> list[str]:
    return [
        e["kind"]
        for e in service.services.registry.events(device_id, limit=1000)
        if e["kind"] in ("online", "offline")
    ]


def test_killed_unit_shows_offline_within_one_and_a_half_keepalives_and_a_quick_reconnect_never(
    tmp_path: Path, seaweedfs: SeaweedServer, bucket: S3Storage, agents: list[AgentProcess]
) -> None:
    config = _controller(tmp_path, seaweedfs, bucket)
    with running_controller(config) as service:
        killed = _start(agents, enrol_unit(service, tmp_path, "room-kill"))
        assert wait_for(lambda: _online(service, "room-kill"), 15)
        killed.kill9()
        assert wait_for(lambda: not _online(service, "room-kill"), 1.5 * KEEPALIVE_S)

        # A unit whose network dies without a word: the broker's keepalive notices.
        frozen = _start(agents, enrol_unit(service, tmp_path, "room-frozen"))
        assert wait_for(lambda: _online(service, "room-frozen"), 15)
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        try:
            # Mosquitto counts the 1.5 keepalives in whole seconds from the unit's last
            # packet and checks them in its main loop, late on a loaded machine: this
            # bounds detection, it does not time it.
            assert wait_for(lambda: not _online(service, "room-frozen"), 3 * KEEPALIVE_S)
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: _online(service, "room-frozen"), 20)  # it comes back itself

        # With a will delay, a unit that is back before it ends is never shown offline.
        quick = _start(
            agents,
            enrol_unit(service, tmp_path, "room-quick", broker={"will_delay_s": 15}),
        )
        assert wait_for(lambda: _online(service, "room-quick"), 15)
        before = _presence_events(service, "room-quick")
        seen_offline = threading.Event()
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                if not _online(service, "room-quick"):
                    seen_offline.set()
                watching.wait(0.02)

        def health_at() -> Any:
            view = service.services.registry.get("room-quick")
            return None if view is None else view.health_at

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            quick.kill9()
            killed_at = utcnow()
            quick.start()
            # Back: the controller has health from the new connection.
            assert wait_for(lambda: (health_at() or killed_at) > killed_at, 20)
        finally:
            watching.set()
            watcher.join()
        assert not seen_offline.is_set()
        assert _presence_events(service, "room-quick") == before


# --- commands ------------------------------------------------------------------------------------


def test_expired_command_never_runs_and_a_command_sent_twice_runs_once(
    tmp_path: Path, seaweedfs: SeaweedServer, bucket: S3Storage, agents: list[AgentProcess]
) -> None:
    config = _controller(tmp_path, seaweedfs, bucket, sweep_interval_s=0.5)
    with running_controller(config) as service:
        token = admin_token(service)
        unit = enrol_unit(service, tmp_path, "room-cmd")
        # Offline: the command waits in the queue and expires there.
        status, body = api(
            service.base_url,
            token,
            "POST",
            "/devices/room-cmd/commands",
            {"action": "start_recording", "expires_in_s": 5},
        )
        assert status == 202 and body["status"] == "queued", body
        stale = body["id"]
        assert wait_for(lambda: _command_status(service, stale) == "expired", 15)
        _start(agents, unit)
        assert wait_for(lambda: _online(service, "room-cmd"), 15)
        service.mqtt.send_command(stale)  # a retry of an expired command is refused too

        # Online: one start delivered twice (as after a lost acknowledgement). The unit is
        # frozen meanwhile, so it cannot answer before the second copy is on its way.
        assert unit.proc is not None
        unit.proc.send_signal(signal.SIGSTOP)
        try:
            status, body = api(
                service.base_url,
                token,
                "POST",
                "/devices/room-cmd/commands",
                {"action": "start_recording", "expires_in_s": 30},
            )
            assert status == 202 and body["status"] == "sent", body
            start = body["id"]
            service.mqtt.send_command(start)
            assert service.mqtt.metrics()["commands_sent_total"] == 2
        finally:
            unit.proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: _command_status(service, start) == "done", 20)
        view = service.services.commands.get(start)
        assert view is not None and view.recording_id is not None
        recording_id = view.recording_id
        assert unit.status()["state"] == "recording"
        status, body = api(
            service.base_url,
            token,
            "POST",
            "/devices/room-cmd/commands",
            {"action": "stop_recording", "expires_in_s": 30},
        )
        assert status == 202, body
        assert wait_for(lambda: _command_status(service, body["id"]) == "done", 20)
        assert wait_for(lambda: unit.status()["state"] == "idle", 15)

        assert _command_status(service, stale) == "expired"
        recordings = service.services.catalogue.list(device_id="room-cmd")
        assert [r.id for r in recordings.items] == [recording_id]
        started_events = [
            e
            for e in service.services.registry.events("room-cmd", limit=1000)
            if e["kind"] == "recording_started"
        ]
        assert len(started_events) == 1
        assert service.mqtt.metrics()["commands_sent_total"] == 3  # never the expired one


# --- grants the store must refuse -----------------------------------------------------------------


def _raw_put(url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
    """A PUT with exactly these headers and this body, whatever they say about each other."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("PUT", f"{parts.path}?{parts.query}", skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(body)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def _announce(
    unit: MqttTestClient, device_id: str, recording_id: str, sequence: int, data: bytes
) -> SegmentAnnouncement:
    now = utcnow()
    announcement = SegmentAnnouncement(
        recording_id=recording_id,
        sequence=sequence,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        started_at=now - timedelta(seconds=10),
        ended_at=now,
    )
    unit.publish(topic(device_id, Channel.SEGMENT), announcement.to_json())
    return announcement


def _grant_for(unit: MqttTestClient, device_id: str, sequence: int, count: int = 1) -> UploadGrant:
    grants = unit.wait_for(
        lambda m: (
            m.topic == topic(device_id, Channel.GRANT)
            and decode(UploadGrant, m.payload).sequence == sequence
        ),
        count=count,
    )
    return decode(UploadGrant, grants[-1].payload)


def test_misused_grants_are_refused_by_the_store(
    tmp_path: Path,
    seaweedfs: SeaweedServer,
    bucket: S3Storage,
    mqtt_client: Callable[..., MqttTestClient],
) -> None:
    config = _controller(tmp_path, seaweedfs, bucket, grant_expires_s=4)
    with running_controller(config) as service:
        enrol_unit(service, tmp_path, "room-grant")
        password = (tmp_path / "units" / "room-grant" / "broker-password").read_text().strip()
        endpoint = Endpoint("127.0.0.1", config.broker.embedded.port)
        # The unit's own identity on the wire, as the ACL lets it speak.
        unit = mqtt_client(
            endpoint,
            topic("room-grant", Channel.GRANT),
            topic("room-grant", Channel.STORED),
            username="room-grant",
            password=password,
        )
        data_a = b"A" * 4096
        data_b = b"B" * 4096
        _announce(unit, "room-grant", "rec-g", 0, data_a)
        _announce(unit, "room-grant", "rec-g", 1, data_b)
        grant_a = _grant_for(unit, "room-grant", 0)
        grant_b = _grant_for(unit, "room-grant", 1)

        # A body that differs from the one the grant is bound to: same size, other bytes.
        status, text = _raw_put(grant_a.url, grant_a.headers, data_b)
        assert status == 400 and "BadDigest" in text, text
        # A body of another size (its length header adjusted): the signature covers it.
        longer = {**grant_a.headers, "content-length": str(len(data_a) + 1)}
        status, text = _raw_put(grant_a.url, longer, data_a + b"!")
        assert status == 403, text
        # The checksum header left out.
        partial = {"content-length": grant_a.headers["content-length"]}
        status, text = _raw_put(grant_a.url, partial, data_a)
        assert status == 403, text
        # A grant used for another key.
        path = urlsplit(grant_a.url).path
        other = grant_a.url.replace(path, path.replace("seg-00000.mp4", "seg-00009.mp4"), 1)
        status, text = _raw_put(other, grant_a.headers, data_a)
        assert status == 403 and "SignatureDoesNotMatch" in text, text
        # A grant used after it expired.
        time.sleep(max(0.0, (grant_b.expires_at - utcnow()).total_seconds()) + 1.5)
        status, text = _raw_put(grant_b.url, grant_b.headers, data_b)
        assert status == 403 and "expired" in text.lower(), text

        keys = list_keys(seaweedfs, bucket.bucket)
        assert not [k for k in keys if "/seg-" in k], keys
        for sequence, grant in ((0, grant_a), (1, grant_b)):
            result = UploadResult(
                recording_id="rec-g", sequence=sequence, key=grant.key, ok=False, http_status=403
            )
            unit.publish(topic("room-grant", Channel.UPLOAD), result.to_json())
        refusals = unit.wait_for(lambda m: m.topic == topic("room-grant", Channel.STORED), count=2)
        assert [decode(StoredConfirmation, m.payload).verified for m in refusals] == [False, False]

        # Asking again gets a fresh grant that works.
        _announce(unit, "room-grant", "rec-g", 0, data_a)
        fresh = _grant_for(unit, "room-grant", 0, count=2)
        assert fresh.url != grant_a.url
        status, text = _raw_put(fresh.url, fresh.headers, data_a)
        assert status == 200, text
        ok = UploadResult(recording_id="rec-g", sequence=0, key=fresh.key, ok=True, http_status=200)
        unit.publish(topic("room-grant", Channel.UPLOAD), ok.to_json())
        confirmations = unit.wait_for(
            lambda m: m.topic == topic("room-grant", Channel.STORED), count=3
        )
        last = decode(StoredConfirmation, confirmations[-1].payload)
        assert last.verified and last.sha256 == hashlib.sha256(data_a).hexdigest()


class FaultyGrants:
    """Real S3 storage whose first grants are bound to the wrong thing, so the store refuses
    every upload through them: a checksum of other content, or a URL already expired while
    the grant claims otherwise."""

    def __init__(self, real: S3Storage, faults: list[str]) -> None:
        self.real = real
        self._faults = deque(faults)
        self._lock = threading.Lock()
        self.used: list[str] = []

    def remaining(self) -> int:
        with self._lock:
            return len(self._faults)

    def key_for(self, device_id: str, recording_id: str, filename: str) -> str:
        return self.real.key_for(device_id, recording_id, filename)

    def presign_put(self, key: str, size: int, sha256_hex: str, expires_s: int) -> PresignedPut:
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            if fault is not None:
                self.used.append(fault)
        if fault == "other-content":
            return self.real.presign_put(key, size, hashlib.sha256(b"other").hexdigest(), expires_s)
        if fault == "expired":
            presigned = self.real.presign_put(key, size, sha256_hex, 1)
            time.sleep(2)
            return PresignedPut(
                presigned.url, presigned.headers, utcnow() + timedelta(seconds=expires_s)
            )
        return self.real.presign_put(key, size, sha256_hex, expires_s)

    def verify(self, key: str, size: int, sha256_hex: str) -> Verification:
        return self.real.verify(key, size, sha256_hex)

    def presign_get(self, key: str, expires_s: int) -> str:
        return self.real.presign_get(key, expires_s)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.real.put_bytes(key, data, content_type)


def test_unit_given_grants_the_store_refuses_asks_again_and_deletes_nothing(
    tmp_path: Path, seaweedfs: SeaweedServer, bucket: S3Storage, agents: list[AgentProcess]
) -> None:
    faults = ["other-content", "expired"] * 3
    storage = FaultyGrants(bucket, faults)
    config = _controller(tmp_path, seaweedfs, bucket)
    with running_controller(config, storage=storage) as service:
        unit = _start(agents, enrol_unit(service, tmp_path, "room-faulty", segment_seconds=4))
        assert wait_for(lambda: _online(service, "room-faulty"), 15)
        unit.press("short")
        assert wait_for(lambda: unit.status()["state"] == "recording", 10)
        recording_id = str(unit.status()["recording_id"])
        time.sleep(9)
        unit.press("short")
        assert wait_for(lambda: unit.status()["state"] == "idle", 15)

        # Every bad grant was tried and refused; no segment was given up meanwhile.
        assert wait_for(lambda: storage.remaining() == 0, 60), unit.log_tail()
        rows = _journal_rows(unit, recording_id)
        assert len(rows) >= 2
        assert wait_for(lambda: _all_stored(unit, recording_id), 90), unit.log_tail()
        assert wait_for(lambda: not _spool_segments(unit), 20)
        _check_recording_stored_once(service, seaweedfs, bucket, unit, recording_id)
        log = unit.log_path.read_text(errors="replace")
        assert "BadDigest" in log or "SignatureDoesNotMatch" in log, unit.log_tail()
        assert "expired" in log.lower()
        assert "segment discarded" not in log
        assert service.mqtt.metrics()["segments_refused_total"] >= 1


# --- storage down during a lesson -----------------------------------------------------------------


def test_storage_down_during_a_lesson_loses_nothing_and_stores_everything_once(
    tmp_path: Path, seaweedfs_private: SeaweedServer, agents: list[AgentProcess]
) -> None:
    private_bucket = make_storage(seaweedfs_private, bucket=new_bucket_name())
    config = _controller(tmp_path, seaweedfs_private, private_bucket)
    with running_controller(config) as service:
        unit = _start(agents, enrol_unit(service, tmp_path, "room-outage", segment_seconds=4))
        assert wait_for(lambda: _online(service, "room-outage"), 15)
        unit.press("short")
        assert wait_for(lambda: unit.status()["state"] == "recording", 10)
        recording_id = str(unit.status()["recording_id"])

        def stored_count() -> int:
            return sum(r.state is SegmentState.STORED for r in _journal_rows(unit, recording_id))

        assert wait_for(lambda: stored_count() >= 1, 30), unit.log_tail()
        seaweedfs_private.stop()
        down_at = stored_count()
        # The lesson goes on: segments close, uploads fail, the unit keeps every one.
        assert wait_for(lambda: len(_spool_segments(unit)) >= 3, 60), unit.log_tail()
        assert stored_count() == down_at
        kept = {p.name for p in _spool_segments(unit)}
        assert wait_for(lambda: service.mqtt.metrics()["segments_refused_total"] >= 1, 30), (
            unit.log_tail()
        )
        assert {p.name for p in _spool_segments(unit)} >= kept

        seaweedfs_private.start()
        unit.press("short")
        assert wait_for(lambda: unit.status()["state"] == "idle", 15)
        assert wait_for(lambda: _all_stored(unit, recording_id), 120), unit.log_tail()
        assert wait_for(lambda: not _spool_segments(unit), 20)
        count = _check_recording_stored_once(
            service, seaweedfs_private, private_bucket, unit, recording_id
        )
        assert count >= down_at + 3
    remove_bucket(seaweedfs_private, private_bucket.bucket)


# --- the service process under systemd's protocol -----------------------------------------------


class NotifySocket:
    """What systemd listens on for a Type=notify service: a datagram socket in NOTIFY_SOCKET,
    drained as it arrives (systemd's queue holds only a few datagrams)."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="cc-"))  # socket paths max 108 bytes
        self.path = self.directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.5)
        self._received: list[str] = []
        self._read = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self._received.append(message)
                self._cond.notify_all()

    def until(self, wanted: str, timeout: float = 60) -> list[str]:
        """Messages not yet returned, up to and including one containing ``wanted``."""

        def found() -> int | None:
            for index in range(self._read, len(self._received)):
                if wanted in self._received[index]:
                    return index
            return None

        with self._cond:
            assert self._cond.wait_for(lambda: found() is not None, timeout), wanted
            end = found()
            assert end is not None
            got = self._received[self._read : end + 1]
            self._read = end + 1
        return got

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def test_controller_process_notifies_systemd_enrols_units_live_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    document = controller_document(tmp_path)
    config = write_controller_config(tmp_path / "controller.toml", document)
    notify = NotifySocket()
    process = ControllerProcess(tmp_path / "controller.toml", tmp_path / "controller.log")
    try:
        process.start(
            config.server.port,
            env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"},
        )
        assert "READY=1" in notify.until("READY=1")[-1]
        notify.until("WATCHDOG=1")
        url = config.server.base_url()
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert response.status == 200

        # Enrolled from another process while the service runs: it can connect at once.
        added = subprocess.run(
            [
                sys.executable,
                "-m",
                "shared.cli",
                "controller",
                "device",
                "add",
                "room-live",
                "--school",
                "S",
                "--room",
                "1",
                "--config",
                str(process.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert added.returncode == 0, added.stderr
        password = (config.data_dir / "units" / "room-live" / "broker-password").read_text()
        endpoint = Endpoint("127.0.0.1", config.broker.embedded.port)

        def unit_connects() -> bool:
            client = MqttTestClient(endpoint, username="room-live", password=password.strip())
            try:
                return not client.connect().is_failure
            finally:
                client.stop()

        assert wait_for(unit_connects, 15), process.log()

        assert process.proc is not None
        process.proc.send_signal(signal.SIGHUP)  # `systemctl reload`: the broker re-reads users
        assert wait_for(unit_connects, 15)
        assert process.stop() == 0, process.log()
        assert "STOPPING=1" in "".join(notify.until("STOPPING=1"))
        assert not port_open(config.broker.embedded.port)
        assert not port_open(config.server.port)
        assert "controller stopped" in process.log()
    finally:
        process.stop()
        notify.close()
