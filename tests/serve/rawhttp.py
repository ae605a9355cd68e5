"""Raw HTTP/1.1 over a socket, for the tests that talk to a real server process byte by byte.

Imported by the test files beside it (pytest puts this folder on sys.path: tests/ has no
__init__.py).
"""

from __future__ import annotations

import json
import socket

import pytest


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Status, headers (lower-case names) and JSON body of the next response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail(f"closed before the response: {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536) or pytest.fail("closed in the middle of the body")
    return int(status_line.split()[1]), headers, json.loads(body)
