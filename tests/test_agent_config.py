"""Bad config files stop the agent at start with the key named and a non-zero exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from device.config import load_agent_config
from shared.configfile import ConfigError

GOOD = """
device_id = "room-204"
data_dir = "/tmp/classcap-test"
[broker]
url = "mqtt://127.0.0.1:1883"
"""


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "agent", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD)
    config = load_agent_config(path)
    assert config.capture.segment_seconds == 60
    assert config.broker.port == 1883
    assert config.system.simulated_clock is False  # a real unit's clock is the kernel's
    assert run_check(path).returncode == 0


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (GOOD + "\n[capture]\nframerate = 0\n", "capture.framerate"),
        (GOOD + '\n[capture]\nbackend = "webcam"\n', "capture.backend"),
        (GOOD + '\n[capture]\nsegment_seconds = "long"\n', "capture.segment_seconds"),
        (GOOD + "\n[gpio]\nbutton_pin = 17\nlight_pin = 17\n", "gpio"),
        (GOOD + "\n[upload]\nconcurrency = 99\n", "upload.concurrency"),
        (GOOD + '\ncolour = "blue"\n', "colour: unknown key"),
        (GOOD + "\n[spool]\nmin_free = 5\n", "spool.min_free: unknown key"),
        (GOOD + '\n[system]\nsimulated_clock = "sometimes"\n', "system.simulated_clock"),
        (GOOD.replace('"room-204"', '"Room 204!"'), "device_id"),
        (GOOD.replace("mqtt://127.0.0.1:1883", "http://broker"), "broker.url"),
        (GOOD.replace("mqtt://127.0.0.1:1883", "mqtt://broker:99999"), "broker.url"),
        ('data_dir = "/x"\n[broker]\nurl = "mqtt://h"\n', "device_id: required key is missing"),
        (GOOD + "\n[broker\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key_and_exits_non_zero(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"invalid config|not valid TOML") as info:
        load_agent_config(path)
    assert named in str(info.value)
    result = run_check(path)
    assert result.returncode == 2
    assert named in result.stderr


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    result = run_check(tmp_path / "nope.toml")
    assert result.returncode == 2
    assert "nope.toml: config file not found" in result.stderr


def test_agent_run_with_bad_config_exits_non_zero(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD + "\n[health]\ninterval_s = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "health.interval_s" in result.stderr
