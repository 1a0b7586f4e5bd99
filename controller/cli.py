"""``classcap controller ...``: run the fleet controller, migrate its database, enrol units,
create users and API tokens, reconcile units, catalogue and storage.

Every ``classcap`` invocation loads this module (units included, which lack the
controller's extra dependencies), so only the handlers import the controller itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.config import ControllerConfig
    from controller.db import Database
    from controller.provision import UnitBundle
    from controller.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/classcap/controller.toml")
EXIT_FAILURE = 1
EXIT_CONFIG = 2
ROLES = ("viewer", "technician", "admin")
_PAGE = 500


def register(sub: Any) -> None:
    controller = sub.add_parser("controller", help="the fleet controller")
    actions = controller.add_subparsers(dest="controller_command", required=True, metavar="ACTION")

    def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG_PATH,
            help=f"controller config file (default {DEFAULT_CONFIG_PATH})",
        )
        return parser

    run = with_config(actions.add_parser("run", help="run broker, MQTT service and web server"))
    run.set_defaults(handler=_run)
    check = with_config(actions.add_parser("check-config", help="validate the config and exit"))
    check.set_defaults(handler=_check)
    migrate = with_config(
        actions.add_parser("migrate", help="bring the database schema up to date")
    )
    migrate.set_defaults(handler=_migrate)

    device = actions.add_parser("device", help="enrol and list units")
    device_actions = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    add = with_config(device_actions.add_parser("add", help="register a unit and write its files"))
    add.add_argument("device_id", help="2-63 of a-z 0-9 -; also the unit's broker user")
    add.add_argument("--school", required=True)
    add.add_argument("--room", required=True)
    add.add_argument("--out", type=Path, help="bundle directory (default <data_dir>/units)")
    add.set_defaults(handler=_device_add)
    reissue = with_config(
        device_actions.add_parser("reissue", help="new broker password and files for a unit")
    )
    reissue.add_argument("device_id")
    reissue.add_argument("--out", type=Path, help="bundle directory (default <data_dir>/units)")
    reissue.set_defaults(handler=_device_reissue)
    remove = with_config(device_actions.add_parser("remove", help="unregister a unit"))
    remove.add_argument("device_id")
    remove.set_defaults(handler=_device_remove)
    listing = with_config(device_actions.add_parser("list", help="list registered units"))
    listing.add_argument("--school")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_device_list)

    reconcile = with_config(
        actions.add_parser("reconcile", help="compare unit journals with the catalogue and storage")
    )
    reconcile.add_argument(
        "--journal",
        action="append",
        required=True,
        metavar="[UNIT=]PATH",
        help="a unit's journal.sqlite3 (repeat for each unit); UNIT when the catalogue "
        "does not know its recordings",
    )
    reconcile.add_argument("--json", action="store_true", help="print the report as JSON")
    reconcile.add_argument(
        "--tolerance",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="largest break between consecutive segments taken as continuous (default 0.5)",
    )
    reconcile.add_argument(
        "--window-tolerance",
        type=float,
        default=6.0,
        metavar="SECONDS",
        help="how late a scheduled recording may start, or early end, unexplained (default 6)",
    )
    reconcile.set_defaults(handler=_reconcile)

    token = actions.add_parser("token", help="API tokens")
    token_actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = with_config(token_actions.add_parser("create", help="create a token, shown once"))
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=ROLES)
    create.set_defaults(handler=_token_create)

    user = actions.add_parser("user", help="dashboard users")
    user_actions = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    user_add = with_config(user_actions.add_parser("add", help="create a dashboard user"))
    user_add.add_argument("username")
    user_add.add_argument("--role", required=True, choices=ROLES)
    user_add.add_argument(
        "--password-file", type=Path, help="read the password here (default: generate and print)"
    )
    user_add.set_defaults(handler=_user_add)


# --- helpers ------------------------------------------------------------------------------------


class _Failed(Exception):
    """Ends a command with a message and an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def _command(args: argparse.Namespace) -> str:
    parts = ["controller", args.controller_command]
    for name in ("device_command", "token_command", "user_command"):
        if getattr(args, name, None):
            parts.append(getattr(args, name))
    return "classcap " + " ".join(parts)


