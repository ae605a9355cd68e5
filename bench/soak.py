"""Reliability of ``smartmixed-serve`` against hostile clients and careless operators (issue F).

Five scenarios, each against a real server on 127.0.0.1 (a fresh ``smartmixed-serve``
subprocess per scenario, started on a free port over a repository of one seeded random-weight
model, unless ``url`` targets a running server). Every number comes from the client side or from
``/proc/PID``; each scenario records what it measured, its targets and whether they were met
(reported, never asserted). A scenario that fails (the server does not start, dies, a tool
breaks) is recorded with its reason and the suite goes on.

- **soak**: C keep-alive connections (default 64) send single-sample V2 JSON infer requests back
  to back for D s (default 60), from ``wrk`` (one thread, a Lua ``response()`` hook counts
  statuses and responses per second) or, without wrk, the Python client below. Errors are non-2xx
  answers plus socket errors (connect, read, write, timeout). The server's RSS (VmRSS of
  /proc/PID/status) is sampled every second; growth compares the mean RSS over the last twelfth
  of the run (>= 1 s) at the end of the first half with the same window at the end of the second
  half, so start-up growth (arenas, first batches) is excluded.
- **overload**: C = 1024 keep-alive connections in closed loop for 20 s from a Python asyncio
  client (uvloop, raw HTTP/1.1 over streams; a 503 is retried at once, Retry-After is not
  honoured, so this is the hammering case). Counts by status, Retry-After on 503s, client
  timeouts (``client_timeout_s``, default 10 s, twice the server's default deadline), socket
  errors, and the longest wait of a 200 against the server's request deadline
  (SMARTMIXED_REQUEST_TIMEOUT_S). The client takes CPU from the server on 2 cores; that lowers
  the server's throughput but not the overload (1024 clients against a few thousand requests/s).
- **slow**: N = 1000 slowloris clients for 25 s, each sending a request line and then one header
  line every 5 s; one whose connection the server closes opens a new one at its next tick, so
  the pressure lasts the whole run. The server's open-file limit is 1024 (soft and hard, set in
  the child before exec, as ``ulimit -n 1024`` would); the bench raises its own soft limit to its
  hard limit meanwhile. A connection counts as freed when the server closes it (EOF, reset or an
  answer) within the header timeout (SMARTMIXED_HEADER_TIMEOUT_S) + 2 s of its connect; only
  connections opened at least that long before the end are judged. Normal infer requests (a new
  connection each, every 4 probe intervals) run meanwhile.
- **header**: one connection streams a single header line of 100 MB in 64 KiB chunks as fast as
  the server reads them; records the answer's status (431 or 400 expected), the time from the
  first byte to the answer or to the server closing the connection, and the server's RSS before,
  at its peak (sampled every 50 ms) and 1 s after.
- **sigterm**: C = 32 clients in closed loop; SIGTERM after 5 s; the load goes on until the
  server exits (at most ``drain_limit_s``, then it is killed). A request counts as failed when it
  got a 5xx other than a 503 sent after the signal, any 4xx, a client timeout, a response cut off
  partway, or no response at all, except one case: a keep-alive connection the server closed
  with no response byte after the signal (the idle-connection race RFC 9112 9.3.1 lets a client
  retry; the infer request is a pure function). A connection refused once the listener closed is
  not a failure either: the request never reached the server. Exit code (target 0) and drain
  time (signal to exit) are recorded.

Health during overload, slow clients and the big header comes from a separate prober process
(stdlib only, so the bench's event loop does not delay it): every 50 ms it opens a NEW
connection (as the kubelet does) for ``GET /v2/health/ready`` with a 5 s timeout. A failed probe
(error, timeout, non-200) counts as the probe timeout in the percentiles and in
``health_failures``; ``health_over_1s`` counts what the kubelet's default 1 s timeout would fail.

A full default run takes about 2 minutes (60 + 20 + 25 + 5 s of load, one server start per
scenario, the model build); a server that hangs stretches it towards 4 (up to 10 s of in-flight
overload requests, the 30 s header limit, the 40 s drain limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from tqdm.auto import tqdm

from smartmixed.bench import BenchError, common
from smartmixed.bench.common import machine_info
from smartmixed.bench.load import (
    WRK_MARKER,
    WRK_SUMMARY,
    lua_long_string,
    parse_wrk_output,
    wrk_version,
)
from smartmixed.bench.server import (
    HEALTH_READY_PATH,
    PAPER_ARCH,
    ServerError,
    Target,
    build_repository,
    check_url,
    pick_models,
    prepare_target,
    server_command,
    start_server,
)
from smartmixed.contract import SpecError, parse_arch

SCENARIOS = ("soak", "overload", "slow", "header", "sigterm")
GENERATED_MODEL = "mixed"
HEALTH_PATH = HEALTH_READY_PATH
LIVE_PATH = "/v2/health/live"
PROBE_TIMEOUT_S = 5.0  # a health probe slower than this is a failure (counted at this value)
KUBELET_TIMEOUT_S = 1.0  # the kubelet's default probe timeoutSeconds
INFER_PROBE_EVERY = 4  # slow clients: one infer request per 4 health-probe intervals
CONNECT_TIMEOUT_S = 5.0
REFUSED_PAUSE_S = 0.05  # a worker whose connect was refused waits this long (no spinning)
HEADER_CHUNK = 64 * 1024
FREED_GRACE_S = 2.0  # a slow connection is freed when closed by header timeout + this
RSS_SOAK_INTERVAL_S = 1.0
RSS_HEADER_INTERVAL_S = 0.05
SETTLE_AFTER_HEADER_S = 1.0
ALIVE_TIMEOUT_S = 5.0
STATUS_MARKER = "SMARTMIXED-WRK-STATUS "
OUTCOME_BIN_S = 0.1  # sigterm timeline bins
# Targets (issue F). op: "<", "<=", "==", ">="; a value not measured evaluates to None.
TARGETS: dict[str, dict[str, tuple[str, Any]]] = {
    "soak": {"errors": ("<=", 0), "rss_growth_pct": ("<", 5.0), "server_alive": ("==", True)},
    "overload": {
        "health_p99_ms": ("<=", 100.0),
        "ok_over_deadline": ("<=", 0),
        "client_timeouts": ("<=", 0),
        "other_failures": ("<=", 0),
        "shed_without_retry_after": ("<=", 0),
        "server_alive": ("==", True),
    },
    "slow": {
        "health_p99_ms": ("<=", 100.0),
        "health_failures": ("<=", 0),
        "infer_failures": ("<=", 0),
        "freed_share": (">=", 1.0),
        "server_alive": ("==", True),
    },
    "header": {
        "refused": ("==", True),
        "answer_s": ("<=", 1.0),
        "rss_growth_mib": ("<", 20.0),
        "server_alive": ("==", True),
    },
    "sigterm": {"failed_requests": ("<=", 0), "exit_code": ("==", 0)},
}


class SoakError(BenchError):
    """Options the soak suite cannot run with, or a scenario that could not be measured."""


@dataclass(frozen=True)
class SoakOptions:
    """Durations and counts of the scenarios (defaults: the issue's; small values for tests)."""

    soak_duration_s: int = 60
    soak_concurrency: int = 64
    overload_duration_s: int = 20
    overload_concurrency: int = 1024
    client_timeout_s: float = 10.0
    slow_clients: int = 1000
    slow_duration_s: float = 25.0
    slow_interval_s: float = 5.0
    slow_nofile: int = 1024
    header_mb: float = 100.0
    header_limit_s: float = 30.0
    sigterm_concurrency: int = 32
    sigterm_after_s: float = 5.0
    drain_limit_s: float = 40.0
    probe_interval_ms: float = 50.0

    def __post_init__(self) -> None:
        bad = [f.name for f in fields(self) if not getattr(self, f.name) > 0]
        if bad:
            raise SoakError(f"{', '.join(bad)} must be > 0")
        if self.slow_nofile < 64:
            raise SoakError("slow_nofile must be >= 64 (the server needs a few files to start)")


# --------------------------------------------------------------------------------------------
# Servers


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


# --------------------------------------------------------------------------------------------
# Clients: raw HTTP/1.1 over asyncio streams (status, headers and timing of every request)


def http_request(
    method: str,
    path: str,
    host: str,
    body: bytes = b"",
    *,
    close: bool = False,
    extra: Sequence[str] = (),
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *extra]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class NoResponse(Exception):
    """The connection closed (or was reset) before any byte of a response."""


class CutResponse(Exception):
    """The connection closed partway through a response."""


@dataclass(slots=True)
class Reply:
    status: int
    retry_after: bool
    close: bool


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One HTTP/1.1 response (Content-Length, chunked or read-to-close body)."""
    buf = bytearray()
    try:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = await reader.read(65536)
            if not chunk:
                raise CutResponse() if buf else NoResponse()
            buf += chunk
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = buf[end + 4 :]
        close = headers.get("connection", "").lower() == "close"
        if "content-length" in headers:
            missing = int(headers["content-length"]) - len(body)
            while missing > 0:
                chunk = await reader.read(min(missing, 65536))
                if not chunk:
                    raise CutResponse()
                missing -= len(chunk)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            while not body.endswith(b"0\r\n\r\n"):  # the last chunk (no trailers here)
                chunk = await reader.read(65536)
                if not chunk:
                    raise CutResponse()
                body += chunk
        else:
            while await reader.read(65536):  # no length: the body ends with the connection
                pass
            close = True
    except (OSError, asyncio.IncompleteReadError):
        raise CutResponse() if buf else NoResponse() from None
    except (ValueError, IndexError):
        raise CutResponse() from None  # not an HTTP response
    return Reply(status=status, retry_after="retry-after" in headers, close=close)


@dataclass(slots=True)
class Attempt:
    """One request of a closed-loop client: outcome reply | timeout | no_response | cut |
    refused (connect refused) | connect_error."""

    start: float  # time.monotonic()
    seconds: float
    outcome: str
    status: int | None = None
    retry_after: bool = False
    close: bool = False
    reused: bool = False  # sent on a keep-alive connection that had already answered


async def closed_loop(
    host: str,
    port: int,
    request: bytes,
    *,
    concurrency: int,
    stop: Callable[[], bool],
    timeout: float,
) -> list[Attempt]:
    """``concurrency`` keep-alive connections, each sending its next request when the last
    answer arrives, until ``stop()``; a connection is reopened after a close or an error."""
    attempts: list[Attempt] = []

    async def worker() -> None:
        writer: asyncio.StreamWriter | None = None
        reused = False
        while not stop():
            t0 = time.monotonic()
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
                    )
                    reused = False
                except (OSError, TimeoutError) as e:
                    kind = "refused" if isinstance(e, ConnectionRefusedError) else "connect_error"
                    attempts.append(Attempt(t0, time.monotonic() - t0, kind))
                    await asyncio.sleep(REFUSED_PAUSE_S)
                    continue
            try:
                writer.write(request)
                reply = await asyncio.wait_for(read_reply(reader), timeout)
            except (TimeoutError, NoResponse, CutResponse, OSError) as e:
                kind = {TimeoutError: "timeout", NoResponse: "no_response", CutResponse: "cut"}.get(
                    type(e), "no_response"
                )
                attempts.append(Attempt(t0, time.monotonic() - t0, kind, reused=reused))
                writer.close()
                writer = None
                continue
            attempts.append(
                Attempt(
                    t0,
                    time.monotonic() - t0,
                    "reply",
                    reply.status,
                    reply.retry_after,
                    reply.close,
                    reused,
                )
            )
            if reply.close:
                writer.close()
                writer = None
            else:
                reused = True
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return attempts


def run_async(coro: Any) -> Any:
    """Run on uvloop when it is installed (a cheaper client on 2 cores), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# The health/infer prober: its own process (stdlib only, starts in ~50 ms) so the bench's busy
# event loop never delays a probe. Every INTERVAL s it opens a NEW connection, sends REQUEST
# (hex), reads one response; stops after DURATION s or when its stdin closes; prints a JSON list
# of [monotonic start, ms, status | error name].
PROBE_SCRIPT = r"""
import json, select, socket, sys, time
host, port, interval, timeout, duration, request = sys.argv[1:7]
port, interval, timeout, duration = int(port), float(interval), float(timeout), float(duration)
request = bytes.fromhex(request)

def probe():
    t0 = time.monotonic()
    end = t0 + timeout
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            s.settimeout(max(end - time.monotonic(), 0.001))
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = [l.split(b":", 1)[1] for l in head.split(b"\r\n")
                          if l.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0]):
                    break
    if not data.startswith(b"HTTP/"):
        return "no_response"
    return int(data.split(b" ", 2)[1])

samples = []
start = time.monotonic()
tick = start
while tick < start + duration:
    if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.buffer.read1(1):
        break
    time.sleep(max(tick - time.monotonic(), 0))
    t0 = time.monotonic()
    try:
        status = probe()
    except TimeoutError:
        status = "timeout"
    except (OSError, ValueError, IndexError) as e:
        status = type(e).__name__
    samples.append([round(t0, 4), round((time.monotonic() - t0) * 1e3, 3), status])
    tick = max(tick + interval, time.monotonic())
print(json.dumps(samples))
"""


class Prober:
    """A running prober process; ``stop()`` returns its samples."""

    def __init__(self, server: Server, request: bytes, *, interval: float, duration: float):
        host, port = server.host_port
        args = [host, str(port), str(interval), str(PROBE_TIMEOUT_S), str(duration), request.hex()]
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROBE_SCRIPT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> list[list[Any]]:
        """Closing stdin ends the prober after its current probe."""
        try:
            out, err = self.process.communicate(timeout=PROBE_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise SoakError("the health prober did not stop") from None
        if self.process.returncode != 0:
            raise SoakError(f"the health prober failed: {err.decode(errors='replace')[-500:]}")
        return json.loads(out)


def health_probe(server: Server) -> bytes:
    host, port = server.host_port
    return http_request(
        "GET",
        HEALTH_PATH,
        f"{host}:{port}",
        close=True,
        extra=["User-Agent: kube-probe/1.30", "Accept: */*"],
    )


def summarize_probes(samples: Sequence[Sequence[Any]], prefix: str) -> dict[str, Any]:
    """p50/p99/max of probes; a failed probe (not 200) counts as PROBE_TIMEOUT_S."""
    failed = [s for s in samples if s[2] != 200]
    values = [s[1] if s[2] == 200 else PROBE_TIMEOUT_S * 1e3 for s in samples]
    p50, p99 = _percentiles(values, [50, 99])
    return {
        f"{prefix}_probes": len(samples),
        f"{prefix}_failures": len(failed),
        f"{prefix}_failure_kinds": dict(Counter(str(s[2]) for s in failed)),
        f"{prefix}_p50_ms": p50,
        f"{prefix}_p99_ms": p99,
        f"{prefix}_max_ms": _round(max(values, default=None)),
        f"{prefix}_over_1s": sum(v > KUBELET_TIMEOUT_S * 1e3 for v in values),
    }


def probe_series(samples: Sequence[Sequence[Any]], t0: float) -> list[list[Any]]:
    """[[s since t0, ms, status]] for the plot."""
    return [[round(s[0] - t0, 3), s[1], s[2]] for s in samples]


def _percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    if not values:
        return [None] * len(qs)
    return [round(float(v), 3) for v in np.percentile(values, qs)]


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


# --------------------------------------------------------------------------------------------
# Scenarios. Each takes a Run and returns (measured, series); the driver adds targets.


@dataclass
class Run:
    """What a scenario needs: the server, the model's request, options and server settings."""

    server: Server
    target: Target
    options: SoakOptions
    deadline_s: float  # the server's request_timeout_s
    header_timeout_s: float
    work: Path
    use_wrk: bool
    config: dict[str, Any] = field(default_factory=dict)  # what the scenario ran with


SOAK_WRK_SCRIPT = (
    """\
-- written by smartmixed-bench soak: POST one V2 JSON body; count statuses and responses per
-- second (os.time) per thread; done() prints the summary and the counts as JSON lines
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
statuses = {{}}
seconds = {{}}

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  local s = os.time()
  seconds[s] = (seconds[s] or 0) + 1
end

local threads = {{}}
function setup(thread) table.insert(threads, thread) end

local function json_counts(t)
  local parts = {{}}
  for k, v in pairs(t) do table.insert(parts, string.format('"%d":%d', k, v)) end
  return "{{" .. table.concat(parts, ",") .. "}}"
end

function done(summary, latency, requests)
"""
    + WRK_SUMMARY
    + """\
  for _, t in ipairs(threads) do
    io.write('{status_marker}{{"statuses":' .. json_counts(t:get("statuses")) ..
             ',"seconds":' .. json_counts(t:get("seconds")) .. '}}\\n')
  end
end
"""
)


def _wrk_soak(run: Run) -> dict[str, Any]:
    o = run.options
    text = run.target.body.decode()
    script = run.work / "soak.lua"
    script.write_text(
        SOAK_WRK_SCRIPT.format(
            body=lua_long_string(text), marker=WRK_MARKER, status_marker=STATUS_MARKER
        )
    )
    command = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(o.soak_concurrency),
        "-d",
        f"{o.soak_duration_s}s",
        "--latency",
        "--timeout",
        f"{o.client_timeout_s:g}s",
        "-s",
        str(script),
        run.target.url,
    ]
    run.config["load_command"] = command
    wall0 = time.time()
    try:
        out = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=o.soak_duration_s + o.client_timeout_s + 30,
        )
    except subprocess.TimeoutExpired:
        raise SoakError("wrk did not finish in time") from None
    if out.returncode != 0:
        raise SoakError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout)[-800:]}")
    raw = parse_wrk_output(out.stdout)
    statuses: Counter[str] = Counter()
    per_second: Counter[int] = Counter()
    for line in out.stdout.splitlines():
        if line.startswith(STATUS_MARKER):
            data = json.loads(line[len(STATUS_MARKER) :])
            statuses.update({k: int(v) for k, v in data["statuses"].items()})
            per_second.update({int(k): int(v) for k, v in data["seconds"].items()})
    kinds = raw["error_kinds"]
    return {
        "requests": raw["requests"],
        "duration_s": round(raw["duration_s"], 3),
        "statuses": dict(sorted(statuses.items())),
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
        "p50_ms": _round(raw["p50_ms"]),
        "p99_ms": _round(raw["p99_ms"]),
        "max_ms": _round(raw["max_ms"]),
        # wrk's buckets are whole wall-clock seconds: plotted at their middle
        "rps_series": [[round(s + 0.5 - wall0, 1), n] for s, n in sorted(per_second.items())],
    }


