"""Segment upload throughput into a real SeaweedFS on loopback: the unit's uploader beside a
plain ``curl -T`` of the same file to a presigned URL of the same endpoint.

Each round uploads one segment-sized random file four ways, interleaved:

- ``uploader``: the unit's path, a grant from ``S3Storage.presign_put`` and
  ``device.http_put.put_file`` with the grant's headers and no cap;
- ``curl``: ``curl -T`` with the same presigned URL and headers (its
  ``Expect: 100-continue`` turned off: the grant does not sign it);
- ``boto3``: ``upload_file`` with credentials and boto3's defaults
  (multipart above 8 MB, 10 threads), what a unit holding keys would do;
- ``capped``: the unit's path under a bandwidth cap, to show the cap holds.

Every object grant-uploaded is verified by checksum afterwards. Prints the
median of each in MB/s (10^6 bytes), the client's CPU time per segment (the
store runs on the same cores, so wall-clock rates move with its load), and the
uploader/curl ratio.

    .venv/bin/python bench/upload.py [--size-mb 20] [--rounds 5] [--cap-mbit 100]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

# Run as a plain script: the checkout's tests.support is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import at_least, at_most, report
from controller.storage.s3 import S3Settings, S3Storage
from device.http_put import put_file
from tests.support.seaweed_server import SeaweedServer

TIMEOUT_S = 120.0


def _uploader(storage: S3Storage, path: Path, sha: str, key: str, cap_bps: int = 0) -> None:
    grant = storage.presign_put(key, path.stat().st_size, sha, 600)
    response = put_file(grant.url, path, grant.headers, TIMEOUT_S, bandwidth_bps=cap_bps)
    if not response.ok:
        raise RuntimeError(f"uploader PUT failed: {response.status} {response.body[:200]}")


def _curl(storage: S3Storage, path: Path, sha: str, key: str) -> None:
    grant = storage.presign_put(key, path.stat().st_size, sha, 600)
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path)]
    for name, value in grant.headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv += ["-H", "Expect:", grant.url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if done.returncode != 0 or done.stdout.strip() != "200":
        raise RuntimeError(f"curl PUT failed: rc={done.returncode} {done.stdout} {done.stderr}")


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (curl runs as a child)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _timed(action: Callable[[], None], size: int) -> tuple[float, float]:
    """(MB/s, CPU milliseconds) of one upload."""
    cpu = _cpu_s()
    started = time.perf_counter()
    action()
    elapsed = time.perf_counter() - started
    return size / elapsed / 1e6, (_cpu_s() - cpu) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=20, help="segment size in MB (10^6 bytes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cap-mbit", type=int, default=100, help="cap for the capped run")
    args = parser.parse_args()
    size = args.size_mb * 1_000_000

    with tempfile.TemporaryDirectory(prefix="bench-upload-") as workdir:
        root = Path(workdir)
        path = root / "seg-00000.mp4"
        path.write_bytes(os.urandom(size))
        sha = hashlib.sha256(path.read_bytes()).hexdigest()

        with SeaweedServer(root / "seaweedfs", volume_size_limit_mb=4096) as server:
            bucket = f"bench-{secrets.token_hex(4)}"
            storage = S3Storage(
                S3Settings(
                    endpoint_url=server.endpoint_url,
                    region=server.region,
                    bucket=bucket,
                    prefix="bench",
                    access_key=server.access_key,
                    secret_key=server.secret_key,
                )
            )
            storage.ensure_bucket()
            client = server.client()
            # One untimed upload: the store allocates the bucket's first volume.
            _uploader(storage, path, sha, storage.key_for("unit", "warmup", path.name))

            rates: dict[str, list[float]] = {"uploader": [], "curl": [], "boto3": [], "capped": []}
            cpu_ms: dict[str, list[float]] = {method: [] for method in rates}
            grant_keys: list[str] = []
            for n in range(args.rounds):
                keys = {
                    method: storage.key_for("unit", f"{method}-{n}", path.name) for method in rates
                }
                grant_keys += [keys["uploader"], keys["curl"], keys["capped"]]
                runs: dict[str, Callable[[], None]] = {
                    "uploader": partial(_uploader, storage, path, sha, keys["uploader"]),
                    "curl": partial(_curl, storage, path, sha, keys["curl"]),
                    "boto3": partial(client.upload_file, str(path), bucket, keys["boto3"]),
                    "capped": partial(
                        _uploader, storage, path, sha, keys["capped"], args.cap_mbit * 1_000_000
                    ),
                }
                for method, run in runs.items():
                    rate, cpu = _timed(run, size)
                    rates[method].append(rate)
                    cpu_ms[method].append(cpu)
            bad = [k for k in grant_keys if not storage.verify(k, size, sha).ok]
            if bad:
                print(f"verification failed for {bad}", file=sys.stderr)
                return 1

    medians = {method: statistics.median(values) for method, values in rates.items()}
    print(f"segment {args.size_mb} MB, {args.rounds} rounds, SeaweedFS on loopback")
    for method, values in rates.items():
        spread = ", ".join(f"{v:.0f}" for v in values)
        cpu = statistics.median(cpu_ms[method])
        print(
            f"  {method:<9} median {medians[method]:7.1f} MB/s  client CPU {cpu:5.0f} ms"
            f"   (MB/s each round: {spread})"
        )
    print(f"  cap {args.cap_mbit} Mbit/s = {args.cap_mbit / 8:.1f} MB/s")
    ratio = medians["uploader"] / medians["curl"]
    print(f"uploader/curl = {ratio:.2f} (target >= 0.90)")
    curl = "curl -T, presigned PUT"
    setup = f"{args.size_mb} MB segment, {args.rounds} rounds"
    report(
        "upload: uploader (grant + PUT)",
        medians["uploader"],
        "MB/s",
        baseline=medians["curl"],
        baseline_name=curl,
        target=at_least(0.9, of_ratio=True),
        note=setup,
    )
    report(
        "upload: boto3 upload_file, with keys",
        medians["boto3"],
        "MB/s",
        baseline=medians["curl"],
        baseline_name=curl,
        note=setup,
    )
    report(
        "upload: uploader client CPU per segment",
        statistics.median(cpu_ms["uploader"]),
        "ms",
        baseline=statistics.median(cpu_ms["curl"]),
        baseline_name="curl -T, CPU per segment",
    )
    # The token bucket promises the cap within a tenth over any stretch of a second or more.
    report(
        f"upload: uploader capped at {args.cap_mbit} Mbit/s",
        medians["capped"],
        "MB/s",
        baseline=args.cap_mbit / 8,
        baseline_name="the cap",
        target=at_most(1.1, of_ratio=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
