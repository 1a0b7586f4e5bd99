"""The process's wall-clock offset and a simulated unit's clock that sets it."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device.health import ClockState
from device.simulated_clock import MAX_OFFSET_S, SimulatedClock
from shared import clock


@pytest.fixture(autouse=True)
def kernel_clock() -> Iterator[None]:
    """Every test leaves the process on the kernel's clock, whatever it set."""
    clock.set_offset(0)
    yield
    clock.set_offset(0)


def test_without_an_offset_the_clock_is_the_kernel_s(tmp_path: Path) -> None:
    assert clock.offset() == 0.0
    before = datetime.now(UTC)
    now = clock.utcnow()
    assert before <= now <= datetime.now(UTC)
    assert now.tzinfo is UTC
    path = tmp_path / "f"
    path.write_bytes(b"x")
    mtime = path.stat().st_mtime
    assert clock.from_timestamp(mtime) == datetime.fromtimestamp(mtime, UTC)


def test_an_offset_moves_utcnow_and_file_times(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    clock.set_offset(-86400)
    assert clock.offset() == -86400.0
    before = datetime.now(UTC) - timedelta(days=1)
    now = clock.utcnow()
    assert before <= now <= datetime.now(UTC) - timedelta(days=1)
    assert clock.from_timestamp(path.stat().st_mtime) == datetime(
        2023, 11, 13, 22, 13, 20, tzinfo=UTC
    )
    clock.set_offset(7200.5)
    assert clock.offset() == 7200.5
    assert clock.utcnow() > datetime.now(UTC) + timedelta(seconds=7200)


def test_a_simulated_clock_starts_synced_and_sets_the_offset() -> None:
    simulated = SimulatedClock()
    assert simulated.read() == ClockState(synced=True, offset_ms=0.0)
    simulated.set(-86400, synced=False)
    assert clock.offset() == -86400.0
    # Unsynchronised, the offset is unknown to the unit, as the kernel reader says it.
    assert simulated.read() == ClockState(synced=False, offset_ms=None)
    simulated.set(0, synced=True)
    assert clock.offset() == 0.0
    assert simulated.read() == ClockState(synced=True, offset_ms=0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, MAX_OFFSET_S + 1])
def test_a_simulated_clock_refuses_offsets_out_of_range(bad: float) -> None:
    simulated = SimulatedClock()
    with pytest.raises(ValueError, match="finite and within"):
        simulated.set(bad, synced=False)
    assert clock.offset() == 0.0
    assert simulated.read().synced is True
