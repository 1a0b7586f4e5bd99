"""Each fault the simulator injects: how it starts, how it ends, and what it should cause.

``start`` and ``end`` run on the simulator's main thread (processes must be started
there, see ``procs.spawn``) and return quickly; whatever has to be waited for is a
check left to the observer. Each note is logged as ``fault=<kind> unit=<id> note=...``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from controller.sim import hostile, procs
from controller.sim.api import ControllerApi, parse_time
from controller.sim.checks import (
    Check,
    FaultRecord,
    Observer,
    latest_health,
    metric,
)
from controller.sim.fleet import ControllerProcess, Unit
from controller.sim.hostile import Probe
from controller.sim.scenario import FaultKind
from controller.sim.storage_proxy import ProxyMode, StorageProxy
from shared.clock import utcnow

log = logging.getLogger(__name__)

# How long a unit may take to begin an upload the fault can cut.
_UPLOAD_WAIT_S = 90.0
_BACK_WAIT_S = 60.0
# Health the controller should have from a unit within this long (a few health intervals).
_HEALTH_WAIT_S = 30.0
_REJECTED = "classcap_mqtt_messages_rejected_total"
_CONNECTED = "classcap_mqtt_connected"
_MIB = 1024 * 1024
# A budget this far above the free space makes a unit behave as on a full disk.
_DISK_FULL_MARGIN_MB = 10 * 1024
_SETTLE_S = 3.0


class FaultError(Exception):
    """The fault could not be injected as asked; the message says why."""


@dataclass
class Fleet:
    """What faults act on."""

    controller: ControllerProcess
    units: dict[str, Unit]
    proxy: StorageProxy
    api: ControllerApi
    observer: Observer


class Fault(ABC):
    def __init__(self, record: FaultRecord, fleet: Fleet) -> None:
        self.record = record
        self.spec = record.spec
        self.fleet = fleet

    @property
    def unit(self) -> Unit:
        assert self.spec.unit is not None
        return self.fleet.units[self.spec.unit]

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def end(self) -> None: ...

    def _restart_unit(self) -> None:
        self.unit.start(wait_connected=False)
        pid = self.unit.proc.pid if self.unit.proc else "-"
        self.record.note(f"agent started again pid={pid}")

    def _health_says(
        self, name: str, since: datetime, wanted: dict[str, Any], *, stamped_since: bool = False
    ) -> None:
        """Checks, later, that the controller takes health from the unit, sent after
        ``since``, whose fields have the ``wanted`` values; with ``stamped_since`` the unit's
        own stamp on it must be after ``since`` too."""
        api, device = self.fleet.api, self.unit.device_id

        def matches() -> bool:
            health, at = latest_health(api, device)
            return (
                health is not None
                and at > since
                and all(health.get(k) == v for k, v in wanted.items())
                and (not stamped_since or parse_time(health["ts"]) > since)
            )

        def check() -> Check:
            if not procs.wait_for(matches, _HEALTH_WAIT_S, 0.5):
                return Check(name, False, f"no health with {wanted} in {_HEALTH_WAIT_S:.0f} s")
            return Check(name, True, "", raised_at=latest_health(api, device)[1])

        self.fleet.observer.later(self.record, name, check)


class AgentKill(Fault):
    """SIGKILL to the agent and its encoder in the middle of a segment (a power cut)."""

    def start(self) -> None:
        status = self.unit.status() or {}
        self.unit.kill()
        self.record.note(f"agent and encoder killed with SIGKILL while {status.get('state', '?')}")

    def end(self) -> None:
        self._restart_unit()


class AgentKillUploading(Fault):
    """SIGKILL while a segment's PUT is on its way: the proxy holds the unit's next PUT,
    the unit is killed with it open, and the held request is cut."""

    def start(self) -> None:
        proxy, device = self.fleet.proxy, self.unit.device_id
        proxy.hold_uploads(device)
        try:
            if not procs.wait_for(lambda: proxy.held(device) > 0, _UPLOAD_WAIT_S, 0.05):
                raise FaultError(f"no upload of {device} began within {_UPLOAD_WAIT_S:.0f} s")
            status = self.unit.status() or {}
            self.unit.kill()
            self.record.note(
                f"agent killed with SIGKILL during a PUT while {status.get('state', '?')}"
            )
        finally:
            proxy.release_uploads(device)

    def end(self) -> None:
        self._restart_unit()


class BrokerOutage(Fault):
    """The controller's Mosquitto freezes (SIGSTOP: every connection hangs, as with a dead
    host) for the fault's duration, then dies (SIGKILL) and its supervisor restarts it,
    with whatever it had not saved to its persistence file lost."""

    _pid: int | None = None

    def start(self) -> None:
        pid = self.fleet.controller.broker_pid()
        if pid is None:
            raise FaultError("the controller's broker is not running")
        os.kill(pid, signal.SIGSTOP)
        self._pid = pid
        self.record.note(f"broker frozen pid={pid}")

    def end(self) -> None:
        pid = self._pid
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        self.record.note(f"broker killed pid={pid}")
        killed = utcnow()
        controller = self.fleet.controller

        def restarted() -> bool:
            new = controller.broker_pid()
            return new is not None and new != pid

        def check() -> Check:
            back = procs.wait_for(restarted, _BACK_WAIT_S) and procs.wait_for(
                lambda: metric(self.fleet.api, _CONNECTED) == 1, _BACK_WAIT_S
            )
            detail = f"broker pid {pid} -> {controller.broker_pid()}"
            return Check("broker restarted, controller back on it", back, detail, killed,
                         utcnow() if back else None)  # fmt: skip

        self.fleet.observer.later(self.record, "broker restarted", check)


class ControllerRestart(Fault):
    """SIGTERM to the controller (its broker stops with it), then a start with the same
    config and database after the fault's duration."""

    def start(self) -> None:
        self.fleet.controller.stop()
        self.record.note("controller stopped with SIGTERM")

    def end(self) -> None:
        stopped = self.record.started_at or utcnow()
        self.fleet.controller.start()
        self.record.note("controller started again")
        name = "controller back, connected to its broker"

        def check() -> Check:
            back = procs.wait_for(lambda: metric(self.fleet.api, _CONNECTED) == 1, _BACK_WAIT_S)
            return Check(name, back, "", stopped, utcnow() if back else None)

        self.fleet.observer.later(self.record, name, check)


