"""The short chaos scenario through the real command: three units, a controller, SeaweedFS
behind the fault proxy, every fault type once; nothing recorded may be lost or stored
twice, and nothing the run started may outlive it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.sim.scenario import FaultKind
from tests.support.processes import wait_for

# The scenario runs about four minutes on an idle two-core machine; a loaded one is slower.
RUN_TIMEOUT_S = 540
STOP_TIMEOUT_S = 120


def _run_sim(root: Path) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "sim", "run", "ci", "--dir", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the simulator stop what it started; its group goes after that.
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=STOP_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pytest.fail(f"classcap sim ran longer than {RUN_TIMEOUT_S} s\n{out}")
    return proc.returncode, out


def _left_running(root: Path) -> list[str]:
    """Processes whose command line names the run's directory (agents, their encoders,
    the controller, its broker, SeaweedFS)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """The run's directory under a short path (a link into ``tmp_path``): each unit's control
    socket lies in it, and a Unix socket path has at most 107 bytes."""
    (tmp_path / "sim").mkdir()
    link = Path(tempfile.mkdtemp(prefix="chaos-")) / "sim"
    link.symlink_to(tmp_path / "sim")
    yield link
    shutil.rmtree(link.parent)  # the link only; the run's files stay in tmp_path


@pytest.mark.slow
def test_ci_chaos_scenario_loses_nothing_stores_nothing_twice_and_runs_every_fault(
    run_dir: Path,
) -> None:
    rc, out = _run_sim(run_dir)
    report: dict[str, Any] = json.loads((run_dir / "report.json").read_text())

    totals = report["reconcile"]["totals"]
    assert totals["journalled"] > 0, out
    for lost in ("missing", "bad_checksum", "wrong_size", "unverified", "pending"):
        assert totals[lost] == 0, f"{lost}: {totals[lost]}\n{out}"
    assert totals["duplicate"] == 0, out
    assert totals["stored"] == totals["journalled"] == totals["catalogued"], out

    ran = {f["kind"] for f in report["faults"] if f["started_at"] and f["ended_at"]}
    assert ran == {kind.value for kind in FaultKind}, out
    assert [f for f in report["faults"] if f["error"]] == [], out
    assert report["lesson_units"] == 1, out
    assert rc == 0, out

    assert wait_for(lambda: not _left_running(run_dir), 15), _left_running(run_dir)
