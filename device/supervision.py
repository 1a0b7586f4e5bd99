"""systemd supervision: ``Type=notify`` readiness and a watchdog fed only while healthy.

The camera can stall after hours while the process looks alive; pinging the watchdog
only while ``healthy()`` holds lets systemd restart a unit whose frames stopped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def _notify_address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]  # abstract namespace
    return address


def _watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # set for another process (we were started by it)
    try:
        value = int(usec)
    except ValueError:
        log.warning("watchdog ignored: WATCHDOG_USEC=%r is not an integer", usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Supervisor:
    def __init__(self, healthy: Callable[[], bool]) -> None:
        """``healthy()`` is the agent's check: frames still arrive while recording, the
        main loop is alive while idle."""
        self._healthy = healthy
        self._address = _notify_address()
        self._interval = _watchdog_interval() if self._address else None
        self._sock: socket.socket | None = None
        if self._address is not None:
            # Non-blocking: a notify queue systemd has not drained (10 datagrams by default)
            # must drop a ping rather than freeze the agent.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def watchdog_interval_s(self) -> float | None:
        return self._interval

    def ready(self) -> None:
        self._notify("READY=1")

    def status(self, text: str) -> None:
        self._notify("STATUS=" + text.replace("\n", " "))

    def stopping(self) -> None:
        self._notify("STOPPING=1")

    def start(self) -> None:
        if self._interval is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()
        log.info("watchdog started interval_s=%.2f", self._interval)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            with self._send_lock:
                self._sock.close()
                self._sock = None

    def _run(self) -> None:
        assert self._interval is not None
        was_healthy = True
        while not self._stop.wait(self._interval):
            try:
                healthy = bool(self._healthy())
            except Exception:
                log.exception("watchdog health check failed")
                healthy = False
            if healthy:
                self._notify("WATCHDOG=1")
                if not was_healthy:
                    log.warning("watchdog resumed: agent healthy again")
            elif was_healthy:
                log.error("watchdog withheld: agent unhealthy, systemd will restart it")
            was_healthy = healthy

    def _notify(self, message: str) -> None:
        with self._send_lock:
            if self._sock is None or self._address is None:
                return
            try:
                self._sock.sendto(message.encode(), self._address)
            except OSError as exc:
                log.warning("systemd notify failed message=%s error=%s", message, exc)
