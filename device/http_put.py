"""A streamed HTTP(S) PUT of one file to a presigned URL, with a bandwidth cap.

Plain ``http.client``: a unit needs no S3 library, only the URL and the
headers its grant lists. Those headers are signed, so exactly they (plus the
Host header the URL implies) are sent. The file is read block by block, the
shared token bucket paces the bytes, and a stop event aborts between blocks
and while waiting for the answer.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# Enough for any S3 error document; longer bodies are cut, keeping Code and Message.
_BODY_READ_LIMIT = 64 * 1024
_BODY_KEEP = 4096
# How often a blocked send or a wait for the answer looks at the stop event.
_POLL_S = 0.25
# A paced upload sends pieces of at most this many seconds' worth of bytes, so the
# rate holds at short time scales too instead of one block burst per long pause.
_PACE_QUANTUM_S = 0.1
_MIN_PIECE = 1024
_S3_CODE = re.compile(r"<Code>([^<]*)</Code>")
_S3_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")


class PutError(Exception):
    """The PUT got no HTTP answer: refused, unreachable, timed out, cut off, or unreadable file."""


class PutAborted(PutError):
    """The stop event was set while the PUT was under way."""


@dataclass(frozen=True)
class PutResponse:
    status: int
    body: str  # at most a few KB; an S3 error keeps its Code and Message

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def s3_error(self) -> str | None:
        """``"Code: Message"`` from an S3 error document, None if the body is not one."""
        code = _S3_CODE.search(self.body)
        if code is None:
            return None
        message = _S3_MESSAGE.search(self.body)
        return f"{code.group(1)}: {message.group(1)}" if message else code.group(1)


class TokenBucket:
    """A byte budget refilled at ``rate`` bytes/s, shared by every upload of a unit.

    A taker may overdraw: it is told how long to wait, and the debt delays the
    next taker too, so concurrent uploads share the rate instead of each getting it.
    Idle credit is capped at ``burst_s`` of the rate, so over any stretch of a
    second or more the average stays within a tenth of the cap. A rate of 0 means no cap.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        burst_s: float = _PACE_QUANTUM_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_bytes_per_s < 0 or burst_s <= 0:
            raise ValueError("rate must be >= 0 and burst_s > 0")
        self._lock = threading.Lock()
        self._clock = clock
        self._burst_s = burst_s
        self._rate = float(rate_bytes_per_s)
        self._tokens = self._capacity()
        self._last = clock()

    @property
    def rate(self) -> float:
        return self._rate

    def _capacity(self) -> float:
        return max(float(_MIN_PIECE), self._rate * self._burst_s)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)
        self._tokens = min(self._capacity(), self._tokens + elapsed * self._rate)
        self._last = now

    def set_rate(self, rate_bytes_per_s: float) -> None:
        if rate_bytes_per_s < 0:
            raise ValueError(f"rate must be >= 0, got {rate_bytes_per_s}")
        with self._lock:
            now = self._clock()
            if self._rate > 0:
                self._refill(now)
            self._rate = float(rate_bytes_per_s)
            self._last = now
            if self._rate > 0:
                # Debt taken at the old rate carries over; idle credit is capped anew.
                self._tokens = min(self._tokens, self._capacity())

    def reserve(self, nbytes: int) -> float:
        """Takes ``nbytes``; returns the seconds to wait before sending them."""
        with self._lock:
            if self._rate <= 0:
                return 0.0
            self._refill(self._clock())
            self._tokens -= nbytes
            return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def piece_size(self, blocksize: int) -> int:
        """How many bytes to send between two waits at the current rate."""
        if self._rate <= 0:
            return blocksize
        return max(_MIN_PIECE, min(blocksize, int(self._rate * _PACE_QUANTUM_S)))


def bits_to_bytes_per_s(bits_per_s: float) -> float:
    return bits_per_s / 8.0


