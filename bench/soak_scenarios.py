"""The soak suite's first five scenarios: what each does to the server, its options (with those
of the wire attacks, bench/soak_wire.py) and its targets.

Each scenario takes a ``Run`` (the server, the model's request, the options, the server's
deadlines) and returns (measured, series); the driver (bench/soak.py) adds whether the
``TARGETS`` were met (``evaluate``).

- **soak**: C keep-alive connections (default 64) send single-sample V2 JSON infer requests back
  to back for D s (default 60), from ``wrk`` (one thread, a Lua ``response()`` hook counts
  statuses and responses per second) or, without wrk, ``soak_clients.closed_loop``. Errors are
  non-2xx answers plus socket errors (connect, read, write, timeout). The server's RSS (VmRSS of
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
  The server's open-file limit is ``overload_nofile`` (1024: its connection cap, 960, is under
  the clients, who take every place the server has) and it serves health and metrics on a
  metrics port too (a free port as SMARTMIXED_METRICS_PORT, unless set). Liveness and
  readiness are probed in turn on fresh connections on both ports (one prober per port);
  targets: p99 <= 100 ms and max <= 500 ms on each (``metrics_port_health_*``: the metrics
  port; not measured when the server has none).
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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import resource
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from smartmixed.bench.load import WRK_MARKER, WRK_SUMMARY, lua_long_string, parse_wrk_output
from smartmixed.bench.server import Target
from smartmixed.bench.soak_clients import (
    CONNECT_TIMEOUT_S,
    Attempt,
    Prober,
    closed_loop,
    health_probe,
    http_request,
    percentile_values,
    probe_series,
    rounded,
    run_async,
    summarize_probes,
)
from smartmixed.bench.soak_server import (
    HEALTH_PATH,
    LIVE_PATH,
    RssSampler,
    Server,
    SoakError,
    raised_nofile,
)

SCENARIOS = ("soak", "overload", "slow", "header", "sigterm")
INFER_PROBE_EVERY = 4  # slow clients: one infer request per 4 health-probe intervals
HEADER_CHUNK = 64 * 1024
FREED_GRACE_S = 2.0  # a slow connection is freed when closed by header timeout + this
RSS_SOAK_INTERVAL_S = 1.0
RSS_HEADER_INTERVAL_S = 0.05
SETTLE_AFTER_HEADER_S = 1.0
STATUS_MARKER = "SMARTMIXED-WRK-STATUS "
OUTCOME_BIN_S = 0.1  # sigterm timeline bins
HEALTH_P99_TARGET_MS = 100.0  # overload, slow: p99 of the health probes (the plot's line)
HEALTH_MAX_TARGET_MS = 500.0  # overload: the slowest health probe, on each port
# Targets (issue F): measured key -> (op, limit), op one of "<", "<=", "==", ">="; a value not
# measured evaluates to None. ZERO: a count that must stay 0; ALIVE: the server still answers.
ZERO, ALIVE = ("<=", 0), ("==", True)
TARGETS: dict[str, dict[str, tuple[str, Any]]] = {
    "soak": {"errors": ZERO, "rss_growth_pct": ("<", 5.0), "server_alive": ALIVE},
    "overload": {
        "health_p99_ms": ("<=", HEALTH_P99_TARGET_MS),
        "health_max_ms": ("<=", HEALTH_MAX_TARGET_MS),
        "metrics_port_health_p99_ms": ("<=", HEALTH_P99_TARGET_MS),
        "metrics_port_health_max_ms": ("<=", HEALTH_MAX_TARGET_MS),
        "ok_over_deadline": ZERO,
        "client_timeouts": ZERO,
        "other_failures": ZERO,
        "shed_without_retry_after": ZERO,
        "server_alive": ALIVE,
    },
    "slow": {
        "health_p99_ms": ("<=", HEALTH_P99_TARGET_MS),
        "health_failures": ZERO,
        "infer_failures": ZERO,
        "freed_share": (">=", 1.0),
        "server_alive": ALIVE,
    },
    "header": {
        "refused": ("==", True),
        "answer_s": ("<=", 1.0),
        "rss_growth_mib": ("<", 20.0),
        "server_alive": ALIVE,
    },
    "sigterm": {"failed_requests": ZERO, "exit_code": ("==", 0)},
}


@dataclass(frozen=True)
class SoakOptions:
    """Durations and counts of the scenarios (defaults: the issue's; small values for tests)."""

    soak_duration_s: int = 60
    soak_concurrency: int = 64
    overload_duration_s: int = 20
    overload_concurrency: int = 1024
    overload_nofile: int = 1024  # the server's open-file limit: its cap (960) is below the clients
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
    # the wire attacks (bench/soak_wire.py)
    wire_nofile: int = 320  # the server's open-file limit: its default cap is this minus 64
    wire_overcommit: float = 2.0
    wire_duration_s: float = 10.0
    readers_requests: int = 450
    readers_rcvbuf: int = 4096
    sigterm_readers: int = 16
    pipelined_connections: int = 4
    pipelined_requests: int = 12
    pipelined_rows: int = 1024
    unsent_id_mb: float = 5.0
    bodies_clients: int = 16
    bodies_mib: float = 16.0
    bodies_send_s: float = 8.0

    def __post_init__(self) -> None:
        bad = [f.name for f in fields(self) if not getattr(self, f.name) > 0]
        if bad:
            raise SoakError(f"{', '.join(bad)} must be > 0")
        for name in ("slow_nofile", "overload_nofile"):
            if getattr(self, name) < 64:
                raise SoakError(f"{name} must be >= 64 (the server needs a few files to start)")
        if self.wire_nofile < 80:
            raise SoakError(
                "wire_nofile must be >= 80 (the server keeps 64 descriptors free under its "
                "open-file limit; a cap of 16 needs 16 more)"
            )


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
    connection_cap: int | None = None  # the server's, when the bench started it
    metrics_port: int | None = None  # the started server's metrics port, when it has one
    settings: dict[str, float] = field(default_factory=dict)  # other server settings it reads

    def started_process(self) -> subprocess.Popen:
        """The server's process, for the scenarios that signal it: only one the bench started."""
        if self.server.process is None:
            raise SoakError(NOT_STARTED_HERE)
        return self.server.process


NOT_STARTED_HERE = "needs a server the bench starts (it would signal a process it did not start)"

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
        "p50_ms": rounded(raw["p50_ms"]),
        "p99_ms": rounded(raw["p99_ms"]),
        "max_ms": rounded(raw["max_ms"]),
        # wrk's buckets are whole wall-clock seconds: plotted at their middle
        "rps_series": [[round(s + 0.5 - wall0, 1), n] for s, n in sorted(per_second.items())],
    }


