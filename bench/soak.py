"""Reliability of ``smartmixed-serve`` against hostile clients and careless operators: the
options, the scenarios and their targets, the driver, and soak.md / soak.png.

``measure_soak`` runs each chosen scenario against a real server on 127.0.0.1: a fresh
``smartmixed-serve`` per scenario (bench/server.py's ``start_server``, over a repository of one
seeded random-weight model, or ``--repository``), unless ``--url`` targets a running one. Every
number comes from the client side or from /proc (bench/soak_clients.py holds the instruments);
each scenario records what it measured, its targets and whether they were met (reported, never
asserted). A scenario that fails (the server does not start, dies, a tool breaks) is recorded
with its reason and the suite goes on. docs/bench.md describes each scenario, its targets and
the keys of soak.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import operator
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from tqdm.auto import tqdm

from smartmixed.bench import PAPER_ARCH, flag, load, server
from smartmixed.bench import soak_clients as clients
from smartmixed.bench.soak_clients import Attempt, SoakError, rounded
from smartmixed.contract import SpecError, outputs, parse_arch, parse_positive_ints, split_list

SCENARIOS = ("soak", "overload", "slow", "header", "sigterm")
WIRE_SCENARIOS = (
    "slow-readers",
    "slow-readers-sigterm",
    "pipelined-header",
    "unsent-close",
    "slow-bodies",
)
ALL_SCENARIOS = (*SCENARIOS, *WIRE_SCENARIOS)
GROUPS = {"all": ALL_SCENARIOS, "wire": WIRE_SCENARIOS}
STOPS_SERVER = ("sigterm", "slow-readers-sigterm")  # no server left to check after these
# the SoakOptions field that sets the open-file limit of a scenario's server
NOFILE = {"slow": "slow_nofile", "overload": "overload_nofile"} | dict.fromkeys(
    WIRE_SCENARIOS, "wire_nofile"
)
GENERATED_MODEL = "mixed"
METRICS_PORT_ENV = "SMARTMIXED_METRICS_PORT"
DEFAULT_CAP = "default"  # a wire row at the server's own connection cap
MIN_CAP = 8  # serve's smallest max_connections
# the server settings the scenarios read, as a started server sees them (env, else the default)
SETTINGS = ("request_timeout_s", "header_timeout_s", "max_request_bytes", "body_timeout_s")
TRACEBACK = "Traceback (most recent"
# serve/cli.py logs the cap when the open-file limit lowers it below max_connections
CAP_LOG = re.compile(r"connection cap (\d+) \(max_connections")
ALIVE_TIMEOUT_S = 5.0
HEALTH_PATHS = (clients.HEALTH_PATH,)  # what a health prober asks, in turn
INFER_PROBE_EVERY = 4  # slow clients: one infer request per 4 health-probe intervals
FREED_GRACE_S = 2.0  # a slow connection is freed when closed by header timeout + this
RSS_SOAK_INTERVAL_S = 1.0
RSS_HEADER_INTERVAL_S = 0.05
SETTLE_AFTER_HEADER_S = 1.0
OUTCOME_BIN_S = 0.1  # sigterm timeline bins
STATUS_MARKER = "SMARTMIXED-WRK-STATUS "
OPENAPI_PATH = "/openapi.json"
INDEX_PATH = "/v2/repository/index"
WIRE_SAMPLE_S = 0.1  # wire attacks: the server's RSS, descriptors and connections
SETTLE_S = 1.0  # after closing the attackers: what the server logs, what it frees
MIB = 2**20

# Targets: measured key -> (op, limit), op one of "<", "<=", "==", ">="; a value not measured
# evaluates to None. ZERO: a count that must stay 0; YES: a check that must hold.
HEALTH_P99_TARGET_MS = 100.0  # the health probes' p99 (the plot's line)
HEALTH_MAX_TARGET_MS = 500.0  # overload: the slowest health probe, on each port
RSS_GROWTH_TARGET_MIB = 100.0  # wire attacks
PAD_TARGET_MIB = 1.0  # header taken per connection: the 16 KiB limit plus a few socket reads
FD_SLACK = 8  # descriptors over the cap: the prober's connection, newcomers being refused
ZERO, YES, EXIT_0 = ("<=", 0), ("==", True), ("==", 0)
HEALTH = {"health_p99_ms": ("<=", HEALTH_P99_TARGET_MS), "health_failures": ZERO}
WIRE = {**HEALTH, "rss_growth_mib": ("<", RSS_GROWTH_TARGET_MIB)}
LIVE = {"tracebacks": ZERO, "server_alive": YES}
TARGETS: dict[str, dict[str, tuple[str, Any]]] = {
    "soak": {"errors": ZERO, "rss_growth_pct": ("<", 5.0), "server_alive": YES},
    "overload": {
        "health_p99_ms": ("<=", HEALTH_P99_TARGET_MS),
        "health_max_ms": ("<=", HEALTH_MAX_TARGET_MS),
        "metrics_port_health_p99_ms": ("<=", HEALTH_P99_TARGET_MS),
        "metrics_port_health_max_ms": ("<=", HEALTH_MAX_TARGET_MS),
        "ok_over_deadline": ZERO,
        "client_timeouts": ZERO,
        "other_failures": ZERO,
        "shed_without_retry_after": ZERO,
        "server_alive": YES,
    },
    "slow": {**HEALTH, "infer_failures": ZERO, "freed_share": (">=", 1.0), "server_alive": YES},
    "header": {
        "refused": YES,
        "answer_s": ("<=", 1.0),
        "rss_growth_mib": ("<", 20.0),
        "server_alive": YES,
    },
    "sigterm": {"failed_requests": ZERO, "exit_code": EXIT_0},
    "slow-readers": {**WIRE, "tracebacks_on_close": ZERO, **LIVE},
    "slow-readers-sigterm": {"exit_code": EXIT_0, "exited_within_drain": YES, "tracebacks": ZERO},
    "pipelined-header": {**WIRE, "pad_accepted_mib_max": ("<=", PAD_TARGET_MIB), **LIVE},
    "unsent-close": {**WIRE, "fd_over_cap": ("<=", FD_SLACK), **LIVE},
    "slow-bodies": {**WIRE, "server_errors": ZERO, **LIVE},
}
NOT_STARTED_HERE = "needs a server the bench starts (it would signal a process it did not start)"
WIRE_NEEDS_STARTED = (
    "needs a server the bench starts (its open-file limit and connection cap are set per row)"
)


def evaluate(measured: Mapping[str, Any], targets: Mapping[str, tuple[str, Any]]) -> dict:
    ops = {"<": operator.lt, "<=": operator.le, "==": operator.eq, ">=": operator.ge}
    return {
        key: None if measured.get(key) is None else bool(ops[op](measured[key], limit))
        for key, (op, limit) in targets.items()
    }


# ---- options


@dataclass(frozen=True)
class SoakOptions:
    """Durations and counts of the scenarios (a flag per field: bench.add_options; the
    defaults: the full suite's)."""

    # one option a line: a table
    # fmt: off
    soak_duration_s: int = flag("soak: seconds", default=60)
    soak_concurrency: int = flag("soak: connections", default=64)
    overload_duration_s: int = flag("overload: seconds", default=20)
    overload_concurrency: int = flag("overload: connections", default=1024)
    # overload: the server's open-file limit puts its cap (960) below the clients
    overload_nofile: int = flag("overload: the server's open-file limit", default=1024)
    client_timeout_s: float = flag("soak, overload, sigterm: a request slower than this is a client timeout", default=10.0)
    slow_clients: int = flag("slow: header-dribbling clients", default=1000)
    slow_duration_s: float = flag("slow: seconds", default=25.0)
    slow_interval_s: float = flag("slow: seconds between header lines", default=5.0)
    slow_nofile: int = flag("slow: the server's open-file limit", default=1024)
    header_mb: float = flag("header: size of the header line (MB)", default=100.0)
    header_limit_s: float = flag("header: give up after this many seconds", default=30.0)
    sigterm_concurrency: int = flag("sigterm: connections", default=32)
    sigterm_after_s: float = flag("sigterm, slow-readers-sigterm: seconds of load before SIGTERM", default=5.0)
    drain_limit_s: float = flag("sigterm, slow-readers-sigterm: kill the server after this many s", default=40.0)
    probe_interval_ms: float = flag("health probe period (a new connection each)", default=50.0)
    # the wire attacks
    wire_nofile: int = flag("wire attacks: the server's open-file limit (its own cap is this - 64)", default=320)
    wire_overcommit: float = flag("slow-readers, unsent-close: connections per slot of the cap", default=2.0)
    wire_duration_s: float = flag("wire attacks: seconds each attack lasts", default=10.0)
    readers_requests: int = flag("slow-readers: pipelined GET /openapi.json per connection", default=450)
    readers_rcvbuf: int = flag("slow-readers, unsent-close: the clients' receive buffer (bytes)", default=4096)
    sigterm_readers: int = flag("slow-readers-sigterm: slow readers connected at the signal", default=16)
    pipelined_connections: int = flag("pipelined-header: connections", default=4)
    pipelined_requests: int = flag("pipelined-header: infer requests pipelined before the header", default=12)
    pipelined_rows: int = flag("pipelined-header: rows per infer request", default=1024)
    unsent_id_mb: float = flag("unsent-close, pipelined-header: size of the request id an answer echoes (MB)", default=5.0)
    bodies_clients: int = flag("slow-bodies: clients per route", default=16)
    bodies_mib: float = flag("slow-bodies: body size (MiB; at most the server's max_request_bytes)", default=16.0)
    bodies_send_s: float = flag("slow-bodies: seconds each body takes to send", default=8.0)
    # fmt: on

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


def parse_scenarios(text: str | Sequence[str]) -> list[str]:
    """'soak,header' -> ['soak', 'header'] in the suite's order; 'all', 'wire' name groups."""
    items = split_list(text)
    bad = [v for v in items if v not in ALL_SCENARIOS and v not in GROUPS]
    if not items or bad:
        raise SoakError(
            f"--scenarios: expected all, wire or some of {','.join(ALL_SCENARIOS)} (got {text!r})"
        )
    chosen = {s for v in items for s in GROUPS.get(v, (v,))}
    return [s for s in ALL_SCENARIOS if s in chosen]


def parse_caps(text: str | Sequence[str | int]) -> list[int | None]:
    """'default,16' -> [None, 16]: the connection caps the wire attacks run at (None: the
    server's own, from max_connections and its open-file limit)."""
    items = split_list(text) if isinstance(text, str) else [str(v) for v in text]
    numbers = [v for v in items if v != DEFAULT_CAP]
    error = SoakError(f"--wire-caps: expected default and/or integers >= {MIN_CAP} (got {text!r})")
    try:
        caps = parse_positive_ints(numbers, "--wire-caps") if numbers else []
    except ValueError:
        raise error from None
    if not items or any(c < MIN_CAP for c in caps):
        raise error
    return [None] * (DEFAULT_CAP in items) + caps


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


@dataclass
class SoakPlan:
    """The scenarios and the server they attack (a flag per field: bench.add_options); the
    scenarios and caps parsed when made, the server checked by ``check_server``."""

    # one option a line: a table
    # fmt: off
    scenarios: str | Sequence[str] = flag(f"which to run: all, wire (the wire attacks) or some of {','.join(ALL_SCENARIOS)}", default="all")
    wire_caps: str | Sequence[str | int | None] = flag(
        "connection caps the wire attacks run at, a row each: default (the server's own, from "
        "max_connections and --wire-nofile) and/or numbers set as SMARTMIXED_MAX_CONNECTIONS",
        default=f"{DEFAULT_CAP},16",
    )
    arch: str | Sequence[int] | None = flag("layer widths of the built model (default: the paper's)", default=None)
    repository: Path | None = flag("serve this exported repository instead of building a model", default=None)  # noqa: RUF009 (flag returns a dataclasses.field)
    model: str | None = flag("model to send requests to (default: mixed, or the first in --repository; required with --url)", default=None)
    url: str | None = flag("http://127.0.0.1:PORT of a running server (none is started; sigterm is skipped)", default=None)
    pid: int | None = flag("with --url: the server's PID, for its RSS and open-file limit", default=None)
    # fmt: on

    def __post_init__(self) -> None:
        self.scenarios = parse_scenarios(self.scenarios)
        self.wire_caps = parse_caps(self.wire_caps)

    @property
    def source(self) -> str:
        """Where the server comes from: generated | repository (started per scenario) | url."""
        return "url" if self.url else "repository" if self.repository else "generated"

    def check_server(self, env: Mapping[str, str]) -> None:
        """SoakError for flags that do not go together, or a server at ``url`` that is not
        ready; fills in the model (and the built model's arch)."""
        if self.url is not None:
            self._check_url(env)
            return
        if self.pid is not None:
            raise SoakError("--pid goes with --url (a started server's PID is known)")
        try:
            arch = parse_arch(self.arch) if self.arch is not None else None
        except SpecError as e:
            raise SoakError(f"--arch: {e}") from None
        if self.repository is not None:
            if arch is not None:
                raise SoakError("--arch builds a model; it cannot go with --repository")
            self.repository, names = server.pick_models(
                self.repository, self.model and [self.model], SoakError
            )
            self.model = names[0]
        elif self.model not in (None, GENERATED_MODEL):
            raise SoakError(
                f"--model {self.model}: without --repository the bench builds {GENERATED_MODEL!r}"
            )
        else:
            self.model, self.arch = GENERATED_MODEL, arch or list(PAPER_ARCH)

    def _check_url(self, env: Mapping[str, str]) -> None:
        if self.repository is not None or self.arch is not None or env:
            raise SoakError(
                "--url targets a running server: --repository, --arch and --server-env "
                "belong to the server, not the bench"
            )
        if self.model is None:
            raise SoakError("--url needs --model NAME (the model to send requests to)")
        self.url = server.check_ready(self.url, SoakError)
        if self.pid is not None and clients.read_rss_mib(self.pid) is None:
            raise SoakError(
                f"--pid {self.pid}: no such process (or /proc/{self.pid}/status is unreadable)"
            )


# ---- the server under attack


@dataclass
class Run:
    """What a scenario needs: its suite, the server under attack (``started``: the
    smartmixed-serve the bench started for it; None: a running one at ``url``), the model's
    request and the server's settings (``SETTINGS``)."""

    suite: Suite
    url: str
    pid: int | None
    nofile: int | None  # the server's open-file limit
    started: server.ServerProcess | None
    target: server.Target
    settings: dict[str, float]
    config: dict[str, Any]  # what the scenario ran with
    connection_cap: int | None = None  # the server's, when the bench started it
    metrics_port: int | None = None  # the started server's metrics port, when it has one

    @property
    def options(self) -> SoakOptions:
        return self.suite.options

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    @property
    def process(self) -> subprocess.Popen:
        """The server's process, for the scenarios that signal it: only one the bench started."""
        if self.started is None:
            raise SoakError(NOT_STARTED_HERE)
        return self.started.process

    def rss_mib(self) -> float | None:
        return clients.read_rss_mib(self.pid)

    def alive(self) -> bool:
        """Still running and answering /v2/health/live within a few seconds."""
        if self.started is not None and self.started.process.poll() is not None:
            return False
        return answers(self.url + clients.LIVE_PATH, ALIVE_TIMEOUT_S)

    def tracebacks(self) -> int | None:
        """Tracebacks the server has logged so far (None: its log is not the bench's)."""
        text = server_log(self.started)
        return None if text is None else text.count(TRACEBACK)

    def prober(
        self, requests: Sequence[bytes], *, duration: float, every: int = 1, port: int | None = None
    ) -> clients.Prober:
        """``requests`` in turn, a new connection every ``every`` probe intervals, on ``port``
        (default: the server's)."""
        host, server_port = self.host_port
        interval = self.options.probe_interval_ms / 1e3 * every
        return clients.Prober(
            host, port or server_port, requests, interval=interval, duration=duration
        )

    def health_prober(
        self, *, duration: float, port: int | None = None, paths: Sequence[str] = HEALTH_PATHS
    ) -> clients.Prober:
        """The kubelet's probes of ``paths`` in turn, on ``port`` (default: the server's)."""
        host, port = self.host_port[0], port or self.host_port[1]
        requests = [clients.health_probe(host, port, path) for path in paths]
        return self.prober(requests, duration=duration, port=port)

    def request(
        self, body: bytes | None = None, *, path: str | None = None, close: bool = False
    ) -> bytes:
        """A raw HTTP/1.1 POST of ``body`` (default: the model's infer request) to ``path``
        (default: the model's infer route)."""
        host, port = self.host_port
        path = path or urlsplit(self.target.url).path
        return clients.http_request(
            "POST", path, f"{host}:{port}", body or self.target.body, close=close
        )


def answers(url: str, timeout: float) -> bool:
    """Whether GET ``url`` answers 200 within ``timeout`` s."""
    try:
        with server.http_client(timeout=timeout) as client:
            return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def server_log(started: server.ServerProcess | None) -> str | None:
    """What a started server has logged so far (None: not started here)."""
    if started is None or not started.log_path.exists():
        return None
    return started.log_path.read_text(errors="replace")


def connection_cap(
    log: str | None, *, nofile: int | None, max_connections: int
) -> tuple[int | None, str]:
    """The connection cap of a started server and where it comes from: its log (the open-file
    limit lowered it), else ``max_connections`` lowered as serve/server.py's connection_cap
    does, from the open-file limit the bench set."""
    found = CAP_LOG.search(log or "")
    if found:
        return int(found.group(1)), "server log"
    from smartmixed.serve.server import FD_RESERVE

    if nofile is None:
        return None, "unknown"
    return max(1, min(max_connections, nofile - FD_RESERVE)), "computed"


def shell_command(command: Sequence[str], env: Mapping[str, str], nofile: int | None) -> str:
    """The server command as one shell line an operator can paste (env, ulimit, argv)."""
    text = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    text = f"{text} {shlex.join(command)}".strip()
    return f"ulimit -n {nofile} && {text}" if nofile else text


# ---- the driver


@dataclass
class Suite:
    """What every scenario of one run shares."""

    plan: SoakPlan
    repository: Path | None  # the one started servers serve (None: --url)
    env: dict[str, str]  # what a started server sees: SMARTMIXED_* of the bench, --server-env
    options: SoakOptions
    work: Path
    use_wrk: bool
    seed: int


def measure_soak(
    plan: SoakPlan | None = None,
    options: SoakOptions | None = None,
    *,
    server_env: Sequence[str] | Mapping[str, str] = (),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the plan's scenarios; returns the soak.json record.

    Options are checked before anything starts (SoakError); a scenario that fails is recorded
    in its entry (status "failed", error) and the others still run.
    """
    started = time.perf_counter()
    plan, options = plan or SoakPlan(), options or SoakOptions()
    env = dict(server_env) if isinstance(server_env, Mapping) else parse_server_env(server_env)
    plan.check_server(env)
    effective = server.server_env() | env if plan.source != "url" else {}
    settings = {k: server_setting(k, effective) for k in SETTINGS[:2]}
    # one row per scenario; a wire attack once per cap (its server's env sets the cap)
    rows = [
        (name, cap)
        for name in plan.scenarios
        for cap in (plan.wire_caps if name in WIRE_SCENARIOS else [None])
    ]
    use_wrk = shutil.which("wrk") is not None
    command: list[str] | None = None
    load_avg = [os.getloadavg()]
    with (
        tempfile.TemporaryDirectory(prefix="smartmixed-bench-soak-") as tmp,
        tqdm(rows, desc="soak scenarios", disable=not progress) as bar,
    ):
        suite = Suite(plan, plan.repository, effective, options, Path(tmp), use_wrk, seed)
        if plan.source == "generated":
            suite.repository = suite.work / "models"
            server.build_repository(
                suite.repository, arch=plan.arch, seed=seed, models=[plan.model]
            )
        if suite.repository is not None:  # the port differs per scenario: PORT
            command = server.server_command(suite.repository, 0)
            command[command.index("--port") + 1] = "PORT"
        results = {}
        for name, cap in bar:
            row = name if cap is None else f"{name}@cap{cap}"
            bar.set_postfix_str(row)
            results[row] = _run_scenario(suite, row, name, cap)
    load_avg.append(os.getloadavg())
    return {
        "config": _config(suite, settings),
        "server_command": command,
        "server_command_shell": shell_command(command, effective, None) if command else None,
        "machine": _machine(load_avg),
        "scenarios": results,
        "summary": {name: _summary(r) for name, r in results.items()},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def _config(suite: Suite, settings: dict[str, float]) -> dict[str, Any]:
    """soak.json's config: where the server came from, the options and the probe."""
    plan, at_url = suite.plan, suite.plan.source == "url"
    return {
        "source": plan.source,
        "model": plan.model,
        "arch": plan.arch,
        "repository": str(plan.repository) if plan.repository else None,
        "url": plan.url,
        "pid": plan.pid,
        "scenarios": plan.scenarios,
        "wire_caps": [DEFAULT_CAP if c is None else c for c in plan.wire_caps],
        "options": asdict(suite.options),
        "seed": suite.seed,
        "server_env": None if at_url else suite.env,
        "server_settings": {**settings, "assumed_defaults": at_url},
        "probe": {
            "path": clients.HEALTH_PATH,
            "interval_ms": suite.options.probe_interval_ms,
            "timeout_s": clients.PROBE_TIMEOUT_S,
            "new_connection_per_probe": True,
        },
        "wrk_version": load.tool_version(load.WRK) if suite.use_wrk else None,
    }


def _machine(load_avg: Sequence[tuple[float, float, float]]) -> dict[str, Any]:
    import onnxruntime
    import uvicorn

    return {
        **outputs.machine_info(),
        "onnxruntime": onnxruntime.__version__,
        "uvicorn": uvicorn.__version__,
        "kernel": platform.release(),
        "load_avg_start_end": [[round(v, 2) for v in la] for la in load_avg],
    }


def _summary(entry: Mapping[str, Any]) -> dict[str, Any]:
    met = entry["meets_target"].values()
    return {
        "status": entry["status"],
        "met": sum(v is True for v in met),
        "missed": sum(v is False for v in met),
        "of": len(entry["meets_target"]),
    }


def _run_scenario(suite: Suite, row: str, name: str, cap: int | None) -> dict[str, Any]:
    """One scenario (``row``: with its cap) on its own server; every failure is recorded,
    never raised."""
    goals = TARGETS[name]
    entry: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "config": {},
        "server": {},
        "measured": {},
        "targets": {key: {"op": op, "limit": limit} for key, (op, limit) in goals.items()},
        "meets_target": dict.fromkeys(goals),
        "series": {},
    }
    at_url = suite.plan.source == "url"
    if at_url and (name == "sigterm" or name in WIRE_SCENARIOS):
        error = NOT_STARTED_HERE if name == "sigterm" else WIRE_NEEDS_STARTED
        entry.update(status="skipped", error=error)
        return entry
    t0 = time.perf_counter()
    env = dict(suite.env)
    if name == "overload":  # health probed on its metrics port too (one the 1024 do not fill)
        env.setdefault(METRICS_PORT_ENV, str(server.free_port()))
    if cap is not None:
        env["SMARTMIXED_MAX_CONNECTIONS"] = str(cap)
    nofile = getattr(suite.options, NOFILE[name]) if name in NOFILE else None
    started: server.ServerProcess | None = None
    try:
        with contextlib.ExitStack() as stack:
            if not at_url:
                assert suite.repository is not None
                log_path = suite.work / f"server-{row}.log"
                started = stack.enter_context(
                    server.start_server(suite.repository, log_path=log_path, env=env, nofile=nofile)
                )
                entry["server"]["command_shell"] = shell_command(started.command, env, nofile)
            run = _run_for(suite, started, env, nofile, entry)
            measured, series = RUNNERS[name](run)
            if name not in STOPS_SERVER:
                measured["server_alive"] = run.alive()
            entry.update(measured=measured, series=series, meets_target=evaluate(measured, goals))
            entry["server"]["log"] = _log_counts(started)
    except Exception as e:  # recorded, not raised: a scenario that breaks the server is a finding
        entry.update(status="failed", error=f"{type(e).__name__}: {e}")
        if at_url or started is not None:
            if started is not None and started.process.poll() is not None:
                entry["server"]["exit_code"] = started.process.returncode
            entry["server"]["log"] = _log_counts(started)
            entry["server"]["log_tail"] = (server_log(started) or "").strip()[-1200:]
    entry["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return entry


def _run_for(
    suite: Suite,
    started: server.ServerProcess | None,
    env: Mapping[str, str],
    nofile: int | None,
    entry: dict[str, Any],
) -> Run:
    """A scenario's Run on the server it started (or the one at --url), recorded in entry."""
    if started is None:
        url, pid = suite.plan.url or "", suite.plan.pid
        nofile = clients.read_nofile(pid) if pid else None
    else:
        url, pid = started.url, started.pid
        nofile = nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    entry["server"].update(pid=pid, nofile=nofile)
    target = server.prepare_target(url, suite.plan.model or "", seed=suite.seed)
    settings = {k: server_setting(k, env) for k in SETTINGS}
    run = Run(suite, url, pid, nofile, started, target, settings, entry["config"])
    if started is not None:
        max_connections = int(server_setting("max_connections", env))
        run.connection_cap, cap_from = connection_cap(
            server_log(started), nofile=nofile, max_connections=max_connections
        )
        entry["server"].update(connection_cap=run.connection_cap, connection_cap_source=cap_from)
        # the metrics port, when the server answers on it (an older one ignores the variable)
        port = int(env.get(METRICS_PORT_ENV) or 0)
        if port and answers(f"http://{urlsplit(url).hostname}:{port}{clients.LIVE_PATH}", 3.0):
            run.metrics_port = port
    return run


def _log_counts(started: server.ServerProcess | None) -> dict[str, int] | None:
    text = server_log(started)
    if text is None:
        return None
    return {"lines": text.count("\n"), "tracebacks": text.count(TRACEBACK)}


# ---- soak: keep-alive load from wrk (or Python without it), RSS sampled every second

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
    + load.WRK_SUMMARY
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
    script = load.write_wrk_script(
        run.suite.work / "soak.lua", run.target.body, SOAK_WRK_SCRIPT, status_marker=STATUS_MARKER
    )
    command = load.wrk_command(
        run.target.url,
        script,
        concurrency=o.soak_concurrency,
        duration=o.soak_duration_s,
        timeout=o.client_timeout_s,
    )
    run.config["load_command"] = command
    wall0 = time.time()
    stdout = load.run_tool(command, "wrk", o.soak_duration_s + o.client_timeout_s + 30)
    raw = load.parse_wrk_output(stdout)
    counts = load.marked_result(stdout, STATUS_MARKER, "wrk")  # one line: wrk runs one thread
    per_second = sorted((int(k), int(v)) for k, v in counts["seconds"].items())
    kinds = raw["error_kinds"]
    return {
        "requests": raw["requests"],
        "duration_s": round(raw["duration_s"], 3),
        "statuses": {k: int(v) for k, v in sorted(counts["statuses"].items())},
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
        "p50_ms": rounded(raw["p50_ms"]),
        "p99_ms": rounded(raw["p99_ms"]),
        "max_ms": rounded(raw["max_ms"]),
        # wrk's buckets are whole wall-clock seconds: plotted at their middle
        "rps_series": [[round(s + 0.5 - wall0, 1), n] for s, n in per_second],
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
    p50, p99 = clients.percentile_values([a.seconds * 1e3 for a in replies], [50, 99])
    per_second = Counter(int(a.start + a.seconds - t0) for a in replies)
    return {
        "requests": len(replies),
        "duration_s": round(time.monotonic() - t0, 3),
        "statuses": _statuses(replies),
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds),
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": rounded(max((a.seconds * 1e3 for a in replies), default=None)),
        "rps_series": [[s + 0.5, n] for s, n in sorted(per_second.items())],
    }


def _statuses(replies: Sequence[Attempt]) -> dict[str, int]:
    return dict(sorted(Counter(str(a.status) for a in replies).items()))


def rss_halves(samples: Sequence[tuple[float, float]], duration: float) -> dict[str, Any]:
    """Mean RSS over the window (a twelfth of the run, >= 1 s) ending at the first half vs the
    one ending the run, growth %: start-up growth (arenas, first batches) is left out."""
    window = max(duration / 12, 1.0)

    def mean_until(t_end: float) -> float | None:
        values = [mb for t, mb in samples if t_end - window <= t <= t_end]
        return rounded(statistics.fmean(values), 2) if values else None

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
        load_generator="wrk" if run.suite.use_wrk else "python-asyncio",
    )
    rss_start = run.rss_mib()
    with clients.server_sampler(run.pid, RSS_SOAK_INTERVAL_S) as rss:
        got = _wrk_soak(run) if run.suite.use_wrk else _python_soak(run)
    series = {"rss_mib": [list(s) for s in rss.samples], "rps": got.pop("rps_series")}
    ok = sum(n for s, n in got["statuses"].items() if s.startswith("2"))
    measured = {
        **got,
        "rps_ok": rounded(ok / got["duration_s"], 1) if got["duration_s"] else None,
        "rss_start_mib": rounded(rss_start, 2),
        **rss_halves(rss.samples, o.soak_duration_s),
        "rss_max_mib": rss.peak(),
    }
    return measured, series


# ---- overload: 1024 keep-alive clients in closed loop (a 503 retried at once), health on both
# ports


def _infer_load(run: Run, *, concurrency: int, seconds: float) -> list[Attempt]:
    """``concurrency`` closed-loop keep-alive clients sending the model's infer request for
    ``seconds`` (soak without wrk, overload)."""
    end = time.monotonic() + seconds
    return clients.run_async(
        clients.closed_loop(
            *run.host_port,
            run.request(),
            concurrency=concurrency,
            stop=lambda: time.monotonic() >= end,
            timeout=run.options.client_timeout_s,
        )
    )


def scenario_overload(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    deadline_ms = run.settings["request_timeout_s"] * 1e3
    run.config.update(
        concurrency=o.overload_concurrency,
        duration_s=o.overload_duration_s,
        client_timeout_s=o.client_timeout_s,
        load_generator="python-asyncio",
        retry_after_honoured=False,
        server_nofile=run.nofile,
        connection_cap=run.connection_cap,
        probes=f"{clients.LIVE_PATH} and {clients.HEALTH_PATH} in turn, a new connection each",
        metrics_port=run.metrics_port,
    )
    # liveness and readiness in turn, on the server's port and on its metrics port
    paths, duration = (clients.LIVE_PATH, clients.HEALTH_PATH), o.overload_duration_s
    ports = [p for p in (run.host_port[1], run.metrics_port) if p]
    probers = [run.health_prober(duration=duration, port=p, paths=paths) for p in ports]
    t0, cpu0 = time.monotonic(), time.process_time()
    try:
        with clients.raised_nofile() as (before, now):
            run.config["client_nofile"] = {"before": before, "raised_to": now}
            attempts = _infer_load(
                run, concurrency=o.overload_concurrency, seconds=o.overload_duration_s
            )
    finally:
        samples = [p.stop() for p in probers]
    elapsed, client_cpu = time.monotonic() - t0, time.process_time() - cpu0
    replies = [a for a in attempts if a.outcome == "reply"]
    ok = [a.seconds * 1e3 for a in replies if a.status == 200]
    p50, p99 = clients.percentile_values(ok, [50, 99])
    shed = [a for a in replies if a.status == 503]
    outcomes = Counter(a.outcome for a in attempts if a.outcome != "reply")
    timeouts = outcomes.pop("timeout", 0)
    measured = {
        "requests": len(attempts),
        "replies": len(replies),
        "duration_s": rounded(elapsed),
        "statuses": _statuses(replies),
        "share_503": rounded(len(shed) / len(replies), 4) if replies else None,
        "shed_without_retry_after": sum(not a.retry_after for a in shed),
        "client_timeouts": timeouts,
        "socket_errors": dict(outcomes),
        "other_failures": sum(a.status not in (200, 503) for a in replies) + outcomes.total(),
        "rps_ok": rounded(len(ok) / elapsed, 1),
        "ok_p50_ms": p50,
        "ok_p99_ms": p99,
        "ok_max_ms": rounded(max(ok, default=None)),
        "deadline_ms": deadline_ms,
        "ok_over_deadline": sum(v > deadline_ms for v in ok),
        "client_cpu_cores": rounded(client_cpu / elapsed, 2),  # CPU the bench's client took
        **clients.summarize_probes(samples[0], "health"),
    }
    series = {"health_ms": clients.probe_series(samples[0], t0)}
    if len(samples) > 1:
        measured.update(clients.summarize_probes(samples[1], "metrics_port_health"))
        series["metrics_port_health_ms"] = clients.probe_series(samples[1], t0)
    return measured, series


# ---- slow: slowloris clients against the server's header timeout, health and infer meanwhile


def scenario_slow(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """A connection counts as freed when the server closes it (EOF, reset or an answer) within
    the header timeout + FREED_GRACE_S of its connect; only connections opened at least that
    long before the end are judged."""
    o = run.options
    freed_by = run.settings["header_timeout_s"] + FREED_GRACE_S
    run.config.update(
        clients=o.slow_clients,
        duration_s=o.slow_duration_s,
        interval_s=o.slow_interval_s,
        server_nofile=run.nofile,
        freed_by_s=freed_by,
    )
    t0 = time.monotonic()
    with clients.raised_nofile() as (before, now):
        run.config["client_nofile"] = {"before": before, "raised_to": now}
        probers = []
        try:
            probers.append(run.health_prober(duration=o.slow_duration_s))
            infer = run.request(close=True)
            probers.append(run.prober([infer], duration=o.slow_duration_s, every=INFER_PROBE_EVERY))
            records = clients.run_async(
                clients.slow_connections(
                    *run.host_port,
                    slots=o.slow_clients,
                    duration=o.slow_duration_s,
                    interval=o.slow_interval_s,
                )
            )
        finally:
            samples = [p.stop() for p in probers]
    health, infer_probes = samples
    connected = [r for r in records if r["t_connect_s"] is not None]
    closed = [r["closed_after_s"] for r in connected if "closed_after_s" in r]
    # a connection opened less than freed_by before the end cannot show whether it was freed
    judged = [r for r in connected if r["t_connect_s"] + freed_by <= o.slow_duration_s]
    freed = sum(r.get("closed_after_s", math.inf) <= freed_by for r in judged)
    p50, p_max = clients.percentile_values(closed, [50, 100])
    measured = {
        "connections": len(records),
        "connected": len(connected),
        "connect_errors": _errors(records),
        "closed_by_server": len(closed),
        "closed_after_s_p50": p50,
        "closed_after_s_max": p_max,
        "answers": dict(Counter(r["answer"] for r in connected if "answer" in r)),
        "judged": len(judged),
        "freed_by_deadline": freed,
        "freed_share": rounded(freed / len(judged), 4) if judged else None,
        "open_at_end": len(connected) - len(closed),
        **clients.summarize_probes(health, "health"),
        **clients.summarize_probes(infer_probes, "infer"),
    }
    return measured, {"health_ms": clients.probe_series(health, t0)}


def _errors(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many records ended in each error."""
    return dict(Counter(r["error"] for r in records if r["error"]))


# ---- header: one 100 MB header line


def scenario_header(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    size = int(o.header_mb * 1e6)
    run.config.update(
        header_bytes=size,
        chunk_bytes=clients.BODY_CHUNK,
        limit_s=o.header_limit_s,
        path=clients.LIVE_PATH,
    )
    before = run.rss_mib()
    prober = run.health_prober(duration=o.header_limit_s)
    t0 = time.monotonic()
    try:
        with clients.server_sampler(run.pid, RSS_HEADER_INTERVAL_S) as rss:
            outcome = clients.run_async(
                clients.big_header(*run.host_port, size=size, limit=o.header_limit_s)
            )
            time.sleep(SETTLE_AFTER_HEADER_S)
    finally:
        probes = prober.stop()
    after = run.rss_mib()
    peak = max(v for v in (rss.peak(), before, after) if v is not None) if before else None
    measured = {
        **outcome,
        "rss_before_mib": rounded(before, 2),
        "rss_peak_mib": rounded(peak, 2),
        "rss_after_mib": rounded(after, 2),
        "rss_growth_mib": rounded(peak - before, 2) if before and peak else None,
        **clients.summarize_probes(probes, "health"),
    }
    return measured, {
        "health_ms": clients.probe_series(probes, t0),
        "rss_mib": [list(s) for s in rss.samples],
    }


# ---- sigterm: SIGTERM under closed-loop load


def classify_sigterm(attempts: Sequence[Attempt], t_signal: float | None) -> Counter[str]:
    """Outcome classes of the SIGTERM scenario. A request fails when it got a 5xx other than a
    503 sent after the signal, any 4xx, a client timeout, a response cut off partway, or no
    response at all, except a keep-alive connection the server closed with no response byte
    after the signal (the idle-connection race RFC 9112 9.3.1 lets a client retry; the infer
    request is a pure function). A connect refused once the listener closed is not a failure
    either: the request never reached the server."""
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


def send_sigterm(process: subprocess.Popen, limit: float) -> tuple[float, float]:
    """Send SIGTERM and wait up to ``limit`` s for the process to exit: (when it was sent,
    when the wait ended)."""
    t_signal = time.monotonic()
    process.send_signal(signal.SIGTERM)
    while process.poll() is None and time.monotonic() - t_signal < limit:
        time.sleep(0.01)
    return t_signal, time.monotonic()


def exit_measures(process: subprocess.Popen, t_signal: float, t_end: float) -> dict[str, Any]:
    """The exit of a server ``send_sigterm`` signalled; one still running is killed (-9)."""
    killed = process.poll() is None
    if killed:
        process.kill()
        process.wait()
    code = process.returncode
    return {
        "exit_code": code,  # -9 when killed after the drain limit
        "exit_signal": signal.Signals(-code).name if code is not None and code < 0 else None,
        "killed_after_drain_limit": killed,
        "drain_s": None if killed else rounded(t_end - t_signal),
    }


def scenario_sigterm(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    process = run.process
    run.config.update(
        concurrency=o.sigterm_concurrency,
        signal_after_s=o.sigterm_after_s,
        drain_limit_s=o.drain_limit_s,
        load_generator="python-asyncio",
    )
    marks: dict[str, float] = {}

    async def drive() -> list[Attempt]:
        task = asyncio.ensure_future(
            clients.closed_loop(
                *run.host_port,
                run.request(),
                concurrency=o.sigterm_concurrency,
                stop=lambda: "end" in marks,
                timeout=o.client_timeout_s,
            )
        )
        marks["start"] = time.monotonic()
        await asyncio.sleep(o.sigterm_after_s)
        # the wait in a thread: the clients keep running meanwhile
        marks["signal"], marks["end"] = await asyncio.to_thread(
            send_sigterm, process, o.drain_limit_s
        )
        return await task

    attempts = clients.run_async(drive())
    exited = exit_measures(process, marks["signal"], marks["end"])
    t_signal = marks["signal"]
    classes = classify_sigterm(attempts, t_signal)
    ok_at = [a.start + a.seconds for a in attempts if a.outcome == "reply" and a.status == 200]
    refused_at = [a.start for a in attempts if a.outcome == "refused" and a.start >= t_signal]
    measured = {
        "requests": len(attempts),
        "ok_before_signal": sum(t < t_signal for t in ok_at),
        "ok_after_signal": sum(t >= t_signal for t in ok_at),
        "outcomes": dict(sorted(classes.items())),
        "failed_requests": sum(v for k, v in classes.items() if k.startswith("failed_")),
        **exited,
        "listener_closed_after_s": rounded(min(refused_at) - t_signal) if refused_at else None,
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


# ---- the wire attacks: each on a server whose open-file limit is wire_nofile, once per cap


def attack_connections(cap: int | None, overcommit: float) -> int:
    """Connections per cap: ``overcommit`` x the server's connection cap, rounded up."""
    if cap is None:
        raise SoakError("the server's connection cap is unknown (its open-file limit is not set)")
    return math.ceil(cap * overcommit)


class Watch:
    """The health prober and the server sampler around an attack (the ``with`` block, with the
    bench's open-file limit raised); leaving it closes the sockets ``hold`` kept, stops the
    probes and, unless it raised, gives the server SETTLE_S to log and free what the attack
    left. ``measures()`` after it: growths compare the peak with the sample taken just before
    the attack."""

    def __init__(self, run: Run, *, duration: float) -> None:
        self.run, self.duration = run, duration
        self.rss_before = run.rss_mib()
        self.fd_before = clients.read_fd_count(run.pid)
        self.tracebacks_before = run.tracebacks()
        self.t0 = time.monotonic()
        self.sampler = clients.server_sampler(run.pid, WIRE_SAMPLE_S, run.host_port[1])
        self.prober = run.health_prober(duration=duration)
        self.probes: list[list[Any]] | None = None
        self.socks: list = []

    def __enter__(self) -> Watch:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(clients.raised_nofile())
        self._stack.enter_context(self.sampler)
        return self

    def __exit__(self, error: type[BaseException] | None, *_: object) -> None:
        with self._stack:
            for sock in self.socks:  # one holding unread answer bytes is reset by the kernel
                sock.close()
            self._stop_probes()
            if error is None:
                time.sleep(SETTLE_S)

    def _stop_probes(self) -> None:
        if self.probes is None:
            self.probes = self.prober.stop()

    def hold(self, socks: list) -> dict[str, int]:
        """Keep ``socks`` open until the attack's end, then stop the probes; how many the
        server still holds open, and how many it closed."""
        self.socks += socks
        time.sleep(max(self.t0 + self.duration - time.monotonic(), 0))
        self._stop_probes()
        states = Counter(clients.tcp_state(s) for s in socks)
        still = sum(v for k, v in states.items() if k in clients.SERVER_OPEN_STATES)
        return {"still_open": still, "closed_by_server": states.total() - still}

    def measures(self) -> dict[str, Any]:
        """Health, RSS, descriptors and connections during the attack, tracebacks since."""
        peak = max(
            (v for v in (self.sampler.peak(1), self.rss_before) if v is not None), default=None
        )
        growth = None
        if peak is not None and self.rss_before is not None:
            growth = rounded(peak - self.rss_before, 2)
        return {
            **clients.summarize_probes(self.probes or [], "health"),
            "rss_before_mib": rounded(self.rss_before, 2),
            "rss_peak_mib": rounded(peak, 2),
            "rss_growth_mib": growth,
            "fd_before": self.fd_before,
            "fd_peak": self.sampler.peak(2),
            "connections_peak": self.sampler.peak(3),
            "tracebacks": _since(self.run.tracebacks(), self.tracebacks_before),
        }

    def series(self) -> dict[str, Any]:
        return {
            "health_ms": clients.probe_series(self.probes or [], self.t0),
            "server": [list(s) for s in self.sampler.samples],  # [s, rss MiB, fds, connections]
        }


def _since(now: int | None, before: int | None) -> int | None:
    return None if now is None or before is None else now - before


def _wire_config(run: Run, **values: Any) -> None:
    run.config.update(
        connection_cap=run.connection_cap,
        server_nofile=run.nofile,
        duration_s=run.options.wire_duration_s,
        **values,
    )


def _open_readers(run: Run, n: int) -> tuple[list, Counter[str]]:
    """``n`` slow readers: a 4 KB receive buffer set before connect, pipelined GET
    /openapi.json (no key needed), never read."""
    host, port = run.host_port
    payload = (
        clients.http_request("GET", OPENAPI_PATH, f"{host}:{port}") * run.options.readers_requests
    )
    return asyncio.run(
        clients.open_slow_readers(
            host, port, connections=n, payload=payload, rcvbuf=run.options.readers_rcvbuf
        )
    )


def scenario_slow_readers(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    n = attack_connections(run.connection_cap, o.wire_overcommit)
    _wire_config(
        run,
        connections=n,
        requests_per_connection=o.readers_requests,
        path=OPENAPI_PATH,
        rcvbuf=o.readers_rcvbuf,
    )
    with Watch(run, duration=o.wire_duration_s) as watch:
        socks, errors = _open_readers(run, n)
        states = watch.hold(socks)
        before_close = run.tracebacks()
    measured = {
        "connections": n,
        "connected": len(socks),
        "connect_errors": dict(errors),
        **states,
        **watch.measures(),
        "tracebacks_on_close": _since(run.tracebacks(), before_close),
    }
    return measured, watch.series()


def scenario_slow_readers_sigterm(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """sigterm_readers slow readers fit under every cap, and the server has filled every one
    well before the signal (about 350 answers fill what the kernel buffers of an unread
    connection); the drain is judged against serve's GRACEFUL_SHUTDOWN_S."""
    from smartmixed.serve.cli import GRACEFUL_SHUTDOWN_S

    o = run.options
    process = run.process
    n = o.sigterm_readers
    _wire_config(
        run,
        connections=n,
        requests_per_connection=o.readers_requests,
        signal_after_s=o.sigterm_after_s,
        drain_limit_s=o.drain_limit_s,
        graceful_shutdown_s=GRACEFUL_SHUTDOWN_S,
    )
    tracebacks_before = run.tracebacks()
    socks: list = []
    with clients.raised_nofile():
        try:
            t0 = time.monotonic()
            socks, errors = _open_readers(run, n)
            time.sleep(max(t0 + o.sigterm_after_s - time.monotonic(), 0))
            exited = exit_measures(process, *send_sigterm(process, o.drain_limit_s))
        finally:
            for sock in socks:
                sock.close()
    drain = exited["drain_s"]
    measured = {
        "connections": n,
        "connected": len(socks),
        "connect_errors": dict(errors),
        **exited,
        "graceful_shutdown_s": GRACEFUL_SHUTDOWN_S,
        "exited_within_drain": drain is not None and drain < GRACEFUL_SHUTDOWN_S,
        "tracebacks": _since(run.tracebacks(), tracebacks_before),
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
    """The last pipelined request carries an id of unsent_id_mb that its answer echoes: larger
    than the socket buffers, so that answer stays in progress while the header streams."""
    o = run.options
    host, port = run.host_port
    request = run.request(_rows_body(run, o.pipelined_rows))
    id_bytes = int(o.unsent_id_mb * 1e6)
    last = run.request(_rows_body(run, o.pipelined_rows, id="x" * id_bytes))
    _wire_config(
        run,
        connections=o.pipelined_connections,
        pipelined_requests=o.pipelined_requests,
        rows=o.pipelined_rows,
        request_bytes=len(request),
        last_id_bytes=id_bytes,
    )
    with Watch(run, duration=o.wire_duration_s) as watch:
        records = asyncio.run(
            clients.pipelined_header(
                host,
                port,
                connections=o.pipelined_connections,
                requests=request * (o.pipelined_requests - 1) + last,
                read_answers=o.pipelined_requests - 1,
                header_start=f"GET {clients.LIVE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nX-Pad: ".encode(),
                duration=o.wire_duration_s,
            )
        )
    connected = [r for r in records if r["error"] is None]
    answers: Counter[str] = Counter()
    for r in connected:
        answers.update({str(k): v for k, v in r["answers"].items()})
    accepted = [rounded(r["pad_accepted"] / MIB, 3) for r in connected]
    measured = {
        "connections": len(records),
        "connect_errors": _errors(records),
        "answers": dict(sorted(answers.items())),
        "closed_by_server": sum(r["closed_by_server"] for r in connected),
        "pad_s_max": rounded(max((r["pad_s"] for r in connected), default=None)),
        "pad_sent_mib_max": rounded(max((r["pad_sent"] for r in connected), default=0) / MIB, 3),
        "pad_accepted_mib": accepted,
        "pad_accepted_mib_max": max(accepted, default=None),
        **watch.measures(),
    }
    return measured, watch.series()


def scenario_unsent_close(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each request's id of unsent_id_mb is more than the kernel's buffers take of an unread
    answer; fd_over_cap: descriptors at the peak over those before the attack, less the cap."""
    o = run.options
    n = attack_connections(run.connection_cap, o.wire_overcommit)
    id_bytes = int(o.unsent_id_mb * 1e6)
    request = run.request(_rows_body(run, 1, id="x" * id_bytes))
    ramp = o.wire_duration_s / 2
    _wire_config(run, connections=n, id_bytes=id_bytes, rcvbuf=o.readers_rcvbuf, ramp_s=ramp)
    with Watch(run, duration=o.wire_duration_s) as watch:
        socks, records = asyncio.run(
            clients.unsent_close(
                *run.host_port, connections=n, request=request, rcvbuf=o.readers_rcvbuf, ramp=ramp
            )
        )
        states = watch.hold(socks)
    fd_after = clients.read_fd_count(run.pid)
    measures = watch.measures()
    fd_over = None
    if None not in (measures["fd_peak"], measures["fd_before"], run.connection_cap):
        fd_over = measures["fd_peak"] - measures["fd_before"] - run.connection_cap
    measured = {
        "connections": n,
        "connected": len(socks),
        "errors": _errors(records),
        "sent": sum(r["sent"] for r in records),
        "answered": sum(r["answered"] for r in records),
        **states,
        **measures,
        "connection_cap": run.connection_cap,
        "fd_over_cap": fd_over,
        "fd_after_close": fd_after,
    }
    return measured, watch.series()


def uploads(run: Run, *, size: int) -> list[clients.Upload]:
    """One upload per route that reads a body: a valid request padded with spaces to ``size``."""
    row = json.loads(run.target.body)["inputs"][0]["data"]
    bodies = {
        INDEX_PATH: b"{}",
        urlsplit(run.target.url).path: run.target.body,
        f"/v1/models/{run.target.name}:predict": json.dumps({"instances": [row]}).encode(),
    }
    out = []
    for path, body in bodies.items():
        padded = body + b" " * max(size - len(body), 0)
        head = run.request(padded, path=path)[: -len(padded)]
        out.append(clients.Upload(route=path, head=head, body=padded))
    return out


def scenario_slow_bodies(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    o = run.options
    size = min(int(o.bodies_mib * MIB), int(run.settings["max_request_bytes"]))
    routes = uploads(run, size=size)
    _wire_config(
        run,
        clients_per_route=o.bodies_clients,
        routes=[u.route for u in routes],
        body_bytes=size,
        send_s=o.bodies_send_s,
        body_timeout_s=run.settings["body_timeout_s"],
    )
    with Watch(run, duration=o.bodies_send_s + 30) as watch:
        records = asyncio.run(
            clients.slow_uploads(
                *run.host_port, uploads=routes * o.bodies_clients, seconds=o.bodies_send_s
            )
        )
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
        "sent_mib": rounded(sum(r["sent"] for r in records) / MIB, 1),
        **watch.measures(),
    }
    return measured, watch.series()


RUNNERS: dict[str, Callable[[Run], tuple[dict[str, Any], dict[str, Any]]]] = {
    "soak": scenario_soak,
    "overload": scenario_overload,
    "slow": scenario_slow,
    "header": scenario_header,
    "sigterm": scenario_sigterm,
    "slow-readers": scenario_slow_readers,
    "slow-readers-sigterm": scenario_slow_readers_sigterm,
    "pipelined-header": scenario_pipelined_header,
    "unsent-close": scenario_unsent_close,
    "slow-bodies": scenario_slow_bodies,
}


# ---- soak.md and soak.png


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, dict):  # {'a': 1} -> "a: 1"; nested: "route (200: 16)"
        return (
            ", ".join(
                f"{k} ({_fmt(v)})" if isinstance(v, dict) else f"{k}: {_fmt(v)}"
                for k, v in value.items()
            )
            or "-"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def render_markdown(result: Mapping[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    s = c["server_settings"]
    lines = [
        "# Reliability: soak, overload, slow clients, a huge header, SIGTERM, wire attacks",
        "",
        f"Server: `{result['server_command_shell'] or c['url']}` (a fresh one per scenario; "
        f"PORT is a free port). Model {c['model']!r}, deadline {s['request_timeout_s']:g} s, "
        f"header timeout {s['header_timeout_s']:g} s.",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, uvicorn {m['uvicorn']}; load average at start / end "
        f"{m['load_avg_start_end'][0][0]} / {m['load_avg_start_end'][1][0]}. "
        f"Suite took {result['elapsed_s']} s.",
        "",
        *outputs.markdown_table(
            ("scenario", "status", "targets met", "missed"),
            (
                (name, r["status"], f"{r['met']} of {r['of']}", r["missed"])
                for name, r in result["summary"].items()
            ),
        ),
    ]
    for name, entry in result["scenarios"].items():
        lines += ["", f"## {name}", "", *_scenario_lines(entry)]
    lines += [
        "",
        "Health probes open a new connection each (as the kubelet does; overload: liveness and "
        "readiness in turn, on the main port and, as metrics_port_health_*, on the server's "
        "metrics port); a failed probe counts "
        f"as {clients.PROBE_TIMEOUT_S:g} s in the percentiles. RSS is VmRSS in MiB. Targets are reported, "
        "never asserted.",
    ]
    return "\n".join(lines) + "\n"


def _scenario_lines(entry: Mapping[str, Any]) -> list[str]:
    """What a scenario ran with, then its table of measures and targets (or why it has none)."""
    config = ", ".join(f"{k} {_fmt(v)}" for k, v in entry["config"].items() if k != "load_command")
    lines = [f"Ran with: {config}.", ""] if config else []
    if entry["status"] != "ok":
        lines += [f"**{entry['status']}**: {entry['error']}", ""]
        tail = entry["server"].get("log_tail")
        return lines + (["```", tail[-600:], "```", ""] if tail else [])
    rows = []
    for key, value in entry["measured"].items():
        t, met = entry["targets"].get(key), entry["meets_target"].get(key)
        limit = f"{t['op']} {_fmt(t['limit'])}" if t else ""
        verdict = "" if t is None else "-" if met is None else "yes" if met else "NO"
        rows.append((key, _fmt(value), limit, verdict))
    return lines + outputs.markdown_table(("measured", "value", "target", "met"), rows)


def _health_points(ax: Any, series: list, color: str, label: str) -> None:
    """Health probes of one scenario: dots when answered 200, crosses (at the probe timeout)
    when failed."""
    ok = [(t, ms) for t, ms, status in series if status == 200]
    bad = [(t, clients.PROBE_TIMEOUT_S * 1e3) for t, _, status in series if status != 200]
    if ok:
        ax.plot(*zip(*ok), ".", ms=3, color=color, label=label)
    if bad:
        ax.plot(*zip(*bad), "x", color=color, label=f"{label}: failed")


def _health_target(ax: Any) -> None:
    label = f"target {HEALTH_P99_TARGET_MS:g} ms"
    ax.axhline(HEALTH_P99_TARGET_MS, color="k", lw=0.8, ls="--", label=label)
    ax.set_yscale("log")


def plot(result: Mapping[str, Any], path: Path) -> None:
    scenarios = result["scenarios"]
    wire = {
        row: entry
        for row, entry in scenarios.items()
        if row.split("@", 1)[0] in WIRE_SCENARIOS and entry.get("series", {}).get("server")
    }
    classic = any(name in scenarios for name in SCENARIOS) or not wire
    n_rows = classic + bool(wire)
    fig, axes = outputs.pyplot().subplots(n_rows, 3, figsize=(15, 4 * n_rows), squeeze=False)
    if wire:
        _plot_wire(axes[-1], wire)
    if classic:
        _plot_classic(axes[0], scenarios)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    outputs.save_figure(fig, path, dpi=100)


def _series(scenarios: Mapping[str, Any], name: str, key: str) -> Any:
    return scenarios.get(name, {}).get("series", {}).get(key)


def _plot_classic(axes: Any, scenarios: Mapping[str, Any]) -> None:
    """Soak RSS and responses/s, health during overload, slow and header, the SIGTERM
    timeline."""
    ax_rss, ax_health, ax_term = axes
    if rss := _series(scenarios, "soak", "rss_mib"):
        ax_rss.plot(*zip(*rss), color="C0")
        ax_rps = ax_rss.twinx()
        if rps := _series(scenarios, "soak", "rps"):
            ax_rps.plot(*zip(*rps), color="C1", alpha=0.5, lw=0.8)
        ax_rps.set_ylabel("responses/s", color="C1")
    ax_rss.set_ylabel("RSS (MiB)", color="C0")
    ax_rss.set_title("soak: server RSS (MiB) and responses/s", fontsize=9)
    ax_rss.set_xlabel("s")
    for i, name in enumerate(("overload", "slow", "header")):
        _health_points(ax_health, _series(scenarios, name, "health_ms") or [], f"C{i}", name)
    if metrics := _series(scenarios, "overload", "metrics_port_health_ms"):
        _health_points(ax_health, metrics, "C3", "overload, metrics port")
    _health_target(ax_health)
    ax_health.set_title("health probe latency (ms), new connection each", fontsize=9)
    ax_health.set_xlabel("s since the scenario's start")
    ax_health.legend(fontsize=7)
    if timeline := _series(scenarios, "sigterm", "timeline"):
        width = timeline["bin_s"]
        for kind, counts in timeline.items():
            if isinstance(counts, list):
                ax_term.plot([i * width for i in range(len(counts))], counts, label=kind)
        ax_term.axvline(timeline["signal_s"], color="k", lw=0.8, ls="--", label="SIGTERM")
        ax_term.legend(fontsize=7)
    ax_term.set_title(f"SIGTERM under load: outcomes per {OUTCOME_BIN_S:g} s", fontsize=9)
    ax_term.set_xlabel("s")


def _plot_wire(axes: Any, rows: Mapping[str, Any]) -> None:
    """The wire attacks: health probes, the server's RSS, its open descriptors (dotted: the
    row's connection cap over the descriptors open before the attack)."""
    ax_health, ax_rss, ax_fd = axes
    for i, (row, entry) in enumerate(rows.items()):
        color = f"C{i % 10}"
        _health_points(ax_health, entry["series"].get("health_ms") or [], color, row)
        samples = entry["series"]["server"]  # [s, rss MiB, fds, connections]
        rss = [(s[0], s[1]) for s in samples if s[1] is not None]
        fds = [(s[0], s[2]) for s in samples if s[2] is not None]
        if rss:
            ax_rss.plot(*zip(*rss), color=color, lw=1, label=row)
        if fds:
            ax_fd.plot(*zip(*fds), color=color, lw=1, label=row)
            cap, before = entry["config"].get("connection_cap"), entry["measured"].get("fd_before")
            if cap is not None and before is not None:
                ax_fd.axhline(cap + before, color=color, lw=0.8, ls=":")
    _health_target(ax_health)
    ax_health.set_title("wire attacks: health probe latency (ms)", fontsize=9)
    ax_rss.set_title("wire attacks: server RSS (MiB)", fontsize=9)
    ax_fd.set_title("wire attacks: open descriptors (dotted: cap + those before)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("s since the attack's start")
        ax.legend(fontsize=6)
