"""The soak suite's wire attacks: clients that misuse the connection itself, and their targets.

Each runs on a fresh server whose open-file limit is ``wire_nofile`` (default 320), once per
connection cap of ``--wire-caps`` (default: the server's own cap, which that limit lowers from
max_connections 2048 to 320 - 64 = 256, and a cap of 16 set with SMARTMIXED_MAX_CONNECTIONS=16);
a row is named SCENARIO for the server's own cap and SCENARIO@capN otherwise. "Connections
per cap" below is ``wire_overcommit`` (default 2) times the row's cap, rounded up: 512 at 256,
32 at 16. All traffic is on 127.0.0.1; every attack lasts ``wire_duration_s`` (default 10 s)
or less and closes its sockets.

- **slow-readers**: connections per cap, each with a ``readers_rcvbuf`` (4 KB) receive buffer
  set before connect, sending ``readers_requests`` (450) pipelined ``GET /openapi.json`` (no
  key needed) and never reading; held for the duration, then closed (the kernel resets a
  socket closed with unread data). Counts what the server closed, tracebacks it logged after the
  close.
- **slow-readers-sigterm**: ``sigterm_readers`` (16) such readers, SIGTERM after
  ``sigterm_after_s`` (5 s); the exit code and the time from the signal to the exit, against
  the server's drain time (serve/cli.py's GRACEFUL_SHUTDOWN_S); killed after ``drain_limit_s``.
  16 fit under every cap, and the server has filled every one of them well before the signal
  (about 350 answers fill what the kernel buffers of an unread connection, ~3 MB); with the
  512 of the default cap most would still be taking answers at the signal, which tests little.
- **pipelined-header**: ``pipelined_connections`` (4) clients each send ``pipelined_requests``
  (12) pipelined V2 JSON infer requests of ``pipelined_rows`` (1,024) rows, then a request line
  and an endless ``X-Pad:`` header in 64 KiB chunks until the server closes the connection or
  the duration ends. The client reads every answer but the last, whose request carries an
  ``id`` of ``unsent_id_mb`` (5 MB) that the answer echoes: larger than the socket buffers, so
  that answer stays in progress while the header streams. What the server took of the header
  per connection is estimated from the socket queues (written to the kernel, minus what the
  client's socket and the server's socket still hold: /proc/net/tcp, every 0.2 s).
- **unsent-close**: connections per cap, opened evenly over the first half of the duration,
  each with a 4 KB receive buffer, sending one V2 infer request whose ``id`` of
  ``unsent_id_mb`` (5 MB: more than the ~3 MB the kernel's buffers take of an unread answer)
  the answer echoes, never reading, and half-closing (shutdown SHUT_WR) once the answer starts
  to arrive; held to the end, then closed. The server's open descriptors (/proc/PID/fd) and
  its connections are sampled throughout.
- **slow-bodies**: ``bodies_clients`` (16) clients on each route that reads a body
  (POST /v2/repository/index, /v2/models/M/infer, /v1/models/M:predict), all at once, each
  uploading a valid body padded with spaces to ``bodies_mib`` (16 MiB, at most the server's
  max_request_bytes) in 64 KiB chunks paced evenly over ``bodies_send_s`` (8 s, inside the
  server's 15 s body timeout), then reading the answer.

During every attack but the SIGTERM one the health prober of bench/soak_scenarios.py runs (a
new connection every 50 ms for GET /v2/health/ready) and the server's RSS, descriptors and
connections are sampled every 0.1 s. Growths compare the peak with the sample taken just before
the attack. Targets (reported, never asserted): health p99 <= 100 ms and no failed probe, RSS
growth < 100 MiB, no traceback in the server's log, the server alive after; slow-readers-sigterm
exits 0 before its drain time runs out; pipelined-header: at most 1 MiB of header taken per
connection (the server's 16 KiB header limit plus a few socket reads); unsent-close: open
descriptors at most the cap + 8 over the count before the attack (the prober's connection and
newcomers being refused); slow-bodies: no 5xx but 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from smartmixed.bench.soak_clients import (
    SERVER_OPEN_STATES,
    Prober,
    Upload,
    close_sockets,
    health_probe,
    http_request,
    open_slow_readers,
    pipelined_header,
    probe_series,
    rounded,
    slow_uploads,
    summarize_probes,
    tcp_state,
    unsent_close,
)
from smartmixed.bench.soak_scenarios import ALIVE, HEALTH_P99_TARGET_MS, ZERO, Run
from smartmixed.bench.soak_server import LIVE_PATH, ServerSampler, SoakError, raised_nofile

WIRE_SCENARIOS = (
    "slow-readers",
    "slow-readers-sigterm",
    "pipelined-header",
    "unsent-close",
    "slow-bodies",
)
OPENAPI_PATH = "/openapi.json"
INDEX_PATH = "/v2/repository/index"
SAMPLE_S = 0.1  # server RSS, descriptors and connections
SETTLE_S = 1.0  # after closing the attackers: what the server logs, what it frees
RSS_GROWTH_TARGET_MIB = 100.0
PAD_TARGET_MIB = 1.0  # header taken per connection: the 16 KiB limit plus a few socket reads
FD_SLACK = 8  # descriptors over the cap: the prober's connection, newcomers being refused
HEALTH = {"health_p99_ms": ("<=", HEALTH_P99_TARGET_MS), "health_failures": ZERO}
RSS = {"rss_growth_mib": ("<", RSS_GROWTH_TARGET_MIB)}
WIRE_TARGETS: dict[str, dict[str, tuple[str, Any]]] = {
    "slow-readers": {
        **HEALTH,
        **RSS,
        "tracebacks_on_close": ZERO,
        "tracebacks": ZERO,
        "server_alive": ALIVE,
    },
    "slow-readers-sigterm": {
        "exit_code": ("==", 0),
        "exited_within_drain": ("==", True),
        "tracebacks": ZERO,
    },
    "pipelined-header": {
        **HEALTH,
        **RSS,
        "pad_accepted_mib_max": ("<=", PAD_TARGET_MIB),
        "tracebacks": ZERO,
        "server_alive": ALIVE,
    },
    "unsent-close": {
        **HEALTH,
        **RSS,
        "fd_over_cap": ("<=", FD_SLACK),
        "tracebacks": ZERO,
        "server_alive": ALIVE,
    },
    "slow-bodies": {
        **HEALTH,
        **RSS,
        "server_errors": ZERO,
        "tracebacks": ZERO,
        "server_alive": ALIVE,
    },
}


def row_name(scenario: str, cap: int | None) -> str:
    """'slow-readers' at the server's own cap, 'slow-readers@cap16' at a cap of 16."""
    return scenario if cap is None else f"{scenario}@cap{cap}"


