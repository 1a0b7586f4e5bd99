"""Button classification and light patterns on gpiozero MockFactory pins (same code as a Pi)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from gpiozero.pins.mock import MockFactory

from device.button import PressKind, RecordButton
from device.control_socket import drive_press
from device.light import Light, LightPattern, make_pin_factory
from tests.support.processes import wait_for

LONG_S = 0.5
DOUBLE_S = 0.3
BUTTON_PIN = 17
LIGHT_PIN = 27


class Presses:
    """Collects on_press calls and the threads they arrive on."""

    def __init__(self) -> None:
        self.kinds: list[PressKind] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, kind: PressKind) -> None:
        with self._lock:
            self.kinds.append(kind)
            self.threads.add(threading.current_thread().name)

    def wait(self, count: int) -> list[PressKind]:
        assert wait_for(lambda: len(self.kinds) >= count, timeout=10), self.kinds
        return list(self.kinds)


@pytest.fixture
def factory() -> MockFactory:
    return MockFactory()


@pytest.fixture
def presses() -> Presses:
    return Presses()


@pytest.fixture
def button(factory: MockFactory, presses: Presses) -> Iterator[RecordButton]:
    btn = RecordButton(BUTTON_PIN, LONG_S, DOUBLE_S, presses, pin_factory=factory)
    yield btn
    btn.close()


def test_button_mock_pins_short_press(button: RecordButton, presses: Presses) -> None:
    drive_press(button.pin, PressKind.SHORT, LONG_S)
    assert presses.wait(1) == [PressKind.SHORT]
    # A later press shows the first one was reported exactly once.
    drive_press(button.pin, PressKind.SHORT, LONG_S)
    assert presses.wait(2) == [PressKind.SHORT, PressKind.SHORT]
    assert presses.threads == {f"button-gpio{BUTTON_PIN}"}


def test_button_mock_pins_short_press_reported_at_release_when_double_means_nothing(
    factory: MockFactory, presses: Presses
) -> None:
    btn = RecordButton(
        BUTTON_PIN, LONG_S, 30.0, presses, pin_factory=factory, double_press_enabled=lambda: False
    )
    try:
        # With a 30 s double-press window the SHORT can only come this soon from the release.
        drive_press(btn.pin, PressKind.SHORT, LONG_S)
        assert presses.wait(1) == [PressKind.SHORT]
    finally:
        btn.close()


def test_button_mock_pins_long_press_fires_while_held_and_once(
    button: RecordButton, presses: Presses
) -> None:
    button.pin.drive_low()  # type: ignore[attr-defined]
    try:
        assert presses.wait(1) == [PressKind.LONG]
        # Still held well past a second long period: no repeat.
        time.sleep(LONG_S * 2)
    finally:
        button.pin.drive_high()  # type: ignore[attr-defined]
    drive_press(button.pin, PressKind.SHORT, LONG_S)
    assert presses.wait(2) == [PressKind.LONG, PressKind.SHORT]


def test_button_mock_pins_simulated_long_press(button: RecordButton, presses: Presses) -> None:
    drive_press(button.pin, PressKind.LONG, LONG_S)
    drive_press(button.pin, PressKind.SHORT, LONG_S)
    assert presses.wait(2) == [PressKind.LONG, PressKind.SHORT]


def test_button_mock_pins_double_press_is_one_double(
    button: RecordButton, presses: Presses
) -> None:
    drive_press(button.pin, PressKind.DOUBLE, LONG_S)
    drive_press(button.pin, PressKind.SHORT, LONG_S)
    assert presses.wait(2) == [PressKind.DOUBLE, PressKind.SHORT]


def test_button_mock_pins_presses_apart_are_two_shorts(
    button: RecordButton, presses: Presses
) -> None:
    drive_press(button.pin, PressKind.SHORT, LONG_S)
    assert presses.wait(1) == [PressKind.SHORT]  # the window closed before the next press
    drive_press(button.pin, PressKind.SHORT, LONG_S)
    assert presses.wait(2) == [PressKind.SHORT, PressKind.SHORT]


def test_button_mock_pins_second_press_held_is_still_one_double(
    button: RecordButton, presses: Presses
) -> None:
    drive_press(button.pin, PressKind.SHORT, LONG_S)
    button.pin.drive_low()  # type: ignore[attr-defined]
    time.sleep(LONG_S * 2)
    button.pin.drive_high()  # type: ignore[attr-defined]
    drive_press(button.pin, PressKind.SHORT, LONG_S)
    assert presses.wait(2) == [PressKind.DOUBLE, PressKind.SHORT]


def test_button_mock_pins_callbacks_from_own_thread_and_survive_errors(
    factory: MockFactory,
) -> None:
    seen: list[PressKind] = []
    threads: set[str] = set()

    def flaky(kind: PressKind) -> None:
        threads.add(threading.current_thread().name)
        seen.append(kind)
        if len(seen) == 1:
            raise RuntimeError("handler bug")

    btn = RecordButton(BUTTON_PIN, LONG_S, DOUBLE_S, flaky, pin_factory=factory)
    try:
        drive_press(btn.pin, PressKind.SHORT, LONG_S)
        assert wait_for(lambda: len(seen) >= 1, timeout=10)
        drive_press(btn.pin, PressKind.DOUBLE, LONG_S)
        assert wait_for(lambda: len(seen) >= 2, timeout=10)
        assert seen == [PressKind.SHORT, PressKind.DOUBLE]
        assert threads == {f"button-gpio{BUTTON_PIN}"}
    finally:
        btn.close()


def test_button_mock_pins_close_stops_worker_and_frees_pin(
    factory: MockFactory, presses: Presses
) -> None:
    btn = RecordButton(BUTTON_PIN, LONG_S, DOUBLE_S, presses, pin_factory=factory)
    pin = btn.pin
    btn.close()
    btn.close()  # idempotent
    assert all(t.name != f"button-gpio{BUTTON_PIN}" for t in threading.enumerate())
    pin.drive_low()  # type: ignore[attr-defined]
    pin.drive_high()  # type: ignore[attr-defined]
    again = RecordButton(BUTTON_PIN, LONG_S, DOUBLE_S, presses, pin_factory=factory)
    again.close()
    assert presses.kinds == []


def test_button_rejects_non_positive_timings(factory: MockFactory, presses: Presses) -> None:
    with pytest.raises(ValueError, match="positive"):
        RecordButton(BUTTON_PIN, 0, DOUBLE_S, presses, pin_factory=factory)


def test_drive_press_refuses_a_pin_it_cannot_drive() -> None:
    with pytest.raises(TypeError, match="mock pins only"):
        drive_press(object(), PressKind.SHORT, LONG_S)


# --- light ------------------------------------------------------------------------------


@pytest.fixture
def light(factory: MockFactory) -> Iterator[Light]:
    lamp = Light(LIGHT_PIN, pin_factory=factory)
    yield lamp
    lamp.close()


def _toggles(light: Light) -> bool:
    """The pin is seen both lit and dark within a bounded wait."""
    return wait_for(lambda: light.is_lit, timeout=5, interval=0.005) and wait_for(
        lambda: not light.is_lit, timeout=5, interval=0.005
    )


def test_light_mock_pins_starts_off(light: Light) -> None:
    assert light.pattern == LightPattern.OFF
    assert not light.is_lit


def test_light_mock_pins_recording_is_solid(light: Light, factory: MockFactory) -> None:
    light.show(LightPattern.RECORDING)
    assert light.pattern == LightPattern.RECORDING
    assert light.is_lit
    assert factory.pin(LIGHT_PIN).state
    light.show(LightPattern.OFF)
    assert not light.is_lit


@pytest.mark.parametrize(
    "pattern",
    [
        LightPattern.UPLOAD_BACKLOG,
        LightPattern.ERROR,
        LightPattern.CANNOT_RECORD,
        LightPattern.STARTING,
    ],
)
def test_light_mock_pins_blinking_patterns_toggle(light: Light, pattern: LightPattern) -> None:
    light.show(pattern)
    assert light.pattern == pattern
    assert _toggles(light)
    assert _toggles(light)


def test_light_mock_pins_double_blink_has_two_flashes_then_a_pause(
    light: Light, factory: MockFactory
) -> None:
    pin = factory.pin(LIGHT_PIN)
    pin.clear_states()
    light.show(LightPattern.CANNOT_RECORD)
    assert wait_for(lambda: len(pin.states) >= 9, timeout=10)
    on_runs = [s.state for s in pin.states[1:9]]
    assert on_runs == [True, False, True, False, True, False, True, False]
    # The dark gap after each pair is longer than the gap inside it.
    gaps = [s.timestamp for s in pin.states[1:9]]
    assert gaps[4] > gaps[2]


def test_light_mock_pins_recording_after_blink_stays_lit(light: Light) -> None:
    for pattern in (LightPattern.CANNOT_RECORD, LightPattern.ERROR):
        light.show(pattern)
        assert _toggles(light)
        light.show(LightPattern.RECORDING)
        assert light.is_lit
        # A stopped blink thread must not switch the light off behind our back.
        assert not wait_for(lambda: not light.is_lit, timeout=0.5, interval=0.01)


def test_light_mock_pins_show_is_idempotent(light: Light, factory: MockFactory) -> None:
    pin = factory.pin(LIGHT_PIN)
    light.show(LightPattern.RECORDING)
    pin.clear_states()
    light.show(LightPattern.RECORDING)
    light.show(LightPattern.RECORDING)
    assert [s.state for s in pin.states] == [True]


def test_light_mock_pins_close_turns_off(factory: MockFactory) -> None:
    lamp = Light(LIGHT_PIN, pin_factory=factory)
    lamp.show(LightPattern.RECORDING)
    lamp.close()
    lamp.close()
    assert not factory.pin(LIGHT_PIN).state
    lamp.show(LightPattern.ERROR)  # after close: ignored, no thread left blinking
    assert not factory.pin(LIGHT_PIN).state


def test_make_pin_factory_mock_pins_drive_button_and_light() -> None:
    assert make_pin_factory(False) is None
    factory = make_pin_factory(True)
    assert isinstance(factory, MockFactory)
    presses = Presses()
    btn = RecordButton(BUTTON_PIN, LONG_S, DOUBLE_S, presses, pin_factory=factory)
    lamp = Light(LIGHT_PIN, pin_factory=factory)
    try:
        lamp.show(LightPattern.RECORDING)
        drive_press(btn.pin, PressKind.DOUBLE, LONG_S)
        assert presses.wait(1) == [PressKind.DOUBLE]
        assert lamp.is_lit
    finally:
        btn.close()
        lamp.close()
