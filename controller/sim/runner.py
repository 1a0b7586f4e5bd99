"""One simulation run: set the district up, play the scenario's timeline, let uploads drain,
check the alerts each fault should have raised, stop everything, reconcile.

Order of the run (each step logged as ``sim step=...``):
SeaweedFS, the storage proxy, enrolment, the controller, the units, the lessons; the
timeline (presses and each fault's start and end, at their second from t0); recordings
still running are stopped as a teacher would; uploads drain; alerts are read; units and
controller stop; the reconciler compares every journal with catalogue and storage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from controller.sim import enrol, lessons, procs, reconciling
from controller.sim.api import ApiError, ControllerApi
from controller.sim.checks import FaultRecord, Observer, alert_checks
from controller.sim.faults import Fault, FaultError, Fleet, make_fault
from controller.sim.fleet import ControllerProcess, Unit, stop_all
from controller.sim.scenario import PressSpec, Scenario
from controller.sim.seaweed import Seaweed
from controller.sim.storage_proxy import StorageProxy
from device.control_socket import ControlError
from shared.clock import utcnow

log = logging.getLogger(__name__)

# Lessons are placed this far after they are created, so every unit has its schedule first.
_LESSON_LEAD_S = 10.0
_ONLINE_WAIT_S = 60.0
# An alert counts for a fault when raised between its start and this long after its end.
_ALERT_GRACE_S = 60.0
_IDLE_WAIT_S = 60.0
# Checks still waiting for the controller get this long once the timeline is over.
_CHECKS_WAIT_S = 60.0
_FAULT_ERRORS = (FaultError, RuntimeError, OSError, ControlError, ApiError)


class Interrupted(Exception):
    """The simulator was asked to stop (SIGINT or SIGTERM)."""


@dataclass
class PressRecord:
    spec: PressSpec
    unit: str
    at: datetime | None = None
    outcome: str = ""


@dataclass
class RunResult:
    scenario: Scenario
    root: Path
    t0: datetime | None = None
    faults: list[FaultRecord] = field(default_factory=list)
    presses: list[PressRecord] = field(default_factory=list)
    lesson_units: int = 0
    drained: bool = False
    alerts: list[dict[str, Any]] = field(default_factory=list)
    reconcile: dict[str, Any] | None = None
    reconcile_text: str = ""
    reconcile_exit: int | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def faults_ok(self) -> bool:
        return all(r.error is None and all(c.ok for c in r.checks) for r in self.faults)

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and self.drained
            and self.reconcile_exit == 0
            and self.faults_ok
            and all(r.ended_at is not None for r in self.faults)
        )


@dataclass
class _Step:
    at_s: float
    order: int  # at one second: fault ends, then fault starts, then presses
    label: str
    action: Callable[[], None]


class Simulation:
    def __init__(self, scenario: Scenario, root: Path, stop: threading.Event) -> None:
        self.scenario = scenario
        self.root = root
        self._stop = stop
        self.result = RunResult(scenario, root)
        self._seaweed = Seaweed(root / "seaweedfs")
        self._proxy: StorageProxy | None = None
        self._controller: ControllerProcess | None = None
        self._units: dict[str, Unit] = {}
        self._api: ControllerApi | None = None
        self._observer = Observer()

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> RunResult:
        result = self.result
        set_up = False
        try:
            try:
                self._set_up()
                set_up = True
                self._play()
                self._finish_recordings()
                result.drained = self._drain()
                self._observer.join(_CHECKS_WAIT_S)
                result.alerts = self._api_or_fail().alerts()
                for record in result.faults:
                    record.checks += alert_checks(record, result.alerts, _ALERT_GRACE_S)
            except Interrupted:
                result.errors.append("interrupted before the end of the run")
            except (RuntimeError, OSError, ValueError, ApiError) as exc:
                log.exception("sim step=run failed")
                result.errors.append(f"run failed: {exc}")
            finally:
                self._step("stop units and controller")
                stop_all(list(self._units.values()))
                if self._controller is not None:
                    self._controller.stop()
            if set_up:
                self._reconcile()
        finally:
            self._step("stop storage")
            if self._proxy is not None:
                self._proxy.stop()
            self._seaweed.stop()
        return result

    def _set_up(self) -> None:
        scenario, root = self.scenario, self.root
        self._step("start storage")
        self._seaweed.start(enrol.BUCKET)
        self._proxy = StorageProxy(self._seaweed.s3_port, procs.steady_port())
        self._proxy.start()
        self._step("enrol units")
        config_path = root / "controller.toml"
        config = enrol.write_controller_config(
            config_path, root, scenario, self._seaweed, self._proxy.url
        )
        self._units = enrol.enrol_units(config, scenario, root / "units")
        token = enrol.admin_token(config)
        self._step("start controller")
        self._controller = ControllerProcess(config_path, root / "controller.log")
        self._controller.start()
        self._api = ControllerApi(self._controller.base_url, token)
        self._step("start units")
        for unit in self._units.values():
            unit.launch()
        for unit in self._units.values():
            self._check_stop()
            unit.wait_ready()
        api = self._api
        want = set(self._units)
        if not procs.wait_for(lambda: want <= api.online(), _ONLINE_WAIT_S + len(want), 1.0):
            raise RuntimeError(f"units not online: {sorted(want - api.online())}")
        log.info("sim step=fleet online units=%d", len(want))

    def _play(self) -> None:
        scenario, result = self.scenario, self.result
        t0 = _whole_second(utcnow())
        if scenario.school.periods and scenario.school.plans:
            self._step("create lessons")
            t0 += timedelta(seconds=_LESSON_LEAD_S)
            rooms = {u.device_id: u.room for u in self._units.values()}
            result.lesson_units = lessons.create(self._api_or_fail(), scenario, rooms, t0)
        late = (utcnow() - t0).total_seconds()
        if late > 0:
            log.warning("sim timeline starts late late_s=%.1f", late)
        start = time.monotonic() - late
        result.t0 = t0
        self._step(f"timeline t0={t0.isoformat()}")
        for step in self._steps():
            self._wait_until(start + step.at_s)
            behind = time.monotonic() - start - step.at_s
            log.info("sim at_s=%.1f behind_s=%.1f step=%s", step.at_s, behind, step.label)
            step.action()
        self._wait_until(start + scenario.duration_s)

    def _steps(self) -> list[_Step]:
        steps: list[_Step] = []
        fleet = Fleet(
            self._controller_or_fail(),
            self._units,
            self._proxy_or_fail(),
            self._api_or_fail(),
            self._observer,
        )
        for spec in sorted(self.scenario.faults, key=lambda f: f.at_s):
            record = FaultRecord(spec)
            self.result.faults.append(record)
            fault = make_fault(record, fleet)
            label = f"fault {spec.kind.value}" + (f" unit={spec.unit}" if spec.unit else "")
            steps.append(_Step(spec.at_s, 1, f"{label} start", self._starter(fault)))
            steps.append(_Step(spec.end_s, 0, f"{label} end", self._ender(fault)))
        for press in sorted(self.scenario.presses, key=lambda p: p.at_s):
            for unit in press.targets():
                pressed = PressRecord(press, unit)
                self.result.presses.append(pressed)
                label = f"press {press.kind} via {press.via} unit={unit}"
                steps.append(_Step(press.at_s, 2, label, self._presser(pressed)))
        return sorted(steps, key=lambda s: (s.at_s, s.order))

    def _starter(self, fault: Fault) -> Callable[[], None]:
        def start() -> None:
            record = fault.record
            record.started_at = utcnow()
            try:
                fault.start()
            except _FAULT_ERRORS as exc:
                record.error = f"start failed: {exc}"
                log.error("fault=%s start failed: %s", fault.spec.kind.value, exc)
            record.in_effect = time.monotonic()

        return start

    def _ender(self, fault: Fault) -> Callable[[], None]:
        def end() -> None:
            record = fault.record
            # However late its start ran, a fault lasts its whole duration.
            if record.in_effect is not None:
                self._wait_until(record.in_effect + fault.spec.duration_s)
            try:
                fault.end()
            except _FAULT_ERRORS as exc:
                record.error = record.error or f"end failed: {exc}"
                log.error("fault=%s end failed: %s", fault.spec.kind.value, exc)
            record.ended_at = utcnow()

        return end

    def _presser(self, record: PressRecord) -> Callable[[], None]:
        def press() -> None:
            record.at = utcnow()
            spec = record.spec
            unit = self._units[record.unit]
            before = str((unit.status() or {}).get("state", "?"))
            try:
                if spec.via == "dashboard":
                    record.outcome = self._command(unit, spec.kind, before)
                    return
                unit.press(spec.kind)
            except (ControlError, ApiError) as exc:
                record.outcome = f"not pressed: {exc}"
                log.warning("press failed unit=%s error=%s", unit.device_id, exc)
                return
            record.outcome = f"pressed while {before}"

        return press

    def _command(self, unit: Unit, kind: str, state: str) -> str:
        """The dashboard's start, stop or bookmark, as the command it sends."""
        action = {"start": "start_recording", "stop": "stop_recording"}.get(kind, kind)
        body = {"action": action, "expires_in_s": 30}
        sent = self._api_or_fail().call("POST", f"/devices/{unit.device_id}/commands", body)
        return f"{action} command {sent['id']} {sent['status']} while {state}"

    def _finish_recordings(self) -> None:
        """A teacher stops, from the dashboard, whatever still records when the scenario ends
        (a command, not a press: a press right after the scenario's last one would make
        the two a double press)."""
        self._step("stop recordings still running")
        api = self._api_or_fail()
        for unit in self._units.values():
            if (unit.status() or {}).get("state") == "recording":
                log.info("sim stopping a recording left running unit=%s", unit.device_id)
                body = {"action": "stop_recording", "expires_in_s": 60}
                api.call("POST", f"/devices/{unit.device_id}/commands", body)
        units = list(self._units.values())
        if not procs.wait_for(
            lambda: all((u.status() or {}).get("state") == "idle" for u in units), _IDLE_WAIT_S, 1
        ):
            busy = [u.device_id for u in units if (u.status() or {}).get("state") != "idle"]
            self.result.errors.append(f"units not idle after the run: {', '.join(busy)}")

    def _drain(self) -> bool:
        """Waits until no unit holds a segment the store has not confirmed."""
        self._step("drain uploads")
        units = list(self._units.values())
        deadline = time.monotonic() + self.scenario.drain_timeout_s
        next_log = 0.0
        while True:
            self._check_stop()
            pending = {u.device_id: _pending(u) for u in units}
            waiting = {k: v for k, v in pending.items() if v != 0}
            if not waiting:
                log.info("sim drained: every segment confirmed stored")
                return True
            if time.monotonic() > deadline:
                self.result.errors.append(f"uploads not drained: {waiting}")
                return False
            if time.monotonic() >= next_log:
                log.info("sim draining pending=%s", waiting)
                next_log = time.monotonic() + 10
            time.sleep(1)

    def _reconcile(self) -> None:
        self._step("reconcile")
        journals = {u.device_id: u.journal_path for u in self._units.values()}
        found = reconciling.reconcile(self.root / "controller.toml", journals)
        self.result.reconcile_exit = found.exit_code
        self.result.reconcile = found.report
        self.result.reconcile_text = found.text
        if found.error is not None:
            self.result.errors.append(found.error)

    # --- helpers ---------------------------------------------------------------------------

    def _step(self, name: str) -> None:
        log.info("sim step=%s", name)

    def _wait_until(self, monotonic: float) -> None:
        while True:
            left = monotonic - time.monotonic()
            if left <= 0:
                return
            if self._stop.wait(min(left, 1.0)):
                raise Interrupted

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise Interrupted

    def _api_or_fail(self) -> ControllerApi:
        if self._api is None:
            raise RuntimeError("controller not set up")
        return self._api

    def _controller_or_fail(self) -> ControllerProcess:
        if self._controller is None:
            raise RuntimeError("controller not set up")
        return self._controller

    def _proxy_or_fail(self) -> StorageProxy:
        if self._proxy is None:
            raise RuntimeError("storage proxy not set up")
        return self._proxy


def _pending(unit: Unit) -> int:
    """Segments the unit still holds unconfirmed (journalled, or closed on disk and not yet
    taken in: the spool deletes a segment file only once storage confirmed it); -1 when it
    cannot be asked."""
    status = unit.status()
    if status is None:
        return -1
    journalled = status.get("spool_segments")
    if not isinstance(journalled, int):
        return -1
    on_disk = sum(1 for _ in (unit.data_dir / "spool").glob("*/seg-*.mp4"))
    return max(journalled, on_disk)


def _whole_second(at: datetime) -> datetime:
    return at.replace(microsecond=0) + timedelta(seconds=1 if at.microsecond else 0)