def scenario_of(row: str) -> str:
    return row.split("@", 1)[0]


def attack_connections(run: Run) -> int:
    """Connections per cap: ``wire_overcommit`` x the server's connection cap, rounded up."""
    if run.connection_cap is None:
        raise SoakError("the server's connection cap is unknown (its open-file limit is not set)")
    return math.ceil(run.connection_cap * run.options.wire_overcommit)


class Watch:
    """The health prober and the server sampler around an attack; ``measures()`` after it."""

    def __init__(self, run: Run, *, duration: float) -> None:
        self.run = run
        self.rss_before = run.server.rss_mib()
        self.fd_before = run.server.fd_count()
        self.tracebacks_before = run.server.tracebacks()
        self.t0 = time.monotonic()
        self.sampler = ServerSampler(run.server, SAMPLE_S)
        interval = run.options.probe_interval_ms / 1e3
        self.prober = Prober(
            run.server, health_probe(run.server), interval=interval, duration=duration
        )
        self.probes: list[list[Any]] | None = None

    def stop_probes(self) -> None:
        if self.probes is None:
            self.probes = self.prober.stop()

    def tracebacks(self) -> int | None:
        return _since(self.run.server.tracebacks(), self.tracebacks_before)

    def measures(self) -> dict[str, Any]:
        """Health, RSS, descriptors and connections during the attack, tracebacks since."""
        rss_peak = self.sampler.peak(1)
        peak = max((v for v in (rss_peak, self.rss_before) if v is not None), default=None)
        fd_peak = self.sampler.peak(2)
        return {
            **summarize_probes(self.probes or [], "health"),
            "rss_before_mib": rounded(self.rss_before, 2),
            "rss_peak_mib": rounded(peak, 2),
            "rss_growth_mib": rounded(peak - self.rss_before, 2)
            if peak is not None and self.rss_before is not None
            else None,
            "fd_before": self.fd_before,
            "fd_peak": fd_peak,
            "connections_peak": self.sampler.peak(3),
            "tracebacks": self.tracebacks(),
        }

    def series(self) -> dict[str, Any]:
        return {
            "health_ms": probe_series(self.probes or [], self.t0),
            "server": [list(s) for s in self.sampler.samples],  # [s, rss MiB, fds, connections]
        }


