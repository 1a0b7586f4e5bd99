"""The simulator's child processes: each in a session of its own (a Ctrl-C reaches only the
simulator, which stops them in order), each told by the kernel to stop should the
simulator die, and each stopped by its own process group, never by name."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _stop_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Starts ``argv`` with its output appended to ``log_path``. Call it from the main thread:
    the kernel signals the child when the *thread* that started it ends."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_stop_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
        )
    log.debug("process started pid=%d argv0=%s", proc.pid, argv[0])
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL to its whole group after ``timeout``; always reaped. Whatever
    the process left behind in its group (an encoder, say) is killed as well."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("process ignored SIGTERM, killing pid=%d", proc.pid)
            kill_group(proc)
    kill_group(proc)
    return proc.wait()


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the process group the child leads (its own session), then reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def children(pid: int, name: str) -> list[int]:
    """PIDs of ``pid``'s live children whose command name is ``name`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if comm == name and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def runs(pid: int, marker: str) -> bool:
    """Whether ``pid`` is alive with ``marker`` in its command line (not a reused PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def steady_port() -> int:
    """A free loopback port below the kernel's ephemeral range, so that no outgoing
    connection takes it while its listener is closed for a while (and opened again)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free loopback port below {low}")


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Polls ``predicate`` until true or ``timeout`` passes; bounded by design."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
