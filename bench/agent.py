"""Agent footprint: resident memory and CPU of the agent process alone (not its ffmpeg
encoder), idle and while recording and uploading, beside the floor of a bare Python
process that imports what the agent imports for MQTT and its models (medians of 5 s
windows).

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

from bench._harness import at_most, describe_machine, report, rig, sample
from tests.support.agent_proc import make_agent
from tests.support.processes import wait_for

# Says when its imports are done, so that their CPU time is not counted as idling.
FLOOR = (
    "import json, sqlite3, paho.mqtt.client, pydantic, time; "
    "print('ready', flush=True); time.sleep(30)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=30)
    parser.add_argument("--recording", type=float, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, rig(Path(tmp)) as r:
        floor = subprocess.Popen([sys.executable, "-c", FLOOR], stdout=subprocess.PIPE)
        try:
            assert floor.stdout is not None
            floor.stdout.readline()
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
    floor_name = "python + paho + pydantic, idle"
    segments = f"{sum(stored.values())} segments stored while measured"
    report(
        "agent idle: RSS",
        idle_rss,
        "MB",
        baseline=floor_rss,
        baseline_name=floor_name,
        target=at_most(60),
    )
    report(
        "agent idle: CPU",
        idle_cpu,
        "% of a core",
        baseline=floor_cpu,
        baseline_name=floor_name,
        target=at_most(3),
    )
    report(
        "agent recording + uploading: RSS",
        rec_rss,
        "MB",
        baseline=floor_rss,
        baseline_name=floor_name,
        note=segments,
    )
    report(
        "agent recording + uploading: CPU",
        rec_cpu,
        "% of a core",
        baseline=floor_cpu,
        baseline_name=floor_name,
        target=at_most(5),
        note=segments,
    )


if __name__ == "__main__":
    main()
