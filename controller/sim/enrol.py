"""Setting up the simulated district before anything runs: the controller's config (its own
broker on a free loopback port, SQLite or the scenario's database, the store behind the
fault proxy, quick alert and schedule checks), the units enrolled as
``classcap controller device add`` does, and an admin API token for the simulator."""

from __future__ import annotations

import logging
from pathlib import Path

from controller.alerts import AlertEngine
from controller.config import ControllerConfig, load_controller_config
from controller.db import Database
from controller.provision import TomlValue, add_unit, toml_text
from controller.registry import Registry
from controller.service import alert_thresholds
from controller.sim import procs
from controller.sim.fleet import Unit, unit_settings
from controller.sim.scenario import Scenario
from controller.sim.seaweed import Seaweed
from controller.web.auth import Role, create_token

log = logging.getLogger(__name__)

BUCKET = "classcap-sim"
PREFIX = "classcap"
# Scheduled lessons of a few minutes need checks far more often than a school day does.
_SCHEDULE = {"check_interval_s": 2.0, "missed_grace_s": 30.0, "at_risk_before_s": 60.0}


def write_controller_config(
    path: Path, root: Path, scenario: Scenario, seaweed: Seaweed, storage_url: str
) -> ControllerConfig:
    spec = scenario.controller
    document: dict[str, TomlValue] = {
        "data_dir": root / "controller",
        "server": {"host": "127.0.0.1", "port": procs.free_port(), "threads": 8},
        "broker": {"embedded": {"host": "127.0.0.1", "port": procs.free_port()}},
        "storage": {
            "backend": "s3",
            "endpoint_url": storage_url,
            "region": seaweed.region,
            "bucket": BUCKET,
            "prefix": PREFIX,
            "access_key": seaweed.access_key,
            "secret_key": seaweed.secret_key,
        },
        "alerts": {
            "offline_after_s": spec.offline_after_s,
            "sweep_interval_s": spec.sweep_interval_s,
            "backlog_max_segments": spec.backlog_max_segments,
            # A simulated unit's disk is the machine's: only a real small disk should alert.
            "disk_free_min_mb": 0,
        },
        "schedule": dict(_SCHEDULE),
    }
    if spec.database_url is not None:
        document["database"] = {"url": spec.database_url}
    path.write_text(toml_text(document))
    path.chmod(0o600)  # it holds the store's secret key
    return load_controller_config(path)


def enrol_units(config: ControllerConfig, scenario: Scenario, units_dir: Path) -> dict[str, Unit]:
    """Registers every unit and writes its bundle; returns them by device id (not started)."""
    db = Database(config.database.url)
    try:
        db.migrate()
        registry = Registry(db, AlertEngine(db, alert_thresholds(config)))
        units: dict[str, Unit] = {}
        for number, device_id in enumerate(scenario.fleet.device_ids(), start=1):
            unit_dir = units_dir / device_id
            room = f"Room {100 + number}"
            add_unit(
                config,
                registry,
                device_id,
                school=scenario.school.name,
                room=room,
                out_dir=units_dir,
                unit_config_dir=unit_dir,
                agent_settings=unit_settings(unit_dir, scenario.fleet),
            )
            units[device_id] = Unit(device_id, room, unit_dir)
        log.info("units enrolled count=%d", len(units))
        return units
    finally:
        db.dispose()


def admin_token(config: ControllerConfig) -> str:
    db = Database(config.database.url)
    try:
        db.migrate()
        return create_token(db, "simulator", Role.ADMIN)
    finally:
        db.dispose()
