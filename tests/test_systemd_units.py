"""Unit files pass ``systemd-analyze verify``; the Supervisor speaks sd_notify to a real socket."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.supervision import Supervisor
from tests.support.processes import wait_for

REPO = Path(__file__).resolve().parents[1]
UNITS = sorted((REPO / "systemd").glob("*.service"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
# Exec lines may start with the prefixes systemd.service(5) allows (-, @, :, +, !, !!).
_EXEC = re.compile(r"^(Exec\w+=)([-@:+!]*)(\S+)(.*)$", re.MULTILINE)


def test_every_service_file_is_found() -> None:
    assert REPO / "systemd" / "classcap-agent.service" in UNITS


def _with_existing_binaries(text: str) -> str:
    """The real binaries live in /opt/classcap on a unit; verify needs existing ones."""
    true = shutil.which("true")
    assert true is not None
    return _EXEC.sub(lambda m: f"{m[1]}{m[2]}{true}{m[4]}", text)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_file_verifies(unit: Path, tmp_path: Path) -> None:
    copy = tmp_path / unit.name
    copy.write_text(_with_existing_binaries(unit.read_text()))
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # Unknown keys and bad values are only warnings; any line about our unit fails.
    ours = [line for line in output.splitlines() if unit.name in line or str(tmp_path) in line]
    assert ours == [], output


def test_agent_unit_essentials() -> None:
    text = (REPO / "systemd" / "classcap-agent.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["WatchdogSec"] == "30"
    assert settings["Restart"] == "always"
    assert settings["KillMode"] == "mixed"
    assert settings["ExecStart"] == (
        "/opt/classcap/venv/bin/classcap agent run --config /etc/classcap/agent.toml"
    )
    assert settings["RuntimeDirectory"] == "classcap"  # /run/classcap/agent.sock
    assert "PrivateDevices" not in settings  # the camera and GPIO live in /dev


# --- Supervisor against a real notify socket ------------------------------------------------


class NotifySocket:
    """What systemd listens on: a Unix datagram socket named by NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(10)

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        messages = []
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(10)
        return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cc-"))  # short: Unix socket paths max 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Health:
    def __init__(self) -> None:
        self.ok = True
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        with self._lock:
            self.calls += 1
            return self.ok


def test_supervisor_notifies_and_feeds_watchdog_only_while_healthy(
    notify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = str(notify_dir / "notify")
    listener = NotifySocket(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # pings every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    health = Health()
    sup = Supervisor(health)
    try:
        assert sup.watchdog_interval_s == pytest.approx(0.05)
        sup.ready()
        assert listener.recv() == "READY=1"
        sup.status("recording lesson 3\nsegment 7")
        assert listener.recv() == "STATUS=recording lesson 3 segment 7"
        sup.start()
        assert listener.recv() == "WATCHDOG=1"
        assert listener.recv() == "WATCHDOG=1"

        health.ok = False
        flipped_at = health.calls
        # Once the next check has begun, every ping from a healthy check has been sent.
        assert wait_for(lambda: health.calls >= flipped_at + 2, timeout=10)
        listener.drain()
        checked = health.calls
        assert wait_for(lambda: health.calls >= checked + 4, timeout=10)
        assert listener.drain() == []  # three unhealthy checks, no ping

        health.ok = True
        assert listener.recv() == "WATCHDOG=1"
        sup.stopping()
        messages = [listener.recv()]
        while messages[-1] != "STOPPING=1":
            messages.append(listener.recv())
        assert set(messages) <= {"WATCHDOG=1", "STOPPING=1"}
    finally:
        sup.stop()
        listener.close()
    assert all(t.name != "systemd-watchdog" for t in threading.enumerate())


def test_supervisor_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"classcap-test-{os.getpid()}-{threading.get_ident()}"
    listener = NotifySocket("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    sup = Supervisor(lambda: True)
    try:
        sup.ready()
        assert listener.recv() == "READY=1"
    finally:
        sup.stop()
        listener.close()


def test_supervisor_health_check_that_raises_withholds_pings(
    notify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = str(notify_dir / "notify")
    listener = NotifySocket(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    calls: list[int] = []

    def broken() -> bool:
        calls.append(1)
        raise RuntimeError("main loop state unreadable")

    sup = Supervisor(broken)
    try:
        sup.start()
        assert wait_for(lambda: len(calls) >= 3, timeout=10)
        assert listener.drain() == []
    finally:
        sup.stop()
        listener.close()


def test_supervisor_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    sup = Supervisor(lambda: True)
    sup.ready()
    sup.status("idle")
    sup.start()
    assert sup.watchdog_interval_s is None
    assert all(t.name != "systemd-watchdog" for t in threading.enumerate())
    sup.stopping()
    sup.stop()


def test_supervisor_ignores_watchdog_meant_for_another_process(
    notify_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = str(notify_dir / "notify")
    listener = NotifySocket(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    sup = Supervisor(lambda: True)
    try:
        sup.start()
        assert sup.watchdog_interval_s is None
        sup.ready()  # readiness still goes out: only the watchdog belongs to the other PID
        assert listener.recv() == "READY=1"
    finally:
        sup.stop()
        listener.close()


def test_supervisor_notify_socket_gone_is_logged_not_raised(
    notify_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_dir / "missing"))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    sup = Supervisor(lambda: True)
    sup.ready()
    sup.stop()
    assert "systemd notify failed message=READY=1" in caplog.text
