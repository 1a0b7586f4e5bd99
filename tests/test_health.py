"""Health readers on this machine (no Pi hardware) and on Pi-shaped stand-ins."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.health import (
    DBFS_FLOOR,
    MAXERROR_UNSYNCED_US,
    STA_NANO,
    STA_UNSYNC,
    TIME_ERROR,
    ClockState,
    HealthProbe,
    clock_state,
    decode_throttled,
    find_soc_thermal_zone,
    level_dbfs,
    parse_vcgencmd_temp,
    parse_vcgencmd_throttled,
    read_clock,
    read_thermal_zone,
)
from device.simulated_clock import SimulatedClock
from shared.clock import set_offset
from shared.messages import Throttling

# --- throttling -----------------------------------------------------------------------


def test_decode_throttled_0x50005() -> None:
    t = decode_throttled(0x50005)
    assert t == Throttling(
        raw=0x50005,
        under_voltage_now=True,
        freq_capped_now=False,
        throttled_now=True,
        soft_temp_limit_now=False,
        under_voltage_occurred=True,
        freq_capped_occurred=False,
        throttled_occurred=True,
        soft_temp_limit_occurred=False,
    )


def test_decode_throttled_known_values() -> None:
    assert not any(v for k, v in decode_throttled(0).model_dump().items() if k != "raw")
    everything = decode_throttled(0xF000F).model_dump()
    assert all(v for k, v in everything.items() if k != "raw")
    past_only = decode_throttled(0x80000)
    assert past_only.soft_temp_limit_occurred
    assert not past_only.soft_temp_limit_now
    capped = decode_throttled(0x20002)
    assert capped.freq_capped_now and capped.freq_capped_occurred
    assert not capped.throttled_now


def test_parse_vcgencmd_throttled() -> None:
    assert parse_vcgencmd_throttled("throttled=0x50005\n") == 0x50005
    assert parse_vcgencmd_throttled("throttled=0x0") == 0


@pytest.mark.parametrize(
    "junk",
    ["", "throttled=", "throttled=0xZZ", "throttled=50005", "temp=48.3'C", "error=1 error_msg=x"],
)
def test_parse_vcgencmd_throttled_junk(junk: str) -> None:
    with pytest.raises(ValueError, match="not a vcgencmd get_throttled answer"):
        parse_vcgencmd_throttled(junk)


def test_parse_vcgencmd_temp() -> None:
    assert parse_vcgencmd_temp("temp=48.3'C\n") == 48.3
    assert parse_vcgencmd_temp("temp=-5.0'C") == -5.0
    for junk in ("", "temp=hot", "throttled=0x0", "48.3"):
        with pytest.raises(ValueError):
            parse_vcgencmd_temp(junk)


# --- clock ------------------------------------------------------------------------------


def test_clock_state_decoding() -> None:
    synced = clock_state(0, 0, 50_000, 1500)
    assert synced.synced and synced.offset_ms == 1.5
    nano = clock_state(0, STA_NANO, 50_000, 1_500_000)
    assert nano.synced and nano.offset_ms == 1.5
    for unsynced in (
        clock_state(TIME_ERROR, 0, 50_000, 0),
        clock_state(0, STA_UNSYNC, 50_000, 0),
        clock_state(0, 0, MAXERROR_UNSYNCED_US, 0),
    ):
        assert not unsynced.synced
        assert unsynced.offset_ms is None  # unknown, not zero


def test_read_clock_on_this_machine() -> None:
    state = read_clock()
    assert state is not None  # adjtimex(2) answers unprivileged reads on Linux
    assert isinstance(state.synced, bool)
    assert (state.offset_ms is None) == (not state.synced)


@pytest.fixture
def simulated_clock() -> Iterator[SimulatedClock]:
    clock = SimulatedClock()
    yield clock
    set_offset(0)


def test_probe_reports_a_simulated_clock_instead_of_the_kernel_s(
    tmp_path: Path, simulated_clock: SimulatedClock
) -> None:
    probe = HealthProbe(tmp_path, time.monotonic(), clock_reader=simulated_clock.read)
    health = probe.sample(recording=False)
    assert (health.clock_synced, health.clock_offset_ms) == (True, 0.0)
    simulated_clock.set(-86400, synced=False)
    health = probe.sample(recording=False)
    assert (health.clock_synced, health.clock_offset_ms) == (False, None)


def test_probe_clock_reader_that_knows_nothing_gives_unknown(tmp_path: Path) -> None:
    probe = HealthProbe(tmp_path, time.monotonic(), clock_reader=lambda: None)
    health = probe.sample(recording=False)
    assert (health.clock_synced, health.clock_offset_ms) == (None, None)
    slewing = HealthProbe(
        tmp_path, time.monotonic(), clock_reader=lambda: ClockState(synced=True, offset_ms=-2.5)
    )
    assert slewing.sample(recording=False).clock_offset_ms == -2.5


# --- microphone level -------------------------------------------------------------------


def test_level_dbfs() -> None:
    assert level_dbfs(array("h", [32767, -32768] * 100)) == pytest.approx(0.0, abs=0.01)
    assert level_dbfs(array("h", [16384, -16384] * 100)) == pytest.approx(-6.02, abs=0.01)
    assert level_dbfs(array("h", [0] * 100)) == DBFS_FLOOR
    assert level_dbfs(array("h", [1, -1] * 100)) == pytest.approx(-90.31, abs=0.01)
    with pytest.raises(ValueError):
        level_dbfs(array("h"))


# --- the probe on this machine ------------------------------------------------------------


def _has_pyaudio() -> bool:
    return importlib.util.find_spec("pyaudio") is not None


def test_probe_on_this_machine_reports_unknown_hardware_as_none(tmp_path: Path) -> None:
    started = time.monotonic() - 5.0
    probe = HealthProbe(tmp_path, started, audio_device="default")
    health = probe.sample(recording=False)
    no_soc_sensor = shutil.which("vcgencmd") is None and find_soc_thermal_zone() is None
    if no_soc_sensor:
        assert health.soc_temp_c is None
    else:
        assert isinstance(health.soc_temp_c, float)
    if shutil.which("vcgencmd") is None:
        assert health.throttling is None
    if not _has_pyaudio():
        assert health.mic_level_dbfs is None
    assert health.camera_present is None
    assert isinstance(health.clock_synced, bool)
    usage = shutil.disk_usage(tmp_path)
    assert health.disk_total_bytes == usage.total
    assert abs(health.disk_free_bytes - usage.free) < 256 * 1024 * 1024
    assert health.uptime_s >= 5.0


def test_probe_leaves_microphone_alone_while_recording(tmp_path: Path) -> None:
    probe = HealthProbe(tmp_path, time.monotonic(), audio_device="default")
    assert probe.sample(recording=True).mic_level_dbfs is None


def test_probe_disk_of_missing_data_dir_is_its_filesystem(tmp_path: Path) -> None:
    probe = HealthProbe(tmp_path / "not" / "yet", time.monotonic())
    health = probe.sample(recording=False)
    assert health.disk_total_bytes == shutil.disk_usage(tmp_path).total
    assert health.disk_free_bytes > 0


# --- Pi-shaped stand-ins for the hardware edge ----------------------------------------------


def test_health_mock_sysfs_cpu_thermal_zone(tmp_path: Path) -> None:
    for n, (kind, temp) in enumerate([("rp1_adc", "31000"), ("cpu-thermal", "48250")]):
        zone = tmp_path / f"thermal_zone{n}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    temp_file = find_soc_thermal_zone(tmp_path)
    assert temp_file == tmp_path / "thermal_zone1" / "temp"
    assert read_thermal_zone(temp_file) == 48.25
    (tmp_path / "thermal_zone1" / "temp").write_text("garbage")
    assert read_thermal_zone(temp_file) is None
    assert find_soc_thermal_zone(tmp_path / "absent") is None


def _fake_vcgencmd(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "vcgencmd"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)


def test_health_mock_vcgencmd_values_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    _fake_vcgencmd(
        bin_dir,
        'case "$1" in\n'
        '  measure_temp) echo "temp=51.6\'C" ;;\n'
        '  get_throttled) echo "throttled=0x50005" ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    health = HealthProbe(tmp_path, time.monotonic()).sample(recording=False)
    assert health.soc_temp_c == 51.6
    assert health.throttling == decode_throttled(0x50005)


def test_health_mock_vcgencmd_junk_and_failure_are_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    _fake_vcgencmd(bin_dir, 'echo "VCHI initialization failed"\nexit 255\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    health = HealthProbe(tmp_path, time.monotonic()).sample(recording=False)
    assert health.throttling is None
    _fake_vcgencmd(bin_dir, 'echo "throttled=banana"\n')
    assert HealthProbe(tmp_path, time.monotonic()).sample(recording=False).throttling is None


def test_health_mock_vcgencmd_hanging_is_killed_and_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    pids = tmp_path / "pids"
    # Writes its PID, then becomes a long sleep (exec keeps the PID).
    _fake_vcgencmd(bin_dir, f'echo $$ >> "{pids}"\nexec sleep 300\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    probe = HealthProbe(tmp_path, time.monotonic(), command_timeout_s=0.3)
    health = probe.sample(recording=False)
    assert health.throttling is None
    started = [int(line) for line in pids.read_text().split()]
    assert len(started) == 2  # measure_temp and get_throttled
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
