"""A real controller for tests: config on free loopback ports, run in-process or as
``classcap controller run``, units enrolled through ``device add``'s code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.config import ControllerConfig, load_controller_config
from controller.provision import TomlValue, add_unit, toml_text
from controller.service import ControllerService
from controller.storage.base import Storage
from controller.web.auth import Role, create_token
from tests.support.agent_proc import AgentProcess
from tests.support.processes import free_port, port_open, stop_process, wait_for
from tests.support.seaweed_server import SeaweedServer


@dataclass(frozen=True)
class Endpoint:
    """Where an MqttTestClient connects when the broker is the controller's own."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def controller_document(
    tmp_path: Path,
    *,
    seaweed: SeaweedServer | None = None,
    bucket: str | None = None,
    grant_expires_s: int = 900,
    sweep_interval_s: float = 1.0,
    offline_after_s: float = 300,
) -> dict[str, TomlValue]:
    """A controller config: embedded broker, SQLite, and local or (with ``seaweed``) S3 storage."""
    web_port = free_port()
    storage: dict[str, TomlValue] = {"grant_expires_s": grant_expires_s}
    if seaweed is not None:
        assert bucket is not None
        storage.update(
            backend="s3",
            endpoint_url=seaweed.endpoint_url,
            region=seaweed.region,
            bucket=bucket,
            access_key=seaweed.access_key,
            secret_key=seaweed.secret_key,
        )
    return {
        "data_dir": tmp_path / "controller",
        "server": {"host": "127.0.0.1", "port": web_port, "threads": 4},
        "broker": {
            "client_id": f"classcap-controller-{os.getpid()}",
            "embedded": {"host": "127.0.0.1", "port": free_port()},
        },
        "storage": storage,
        "alerts": {"sweep_interval_s": sweep_interval_s, "offline_after_s": offline_after_s},
    }


def write_controller_config(path: Path, document: Mapping[str, TomlValue]) -> ControllerConfig:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(document))
    return load_controller_config(path)


@contextmanager
def running_controller(
    config: ControllerConfig, storage: Storage | None = None
) -> Iterator[ControllerService]:
    service = ControllerService(config, storage=storage)
    service.start()
    try:
        assert service.mqtt.wait_connected(15), "controller did not connect to its broker"
        yield service
    finally:
        service.stop()


def unit_settings(data_dir: Path, *, segment_seconds: int = 10, **sections: Any) -> dict[str, Any]:
    """agent.toml keys of a simulated unit (synthetic camera, mock GPIO, fast retries)."""
    settings: dict[str, Any] = {
        "data_dir": data_dir,
        "broker": {
            "keepalive_s": 5,
            "will_delay_s": 0,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 2.0,
        },
        "capture": {
            "backend": "synthetic",
            "width": 320,
            "height": 240,
            "framerate": 10,
            "bitrate_kbps": 300,
            "segment_seconds": segment_seconds,
        },
        "gpio": {"mock": True, "double_press_s": 0.3},
        "spool": {"min_free_mb": 0},
        "upload": {
            "retry_initial_s": 0.5,
            "retry_max_s": 4.0,
            "grant_timeout_s": 3.0,
            "spread_s": 0,
        },
        "health": {"interval_s": 2},
        "system": {"reboot_command": [], "control_socket": data_dir / "agent.sock"},
    }
    for name, values in sections.items():
        settings[name] = {**settings.get(name, {}), **values}
    return settings


def enrol_unit(
    service: ControllerService,
    tmp_path: Path,
    device_id: str,
    *,
    school: str = "Test School",
    room: str | None = None,
    segment_seconds: int = 10,
    **sections: Any,
) -> AgentProcess:
    """Enrols a unit as ``classcap controller device add`` does; returns its (unstarted) agent."""
    out_dir = tmp_path / "units"
    data_dir = out_dir / device_id / "data"
    bundle = add_unit(
        service.config,
        service.services.registry,
        device_id,
        school=school,
        room=room or device_id,
        out_dir=out_dir,
        reload_broker=service.reload_broker,
        unit_config_dir=out_dir / device_id,
        agent_settings=unit_settings(data_dir, segment_seconds=segment_seconds, **sections),
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    return AgentProcess(device_id, data_dir, bundle.agent_config, out_dir / device_id / "agent.log")


def admin_token(service: ControllerService) -> str:
    return create_token(service.services.db, "tests", Role.ADMIN)


def api(
    service_url: str,
    token: str,
    method: str,
    path: str,
    body: Mapping[str, Any] | None = None,
) -> tuple[int, Any]:
    """A REST API call with a bearer token; returns (status, decoded JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{service_url}/api/v1{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@dataclass
class ControllerProcess:
    """``classcap controller run --config ...`` as a child process, stopped by its PID."""

    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(
        self, port: int, *, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> None:
        """Starts it and returns once its web server accepts connections on ``port``."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shared.cli",
                    "controller",
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        proc = self.proc
        assert wait_for(lambda: proc.poll() is not None or port_open(port), timeout), self.log()
        assert proc.poll() is None, self.log()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        # Each part of the controller may take its own bounded time to stop on a loaded machine.
        stop_process(self.proc, timeout=60)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
