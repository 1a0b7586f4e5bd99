"""Local control of a running agent over a Unix socket (``classcap agent press short``).

Protocol: the client sends one JSON object on one line and reads one JSON line back.

- ``{"op": "press", "kind": "short"|"long"|"double"}`` -> ``{"ok": true}``
- ``{"op": "status"}`` -> ``{"ok": true, "status": {...}}``
- ``{"op": "clock", "offset_s": <number>, "synced": <bool>}`` -> ``{"ok": true}``: sets a
  simulated unit's wall clock ``offset_s`` off the kernel's (``system.simulated_clock``);
  refused on a unit whose clock is the kernel's
- anything else -> ``{"ok": false, "error": "<reason>"}``

The socket is mode 0660: the agent's user and group may drive the unit, nobody else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from device.button import PressKind
from device.simulated_clock import MAX_OFFSET_S

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 1024 * 1024
# A client that connects and says nothing must not hold a handler for long.
CLIENT_TIMEOUT_S = 5.0
MAX_CLIENTS = 8
_ACCEPT_POLL_S = 0.25

# Simulated press timings, chosen like a person's: a tap, a hold, two taps.
SHORT_PRESS_S = 0.15
DOUBLE_PRESS_GAP_S = 0.15
LONG_PRESS_MARGIN_S = 0.3


class ControlError(Exception):
    """The agent could not be reached or refused the request; the message says which."""


def drive_press(pin: object, kind: PressKind, long_press_s: float) -> None:
    """Press a MockFactory pin the way a person presses the button (active low)."""
    drive_low = getattr(pin, "drive_low", None)
    drive_high = getattr(pin, "drive_high", None)
    if not callable(drive_low) or not callable(drive_high):
        raise TypeError(f"pin {pin!r} cannot be driven: presses are simulated on mock pins only")

    def tap(hold_s: float) -> None:
        drive_low()
        time.sleep(hold_s)
        drive_high()

    if kind == PressKind.SHORT:
        tap(SHORT_PRESS_S)
    elif kind == PressKind.LONG:
        tap(long_press_s + LONG_PRESS_MARGIN_S)
    else:
        tap(SHORT_PRESS_S)
        time.sleep(DOUBLE_PRESS_GAP_S)
        tap(SHORT_PRESS_S)


class ControlServer:
    def __init__(
        self,
        path: Path,
        on_press: Callable[[PressKind], object],
        status: Callable[[], dict[str, object]],
        on_clock: Callable[[float, bool], object] | None = None,
    ) -> None:
        """``on_clock`` sets a simulated clock; None: the unit's clock is not simulated."""
        self._path = path
        self._on_press = on_press
        self._status = status
        self._on_clock = on_clock
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None
        self._clients: set[threading.Thread] = set()
        self._clients_lock = threading.Lock()
        # Presses drive one button; two clients must not interleave them.
        self._press_lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("control server already started")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlError(f"cannot create {self._path.parent}: {exc}") from exc
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self._path))
            self._inode = os.stat(self._path).st_ino
            # Nobody can connect before listen(), so the mode is set before anyone could use it.
            os.chmod(self._path, SOCKET_MODE)
            sock.listen(MAX_CLIENTS)
            sock.settimeout(_ACCEPT_POLL_S)
        except OSError as exc:
            sock.close()
            self._unlink_own()
            raise ControlError(f"cannot listen on {self._path}: {exc}") from exc
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="control-socket")
        self._thread.start()
        log.info("control socket listening path=%s", self._path)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            client.join()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._unlink_own()
        log.info("control socket stopped path=%s", self._path)

    # --- socket file ---------------------------------------------------------------

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self._path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self._path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.warning("control socket replacing stale socket path=%s", self._path)
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            return
        except OSError as exc:
            raise ControlError(f"cannot check existing socket {self._path}: {exc}") from exc
        finally:
            probe.close()
        raise ControlError(f"another agent is already listening on {self._path}")

    def _unlink_own(self) -> None:
        # Only our socket: a newer agent may already have replaced the file.
        if self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self._path).st_ino == self._inode:
                self._path.unlink()
        self._inode = None

    # --- serving -------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                # Out of descriptors or memory: back off instead of spinning.
                log.error("control socket accept failed path=%s error=%s", self._path, exc)
                self._stop.wait(1.0)
                continue
            self._spawn(conn)

    def _spawn(self, conn: socket.socket) -> None:
        with self._clients_lock:
            if len(self._clients) >= MAX_CLIENTS:
                busy = True
            else:
                busy = False
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name="control-client", daemon=True
                )
                self._clients.add(thread)
        if busy:
            log.warning("control socket busy, refusing client clients=%d", MAX_CLIENTS)
            with conn:
                conn.settimeout(1.0)
                with contextlib.suppress(OSError):
                    conn.sendall(_encode({"ok": False, "error": "agent busy, try again"}))
            return
        thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(CLIENT_TIMEOUT_S)
                try:
                    line = _read_line(conn, MAX_REQUEST_BYTES)
                except (OSError, ValueError) as exc:
                    log.warning("control request unreadable error=%s", exc)
                    with contextlib.suppress(OSError):
                        conn.sendall(_encode({"ok": False, "error": str(exc)}))
                    return
                reply = self._handle(line)
                with contextlib.suppress(OSError):
                    conn.sendall(_encode(reply))
        finally:
            with self._clients_lock:
                self._clients.discard(threading.current_thread())

    def _handle(self, line: bytes) -> dict[str, object]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _refuse("request is not JSON")
        if not isinstance(request, dict):
            return _refuse("request is not a JSON object")
        op = request.get("op")
        if op == "press":
            raw_kind = request.get("kind")
            choices = [k.value for k in PressKind]
            if not isinstance(raw_kind, str) or raw_kind not in choices:
                return _refuse(f"unknown press kind {raw_kind!r}; expected {', '.join(choices)}")
            kind = PressKind(raw_kind)
            log.info("control press kind=%s", kind)
            try:
                with self._press_lock:
                    self._on_press(kind)
            except Exception as exc:
                log.exception("control press failed kind=%s", kind)
                return _refuse(f"press failed: {exc}")
            return {"ok": True}
        if op == "status":
            try:
                return {"ok": True, "status": self._status()}
            except Exception as exc:
                log.exception("control status failed")
                return _refuse(f"status failed: {exc}")
        if op == "clock":
            return self._clock(request)
        return _refuse(f"unknown op {op!r}; expected 'press', 'status' or 'clock'")

    def _clock(self, request: dict[str, object]) -> dict[str, object]:
        if self._on_clock is None:
            return _refuse("clock is not simulated on this unit")
        offset_s, synced = request.get("offset_s"), request.get("synced")
        # JSON true is a Python int: a bool is no offset. The bound comes before isfinite,
        # which cannot take an integer too large for a float.
        if (
            not isinstance(offset_s, int | float)
            or isinstance(offset_s, bool)
            or abs(offset_s) > MAX_OFFSET_S
            or not math.isfinite(offset_s)
        ):
            return _refuse(
                f"bad clock offset_s {offset_s!r}; expected a number of seconds "
                f"within +-{MAX_OFFSET_S:.0f}"
            )
        if not isinstance(synced, bool):
            return _refuse(f"bad clock synced {synced!r}; expected true or false")
        try:
            self._on_clock(float(offset_s), synced)
        except Exception as exc:
            log.exception("control clock failed")
            return _refuse(f"clock failed: {exc}")
        return {"ok": True}