@contextlib.contextmanager
def watched(run: Run, *, duration: float) -> Iterator[Watch]:
    """Probes and samples while the block runs (the prober is stopped at its end at the latest)."""
    watch = Watch(run, duration=duration)
    try:
        with raised_nofile(), watch.sampler:
            yield watch
    finally:
        watch.stop_probes()


def _since(now: int | None, before: int | None) -> int | None:
    return None if now is None or before is None else now - before


def _config(run: Run, **values: Any) -> None:
    run.config.update(
        connection_cap=run.connection_cap,
        server_nofile=run.server.nofile,
        duration_s=run.options.wire_duration_s,
        **values,
    )


def _sleep_until(t: float) -> None:
    time.sleep(max(t - time.monotonic(), 0))


def _open_readers(run: Run, n: int) -> tuple[list, Counter[str]]:
    host, port = run.server.host_port
    request = http_request("GET", OPENAPI_PATH, f"{host}:{port}")
    return asyncio.run(
        open_slow_readers(
            host,
            port,
            connections=n,
            payload=request * run.options.readers_requests,
            rcvbuf=run.options.readers_rcvbuf,
        )
    )


def _states(socks: list) -> dict[str, int]:
    """Held connections: still open on the server's side, or closed by it."""
    states = Counter(tcp_state(s) for s in socks)
    still = sum(v for k, v in states.items() if k in SERVER_OPEN_STATES)
    return {"still_open": still, "closed_by_server": sum(states.values()) - still}


