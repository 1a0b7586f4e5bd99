"""``make demo``: a broker and three simulated units on this machine, until Ctrl-C."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from controller.broker import (
    CONTROLLER_USER,
    BrokerSettings,
    MosquittoSupervisor,
    set_password,
)

log = logging.getLogger("classcap.demo")

UNITS = ("demo-room-101", "demo-room-102", "demo-room-103")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unit_config(device_id: str, unit_dir: Path, broker_url: str, password_file: Path) -> str:
    return f"""device_id = "{device_id}"
data_dir = "{unit_dir}"

[broker]
url = "{broker_url}"
username = "{device_id}"
password_file = "{password_file}"
will_delay_s = 5

[capture]
backend = "synthetic"
width = 320
height = 240
framerate = 10
bitrate_kbps = 300

[gpio]
mock = true

[spool]
min_free_mb = 256

[upload]
spread_s = 10

[health]
interval_s = 10

[system]
reboot_command = []
control_socket = "{unit_dir / "agent.sock"}"
"""


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    root = Path(os.environ.get("CLASSCAP_DEMO_DIR", "var/demo")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    broker = MosquittoSupervisor(BrokerSettings(directory=root / "broker", port=_free_port()))
    broker.write_config()
    passwords = root / "broker" / "passwords"
    controller_secret = secrets.token_urlsafe(16)
    set_password(passwords, CONTROLLER_USER, controller_secret)
    controller_password = root / "broker" / "controller-password"
    controller_password.write_text(controller_secret + "\n")
    controller_password.chmod(0o600)

    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    broker.start()
    try:
        for device_id in UNITS:
            unit_dir = root / device_id
            unit_dir.mkdir(exist_ok=True)
            secret = secrets.token_urlsafe(16)
            set_password(passwords, device_id, secret)
            (unit_dir / "broker-password").write_text(secret + "\n")
            config = unit_dir / "agent.toml"
            config.write_text(
                _unit_config(device_id, unit_dir, broker.url, unit_dir / "broker-password")
            )
            log_file = (unit_dir / "agent.log").open("ab")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "shared.cli", "agent", "run", "--config", str(config)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
            log_file.close()
        broker.reload()
        classcap = Path(sys.executable).with_name("classcap")
        lines = [
            "",
            f"classcap demo running: broker {broker.url}, units {', '.join(UNITS)}",
            f"  watch:   mosquitto_sub -h 127.0.0.1 -p {broker.settings.port} -V mqttv5 "
            f"-u {CONTROLLER_USER} -P \"$(cat {controller_password})\" -v -t 'classcap/v1/#'",
        ]
        for device_id in UNITS:
            config = root / device_id / "agent.toml"
            lines.append(f"  {device_id}: {classcap} agent press short --config {config}")
            lines.append(f"  {' ' * len(device_id)}  {classcap} agent status --config {config}")
        lines.append("Ctrl-C stops everything.")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        while not stop.wait(1.0):
            for proc in procs:
                if proc.poll() is not None:
                    log.error("a unit exited with %s; see its agent.log", proc.returncode)
                    stop.set()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
