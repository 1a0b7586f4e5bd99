"""Enrolling units: registry entry, broker identity on the real embedded Mosquitto, the
bundle's agent.toml as the agent reads it, and the CLI around it."""

from __future__ import annotations

import json
import stat
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.alerts import AlertEngine
from controller.broker import CONTROLLER_USER
from controller.config import ControllerConfig
from controller.db import Database
from controller.provision import (
    ProvisionError,
    add_unit,
    ensure_controller_identity,
    reissue_unit,
    remove_unit,
    toml_text,
)
from controller.registry import DeviceExists, Registry
from controller.service import EmbeddedBroker, alert_thresholds, broker_settings
from controller.web.auth import authenticate_token, check_password
from device.config import load_agent_config
from shared.cli import main
from tests.support.broker import MqttTestClient
from tests.support.controller_proc import Endpoint
from tests.support.processes import free_port, wait_for


@dataclass
class State:
    config: ControllerConfig
    db: Database
    registry: Registry


def _config(tmp_path: Path, **broker: object) -> ControllerConfig:
    return ControllerConfig.model_validate(
        {
            "data_dir": str(tmp_path / "cc"),
            "broker": {"embedded": {"port": free_port()}, **broker},
        }
    )


def _open(config: ControllerConfig) -> State:
    db = Database(config.database.url)
    db.migrate()
    return State(config, db, Registry(db, AlertEngine(db, alert_thresholds(config))))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    opened = _open(_config(tmp_path))
    yield opened
    opened.db.dispose()


@pytest.fixture
def embedded(state: State) -> Iterator[EmbeddedBroker]:
    ensure_controller_identity(state.config)
    broker = EmbeddedBroker(broker_settings(state.config))
    broker.start()
    yield broker
    broker.stop()


def _connects(config: ControllerConfig, username: str, password: str) -> bool:
    endpoint = Endpoint("127.0.0.1", config.broker.embedded.port)
    client = MqttTestClient(endpoint, username=username, password=password)
    try:
        return not client.connect().is_failure
    finally:
        client.stop()


def _password(path: Path) -> str:
    return path.read_text().strip()


def test_add_unit_writes_a_bundle_the_agent_accepts(state: State, tmp_path: Path) -> None:
    bundle = add_unit(
        state.config,
        state.registry,
        "room-204",
        school="North High",
        room="204",
        out_dir=tmp_path / "units",
    )
    assert bundle.directory == tmp_path / "units" / "room-204"
    assert bundle.broker_user_created
    agent = load_agent_config(bundle.agent_config)
    assert agent.device_id == "room-204"
    assert agent.broker.url == state.config.broker.unit_broker_url()
    assert agent.broker.username == "room-204"
    assert agent.broker.password_file == Path("/etc/classcap/broker-password")
    assert agent.broker.ca_file is None
    for path in (bundle.agent_config, bundle.password_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(bundle.directory.stat().st_mode) == 0o700
    assert len(_password(bundle.password_file)) >= 24
    view = state.registry.get("room-204")
    assert view is not None and (view.school, view.room) == ("North High", "204")
    assert not view.online


def test_agent_settings_override_the_generated_keys(state: State, tmp_path: Path) -> None:
    bundle = add_unit(
        state.config,
        state.registry,
        "sim-1",
        school="Lab",
        room="1",
        out_dir=tmp_path / "units",
        unit_config_dir=tmp_path / "units" / "sim-1",
        agent_settings={
            "data_dir": tmp_path / "data",
            "broker": {"keepalive_s": 5},
            "capture": {"backend": "synthetic", "width": 320, "height": 240, "framerate": 10},
            "gpio": {"mock": True},
            "system": {"reboot_command": []},
        },
    )
    agent = load_agent_config(bundle.agent_config)
    assert agent.data_dir == tmp_path / "data"
    assert agent.broker.keepalive_s == 5
    assert agent.broker.password_file == bundle.password_file
    assert agent.broker.username == "sim-1"
    assert (agent.capture.backend, agent.capture.width, agent.capture.framerate) == (
        "synthetic",
        320,
        10,
    )
    assert agent.gpio.mock and agent.system.reboot_command == []


def test_new_unit_can_connect_to_the_running_broker_without_a_restart(
    state: State, embedded: EmbeddedBroker, tmp_path: Path
) -> None:
    controller_password = state.config.broker.resolved_password()
    assert controller_password is not None
    assert _connects(state.config, CONTROLLER_USER, controller_password)
    assert not _connects(state.config, "room-1", "not-yet")
    # No reload callback: the running broker notices the changed password file itself,
    # as it must when `classcap controller device add` runs in another process.
    bundle = add_unit(
        state.config, state.registry, "room-1", school="S", room="1", out_dir=tmp_path / "u"
    )
    password = _password(bundle.password_file)
    assert wait_for(lambda: _connects(state.config, "room-1", password), 15)
    assert not _connects(state.config, "room-1", password + "x")
    assert embedded.running()


def test_adding_a_unit_twice_is_refused_and_changes_nothing(state: State, tmp_path: Path) -> None:
    first = add_unit(
        state.config, state.registry, "room-2", school="S", room="2", out_dir=tmp_path / "u"
    )
    password = _password(first.password_file)
    hashes = state.config.broker_password_file.read_text()
    with pytest.raises(DeviceExists):
        add_unit(
            state.config, state.registry, "room-2", school="T", room="9", out_dir=tmp_path / "u"
        )
    assert _password(first.password_file) == password
    assert state.config.broker_password_file.read_text() == hashes
    view = state.registry.get("room-2")
    assert view is not None and view.school == "S"


@pytest.mark.parametrize("device_id", ["Room 1", "x", "-room", CONTROLLER_USER, "a" * 64])
def test_bad_unit_ids_are_refused_before_anything_is_written(
    state: State, tmp_path: Path, device_id: str
) -> None:
    with pytest.raises(ProvisionError):
        add_unit(
            state.config, state.registry, device_id, school="S", room="1", out_dir=tmp_path / "u"
        )
    assert state.registry.device_ids() == []
    assert not (tmp_path / "u").exists()


def test_broker_failure_leaves_no_unit_behind(state: State, tmp_path: Path) -> None:
    state.config.broker_password_file.parent.mkdir(parents=True)
    state.config.broker_password_file.mkdir()  # mosquitto_passwd cannot write a directory
    with pytest.raises(ProvisionError, match="cannot create broker user room-3"):
        add_unit(
            state.config, state.registry, "room-3", school="S", room="3", out_dir=tmp_path / "u"
        )
    assert not state.registry.known("room-3")
    assert not (tmp_path / "u" / "room-3").exists()


def test_reissue_replaces_the_password_and_remove_revokes_it(
    state: State, embedded: EmbeddedBroker, tmp_path: Path
) -> None:
    first = add_unit(
        state.config,
        state.registry,
        "room-4",
        school="S",
        room="4",
        out_dir=tmp_path / "u",
        reload_broker=embedded.reload,
    )
    old = _password(first.password_file)
    assert wait_for(lambda: _connects(state.config, "room-4", old), 15)
    second = reissue_unit(
        state.config,
        state.registry,
        "room-4",
        out_dir=tmp_path / "v",
        reload_broker=embedded.reload,
    )
    new = _password(second.password_file)
    assert new != old
    assert wait_for(lambda: _connects(state.config, "room-4", new), 15)
    assert not _connects(state.config, "room-4", old)

    remove_unit(state.config, state.registry, "room-4", reload_broker=embedded.reload)
    assert not state.registry.known("room-4")
    assert wait_for(lambda: not _connects(state.config, "room-4", new), 15)
    with pytest.raises(ProvisionError, match="not registered"):
        reissue_unit(state.config, state.registry, "room-4", out_dir=tmp_path / "w")


def test_external_broker_bundle_carries_url_and_ca_but_creates_no_user(tmp_path: Path) -> None:
    ca = tmp_path / "district-ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    config = _config(
        tmp_path, mode="external", url="mqtts://mq.district.example:8883", ca_file=str(ca)
    )
    opened = _open(config)
    try:
        bundle = add_unit(
            config, opened.registry, "room-5", school="S", room="5", out_dir=tmp_path / "u"
        )
    finally:
        opened.db.dispose()
    assert not bundle.broker_user_created
    assert bundle.ca_file is not None and bundle.ca_file.read_text() == ca.read_text()
    agent = load_agent_config(bundle.agent_config)
    assert agent.broker.url == "mqtts://mq.district.example:8883"
    assert agent.broker.ca_file == Path("/etc/classcap/ca.crt")
    assert not config.broker_password_file.exists()


