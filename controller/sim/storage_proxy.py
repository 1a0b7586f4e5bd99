"""A small threaded proxy on loopback in front of the store's S3 endpoint that can pass,
answer 503, stall or refuse connections, and hold one unit's uploads.

The controller's storage endpoint is the proxy, so presigned URLs name it; requests are
passed on byte for byte with their Host header unchanged, which is what their SigV4
signatures cover, so they stay valid. Each fault applies to connections made after it
starts: connections already open are cut at that moment, as a failing store would.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections import Counter
from collections.abc import Callable
from enum import StrEnum

log = logging.getLogger(__name__)

_HEAD_LIMIT = 64 * 1024
_IO_TIMEOUT_S = 60.0
_POLL_S = 0.25
_REBIND_TIMEOUT_S = 15.0
_UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>Service is unable to handle the request (simulated outage).</Message></Error>"
)


class ProxyMode(StrEnum):
    PASS = "pass"  # noqa: S105 - a mode, not a password
    ERROR = "error"  # every request answered 503 Service Unavailable
    STALL = "stall"  # connections accepted, never answered
    REFUSE = "refuse"  # nothing listens: connection refused


class StorageProxy:
    def __init__(self, upstream_port: int, port: int) -> None:
        self.port = port
        self._upstream = ("127.0.0.1", upstream_port)
        self._mode = ProxyMode.PASS
        # Bumped at every mode change; a connection opened under another one is cut.
        self._generation = 0
        self._held_devices: set[str] = set()
        self._held = Counter[str]()
        self.counts = Counter[str]()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._listening = False
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        listener = self._bind()  # here, so that a port in use fails the start
        self._listening = True
        self._thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="storage-proxy", daemon=True
        )
        self._thread.start()
        log.info("storage proxy listening port=%d upstream=%d", self.port, self._upstream[1])

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        log.info("storage proxy stopped counts=%s", dict(self.counts))

    # --- faults ----------------------------------------------------------------------------

    def set_mode(self, mode: ProxyMode) -> None:
        """Returns once the mode holds: for a refuse fault, once nothing listens any more."""
        listen = mode is not ProxyMode.REFUSE
        with self._cond:
            previous, self._mode = self._mode, mode
            self._generation += 1
            self._cond.notify_all()
            # Only the accept thread opens and closes the listening socket: a socket closed
            # while another thread waits in accept() on it goes on taking connections.
            done = self._cond.wait_for(
                lambda: self._listening == listen or self._stop.is_set(), _REBIND_TIMEOUT_S
            )
        if not done:
            log.error("storage proxy could not switch mode=%s port=%d", mode.value, self.port)
        log.info("storage proxy mode=%s previous=%s", mode.value, previous.value)

    def hold_uploads(self, device_id: str) -> None:
        """PUTs of ``device_id``'s objects are accepted and left unanswered until released."""
        with self._cond:
            self._held_devices.add(device_id)

    def release_uploads(self, device_id: str) -> None:
        """Held PUTs are cut (never passed on): the unit must upload them again."""
        with self._cond:
            self._held_devices.discard(device_id)
            self._cond.notify_all()

    def held(self, device_id: str) -> int:
        """How many PUTs of ``device_id`` are held now."""
        with self._cond:
            return self._held[device_id]

    def _count(self, what: str) -> None:
        with self._cond:
            self.counts[what] += 1

    # --- connections -----------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.settimeout(_POLL_S)
        return sock

    def _set_listening(self, listening: bool) -> None:
        with self._cond:
            self._listening = listening
            self._cond.notify_all()

    def _accept_loop(self, listener: socket.socket | None) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    refuse = self._mode is ProxyMode.REFUSE
                if refuse and listener is not None:
                    listener.close()
                    listener = None
                    self._set_listening(False)
                elif not refuse and listener is None:
                    try:
                        listener = self._bind()
                    except OSError as exc:
                        log.warning("storage proxy cannot listen yet port=%d: %s", self.port, exc)
                        self._stop.wait(_POLL_S)
                        continue
                    self._set_listening(True)
                if listener is None:
                    self._stop.wait(_POLL_S)
                    continue
                try:
                    client, _addr = listener.accept()
                except TimeoutError:
                    continue
                with self._cond:
                    mode, generation = self._mode, self._generation
                threading.Thread(
                    target=self._serve, args=(client, mode, generation), daemon=True
                ).start()
        finally:
            if listener is not None:
                listener.close()

    def _serve(self, client: socket.socket, mode: ProxyMode, generation: int) -> None:
        client.settimeout(_IO_TIMEOUT_S)
        try:
            if mode is ProxyMode.STALL:
                self._count("stalled")
                self._wait_while(generation, lambda: True)
                return
            head = _read_head(client)
            if head is None:
                return
            if mode is ProxyMode.ERROR:
                self._count("answered_503")
                _answer_unavailable(client, head)
                return
            device = self._held_device(head)
            if device is not None:
                self._hold(device, generation)
                return
            self._pass(client, head, generation)
        except OSError as exc:
            log.debug("proxy connection ended: %s", exc)
        finally:
            client.close()

    def _held_device(self, head: bytes) -> str | None:
        method, _, rest = head.partition(b" ")
        if method != b"PUT":
            return None
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0].decode(errors="replace")
        with self._cond:
            return next((d for d in self._held_devices if f"/{d}/" in path), None)

    def _hold(self, device: str, generation: int) -> None:
        with self._cond:
            self._held[device] += 1
        self._count("held")
        log.info("storage proxy holding an upload device=%s", device)
        try:
            self._wait_while(generation, lambda: device in self._held_devices)
        finally:
            with self._cond:
                self._held[device] -= 1

    def _wait_while(self, generation: int, condition: Callable[[], bool]) -> None:
        """Until the mode changes, the proxy stops, or ``condition()`` turns false."""
        with self._cond:
            while not self._stop.is_set() and self._generation == generation and condition():
                self._cond.wait(_POLL_S)

    def _pass(self, client: socket.socket, head: bytes, generation: int) -> None:
        self._count("passed")
        with socket.create_connection(self._upstream, timeout=_IO_TIMEOUT_S) as upstream:
            upstream.sendall(head)
            with selectors.DefaultSelector() as selector:
                selector.register(client, selectors.EVENT_READ, upstream)
                selector.register(upstream, selectors.EVENT_READ, client)
                while not self._stop.is_set():
                    with self._cond:
                        if self._generation != generation:
                            return
                    for key, _events in selector.select(_POLL_S):
                        source: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = source.recv(65536)
                        if not data:
                            return
                        key.data.sendall(data)


def _read_head(client: socket.socket) -> bytes | None:
    """The request line and headers, plus whatever of the body came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > _HEAD_LIMIT:
            return None
        chunk = client.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data


def _answer_unavailable(client: socket.socket, head: bytes) -> None:
    """503 with an S3 error document, after taking the body so the client reads the answer."""
    header_block, _, early = head.partition(b"\r\n\r\n")
    length = 0
    for line in header_block.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            with contextlib.suppress(ValueError):
                length = int(value.strip())
    remaining = max(0, length - len(early))
    while remaining > 0:
        chunk = client.recv(min(65536, remaining))
        if not chunk:
            return
        remaining -= len(chunk)
    is_head = header_block.startswith(b"HEAD ")
    client.sendall(
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: application/xml\r\n"
        + f"Content-Length: {len(_UNAVAILABLE)}\r\n".encode()
        + b"Retry-After: 1\r\nConnection: close\r\n\r\n"
        + (b"" if is_head else _UNAVAILABLE)
    )
