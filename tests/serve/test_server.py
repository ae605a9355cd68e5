"""Connection limits of the shipped server (serve/server.py), against a real process on 127.0.0.1.

Raw sockets: these are the clients an HTTP library will not be (endless headers, short bodies,
dribbling, garbage). One server with short timeouts and a small connection cap serves them all.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from rawhttp import read_until_closed

TIMEOUT_S = 1.0  # header and body timeouts of the server under test
CAP = 12  # its connection cap


@pytest.fixture(scope="module")
def server(repository: Path, server_starter):
    proc = server_starter(
        repository,
        "--log-level",
        "info",
        env={
            "SMARTMIXED_HEADER_TIMEOUT_S": str(TIMEOUT_S),
            "SMARTMIXED_BODY_TIMEOUT_S": str(TIMEOUT_S),
            "SMARTMIXED_MAX_CONNECTIONS": str(CAP),
            "SMARTMIXED_MAX_HEADER_BYTES": "8192",
        },
    )
    yield proc
    proc.output()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _status(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def _json_body(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return json.loads(body)


def _metric(url: str, pattern: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if not line.startswith("#") and "_created{" not in line and re.search(pattern, line)
    ]
    return sum(values)


def test_oversized_headers_get_431_at_once(server) -> None:
    sock = _connect(server.port)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Long: ")
    started, sent = time.monotonic(), 0
    try:
        while sent < 4 * 1024 * 1024:  # the server must stop this long before 4 MB
            sock.sendall(b"a" * 65536)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = read_until_closed(sock)
    assert _status(response) == 431 and time.monotonic() - started < 1.0
    assert "8192 bytes" in _json_body(response)["error"]


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
def test_slow_headers_and_short_bodies_get_408_after_the_timeout(server) -> None:
    slow = _connect(server.port)
    slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # ... and never the end
    short = _connect(server.port)
    short.sendall(
        b"POST /v2/models/mixed/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"inputs": ['
    )
    before = _metric(server.url, r'status="client_closed"')
    started = time.monotonic()
    # meanwhile the service answers others
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    for sock, message in ((slow, "headers not complete"), (short, "body not complete")):
        response = read_until_closed(sock)
        assert _status(response) == 408 and message in _json_body(response)["error"]
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 2.5  # swept once a second
    assert _metric(server.url, r'status="client_closed"') == before + 1
    assert _metric(server.url, r'status="500"') == 0
    assert _metric(server.url, r'smartmixed_connections_cut_total\{reason="header_timeout"') >= 1


def test_client_gone_mid_upload_is_client_closed_not_500(server) -> None:
    before = _metric(server.url, r'status="client_closed"')
    for _ in range(5):
        sock = _connect(server.port)
        sock.sendall(
            b"POST /v2/models/mixed/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
            + b"[" * 100
        )
        sock.close()
    deadline = time.monotonic() + 5
    while _metric(server.url, r'status="client_closed"') < before + 5:
        assert time.monotonic() < deadline, "disconnects not counted as client_closed"
        time.sleep(0.05)
    assert _metric(server.url, r'status="500"') == 0


def test_invalid_http_gets_a_json_400(server) -> None:
    sock = _connect(server.port)
    sock.sendall(b"GARBAGE / HTTP/9\r\n\r\n")
    response = read_until_closed(sock)
    assert _status(response) == 400
    assert _json_body(response)["error"].startswith("invalid HTTP request")


def test_at_the_connection_cap_health_is_still_answered(server) -> None:
    idle = [_connect(server.port) for _ in range(CAP + 4)]  # every one waits for its headers
    for sock in idle:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    time.sleep(0.2)
    for _ in range(5):  # new connections keep getting in: the longest-waiting make room
        response = httpx.get(f"{server.url}/v2/health/ready", headers={"Connection": "close"})
        assert response.status_code == 200
    evicted = 0
    for sock in idle:
        sock.settimeout(0.2)
        try:
            evicted += sock.recv(1) == b""  # closed by the server
        except ConnectionResetError:  # closed with our unread request bytes: a reset
            evicted += 1
        except TimeoutError:  # still open
            pass
        sock.close()
    assert evicted >= 4
    assert _metric(server.url, r'reason="evicted_at_connection_limit"') >= 4


def test_log_has_no_traceback(server) -> None:
    """Every attack above is a log line at most, never a traceback (runs last in the module)."""
    output = server.output()
    assert "Traceback" not in output, output[-3000:]
    assert "closed: headers not complete" in output
