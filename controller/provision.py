"""Enrolling a unit: its broker identity, its registry entry and the files IT copies onto it.

``add_unit`` registers the unit, gives it its own broker user (on the embedded
broker; an external broker's administrator adds it from the bundle) and writes a
bundle directory with ``agent.toml`` and ``broker-password`` for
``/etc/classcap`` on the unit. A unit holds nothing but that identity: the ACL
confines it to its own topics, and storage grants come over MQTT.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from controller.broker import CONTROLLER_USER, BrokerError, set_password
from controller.config import ControllerConfig
from controller.registry import Registry, UnknownDevice
from shared.topics import validate_device_id

log = logging.getLogger(__name__)

UNIT_CONFIG_DIR = Path("/etc/classcap")
_PASSWORD_BYTES = 24

TomlScalar = str | int | float | bool | Path
TomlValue: TypeAlias = TomlScalar | list[TomlScalar] | Mapping[str, "TomlValue"]


class ProvisionError(Exception):
    """The unit could not be enrolled; nothing was left half done."""


@dataclass(frozen=True)
class UnitBundle:
    device_id: str
    directory: Path
    agent_config: Path
    password_file: Path
    ca_file: Path | None
    broker_url: str
    # False with an external broker: its administrator must add the user (see docs).
    broker_user_created: bool


def add_unit(
    config: ControllerConfig,
    registry: Registry,
    device_id: str,
    *,
    school: str,
    room: str,
    out_dir: Path,
    reload_broker: Callable[[], None] | None = None,
    unit_config_dir: Path = UNIT_CONFIG_DIR,
    agent_settings: Mapping[str, TomlValue] | None = None,
) -> UnitBundle:
    """Registers a new unit and writes its bundle to ``out_dir/<device_id>/``.

    ``unit_config_dir`` is where the bundle's files will live on the unit (its
    ``agent.toml`` names the password file there); ``agent_settings`` adds or
    overrides keys of ``agent.toml`` (e.g. a simulated unit's capture backend).
    ``reload_broker`` makes a running embedded broker read the new user at once;
    without it a running controller notices the changed password file itself.
    Raises ``controller.registry.DeviceExists`` for a unit already registered.
    """
    _check_id(device_id)
    if not school.strip() or not room.strip():
        raise ProvisionError("school and room must not be empty")
    try:
        registry.add_device(device_id, school.strip(), room.strip())
    except ValueError as exc:  # a name the registry cannot hold
        raise ProvisionError(str(exc)) from None
    try:
        bundle = _issue(
            config,
            device_id,
            out_dir=out_dir,
            unit_config_dir=unit_config_dir,
            agent_settings=agent_settings,
            reload_broker=reload_broker,
        )
    except BaseException:
        registry.remove_device(device_id)
        raise
    log.info(
        "unit added device=%s school=%s room=%s bundle=%s",
        device_id,
        school,
        room,
        bundle.directory,
    )
    return bundle


def reissue_unit(
    config: ControllerConfig,
    registry: Registry,
    device_id: str,
    *,
    out_dir: Path,
    reload_broker: Callable[[], None] | None = None,
    unit_config_dir: Path = UNIT_CONFIG_DIR,
    agent_settings: Mapping[str, TomlValue] | None = None,
) -> UnitBundle:
    """A new password and bundle for a registered unit (a replaced SD card); the old
    password stops working."""
    _check_id(device_id)
    if not registry.known(device_id):
        raise ProvisionError(f"unit {device_id} is not registered")
    bundle = _issue(
        config,
        device_id,
        out_dir=out_dir,
        unit_config_dir=unit_config_dir,
        agent_settings=agent_settings,
        reload_broker=reload_broker,
    )
    log.info("unit credentials reissued device=%s bundle=%s", device_id, bundle.directory)
    return bundle


def remove_unit(
    config: ControllerConfig,
    registry: Registry,
    device_id: str,
    *,
    reload_broker: Callable[[], None] | None = None,
) -> None:
    """Removes the unit's user from the embedded broker and the unit from the registry.
    Its recordings stay in the catalogue and in storage. Raises UnknownDevice."""
    _check_id(device_id)
    if not registry.known(device_id):
        raise UnknownDevice(device_id)
    if config.broker.mode == "embedded":
        with password_lock(config):
            _delete_broker_user(config.broker_password_file, device_id)
        if reload_broker is not None:
            reload_broker()
    registry.remove_device(device_id)
    log.info("unit removed device=%s", device_id)


def ensure_controller_identity(config: ControllerConfig) -> None:
    """The controller's own user on the embedded broker, its password made on first start."""
    path = config.broker.resolved_password_file
    if path is None:
        password = config.broker.password
        if password is None:
            raise ProvisionError("the embedded broker needs a controller password")
    else:
        try:
            password = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            password = secrets.token_urlsafe(_PASSWORD_BYTES)
            _write_private(path, password + "\n")
            log.info("controller broker password created path=%s", path)
    with password_lock(config):
        set_password(config.broker_password_file, config.broker.username, password)


def _check_id(device_id: str) -> None:
    try:
        validate_device_id(device_id)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    if device_id == CONTROLLER_USER:
        raise ProvisionError(f"{CONTROLLER_USER!r} is the controller's own broker user")


def _issue(
    config: ControllerConfig,
    device_id: str,
    *,
    out_dir: Path,
    unit_config_dir: Path,
    agent_settings: Mapping[str, TomlValue] | None,
    reload_broker: Callable[[], None] | None,
) -> UnitBundle:
    directory = out_dir / device_id
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    password = secrets.token_urlsafe(_PASSWORD_BYTES)
    password_file = directory / "broker-password"
    _write_private(password_file, password + "\n")
    url = config.broker.unit_broker_url()
    ca_source = (
        config.broker.embedded.cafile if config.broker.mode == "embedded" else config.broker.ca_file
    )
    ca_file: Path | None = None
    broker: dict[str, TomlValue] = {
        "url": url,
        "username": device_id,
        "password_file": unit_config_dir / "broker-password",
    }
    if url.startswith("mqtts://") and ca_source is not None:
        ca_file = directory / "ca.crt"
        shutil.copyfile(ca_source, ca_file)
        broker["ca_file"] = unit_config_dir / "ca.crt"
    document: dict[str, TomlValue] = {"device_id": device_id, "broker": broker}
    _merge(document, agent_settings or {})
    agent_config = directory / "agent.toml"
    header = f"# classcap unit {device_id}: copy this directory's files to {unit_config_dir}/\n"
    _write_private(agent_config, header + toml_text(document))
    created = False
    if config.broker.mode == "embedded":
        try:
            with password_lock(config):
                set_password(config.broker_password_file, device_id, password)
        except (BrokerError, OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise ProvisionError(f"cannot create broker user {device_id}: {exc}") from exc
        created = True
        if reload_broker is not None:
            reload_broker()
    return UnitBundle(device_id, directory, agent_config, password_file, ca_file, url, created)


@contextlib.contextmanager
def password_lock(config: ControllerConfig) -> Iterator[None]:
    """mosquitto_passwd rewrites the whole file: one writer at a time, across processes."""
    directory = config.broker.embedded.directory
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "passwords.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _delete_broker_user(password_file: Path, username: str) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise ProvisionError("mosquitto_passwd not found: install the mosquitto package")
    try:
        users = {line.split(":", 1)[0] for line in password_file.read_text().splitlines()}
    except FileNotFoundError:
        return
    if username not in users:
        return
    result = subprocess.run(
        [tool, "-D", str(password_file), username],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise ProvisionError(f"cannot remove broker user {username}: {result.stderr.strip()}")


def _write_private(path: Path, text: str) -> None:
    """Written whole, readable by the owner only, replacing any earlier file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    tmp.replace(path)


def _merge(into: dict[str, TomlValue], extra: Mapping[str, TomlValue]) -> None:
    for key, value in extra.items():
        current = into.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged = dict(current)
            _merge(merged, value)
            into[key] = merged
        else:
            into[key] = value


# --- a small TOML writer: scalars, lists of scalars and tables ---------------------------------


def toml_text(document: Mapping[str, TomlValue]) -> str:
    lines: list[str] = []
    _table(document, (), lines)
    return "\n".join(lines).strip() + "\n"


def _table(table: Mapping[str, TomlValue], path: tuple[str, ...], lines: list[str]) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    if path and (scalars or not tables):
        lines += ["", "[" + ".".join(_key(p) for p in path) + "]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in scalars]
    for key, sub in tables:
        assert isinstance(sub, Mapping)
        _table(sub, (*path, key), lines)


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else json.dumps(key)


def _value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string is a valid TOML basic string (same escapes, \\uXXXX included).
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
