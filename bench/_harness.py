"""Shared set-up for the benchmarks: a broker, SeaweedFS and a stand-in grant service on
loopback, /proc readings of a process, the machine's description, and ``report``, which
hands each headline figure to ``bench/run_all.py``. Everything started here is stopped here."""

from __future__ import annotations

import os
import platform
import secrets
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.broker import MOSQUITTO, MosquittoBroker
from tests.support.s3 import make_storage
from tests.support.seaweed_server import WEED_BINARY, SeaweedServer
from tests.support.standin_controller import StandinController

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Set by run_all to a file each bench appends its figures to, one JSON line each; a bench
# run alone has no such file and only prints.
RESULTS_ENV = "CLASSCAP_BENCH_RESULTS"
# The server the tests use; a database is made on it for each run and dropped afterwards.
POSTGRES_URL = os.environ.get(
    "CLASSCAP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


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


@contextmanager
def postgres_database(url: str = POSTGRES_URL) -> Iterator[str | None]:
    """A fresh database on ``url``'s server for the run, dropped afterwards; None (and a
    printed reason) when the server cannot be reached."""
    admin = create_engine(
        make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    name = f"cc_bench_{secrets.token_hex(4)}"
    try:
        try:
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
        except OperationalError as exc:
            print(f"postgresql: skipped ({exc.orig})")
            yield None
            return
        try:
            yield make_url(url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        admin.dispose()


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


# --- figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A figure's goal: at most or at least ``limit``, of the value or of value / baseline."""

    limit: float
    at_most: bool
    of_ratio: bool = False

    def met(self, value: float, ratio: float | None) -> bool | None:
        subject = ratio if self.of_ratio else value
        if subject is None:
            return None
        return subject <= self.limit if self.at_most else subject >= self.limit

    def describe(self, unit: str) -> str:
        sign = "<=" if self.at_most else ">="
        limit = f"{self.limit:,g}"
        return f"ratio {sign} {limit}" if self.of_ratio else f"{sign} {limit} {unit}"


def at_most(limit: float, *, of_ratio: bool = False) -> Target:
    return Target(limit, at_most=True, of_ratio=of_ratio)


def at_least(limit: float, *, of_ratio: bool = False) -> Target:
    return Target(limit, at_most=False, of_ratio=of_ratio)


class Result(BaseModel):
    """One headline figure as run_all reads it back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    target: str | None = None
    ok: bool | None = None
    note: str = ""


def report(
    name: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_name: str | None = None,
    target: Target | None = None,
    note: str = "",
) -> Result:
    """Records one figure (a median over repeats) beside its baseline from the same run.

    The ratio is ``value / baseline``; none when there is no baseline or it is zero.
    Appends to the file ``RESULTS_ENV`` names, if any; the figure is returned either way.
    """
    ratio = value / baseline if baseline else None
    result = Result(
        name=name,
        value=value,
        unit=unit,
        baseline=baseline,
        baseline_name=baseline_name,
        ratio=ratio,
        target=target.describe(unit) if target is not None else None,
        ok=target.met(value, ratio) if target is not None else None,
        note=note,
    )
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(result.model_dump_json() + "\n")
    return result


# --- the machine --------------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, Python {sys.version.split()[0]}"


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unavailable ({exc.strerror or exc})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def machine() -> list[tuple[str, str]]:
    """What the figures were measured on, as (label, value) rows."""
    return [
        ("CPU", cpu_model()),
        ("cores", str(os.cpu_count())),
        ("RAM", f"{_ram_gib():.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", sys.version.split()[0]),
        ("SQLite", sqlite3.sqlite_version),
        ("Mosquitto", _first_line([str(MOSQUITTO), "-h"]).removeprefix("mosquitto version ")),
        (
            "ffmpeg",
            _first_line(["ffmpeg", "-version"])
            .split(" Copyright")[0]
            .removeprefix("ffmpeg version "),
        ),
        ("SeaweedFS", _first_line([str(WEED_BINARY), "version"]).removeprefix("version ")),
        (
            "load average at start",
            " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)",
        ),
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
    ]
