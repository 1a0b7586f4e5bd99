"""What a fault should cause, and looking for it: each check waits (bounded) for the
controller to show it, on a thread of its own so the timeline keeps its times."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controller.sim.api import ApiError, ControllerApi, parse_time
from controller.sim.scenario import FaultSpec

log = logging.getLogger(__name__)

_NEVER = datetime.min.replace(tzinfo=UTC)
# Beyond this many units an alert's check counts them instead of naming them.
_UNITS_NAMED = 4


@dataclass
class Check:
    """One thing a fault was expected to cause, and whether it did."""

    name: str
    ok: bool
    detail: str = ""
    raised_at: datetime | None = None
    cleared_at: datetime | None = None


@dataclass
class FaultRecord:
    spec: FaultSpec
    started_at: datetime | None = None
    # When the fault took effect (its start done), on the monotonic clock: its duration
    # counts from here, however late the timeline ran.
    in_effect: float | None = None
    ended_at: datetime | None = None
    notes: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    error: str | None = None

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info("fault=%s unit=%s note=%s", self.spec.kind.value, self.spec.unit or "-", text)


class Observer:
    """Runs checks in the background; ``join`` waits for all of them before the report."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def later(self, record: FaultRecord, name: str, check: Callable[[], Check]) -> None:
        def run() -> None:
            try:
                found = check()
            except (ApiError, OSError, ValueError, KeyError) as exc:
                found = Check(name, False, f"could not be checked: {exc}")
            record.checks.append(found)
            log.info(
                "fault=%s check=%r ok=%s %s", record.spec.kind.value, name, found.ok, found.detail
            )

        thread = threading.Thread(target=run, name=f"check-{record.spec.kind.value}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def latest_health(api: ControllerApi, device_id: str) -> tuple[dict[str, Any] | None, datetime]:
    """The unit's latest health the controller took, and when it took it."""
    try:
        device = api.device(device_id)
    except ApiError:
        return None, _NEVER
    at = device.get("health_at")
    if device.get("health") is None or at is None:
        return None, _NEVER
    health: dict[str, Any] = device["health"]
    return health, parse_time(at)


def metric(api: ControllerApi, name: str) -> float | None:
    try:
        return api.metrics().get(name)
    except ApiError:
        return None


def alert_checks(record: FaultRecord, alerts: list[dict[str, Any]], grace_s: float) -> list[Check]:
    """For each alert kind the fault should raise: raised on its unit (any unit for a
    fleet-wide fault) between its start and ``grace_s`` after its end, and cleared since."""
    if record.started_at is None:
        return []
    since = record.started_at.timestamp() - 1
    until = (record.ended_at or datetime.now(UTC)).timestamp() + grace_s
    checks = []
    for kind in record.spec.alerts():
        found = [
            a
            for a in alerts
            if a["kind"] == kind
            and (record.spec.unit is None or a["device_id"] == record.spec.unit)
            and since <= parse_time(a["raised_at"]).timestamp() <= until
        ]
        cleared = [parse_time(a["cleared_at"]) for a in found if a["cleared_at"] is not None]
        units = sorted({a["device_id"] for a in found})
        where = ", ".join(units) if len(units) <= _UNITS_NAMED else f"{len(units)} units"
        all_cleared = bool(found) and len(cleared) == len(found)
        first = min((parse_time(a["raised_at"]) for a in found), default=None)
        detail = f"on {where}" if units else "not raised"
        if first is not None and record.ended_at is not None and first > record.ended_at:
            detail += ", only after the fault ended"
        if found and not all_cleared:
            detail += ", not cleared"
        checks.append(
            Check(
                f"alert {kind}",
                all_cleared,
                detail,
                raised_at=first,
                cleared_at=max(cleared) if all_cleared else None,
            )
        )
    return checks
