"""The end of a run, for people and for machines: the reconciler's table, a fault table
(each fault, when, what it should have caused, when that was seen and cleared), the
fault log, and the verdict; the same as ``report.json``."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from controller.sim.checks import Check, FaultRecord
from controller.sim.runner import RunResult

_COLUMNS = (("at", 7), ("fault", 21), ("unit", 10), ("expected", 42), ("seen", 8), ("cleared", 8))


def _offset(t0: datetime | None, at: datetime | None) -> str:
    if t0 is None or at is None:
        return "-"
    return f"{(at - t0).total_seconds():+.0f}s"


def _row(cells: list[str]) -> str:
    parts = [
        cell.ljust(width)[:width] for cell, (_name, width) in zip(cells, _COLUMNS, strict=False)
    ]
    return "  ".join(parts + cells[len(_COLUMNS) :]).rstrip()


def fault_table(result: RunResult) -> str:
    t0 = result.t0
    lines = [_row([name for name, _ in _COLUMNS] + ["result"])]
    for record in result.faults:
        spec = record.spec
        checks: list[Check | None] = list(record.checks) or [None]
        for n, check in enumerate(checks):
            first = n == 0
            lead = [
                f"{spec.at_s:+.0f}s" if first else "",
                spec.kind.value if first else "",
                (spec.unit or "-") if first else "",
            ]
            if check is None:
                verdict = "FAILED: " + record.error if record.error else "done"
                lines.append(_row([*lead, "(nothing to observe)", "-", "-", verdict]))
                continue
            verdict = "ok" if check.ok else f"FAILED: {check.detail}"
            if check.ok and check.detail:
                verdict = f"ok ({check.detail})"
            lines.append(
                _row(
                    [
                        *lead,
                        check.name,
                        _offset(t0, check.raised_at),
                        _offset(t0, check.cleared_at),
                        verdict,
                    ]
                )
            )
        if record.error and record.checks:
            lines.append(_row(["", "", "", "", "", "", f"FAILED: {record.error}"]))
    return "\n".join(lines)


def fault_log(result: RunResult) -> str:
    lines = []
    for record in result.faults:
        where = f" {record.spec.unit}" if record.spec.unit else ""
        head = (
            f"{_offset(result.t0, record.started_at)}..{_offset(result.t0, record.ended_at)} "
            f"{record.spec.kind.value}{where}"
        )
        lines.append(head)
        lines += [f"    {note}" for note in record.notes]
        if record.error:
            lines.append(f"    error: {record.error}")
    return "\n".join(lines)


def verdict(result: RunResult) -> str:
    if result.ok:
        totals = (result.reconcile or {}).get("totals", {})
        return (
            f"OK: {totals.get('journalled', 0)} segments recorded, each stored exactly once; "
            f"{len(result.faults)} faults injected, each observed and recovered"
        )
    reasons = list(result.errors)
    if result.reconcile_exit not in (0, None):
        reasons.append("the reconciler found lost, damaged, duplicated or pending segments")
    reasons += [
        f"{r.spec.kind.value} at {r.spec.at_s:+.0f}s: {c.name} - {c.detail}"
        for r in result.faults
        for c in r.checks
        if not c.ok
    ]
    reasons += [
        f"{r.spec.kind.value} at {r.spec.at_s:+.0f}s: {r.error}" for r in result.faults if r.error
    ]
    return "FAILED:\n  " + "\n  ".join(reasons or ["the run did not finish"])


def render(result: RunResult) -> str:
    scenario = result.scenario
    parts = [
        f"classcap sim: scenario {scenario.name}, {scenario.fleet.units} units, "
        f"{scenario.duration_s:.0f} s, t0 {result.t0.isoformat() if result.t0 else '-'}",
        "",
        "reconciler:",
        result.reconcile_text.rstrip() or "(did not run)",
        "",
        "faults:",
        fault_table(result),
        "",
        "fault log:",
        fault_log(result) or "(none)",
        "",
        verdict(result),
    ]
    return "\n".join(parts) + "\n"


def as_dict(result: RunResult) -> dict[str, Any]:
    def stamp(at: datetime | None) -> str | None:
        return at.isoformat() if at is not None else None

    def fault(record: FaultRecord) -> dict[str, Any]:
        return {
            "kind": record.spec.kind.value,
            "unit": record.spec.unit,
            "at_s": record.spec.at_s,
            "duration_s": record.spec.duration_s,
            "started_at": stamp(record.started_at),
            "ended_at": stamp(record.ended_at),
            "error": record.error,
            "notes": record.notes,
            "checks": [
                {
                    "name": c.name,
                    "ok": c.ok,
                    "detail": c.detail,
                    "raised_at": stamp(c.raised_at),
                    "cleared_at": stamp(c.cleared_at),
                }
                for c in record.checks
            ],
        }

    return {
        "scenario": result.scenario.name,
        "ok": result.ok,
        "t0": stamp(result.t0),
        "units": result.scenario.fleet.units,
        "lesson_units": result.lesson_units,
        "drained": result.drained,
        "errors": result.errors,
        "faults": [fault(r) for r in result.faults],
        "presses": [
            {
                "at_s": p.spec.at_s,
                "at": stamp(p.at),
                "unit": p.unit,
                "kind": p.spec.kind,
                "via": p.spec.via,
                "outcome": p.outcome,
            }
            for p in result.presses
        ],
        "alerts": result.alerts,
        "reconcile_exit": result.reconcile_exit,
        "reconcile": result.reconcile,
    }


def write_json(result: RunResult, path: Path) -> None:
    path.write_text(json.dumps(as_dict(result), indent=2, default=str) + "\n", encoding="utf-8")
