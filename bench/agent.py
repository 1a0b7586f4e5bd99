"""Agent footprint: resident memory and CPU of the agent process alone (not its ffmpeg
encoder), idle and while recording and uploading, beside the floor of a bare Python
process that imports what the agent imports for MQTT and its models.

    .venv/bin/python bench/agent.py [--idle 30] [--recording 60]

Targets: under 60 MB and 3 % of one core idle; under 5 % while recording and uploading.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import describe_machine, rig, sample
from tests.support.agent_proc import make_agent
from tests.support.processes import wait_for

FLOOR = "import json, sqlite3, paho.mqtt.client, pydantic, time; time.sleep(30)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=30)
    parser.add_argument("--recording", type=float, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, rig(Path(tmp)) as r:
        floor = subprocess.Popen([sys.executable, "-c", FLOOR])
        try:
            floor_rss, floor_cpu = sample(floor.pid, 10)
        finally:
            floor.kill()
            floor.wait()

        agent = make_agent(Path(tmp), "bench-unit", r.broker.url, segment_seconds=10)
        agent.start()
        try:
            assert agent.proc is not None
            pid = agent.proc.pid
            time.sleep(5)
            idle_rss, idle_cpu = sample(pid, args.idle)
            agent.press("short")
            assert wait_for(lambda: agent.status()["state"] == "recording", 10)
            rec_rss, rec_cpu = sample(pid, args.recording)
            agent.press("short")
            assert wait_for(lambda: agent.status()["state"] == "idle", 20)
            stored = r.controller.grantor("bench-unit").stored
        finally:
            agent.stop()

    print(f"agent footprint ({describe_machine()})")
    print(f"{'process':<34}{'RSS MB (median)':>16}{'CPU % (median)':>16}")
    print(f"{'floor: python + paho + pydantic':<34}{floor_rss:>16.1f}{floor_cpu:>16.2f}")
    print(f"{'agent idle':<34}{idle_rss:>16.1f}{idle_cpu:>16.2f}")
    print(f"{'agent recording + uploading':<34}{rec_rss:>16.1f}{rec_cpu:>16.2f}")
    print(
        f"agent idle RSS / floor: {idle_rss / floor_rss:.2f}x; segments stored while recording: "
        f"{sum(stored.values())}"
    )
    print("targets: idle < 60 MB and < 3 %; recording + uploading < 5 %")


if __name__ == "__main__":
    main()