def scenario_slow_readers(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    n = attack_connections(run)
    _config(
        run,
        connections=n,
        requests_per_connection=o.readers_requests,
        path=OPENAPI_PATH,
        rcvbuf=o.readers_rcvbuf,
    )
    socks: list = []
    with watched(run, duration=o.wire_duration_s) as watch:
        try:
            socks, errors = _open_readers(run, n)
            _sleep_until(watch.t0 + o.wire_duration_s)
            watch.stop_probes()
            states = _states(socks)
            before_close = run.server.tracebacks()
        finally:
            close_sockets(socks)
        time.sleep(SETTLE_S)
    after = run.server.tracebacks()
    measured = {
        "connections": n,
        "connected": len(socks),
        "connect_errors": dict(errors),
        **states,
        **watch.measures(),
        "tracebacks_on_close": _since(after, before_close),
    }
    return measured, watch.series()


def scenario_slow_readers_sigterm(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    from smartmixed.serve.cli import GRACEFUL_SHUTDOWN_S

    o = run.options
    process = run.started_process()
    n = o.sigterm_readers
    _config(
        run,
        connections=n,
        requests_per_connection=o.readers_requests,
        signal_after_s=o.sigterm_after_s,
        drain_limit_s=o.drain_limit_s,
        graceful_shutdown_s=GRACEFUL_SHUTDOWN_S,
    )
    tracebacks_before = run.server.tracebacks()
    socks: list = []
    with raised_nofile():
        try:
            t0 = time.monotonic()
            socks, errors = _open_readers(run, n)
            _sleep_until(t0 + o.sigterm_after_s)
            t_signal = time.monotonic()
            process.send_signal(signal.SIGTERM)
            while process.poll() is None and time.monotonic() - t_signal < o.drain_limit_s:
                time.sleep(0.01)
            t_exit = time.monotonic()
            killed = process.poll() is None
            if killed:
                process.kill()
                process.wait()
        finally:
            close_sockets(socks)
    code = process.returncode
    drain = None if killed else rounded(t_exit - t_signal)
    after = run.server.tracebacks()
    measured = {
        "connections": n,
        "connected": len(socks),
        "connect_errors": dict(errors),
        "exit_code": code,  # -9 when killed after the drain limit
        "exit_signal": signal.Signals(-code).name if code is not None and code < 0 else None,
        "killed_after_drain_limit": killed,
        "drain_s": drain,
        "graceful_shutdown_s": GRACEFUL_SHUTDOWN_S,
        "exited_within_drain": drain is not None and drain < GRACEFUL_SHUTDOWN_S,
        "tracebacks": _since(after, tracebacks_before),
    }
    return measured, {}


def _rows_body(run: Run, rows: int, **extra: Any) -> bytes:
    """The model's V2 JSON request with ``rows`` copies of its row (and ``extra`` fields)."""
    body = json.loads(run.target.body)
    tensor = body["inputs"][0]
    tensor["shape"] = [rows, run.target.n_features]
    tensor["data"] = tensor["data"] * rows
    return json.dumps({**extra, **body}, separators=(",", ":")).encode()


def scenario_pipelined_header(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    host, port = run.server.host_port
    path = urlsplit(run.target.url).path
    hostname = f"{host}:{port}"
    request = http_request("POST", path, hostname, _rows_body(run, o.pipelined_rows))
    id_bytes = int(o.unsent_id_mb * 1e6)
    last = http_request(
        "POST", path, hostname, _rows_body(run, o.pipelined_rows, id="x" * id_bytes)
    )
    requests = request * (o.pipelined_requests - 1) + last
    header_start = f"GET {LIVE_PATH} HTTP/1.1\r\nHost: {hostname}\r\nX-Pad: ".encode()
    _config(
        run,
        connections=o.pipelined_connections,
        pipelined_requests=o.pipelined_requests,
        rows=o.pipelined_rows,
        request_bytes=len(request),
        last_id_bytes=id_bytes,
    )
    with watched(run, duration=o.wire_duration_s) as watch:
        records = asyncio.run(
            pipelined_header(
                host,
                port,
                connections=o.pipelined_connections,
                requests=requests,
                read_answers=o.pipelined_requests - 1,
                header_start=header_start,
                duration=o.wire_duration_s,
            )
        )
        watch.stop_probes()
        time.sleep(SETTLE_S)
    mib = 2**20
    connected = [r for r in records if r["error"] is None]
    answers: Counter[str] = Counter()
    for r in connected:
        answers.update({str(k): v for k, v in r["answers"].items()})
    accepted = [rounded(r["pad_accepted"] / mib, 3) for r in connected]
    measured = {
        "connections": len(records),
        "connect_errors": dict(Counter(r["error"] for r in records if r["error"])),
        "answers": dict(sorted(answers.items())),
        "closed_by_server": sum(r["closed_by_server"] for r in connected),
        "pad_s_max": rounded(max((r["pad_s"] for r in connected), default=None)),
        "pad_sent_mib_max": rounded(max((r["pad_sent"] for r in connected), default=0) / mib, 3),
        "pad_accepted_mib": accepted,
        "pad_accepted_mib_max": max(accepted, default=None),
        **watch.measures(),
    }
    return measured, watch.series()


def scenario_unsent_close(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    host, port = run.server.host_port
    n = attack_connections(run)
    path = urlsplit(run.target.url).path
    id_bytes = int(o.unsent_id_mb * 1e6)
    request = http_request("POST", path, f"{host}:{port}", _rows_body(run, 1, id="x" * id_bytes))
    ramp = o.wire_duration_s / 2
    _config(run, connections=n, id_bytes=id_bytes, rcvbuf=o.readers_rcvbuf, ramp_s=ramp)
    socks: list = []
    with watched(run, duration=o.wire_duration_s) as watch:
        try:
            socks, records = asyncio.run(
                unsent_close(
                    host, port, connections=n, request=request, rcvbuf=o.readers_rcvbuf, ramp=ramp
                )
            )
            _sleep_until(watch.t0 + o.wire_duration_s)
            watch.stop_probes()
            states = _states(socks)
        finally:
            close_sockets(socks)
        time.sleep(SETTLE_S)
    fd_after = run.server.fd_count()
    measures = watch.measures()
    fd_over = None
    if None not in (measures["fd_peak"], measures["fd_before"], run.connection_cap):
        fd_over = measures["fd_peak"] - measures["fd_before"] - run.connection_cap
    measured = {
        "connections": n,
        "connected": len(socks),
        "errors": dict(Counter(r["error"] for r in records if r["error"])),
        "sent": sum(r["sent"] for r in records),
        "answered": sum(r["answered"] for r in records),
        **states,
        **measures,
        "connection_cap": run.connection_cap,
        "fd_over_cap": fd_over,
        "fd_after_close": fd_after,
    }
    return measured, watch.series()


def uploads(run: Run, *, size: int) -> list[Upload]:
    """One upload per route that reads a body: a valid request padded with spaces to ``size``."""
    host, port = run.server.host_port
    name = run.target.name
    row = json.loads(run.target.body)["inputs"][0]["data"]
    bodies = {
        INDEX_PATH: b"{}",
        urlsplit(run.target.url).path: run.target.body,
        f"/v1/models/{name}:predict": json.dumps({"instances": [row]}).encode(),
    }
    out = []
    for path, body in bodies.items():
        padded = body + b" " * max(size - len(body), 0)
        head = http_request("POST", path, f"{host}:{port}", padded)[: -len(padded)]
        out.append(Upload(route=path, head=head, body=padded))
    return out


def scenario_slow_bodies(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    host, port = run.server.host_port
    limit = run.settings.get("max_request_bytes")
    size = int(o.bodies_mib * 2**20)
    if limit is not None:
        size = min(size, int(limit))
    routes = uploads(run, size=size)
    _config(
        run,
        clients_per_route=o.bodies_clients,
        routes=[u.route for u in routes],
        body_bytes=size,
        send_s=o.bodies_send_s,
        body_timeout_s=run.settings.get("body_timeout_s"),
    )
    with watched(run, duration=o.bodies_send_s + 30) as watch:
        records = asyncio.run(
            slow_uploads(host, port, uploads=routes * o.bodies_clients, seconds=o.bodies_send_s)
        )
        watch.stop_probes()
        time.sleep(SETTLE_S)
    by_route: dict[str, Counter[str]] = {}
    for r in records:
        by_route.setdefault(r["route"], Counter())[str(r["status"])] += 1
    statuses = [r["status"] for r in records]
    measured = {
        "uploads": len(records),
        "statuses": {k: dict(sorted(v.items())) for k, v in by_route.items()},
        "answered_200": statuses.count(200),
        "shed_503": statuses.count(503),
        "server_errors": sum(isinstance(s, int) and s >= 500 and s != 503 for s in statuses),
        "not_answered": sum(not isinstance(s, int) for s in statuses),
        "sent_mib": rounded(sum(r["sent"] for r in records) / 2**20, 1),
        **watch.measures(),
    }
    return measured, watch.series()


WIRE_RUNNERS: dict[str, Callable[[Run], tuple[dict[str, Any], dict[str, Any]]]] = {
    "slow-readers": scenario_slow_readers,
    "slow-readers-sigterm": scenario_slow_readers_sigterm,
    "pipelined-header": scenario_pipelined_header,
    "unsent-close": scenario_unsent_close,
    "slow-bodies": scenario_slow_bodies,
}