def test_toml_text_round_trips_through_tomllib(tmp_path: Path) -> None:
    document = {
        "name": 'quote " backslash \\ tab \t newline \n é ü 東京',
        "count": 3,
        "ratio": 0.25,
        "on": True,
        "path": tmp_path / "a b",
        "argv": ["systemctl", "reboot"],
        "empty": [],
        "section": {"key with space": "v", "nested": {"deep": False}},
        "only": {"tables": {"x": 1}},
    }
    parsed = tomllib.loads(toml_text(document))
    assert parsed == {
        **document,
        "path": str(tmp_path / "a b"),
    }


def _cli(config_path: Path, *argv: str) -> int:
    return main(["controller", *argv, "--config", str(config_path)])


def test_cli_device_add_list_token_and_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "controller.toml"
    config_path.write_text(f'data_dir = "{tmp_path / "cc"}"\n')
    assert _cli(config_path, "device", "add", "room-6", "--school", "West", "--room", "6") == 0
    out = capsys.readouterr().out
    bundle = tmp_path / "cc" / "units" / "room-6"
    assert f"its files are in {bundle}/" in out
    assert load_agent_config(bundle / "agent.toml").device_id == "room-6"

    assert _cli(config_path, "device", "add", "room-6", "--school", "West", "--room", "6") == 1
    assert "unit room-6 is already registered" in capsys.readouterr().err
    assert _cli(config_path, "device", "add", "Bad Id", "--school", "W", "--room", "6") == 1
    assert "invalid device id" in capsys.readouterr().err

    assert _cli(config_path, "device", "list", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["school"], r["room"], r["online"]) for r in rows] == [
        ("room-6", "West", "6", False)
    ]

    assert _cli(config_path, "token", "create", "--name", "ci", "--role", "technician") == 0
    token = capsys.readouterr().out.strip()
    assert _cli(config_path, "user", "add", "alice", "--role", "viewer") == 0
    password = capsys.readouterr().out.split("password: ")[1].strip()
    assert _cli(config_path, "user", "add", "alice", "--role", "viewer") == 1
    assert "already exists" in capsys.readouterr().err

    db = Database(f"sqlite:///{tmp_path / 'cc' / 'controller.sqlite3'}")
    try:
        principal = authenticate_token(db, token)
        assert principal is not None and principal.role == "technician"
        assert check_password(db, "alice", password) == "viewer"
    finally:
        db.dispose()

    assert _cli(config_path, "device", "remove", "room-6") == 0
    assert _cli(config_path, "device", "remove", "room-6") == 1
    assert "not registered" in capsys.readouterr().err
