"""``classcap controller run``: broker, MQTT service and web server in one supervised process.

Start order follows dependencies (database, storage, broker, MQTT, schedules, web) and stop
runs it backwards, so no part ever talks to one already gone. Under systemd the
process reports readiness and feeds the watchdog only while every part is alive.
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, cast

import sdnotify
from waitress import wasyncore
from waitress.server import BaseWSGIServer, MultiSocketServer, create_server

from controller.alerts import AlertEngine, AlertThresholds
from controller.broker import BrokerSettings, MosquittoSupervisor
from controller.catalogue import Catalogue
from controller.commands import CommandService
from controller.config import ControllerConfig, load_or_create_secret
from controller.db import Database
from controller.mqtt_service import MqttService
from controller.provision import ensure_controller_identity
from controller.registry import Registry
from controller.schedule_service import ScheduleService, ScheduleSettings
from controller.schedules import ScheduleStore
from controller.storage.base import Storage
from controller.storage.local import make_storage
from controller.web import create_app
from controller.web.services import WebConfig, WebServices

log = logging.getLogger(__name__)

BROKER_CONNECT_TIMEOUT_S = 15.0
_PASSWORD_POLL_S = 1.0
_STOP_TIMEOUT_S = 10


class StartError(RuntimeError):
    """The controller could not start; the message says which part and why."""


class EmbeddedBroker(MosquittoSupervisor):
    """The controller's Mosquitto, reloaded whenever its password file changes, so a unit
    added by ``classcap controller device add`` in another process can connect at once."""

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__(settings)
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def write_config(self) -> Path:
        path = super().write_config()
        with path.open("a", encoding="utf-8") as handle:
            # Started as root, mosquitto switches to the 'mosquitto' user, who cannot read
            # the owner-only password file: keep it running as whoever runs the controller.
            handle.write(f"user {pwd.getpwuid(os.geteuid()).pw_name}\n")
            # The client id is the user name, so no unit can take over another's session.
            handle.write("use_username_as_clientid true\n")
        return path

    def start(self, timeout: float = 10.0) -> None:
        super().start(timeout)
        self._watch_stop.clear()
        self._watcher = threading.Thread(
            target=self._watch_passwords, name="broker-passwords", daemon=True
        )
        self._watcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
            self._watcher = None
        super().stop(timeout)

    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def _watch_passwords(self) -> None:
        path = self.settings.directory / "passwords"
        seen = _file_state(path)
        while not self._watch_stop.wait(_PASSWORD_POLL_S):
            state = _file_state(path)
            if state != seen:
                seen = state
                log.info("broker password file changed, reloading path=%s", path)
                self.reload()


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def broker_settings(config: ControllerConfig) -> BrokerSettings:
    embedded = config.broker.embedded
    return BrokerSettings(
        directory=embedded.directory,
        host=embedded.host,
        port=embedded.port,
        tls_port=embedded.tls_port,
        certfile=embedded.certfile,
        keyfile=embedded.keyfile,
        cafile=embedded.cafile,
    )


class ControllerService:
    """Every part of a running controller. ``start`` once, ``stop`` once (also after a
    failed ``start``, which stops what it had started before raising)."""

    def __init__(self, config: ControllerConfig, *, storage: Storage | None = None) -> None:
        self.config = config
        self._storage_override = storage
        self.broker: EmbeddedBroker | None = None
        self._db: Database | None = None
        self._mqtt: MqttService | None = None
        self._schedules: ScheduleService | None = None
        self._web: BaseWSGIServer | MultiSocketServer | None = None
        self._web_thread: threading.Thread | None = None
        self._web_map: dict[int, Any] = {}
        self._listener: socket.socket | None = None
        self._services: WebServices | None = None
        self.base_url = ""
        self.web_port = 0

    # --- parts, once started ----------------------------------------------------------------

    @property
    def services(self) -> WebServices:
        if self._services is None:
            raise RuntimeError("controller not started")
        return self._services

    @property
    def mqtt(self) -> MqttService:
        if self._mqtt is None:
            raise RuntimeError("controller not started")
        return self._mqtt

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        config = self.config
        secret = load_or_create_secret(config.server.secret_key_file)
        self._listener = _listen(config.server.host, config.server.port)
        self.web_port = int(self._listener.getsockname()[1])
        self.base_url = config.server.base_url(self.web_port)

        db = Database(config.database.url)
        self._db = db
        if config.database.migrate_on_start:
            db.migrate()
        storage = self._storage_override or make_storage(config.storage, self.base_url, secret)
        alerts = AlertEngine(db, alert_thresholds(config))
        registry = Registry(db, alerts)
        commands = CommandService(db)
        catalogue = Catalogue(
            db,
            storage,
            grant_expires_s=config.storage.grant_expires_s,
            download_expires_s=config.storage.download_expires_s,
        )

        if config.broker.mode == "embedded":
            ensure_controller_identity(config)
            self.broker = EmbeddedBroker(broker_settings(config))
            self.broker.start()

        mqtt = MqttService(config, registry, commands, catalogue, alerts)
        self._mqtt = mqtt
        mqtt.start()
        if not mqtt.wait_connected(BROKER_CONNECT_TIMEOUT_S):
            # An external broker may come later; the service keeps trying meanwhile.
            log.warning("broker not reachable yet url=%s", config.broker.connect_url)

        # After MQTT: its first refresh publishes every unit's windows.
        schedule_store = ScheduleStore(db)
        schedules = ScheduleService(
            db, schedule_store, registry, mqtt.publish_desired, schedule_settings(config)
        )
        self._schedules = schedules
        schedules.start()

        self._services = WebServices(
            db=db,
            registry=registry,
            commands=commands,
            catalogue=catalogue,
            alerts=alerts,
            storage=storage,
            publish_command=mqtt.send_command,
            publish_desired=mqtt.publish_desired,
            mqtt_metrics=mqtt.metrics,
            schedule_store=schedule_store,
            schedules=schedules,
        )
        app = create_app(
            self._services,
            WebConfig(
                secret_key=secret,
                session_lifetime_s=config.auth.session_lifetime_s,
                secure_cookies=self.base_url.startswith("https://"),
            ),
        )
        self._web = create_server(
            app,
            map=self._web_map,
            sockets=[self._listener],
            threads=config.server.threads,
            ident="classcap",
        )
        self._web_thread = threading.Thread(target=self._web.run, name="web", daemon=True)
        self._web_thread.start()
        log.info("controller started url=%s broker=%s", self.base_url, config.broker.connect_url)

    def stop(self) -> None:
        web, self._web = self._web, None
        log.info("stopping web server")
        if web is not None:
            # Closing every channel from the server's own loop thread ends its loop;
            # waitress's stubs type the loop's wake-up trigger as an int.
            loop_trigger: Any = cast(Any, web).trigger
            loop_trigger.pull_trigger(lambda: wasyncore.close_all(self._web_map))
            if self._web_thread is not None:
                self._web_thread.join(_STOP_TIMEOUT_S)
            web.task_dispatcher.shutdown(timeout=_STOP_TIMEOUT_S)
        elif self._listener is not None:
            self._listener.close()
        self._listener = None
        schedules, self._schedules = self._schedules, None
        if schedules is not None:
            log.info("stopping schedule service")
            schedules.stop()
        mqtt, self._mqtt = self._mqtt, None
        if mqtt is not None:
            log.info("stopping mqtt service")
            mqtt.stop()
        broker, self.broker = self.broker, None
        if broker is not None:
            log.info("stopping broker")
            broker.stop()
        db, self._db = self._db, None
        if db is not None:
            db.dispose()
        log.info("controller stopped")

    def reload_broker(self) -> None:
        if self.broker is not None:
            self.broker.reload()

    def healthy(self) -> bool:
        """Every part alive: what the systemd watchdog is fed on."""
        web_alive = self._web_thread is not None and self._web_thread.is_alive()
        broker_alive = self.broker is None or self.broker.running()
        return web_alive and broker_alive and self._mqtt is not None and self._mqtt.alive()


def alert_thresholds(config: ControllerConfig) -> AlertThresholds:
    alerts = config.alerts
    return AlertThresholds(
        offline_after_s=alerts.offline_after_s,
        disk_free_min_mb=alerts.disk_free_min_mb,
        temp_max_c=alerts.temp_max_c,
        backlog_max_segments=alerts.backlog_max_segments,
        mic_silent_dbfs=alerts.mic_silent_dbfs,
    )


def schedule_settings(config: ControllerConfig) -> ScheduleSettings:
    schedule = config.schedule
    return ScheduleSettings(
        horizon_days=schedule.horizon_days,
        refresh_interval_s=schedule.refresh_interval_s,
        check_interval_s=schedule.check_interval_s,
        missed_grace_s=schedule.missed_grace_s,
        at_risk_before_s=schedule.at_risk_before_s,
    )


def _listen(host: str, port: int) -> socket.socket:
    """The web socket, bound before anything else so its port (0: any) is known for URLs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot listen on {host}:{port}: {exc}") from None
    return sock