class StorageFault(Fault):
    """The store answers 503, stalls, or refuses connections, then recovers."""

    MODES = {
        FaultKind.STORAGE_ERRORS: ProxyMode.ERROR,
        FaultKind.STORAGE_TIMEOUTS: ProxyMode.STALL,
        FaultKind.STORAGE_UNREACHABLE: ProxyMode.REFUSE,
    }
    _before: dict[str, int]

    def start(self) -> None:
        self._before = dict(self.fleet.proxy.counts)
        self.fleet.proxy.set_mode(self.MODES[self.spec.kind])
        self.record.note(f"storage proxy mode={self.MODES[self.spec.kind].value}")

    def end(self) -> None:
        self.fleet.proxy.set_mode(ProxyMode.PASS)
        counts = self.fleet.proxy.counts
        during = {k: counts[k] - self._before.get(k, 0) for k in ("answered_503", "stalled")}
        self.record.note(
            f"storage passing again; during the fault: {during['answered_503']} requests "
            f"answered 503, {during['stalled']} connections stalled"
        )


class DiskFull(Fault):
    """The unit's disk budget is raised above its free space and the agent restarted, so it
    sees a full disk: it must refuse to record (a press is tried) while it still uploads."""

    _budget: int = 0

    def start(self) -> None:
        unit = self.unit
        unit.stop()
        settings = unit.agent_settings()
        spool = settings.setdefault("spool", {})
        self._budget = int(spool.get("min_free_mb", 0))
        spool["min_free_mb"] = shutil.disk_usage(unit.data_dir).free // _MIB + _DISK_FULL_MARGIN_MB
        unit.write_settings(settings)
        restarted = utcnow()
        unit.start(wait_connected=False)
        self.record.note(f"disk budget raised to {spool['min_free_mb']} MB, agent restarted")
        self._health_says("unit reports it cannot record", restarted, {"can_record": False})
        time.sleep(_SETTLE_S)
        unit.press("short")
        time.sleep(_SETTLE_S)
        state = (unit.status() or {}).get("state")
        refused = state != "recording"
        self.record.checks.append(
            Check("a press is refused while the disk is full", refused, f"then {state}")
        )
        if not refused:
            unit.press("short")  # stop it again: the scenario did not ask for this one

    def end(self) -> None:
        unit = self.unit
        unit.stop()
        settings = unit.agent_settings()
        settings.setdefault("spool", {})["min_free_mb"] = self._budget
        unit.write_settings(settings)
        restarted = utcnow()
        unit.start(wait_connected=False)
        self.record.note(f"disk budget back to {self._budget} MB, agent restarted")
        self._health_says("unit reports it can record again", restarted, {"can_record": True})


