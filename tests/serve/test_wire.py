"""Clients that misuse the connection itself, against a real server process on 127.0.0.1.

Raw sockets with a 4 KB receive buffer (set before connect) play the clients that never read
their answers: an answer echoing an infer request's ``id`` of ``BIG_ID`` bytes outgrows what
the kernel buffers for the connection, so the server's writes stall at once. One server with a
short send timeout, a small connection cap and a small body budget serves most tests; a second,
with a long send timeout and the smallest unsent budget, serves the unsent-budget test and is
then stopped with SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rawhttp import read_response

from smartmixed.serve.routes import INDEX_BODY_BYTES
from smartmixed.serve.server import DRAIN_SEND_TIMEOUT_S, MAX_PIPELINED, SWEEP_INTERVAL_S


def _kernel_send_buffer_max() -> int:
    """The most a TCP socket's send buffer grows to (Linux autotuning), 4 MiB if unknown."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024


CAP = 8  # connection cap of the server under test (the settings' minimum)
SEND_TIMEOUT_S = 1.0
MAX_HEADER_BYTES = 8192
# An answer this large stalls a client that does not read: the kernel takes at most its send
# buffer, uvloop's buffer gets the rest, over its 64 KiB high-water mark.
BIG_ID = _kernel_send_buffer_max() + 1024 * 1024
MAX_REQUEST_BYTES = 2 * BIG_ID
BODY_BUDGET = (CAP - 2) * MAX_REQUEST_BYTES  # room for CAP - 1 big answers' requests at once
RCVBUF = 4096
ENV = {
    "SMARTMIXED_MAX_CONNECTIONS": str(CAP),
    "SMARTMIXED_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
    "SMARTMIXED_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "SMARTMIXED_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
    "SMARTMIXED_MAX_BODY_BYTES_IN_FLIGHT": str(BODY_BUDGET),
    "SMARTMIXED_REQUEST_TIMEOUT_S": "60",  # held uploads are admitted before their bodies
}


class Log:
    """The server's output, read as it comes (a full pipe would block the server)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self.lines.extend, args=(proc.stdout,), daemon=True)
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < deadline, f"{needle!r} not logged: {self.text[-2000:]}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def server(repository: Path, server_starter) -> Iterator:
    proc = server_starter(repository, "--log-level", "info", env=ENV)
    proc.log = Log(proc.proc)
    yield proc
    proc.proc.kill()
    proc.proc.wait()


# ---- clients ------------------------------------------------------------------------------------


def _connect(port: int, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # before connect: the window the server sees is this small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def _request(method: str, path: str, body: bytes = b"", *, headers: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def _infer_body(*, id_bytes: int = 8, pad_to: int = 0) -> bytes:
    tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
    body = json.dumps({"id": "x" * id_bytes, "inputs": [tensor]}).encode()
    return body.ljust(pad_to)  # JSON allows the trailing spaces


def _big_answer(*, headers: str = "") -> bytes:
    """An infer request whose answer (its id echoed) a non-reading client stalls on."""
    return _request("POST", "/v2/models/mixed/infer", _infer_body(id_bytes=BIG_ID), headers=headers)


def _readable(sock: socket.socket, limit: int) -> int:
    """Bytes readable on ``sock``, up to ``limit``, until a reset or the end."""
    size = 0
    try:
        while size < limit and (chunk := sock.recv(65536)):
            size += len(chunk)
    except ConnectionResetError:
        pass
    return size


def _health(url: str) -> int:
    return httpx.get(f"{url}/v2/health/ready", headers={"Connection": "close"}).status_code


def _metric(url: str, pattern: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if not line.startswith("#") and "_created{" not in line and re.search(pattern, line)
    )


def _cut(url: str, reason: str) -> float:
    return _metric(url, rf'smartmixed_connections_cut_total\{{reason="{reason}"\}}')


def _wait_metric(url: str, pattern: str, at_least: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _metric(url, pattern) < at_least:
        assert time.monotonic() < deadline, f"{pattern} never reached {at_least}"
        time.sleep(0.02)


INFER_200 = r'smartmixed_requests_total\{.*endpoint="infer".*status="200"'


def _stall(server, connections: int, request: bytes) -> list[socket.socket]:
    """``connections`` slow readers, each sending ``request`` (a big answer first); returned
    once every big answer is written, i.e. once every connection's writes have stalled."""
    before = _metric(server.url, INFER_200)
    readers = [_connect(server.port, rcvbuf=RCVBUF) for _ in range(connections)]
    for sock in readers:
        sock.sendall(request)
    _wait_metric(server.url, INFER_200, before + connections)
    time.sleep(0.1)  # the answer is written in the same loop turn as the count; margin
    return readers