def _load(path: Path) -> ControllerConfig:
    from controller.config import load_controller_config
    from shared.configfile import ConfigError

    try:
        return load_controller_config(path)
    except ConfigError as exc:
        raise _Failed(str(exc), EXIT_CONFIG) from None


@contextmanager
def _database(config: ControllerConfig) -> Iterator[Database]:
    from controller.db import Database

    db = Database(config.database.url)
    try:
        if config.database.migrate_on_start:
            db.migrate()
        yield db
    finally:
        db.dispose()


def _registry(config: ControllerConfig, db: Database) -> Registry:
    from controller.alerts import AlertEngine
    from controller.registry import Registry
    from controller.service import alert_thresholds

    return Registry(db, AlertEngine(db, alert_thresholds(config)))


def _handled(
    handler: Callable[[argparse.Namespace, ControllerConfig], int],
) -> Callable[[argparse.Namespace], int]:
    """Runs ``handler(args, config)`` and turns expected failures into a message and status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args, _load(args.config))
        except _Failed as exc:
            sys.stderr.write(f"{_command(args)}: {exc}\n")
            return exc.status

    return run


# --- handlers -----------------------------------------------------------------------------------


@_handled
def _run(_args: argparse.Namespace, config: ControllerConfig) -> int:
    from controller.service import run

    return run(config)


@_handled
def _check(args: argparse.Namespace, config: ControllerConfig) -> int:
    sys.stdout.write(
        f"{args.config}: ok (broker {config.broker.mode}, storage {config.storage.backend})\n"
    )
    return 0


@_handled
def _migrate(_args: argparse.Namespace, config: ControllerConfig) -> int:
    from controller.db import Database

    db = Database(config.database.url)
    try:
        db.migrate()
    finally:
        db.dispose()
    sys.stdout.write("database schema is up to date\n")
    return 0


@_handled
def _device_add(args: argparse.Namespace, config: ControllerConfig) -> int:
    from controller.provision import ProvisionError, add_unit
    from controller.registry import DeviceExists

    out = args.out or config.data_dir / "units"
    with _database(config) as db:
        try:
            bundle = add_unit(
                config,
                _registry(config, db),
                args.device_id,
                school=args.school,
                room=args.room,
                out_dir=out,
            )
        except DeviceExists:
            raise _Failed(f"unit {args.device_id} is already registered") from None
        except ProvisionError as exc:
            raise _Failed(str(exc)) from None
    _print_bundle(bundle)
    return 0


@_handled
def _device_reissue(args: argparse.Namespace, config: ControllerConfig) -> int:
    from controller.provision import ProvisionError, reissue_unit

    out = args.out or config.data_dir / "units"
    with _database(config) as db:
        try:
            bundle = reissue_unit(config, _registry(config, db), args.device_id, out_dir=out)
        except ProvisionError as exc:
            raise _Failed(str(exc)) from None
    _print_bundle(bundle)
    return 0


def _print_bundle(bundle: UnitBundle) -> None:
    lines = [
        f"unit {bundle.device_id} enrolled; its files are in {bundle.directory}/",
        f"  copy agent.toml and broker-password{' and ca.crt' if bundle.ca_file else ''}"
        " to /etc/classcap/ on the unit (mode 0640, group classcap)",
        f"  it connects to {bundle.broker_url} as user {bundle.device_id}",
    ]
    if not bundle.broker_user_created:
        lines.append(
            f"  external broker: add user {bundle.device_id} with the password in "
            f"{bundle.password_file} (see docs/controller.md)"
        )
    sys.stdout.write("\n".join(lines) + "\n")


@_handled
def _device_remove(args: argparse.Namespace, config: ControllerConfig) -> int:
    from controller.provision import ProvisionError, remove_unit
    from controller.registry import UnknownDevice

    with _database(config) as db:
        try:
            remove_unit(config, _registry(config, db), args.device_id)
        except UnknownDevice:
            raise _Failed(f"unit {args.device_id} is not registered") from None
        except ProvisionError as exc:
            raise _Failed(str(exc)) from None
    sys.stdout.write(f"unit {args.device_id} removed; its recordings are kept\n")
    return 0


@_handled
def _device_list(args: argparse.Namespace, config: ControllerConfig) -> int:
    with _database(config) as db:
        registry = _registry(config, db)
        page = 1
        if not args.json:
            sys.stdout.write(f"{'unit':<24} {'school':<24} {'room':<12} {'online':<7} state\n")
        while True:
            found = registry.list(school=args.school, page=page, per_page=_PAGE)
            for view in found.items:
                if args.json:
                    row = {
                        "id": view.id,
                        "school": view.school,
                        "room": view.room,
                        "online": view.online,
                        "state": view.state,
                        "agent_version": view.agent_version,
                        "alerts": list(view.open_alerts),
                    }
                    sys.stdout.write(json.dumps(row) + "\n")
                else:
                    online = "yes" if view.online else "no"
                    sys.stdout.write(
                        f"{view.id:<24} {view.school:<24} {view.room:<12} {online:<7} "
                        f"{view.state or '-'}\n"
                    )
            if page * found.per_page >= found.total:
                break
            page += 1
    return 0


@_handled
def _reconcile(args: argparse.Namespace, config: ControllerConfig) -> int:
    from controller.db import Database
    from controller.reconcile import reconcile, render_text
    from controller.reconcile_sources import SourceError, gather, journal_source
    from controller.storage.local import make_storage

    sources = [journal_source(value) for value in args.journal]
    try:
        # Listing and hashing sign nothing, so the local store needs no real secret.
        storage = make_storage(config.storage, config.server.base_url(), secrets.token_bytes(32))
    except OSError as exc:
        raise _Failed(f"cannot set up storage: {exc}", EXIT_CONFIG) from None
    db = Database(config.database.url)
    try:
        found = gather(sources, db, storage)
    except SourceError as exc:
        raise _Failed(str(exc), EXIT_CONFIG) from None
    finally:
        db.dispose()
    report = reconcile(
        found.units,
        found.catalogue,
        found.listings,
        tolerance_s=args.tolerance,
        window_tolerance_s=args.window_tolerance,
    )
    text = json.dumps(report.as_dict(), indent=2) if args.json else render_text(report)
    sys.stdout.write(text + "\n")
    return 0 if report.ok else EXIT_FAILURE


@_handled
def _token_create(args: argparse.Namespace, config: ControllerConfig) -> int:
    from controller.web.auth import AuthError, Role, create_token

    with _database(config) as db:
        try:
            token = create_token(db, args.name, Role(args.role))
        except AuthError as exc:
            raise _Failed(str(exc)) from None
    sys.stdout.write(f"{token}\n")
    sys.stderr.write("the token is shown only this once; keep it somewhere safe\n")
    return 0


@_handled
def _user_add(args: argparse.Namespace, config: ControllerConfig) -> int:
    from controller.web.auth import AuthError, Role, create_user

    generated = args.password_file is None
    if generated:
        password = secrets.token_urlsafe(12)
    else:
        try:
            password = args.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _Failed(f"cannot read password file: {exc}") from None
    with _database(config) as db:
        try:
            create_user(db, args.username, password, Role(args.role))
        except AuthError as exc:
            raise _Failed(str(exc)) from None
    sys.stdout.write(f"user {args.username} created with role {args.role}\n")
    if generated:
        sys.stdout.write(f"password: {password}\n")
    return 0
