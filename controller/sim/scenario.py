"""A simulation scenario: the fleet, its school and lessons, teacher presses and faults, all
timed in seconds from the start of the run. Loaded from TOML and validated whole, so a
scenario that names an unknown unit or overlaps two faults on one target never starts."""

from __future__ import annotations

from enum import StrEnum
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from device.simulated_clock import MAX_OFFSET_S
from shared.configfile import load_toml_config
from shared.schedule import Name

Seconds = Annotated[float, Field(ge=0, le=24 * 3600)]


class FaultKind(StrEnum):
    AGENT_KILL = "agent_kill"
    AGENT_KILL_UPLOADING = "agent_kill_uploading"
    BROKER_OUTAGE = "broker_outage"
    CONTROLLER_RESTART = "controller_restart"
    STORAGE_ERRORS = "storage_errors"
    STORAGE_TIMEOUTS = "storage_timeouts"
    STORAGE_UNREACHABLE = "storage_unreachable"
    DISK_FULL = "disk_full"
    HOSTILE_MESSAGES = "hostile_messages"
    CLOCK_JUMP = "clock_jump"


UNIT_FAULTS = frozenset(
    {
        FaultKind.AGENT_KILL,
        FaultKind.AGENT_KILL_UPLOADING,
        FaultKind.DISK_FULL,
        FaultKind.HOSTILE_MESSAGES,
        FaultKind.CLOCK_JUMP,
    }
)
_STORAGE_FAULTS = frozenset(
    {FaultKind.STORAGE_ERRORS, FaultKind.STORAGE_TIMEOUTS, FaultKind.STORAGE_UNREACHABLE}
)
# What a fault is expected to raise when the scenario does not say (see docs/simulator.md).
DEFAULT_ALERTS: dict[FaultKind, tuple[str, ...]] = {
    FaultKind.AGENT_KILL: ("offline",),
    FaultKind.AGENT_KILL_UPLOADING: ("offline",),
    FaultKind.STORAGE_ERRORS: ("upload_backlog",),
    FaultKind.STORAGE_TIMEOUTS: ("upload_backlog",),
    FaultKind.STORAGE_UNREACHABLE: ("upload_backlog",),
    FaultKind.CLOCK_JUMP: ("clock_unsynced",),
}
# A day behind: a Pi without a real-time clock that booted on a stale saved time.
DEFAULT_CLOCK_OFFSET_S = -86400.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetSpec(_Model):
    """``units`` simulated units named ``<prefix>-01``, ``<prefix>-02``, ... with a cheap
    synthetic camera, so that dozens fit on a small machine."""

    units: int = Field(ge=1, le=500)
    prefix: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")] = "sim"
    segment_seconds: int = Field(default=10, ge=2, le=600)
    width: int = Field(default=160, ge=160, le=3840)
    height: int = Field(default=120, ge=120, le=2160)
    framerate: int = Field(default=5, ge=1, le=60)
    bitrate_kbps: int = Field(default=100, ge=100, le=50_000)
    audio: bool = True
    health_interval_s: float = Field(default=2, ge=1, le=3600)
    # A cut PUT or a silent store costs a unit this long before it retries.
    upload_timeout_s: float = Field(default=10, gt=0, le=600)

    def device_ids(self) -> list[str]:
        width = max(2, len(str(self.units)))
        return [f"{self.prefix}-{n:0{width}d}" for n in range(1, self.units + 1)]


class ControllerSpec(_Model):
    offline_after_s: float = Field(default=5, gt=0)
    sweep_interval_s: float = Field(default=1, gt=0, le=60)
    backlog_max_segments: int = Field(default=3, ge=1)
    # None: SQLite in the run's directory. A PostgreSQL URL needs an empty database.
    database_url: str | None = None


class PeriodSpec(_Model):
    """A lesson of the simulated day: ``start_s`` and ``end_s`` count from the run's start."""

    name: Name
    start_s: Seconds
    end_s: Seconds

    @model_validator(mode="after")
    def _ordered(self) -> PeriodSpec:
        if self.end_s <= self.start_s:
            raise ValueError(f"period {self.name!r} must end after it starts")
        return self


class PlanSpec(_Model):
    name: Name
    # Unit ids, or "all": each unit has a room of its own.
    units: list[str] | Literal["all"]
    periods: Annotated[list[Name], Field(min_length=1)]
    teacher: str | None = None


