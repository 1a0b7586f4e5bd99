"""The record button: one physical button classified into short, long and double presses.

gpiozero reports edges; all timing (long hold, double-press window) runs in one
worker thread of ours, so each physical press is classified exactly once and
``on_press`` is never called from a pin driver's thread or twice at the same time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum

from gpiozero import Button
from gpiozero.pins import Factory

log = logging.getLogger(__name__)

# Hardware debounce: edges that do not stay stable this long are not reported.
# Well below the shortest deliberate press (about 80 ms) and the double-press gap.
BOUNCE_S = 0.03


class PressKind(StrEnum):
    SHORT = "short"
    LONG = "long"
    DOUBLE = "double"


class RecordButton:
    """Classifies presses of an active-low button (pull-up, pressed = pin low).

    - LONG fires once, while the button is still held, after ``long_press_s``;
      the release that follows is ignored.
    - A short press becomes SHORT only when ``double_press_s`` passes after its
      release without a second press; when ``double_press_enabled()`` is false
      (a double press means nothing in the unit's state) it is SHORT at release,
      so starting a recording does not wait for the double-press window.
    - A second press within ``double_press_s`` of the first one's release fires
      one DOUBLE at once; that second press's hold and release are then ignored.
    """

    def __init__(
        self,
        pin: int,
        long_press_s: float,
        double_press_s: float,
        on_press: Callable[[PressKind], object],
        *,
        pin_factory: Factory | None = None,
        double_press_enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        if long_press_s <= 0 or double_press_s <= 0:
            raise ValueError("long_press_s and double_press_s must be positive")
        self._long_press_s = long_press_s
        self._double_press_s = double_press_s
        self._on_press = on_press
        self._double_press_enabled = double_press_enabled
        self._cond = threading.Condition()
        self._stop = threading.Event()
        # Monotonic time the button went down, while it is down.
        self._down_at: float | None = None
        # The current press was already reported (as LONG or DOUBLE).
        self._consumed = False
        # A finished short press becomes SHORT at this time unless a second press comes.
        self._short_deadline: float | None = None
        self._ready: deque[PressKind] = deque()
        self._button = Button(pin, pull_up=True, bounce_time=BOUNCE_S, pin_factory=pin_factory)
        self._thread = threading.Thread(target=self._run, name=f"button-gpio{pin}", daemon=True)
        self._thread.start()
        self._button.when_pressed = self._pressed
        self._button.when_released = self._released
        log.info(
            "button ready pin=%d long_press_s=%.2f double_press_s=%.2f",
            pin,
            long_press_s,
            double_press_s,
        )

    @property
    def pin(self) -> object:
        """The gpiozero pin; on MockFactory pins a simulated unit drives it."""
        return self._button.pin

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._button.when_pressed = None
        self._button.when_released = None
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        self._thread.join()
        self._button.close()

    # --- edges (pin driver's thread) ---------------------------------------------

    def _pressed(self) -> None:
        with self._cond:
            now = time.monotonic()
            if self._down_at is not None:
                return  # a release was missed; this is still the same press
            self._expire(now)
            self._down_at = now
            if self._short_deadline is not None:
                self._short_deadline = None
                self._consumed = True
                self._emit(PressKind.DOUBLE)
            else:
                self._consumed = False
            self._cond.notify_all()

    def _released(self) -> None:
        with self._cond:
            now = time.monotonic()
            down_at = self._down_at
            if down_at is None:
                return
            self._down_at = None
            if self._consumed:
                return
            if now - down_at >= self._long_press_s:
                # The worker had not fired yet; it is still one long press.
                self._emit(PressKind.LONG)
            elif self._double_press_enabled():
                self._short_deadline = now + self._double_press_s
            else:
                self._emit(PressKind.SHORT)
            self._cond.notify_all()

    # --- classification (called with the lock held) ------------------------------

    def _expire(self, now: float) -> None:
        if self._short_deadline is not None and now >= self._short_deadline:
            self._short_deadline = None
            self._emit(PressKind.SHORT)
        if (
            self._down_at is not None
            and not self._consumed
            and now - self._down_at >= self._long_press_s
        ):
            self._consumed = True
            self._emit(PressKind.LONG)

    def _emit(self, kind: PressKind) -> None:
        self._ready.append(kind)

    def _next_wait(self, now: float) -> float | None:
        """Seconds until the next classification is due; None: until an edge or close()."""
        deadlines = []
        if self._short_deadline is not None:
            deadlines.append(self._short_deadline)
        if self._down_at is not None and not self._consumed:
            deadlines.append(self._down_at + self._long_press_s)
        return max(0.0, min(deadlines) - now) if deadlines else None

    # --- worker --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                # Checked under the lock: close() sets it and notifies under the same lock.
                if self._stop.is_set():
                    return
                now = time.monotonic()
                self._expire(now)
                if not self._ready:
                    self._cond.wait(self._next_wait(now))
                    continue
                ready = list(self._ready)
                self._ready.clear()
            for kind in ready:
                self._deliver(kind)

    def _deliver(self, kind: PressKind) -> None:
        log.info("button press classified kind=%s", kind)
        try:
            self._on_press(kind)
        except Exception:
            log.exception("button press handler failed kind=%s", kind)
