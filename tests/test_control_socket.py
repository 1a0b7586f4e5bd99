"""The press control socket: a real Unix socket, clients in threads and in other processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from device.button import PressKind, RecordButton
from device.control_socket import (
    ControlError,
    ControlServer,
    drive_press,
    query_status,
    send_clock,
    send_press,
)
from device.health import ClockState
from device.simulated_clock import SimulatedClock
from shared import clock
from tests.support.processes import wait_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="cc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Agent:
    def __init__(self) -> None:
        self.presses: list[PressKind] = []
        self.fail_press = False

    def on_press(self, kind: PressKind) -> None:
        if self.fail_press:
            raise RuntimeError("recorder is busy")
        self.presses.append(kind)

    def status(self) -> dict[str, object]:
        return {"state": "idle", "presses": len(self.presses)}


@pytest.fixture
def agent() -> Agent:
    return Agent()


@pytest.fixture
def server(sock_dir: Path, agent: Agent) -> Iterator[ControlServer]:
    srv = ControlServer(sock_dir / "agent.sock", agent.on_press, agent.status)
    srv.start()
    yield srv
    srv.stop()


def _raw(path: Path, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def test_press_from_another_process_reaches_server(server: ControlServer, agent: Agent) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from device.control_socket import send_press; from device.button import PressKind; "
        "send_press(Path(sys.argv[1]), PressKind(sys.argv[2]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(server.path), "long"],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert agent.presses == [PressKind.LONG]


def test_press_and_status_from_threads(server: ControlServer, agent: Agent) -> None:
    errors: list[BaseException] = []

    def client(kind: PressKind) -> None:
        try:
            send_press(server.path, kind)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in PressKind]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(agent.presses) == sorted(PressKind)
    assert query_status(server.path) == {"state": "idle", "presses": 3}


def test_socket_mode_is_0660(server: ControlServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_no_socket_is_a_clear_error(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    with pytest.raises(ControlError, match=r"agent not running: no socket at .*agent\.sock"):
        send_press(path, PressKind.SHORT)
    with pytest.raises(ControlError, match="agent not running: no socket at"):
        query_status(path)


def test_stale_socket_is_a_clear_error_and_is_replaced(sock_dir: Path, agent: Agent) -> None:
    path = sock_dir / "agent.sock"
    # A crashed agent leaves its socket file behind with nobody listening.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(ControlError, match="agent not running: nothing listens on"):
        send_press(path, PressKind.SHORT)
    srv = ControlServer(path, agent.on_press, agent.status)
    srv.start()
    try:
        send_press(path, PressKind.DOUBLE)
    finally:
        srv.stop()
    assert agent.presses == [PressKind.DOUBLE]
    assert not path.exists()


def test_second_server_refuses_a_live_socket(server: ControlServer, agent: Agent) -> None:
    other = ControlServer(server.path, agent.on_press, agent.status)
    with pytest.raises(ControlError, match="another agent is already listening"):
        other.start()
    send_press(server.path, PressKind.SHORT)  # the first one still serves
    assert agent.presses == [PressKind.SHORT]


def test_server_refuses_to_replace_a_regular_file(sock_dir: Path, agent: Agent) -> None:
    path = sock_dir / "agent.sock"
    path.write_text("not a socket")
    srv = ControlServer(path, agent.on_press, agent.status)
    with pytest.raises(ControlError, match="exists and is not a socket"):
        srv.start()
    assert path.read_text() == "not a socket"


def test_server_creates_missing_directory(sock_dir: Path, agent: Agent) -> None:
    path = sock_dir / "run" / "agent.sock"
    srv = ControlServer(path, agent.on_press, agent.status)
    srv.start()
    try:
        assert query_status(path)["state"] == "idle"
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"not json\n", "request is not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"op": "explode"}\n', "unknown op 'explode'; expected 'press', 'status' or 'clock'"),
        (b'{"op": "press", "kind": "triple"}\n', "unknown press kind 'triple'"),
        (b'{"op": "press"}\n', "unknown press kind None"),
        (b'{"op": "press", "kind": ["short"]}\n', "unknown press kind ['short']"),
        (b"", "connection closed before a message"),
        (b"x" * 5000 + b"\n", "longer than 4096 bytes"),
    ],
)
def test_bad_requests_get_reasons_and_change_nothing(
    server: ControlServer, agent: Agent, payload: bytes, error: str
) -> None:
    reply = _raw(server.path, payload)
    assert reply["ok"] is False
    assert error in str(reply["error"])
    assert agent.presses == []
    send_press(server.path, PressKind.SHORT)  # still serving
    assert agent.presses == [PressKind.SHORT]


def test_failing_press_handler_is_reported_to_client(server: ControlServer, agent: Agent) -> None:
    agent.fail_press = True
    with pytest.raises(ControlError, match="agent refused: press failed: recorder is busy"):
        send_press(server.path, PressKind.SHORT)
    agent.fail_press = False
    send_press(server.path, PressKind.SHORT)
    assert agent.presses == [PressKind.SHORT]


def test_silent_client_times_out(server: ControlServer) -> None:
    # A client that never answers is bounded by its own timeout.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = server.path.with_name("mute.sock")
    listener.bind(str(path))
    listener.listen(1)
    try:
        with pytest.raises(ControlError, match=r"did not answer within 0\.3 s"):
            send_press(path, PressKind.SHORT, timeout=0.3)
    finally:
        listener.close()


def test_stop_removes_socket_and_threads(sock_dir: Path, agent: Agent) -> None:
    path = sock_dir / "agent.sock"
    srv = ControlServer(path, agent.on_press, agent.status)
    srv.start()
    send_press(path, PressKind.SHORT)
    srv.stop()
    srv.stop()
    assert not path.exists()
    assert wait_for(
        lambda: not any(t.name.startswith("control-") for t in threading.enumerate()), timeout=5
    )
    with pytest.raises(ControlError, match="no socket at"):
        send_press(path, PressKind.SHORT)


def test_press_socket_mock_pins_drive_real_button_code(sock_dir: Path) -> None:
    """The simulated unit's wiring: socket press -> mock pin edges -> RecordButton."""
    long_s, double_s = 0.5, 0.3
    classified: list[PressKind] = []
    button = RecordButton(17, long_s, double_s, classified.append, pin_factory=MockFactory())
    srv = ControlServer(
        sock_dir / "agent.sock",
        lambda kind: drive_press(button.pin, kind, long_s),
        lambda: {"presses": [k.value for k in classified]},
    )
    srv.start()
    try:
        for i, kind in enumerate([PressKind.SHORT, PressKind.LONG, PressKind.DOUBLE], start=1):
            send_press(srv.path, kind)
            assert wait_for(lambda n=i: len(classified) >= n, timeout=10)  # type: ignore[misc]
        assert classified == [PressKind.SHORT, PressKind.LONG, PressKind.DOUBLE]
        assert query_status(srv.path) == {"presses": ["short", "long", "double"]}
    finally:
        srv.stop()
        button.close()