class SchoolSpec(_Model):
    name: Name = "Simulated School"
    # An IANA zone, or "auto": a fixed-offset zone in which the run starts in the morning,
    # so no lesson crosses local midnight whatever the hour the run starts.
    timezone: str = "auto"
    periods: list[PeriodSpec] = Field(default_factory=list)
    plans: list[PlanSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> SchoolSpec:
        ordered = sorted(self.periods, key=lambda p: p.start_s)
        for earlier, later in pairwise(ordered):
            if later.start_s < earlier.end_s:
                raise ValueError(f"periods {earlier.name!r} and {later.name!r} overlap")
        names = {p.name for p in self.periods}
        if len(names) != len(self.periods):
            raise ValueError("period names must differ")
        for plan in self.plans:
            unknown = sorted(set(plan.periods) - names)
            if unknown:
                raise ValueError(f"plan {plan.name!r} names unknown period {unknown[0]!r}")
        return self


_BUTTON_KINDS = frozenset({"short", "long", "double"})


class PressSpec(_Model):
    """A teacher presses a unit's button (short: start or stop, double: bookmark), or clicks
    start, stop or bookmark on the dashboard (a command through the API); ``units`` does
    the same on several units at that second."""

    at_s: Seconds
    unit: str | None = None
    units: list[str] = Field(default_factory=list)
    kind: Literal["short", "long", "double", "start", "stop", "bookmark"] = "short"
    via: Literal["button", "dashboard"] = "button"

    @model_validator(mode="after")
    def _consistent(self) -> PressSpec:
        if (self.unit is None) == (not self.units):
            raise ValueError("a press names unit or units")
        if (self.kind in _BUTTON_KINDS) != (self.via == "button"):
            raise ValueError(
                "a button press is short, long or double; a dashboard one start, stop or bookmark"
            )
        return self

    def targets(self) -> list[str]:
        return [self.unit] if self.unit is not None else list(self.units)


class FaultSpec(_Model):
    at_s: Seconds
    kind: FaultKind
    unit: str | None = None
    duration_s: float = Field(default=20, gt=0, le=6 * 3600)
    # Alert kinds this fault must raise and see cleared; None: the kind's default.
    expect_alerts: list[str] | None = None
    # clock_jump only: how far the unit's wall clock is set off (negative: behind).
    offset_s: float = Field(
        default=DEFAULT_CLOCK_OFFSET_S, ge=-MAX_OFFSET_S, le=MAX_OFFSET_S, allow_inf_nan=False
    )

    @model_validator(mode="after")
    def _target(self) -> FaultSpec:
        if (self.kind in UNIT_FAULTS) != (self.unit is not None):
            need = "needs" if self.kind in UNIT_FAULTS else "takes no"
            raise ValueError(f"fault {self.kind.value} {need} unit")
        if self.kind is FaultKind.CLOCK_JUMP:
            if self.offset_s == 0:
                raise ValueError("a clock_jump's offset_s must not be 0")
        elif "offset_s" in self.model_fields_set:
            raise ValueError(f"fault {self.kind.value} takes no offset_s (clock_jump only)")
        return self

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s

    @property
    def target(self) -> str:
        """Faults on one target may not overlap."""
        if self.unit is not None:
            return f"unit {self.unit}"
        if self.kind in _STORAGE_FAULTS:
            return "storage"
        return "controller"  # the broker runs inside the controller

    def alerts(self) -> tuple[str, ...]:
        if self.expect_alerts is not None:
            return tuple(self.expect_alerts)
        return DEFAULT_ALERTS.get(self.kind, ())


class Scenario(_Model):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,60}$")]
    description: str = ""
    duration_s: float = Field(gt=0, le=24 * 3600)
    # After the timeline, how long uploads may take to drain before the run gives up.
    drain_timeout_s: float = Field(default=180, gt=0, le=6 * 3600)
    fleet: FleetSpec
    controller: ControllerSpec = Field(default_factory=ControllerSpec)
    school: SchoolSpec = Field(default_factory=SchoolSpec)
    presses: list[PressSpec] = Field(default_factory=list)
    faults: list[FaultSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        units = set(self.fleet.device_ids())
        named: list[tuple[str, str | None]] = [
            (f"press at {p.at_s:g} s", unit) for p in self.presses for unit in p.targets()
        ]
        named += [(f"fault {f.kind.value} at {f.at_s:g} s", f.unit) for f in self.faults]
        for plan in self.school.plans:
            if plan.units != "all":
                named += [(f"plan {plan.name!r}", unit) for unit in plan.units]
        for what, unit in named:
            if unit is not None and unit not in units:
                raise ValueError(f"{what} names unknown unit {unit!r}")
        late = [p.at_s for p in self.presses if p.at_s >= self.duration_s]
        late += [f.end_s for f in self.faults if f.end_s > self.duration_s]
        late += [p.end_s for p in self.school.periods if p.end_s > self.duration_s]
        if late:
            raise ValueError(f"something ends at {max(late):g} s, after duration_s")
        for fault in self.faults:
            too_short = fault.duration_s <= self.controller.offline_after_s
            if "offline" in fault.alerts() and too_short:
                raise ValueError(
                    f"fault {fault.kind.value} at {fault.at_s:g} s ends before the offline alert "
                    "is due (controller.offline_after_s): lengthen it or set expect_alerts"
                )
        by_target: dict[str, list[FaultSpec]] = {}
        for fault in self.faults:
            by_target.setdefault(fault.target, []).append(fault)
        for target, faults in by_target.items():
            ordered = sorted(faults, key=lambda f: f.at_s)
            for earlier, later in pairwise(ordered):
                if later.at_s < earlier.end_s:
                    raise ValueError(
                        f"faults {earlier.kind.value} and {later.kind.value} on {target} overlap"
                    )
        return self

    def plan_units(self, plan: PlanSpec) -> list[str]:
        return self.fleet.device_ids() if plan.units == "all" else list(plan.units)


SCENARIO_DIR = Path(__file__).with_name("scenarios")


def resolve(name_or_path: str) -> Path:
    """A path, or the name of a scenario shipped with classcap (``ci``, ``school-day``)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return path
    return SCENARIO_DIR / f"{name_or_path}.toml"


def load_scenario(path: Path) -> Scenario:
    """Raises ``shared.configfile.ConfigError`` naming each bad key."""
    return load_toml_config(Scenario, path)
