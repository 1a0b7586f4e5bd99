"""``make bench``: every benchmark in turn, each printing its figures beside its baseline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = [
    "agent.py",
    "press_latency.py",
    "upload.py",
    "command_roundtrip.py",
    "controller_registry.py",
]


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = []
    for name in BENCHES:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(here / name)], check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
