"""A real ``smartmixed-serve`` process on 127.0.0.1 (one fixture for every process test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything the server wrote (stops it first if it still runs)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=30)[0]


def start_server(
    repository: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> ServerProcess:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smartmixed.serve",
            "--repository",
            str(repository),
            "--port",
            str(port),
            *args,
        ],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = ServerProcess(proc, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"server did not become ready: {server.output()}")


@pytest.fixture(scope="session")
def server_starter():
    """``start_server`` itself, for module-scoped fixtures (the caller stops what it starts)."""
    return start_server


@pytest.fixture
def serve_process(repository: Path) -> Iterator:
    """``serve_process(*flags, env={...})`` starts a server; every one started is killed after."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        started.append(start_server(repository, *args, env=env))
        return started[-1]

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
