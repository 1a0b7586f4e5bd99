"""The simulated fleet's processes: the controller (``classcap controller run``, its broker
inside) and the units (``classcap agent run`` with a synthetic camera and mock GPIO).

Units are enrolled before the controller starts, through the code path of
``classcap controller device add``; each gets its bundle (``agent.toml`` and broker
password) under ``units/<device_id>/``, where its data, socket and log live too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.config import ControllerConfig, load_controller_config
from controller.provision import TomlValue, toml_text
from controller.sim import procs
from controller.sim.scenario import FleetSpec
from device.button import PressKind
from device.control_socket import ControlError, query_status, send_clock, send_press

log = logging.getLogger(__name__)

_CONTROLLER_START_S = 120.0
_CONTROLLER_STOP_S = 60.0
_AGENT_START_S = 60.0
_AGENT_STOP_S = 30.0
# A Unix socket path must fit in sun_path (108 bytes with its terminator).
_MAX_SOCKET_PATH = 100


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", *args]


@dataclass
class ControllerProcess:
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> ControllerConfig:
        return load_controller_config(self.config_path)

    @property
    def base_url(self) -> str:
        return self.config.server.base_url()

    def start(self) -> None:
        """Starts it and returns once its web server answers; RuntimeError if it cannot."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = procs.spawn(
            _python("controller", "run", "--config", str(self.config_path)), self.log_path, env=env
        )
        proc = self.proc
        if not procs.wait_for(
            lambda: proc.poll() is not None or self._answers(), _CONTROLLER_START_S
        ):
            raise RuntimeError(f"controller not serving after {_CONTROLLER_START_S:.0f} s")
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited with {proc.returncode}; see {self.log_path}")
        log.info("controller running pid=%d url=%s", proc.pid, self.base_url)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        brokers = procs.children(proc.pid, "mosquitto")
        rc = procs.stop(proc, _CONTROLLER_STOP_S)
        # Its broker runs in a session of its own: a controller that had to be killed
        # leaves it behind. Only a process still running this broker's config is ours.
        marker = str(self.config.broker.embedded.directory / "mosquitto.conf")
        for pid in brokers:
            if procs.runs(pid, marker):
                log.warning("broker outlived its controller, killing pid=%d", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        log.info("controller stopped rc=%s", rc)

    def broker_pid(self) -> int | None:
        if self.proc is None:
            return None
        found = procs.children(self.proc.pid, "mosquitto")
        return found[0] if found else None

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=2) as response:  # noqa: S310
                return bool(response.status == 200)
        except OSError:
            return False


@dataclass
class Unit:
    device_id: str
    room: str
    directory: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.directory / "agent.toml"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def socket(self) -> Path:
        return self.directory / "agent.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "agent.log"

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.sqlite3"

    def start(self, *, wait_connected: bool = True) -> None:
        """Starts the agent and waits for its control socket (and broker connection)."""
        self.launch()
        self.wait_ready(wait_connected=wait_connected)

    def launch(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = procs.spawn(
            _python("agent", "run", "--config", str(self.config_path)), self.log_path, env=env
        )

    def wait_ready(self, *, wait_connected: bool = True) -> None:
        """RuntimeError when the agent exits or does not answer in time."""
        proc = self.proc
        if proc is None:
            raise RuntimeError(f"unit {self.device_id} was not started")

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            state = self.status()
            return state is not None and (state["subscribed"] is True or not wait_connected)

        if not procs.wait_for(ready, _AGENT_START_S) or proc.poll() is not None:
            raise RuntimeError(f"unit {self.device_id} did not start; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM: the agent ends a recording in progress and stops in order."""
        proc, self.proc = self.proc, None
        if proc is not None:
            procs.stop(proc, _AGENT_STOP_S)

    def kill(self) -> None:
        """SIGKILL to the agent and its encoder at once, as a power cut would."""
        proc, self.proc = self.proc, None
        if proc is not None:
            procs.kill_group(proc)

    def status(self) -> dict[str, object] | None:
        try:
            return query_status(self.socket, timeout=5)
        except ControlError:
            return None

    def press(self, kind: str) -> None:
        """Raises ControlError when the agent cannot be reached."""
        send_press(self.socket, PressKind(kind), timeout=10)

    def set_clock(self, offset_s: float, synced: bool) -> None:
        """Sets the agent's simulated wall clock; raises ControlError when it cannot."""
        send_clock(self.socket, offset_s, synced, timeout=10)

    def agent_settings(self) -> dict[str, Any]:
        with self.config_path.open("rb") as handle:
            return tomllib.load(handle)

    def write_settings(self, document: Mapping[str, TomlValue]) -> None:
        self.config_path.write_text(toml_text(document))


def stop_all(units: list[Unit]) -> None:
    """SIGTERM to every agent at once, then each waited for (and killed if it must be)."""
    running = [u for u in units if u.proc is not None and u.proc.poll() is None]
    for unit in running:
        assert unit.proc is not None
        unit.proc.terminate()
    for unit in units:
        unit.stop()


def unit_settings(unit_dir: Path, fleet: FleetSpec) -> dict[str, TomlValue]:
    """agent.toml keys of a simulated unit: cheap capture, mock pins, a clock the simulator
    can set, quick retries."""
    if len(str(unit_dir / "agent.sock")) > _MAX_SOCKET_PATH:
        raise ValueError(f"{unit_dir} is too long a path for a control socket; use a shorter --dir")
    return {
        "data_dir": unit_dir / "data",
        "broker": {
            "keepalive_s": 5,
            "will_delay_s": 0,
            "reconnect_min_s": 0.5,
            "reconnect_max_s": 3.0,
        },
        "capture": {
            "backend": "synthetic",
            "width": fleet.width,
            "height": fleet.height,
            "framerate": fleet.framerate,
            "bitrate_kbps": fleet.bitrate_kbps,
            "segment_seconds": fleet.segment_seconds,
            "audio": fleet.audio,
        },
        "gpio": {"mock": True, "double_press_s": 0.3},
        "spool": {"min_free_mb": 0},
        "upload": {
            "retry_initial_s": 1.0,
            "retry_max_s": 5.0,
            "grant_timeout_s": 5.0,
            "request_timeout_s": fleet.upload_timeout_s,
            "spread_s": 0,
        },
        "health": {"interval_s": fleet.health_interval_s},
        "system": {
            "reboot_command": [],
            "control_socket": unit_dir / "agent.sock",
            "simulated_clock": True,
        },
    }
