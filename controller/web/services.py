"""What the web app is given: the controller's services and its own settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flask import current_app

from controller.alerts import AlertEngine
from controller.catalogue import Catalogue
from controller.commands import CommandService
from controller.db import Database
from controller.registry import Registry
from controller.schedule_service import ScheduleService
from controller.schedules import ScheduleStore
from controller.storage.base import Storage
from shared.messages import DesiredState

EXTENSION_KEY = "classcap"


@dataclass(frozen=True)
class WebServices:
    db: Database
    registry: Registry
    commands: CommandService
    catalogue: Catalogue
    alerts: AlertEngine
    # A LocalStorage also gets the /storage/objects routes that units upload to.
    storage: Storage
    # Sends a queued command now if its unit is online (MqttService.send_command).
    publish_command: Callable[[str], None]
    # Publishes a unit's retained desired document after it changed.
    publish_desired: Callable[[str, DesiredState], None] | None = None
    # MQTT counters by name without prefix, e.g. {"messages_rejected_total": 3}.
    mqtt_metrics: Callable[[], Mapping[str, float]] | None = None
    # Schools and plans, and the service that turns them into units' windows.
    schedule_store: ScheduleStore | None = None
    schedules: ScheduleService | None = None


@dataclass(frozen=True)
class WebConfig:
    secret_key: bytes
    session_lifetime_s: int = 8 * 3600
    # Set when the dashboard is served over HTTPS, so the session cookie never travels in clear.
    secure_cookies: bool = False
    refresh_interval_s: float = 5.0
    title: str = "classcap"

    def __post_init__(self) -> None:
        if len(self.secret_key) < 16:
            raise ValueError("secret_key must have at least 16 bytes")
        if self.session_lifetime_s < 60:
            raise ValueError("session_lifetime_s must be at least 60")
        if self.refresh_interval_s < 1:
            raise ValueError("refresh_interval_s must be at least 1")


def services() -> WebServices:
    found = current_app.extensions[EXTENSION_KEY]
    assert isinstance(found, WebServices)
    return found


def web_config() -> WebConfig:
    found = current_app.extensions[EXTENSION_KEY + ".config"]
    assert isinstance(found, WebConfig)
    return found
