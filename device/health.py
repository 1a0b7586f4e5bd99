"""Hardware health readers. Each is bounded in time, never raises, and reports
``None`` ("unknown") when this machine lacks the hardware: never a made-up number."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.messages import Throttling

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 2.0
THERMAL_ROOT = Path("/sys/class/thermal")
# Raspberry Pi kernels name the SoC's zone so; other zones (PMIC, NVMe) are not the SoC.
SOC_THERMAL_TYPE = "cpu-thermal"
MIC_READ_S = 0.2
# The meter gives up on a stuck audio stack after this long; the read thread ends on its own.
MIC_TIMEOUT_S = 2.0
# 16-bit audio cannot show anything quieter; digital silence is reported as this floor.
DBFS_FLOOR = -96.0

_THROTTLED = re.compile(r"^\s*throttled=(0x[0-9a-fA-F]+)\s*$")
_TEMP = re.compile(r"^\s*temp=(-?\d+(?:\.\d+)?)'C\s*$")


@dataclass(frozen=True)
class HardwareHealth:
    soc_temp_c: float | None
    throttling: Throttling | None
    camera_present: bool | None  # not read here: the capture backend knows
    mic_level_dbfs: float | None
    clock_synced: bool | None
    clock_offset_ms: float | None
    disk_free_bytes: int
    disk_total_bytes: int
    uptime_s: float


# --- pure decoders ----------------------------------------------------------------------


def parse_vcgencmd_throttled(text: str) -> int:
    """``throttled=0x50005`` -> 0x50005."""
    match = _THROTTLED.match(text)
    if match is None:
        raise ValueError(f"not a vcgencmd get_throttled answer: {text!r}")
    return int(match.group(1), 16)


def parse_vcgencmd_temp(text: str) -> float:
    """``temp=48.3'C`` -> 48.3."""
    match = _TEMP.match(text)
    if match is None:
        raise ValueError(f"not a vcgencmd measure_temp answer: {text!r}")
    return float(match.group(1))


def decode_throttled(raw: int) -> Throttling:
    """Bits 0-3: under-voltage, ARM frequency capped, throttled, soft temperature limit,
    now; bits 16-19: the same, has occurred since boot."""

    def bit(n: int) -> bool:
        return bool(raw >> n & 1)

    return Throttling(
        raw=raw,
        under_voltage_now=bit(0),
        freq_capped_now=bit(1),
        throttled_now=bit(2),
        soft_temp_limit_now=bit(3),
        under_voltage_occurred=bit(16),
        freq_capped_occurred=bit(17),
        throttled_occurred=bit(18),
        soft_temp_limit_occurred=bit(19),
    )


def level_dbfs(samples: array[int], full_scale: int = 32768) -> float:
    """RMS level relative to a full-scale square wave, floored at DBFS_FLOOR."""
    if len(samples) == 0:
        raise ValueError("no samples")
    rms = math.sqrt(sum(s * s for s in samples) / len(samples))
    if rms == 0:
        return DBFS_FLOOR
    return max(DBFS_FLOOR, 20 * math.log10(rms / full_scale))


# --- clock: adjtimex(2) --------------------------------------------------------------

STA_UNSYNC = 0x0040
STA_NANO = 0x2000
TIME_ERROR = 5
# The kernel sets maxerror to this (16 s, NTP_PHASE_LIMIT) when nobody disciplines the clock.
MAXERROR_UNSYNCED_US = 16_000_000


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    # struct timex of the C library's adjtimex symbol; 11 trailing ints are reserved.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("reserved", ctypes.c_int * 11),
    ]


@dataclass(frozen=True)
class ClockState:
    synced: bool
    # The offset the kernel is still slewing away; unknown while unsynchronised.
    offset_ms: float | None


def clock_state(result: int, status: int, maxerror_us: int, offset: int) -> ClockState:
    """Interpret one adjtimex() answer (``offset`` in ns when STA_NANO is set, else us)."""
    synced = (
        result != TIME_ERROR and not status & STA_UNSYNC and 0 <= maxerror_us < MAXERROR_UNSYNCED_US
    )
    if not synced:
        return ClockState(synced=False, offset_ms=None)
    scale = 1e6 if status & STA_NANO else 1e3
    return ClockState(synced=True, offset_ms=offset / scale)


def read_clock() -> ClockState | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = _Timex()  # modes = 0: read only, needs no privilege
        result = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError) as exc:
        log.debug("clock reader unavailable error=%s", exc)
        return None
    if result < 0:
        log.debug("clock reader adjtimex failed errno=%d", ctypes.get_errno())
        return None
    return clock_state(result, timex.status, timex.maxerror, timex.offset)


# --- SoC temperature and throttling --------------------------------------------------


def find_soc_thermal_zone(root: Path = THERMAL_ROOT) -> Path | None:
    """The ``temp`` file of the SoC's thermal zone, if this kernel exposes one."""
    try:
        zones = sorted(root.glob("thermal_zone*"))
    except OSError:
        return None
    for zone in zones:
        try:
            if (zone / "type").read_text(encoding="ascii").strip() == SOC_THERMAL_TYPE:
                return zone / "temp"
        except (OSError, UnicodeDecodeError):
            continue
    return None


def read_thermal_zone(temp_file: Path) -> float | None:
    try:
        return int(temp_file.read_text(encoding="ascii").strip()) / 1000.0
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.debug("thermal zone unreadable path=%s error=%s", temp_file, exc)
        return None


