"""Running ``classcap controller reconcile`` over every unit's journal, as an operator would:
once for the verdict as JSON and, at the same time, once for the table people read."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TIMEOUT_S = 1800.0
EXIT_CLEAN = 0
EXIT_LOSS = 1


@dataclass(frozen=True)
class Reconciled:
    exit_code: int | None
    report: dict[str, Any] | None  # the reconciler's JSON report
    text: str  # its table, or what it said when it failed
    error: str | None = None


def reconcile(config: Path, journals: dict[str, Path]) -> Reconciled:
    """``journals`` maps each unit to its journal file."""
    argv = [sys.executable, "-m", "shared.cli", "controller", "reconcile", "--config", str(config)]
    for device_id, path in journals.items():
        argv += ["--journal", f"{device_id}={path}"]
    log.info("reconciling units=%d", len(journals))
    try:
        as_json = subprocess.Popen(
            [*argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        as_text = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = as_json.communicate(timeout=_TIMEOUT_S)
        text, text_err = as_text.communicate(timeout=_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return Reconciled(None, None, "", f"reconciler could not run: {exc}")
    if as_json.returncode not in (EXIT_CLEAN, EXIT_LOSS):
        return Reconciled(
            as_json.returncode, None, err or text_err, f"reconciler failed ({as_json.returncode})"
        )
    try:
        report = json.loads(out)
    except ValueError as exc:
        return Reconciled(as_json.returncode, None, text, f"reconciler said no JSON: {exc}")
    return Reconciled(as_json.returncode, report, text)
