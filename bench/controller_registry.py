"""The registry at fleet scale: listing pages of 20,000 units and taking their health, each
beside the bare SQL it is built on (one page of rows; one UPDATE in its own transaction).

Builds the fleet with bulk inserts, then times ``Registry.list`` with the
dashboard's filters (each a count, one page and its open alerts) against a plain
SELECT of one page of device rows, and ``Registry.on_health`` one unit after
another (one transaction each: row lock, latest health, history when due, alert
evaluation; every unit's first sample, so each keeps a history row) against an
UPDATE of the same columns, one transaction each. SQLite always; PostgreSQL too
when ``CLASSCAP_TEST_POSTGRES_URL`` reaches a server, in a database made for the
run and dropped afterwards.

    .venv/bin/python bench/controller_registry.py [--units 20000] [--health 2000]

Target (the fleet page's API call): p95 under 300 ms for every listing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import POSTGRES_URL, at_most, postgres_database, report
from controller.alerts import AlertEngine
from controller.db import Database
from controller.models import Alert, Device
from controller.registry import Registry
from shared.clock import utcnow
from shared.messages import Health, RecorderState

ROUNDS = 30
PER_PAGE = 50
TARGET_MS = 300.0


def build_fleet(db: Database, units: int) -> None:
    now = utcnow()
    devices: list[dict[str, Any]] = [
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


def timed_each(action: Callable[[int], object], count: int) -> list[float]:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        action(i)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, int(len(ordered) * 0.95) - 1)]


def show(label: str, samples: list[float]) -> None:
    print(f"  {label:<44} median {statistics.median(samples):7.2f} ms   p95 {p95(samples):7.2f} ms")


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


def plain_page(db: Database) -> None:
    """The baseline of a listing: one page of device rows, no count, no alerts, no views."""
    with db.session(readonly=True) as session:
        session.execute(
            select(Device.__table__).order_by(Device.school, Device.room, Device.id).limit(PER_PAGE)
        ).all()


def plain_update(db: Database, device_id: str, sample: Health) -> None:
    """The baseline of ``on_health``: the same columns in one UPDATE, one transaction."""
    now = utcnow()
    with db.session(durable=False) as session:
        session.execute(
            update(Device)
            .where(Device.id == device_id)
            .values(
                state=sample.state.value,
                health=sample.model_dump(mode="json", by_alias=True),
                health_at=now,
                last_seen_at=now,
                agent_version=sample.agent_version,
            )
        )


def run(name: str, url: str, units: int, health_messages: int) -> None:
    db = Database(url)
    try:
        db.migrate()
        start = time.perf_counter()
        build_fleet(db, units)
        print(f"{name}: {units} units inserted in {time.perf_counter() - start:.2f} s")
        registry = Registry(db, AlertEngine(db))
        page = timed(lambda: plain_page(db), ROUNDS)
        show("baseline: SELECT one page of rows", page)
        listings: dict[str, Callable[[], object]] = {
            "list(): first page": registry.list,
            "list(page=200)": lambda: registry.list(page=200),
            "list(school=..., online=True)": lambda: registry.list(
                school="School 017", online=True
            ),
            "list(alert='disk_low', page=5)": lambda: registry.list(alert="disk_low", page=5),
            "list(q='unit-1234')": lambda: registry.list(q="unit-1234"),
            "schools()": registry.schools,
        }
        times = {label: timed(action, ROUNDS) for label, action in listings.items()}
        for label, samples in times.items():
            show(label, samples)
        slowest = max(times, key=lambda label: p95(times[label]))

        ids = [f"unit-{i:05d}" for i in range(health_messages)]
        bare = timed_each(lambda i: plain_update(db, ids[i], health(i)), len(ids))
        show("baseline: UPDATE one row, own transaction", bare)
        handled = timed_each(lambda i: registry.on_health(ids[i], health(i)), len(ids))
        show("on_health() per message", handled)
        print(f"  on_health() throughput: {1000 / statistics.mean(handled):.0f} messages/s")
    finally:
        db.dispose()
    report(
        f"registry listing, {name}, {units:,} units: slowest, p95",
        p95(times[slowest]),
        "ms",
        baseline=p95(page),
        baseline_name="SELECT one page of device rows, p95",
        target=at_most(TARGET_MS),
        note=f"{slowest}, {ROUNDS} rounds",
    )
    report(
        f"registry on_health(), {name}, per message",
        statistics.median(handled),
        "ms",
        baseline=statistics.median(bare),
        baseline_name="UPDATE of the same columns, own transaction",
        note=f"{health_messages} units' first samples",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--units", type=int, default=20_000)
    parser.add_argument("--health", type=int, default=2000)
    parser.add_argument("--postgres", default=POSTGRES_URL)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run("sqlite", f"sqlite:///{tmp}/bench.sqlite3", args.units, args.health)
    with postgres_database(args.postgres) as url:
        if url is not None:
            run("postgresql", url, args.units, args.health)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
