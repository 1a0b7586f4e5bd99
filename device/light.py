"""The status light: one LED whose pattern tells the teacher what the unit is doing."""

from __future__ import annotations

import itertools
import logging
import threading
from enum import StrEnum

from gpiozero import LED
from gpiozero.pins import Factory
from gpiozero.pins.mock import MockFactory

log = logging.getLogger(__name__)


class LightPattern(StrEnum):
    OFF = "off"
    # Privacy: solid on whenever the camera records, whatever else is going on.
    RECORDING = "recording"
    UPLOAD_BACKLOG = "upload_backlog"
    ERROR = "error"
    # Disk full or no camera: two quick blinks, then a pause.
    CANNOT_RECORD = "cannot_record"
    STARTING = "starting"


# (on seconds, off seconds) of the patterns that are plain blinks.
_BLINKS: dict[LightPattern, tuple[float, float]] = {
    LightPattern.UPLOAD_BACKLOG: (1.0, 1.0),
    LightPattern.ERROR: (0.25, 0.25),
    LightPattern.STARTING: (0.05, 0.1),
}
# The double blink as a repeating sequence of pin values, one per step.
_DOUBLE_BLINK_STEP_S = 0.2
_DOUBLE_BLINK = (1, 0, 1, 0, 0, 0, 0, 0)


def make_pin_factory(mock: bool) -> Factory | None:
    """MockFactory pins for a simulated unit; None lets gpiozero pick the Pi's driver (lgpio)."""
    return MockFactory() if mock else None


class Light:
    def __init__(self, pin: int, pin_factory: Factory | None = None) -> None:
        self._led = LED(pin, initial_value=False, pin_factory=pin_factory)
        self._lock = threading.Lock()
        self._pattern = LightPattern.OFF
        self._closed = False

    @property
    def pattern(self) -> LightPattern:
        return self._pattern

    @property
    def is_lit(self) -> bool:
        """The pin's state right now (a blinking light is lit half the time)."""
        return not self._closed and bool(self._led.is_lit)

    def show(self, pattern: LightPattern) -> None:
        """Switch to ``pattern``; showing the current pattern again changes nothing."""
        with self._lock:
            if self._closed or pattern == self._pattern:
                return
            self._led.source = None  # stops a running double blink
            if pattern == LightPattern.OFF:
                self._led.off()
            elif pattern == LightPattern.RECORDING:
                self._led.on()
            elif pattern == LightPattern.CANNOT_RECORD:
                self._led.off()
                self._led.source_delay = _DOUBLE_BLINK_STEP_S
                self._led.source = itertools.cycle(_DOUBLE_BLINK)
            else:
                on_time, off_time = _BLINKS[pattern]
                self._led.blink(on_time=on_time, off_time=off_time, background=True)
            log.info("light pattern=%s previous=%s", pattern, self._pattern)
            self._pattern = pattern

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._led.source = None
            self._led.off()
            self._led.close()
