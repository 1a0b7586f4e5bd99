"""The registry at fleet scale: listing pages of 20,000 units and taking their health.

Builds the fleet with bulk inserts, then times ``Registry.list`` with the
dashboard's filters (each a count, one page and its open alerts) and
``Registry.on_health`` one unit after another (one transaction each: row lock,
latest health, history when due, alert evaluation). SQLite always; PostgreSQL
too when ``CLASSCAP_TEST_POSTGRES_URL`` (or ``--postgres``) reaches a server, in a
database made for the run and dropped afterwards.

    .venv/bin/python bench/controller_registry.py [--units 20000] [--health 2000]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.alerts import AlertEngine
from controller.db import Database
from controller.models import Alert, Device
from controller.registry import Registry
from shared.clock import utcnow
from shared.messages import Health, RecorderState

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def postgres_database(url: str) -> Iterator[str | None]:
    admin = create_engine(
        make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    name = f"cc_bench_{secrets.token_hex(4)}"
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
        admin.dispose()


def build_fleet(db: Database, units: int) -> None:
    now = utcnow()
    devices = [
        {
            "id": f"unit-{i:05d}",
            "school": f"School {i // 500:03d}",
            "room": f"{i % 500:03d}",
            "created_at": now,
            "online": i % 3 != 0,
            "epoch": 1,
            "capabilities": [],
            "desired_version": 0,
            "reported_version": 0,
            "state": "recording" if i % 7 == 0 else "idle",
        }
        for i in range(units)
    ]
    alerts = [
        {
            "device_id": f"unit-{i:05d}",
            "kind": "disk_low",
            "severity": "warning",
            "message": "low",
            "raised_at": now,
        }
        for i in range(0, units, 20)
    ]
    with db.session() as session:
        session.execute(insert(Device), devices)
        session.execute(insert(Alert), alerts)


def timed(action: Callable[[], object], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def report(label: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    print(f"  {label:<44} median {statistics.median(ordered):7.2f} ms   p95 {p95:7.2f} ms")


def health(i: int) -> Health:
    return Health(
        state=RecorderState.IDLE,
        soc_temp_c=50.0 + i % 20,
        disk_free_bytes=20 * 1024**3,
        disk_total_bytes=32 * 1024**3,
        can_record=True,
        spool_segments=i % 5,
        spool_bytes=0,
        camera_present=True,
        clock_synced=True,
        uptime_s=float(i),
        agent_version="0.1.0",
        rejected_messages=0,
    )


def run(name: str, url: str, units: int, health_messages: int) -> None:
    db = Database(url)
    try:
        db.migrate()
        start = time.perf_counter()
        build_fleet(db, units)
        print(f"{name}: {units} units inserted in {time.perf_counter() - start:.2f} s")
        registry = Registry(db, AlertEngine(db))
        rounds = 30
        report("list(): first page", timed(registry.list, rounds))
        report("list(page=200)", timed(lambda: registry.list(page=200), rounds))
        report(
            "list(school=..., online=True)",
            timed(lambda: registry.list(school="School 017", online=True), rounds),
        )
        report(
            "list(alert='disk_low', page=5)",
            timed(lambda: registry.list(alert="disk_low", page=5), rounds),
        )
        report("list(q='unit-1234')", timed(lambda: registry.list(q="unit-1234"), rounds))
        report("schools()", timed(registry.schools, rounds))
        ids = [f"unit-{i:05d}" for i in range(health_messages)]
        samples = timed_each(lambda i: registry.on_health(ids[i], health(i)), len(ids))
        report("on_health() per message", samples)
        print(f"  on_health() throughput: {1000 / statistics.mean(samples):.0f} messages/s")
    finally:
        db.dispose()


def timed_each(action: Callable[[int], object], count: int) -> list[float]:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        action(i)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=20_000)
    parser.add_argument("--health", type=int, default=2000)
    parser.add_argument(
        "--postgres", default=os.environ.get("CLASSCAP_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run("sqlite", f"sqlite:///{tmp}/bench.sqlite3", args.units, args.health)
    with postgres_database(args.postgres) as url:
        if url is not None:
            run("postgresql", url, args.units, args.health)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