def put_file(
    url: str,
    path: Path,
    headers: Mapping[str, str],
    timeout: float,
    *,
    bandwidth_bps: int = 0,
    stop: threading.Event | None = None,
    blocksize: int = 256 * 1024,
    limiter: TokenBucket | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> PutResponse:
    """PUTs ``path`` to ``url`` with exactly ``headers``; returns the store's answer.

    ``timeout`` bounds connecting and every stretch without progress (sending or
    waiting for the answer). ``bandwidth_bps`` caps this upload at that many bits
    per second; ``limiter`` instead shares one cap between uploads. HTTPS checks
    the server against the system's CAs unless ``ssl_context`` says otherwise.
    Any HTTP answer, 4xx and 5xx included, is returned; no answer raises PutError
    (PutAborted on stop).
    """
    if blocksize <= 0:
        raise ValueError(f"blocksize must be > 0, got {blocksize}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:80]!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stop = stop or threading.Event()
    bucket = limiter
    if bucket is None and bandwidth_bps > 0:
        bucket = TokenBucket(bits_to_bytes_per_s(bandwidth_bps))

    try:
        source = path.open("rb")
    except OSError as exc:
        raise PutError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with source:
        return _put(
            parts.scheme,
            parts.hostname,
            parts.port,
            target,
            source=source,
            path=path,
            headers=headers,
            timeout=timeout,
            bucket=bucket,
            stop=stop,
            blocksize=blocksize,
            ssl_context=ssl_context,
        )


def _put(
    scheme: str,
    host: str,
    port: int | None,
    target: str,
    *,
    source: BinaryIO,
    path: Path,
    headers: Mapping[str, str],
    timeout: float,
    bucket: TokenBucket | None,
    stop: threading.Event,
    blocksize: int,
    ssl_context: ssl.SSLContext | None,
) -> PutResponse:
    # The size of the open file, so a file replaced meanwhile cannot mix two versions.
    size = os.fstat(source.fileno()).st_size
    lowered = {name.lower(): value for name, value in headers.items()}
    declared = lowered.get("content-length")
    if declared is not None and declared.strip() != str(size):
        raise PutError(f"{path} is {size} bytes but the grant's Content-Length is {declared}")

    where = f"{host}:{port or (443 if scheme == 'https' else 80)}"
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl_context or ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    sent = 0
    try:
        conn.putrequest("PUT", target, skip_host="host" in lowered, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if declared is None:
            conn.putheader("Content-Length", str(size))
        conn.endheaders()
        sock = conn.sock
        assert sock is not None
        try:
            for piece in _pieces(
                source, size=size, blocksize=blocksize, bucket=bucket, stop=stop, path=path
            ):
                _send_all(sock, piece, stop, timeout)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The store may have answered early (a refused signature) and closed.
            early = _early_response(conn)
            if early is not None:
                log.info("put answered early status=%d sent=%d of %d", early.status, sent, size)
                return early
            raise PutError(
                f"connection to {where} lost after {sent} of {size} bytes: {exc}"
            ) from exc
        _wait_readable(sock, stop, timeout, where)
        response = conn.getresponse()
        return _response(response)
    except PutError:
        raise
    except ConnectionRefusedError as exc:
        raise PutError(f"connection to {where} refused") from exc
    except TimeoutError as exc:
        raise PutError(
            f"timed out after {timeout:.0f} s talking to {where} ({sent} of {size} bytes sent)"
        ) from exc
    except ssl.SSLError as exc:
        raise PutError(f"TLS error with {where}: {exc}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise PutError(f"network error with {where} after {sent} of {size} bytes: {exc!r}") from exc
    finally:
        conn.close()


def _pieces(
    source: BinaryIO,
    *,
    size: int,
    blocksize: int,
    bucket: TokenBucket | None,
    stop: threading.Event,
    path: Path,
) -> Iterator[bytes]:
    """The file's first ``size`` bytes, paced by ``bucket``; never more than declared."""
    remaining = size
    while remaining > 0:
        if stop.is_set():
            raise PutAborted("upload stopped")
        try:
            block = source.read(min(blocksize, remaining))
        except OSError as exc:
            raise PutError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if not block:
            raise PutError(f"{path} shrank during upload: {size - remaining} of {size} bytes read")
        remaining -= len(block)
        if bucket is None:
            yield block
            continue
        step = bucket.piece_size(blocksize)
        view = memoryview(block)
        for offset in range(0, len(block), step):
            piece = view[offset : offset + step]
            delay = bucket.reserve(len(piece))
            if delay > 0 and stop.wait(delay):
                raise PutAborted("upload stopped")
            yield piece.tobytes()


def _send_all(sock: socket.socket, data: bytes, stop: threading.Event, timeout: float) -> None:
    """``sendall`` that notices the stop event and times out only without progress."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        while view:
            if stop.is_set():
                raise PutAborted("upload stopped")
            if not selector.select(_POLL_S):
                if time.monotonic() >= deadline:
                    raise TimeoutError("send made no progress")
                continue
            count = sock.send(view)
            view = view[count:]
            deadline = time.monotonic() + timeout


def _wait_readable(sock: socket.socket, stop: threading.Event, timeout: float, where: str) -> None:
    deadline = time.monotonic() + timeout
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        while not selector.select(_POLL_S):
            if stop.is_set():
                raise PutAborted("upload stopped while waiting for the answer")
            if time.monotonic() >= deadline:
                raise PutError(f"no answer from {where} within {timeout:.0f} s after the body")


def _early_response(conn: http.client.HTTPConnection) -> PutResponse | None:
    try:
        return _response(conn.getresponse())
    except (OSError, http.client.HTTPException):
        return None


def _response(response: http.client.HTTPResponse) -> PutResponse:
    raw = response.read(_BODY_READ_LIMIT)
    text = raw.decode("utf-8", errors="replace")
    return PutResponse(status=response.status, body=_shorten(text))


def _shorten(text: str) -> str:
    if len(text) <= _BODY_KEEP:
        return text
    head = text[:_BODY_KEEP]
    found = [m.group(0) for m in (_S3_CODE.search(text), _S3_MESSAGE.search(text)) if m]
    if all(part in head for part in found):
        return head
    summary = "".join(found)[: _BODY_KEEP // 2]
    return summary + "\n" + head[: _BODY_KEEP - len(summary) - 1]