class HostileMessages(Fault):
    """The unit's agent is stopped and its credentials used for malformed and hostile
    traffic (see ``hostile``); the agent starts again when the fault ends."""

    def start(self) -> None:
        unit = self.unit
        victim = next(u for u in self.fleet.units if u != unit.device_id)
        unit.stop()
        self.record.note("agent stopped; its credentials are used by the attacker")
        password = (unit.directory / "broker-password").read_text(encoding="utf-8").strip()
        broker = self.fleet.controller.config.broker
        before = metric(self.fleet.api, _REJECTED) or 0.0
        probes = hostile.attack(broker.host, broker.port, unit.device_id, password, victim)
        self.record.notes += [f"{p.what} on {p.topic}: {p.outcome}" for p in probes]
        refused = [p for p in probes if p.expect == "broker refuses"]
        self.record.checks.append(
            Check(
                "broker refuses every out-of-bounds message",
                all(p.held for p in refused),
                f"{sum(p.held for p in refused)} of {len(refused)}",
            )
        )
        self._rejected(probes, before)

    def _rejected(self, probes: list[Probe], before: float) -> None:
        sent = [p for p in probes if p.expect == "controller rejects"]
        name = "controller rejects every malformed message"

        def rejected() -> float:
            return (metric(self.fleet.api, _REJECTED) or 0.0) - before

        def check() -> Check:
            procs.wait_for(lambda: rejected() >= len(sent), _HEALTH_WAIT_S)
            count = rejected()
            ok = all(p.held for p in sent) and count >= len(sent)
            return Check(name, ok, f"{count:.0f} of {len(sent)}")

        self.fleet.observer.later(self.record, name, check)

    def end(self) -> None:
        self._restart_unit()


class ClockJump(Fault):
    """The unit's wall clock is set ``offset_s`` off and unsynchronised, as on a Pi without
    a real-time clock that booted on a stale saved time; at the end NTP steps it right."""

    def start(self) -> None:
        offset_s = self.spec.offset_s
        before = utcnow()
        self.unit.set_clock(offset_s, synced=False)
        self.record.note(f"unit clock set {offset_s:+g} s off, unsynchronised")
        self._health_says("unit reports its clock unsynchronised", before, {"clock_synced": False})

    def end(self) -> None:
        before = utcnow()
        self.unit.set_clock(0.0, synced=True)
        self.record.note("unit clock stepped right by NTP, synchronised")
        # Health stamped by the corrected clock must count again, whichever way it jumped.
        self._health_says(
            "health taken again after clock set right",
            before,
            {"clock_synced": True},
            stamped_since=True,
        )


_KINDS: dict[FaultKind, type[Fault]] = {
    FaultKind.AGENT_KILL: AgentKill,
    FaultKind.AGENT_KILL_UPLOADING: AgentKillUploading,
    FaultKind.BROKER_OUTAGE: BrokerOutage,
    FaultKind.CONTROLLER_RESTART: ControllerRestart,
    FaultKind.STORAGE_ERRORS: StorageFault,
    FaultKind.STORAGE_TIMEOUTS: StorageFault,
    FaultKind.STORAGE_UNREACHABLE: StorageFault,
    FaultKind.DISK_FULL: DiskFull,
    FaultKind.HOSTILE_MESSAGES: HostileMessages,
    FaultKind.CLOCK_JUMP: ClockJump,
}


def make_fault(record: FaultRecord, fleet: Fleet) -> Fault:
    return _KINDS[record.spec.kind](record, fleet)