def _python_soak(run: Run) -> dict[str, Any]:
    o = run.options
    host, port = run.server.host_port
    request = _infer_request(run)
    end = time.monotonic() + o.soak_duration_s
    t0 = time.monotonic()
    attempts = run_async(
        closed_loop(
            host,
            port,
            request,
            concurrency=o.soak_concurrency,
            stop=lambda: time.monotonic() >= end,
            timeout=o.client_timeout_s,
        )
    )
    replies = [a for a in attempts if a.outcome == "reply"]
    kinds = Counter(
        "status" if a.outcome == "reply" else a.outcome
        for a in attempts
        if a.outcome != "reply" or not 200 <= a.status < 300
    )
    p50, p99 = _percentiles([a.seconds * 1e3 for a in replies], [50, 99])
    per_second = Counter(int(a.start + a.seconds - t0) for a in replies)
    return {
        "requests": len(replies),
        "duration_s": round(time.monotonic() - t0, 3),
        "statuses": dict(sorted(Counter(str(a.status) for a in replies).items())),
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds),
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": _round(max((a.seconds * 1e3 for a in replies), default=None)),
        "rps_series": [[s + 0.5, n] for s, n in sorted(per_second.items())],
    }


def rss_halves(samples: Sequence[tuple[float, float]], duration: float) -> dict[str, Any]:
    """Mean RSS over the window ending at the first half vs the one ending the run, growth %."""
    window = max(duration / 12, 1.0)

    def mean_until(t_end: float) -> float | None:
        values = [mb for t, mb in samples if t_end - window <= t <= t_end]
        return _round(float(np.mean(values)), 2) if values else None

    first, second = mean_until(duration / 2), mean_until(duration)
    growth = None if first is None or second is None else _round((second - first) / first * 100)
    return {
        "rss_window_s": _round(window),
        "rss_first_half_mib": first,
        "rss_second_half_mib": second,
        "rss_growth_pct": growth,
    }


