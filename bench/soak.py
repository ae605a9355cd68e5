"""Reliability of ``smartmixed-serve`` against hostile clients and careless operators (issue F):
the suite's driver.

``measure_soak`` checks the options, builds the model (or takes a repository or a URL), and runs
each chosen scenario against a real server on 127.0.0.1: a fresh ``smartmixed-serve``
subprocess per scenario, started on a free port over a repository of one seeded random-weight
model, unless ``url`` targets a running server. Every number comes from the client side or from
``/proc/PID``; each scenario records what it measured, its targets and whether they were met
(reported, never asserted). A scenario that fails (the server does not start, dies, a tool
breaks) is recorded with its reason and the suite goes on.

The scenarios, their options and targets are in ``soak_scenarios`` (soak, overload, slow,
header, sigterm) and ``soak_wire`` (the wire attacks: slow-readers, slow-readers-sigterm,
pipelined-header, unsent-close, slow-bodies; each once per cap of ``wire_caps``, a row per
cap); the clients and the health prober in ``soak_clients``; the server under attack in
``soak_server``; soak.md and soak.png in ``soak_report``. ``--scenarios`` takes names, ``all``
(the default) or ``wire`` (the wire attacks).

A full default run takes about 4 to 5 minutes: 2 for the first five (60 + 20 + 25 + 5 s of
load, one server start per scenario, the model build), 2 to 3 for the wire attacks (10 rows of
about 10 s each, a server start each); a server that hangs stretches it (up to 10 s of
in-flight overload requests, the 30 s header limit, the 40 s drain limit, twice for the SIGTERM
with slow readers).

soak.json (stable keys): ``config`` {source, model, arch, repository, url, pid, scenarios,
wire_caps, options, seed, server_env, server_settings, probe, wrk_version}, ``server_command``,
``server_command_shell``, ``machine``, ``scenarios`` {ROW: {status, error, config, server,
measured, targets, meets_target, series, elapsed_s}}, ``summary`` {ROW: {status, met, missed,
of}}, ``elapsed_s``. ROW is a scenario's name, or SCENARIO@capN for a wire attack at a cap of
N set with SMARTMIXED_MAX_CONNECTIONS; ``targets`` {KEY: {op, limit}} name keys of
``measured``; ``server`` {pid, nofile, command_shell, connection_cap, connection_cap_source
(server log | computed), log {lines, tracebacks}, and on failure exit_code, log_tail}; a wire
row's ``config`` holds its connection_cap and server_nofile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from smartmixed.bench.load import wrk_version
from smartmixed.bench.server import (
    PAPER_ARCH,
    build_repository,
    check_url,
    free_port,
    pick_models,
    prepare_target,
    server_command,
)
from smartmixed.bench.soak_clients import PROBE_TIMEOUT_S
from smartmixed.bench.soak_scenarios import (
    NOT_STARTED_HERE,
    SCENARIO_RUNNERS,
    SCENARIOS,
    TARGETS,
    Run,
    SoakOptions,
    evaluate,
)
from smartmixed.bench.soak_server import (
    HEALTH_PATH,
    Server,
    SoakError,
    connection_cap,
    read_nofile,
    read_rss_mib,
    shell_command,
    started_server,
)
from smartmixed.bench.soak_wire import (
    WIRE_RUNNERS,
    WIRE_SCENARIOS,
    WIRE_TARGETS,
    row_name,
)
from smartmixed.contract import SpecError, parse_arch, parse_positive_ints, split_list
from smartmixed.contract.outputs import machine_info

GENERATED_MODEL = "mixed"
ALL_SCENARIOS = (*SCENARIOS, *WIRE_SCENARIOS)
ALL_TARGETS = {**TARGETS, **WIRE_TARGETS}
RUNNERS = {**SCENARIO_RUNNERS, **WIRE_RUNNERS}
GROUPS = {"all": ALL_SCENARIOS, "wire": WIRE_SCENARIOS}
STOPS_SERVER = ("sigterm", "slow-readers-sigterm")  # no server left to check after these
METRICS_PORT_ENV = "SMARTMIXED_METRICS_PORT"
DEFAULT_CAP = "default"  # a wire row at the server's own connection cap
MIN_CAP = 8  # serve's smallest max_connections


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
    scenarios: str | Sequence[str] = "all",
    wire_caps: str | Sequence[str | int] = "default,16",
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
    caps = parse_caps(wire_caps)
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
    # one row per scenario; a wire attack once per cap (its server's env sets the cap)
    rows = [
        (row_name(name, cap), name, cap)
        for name in names
        for cap in (caps if name in WIRE_SCENARIOS else [None])
    ]
    use_wrk = _has_wrk()
    results: dict[str, dict[str, Any]] = {}
    command: list[str] | None = None
    load_avg = [os.getloadavg()]
    with (
        tempfile.TemporaryDirectory(prefix="smartmixed-bench-soak-") as tmp,
        tqdm(rows, desc="soak scenarios", disable=not progress) as bar,
    ):
        work = Path(tmp)
        repo_dir = source.repository
        if source.kind == "generated":
            repo_dir = work / "models"
            build_repository(repo_dir, arch=source.arch, seed=seed, models=[GENERATED_MODEL])
        if repo_dir is not None:
            command = server_command(repo_dir, 0)  # the port differs per scenario: PORT below
            command[command.index("--port") + 1] = "PORT"
        for row, name, cap in bar:
            bar.set_postfix_str(row)
            nofile, row_env = None, dict(effective)
            if name == "slow":
                nofile = options.slow_nofile
            elif name == "overload":
                nofile = options.overload_nofile
                # health probed on the server's metrics port too (one the 1024 do not fill)
                row_env.setdefault(METRICS_PORT_ENV, str(free_port()))
            elif name in WIRE_SCENARIOS:
                nofile = options.wire_nofile
                if cap is not None:
                    row_env["SMARTMIXED_MAX_CONNECTIONS"] = str(cap)
            results[row] = _run_scenario(
                row,
                name,
                source=source,
                repository=repo_dir,
                env=row_env,
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
            "wire_caps": [DEFAULT_CAP if c is None else c for c in caps],
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
    row: str,
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
    """One scenario (``row``: with its cap) on its own server; every failure is recorded,
    never raised."""
    goals = ALL_TARGETS[name]
    targets = {key: {"op": op, "limit": limit} for key, (op, limit) in goals.items()}
    entry: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "config": {},
        "server": {},
        "measured": {},
        "targets": targets,
        "meets_target": dict.fromkeys(goals),
        "series": {},
    }
    t0 = time.perf_counter()
    server: Server | None = None
    if name == "sigterm" and source.kind == "url":
        entry.update(
            status="skipped",
            error=NOT_STARTED_HERE,
        )
        return entry
    if name in WIRE_SCENARIOS and source.kind == "url":
        entry.update(
            status="skipped",
            error="needs a server the bench starts (its open-file limit and connection cap "
            "are set per row)",
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
                log_path = work / f"server-{row}.log"
                server = stack.enter_context(
                    started_server(repository, env=env, nofile=nofile, log_path=log_path)
                )
                entry["server"]["command_shell"] = shell_command(server.process.args, env, nofile)
            entry["server"].update(pid=server.pid, nofile=server.nofile)
            target = prepare_target(server.url, source.model, seed=seed, batching=None)
            cap, cap_source = None, None
            if server.process is not None:
                max_connections = int(server_setting("max_connections", env))
                cap, cap_source = connection_cap(server, max_connections=max_connections)
                entry["server"].update(connection_cap=cap, connection_cap_source=cap_source)
            run = Run(
                server=server,
                target=target,
                options=options,
                deadline_s=deadline_s,
                header_timeout_s=header_timeout_s,
                work=work,
                use_wrk=use_wrk,
                config=entry["config"],
                connection_cap=cap,
                metrics_port=_metrics_port(server, env),
                settings={
                    k: server_setting(k, env) for k in ("max_request_bytes", "body_timeout_s")
                },
            )
            measured, series = RUNNERS[name](run)
            if name not in STOPS_SERVER:
                measured["server_alive"] = server.alive()
            entry["measured"], entry["series"] = measured, series
            entry["meets_target"] = evaluate(measured, goals)
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


def _metrics_port(server: Server, env: Mapping[str, str]) -> int | None:
    """The started server's metrics port, when it has one and answers on it (a server older
    than the setting ignores the variable)."""
    port = int(env.get(METRICS_PORT_ENV) or 0)
    if server.process is None or not port:
        return None
    host = server.host_port[0]
    try:
        with httpx.Client(timeout=3.0, trust_env=False) as client:
            live = client.get(f"http://{host}:{port}/v2/health/live").status_code == 200
    except httpx.HTTPError:
        live = False
    return port if live else None


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
