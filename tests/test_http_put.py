"""put_file against a real SeaweedFS: what the store accepts, what it refuses, and pacing."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.storage.s3 import S3Storage
from device.http_put import PutAborted, PutError, PutResponse, TokenBucket, _shorten, put_file
from shared.clock import utcnow
from tests.support.processes import free_port, wait_for
from tests.support.seaweed_server import SeaweedServer

TIMEOUT = 20.0


def _segment(tmp_path: Path, size: int, name: str = "seg-00000.mp4") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _stored(seaweedfs: SeaweedServer, storage: S3Storage, key: str) -> bytes:
    return seaweedfs.client().get_object(Bucket=storage.bucket, Key=key)["Body"].read()


# --- the store accepts exactly the granted upload -------------------------------------------


def test_put_file_stores_the_granted_bytes(
    seaweedfs: SeaweedServer, s3_storage: S3Storage, tmp_path: Path
) -> None:
    path, sha = _segment(tmp_path, 3 * 256 * 1024 + 17)
    key = s3_storage.key_for("unit-1", "rec-1", path.name)
    grant = s3_storage.presign_put(key, path.stat().st_size, sha, 60)

    response = put_file(grant.url, path, grant.headers, TIMEOUT)

    assert response.status == 200, response.body
    assert response.ok
    assert _stored(seaweedfs, s3_storage, key) == path.read_bytes()
    assert s3_storage.verify(key, path.stat().st_size, sha).ok


def test_put_file_sends_an_empty_file(s3_storage: S3Storage, tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    sha = hashlib.sha256(b"").hexdigest()
    key = s3_storage.key_for("unit-1", "rec-1", path.name)
    grant = s3_storage.presign_put(key, 0, sha, 60)

    assert put_file(grant.url, path, grant.headers, TIMEOUT).status == 200
    assert s3_storage.verify(key, 0, sha).ok


def test_put_file_with_a_bandwidth_cap_still_stores_exact_bytes(
    seaweedfs: SeaweedServer, s3_storage: S3Storage, tmp_path: Path
) -> None:
    path, sha = _segment(tmp_path, 96 * 1024)
    key = s3_storage.key_for("unit-1", "rec-1", path.name)
    grant = s3_storage.presign_put(key, path.stat().st_size, sha, 60)

    response = put_file(grant.url, path, grant.headers, TIMEOUT, bandwidth_bps=2_000_000)

    assert response.status == 200, response.body
    assert _stored(seaweedfs, s3_storage, key) == path.read_bytes()


# --- the store refuses anything else ---------------------------------------------------------


def test_store_refuses_a_different_body_with_bad_digest(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    path, sha = _segment(tmp_path, 200_000)
    key = s3_storage.key_for("unit-1", "rec-1", path.name)
    grant = s3_storage.presign_put(key, path.stat().st_size, sha, 60)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # same size, different content: changed on disk after hashing
    path.write_bytes(bytes(data))

    response = put_file(grant.url, path, grant.headers, TIMEOUT)

    assert response.status == 400
    assert (response.s3_error() or "").startswith("BadDigest")
    assert s3_storage.verify(key, len(data), sha).reason == "object not found"


@pytest.mark.parametrize(
    "tamper",
    ["drop_checksum", "other_checksum", "other_length", "tampered_signature"],
)
def test_store_refuses_changed_signed_parts_with_signature_mismatch(
    s3_storage: S3Storage, tmp_path: Path, tamper: str
) -> None:
    path, sha = _segment(tmp_path, 50_000)
    key = s3_storage.key_for("unit-1", "rec-1", path.name)
    grant = s3_storage.presign_put(key, path.stat().st_size, sha, 60)
    url, headers = grant.url, dict(grant.headers)
    if tamper == "drop_checksum":
        del headers["x-amz-checksum-sha256"]
    elif tamper == "other_checksum":
        other = hashlib.sha256(b"something else").hexdigest()
        headers["x-amz-checksum-sha256"] = s3_storage.presign_put(key, 1, other, 60).headers[
            "x-amz-checksum-sha256"
        ]
    elif tamper == "other_length":
        path.write_bytes(path.read_bytes() + b"x")
        headers["content-length"] = str(path.stat().st_size)
    else:
        last = url[-1]
        url = url[:-1] + ("0" if last != "0" else "1")

    response = put_file(url, path, headers, TIMEOUT)

    assert response.status == 403
    assert (response.s3_error() or "").startswith("SignatureDoesNotMatch"), response.body
    assert s3_storage.verify(key, 50_000, sha).reason == "object not found"


def test_store_refuses_an_expired_grant(s3_storage: S3Storage, tmp_path: Path) -> None:
    path, sha = _segment(tmp_path, 10_000)
    key = s3_storage.key_for("unit-1", "rec-1", path.name)
    grant = s3_storage.presign_put(key, path.stat().st_size, sha, 1)
    # SigV4 counts whole seconds from X-Amz-Date: wait until the second after expiry ends.
    assert wait_for(lambda: utcnow() > grant.expires_at + timedelta(seconds=1.1), timeout=5)

    response = put_file(grant.url, path, grant.headers, TIMEOUT)

    assert response.status == 403
    assert response.s3_error() == "AccessDenied: Request has expired", response.body


def test_store_refuses_anonymous_put(
    seaweedfs: SeaweedServer, s3_storage: S3Storage, tmp_path: Path
) -> None:
    path, _sha = _segment(tmp_path, 1000)
    url = f"{seaweedfs.endpoint_url}/{s3_storage.bucket}/anonymous.bin"

    response = put_file(url, path, {}, TIMEOUT)

    assert response.status == 403


# --- local refusals and network failures -------------------------------------------------------


def test_put_file_refuses_a_file_whose_size_differs_from_the_grant(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    path, sha = _segment(tmp_path, 5000)
    grant = s3_storage.presign_put("k", 4000, sha, 60)

    with pytest.raises(PutError, match="5000 bytes but the grant's Content-Length is 4000"):
        put_file(grant.url, path, grant.headers, TIMEOUT)


def test_put_file_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PutError, match="cannot read"):
        put_file("http://127.0.0.1:9/x", tmp_path / "gone.mp4", {}, TIMEOUT)


def test_put_file_reports_a_refused_connection(tmp_path: Path) -> None:
    path, _sha = _segment(tmp_path, 1000)
    port = free_port()

    with pytest.raises(PutError, match="refused"):
        put_file(f"http://127.0.0.1:{port}/b/k", path, {}, TIMEOUT)


def test_put_file_rejects_a_non_http_url(tmp_path: Path) -> None:
    path, _sha = _segment(tmp_path, 10)
    with pytest.raises(ValueError, match="not an http"):
        put_file("ftp://127.0.0.1/x", path, {}, TIMEOUT)


class _SilentServer:
    """Accepts connections on loopback and never answers; optionally never reads either."""

    def __init__(self, read: bool) -> None:
        self._read = read
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.settimeout(0.1)
            self._conns.append(conn)
            while self._read and not self._stop.is_set():
                try:
                    if not conn.recv(65536):
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._conns:
            conn.close()
        self._listener.close()


@pytest.fixture
def silent_reader() -> Iterator[_SilentServer]:
    server = _SilentServer(read=True)
    yield server
    server.close()


@pytest.fixture
def black_hole() -> Iterator[_SilentServer]:
    server = _SilentServer(read=False)
    yield server
    server.close()


def test_put_file_times_out_without_an_answer(silent_reader: _SilentServer, tmp_path: Path) -> None:
    path, _sha = _segment(tmp_path, 10_000)

    with pytest.raises(PutError, match="no answer"):
        put_file(f"http://127.0.0.1:{silent_reader.port}/b/k", path, {}, 0.5)


def test_put_file_aborts_when_stop_is_set(black_hole: _SilentServer, tmp_path: Path) -> None:
    path, _sha = _segment(tmp_path, 32 * 1024 * 1024)
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    try:
        with pytest.raises(PutAborted):
            put_file(f"http://127.0.0.1:{black_hole.port}/b/k", path, {}, 600, stop=stop)
    finally:
        timer.cancel()
        timer.join()


def test_put_file_aborts_a_paced_upload_when_stop_is_set(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    path, sha = _segment(tmp_path, 1024 * 1024)
    grant = s3_storage.presign_put("k", path.stat().st_size, sha, 60)
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    try:
        with pytest.raises(PutAborted):
            # 80 kbit/s: the file would take about 100 s.
            put_file(grant.url, path, grant.headers, TIMEOUT, bandwidth_bps=80_000, stop=stop)
    finally:
        timer.cancel()
        timer.join()
    assert s3_storage.verify("k", path.stat().st_size, sha).reason == "object not found"


# --- responses -----------------------------------------------------------------------------


def test_s3_error_summary_survives_a_long_body() -> None:
    body = "<Error>" + "x" * 10_000 + "<Code>SlowDown</Code><Message>Reduce rate</Message></Error>"
    short = _shorten(body)

    assert len(short) <= 4096
    assert PutResponse(503, short).s3_error() == "SlowDown: Reduce rate"
    assert PutResponse(200, "").s3_error() is None


# --- token bucket, on an injected clock --------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_without_rate_never_waits() -> None:
    bucket = TokenBucket(0, clock=_Clock())
    assert bucket.reserve(10**9) == 0.0
    assert bucket.piece_size(256 * 1024) == 256 * 1024


def test_token_bucket_allows_a_burst_then_paces() -> None:
    clock = _Clock()
    bucket = TokenBucket(10_000, burst_s=0.5, clock=clock)  # 5000 bytes of burst

    assert bucket.reserve(5000) == 0.0
    assert bucket.reserve(10_000) == pytest.approx(1.0)
    assert bucket.reserve(5000) == pytest.approx(1.5)  # debt queues behind the first taker
    clock.now += 1.5
    assert bucket.reserve(10_000) == pytest.approx(1.0)


def test_token_bucket_caps_idle_credit() -> None:
    clock = _Clock()
    bucket = TokenBucket(10_000, burst_s=0.5, clock=clock)
    bucket.reserve(5000)
    clock.now += 3600

    assert bucket.reserve(5000) == 0.0
    assert bucket.reserve(10_000) == pytest.approx(1.0)


def test_token_bucket_long_run_rate_matches_the_cap() -> None:
    clock = _Clock()
    bucket = TokenBucket(100_000, burst_s=0.5, clock=clock)
    start = clock.now
    sent = 0
    piece = bucket.piece_size(256 * 1024)
    while sent < 10_000_000:
        clock.now += bucket.reserve(piece)
        sent += piece

    elapsed = clock.now - start
    # Everything beyond the initial burst went at the rate, to within one piece.
    assert elapsed == pytest.approx((sent - 50_000) / 100_000, abs=piece / 100_000)


def test_token_bucket_rate_change_applies_to_the_next_taker() -> None:
    clock = _Clock()
    bucket = TokenBucket(2000, burst_s=1.0, clock=clock)
    bucket.reserve(2000)
    assert bucket.reserve(4000) == pytest.approx(2.0)

    bucket.set_rate(8000)  # the 4000 bytes of debt now take half a second

    assert bucket.reserve(0) == pytest.approx(0.5)
    bucket.set_rate(0)
    assert bucket.reserve(10**6) == 0.0


def test_token_bucket_pieces_are_a_tenth_of_a_second() -> None:
    bucket = TokenBucket(125_000, clock=_Clock())  # 1 Mbit/s
    assert bucket.piece_size(256 * 1024) == 12_500
    assert TokenBucket(100, clock=_Clock()).piece_size(256 * 1024) == 1024


@given(
    rate=st.integers(min_value=1_000, max_value=10_000_000),
    steps=st.lists(
        st.tuples(st.integers(min_value=1, max_value=300_000), st.floats(0, 5)),
        min_size=1,
        max_size=60,
    ),
)
def test_token_bucket_never_exceeds_burst_plus_rate(
    rate: int, steps: list[tuple[int, float]]
) -> None:
    clock = _Clock()
    bucket = TokenBucket(rate, burst_s=0.5, clock=clock)
    capacity = max(1024.0, rate * 0.5)
    start = clock.now
    sent = 0
    for nbytes, idle in steps:
        clock.now += idle
        clock.now += bucket.reserve(nbytes)
        sent += nbytes
        # A sender that waits as told never has sent more than burst + rate * time.
        assert sent <= capacity + rate * (clock.now - start) + 1e-6 * sent


def test_token_bucket_default_burst_is_a_tenth_of_a_second() -> None:
    bucket = TokenBucket(1_000_000, clock=_Clock())
    assert bucket.reserve(100_000) == 0.0
    assert bucket.reserve(50_000) == pytest.approx(0.05)


# --- HTTPS ----------------------------------------------------------------------------------


class _TlsSink:
    """An HTTPS server on loopback that stores each PUT body and answers 200."""

    def __init__(self, workdir: Path) -> None:
        self.cert = workdir / "sink.crt"
        key = workdir / "sink.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
             "-keyout", str(key), "-out", str(self.cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.bodies: list[tuple[str, dict[str, str], bytes]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                length = int(self.headers["Content-Length"])
                sink.bodies.append((self.path, dict(self.headers), self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


@pytest.fixture
def tls_sink(tmp_path: Path) -> Iterator[_TlsSink]:
    sink = _TlsSink(tmp_path)
    yield sink
    sink.close()


def test_put_file_over_https_with_the_servers_ca(tls_sink: _TlsSink, tmp_path: Path) -> None:
    path, _sha = _segment(tmp_path, 700_000)
    context = ssl.create_default_context(cafile=str(tls_sink.cert))
    url = f"https://127.0.0.1:{tls_sink.port}/bucket/key?X-Amz-Signature=abc"

    response = put_file(url, path, {"x-amz-checksum-sha256": "c2hh"}, TIMEOUT, ssl_context=context)

    assert response.status == 200
    ((target, headers, body),) = tls_sink.bodies
    assert target == "/bucket/key?X-Amz-Signature=abc"
    assert body == path.read_bytes()
    assert {name.lower() for name in headers} == {"host", "content-length", "x-amz-checksum-sha256"}


def test_put_file_over_https_refuses_an_unknown_certificate(
    tls_sink: _TlsSink, tmp_path: Path
) -> None:
    path, _sha = _segment(tmp_path, 1000)

    with pytest.raises(PutError, match="TLS error"):
        put_file(f"https://127.0.0.1:{tls_sink.port}/b/k", path, {}, TIMEOUT)
    assert tls_sink.bodies == []
