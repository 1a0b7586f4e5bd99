"""Run a real agent process (`classcap agent run`) as a simulated unit for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.control_socket import ControlError, query_status
from device.journal import Journal
from tests.support.processes import stop_process, wait_for


def agent_config_text(
    device_id: str,
    data_dir: Path,
    broker_url: str,
    *,
    segment_seconds: int = 10,
    min_free_mb: int = 0,
    extra: str = "",
) -> str:
    return f"""
device_id = "{device_id}"
data_dir = "{data_dir}"

[broker]
url = "{broker_url}"
keepalive_s = 5
will_delay_s = 0
reconnect_min_s = 0.2
reconnect_max_s = 2.0

[capture]
backend = "synthetic"
width = 320
height = 240
framerate = 10
bitrate_kbps = 300
segment_seconds = {segment_seconds}

[gpio]
mock = true
double_press_s = 0.3

[spool]
min_free_mb = {min_free_mb}

[upload]
retry_initial_s = 0.5
retry_max_s = 4.0
grant_timeout_s = 3.0
spread_s = 0

[health]
interval_s = 2

[system]
reboot_command = []
control_socket = "{data_dir / "agent.sock"}"
{extra}
"""


@dataclass
class AgentProcess:
    device_id: str
    data_dir: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.data_dir / "agent.sock"

    def start(self, *, wait_connected: bool = True) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "agent", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # A group of its own, so that a power cut can take its encoder down with it.
            start_new_session=True,
        )
        assert wait_for(lambda: self._status() is not None, 20), self.log_tail()
        if wait_connected:
            # A unit's first session only exists once the broker has its subscriptions;
            # anything sent to it before that is not for it.
            assert wait_for(lambda: self.status()["subscribed"] is True, 20), self.log_tail()

    def _status(self) -> dict[str, object] | None:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"agent exited early\n{self.log_tail()}")
        try:
            return query_status(self.socket, timeout=2)
        except ControlError:
            return None

    def status(self) -> dict[str, object]:
        state = self._status()
        assert state is not None
        return state

    def press(self, kind: str) -> None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "shared.cli",
                "agent",
                "press",
                kind,
                "--config",
                str(self.config_path),
            ],
            check=True,
            timeout=20,
        )

    def kill9(self) -> None:
        """A power cut: SIGKILL to the agent and its encoder at once (an orphaned encoder
        would go on writing into the spool)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_log()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, timeout=30)
        self._close_log()
        return self.proc.returncode

    def journal(self) -> Journal:
        return Journal(self.data_dir / "journal.sqlite3", self.device_id)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def make_agent(tmp_path: Path, device_id: str, broker_url: str, **config: Any) -> AgentProcess:
    data_dir = tmp_path / device_id
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "agent.toml"
    config_path.write_text(agent_config_text(device_id, data_dir, broker_url, **config))
    return AgentProcess(device_id, data_dir, config_path, data_dir / "agent.log")