def _server_sockets(pid: int) -> int:
    """The sockets the server process holds open (Linux /proc)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            count += os.readlink(fd).startswith("socket:")
    return count


# ---- slow readers: answers nobody reads ---------------------------------------------------------


def test_pipelining_slow_readers_leave_room_for_health(server) -> None:
    """2 x cap connections pipelining 450 GET /openapi.json each, reading nothing: health stays
    200 (the pipelines are bounded, their connections closed after MAX_PIPELINED answers)."""
    readers = []
    for _ in range(2 * CAP):
        readers.append(_connect(server.port, rcvbuf=RCVBUF))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # refused at the cap
            readers[-1].sendall(_request("GET", "/openapi.json") * 450)
    time.sleep(0.5)
    assert [_health(server.url) for _ in range(10)] == [200] * 10
    assert _cut(server.url, "pipeline_limit") >= CAP
    for sock in readers:
        sock.close()  # with unread answers: a reset


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
def test_connections_that_do_not_read_are_evicted_then_reset(server) -> None:
    """A stalled answer with two pipelined requests behind it, on every connection but one
    (an upload in progress): health takes their places; those left are reset after the send
    timeout (and their pending answers log nothing when they go)."""
    before = _cut(server.url, "send_timeout")
    baseline = _server_sockets(server.proc.pid)  # the listener, the loop's own
    started = time.monotonic()
    readers = _stall(server, CAP - 1, _big_answer() + _request("GET", "/openapi.json") * 2)
    upload = _connect(server.port)  # the cap is full, and with no idle connection
    upload.sendall(_request("POST", "/v2/models/mixed/infer", _infer_body())[:-1])
    assert [_health(server.url) for _ in range(3)] == [200] * 3
    readers.pop().close()  # the newest stall: gone with its answers pending (no traceback)
    # the rest: reset by the sweeper, the upload alone left
    deadline = started + SEND_TIMEOUT_S + 2 * SWEEP_INTERVAL_S + 2
    while _server_sockets(server.proc.pid) > baseline + 1:
        assert time.monotonic() < deadline, "connections that do not read still open"
        time.sleep(0.05)
    assert _cut(server.url, "send_timeout") > before
    for sock in readers:  # each lost the answer's unsent part
        assert _readable(sock, BIG_ID) < BIG_ID
        sock.close()
    upload.close()


def test_a_header_behind_an_answer_in_progress_is_counted(server) -> None:
    """An endless header while an earlier answer is in progress (blocked behind a stalled one):
    the connection is reset once the header limit is passed, not read on and on."""
    before = _cut(server.url, "header_too_large")
    [sock] = _stall(server, 1, _big_answer() + _request("GET", "/v2/health/live"))
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
    started = time.monotonic()
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        while time.monotonic() - started < 3:  # what the kernels buffer, then the reset
            sock.sendall(b"a" * 65536)
    # reset by the header limit at its first read, long before the send timeout would
    assert time.monotonic() - started < SEND_TIMEOUT_S
    assert _cut(server.url, "header_too_large") == before + 1
    sock.close()


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
def test_connections_closed_with_unsent_answers_do_not_pass_the_cap(server) -> None:
    """Connection: close answers nobody reads leave their connections closing with unsent data:
    at the cap they are reset to make room, so the server never holds more than the cap."""
    baseline = _server_sockets(server.proc.pid)  # the listener, and maybe a metrics scrape
    readers, peak = [], 0
    for _ in range(CAP + 4):
        readers += _stall(server, 1, _big_answer(headers="Connection: close\r\n"))
        peak = max(peak, _server_sockets(server.proc.pid))
    assert peak <= baseline + CAP
    assert _health(server.url) == 200
    for sock in readers:
        sock.close()


# ---- request bodies -----------------------------------------------------------------------------


def test_bodies_are_admitted_within_one_budget_on_every_route(server) -> None:
    """Uploads held open reserve their declared sizes: past the budget the next one gets 503 at
    once, before a byte of its body is read; the index's own small limit comes first; a client
    gone gives its share back."""
    body = _infer_body(pad_to=MAX_REQUEST_BYTES)
    in_flight = r'smartmixed_in_flight\{model="mixed"\}'
    held = []
    for i in range(BODY_BUDGET // MAX_REQUEST_BYTES):  # the whole budget, on both model routes
        sock = _connect(server.port)
        path = ("/v2/models/mixed/infer", "/v1/models/mixed:predict")[i % 2]
        sock.sendall(_request("POST", path, body)[:1000])
        held.append(sock)
    _wait_metric(server.url, in_flight, len(held))
    time.sleep(0.1)  # admitted, then reserved in the same loop turn; margin

    late = _connect(server.port)
    late.sendall(_request("POST", "/v2/models/mixed/infer", body)[:1000])
    status, headers, answer = read_response(late)
    assert status == 503 and headers["retry-after"] == "1"
    assert answer["error"] == (
        f"request bodies being received or answered would exceed {BODY_BUDGET} bytes "
        "(max_body_bytes_in_flight); retry later"
    )
    index = _connect(server.port)  # the index reads a tiny body: its own limit comes first
    index.sendall(_request("POST", "/v2/repository/index", b" " * (INDEX_BODY_BYTES + 1))[:1000])
    assert read_response(index)[::2] == (
        413,
        {
            "error": f"request body of {INDEX_BODY_BYTES + 1} bytes is over the limit of "
            f"{INDEX_BODY_BYTES}"
        },
    )

    for sock in (*held, late, index):
        sock.close()
    deadline = time.monotonic() + 5
    while _metric(server.url, in_flight) > 0:  # the server saw them go
        assert time.monotonic() < deadline, "held uploads never released"
        time.sleep(0.02)
    again = httpx.post(
        f"{server.url}/v2/models/mixed/infer",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert again.status_code == 200


def test_uploads_answered_early_leave_room_for_health(server) -> None:
    """Every connection of the cap sending the rest of a body whose request was answered already
    (413 at once: declared over the limit): none has a request in progress, so health takes the
    place of one instead of getting 503."""
    body = _infer_body(pad_to=MAX_REQUEST_BYTES + 1)
    uploads = []
    for _ in range(CAP):
        sock = _connect(server.port)
        sock.sendall(_request("POST", "/v2/models/mixed/infer", body)[:1000])
        assert read_response(sock)[0] == 413
        uploads.append(sock)  # and its body never finishes
    assert [_health(server.url) for _ in range(3)] == [200] * 3
    for sock in uploads:
        sock.close()


def test_a_client_gone_mid_upload_to_the_index_is_one_info_line(server) -> None:
    sock = _connect(server.port)
    sock.sendall(_request("POST", "/v2/repository/index", b'{"ready": true}')[:-5])
    time.sleep(0.2)  # the route is reading the body
    sock.close()
    server.log.wait_for("POST /v2/repository/index: the client closed the connection")
    assert "Traceback" not in server.log.text


# ---- RFC 9112: Host, upgrades -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_head", "status", "error"),
    [
        (
            b"GET /v2 HTTP/1.1\r\n\r\n",
            400,
            "expected one Host header, got 0 (RFC 9112 section 3.2)",
        ),
        (
            b"GET /v2 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
            "expected one Host header, got 2 (RFC 9112 section 3.2)",
        ),
        (
            b"GET /v2 HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            400,
            "protocol upgrades (WebSocket, CONNECT) are not supported",
        ),
        (b"GET /v2 HTTP/1.0\r\n\r\n", 200, None),  # HTTP/1.0 needs no Host
    ],
    ids=["no-host", "two-hosts", "websocket", "http1.0-no-host"],
)
def test_host_header_and_upgrades(server, request_head: bytes, status: int, error) -> None:
    sock = _connect(server.port)
    sock.sendall(request_head)
    got, _, body = read_response(sock)
    assert got == status
    if error is not None:
        assert body == {"error": error}
    sock.close()


# ---- a server that waits long for readers: the unsent budget, SIGTERM ------------------------

UNSENT_BUDGET = 1024 * 1024  # max_unsent_bytes (its minimum): less than two stalled answers


@pytest.fixture(scope="module")
def patient_server(repository: Path, server_starter) -> Iterator:
    """A send timeout longer than the drain, and the smallest unsent budget."""
    env = {
        **ENV,
        "SMARTMIXED_SEND_TIMEOUT_S": "60",
        "SMARTMIXED_MAX_UNSENT_BYTES": str(UNSENT_BUDGET),
    }
    proc = server_starter(repository, "--log-level", "info", env=env)
    proc.log = Log(proc.proc)
    yield proc
    proc.proc.kill()
    proc.proc.wait()


def test_answers_not_read_are_bounded_server_wide(patient_server) -> None:
    """Three stalled answers, any two over the budget: each new stall resets the older ones.
    An answer counts whole, what the kernel holds unacknowledged too: uvloop keeps the whole
    answer in memory until its last byte is written, though its buffer reports only the rest."""
    readers = _stall(patient_server, 3, _big_answer())
    deadline = time.monotonic() + 5
    while _cut(patient_server.url, "unsent_budget") < 2:
        assert time.monotonic() < deadline, "the unsent budget was not enforced"
        time.sleep(0.02)
    # what each can still read: a whole answer on the open connection, part of one on a reset
    whole = [_readable(sock, BIG_ID) >= BIG_ID for sock in readers]
    assert sorted(whole) == [False, False, True]
    for sock in readers:
        sock.close()
    assert _cut(patient_server.url, "unsent_budget") == 2
    held = re.findall(
        rf"reset: answers not read hold (\d+) bytes, over {UNSENT_BUDGET} server-wide",
        patient_server.log.text,
    )
    assert len(held) == 2
    # two whole answers each time, less what the client's socket took (acknowledged)
    assert all(int(total) >= 2 * (BIG_ID - 64 * 1024) for total in held), held


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
def test_sigterm_with_slow_readers_connected_exits_0_at_once(patient_server) -> None:
    """A stalled answer with pipelined requests behind it, and a send timeout longer than the
    drain: SIGTERM still exits 0 within DRAIN_SEND_TIMEOUT_S (and a sweep), no traceback."""
    server = patient_server
    [reader] = _stall(server, 1, _big_answer() + _request("GET", "/openapi.json") * MAX_PIPELINED)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=DRAIN_SEND_TIMEOUT_S + 2 * SWEEP_INTERVAL_S + 5) == 0
    assert time.monotonic() - started < DRAIN_SEND_TIMEOUT_S + 2 * SWEEP_INTERVAL_S + 2
    server.log.thread.join(timeout=5)
    assert "Traceback" not in server.log.text, server.log.text[-3000:]
    assert server.log.text.count("reset: answer not read for 2.0 s") == 1
    reader.close()


def test_log_has_no_traceback(server) -> None:
    """Every attack above is a log line at most, never a traceback (runs last in the module)."""
    time.sleep(0.2)  # the last resets' lines
    assert "Traceback" not in server.log.text, server.log.text[-3000:]
    assert "ERROR" not in server.log.text, server.log.text[-3000:]
