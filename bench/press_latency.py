"""Button press to first frame in the spool, with the synthetic backend: from the moment a
simulated press is sent to the unit until the first recording's first segment holds a
complete fragment (``moof``) on disk. Baseline in the same run: the same capture backend
started directly, without button, recorder or journal.

    .venv/bin/python bench/press_latency.py [--rounds 8]

Target: median under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import at_most, describe_machine, report, rig
from device.button import PressKind
from device.capture import create_backend
from device.config import CaptureConfig
from device.control_socket import send_press
from tests.support.agent_proc import make_agent
from tests.support.processes import wait_for

CAPTURE = CaptureConfig(backend="synthetic", width=320, height=240, framerate=10, bitrate_kbps=300)


def has_fragment(path: Path) -> bool:
    try:
        return b"moof" in path.read_bytes()
    except FileNotFoundError:
        return False


def wait_fragment(path_of: Path | Callable[[], Path | None], timeout: float = 10) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        path = path_of() if callable(path_of) else path_of
        if path is not None and has_fragment(path):
            return time.monotonic() - start
        time.sleep(0.005)
    raise TimeoutError("no fragment in time")


def baseline(root: Path, rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        backend = create_backend(CAPTURE, on_failure=lambda reason: None)
        rec = root / f"direct-{i}"
        rec.mkdir()
        t0 = time.monotonic()
        backend.start(rec)
        try:
            wait_fragment(rec / "seg-00000.mp4")
            times.append(time.monotonic() - t0)
        finally:
            backend.stop()
            backend.close()
    return times


def through_agent(root: Path, broker_url: str, rounds: int) -> list[float]:
    agent = make_agent(root, "bench-press", broker_url, segment_seconds=60)
    agent.start()
    spool = agent.data_dir / "spool"
    times = []
    try:
        for _ in range(rounds):
            before = set(spool.iterdir())
            t0 = time.monotonic()
            send_press(agent.socket, PressKind.SHORT)

            def first_segment(before: set[Path] = before) -> Path | None:
                new = [d for d in spool.iterdir() if d not in before]
                return new[0] / "seg-00000.mp4" if new else None

            wait_fragment(first_segment)
            times.append(time.monotonic() - t0)
            time.sleep(2)
            agent.press("short")
            assert wait_for(lambda: agent.status()["state"] == "idle", 20)
    finally:
        agent.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, rig(Path(tmp)) as r:
        direct = baseline(Path(tmp), args.rounds)
        pressed = through_agent(Path(tmp), r.broker.url, args.rounds)
    d, p = statistics.median(direct), statistics.median(pressed)
    print(f"press to first frame in the spool ({describe_machine()}, {args.rounds} rounds)")
    print(f"{'path':<40}{'median s':>10}{'max s':>10}")
    print(f"{'baseline: backend.start() to fragment':<40}{d:>10.3f}{max(direct):>10.3f}")
    print(f"{'agent: press to fragment':<40}{p:>10.3f}{max(pressed):>10.3f}")
    print(f"ratio agent / baseline: {p / d:.2f}; target: median under 1 s")
    report(
        "button press to first fragment in the spool",
        p,
        "s",
        baseline=d,
        baseline_name="backend.start() to first fragment",
        target=at_most(1),
        note=f"synthetic backend, {args.rounds} rounds",
    )


if __name__ == "__main__":
    main()
