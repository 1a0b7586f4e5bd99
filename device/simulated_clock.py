"""A simulated unit's wall clock (``system.simulated_clock``), set through the control socket
to rehearse a clock that jumps: a Pi without a real-time clock that booted on a stale saved
time, then NTP stepping it right. It stands at the hardware edge in place of the kernel's
clock and its NTP state, as the synthetic camera and mock pins stand in for theirs.

It starts synchronised with no offset, whatever the machine's own NTP state, so that a
simulated fault is what makes the unit report an unsynchronised clock.
"""

from __future__ import annotations

import logging
import math
import threading

from device.health import ClockState
from shared.clock import set_offset

log = logging.getLogger(__name__)

# Ten years either way: past any stale saved time, well inside what datetime can hold.
MAX_OFFSET_S = 10 * 365.25 * 86400


class SimulatedClock:
    def __init__(self) -> None:
        # The offset itself lives in shared.clock, which every timestamp of the process reads.
        self._lock = threading.Lock()
        self._synced = True

    def set(self, offset_s: float, synced: bool) -> None:
        """Moves this process's wall clock ``offset_s`` off the kernel's (negative: behind)
        and says whether NTP would call it synchronised."""
        if not math.isfinite(offset_s) or abs(offset_s) > MAX_OFFSET_S:
            raise ValueError(f"clock offset must be finite and within {MAX_OFFSET_S:.0f} s")
        with self._lock:
            set_offset(offset_s)
            self._synced = synced
        log.info("simulated clock set offset_s=%g synced=%s", offset_s, synced)

    def read(self) -> ClockState:
        """As the kernel reader reports it: the offset is known (none left) only when synced."""
        with self._lock:
            synced = self._synced
        return ClockState(synced=synced, offset_ms=0.0 if synced else None)
