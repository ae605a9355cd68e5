"""The server a soak scenario attacks, and what the bench reads of it.

``Server`` is either one the bench started (``started_server``: bench/server.py's
``start_server``, with the open-file limit set in the child before exec) or a running one at a
URL. Its RSS and open-file limit come from /proc/PID; ``RssSampler`` samples the RSS in a
thread. ``raised_nofile`` lifts the bench's own open-file limit for 1000+ client sockets.
``SoakError``, the error of every soak module, is defined here, at the bottom of their imports.
"""

from __future__ import annotations

import contextlib
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

    def log_counts(self) -> dict[str, int] | None:
        if self.log_path is None or not self.log_path.exists():
            return None
        text = self.log_path.read_text(errors="replace")
        return {"lines": text.count("\n"), "tracebacks": text.count("Traceback (most recent")}

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
