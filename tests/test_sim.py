"""The simulator's parts on their own: scenario validation, the school day it builds, and the
storage proxy in front of a real SeaweedFS (a presigned PUT through it passes, and each
storage fault shows to an uploading unit as it would from a failing store)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from controller.sim.fleet import unit_settings
from controller.sim.lessons import LessonError, auto_zone, build_school
from controller.sim.procs import steady_port
from controller.sim.scenario import SCENARIO_DIR, FaultKind, Scenario, load_scenario
from controller.sim.storage_proxy import ProxyMode, StorageProxy
from controller.storage.s3 import S3Settings, S3Storage
from device.config import AgentConfig
from device.http_put import PutError, put_file
from tests.support.processes import wait_for
from tests.support.s3 import PREFIX
from tests.support.seaweed_server import SeaweedServer


def _scenario(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "t",
        "duration_s": 100,
        "fleet": {"units": 3},
        "school": {
            "periods": [{"name": "P1", "start_s": 10, "end_s": 40}],
            "plans": [{"name": "all", "units": "all", "periods": ["P1"]}],
        },
        "presses": [{"at_s": 5, "unit": "sim-01"}],
        "faults": [{"at_s": 20, "kind": "agent_kill", "unit": "sim-02", "duration_s": 10}],
    }
    base.update(changes)
    return base


# --- scenarios -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ci", "school-day"])
def test_shipped_scenarios_validate(name: str) -> None:
    scenario = load_scenario(SCENARIO_DIR / f"{name}.toml")
    assert {f.kind for f in scenario.faults} == set(FaultKind)


def test_ci_scenario_fits_its_runtime_budget() -> None:
    scenario = load_scenario(SCENARIO_DIR / "ci.toml")
    assert scenario.fleet.units == 3
    assert scenario.duration_s <= 200


def test_a_valid_scenario_names_its_units() -> None:
    scenario = Scenario.model_validate(_scenario())
    assert scenario.fleet.device_ids() == ["sim-01", "sim-02", "sim-03"]
    assert scenario.plan_units(scenario.school.plans[0]) == ["sim-01", "sim-02", "sim-03"]
    assert scenario.faults[0].alerts() == ("offline",)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"presses": [{"at_s": 5, "unit": "sim-09"}]}, "unknown unit 'sim-09'"),
        ({"presses": [{"at_s": 5}]}, "names unit or units"),
        ({"presses": [{"at_s": 5, "unit": "sim-01", "kind": "start"}]}, "a button press is"),
        (
            {"presses": [{"at_s": 5, "unit": "sim-01", "via": "dashboard", "kind": "long"}]},
            "a button press is",
        ),
        ({"presses": [{"at_s": 100, "unit": "sim-01"}]}, "after duration_s"),
        ({"faults": [{"at_s": 20, "kind": "agent_kill"}]}, "needs unit"),
        ({"faults": [{"at_s": 20, "kind": "broker_outage", "unit": "sim-01"}]}, "takes no unit"),
        (
            {
                "faults": [
                    {"at_s": 20, "kind": "storage_errors", "duration_s": 30},
                    {"at_s": 40, "kind": "storage_unreachable", "duration_s": 10},
                ]
            },
            "on storage overlap",
        ),
        (
            {
                "faults": [
                    {"at_s": 20, "kind": "controller_restart", "duration_s": 30},
                    {"at_s": 30, "kind": "broker_outage", "duration_s": 10},
                ]
            },
            "on controller overlap",
        ),
        (
            {
                "school": {
                    "periods": [
                        {"name": "P1", "start_s": 10, "end_s": 40},
                        {"name": "P2", "start_s": 30, "end_s": 50},
                    ]
                }
            },
            "overlap",
        ),
        (
            {"school": {"plans": [{"name": "x", "units": "all", "periods": ["P9"]}]}},
            "unknown period 'P9'",
        ),
        (
            {"faults": [{"at_s": 20, "kind": "agent_kill", "unit": "sim-01", "duration_s": 3}]},
            "ends before the offline alert is due",
        ),
        ({"faults": [{"at_s": 20, "kind": "clock_jump"}]}, "clock_jump needs unit"),
        (
            {"faults": [{"at_s": 20, "kind": "clock_jump", "unit": "sim-01", "offset_s": 0}]},
            "offset_s must not be 0",
        ),
        (
            {"faults": [{"at_s": 20, "kind": "clock_jump", "unit": "sim-01", "offset_s": 4e8}]},
            "offset_s",
        ),
        (
            {"faults": [{"at_s": 20, "kind": "clock_jump", "unit": "sim-01", "offset_s": "nan"}]},
            "offset_s",
        ),
        (
            {"faults": [{"at_s": 20, "kind": "agent_kill", "unit": "sim-01", "offset_s": -60}]},
            "agent_kill takes no offset_s",
        ),
        (
            {
                "faults": [
                    {"at_s": 20, "kind": "clock_jump", "unit": "sim-01", "duration_s": 30},
                    {"at_s": 40, "kind": "disk_full", "unit": "sim-01", "duration_s": 10},
                ]
            },
            "on unit sim-01 overlap",
        ),
    ],
)
def test_a_bad_scenario_is_refused_with_the_reason(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Scenario.model_validate(_scenario(**changes))


def test_a_clock_jump_defaults_to_a_day_behind_and_expects_clock_unsynced() -> None:
    faults = [
        {"at_s": 20, "kind": "clock_jump", "unit": "sim-01"},
        {"at_s": 20, "kind": "clock_jump", "unit": "sim-03", "offset_s": 7200},
    ]
    behind, ahead = Scenario.model_validate(_scenario(faults=faults)).faults
    assert (behind.offset_s, ahead.offset_s) == (-86400, 7200)
    assert behind.alerts() == ("clock_unsynced",)
    assert behind.target == "unit sim-01"


def test_simulated_units_have_a_clock_the_simulator_can_set(tmp_path: Path) -> None:
    settings = unit_settings(tmp_path / "sim-01", load_scenario(SCENARIO_DIR / "ci.toml").fleet)
    broker = {**settings["broker"], "url": "mqtt://127.0.0.1:1883"}  # type: ignore[dict-item]
    config = AgentConfig.model_validate({**settings, "device_id": "sim-01", "broker": broker})
    assert config.system.simulated_clock is True
    assert config.gpio.mock is True


def test_faults_on_different_targets_may_overlap() -> None:
    faults = [
        {"at_s": 20, "kind": "storage_errors", "duration_s": 30},
        {"at_s": 25, "kind": "agent_kill", "unit": "sim-01", "duration_s": 10},
        {"at_s": 25, "kind": "agent_kill", "unit": "sim-02", "duration_s": 10},
        {"at_s": 30, "kind": "broker_outage", "duration_s": 10},
    ]
    assert len(Scenario.model_validate(_scenario(faults=faults)).faults) == 4


def test_the_sim_command_is_registered(tmp_path: Path) -> None:
    from shared.cli import main

    path = tmp_path / "s.toml"
    path.write_text((SCENARIO_DIR / "ci.toml").read_text())
    assert main(["sim", "check", str(path)]) == 0
    path.write_text("name = 'x'\nduration_s = 10\n")
    assert main(["sim", "check", str(path)]) == 2


# --- the school day ------------------------------------------------------------------------


@pytest.mark.parametrize("hour", range(24))
def test_the_auto_zone_puts_the_start_of_the_run_in_the_morning(hour: int) -> None:
    from zoneinfo import ZoneInfo

    at = datetime(2026, 3, 8, hour, 17, tzinfo=UTC)
    assert at.astimezone(ZoneInfo(auto_zone(at))).hour == 9


def test_periods_become_bell_times_of_the_run_s_day() -> None:
    scenario = Scenario.model_validate(_scenario())
    t0 = datetime(2026, 11, 23, 14, 0, 5, tzinfo=UTC)
    rooms = {"sim-01": "Room 101", "sim-02": "Room 102", "sim-03": "Room 103"}
    school = build_school(scenario, rooms, t0)
    assert school.timezone == "Etc/GMT+5"
    (period,) = school.bell_schedules[0].periods
    assert (period.start, period.end) == (time(9, 0, 15), time(9, 0, 45))
    assert school.calendar is not None
    assert school.calendar.first_day == school.calendar.last_day == t0.date()
    assert {r.device_id: r.name for r in school.rooms} == rooms


def test_a_lesson_across_local_midnight_is_refused() -> None:
    changes = {"school": {"timezone": "UTC", "periods": [{"name": "P", "start_s": 0, "end_s": 90}]}}
    scenario = Scenario.model_validate(_scenario(**changes))
    with pytest.raises(LessonError, match="crosses local midnight"):
        build_school(scenario, {}, datetime(2026, 11, 23, 23, 59, tzinfo=UTC))


# --- the storage proxy ---------------------------------------------------------------------


@pytest.fixture
def proxied(
    s3_storage: S3Storage, seaweedfs: SeaweedServer
) -> Iterator[tuple[StorageProxy, S3Storage]]:
    proxy = StorageProxy(seaweedfs.ports.s3, steady_port())
    proxy.start()
    storage = S3Storage(
        S3Settings(
            endpoint_url=proxy.url,
            region=seaweedfs.region,
            bucket=s3_storage.bucket,
            prefix=PREFIX,
            access_key=seaweedfs.access_key,
            secret_key=seaweedfs.secret_key,
        )
    )
    try:
        yield proxy, storage
    finally:
        proxy.stop()


def _put(storage: S3Storage, path: Path, name: str, timeout: float = 5.0) -> int:
    data = path.read_bytes()
    key = storage.key_for("sim-01", "rec-1", name)
    grant = storage.presign_put(key, len(data), hashlib.sha256(data).hexdigest(), 300)
    return put_file(grant.url, path, grant.headers, timeout).status


def test_a_presigned_put_through_the_proxy_is_stored_and_verified(
    proxied: tuple[StorageProxy, S3Storage], tmp_path: Path
) -> None:
    proxy, storage = proxied
    segment = tmp_path / "seg-00000.mp4"
    segment.write_bytes(b"fragmented mp4 " * 1000)
    assert _put(storage, segment, "seg-00000.mp4") == 200
    digest = hashlib.sha256(segment.read_bytes()).hexdigest()
    key = storage.key_for("sim-01", "rec-1", "seg-00000.mp4")
    assert storage.verify(key, segment.stat().st_size, digest).ok
    assert proxy.counts["passed"] >= 2


def test_each_storage_fault_shows_as_a_failing_store_would(
    proxied: tuple[StorageProxy, S3Storage], tmp_path: Path
) -> None:
    proxy, storage = proxied
    segment = tmp_path / "seg-00001.mp4"
    segment.write_bytes(b"x" * 5000)

    proxy.set_mode(ProxyMode.ERROR)
    assert _put(storage, segment, "seg-00001.mp4") == 503

    proxy.set_mode(ProxyMode.STALL)
    with pytest.raises(PutError, match=r"no answer|timed out"):
        _put(storage, segment, "seg-00001.mp4", timeout=1.0)

    proxy.set_mode(ProxyMode.REFUSE)
    with pytest.raises(PutError, match="refused"):
        _put(storage, segment, "seg-00001.mp4")

    proxy.set_mode(ProxyMode.PASS)
    assert _put(storage, segment, "seg-00001.mp4") == 200
    assert proxy.counts["answered_503"] == 1
    assert proxy.counts["stalled"] == 1


def test_a_held_upload_is_cut_when_released(
    proxied: tuple[StorageProxy, S3Storage], tmp_path: Path
) -> None:
    import threading

    proxy, storage = proxied
    segment = tmp_path / "seg-00002.mp4"
    segment.write_bytes(b"y" * 5000)
    proxy.hold_uploads("sim-01")
    outcome: list[object] = []

    def upload() -> None:
        try:
            outcome.append(_put(storage, segment, "seg-00002.mp4", timeout=30))
        except PutError as exc:
            outcome.append(exc)

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert wait_for(lambda: proxy.held("sim-01") == 1, 10)
    proxy.release_uploads("sim-01")
    uploader.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], PutError)
    assert wait_for(lambda: proxy.held("sim-01") == 0, 5)
    assert _put(storage, segment, "seg-00002.mp4") == 200


def test_steady_ports_lie_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    port = steady_port()
    assert 10000 <= port < low
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