def scenario_soak(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    run.config.update(
        concurrency=o.soak_concurrency,
        duration_s=o.soak_duration_s,
        load_generator="wrk" if run.use_wrk else "python-asyncio",
    )
    rss_start = run.server.rss_mib()
    with RssSampler(run.server.pid, RSS_SOAK_INTERVAL_S) as rss:
        load = _wrk_soak(run) if run.use_wrk else _python_soak(run)
    series = {"rss_mib": [list(s) for s in rss.samples], "rps": load.pop("rps_series")}
    ok = sum(n for s, n in load["statuses"].items() if s.startswith("2"))
    measured = {
        **load,
        "rps_ok": _round(ok / load["duration_s"], 1) if load["duration_s"] else None,
        "rss_start_mib": _round(rss_start, 2),
        **rss_halves(rss.samples, o.soak_duration_s),
        "rss_max_mib": rss.peak,
    }
    return measured, series


def _infer_request(run: Run, *, close: bool = False) -> bytes:
    host, port = run.server.host_port
    path = urlsplit(run.target.url).path
    return http_request("POST", path, f"{host}:{port}", run.target.body, close=close)


def scenario_overload(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    run.config.update(
        concurrency=o.overload_concurrency,
        duration_s=o.overload_duration_s,
        client_timeout_s=o.client_timeout_s,
        load_generator="python-asyncio",
        retry_after_honoured=False,
    )
    host, port = run.server.host_port
    request = _infer_request(run)
    prober = Prober(
        run.server,
        health_probe(run.server),
        interval=o.probe_interval_ms / 1e3,
        duration=o.overload_duration_s,
    )
    t0 = time.monotonic()
    end = t0 + o.overload_duration_s
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with raised_nofile() as (before, now):
            run.config["client_nofile"] = {"before": before, "raised_to": now}
            attempts = run_async(
                closed_loop(
                    host,
                    port,
                    request,
                    concurrency=o.overload_concurrency,
                    stop=lambda: time.monotonic() >= end,
                    timeout=o.client_timeout_s,
                )
            )
    finally:
        probes = prober.stop()
    elapsed = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    replies = [a for a in attempts if a.outcome == "reply"]
    ok = [a.seconds * 1e3 for a in replies if a.status == 200]
    shed = [a for a in replies if a.status == 503]
    outcomes = Counter(a.outcome for a in attempts if a.outcome != "reply")
    others = sum(1 for a in replies if a.status not in (200, 503))
    p50, p99 = _percentiles(ok, [50, 99])
    measured = {
        "requests": len(attempts),
        "replies": len(replies),
        "duration_s": _round(elapsed),
        "statuses": dict(sorted(Counter(str(a.status) for a in replies).items())),
        "share_503": _round(len(shed) / len(replies), 4) if replies else None,
        "shed_without_retry_after": sum(not a.retry_after for a in shed),
        "client_timeouts": outcomes.get("timeout", 0),
        "socket_errors": dict(outcomes - Counter({"timeout": outcomes.get("timeout", 0)})),
        "other_failures": others + sum(v for k, v in outcomes.items() if k != "timeout"),
        "rps_ok": _round(len(ok) / elapsed, 1),
        "ok_p50_ms": p50,
        "ok_p99_ms": p99,
        "ok_max_ms": _round(max(ok, default=None)),
        "deadline_ms": run.deadline_s * 1e3,
        "ok_over_deadline": sum(v > run.deadline_s * 1e3 for v in ok),
        "client_cpu_cores": _round(client_cpu / elapsed, 2),  # CPU the bench's client took
        **summarize_probes(probes, "health"),
    }
    return measured, {"health_ms": probe_series(probes, t0)}


async def _slow_connections(
    host: str, port: int, *, slots: int, duration: float, interval: float
) -> list[dict[str, Any]]:
    """``slots`` slowloris clients for ``duration`` s. Each opens a connection, sends a request
    line, then one header line per interval until the server closes the connection; at its next
    tick it opens a new one (a slowloris tool keeps its connection count up). One record per
    connection: t_connect_s (since the start) or error, closed_after_s and answer if the server
    closed it."""
    t0 = time.monotonic()
    end = t0 + duration
    start_line = f"GET {LIVE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    records: list[dict[str, Any]] = []

    async def dribble(
        record: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(start_line)
        closed = asyncio.ensure_future(reader.read(65536))  # the server's answer, or EOF
        connected_at = time.monotonic()
        while True:
            wait = min(interval, end - time.monotonic())
            if wait > 0:
                await asyncio.wait({closed}, timeout=wait)
            if closed.done():
                record["closed_after_s"] = round(time.monotonic() - connected_at, 3)
                try:
                    data = closed.result()
                    record["answer"] = data.split(b" ", 2)[1].decode() if data else "eof"
                except (OSError, IndexError, UnicodeDecodeError):
                    record["answer"] = "reset"
                break
            if time.monotonic() >= end:
                closed.cancel()
                break
            record["header_lines"] += 1
            with contextlib.suppress(OSError):
                writer.write(f"X-Slow-{record['header_lines']}: 1\r\n".encode())
        writer.close()

    async def slot() -> None:
        while time.monotonic() < end:
            record: dict[str, Any] = {"t_connect_s": None, "error": None, "header_lines": 0}
            records.append(record)
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as e:
                record["error"] = "client_fds" if getattr(e, "errno", 0) == 24 else type(e).__name__
            else:
                record["t_connect_s"] = round(time.monotonic() - t0, 3)
                await dribble(record, reader, writer)
            await asyncio.sleep(min(interval, max(end - time.monotonic(), 0)))

    await asyncio.gather(*(slot() for _ in range(slots)))
    return records


def scenario_slow(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    host, port = run.server.host_port
    freed_by = run.header_timeout_s + FREED_GRACE_S
    run.config.update(
        clients=o.slow_clients,
        duration_s=o.slow_duration_s,
        interval_s=o.slow_interval_s,
        server_nofile=run.server.nofile,
        freed_by_s=freed_by,
    )
    interval = o.probe_interval_ms / 1e3
    t0 = time.monotonic()
    with raised_nofile() as (before, now):
        run.config["client_nofile"] = {"before": before, "raised_to": now}
        probers = []
        try:
            probers.append(
                Prober(
                    run.server,
                    health_probe(run.server),
                    interval=interval,
                    duration=o.slow_duration_s,
                )
            )
            probers.append(
                Prober(
                    run.server,
                    _infer_request(run, close=True),
                    interval=interval * INFER_PROBE_EVERY,
                    duration=o.slow_duration_s,
                )
            )
            records = run_async(
                _slow_connections(
                    host,
                    port,
                    slots=o.slow_clients,
                    duration=o.slow_duration_s,
                    interval=o.slow_interval_s,
                )
            )
        finally:
            samples = [p.stop() for p in probers]
    health, infer = samples if len(samples) == 2 else ([], [])
    connected = [r for r in records if r["t_connect_s"] is not None]
    closed = [r["closed_after_s"] for r in connected if "closed_after_s" in r]
    # a connection opened less than freed_by before the end cannot show whether it was freed
    judged = [r for r in connected if r["t_connect_s"] + freed_by <= o.slow_duration_s]
    freed = sum(r.get("closed_after_s", math.inf) <= freed_by for r in judged)
    p50, p_max = _percentiles(closed, [50, 100])
    measured = {
        "connections": len(records),
        "connected": len(connected),
        "connect_errors": dict(Counter(r["error"] for r in records if r["error"])),
        "closed_by_server": len(closed),
        "closed_after_s_p50": p50,
        "closed_after_s_max": p_max,
        "answers": dict(Counter(r["answer"] for r in connected if "answer" in r)),
        "judged": len(judged),
        "freed_by_deadline": freed,
        "freed_share": _round(freed / len(judged), 4) if judged else None,
        "open_at_end": len(connected) - len(closed),
        **summarize_probes(health, "health"),
        **summarize_probes(infer, "infer"),
    }
    return measured, {"health_ms": probe_series(health, t0)}


async def _big_header(host: str, port: int, *, size: int, limit: float) -> dict[str, Any]:
    """Stream one header line of ``size`` bytes; stop at the server's answer or close."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    answer = asyncio.ensure_future(reader.read(4096))
    chunk = b"a" * HEADER_CHUNK
    t0 = time.monotonic()
    sent, complete, broken = 0, False, False
    try:
        writer.write(f"GET {LIVE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nX-Big: ".encode())
        while sent < size and not answer.done() and time.monotonic() - t0 < limit:
            part = chunk[: size - sent]
            writer.write(part)
            drain = asyncio.ensure_future(writer.drain())
            await asyncio.wait(
                {drain, answer},
                timeout=limit - (time.monotonic() - t0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not drain.done():
                drain.cancel()
                continue
            drain.result()
            sent += len(part)
        if sent >= size and not answer.done():
            writer.write(b"\r\n\r\n")
            complete = True
    except OSError:
        broken = True  # the server closed or reset the connection while we were sending
    remaining = limit - (time.monotonic() - t0)
    if not answer.done() and remaining > 0:
        await asyncio.wait({answer}, timeout=remaining)
    elapsed = time.monotonic() - t0
    status: str | int | None = None
    if answer.done():
        try:
            data = answer.result()
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else "closed"
        except (OSError, ValueError, IndexError):
            status = "reset"
    else:
        answer.cancel()
    writer.close()
    timed_out = status is None and not broken
    closed_early = status in ("closed", "reset") or broken
    return {
        "status": status,
        "bytes_sent": sent,
        "header_complete": complete,
        "answer_s": _round(elapsed, 4),
        "timed_out": timed_out,
        "refused": bool(
            (isinstance(status, int) and 400 <= status < 500) or (closed_early and not complete)
        ),
    }


def scenario_header(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    size = int(o.header_mb * 1e6)
    run.config.update(
        header_bytes=size, chunk_bytes=HEADER_CHUNK, limit_s=o.header_limit_s, path=LIVE_PATH
    )
    host, port = run.server.host_port
    before = run.server.rss_mib()
    prober = Prober(
        run.server,
        health_probe(run.server),
        interval=o.probe_interval_ms / 1e3,
        duration=o.header_limit_s,
    )
    t0 = time.monotonic()
    try:
        with RssSampler(run.server.pid, RSS_HEADER_INTERVAL_S) as rss:
            outcome = run_async(_big_header(host, port, size=size, limit=o.header_limit_s))
            time.sleep(SETTLE_AFTER_HEADER_S)
    finally:
        probes = prober.stop()
    after = run.server.rss_mib()
    peak = max(v for v in (rss.peak, before, after) if v is not None) if before else None
    measured = {
        **outcome,
        "rss_before_mib": _round(before, 2),
        "rss_peak_mib": _round(peak, 2),
        "rss_after_mib": _round(after, 2),
        "rss_growth_mib": _round(peak - before, 2) if before and peak else None,
        **summarize_probes(probes, "health"),
    }
    return measured, {
        "health_ms": probe_series(probes, t0),
        "rss_mib": [list(s) for s in rss.samples],
    }


def classify_sigterm(attempts: Sequence[Attempt], t_signal: float | None) -> Counter[str]:
    """Outcome classes of the SIGTERM scenario (see the module docstring for the rule)."""
    classes: Counter[str] = Counter()
    for a in attempts:
        after = t_signal is not None and a.start + a.seconds >= t_signal
        if a.outcome == "reply" and 200 <= a.status < 300:
            classes["ok"] += 1
        elif a.outcome == "reply" and a.status == 503 and after:
            classes["shed_503_draining"] += 1
        elif a.outcome == "refused" and after:
            classes["refused_listener_closed"] += 1
        elif a.outcome == "no_response" and a.reused and after:
            classes["closed_idle_keepalive"] += 1
        elif a.outcome == "reply":
            classes[f"failed_status_{a.status}"] += 1
        else:
            classes[f"failed_{a.outcome}"] += 1
    return classes


def scenario_sigterm(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    process = run.server.process
    if process is None:
        raise SoakError(
            "needs a server the bench starts (it would signal a process it did not start)"
        )
    run.config.update(
        concurrency=o.sigterm_concurrency,
        signal_after_s=o.sigterm_after_s,
        drain_limit_s=o.drain_limit_s,
        load_generator="python-asyncio",
    )
    host, port = run.server.host_port
    request = _infer_request(run)
    marks: dict[str, float] = {}

    async def drive() -> list[Attempt]:
        load = asyncio.ensure_future(
            closed_loop(
                host,
                port,
                request,
                concurrency=o.sigterm_concurrency,
                stop=lambda: "exit" in marks or "give_up" in marks,
                timeout=o.client_timeout_s,
            )
        )
        marks["start"] = time.monotonic()
        await asyncio.sleep(o.sigterm_after_s)
        marks["signal"] = time.monotonic()
        process.send_signal(signal.SIGTERM)
        while process.poll() is None and time.monotonic() - marks["signal"] < o.drain_limit_s:
            await asyncio.sleep(0.01)
        marks["exit" if process.poll() is not None else "give_up"] = time.monotonic()
        return await load

    attempts = run_async(drive())
    killed = process.poll() is None
    if killed:
        process.kill()
        process.wait()
    classes = classify_sigterm(attempts, marks["signal"])
    failed = sum(v for k, v in classes.items() if k.startswith("failed_"))
    code = process.returncode
    t_signal = marks["signal"]
    measured = {
        "requests": len(attempts),
        "ok_before_signal": sum(
            1
            for a in attempts
            if a.outcome == "reply" and a.status == 200 and a.start + a.seconds < t_signal
        ),
        "ok_after_signal": sum(
            1
            for a in attempts
            if a.outcome == "reply" and a.status == 200 and a.start + a.seconds >= t_signal
        ),
        "outcomes": dict(sorted(classes.items())),
        "failed_requests": failed,
        "exit_code": code,  # -9 when killed after the drain limit
        "exit_signal": signal.Signals(-code).name if code is not None and code < 0 else None,
        "killed_after_drain_limit": killed,
        "drain_s": None if killed else _round(marks["exit"] - t_signal),
        "listener_closed_after_s": _round(
            min(
                (
                    a.start - t_signal
                    for a in attempts
                    if a.outcome == "refused" and a.start >= t_signal
                ),
                default=None,
            )
        ),
    }
    return measured, {"timeline": sigterm_timeline(attempts, marks["start"], t_signal)}


def sigterm_timeline(attempts: Sequence[Attempt], t0: float, t_signal: float) -> dict[str, Any]:
    """Outcomes per OUTCOME_BIN_S bin (by completion time) for the plot."""
    bins: dict[str, Counter[int]] = {}
    for a in attempts:
        cls = next(iter(classify_sigterm([a], t_signal)))
        kind = "failed" if cls.startswith("failed_") else cls
        bins.setdefault(kind, Counter())[int((a.start + a.seconds - t0) / OUTCOME_BIN_S)] += 1
    last = max((max(c) for c in bins.values() if c), default=0)
    return {
        "bin_s": OUTCOME_BIN_S,
        "signal_s": _round(t_signal - t0),
        **{k: [c.get(i, 0) for i in range(last + 1)] for k, c in sorted(bins.items())},
    }


SCENARIO_RUNNERS: dict[str, Callable[[Run], tuple[dict[str, Any], dict[str, Any]]]] = {
    "soak": scenario_soak,
    "overload": scenario_overload,
    "slow": scenario_slow,
    "header": scenario_header,
    "sigterm": scenario_sigterm,
}


# --------------------------------------------------------------------------------------------
# Options and the driver


def parse_scenarios(text: str | Sequence[str]) -> list[str]:
    """'soak,header' -> ['soak', 'header'] in the suite's order."""
    items = [v.strip() for v in text.split(",")] if isinstance(text, str) else list(text)
    items = [v for v in items if v]
    bad = [v for v in items if v not in SCENARIOS]
    if not items or bad:
        raise SoakError(f"--scenarios: expected some of {','.join(SCENARIOS)} (got {text!r})")
    return [s for s in SCENARIOS if s in items]


def parse_server_env(items: Sequence[str]) -> dict[str, str]:
    """['SMARTMIXED_HEADER_TIMEOUT_S=1'] -> {'SMARTMIXED_HEADER_TIMEOUT_S': '1'}."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not key.replace("_", "").isalnum():
            raise SoakError(f"--server-env {item!r}: expected KEY=VALUE")
        env[key.strip()] = value
    return env


def server_setting(name: str, env: Mapping[str, str]) -> float:
    """A server setting as a started server will see it: env (SMARTMIXED_NAME), else default."""
    from smartmixed.serve.settings import ServeSettings

    value = env.get(f"SMARTMIXED_{name.upper()}")
    if value is None:
        return float(ServeSettings.model_fields[name].default)
    try:
        return float(value)
    except ValueError:
        raise SoakError(f"SMARTMIXED_{name.upper()}={value!r} is not a number") from None


def evaluate(measured: Mapping[str, Any], targets: Mapping[str, tuple[str, Any]]) -> dict:
    ops: dict[str, Callable[[Any, Any], bool]] = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        "==": lambda a, b: a == b,
        ">=": lambda a, b: a >= b,
    }
    return {
        key: None if measured.get(key) is None else bool(ops[op](measured[key], limit))
        for key, (op, limit) in targets.items()
    }


@dataclass
class Source:
    """Where the server comes from: generated | repository (started per scenario) | url."""

    kind: str
    model: str
    repository: Path | None = None
    arch: list[int] | None = None
    url: str | None = None
    pid: int | None = None


def _source(
    *,
    url: str | None,
    pid: int | None,
    repository: Path | str | None,
    model: str | None,
    arch: str | Sequence[int] | None,
    server_env: Mapping[str, str],
) -> Source:
    if url is None:
        if pid is not None:
            raise SoakError("--pid goes with --url (a started server's PID is known)")
        try:
            arch_list = parse_arch(arch) if arch is not None else None
        except SpecError as e:
            raise SoakError(f"--arch: {e}") from None
        if repository is None:
            if model not in (None, GENERATED_MODEL):
                raise SoakError(
                    f"--model {model}: without --repository the bench builds {GENERATED_MODEL!r}"
                )
            return Source("generated", GENERATED_MODEL, arch=arch_list or list(PAPER_ARCH))
        if arch is not None:
            raise SoakError("--arch builds a model; it cannot go with --repository")
        repository, names = pick_models(repository, model and [model], SoakError)
        return Source("repository", names[0], repository=repository)
    if repository is not None or arch is not None or server_env:
        raise SoakError(
            "--url targets a running server: --repository, --arch and --server-env "
            "belong to the server, not the bench"
        )
    if model is None:
        raise SoakError("--url needs --model NAME (the model to send requests to)")
    base = check_url(url)
    if pid is not None and read_rss_mib(pid) is None:
        raise SoakError(f"--pid {pid}: no such process (or /proc/{pid}/status is unreadable)")
    try:
        with httpx.Client(timeout=3.0, trust_env=False) as client:
            ready = client.get(base + HEALTH_PATH).status_code
    except httpx.HTTPError as e:
        raise SoakError(f"--url {url}: not reachable ({type(e).__name__}: {e})") from None
    if ready != 200:
        raise SoakError(f"--url {url}: {HEALTH_PATH} answered {ready}")
    return Source("url", model, url=base, pid=pid)


def measure_soak(
    *,
    scenarios: str | Sequence[str] = SCENARIOS,
    url: str | None = None,
    pid: int | None = None,
    repository: Path | str | None = None,
    model: str | None = None,
    arch: str | Sequence[int] | None = None,
    server_env: Sequence[str] | Mapping[str, str] = (),
    options: SoakOptions | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the chosen scenarios; returns the soak.json record.

    Options are checked before anything starts (SoakError); a scenario that fails is recorded
    in its entry (status "failed", error) and the others still run.
    """
    started = time.perf_counter()
    names = parse_scenarios(scenarios)
    options = options or SoakOptions()
    env = dict(server_env) if isinstance(server_env, Mapping) else parse_server_env(server_env)
    source = _source(
        url=url, pid=pid, repository=repository, model=model, arch=arch, server_env=env
    )
    # what a started server sees: the bench's SMARTMIXED_* variables, then --server-env
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("SMARTMIXED_") and k != "SMARTMIXED_API_KEY"
    }
    effective = inherited | env if source.kind != "url" else {}
    deadline_s = server_setting("request_timeout_s", effective)
    header_timeout_s = server_setting("header_timeout_s", effective)
    use_wrk = _has_wrk()
    results: dict[str, dict[str, Any]] = {}
    command: list[str] | None = None
    load_avg = [os.getloadavg()]
    with (
        tempfile.TemporaryDirectory(prefix="smartmixed-bench-soak-") as tmp,
        tqdm(names, desc="soak scenarios", disable=not progress) as bar,
    ):
        work = Path(tmp)
        repo_dir = source.repository
        if source.kind == "generated":
            repo_dir = work / "models"
            build_repository(repo_dir, arch=source.arch, seed=seed, models=[GENERATED_MODEL])
        if repo_dir is not None:
            command = server_command(repo_dir, 0)  # the port differs per scenario: PORT below
            command[command.index("--port") + 1] = "PORT"
        for name in bar:
            bar.set_postfix_str(name)
            nofile = options.slow_nofile if name == "slow" else None
            results[name] = _run_scenario(
                name,
                source=source,
                repository=repo_dir,
                env=effective,
                nofile=nofile,
                options=options,
                deadline_s=deadline_s,
                header_timeout_s=header_timeout_s,
                work=work,
                use_wrk=use_wrk,
                seed=seed,
            )
    load_avg.append(os.getloadavg())
    return {
        "config": {
            "source": source.kind,
            "model": source.model,
            "arch": source.arch,
            "repository": str(source.repository) if source.repository else None,
            "url": source.url,
            "pid": source.pid,
            "scenarios": names,
            "options": asdict(options),
            "seed": seed,
            "server_env": effective if source.kind != "url" else None,
            "server_settings": {
                "request_timeout_s": deadline_s,
                "header_timeout_s": header_timeout_s,
                "assumed_defaults": source.kind == "url",
            },
            "probe": {
                "path": HEALTH_PATH,
                "interval_ms": options.probe_interval_ms,
                "timeout_s": PROBE_TIMEOUT_S,
                "new_connection_per_probe": True,
            },
            "wrk_version": wrk_version() if use_wrk else None,
        },
        "server_command": command,
        "server_command_shell": shell_command(command, effective, None) if command else None,
        "machine": _machine(load_avg),
        "scenarios": results,
        "summary": {name: _summary(r) for name, r in results.items()},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def _run_scenario(
    name: str,
    *,
    source: Source,
    repository: Path | None,
    env: Mapping[str, str],
    nofile: int | None,
    options: SoakOptions,
    deadline_s: float,
    header_timeout_s: float,
    work: Path,
    use_wrk: bool,
    seed: int,
) -> dict[str, Any]:
    """One scenario on its own server; every failure is recorded, never raised."""
    targets = {key: {"op": op, "limit": limit} for key, (op, limit) in TARGETS[name].items()}
    entry: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "config": {},
        "server": {},
        "measured": {},
        "targets": targets,
        "meets_target": dict.fromkeys(TARGETS[name]),
        "series": {},
    }
    t0 = time.perf_counter()
    server: Server | None = None
    if name == "sigterm" and source.kind == "url":
        entry.update(
            status="skipped",
            error="needs a server the bench starts (it would signal a process it did not start)",
        )
        return entry
    try:
        with contextlib.ExitStack() as stack:
            if source.kind == "url":
                server = Server(
                    url=source.url,
                    pid=source.pid,
                    nofile=read_nofile(source.pid) if source.pid else None,
                )
            else:
                assert repository is not None
                log_path = work / f"server-{name}.log"
                server = stack.enter_context(
                    started_server(repository, env=env, nofile=nofile, log_path=log_path)
                )
                entry["server"]["command_shell"] = shell_command(server.process.args, env, nofile)
            entry["server"].update(pid=server.pid, nofile=server.nofile)
            target = prepare_target(server.url, source.model, seed=seed, batching=None)
            run = Run(
                server=server,
                target=target,
                options=options,
                deadline_s=deadline_s,
                header_timeout_s=header_timeout_s,
                work=work,
                use_wrk=use_wrk,
                config=entry["config"],
            )
            measured, series = SCENARIO_RUNNERS[name](run)
            if name != "sigterm":
                measured["server_alive"] = server.alive()
            entry["measured"], entry["series"] = measured, series
            entry["meets_target"] = evaluate(measured, TARGETS[name])
            entry["server"]["log"] = server.log_counts()
    except Exception as e:  # recorded, not raised: a scenario that breaks the server is a finding
        entry.update(status="failed", error=f"{type(e).__name__}: {e}")
        if server is not None:
            if server.process is not None and server.process.poll() is not None:
                entry["server"]["exit_code"] = server.process.returncode
            entry["server"]["log"] = server.log_counts()
            entry["server"]["log_tail"] = server.log_tail()
    entry["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return entry


def _summary(entry: Mapping[str, Any]) -> dict[str, Any]:
    met = entry["meets_target"].values()
    return {
        "status": entry["status"],
        "met": sum(v is True for v in met),
        "missed": sum(v is False for v in met),
        "of": len(entry["meets_target"]),
    }


def _has_wrk() -> bool:
    return shutil.which("wrk") is not None


def _machine(load_avg: Sequence[tuple[float, float, float]]) -> dict[str, Any]:
    import platform

    import onnxruntime
    import uvicorn

    return {
        **machine_info(),
        "onnxruntime": onnxruntime.__version__,
        "uvicorn": uvicorn.__version__,
        "kernel": platform.release(),
        "load_avg_start_end": [[round(v, 2) for v in la] for la in load_avg],
    }


# --------------------------------------------------------------------------------------------
# Outputs


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return str(value)


def render_markdown(result: Mapping[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    s = c["server_settings"]
    lines = [
        "# Reliability: soak, overload, slow clients, a huge header, SIGTERM",
        "",
        f"Server: `{result['server_command_shell'] or c['url']}` (a fresh one per scenario; "
        f"PORT is a free port). Model {c['model']!r}, deadline {s['request_timeout_s']:g} s, "
        f"header timeout {s['header_timeout_s']:g} s.",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, uvicorn {m['uvicorn']}; load average at start / end "
        f"{m['load_avg_start_end'][0][0]} / {m['load_avg_start_end'][1][0]}. "
        f"Suite took {result['elapsed_s']} s.",
        "",
        "| scenario | status | targets met | missed |",
        "|---|---|---|---|",
    ]
    for name, row in result["summary"].items():
        lines.append(
            f"| {name} | {row['status']} | {row['met']} of {row['of']} | {row['missed']} |"
        )
    for name, entry in result["scenarios"].items():
        config = ", ".join(
            f"{k} {_fmt(v)}" for k, v in entry["config"].items() if k != "load_command"
        )
        lines += ["", f"## {name}", ""]
        if config:
            lines += [f"Ran with: {config}.", ""]
        if entry["status"] != "ok":
            lines += [f"**{entry['status']}**: {entry['error']}", ""]
            tail = entry["server"].get("log_tail")
            if tail:
                lines += ["```", tail[-600:], "```", ""]
            continue
        lines += ["| measured | value | target | met |", "|---|---|---|---|"]
        for key, value in entry["measured"].items():
            t = entry["targets"].get(key)
            met = entry["meets_target"].get(key)
            limit = f"{t['op']} {_fmt(t['limit'])}" if t else ""
            verdict = "" if t is None else "-" if met is None else "yes" if met else "NO"
            lines.append(f"| {key} | {_fmt(value)} | {limit} | {verdict} |")
    lines += [
        "",
        "Health probes open a new connection each (as the kubelet does); a failed probe counts "
        f"as {PROBE_TIMEOUT_S:g} s in the percentiles. RSS is VmRSS in MiB. Targets are reported, "
        "never asserted.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = result["scenarios"]
    fig, (ax_rss, ax_health, ax_term) = plt.subplots(1, 3, figsize=(15, 4))
    soak = scenarios.get("soak", {}).get("series", {})
    if soak.get("rss_mib"):
        t, mb = zip(*soak["rss_mib"])
        ax_rss.plot(t, mb, color="C0")
        ax_rps = ax_rss.twinx()
        if soak.get("rps"):
            ts, n = zip(*soak["rps"])
            ax_rps.plot(ts, n, color="C1", alpha=0.5, lw=0.8)
        ax_rps.set_ylabel("responses/s", color="C1")
    ax_rss.set_ylabel("RSS (MiB)", color="C0")
    ax_rss.set_title("soak: server RSS (MiB) and responses/s", fontsize=9)
    ax_rss.set_xlabel("s")
    for i, name in enumerate(("overload", "slow", "header")):
        series = scenarios.get(name, {}).get("series", {}).get("health_ms") or []
        ok = [(t, ms) for t, ms, status in series if status == 200]
        bad = [(t, PROBE_TIMEOUT_S * 1e3) for t, _, status in series if status != 200]
        if ok:
            ax_health.plot(*zip(*ok), ".", ms=3, color=f"C{i}", label=name)
        if bad:
            ax_health.plot(*zip(*bad), "x", color=f"C{i}", label=f"{name}: failed")
    ax_health.axhline(100, color="k", lw=0.8, ls="--", label="target 100 ms")
    ax_health.set_yscale("log")
    ax_health.set_title("health probe latency (ms), new connection each", fontsize=9)
    ax_health.set_xlabel("s since the scenario's start")
    ax_health.legend(fontsize=7)
    timeline = scenarios.get("sigterm", {}).get("series", {}).get("timeline")
    if timeline:
        width = timeline["bin_s"]
        for kind, counts in timeline.items():
            if isinstance(counts, list):
                ax_term.plot([i * width for i in range(len(counts))], counts, label=kind)
        ax_term.axvline(timeline["signal_s"], color="k", lw=0.8, ls="--", label="SIGTERM")
        ax_term.legend(fontsize=7)
    ax_term.set_title(f"SIGTERM under load: outcomes per {OUTCOME_BIN_S:g} s", fontsize=9)
    ax_term.set_xlabel("s")
    for ax in (ax_rss, ax_health, ax_term):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """DIR/soak.{json,md,png}, each written atomically."""
    return common.write_outputs(result, out, "soak", render=render_markdown, draw=plot)