def _python_soak(run: Run) -> dict[str, Any]:
    o = run.options
    t0 = time.monotonic()
    attempts = _infer_load(run, concurrency=o.soak_concurrency, seconds=o.soak_duration_s)
    replies = [a for a in attempts if a.outcome == "reply"]
    kinds = Counter(
        "status" if a.outcome == "reply" else a.outcome
        for a in attempts
        if a.outcome != "reply" or not 200 <= a.status < 300
    )
    p50, p99 = percentile_values([a.seconds * 1e3 for a in replies], [50, 99])
    per_second = Counter(int(a.start + a.seconds - t0) for a in replies)
    return {
        "requests": len(replies),
        "duration_s": round(time.monotonic() - t0, 3),
        "statuses": dict(sorted(Counter(str(a.status) for a in replies).items())),
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds),
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": rounded(max((a.seconds * 1e3 for a in replies), default=None)),
        "rps_series": [[s + 0.5, n] for s, n in sorted(per_second.items())],
    }


def rss_halves(samples: Sequence[tuple[float, float]], duration: float) -> dict[str, Any]:
    """Mean RSS over the window ending at the first half vs the one ending the run, growth %."""
    window = max(duration / 12, 1.0)

    def mean_until(t_end: float) -> float | None:
        values = [mb for t, mb in samples if t_end - window <= t <= t_end]
        return rounded(float(np.mean(values)), 2) if values else None

    first, second = mean_until(duration / 2), mean_until(duration)
    growth = None if first is None or second is None else rounded((second - first) / first * 100)
    return {
        "rss_window_s": rounded(window),
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
        "rps_ok": rounded(ok / load["duration_s"], 1) if load["duration_s"] else None,
        "rss_start_mib": rounded(rss_start, 2),
        **rss_halves(rss.samples, o.soak_duration_s),
        "rss_max_mib": rss.peak,
    }
    return measured, series


def _infer_request(run: Run, *, close: bool = False) -> bytes:
    host, port = run.server.host_port
    path = urlsplit(run.target.url).path
    return http_request("POST", path, f"{host}:{port}", run.target.body, close=close)


def _health_prober(run: Run, *, duration: float) -> Prober:
    """Readiness probes for ``duration`` s, a new connection every ``probe_interval_ms``."""
    interval = run.options.probe_interval_ms / 1e3
    return Prober(run.server, health_probe(run.server), interval=interval, duration=duration)


def _live_ready_prober(run: Run, *, duration: float, port: int | None = None) -> Prober:
    """Liveness and readiness probes in turn on ``port`` (default the server's), a new
    connection every ``probe_interval_ms``."""
    requests = [health_probe(run.server, path=p, port=port) for p in (LIVE_PATH, HEALTH_PATH)]
    interval = run.options.probe_interval_ms / 1e3
    return Prober(run.server, requests, interval=interval, duration=duration, port=port)


