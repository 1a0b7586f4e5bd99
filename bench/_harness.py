"""Shared set-up for the benchmarks: a broker, SeaweedFS and a stand-in grant service on
loopback, and /proc readings of a process. Everything started here is stopped here."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.broker import MosquittoBroker
from tests.support.s3 import make_storage
from tests.support.seaweed_server import SeaweedServer
from tests.support.standin_controller import StandinController

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Rig:
    broker: MosquittoBroker
    seaweed: SeaweedServer
    controller: StandinController


@contextmanager
def rig(root: Path) -> Iterator[Rig]:
    with ExitStack() as stack:
        broker = MosquittoBroker(root / "broker")
        broker.start()
        stack.callback(broker.stop)
        seaweed = SeaweedServer(root / "seaweed")
        seaweed.start()
        stack.callback(seaweed.stop)
        controller = StandinController("127.0.0.1", broker.port, make_storage(seaweed))
        controller.start()
        stack.callback(controller.stop)
        yield Rig(broker, seaweed, controller)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def sample(pid: int, seconds: float, window: float = 5.0) -> tuple[float, float]:
    """Median RSS (MB) and median CPU (% of one core) over ``window``-second windows."""
    rss: list[float] = []
    cpu: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0, c0 = time.monotonic(), cpu_seconds(pid)
        time.sleep(window)
        cpu.append(100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0))
        rss.append(rss_mb(pid))
    return statistics.median(rss), statistics.median(cpu)


def describe_machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {model}, Python {sys.version.split()[0]}"
