"""The server a soak scenario attacks, and what the bench reads of it.

``Server`` is either one the bench started (``started_server``: bench/server.py's
``start_server``, with the open-file limit set in the child before exec) or a running one at a
URL. Its RSS, open-file limit and open descriptors come from /proc/PID, the sockets on its port
and their queues from /proc/net/tcp; ``RssSampler`` samples the RSS in a thread,
``ServerSampler`` the RSS, descriptors and sockets together. ``connection_cap`` is the cap a
started server computed. ``raised_nofile`` lifts the bench's own open-file limit for 1000+
client sockets. ``SoakError``, the error of every soak module, is defined here, at the bottom of
their imports.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from smartmixed.bench import BenchError
from smartmixed.bench.server import HEALTH_READY_PATH, ServerError, start_server

HEALTH_PATH = HEALTH_READY_PATH
LIVE_PATH = "/v2/health/live"
ALIVE_TIMEOUT_S = 5.0
TRACEBACK = "Traceback (most recent"
# serve/cli.py logs the cap when the open-file limit lowers it below max_connections
CAP_LOG = re.compile(r"connection cap (\d+) \(max_connections")
TCP_LISTEN = 0x0A  # /proc/net/tcp state of a listening socket


class SoakError(BenchError):
    """Options the soak suite cannot run with, or a scenario that could not be measured."""


@dataclass
class Server:
    """A server to attack: one the bench started (process set) or a running one at url."""

    url: str
    pid: int | None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    nofile: int | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    def rss_mib(self) -> float | None:
        return read_rss_mib(self.pid) if self.pid else None

    def alive(self) -> bool:
        """Still running and answering /v2/health/live within a few seconds."""
        if self.process is not None and self.process.poll() is not None:
            return False
        try:
            with httpx.Client(timeout=ALIVE_TIMEOUT_S, trust_env=False) as client:
                return client.get(self.url + LIVE_PATH).status_code == 200
        except httpx.HTTPError:
            return False

    def fd_count(self) -> int | None:
        return read_fd_count(self.pid) if self.pid else None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def tracebacks(self) -> int | None:
        """Tracebacks the server has logged so far (None: its log is not the bench's)."""
        return self.log_text().count(TRACEBACK) if self.log_path else None

    def log_counts(self) -> dict[str, int] | None:
        if self.log_path is None or not self.log_path.exists():
            return None
        text = self.log_text()
        return {"lines": text.count("\n"), "tracebacks": text.count(TRACEBACK)}

    def log_tail(self, chars: int = 1200) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace").strip()[-chars:]


def read_rss_mib(pid: int) -> float | None:
    """VmRSS of /proc/PID/status in MiB; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_nofile(pid: int) -> int | None:
    """The soft open-file limit of a running process (/proc/PID/limits)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_fd_count(pid: int) -> int | None:
    """Open descriptors of a process (entries of /proc/PID/fd); None once it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One IPv4 TCP socket of /proc/net/tcp: its state and queues (bytes)."""

    state: int  # 1 established, 8 close-wait, 10 listen, ... (include/net/tcp_states.h)
    tx_queue: int  # written by its owner, not yet acknowledged by the peer
    rx_queue: int  # received, not yet read by its owner
    inode: int  # 0: no process holds it any more (time-wait, orphaned)


def parse_proc_net_tcp(text: str) -> dict[tuple[int, int], TcpSocket]:
    """/proc/net/tcp -> {(local port, remote port): socket} for sockets on 127.0.0.1."""
    sockets = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        local_ip, local_port = f[1].split(":")
        remote_port = f[2].split(":")[1]
        if local_ip != "0100007F":
            continue
        tx, rx = f[4].split(":")
        key = (int(local_port, 16), int(remote_port, 16))
        sockets[key] = TcpSocket(int(f[3], 16), int(tx, 16), int(rx, 16), int(f[9]))
    return sockets


def read_tcp_sockets() -> dict[tuple[int, int], TcpSocket]:
    try:
        return parse_proc_net_tcp(Path("/proc/net/tcp").read_text())
    except OSError:
        return {}


def server_sockets(sockets: Mapping[tuple[int, int], TcpSocket], port: int) -> int:
    """Connections on the server's port that a process still holds (the listener left out)."""
    return sum(
        1
        for (local, _), s in sockets.items()
        if local == port and s.state != TCP_LISTEN and s.inode != 0
    )


def connection_cap(server: Server, *, max_connections: int) -> tuple[int | None, str]:
    """The connection cap of a started server and where it comes from: its log (the open-file
    limit lowered it), else ``max_connections`` lowered as serve/server.py's connection_cap
    does, from the open-file limit the bench set."""
    found = CAP_LOG.search(server.log_text())
    if found:
        return int(found.group(1)), "server log"
    from smartmixed.serve.server import FD_RESERVE

    if server.nofile is None:
        return None, "unknown"
    return max(1, min(max_connections, server.nofile - FD_RESERVE)), "computed"


def shell_command(command: Sequence[str], env: Mapping[str, str], nofile: int | None) -> str:
    """The server command as one shell line an operator can paste (env, ulimit, argv)."""
    text = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    text = f"{text} {shlex.join(command)}".strip()
    return f"ulimit -n {nofile} && {text}" if nofile else text


@contextlib.contextmanager
def started_server(
    repository: Path, *, env: Mapping[str, str], nofile: int | None, log_path: Path
) -> Iterator[Server]:
    """smartmixed-serve on a free port, with the open-file limit set to nofile (soft and hard)
    in the child before exec; waits for /v2/health/ready, stops with SIGTERM (kill later)."""
    with contextlib.ExitStack() as stack:
        try:
            started = stack.enter_context(
                start_server(repository, log_path=log_path, env=env, nofile=nofile)
            )
        except ServerError as e:  # recorded as this suite's error, as before the split
            raise SoakError(str(e)) from None
        yield Server(
            url=started.url,
            pid=started.pid,
            process=started.process,
            log_path=log_path,
            nofile=nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )


class RssSampler:
    """Samples a process's RSS every ``interval`` s in a thread: [(s since start, MiB)]."""

    def __init__(self, pid: int | None, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while True:
            rss = read_rss_mib(self.pid) if self.pid else None
            if rss is not None:
                self.samples.append((round(time.monotonic() - start, 3), round(rss, 2)))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def peak(self) -> float | None:
        return max((mb for _, mb in self.samples), default=None)


class ServerSampler:
    """Samples a started server every ``interval`` s in a thread: RSS (MiB), open descriptors,
    and connections on its port held by a process. ``samples``: [(s since start, rss, fds,
    sockets)]."""

    def __init__(self, server: Server, interval: float) -> None:
        self.server, self.interval = server, interval
        self.samples: list[tuple[float, float | None, int | None, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        port = self.server.host_port[1]
        while True:
            rss = self.server.rss_mib()
            self.samples.append(
                (
                    round(time.monotonic() - start, 3),
                    None if rss is None else round(rss, 2),
                    self.server.fd_count(),
                    server_sockets(read_tcp_sockets(), port),
                )
            )
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> ServerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, column: int) -> float | None:
        """The largest value of a column: 1 RSS, 2 descriptors, 3 sockets."""
        return max((s[column] for s in self.samples if s[column] is not None), default=None)


@contextlib.contextmanager
def raised_nofile() -> Iterator[tuple[int, int]]:
    """This process's soft open-file limit raised to its hard limit (1000+ client sockets),
    restored afterwards; yields (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield soft, target
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
