"""``make demo``: the fleet controller and three simulated units on this machine, until Ctrl-C.

The controller runs as in production (embedded Mosquitto, MQTT service, dashboard
and API under waitress, SQLite, local-directory storage); the units are enrolled
through the same code as ``classcap controller device add`` and run as real
``classcap agent run`` processes with a synthetic camera and mock GPIO pins.
Everything lives in ``var/demo`` (``CLASSCAP_DEMO_DIR``), made afresh at each start.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from datetime import time, timedelta
from pathlib import Path
from types import FrameType

from controller.config import ControllerConfig, load_controller_config
from controller.provision import TomlValue, add_unit, toml_text
from controller.schedule_service import ScheduleService
from controller.schedules import ScheduleStore
from controller.service import ControllerService
from controller.web.auth import Role, create_token, create_user
from shared.clock import utcnow
from shared.schedule import (
    BellSchedule,
    CapturePlan,
    DayType,
    Period,
    Room,
    School,
    SchoolCalendar,
)

log = logging.getLogger("classcap.demo")

UNITS = (
    ("demo-room-101", "Demo Primary", "Room 101"),
    ("demo-room-102", "Demo Primary", "Room 102"),
    ("demo-room-103", "Demo Secondary", "Lab 3"),
)
# The demo's lessons: short periods soon after start, so scheduled captures show at once.
DEMO_TIMEZONE = "UTC"
DEMO_PERIODS = 8
PERIOD_EVERY_S = 600
PERIOD_LENGTH_S = 180
FIRST_PERIOD_IN_S = 120
ADMIN = "admin"
MARKER = ".classcap-demo"
_AGENT_STOP_S = 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fresh(root: Path) -> None:
    """Empties the demo directory; refuses one that an earlier demo did not make."""
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            raise SystemExit(
                f"{root} exists and was not made by the demo; remove it or set CLASSCAP_DEMO_DIR"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()


def _controller_config(root: Path) -> ControllerConfig:
    document: dict[str, TomlValue] = {
        "data_dir": root / "controller",
        "server": {"host": "127.0.0.1", "port": _free_port()},
        "broker": {"embedded": {"host": "127.0.0.1", "port": _free_port()}},
        "alerts": {"offline_after_s": 60, "sweep_interval_s": 5},
    }
    path = root / "controller.toml"
    path.write_text(toml_text(document))
    return load_controller_config(path)


def _unit_settings(unit_dir: Path) -> dict[str, TomlValue]:
    return {
        "data_dir": unit_dir / "data",
        "broker": {"will_delay_s": 5},
        "capture": {
            "backend": "synthetic",
            "width": 320,
            "height": 240,
            "framerate": 10,
            "bitrate_kbps": 300,
            "segment_seconds": 20,
        },
        "gpio": {"mock": True},
        "spool": {"min_free_mb": 256},
        "upload": {"spread_s": 10},
        "health": {"interval_s": 10},
        "system": {"reboot_command": [], "control_socket": unit_dir / "agent.sock"},
    }


def _bell_schedule() -> BellSchedule:
    """Periods from two minutes after now, three minutes long, every ten minutes (UTC)."""
    start = utcnow().replace(microsecond=0) + timedelta(seconds=FIRST_PERIOD_IN_S)
    periods = []
    for n in range(DEMO_PERIODS):
        begins = start + timedelta(seconds=n * PERIOD_EVERY_S)
        ends = begins + timedelta(seconds=PERIOD_LENGTH_S)
        if ends.date() != start.date():
            break
        periods.append(Period(name=f"Period {n + 1}", start=begins.time(), end=ends.time()))
    if not periods:
        # Just before midnight: tomorrow's first periods instead.
        periods = [Period(name="Period 1", start=time(0, 5), end=time(0, 8))]
    return BellSchedule(name="Demo day", periods=periods)


def _seed_schedules(store: ScheduleStore, schedules: ScheduleService) -> None:
    """Both demo schools on one bell schedule; Room 101 records every period, Room 102
    every other one, Lab 3 only when someone presses its button."""
    today = utcnow().date()
    bells = _bell_schedule()
    periods = [p.name for p in bells.periods]
    for school_name in sorted({school for _id, school, _room in UNITS}):
        school = store.create_school(
            School(
                name=school_name,
                timezone=DEMO_TIMEZONE,
                bell_schedules=[bells],
                day_types=[DayType(name="Regular", bell_schedule=bells.name)],
                calendar=SchoolCalendar(
                    first_day=today,
                    last_day=today + timedelta(days=90),
                    weekdays=[1, 2, 3, 4, 5, 6, 7],
                    default_day_type="Regular",
                ),
                rooms=[
                    Room(name=room, device_id=device_id)
                    for device_id, school, room in UNITS
                    if school == school_name
                ],
            )
        )
        if school_name == "Demo Primary":
            for room, chosen in (("Room 101", periods), ("Room 102", periods[1::2] or periods)):
                store.create_plan(
                    school.id,
                    CapturePlan(
                        name=f"{room} lessons",
                        school=school_name,
                        rooms=[room],
                        periods=chosen,
                        first_day=today,
                        last_day=today + timedelta(days=90),
                        pre_roll_s=10,
                        post_roll_s=10,
                        teacher="Demo Teacher",
                    ),
                    created_by="demo",
                )
    result = schedules.refresh()
    log.info("demo schedules seeded windows=%d pushed=%d", result.windows, len(result.pushed))


def _start_agent(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "agent", "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def _stop_agents(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(_AGENT_STOP_S)
        except subprocess.TimeoutExpired:
            log.error("unit did not stop, killing pid=%d", proc.pid)
            proc.kill()
            proc.wait(_AGENT_STOP_S)


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    root = Path(os.environ.get("CLASSCAP_DEMO_DIR", "var/demo")).resolve()
    _fresh(root)
    config = _controller_config(root)
    service = ControllerService(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s received, stopping the demo", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        service.start()
        services = service.services
        admin_password = secrets.token_urlsafe(12)
        create_user(services.db, ADMIN, admin_password, Role.ADMIN)
        token = create_token(services.db, "demo", Role.ADMIN)
        units_dir = root / "units"
        for device_id, school, room in UNITS:
            unit_dir = units_dir / device_id
            bundle = add_unit(
                config,
                services.registry,
                device_id,
                school=school,
                room=room,
                out_dir=units_dir,
                reload_broker=service.reload_broker,
                unit_config_dir=unit_dir,
                agent_settings=_unit_settings(unit_dir),
            )
            procs.append(_start_agent(bundle.agent_config, unit_dir / "agent.log"))
        assert services.schedule_store is not None and services.schedules is not None
        _seed_schedules(services.schedule_store, services.schedules)
        classcap = Path(sys.executable).with_name("classcap")
        lines = [
            "",
            "classcap demo running",
            f"  dashboard:  {service.base_url}/",
            f"  log in as:  {ADMIN} / {admin_password}",
            f"  API token:  {token}",
            f'    e.g. curl -H "Authorization: Bearer {token}" {service.base_url}/api/v1/devices',
            f"  broker:     {config.broker.connect_url} (embedded)",
            f"  storage:    {config.storage.local_dir}",
            f"  schedules:  {service.base_url}/schedules (Room 101 and Room 102 record on a "
            "demo bell schedule: a 3-minute period every 10 minutes)",
        ]
        for device_id, _school, _room in UNITS:
            agent_config = units_dir / device_id / "agent.toml"
            lines.append(f"  {device_id}: {classcap} agent press short --config {agent_config}")
        lines.append("Ctrl-C stops everything.")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        while not stop.wait(1.0):
            for proc in procs:
                if proc.poll() is not None:
                    log.error("a unit exited with %s; see its agent.log", proc.returncode)
                    stop.set()
    finally:
        _stop_agents(procs)
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
