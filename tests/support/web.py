"""The controller's web app on real services: SQLite, the state services, local storage.

``web_stack`` builds the app (no server); ``live_web`` also serves it with waitress on a
free loopback port in a thread, stopped at teardown. ``publish_command`` records what
the app asked to send; tests that need it sent for real wire an MqttService instead.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from waitress import wasyncore
from waitress.server import BaseWSGIServer, create_server

from controller.alerts import AlertEngine
from controller.catalogue import Catalogue
from controller.commands import CommandService
from controller.db import Database
from controller.registry import Registry
from controller.storage.local import LocalStorage
from controller.web import WebConfig, WebServices, create_app
from controller.web.auth import Role, create_token, create_user
from shared.messages import DesiredState, Health, RecorderState, Status
from tests.support.processes import free_port, port_open, wait_for

PASSWORD = "correct horse battery"


@dataclass
class WebStack:
    root: Path
    base_url: str
    port: int
    db: Database
    alerts: AlertEngine
    registry: Registry
    commands: CommandService
    catalogue: Catalogue
    storage: LocalStorage
    published: list[str] = field(default_factory=list)
    desired_published: list[tuple[str, DesiredState]] = field(default_factory=list)
    app: Flask | None = None

    def build(
        self,
        *,
        publish_command: Callable[[str], None] | None = None,
        mqtt_metrics: Callable[[], dict[str, float]] | None = None,
        refresh_interval_s: float = 5.0,
    ) -> Flask:
        services = WebServices(
            db=self.db,
            registry=self.registry,
            commands=self.commands,
            catalogue=self.catalogue,
            alerts=self.alerts,
            storage=self.storage,
            publish_command=publish_command or self.published.append,
            publish_desired=lambda device_id, desired: self.desired_published.append(
                (device_id, desired)
            ),
            mqtt_metrics=mqtt_metrics,
        )
        self.app = create_app(
            services,
            WebConfig(secret_key=secrets.token_bytes(32), refresh_interval_s=refresh_interval_s),
        )
        return self.app

    def client(self) -> FlaskClient:
        assert self.app is not None
        return self.app.test_client()

    def token(self, role: Role, name: str | None = None) -> str:
        return create_token(self.db, name or f"test-{role}", role)

    def bearer(self, role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role)}"}

    def user(self, username: str, role: Role) -> str:
        create_user(self.db, username, PASSWORD, role)
        return username

    def login(self, client: FlaskClient, username: str) -> str:
        """Logs ``client`` in through the form; returns the session's CSRF token."""
        page = client.get("/login")
        token = csrf_from(page.get_data(as_text=True))
        answer = client.post(
            "/login", data={"username": username, "password": PASSWORD, "csrf_token": token}
        )
        assert answer.status_code == 302, answer.get_data(as_text=True)
        return csrf_from(client.get("/").get_data(as_text=True))


def csrf_from(html: str) -> str:
    marker = 'name="csrf-token" content="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


def make_stack(root: Path) -> WebStack:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    db = Database(f"sqlite:///{root / 'controller.sqlite3'}")
    db.migrate()
    alerts = AlertEngine(db)
    storage = LocalStorage(root / "objects", base_url, secrets.token_bytes(32))
    return WebStack(
        root=root,
        base_url=base_url,
        port=port,
        db=db,
        alerts=alerts,
        registry=Registry(db, alerts),
        commands=CommandService(db),
        catalogue=Catalogue(db, storage),
        storage=storage,
    )


class LiveServer:
    """waitress serving ``app`` on 127.0.0.1:``port`` in a thread until ``stop``."""

    def __init__(self, app: Flask, port: int) -> None:
        self.port = port
        self._map: dict[int, Any] = {}
        server = create_server(app, map=self._map, host="127.0.0.1", port=port, threads=4)
        assert isinstance(server, BaseWSGIServer)  # one listening socket
        self._server = server
        self._thread = threading.Thread(target=self._server.run, name="test-web", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not wait_for(lambda: port_open(self.port), 10):
            raise RuntimeError(f"web server did not listen on {self.port}")

    def stop(self) -> None:
        # The loop thread closes its own sockets (waitress's stubs mistype the trigger as int).
        trigger: Any = self._server.trigger
        trigger.pull_trigger(lambda: wasyncore.close_all(self._map))
        self._thread.join(10)
        self._server.task_dispatcher.shutdown(timeout=10)
        assert not self._thread.is_alive(), "web server thread did not stop"


@pytest.fixture
def web_stack(tmp_path: Path) -> Iterator[WebStack]:
    """Services on a fresh SQLite database and an app built with a recording publisher."""
    stack = make_stack(tmp_path)
    stack.build()
    yield stack
    stack.db.dispose()


@pytest.fixture
def live_web(web_stack: WebStack) -> Iterator[tuple[WebStack, LiveServer]]:
    assert web_stack.app is not None
    server = LiveServer(web_stack.app, web_stack.port)
    server.start()
    yield web_stack, server
    server.stop()


def unit_health(state: RecorderState = RecorderState.IDLE, **overrides: Any) -> Health:
    """A plausible health sample of a unit, with ``overrides`` applied."""
    values: dict[str, Any] = {
        "state": state,
        "soc_temp_c": 52.0,
        "disk_free_bytes": 20 * 1024**3,
        "disk_total_bytes": 30 * 1024**3,
        "can_record": True,
        "spool_segments": 0,
        "spool_bytes": 0,
        "camera_present": True,
        "mic_level_dbfs": -30.0,
        "clock_synced": True,
        "uptime_s": 3600.0,
        "agent_version": "0.1.0",
        "rejected_messages": 0,
    }
    values.update(overrides)
    return Health(**values)


def enrol(stack: WebStack, device_id: str, school: str, room: str, *, online: bool = True) -> None:
    """Registers a unit and, if ``online``, brings it online with an idle health sample."""
    stack.registry.add_device(device_id, school, room)
    if online:
        stack.registry.on_status(device_id, Status(online=True, epoch=1, agent_version="0.1.0"))
        stack.registry.on_health(device_id, unit_health())