def _infer_load(run: Run, *, concurrency: int, seconds: float) -> list[Attempt]:
    """``concurrency`` closed-loop keep-alive clients sending the model's infer request for
    ``seconds`` (soak without wrk, overload)."""
    host, port = run.server.host_port
    end = time.monotonic() + seconds
    return run_async(
        closed_loop(
            host,
            port,
            _infer_request(run),
            concurrency=concurrency,
            stop=lambda: time.monotonic() >= end,
            timeout=run.options.client_timeout_s,
        )
    )


def scenario_overload(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    run.config.update(
        concurrency=o.overload_concurrency,
        duration_s=o.overload_duration_s,
        client_timeout_s=o.client_timeout_s,
        load_generator="python-asyncio",
        retry_after_honoured=False,
        server_nofile=run.server.nofile,
        connection_cap=run.connection_cap,
        probes=f"{LIVE_PATH} and {HEALTH_PATH} in turn, a new connection each",
        metrics_port=run.metrics_port,
    )
    probers = [_live_ready_prober(run, duration=o.overload_duration_s)]
    if run.metrics_port:
        probers.append(
            _live_ready_prober(run, duration=o.overload_duration_s, port=run.metrics_port)
        )
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with raised_nofile() as (before, now):
            run.config["client_nofile"] = {"before": before, "raised_to": now}
            attempts = _infer_load(
                run, concurrency=o.overload_concurrency, seconds=o.overload_duration_s
            )
    finally:
        samples = [p.stop() for p in probers]
    probes, metrics_probes = samples[0], samples[1] if len(samples) > 1 else None
    elapsed = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    replies = [a for a in attempts if a.outcome == "reply"]
    ok = [a.seconds * 1e3 for a in replies if a.status == 200]
    shed = [a for a in replies if a.status == 503]
    outcomes = Counter(a.outcome for a in attempts if a.outcome != "reply")
    others = sum(1 for a in replies if a.status not in (200, 503))
    p50, p99 = percentile_values(ok, [50, 99])
    measured = {
        "requests": len(attempts),
        "replies": len(replies),
        "duration_s": rounded(elapsed),
        "statuses": dict(sorted(Counter(str(a.status) for a in replies).items())),
        "share_503": rounded(len(shed) / len(replies), 4) if replies else None,
        "shed_without_retry_after": sum(not a.retry_after for a in shed),
        "client_timeouts": outcomes.get("timeout", 0),
        "socket_errors": dict(outcomes - Counter({"timeout": outcomes.get("timeout", 0)})),
        "other_failures": others + sum(v for k, v in outcomes.items() if k != "timeout"),
        "rps_ok": rounded(len(ok) / elapsed, 1),
        "ok_p50_ms": p50,
        "ok_p99_ms": p99,
        "ok_max_ms": rounded(max(ok, default=None)),
        "deadline_ms": run.deadline_s * 1e3,
        "ok_over_deadline": sum(v > run.deadline_s * 1e3 for v in ok),
        "client_cpu_cores": rounded(client_cpu / elapsed, 2),  # CPU the bench's client took
        **summarize_probes(probes, "health"),
    }
    series = {"health_ms": probe_series(probes, t0)}
    if metrics_probes is not None:
        measured.update(summarize_probes(metrics_probes, "metrics_port_health"))
        series["metrics_port_health_ms"] = probe_series(metrics_probes, t0)
    return measured, series


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
            probers.append(_health_prober(run, duration=o.slow_duration_s))
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
    p50, p_max = percentile_values(closed, [50, 100])
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
        "freed_share": rounded(freed / len(judged), 4) if judged else None,
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
        "answer_s": rounded(elapsed, 4),
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
    prober = _health_prober(run, duration=o.header_limit_s)
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
        "rss_before_mib": rounded(before, 2),
        "rss_peak_mib": rounded(peak, 2),
        "rss_after_mib": rounded(after, 2),
        "rss_growth_mib": rounded(peak - before, 2) if before and peak else None,
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
    process = run.started_process()
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
        "drain_s": None if killed else rounded(marks["exit"] - t_signal),
        "listener_closed_after_s": rounded(
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
        "signal_s": rounded(t_signal - t0),
        **{k: [c.get(i, 0) for i in range(last + 1)] for k, c in sorted(bins.items())},
    }


SCENARIO_RUNNERS: dict[str, Callable[[Run], tuple[dict[str, Any], dict[str, Any]]]] = {
    "soak": scenario_soak,
    "overload": scenario_overload,
    "slow": scenario_slow,
    "header": scenario_header,
    "sigterm": scenario_sigterm,
}