# --- a simulated unit's clock ------------------------------------------------------------


@pytest.fixture
def simulated_clock() -> Iterator[SimulatedClock]:
    simulated = SimulatedClock()
    yield simulated
    clock.set_offset(0)


@pytest.fixture
def clock_server(
    sock_dir: Path, agent: Agent, simulated_clock: SimulatedClock
) -> Iterator[ControlServer]:
    srv = ControlServer(
        sock_dir / "agent.sock", agent.on_press, agent.status, on_clock=simulated_clock.set
    )
    srv.start()
    yield srv
    srv.stop()


def test_clock_set_from_another_process_moves_the_simulated_clock(
    clock_server: ControlServer, simulated_clock: SimulatedClock
) -> None:
    code = (
        "import sys; from pathlib import Path; from device.control_socket import send_clock; "
        "send_clock(Path(sys.argv[1]), -86400, synced=False)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(clock_server.path)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert clock.offset() == -86400.0
    assert simulated_clock.read() == ClockState(synced=False, offset_ms=None)
    send_clock(clock_server.path, 0, synced=True)
    assert clock.offset() == 0.0
    assert simulated_clock.read() == ClockState(synced=True, offset_ms=0.0)


def test_clock_is_refused_on_a_unit_whose_clock_is_not_simulated(server: ControlServer) -> None:
    with pytest.raises(ControlError, match="agent refused: clock is not simulated on this unit"):
        send_clock(server.path, -86400, synced=False)
    assert clock.offset() == 0.0


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b'{"op": "clock", "synced": false}\n', "bad clock offset_s None"),
        (
            b'{"op": "clock", "offset_s": "-86400", "synced": false}\n',
            "bad clock offset_s '-86400'",
        ),
        (b'{"op": "clock", "offset_s": true, "synced": false}\n', "bad clock offset_s True"),
        (b'{"op": "clock", "offset_s": NaN, "synced": false}\n', "bad clock offset_s nan"),
        (b'{"op": "clock", "offset_s": 1e400, "synced": false}\n', "bad clock offset_s inf"),
        (b'{"op": "clock", "offset_s": -315576001, "synced": false}\n', "within +-315576000"),
        (b'{"op": "clock", "offset_s": 1' + b"0" * 400 + b', "synced": false}\n', "bad clock"),
        (b'{"op": "clock", "offset_s": 60}\n', "bad clock synced None"),
        (b'{"op": "clock", "offset_s": 60, "synced": 0}\n', "bad clock synced 0"),
        (b'{"op": "clock", "offset_s": 60, "synced": "false"}\n', "bad clock synced 'false'"),
    ],
)
def test_bad_clock_requests_get_reasons_and_change_nothing(
    clock_server: ControlServer, simulated_clock: SimulatedClock, payload: bytes, error: str
) -> None:
    reply = _raw(clock_server.path, payload)
    assert reply["ok"] is False
    assert error in str(reply["error"])
    assert clock.offset() == 0.0
    assert simulated_clock.read().synced is True
    send_clock(clock_server.path, 7200.5, synced=False)  # still serving
    assert clock.offset() == 7200.5