def run_bounded(argv: list[str], timeout: float) -> str | None:
    """stdout of a short command, or None. A hung command is killed with its group and reaped."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        log.debug("health command failed to start argv=%s error=%s", argv, exc)
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.debug("health command timed out argv=%s timeout_s=%.1f", argv, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    if proc.returncode != 0:
        log.debug("health command failed argv=%s rc=%d", argv, proc.returncode)
        return None
    try:
        return out.decode("ascii")
    except UnicodeDecodeError:
        log.debug("health command printed non-ASCII output argv=%s", argv)
        return None


# --- microphone ---------------------------------------------------------------------


class _MicMeter:
    """A 200 ms read from the input device with pyaudio, opened and closed each time.

    Reads run in a thread of their own so a stuck audio stack costs one bounded wait;
    while one is still stuck, no second one starts.
    """

    def __init__(self, device: str) -> None:
        self._device = device
        self._busy = threading.Lock()

    def sample(self) -> float | None:
        if not self._busy.acquire(blocking=False):
            log.debug("microphone meter still busy with an earlier read")
            return None
        result: list[float | None] = [None]

        def read() -> None:
            try:
                result[0] = self._read()
            except Exception as exc:
                log.debug("microphone read failed device=%s error=%s", self._device, exc)
            finally:
                self._busy.release()

        worker = threading.Thread(target=read, name="mic-meter", daemon=True)
        worker.start()
        worker.join(MIC_TIMEOUT_S)
        if worker.is_alive():
            log.debug("microphone read timed out device=%s", self._device)
            return None
        return result[0]

    def _read(self) -> float | None:
        try:
            import pyaudio  # optional: only on units with PortAudio
        except ImportError:
            return None
        audio = pyaudio.PyAudio()
        try:
            info = self._find_device(audio)
            if info is None:
                return None
            rate = int(info["defaultSampleRate"])
            frames = max(1, int(rate * MIC_READ_S))
            stream = audio.open(
                format=pyaudio.paInt16,
                channels=1,
                rate=rate,
                input=True,
                input_device_index=int(info["index"]),
                frames_per_buffer=frames,
            )
            try:
                data = stream.read(frames, exception_on_overflow=False)
            finally:
                stream.close()
        finally:
            audio.terminate()
        samples = array("h")
        samples.frombytes(data[: len(data) - len(data) % 2])
        if sys.byteorder != "little":
            samples.byteswap()
        return level_dbfs(samples) if len(samples) else None

    def _find_device(self, audio: Any) -> dict[str, Any] | None:
        """``default``: PortAudio's default input; any other name matches a device by substring."""
        try:
            if self._device == "default":
                return dict(audio.get_default_input_device_info())
            for index in range(audio.get_device_count()):
                info = audio.get_device_info_by_index(index)
                if self._device in str(info["name"]) and int(info["maxInputChannels"]) > 0:
                    return dict(info)
        except OSError:  # PortAudio: no default input device
            pass
        log.debug("microphone not found device=%s", self._device)
        return None


# --- the probe ----------------------------------------------------------------------


class HealthProbe:
    """Samples the unit's hardware. ``audio_device`` None means the unit records no audio;
    ``clock_reader`` is the kernel's NTP state unless the unit's clock is simulated."""

    def __init__(
        self,
        data_dir: Path,
        started_monotonic: float,
        audio_device: str | None = None,
        *,
        command_timeout_s: float = COMMAND_TIMEOUT_S,
        clock_reader: Callable[[], ClockState | None] = read_clock,
    ) -> None:
        self._data_dir = data_dir
        self._read_clock = clock_reader
        self._started = started_monotonic
        self._timeout = command_timeout_s
        self._vcgencmd = shutil.which("vcgencmd")
        self._thermal_zone = find_soc_thermal_zone()
        self._mic = _MicMeter(audio_device) if audio_device is not None else None

    def sample(self, recording: bool) -> HardwareHealth:
        """While ``recording`` the recording owns the microphone; the meter stays off it."""
        clock = self._read_clock()
        free, total = self._disk()
        return HardwareHealth(
            soc_temp_c=self._soc_temp(),
            throttling=self._throttling(),
            camera_present=None,
            mic_level_dbfs=None if recording or self._mic is None else self._mic.sample(),
            clock_synced=None if clock is None else clock.synced,
            clock_offset_ms=None if clock is None else clock.offset_ms,
            disk_free_bytes=free,
            disk_total_bytes=total,
            uptime_s=max(0.0, time.monotonic() - self._started),
        )

    def _soc_temp(self) -> float | None:
        if self._vcgencmd is not None:
            out = run_bounded([self._vcgencmd, "measure_temp"], self._timeout)
            if out is not None:
                try:
                    return parse_vcgencmd_temp(out)
                except ValueError as exc:
                    log.debug("soc temperature unreadable error=%s", exc)
        if self._thermal_zone is not None:
            return read_thermal_zone(self._thermal_zone)
        return None

    def _throttling(self) -> Throttling | None:
        if self._vcgencmd is None:
            return None
        out = run_bounded([self._vcgencmd, "get_throttled"], self._timeout)
        if out is None:
            return None
        try:
            return decode_throttled(parse_vcgencmd_throttled(out))
        except ValueError as exc:
            log.debug("throttling unreadable error=%s", exc)
            return None

    def _disk(self) -> tuple[int, int]:
        # Before the data directory exists, the filesystem it will live on.
        path = self._data_dir
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            usage = shutil.disk_usage(path)
        except OSError as exc:
            log.warning("disk usage unreadable path=%s error=%s", path, exc)
            return 0, 0
        return usage.free, usage.total