def _refuse(reason: str) -> dict[str, object]:
    log.warning("control request refused reason=%s", reason)
    return {"ok": False, "error": reason}


def _encode(message: dict[str, object]) -> bytes:
    return json.dumps(message, default=str).encode() + b"\n"


def _read_line(conn: socket.socket, limit: int) -> bytes:
    """One line; ValueError names what was wrong with it."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            if not buf:
                raise ValueError("connection closed before a message")
            break
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"message longer than {limit} bytes")
    return bytes(buf.split(b"\n", 1)[0])


# --- client ------------------------------------------------------------------------


def send_press(path: Path, kind: PressKind, timeout: float = 5.0) -> None:
    """Press the running agent's button. A simulated long press takes long_press_s + 0.3 s."""
    _request(path, {"op": "press", "kind": PressKind(kind).value}, timeout)


def send_clock(path: Path, offset_s: float, synced: bool, timeout: float = 5.0) -> None:
    """Set a simulated unit's wall clock ``offset_s`` off the kernel's and its NTP state."""
    _request(path, {"op": "clock", "offset_s": offset_s, "synced": synced}, timeout)


def query_status(path: Path, timeout: float = 5.0) -> dict[str, object]:
    reply = _request(path, {"op": "status"}, timeout)
    status = reply.get("status")
    if not isinstance(status, dict):
        raise ControlError(f"agent at {path} sent a status reply without a status object")
    return status


def _request(path: Path, request: dict[str, object], timeout: float) -> dict[str, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"agent not running: no socket at {path}") from None
        except ConnectionRefusedError:
            raise ControlError(
                f"agent not running: nothing listens on {path} (stale socket)"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}: run as the agent's user or a member of its group"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc}") from exc
        try:
            sock.sendall(_encode(request))
            line = _read_line(sock, MAX_REPLY_BYTES)
        except TimeoutError:
            raise ControlError(f"agent at {path} did not answer within {timeout:g} s") from None
        except ValueError as exc:
            raise ControlError(f"bad reply from agent at {path}: {exc}") from None
        except OSError as exc:
            raise ControlError(f"connection to {path} failed: {exc}") from exc
    finally:
        sock.close()
    try:
        reply = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError(f"agent at {path} sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"agent at {path} sent a reply that is not a JSON object")
    if reply.get("ok") is not True:
        raise ControlError(f"agent refused: {reply.get('error', 'no reason given')}")
    return reply