def run(config: ControllerConfig) -> int:
    """Runs until SIGTERM or SIGINT; SIGHUP reloads the embedded broker's users."""
    service = ControllerService(config)
    stop = threading.Event()
    notifier = sdnotify.SystemdNotifier()
    if notifier.socket is not None:
        # A full notify queue (10 datagrams unless systemd drains it) would otherwise block
        # the main loop in sendall, and with it every signal the loop acts on.
        notifier.socket.setblocking(False)

    stop_or_reload = threading.Event()

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        stop_or_reload.set()

    # Handlers only raise flags: work done inside a signal handler can re-enter a lock
    # the main thread already holds and deadlock it.
    reload = threading.Event()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        reload.set()
        stop_or_reload.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        service.start()
    except Exception as exc:
        log.error("controller failed to start: %s", exc)
        return 1
    notifier.notify(f"READY=1\nSTATUS=serving {service.base_url}")
    interval = _watchdog_interval()
    next_ping = time.monotonic()
    try:
        while not stop.is_set():
            stop_or_reload.wait(min(interval or 1.0, 1.0))
            stop_or_reload.clear()
            if reload.is_set():
                reload.clear()
                log.info("SIGHUP received, reloading broker users")
                service.reload_broker()
            if interval is not None and time.monotonic() >= next_ping and service.healthy():
                notifier.notify("WATCHDOG=1")
                next_ping = time.monotonic() + interval
    finally:
        log.info("stop requested, stopping")
        notifier.notify("STOPPING=1")
        service.stop()
    return 0


def _watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC when systemd's watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec), 1) / 2 / 1_000_000
    except ValueError:
        log.warning("watchdog ignored: WATCHDOG_USEC=%r is not an integer", usec)
        return None
