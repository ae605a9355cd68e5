"""HTTP and gRPC serving throughput and latency of ``smartmixed-serve`` under a bounded load,
optionally side by side with MLServer 1.7 on the same model.

What is measured. A point is one (server, model, batching, protocol, concurrency). REST: C
clients, each with one keep-alive connection to 127.0.0.1, send single-sample Open Inference
Protocol (KServe V2) JSON requests (``POST /v2/models/NAME/infer``, FP32 [1, D], the same seeded
raw-pixel row every time) back to back for D seconds; a client sends its next request as soon as
the previous answer arrives (closed loop). gRPC (``protocol`` grpc or both): C ModelInfer calls
in flight over ``grpc_channels`` HTTP/2 connections, the same values as raw_input_contents, from
h2load (``grpc_generator`` h2load, the default) or bench/grpc_load.py's grpc.aio generator
(python); either runs in its own process pinned to one CPU. A record holds what the load
generator saw: completed requests, ``rps`` (successful answers per second of the run),
``samples_per_s`` (rps x rows per request), p50/p95/p99 latency over the completed requests
(send to last byte), and errors (REST: connect, read, write and timeout errors, plus responses
with status >= 400; gRPC: failed calls by status code name). h2load cannot see a gRPC status
(it travels in the trailers): its failed calls are the ones each server counted under a code
other than OK in its own Prometheus counters, read before and after every point
(smartmixed-serve's ``smartmixed_requests_total{endpoint="grpc"}``, MLServer's
``grpc_server_handled_total``), plus h2load's own transport failures. ``mean_batch_rows`` is read from
smartmixed-serve's own Prometheus histogram (rows per ONNX Runtime run) before and after the
point. With ``protocol`` both, each concurrency runs REST then gRPC, and the tables put them
side by side.

Servers. Unless ``url`` targets a running server, one ``smartmixed-serve`` subprocess is started
per batching mode (batching off: ``--max-batch-size 0``) on free 127.0.0.1 ports (HTTP, and gRPC
when measured), waited for through /v2/health/ready and stopped with SIGTERM (kill after a
timeout). Every model is first checked with one request per protocol (it must answer outputs of
shape [1, classes], so a broken body fails loudly instead of as 100% errors) and warmed up for
``warmup`` seconds at the highest concurrency (ORT arenas, batcher, connection pools), which is
not recorded.

Against MLServer. ``against_mlserver`` also serves each model's model.onnx with MLServer 1.7
(bench/mlserver.py: a custom runtime on the same onnxruntime, 1 intra-op thread; MLServer's own
environment .venv-mlserver, ``make mlserver``), started beside smartmixed-serve, which then runs
with ``--intra-op-threads 1`` too. The defaults change to what the comparison needs: the mixed
model, batching on, concurrency 1 and 64, three interleaved rounds (every round measures every
server and protocol at every concurrency, so a slow minute of the shared machine hits both); a
point's table row is the median over its rounds. The ratio of smartmixed's gRPC rps to
MLServer's, per concurrency, is reported beside the tables.

Why wrk. On a 2-core machine a load generator competes with the server for the CPU it measures;
a Python generator (asyncio + httpx) spends far more CPU per request than the server path it
drives and becomes the bottleneck. ``wrk`` (C, epoll) is used when it is installed, with ONE
thread (``-t 1``) so it takes at most one core, and a Lua script that sets the POST body and
prints its summary as one JSON line that is parsed here. The Python generator remains as a
fallback; which one ran is recorded (``load_generator``), and numbers from the two are not
comparable. For gRPC, h2load (nghttp2-client, C) is wrk's counterpart: one thread, pinned to
one core, ``-c CHANNELS -m C/CHANNELS`` streams in flight, the framed request from a file,
per-call latencies from its ``--log-file``. The grpc.aio generator stays available
(``grpc_generator`` python: pre-serialised bytes, no answer decoded, one core) but spends more
CPU per call than the server path it drives; which one ran is recorded (``grpc_generator``)
and there is no fallback between them (a missing h2load is an error naming nghttp2-client).

Models. By default two networks of the paper architecture with seeded random weights are built
and exported (permuted lowering): "mixed", every hidden neuron's activation drawn uniformly from
the six default activations, and "fixed-relu". ``repository`` + ``models`` bench exported models
instead. The targets are evaluated on the records of SmartMixed-mode models and reported, never
asserted.

Modules: the load generators are in bench/load.py (REST) and bench/grpc_load.py (gRPC), the
server (its models, process, check request and metrics) in bench/server.py, MLServer in
bench/mlserver.py; this one holds the options, the measurement loop, the targets and the outputs.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from smartmixed.bench import BenchError, parse_positive_ints
from smartmixed.bench.grpc_load import (
    DEFAULT_CHANNELS,
    H2LOAD,
    PYTHON_GRPC,
    check_address,
    h2load_version,
    mlserver_outcomes,
    prepare_grpc_target,
    resolve_grpc_generator,
    run_grpc,
    run_h2load,
    smartmixed_outcomes,
)
from smartmixed.bench.load import (
    REQUEST_TIMEOUT_S,
    WRK,
    WRK_THREADS,
    resolve_load_generator,
    run_python,
    run_wrk,
    write_wrk_script,
    wrk_version,
)
from smartmixed.bench.server import (
    GENERATED_MODELS,
    HEALTH_READY_PATH,
    PAPER_ARCH,
    ServerError,
    ServerProcess,
    batch_rows,
    build_repository,
    check_url,
    http_client,
    pick_models,
    prepare_target,
    server_env,
    start_server,
)
from smartmixed.contract import SpecError, outputs, parse_arch, split_list
from smartmixed.contract.outputs import machine_info, markdown_table

DEFAULT_CONCURRENCY = (1, 8, 64)
DEFAULT_DURATION_S = 5
DEFAULT_WARMUP_S = 1
BATCHING_MODES = ("on", "off")
PROTOCOLS = ("rest", "grpc", "both")
SMARTMIXED, MLSERVER = "smartmixed", "mlserver"
# --against-mlserver's defaults (each one an option may still set)
MLSERVER_CONCURRENCY = (1, 64)
MLSERVER_ROUNDS = 3
MLSERVER_MODELS = ("mixed",)
MLSERVER_BATCHING = ("on",)
COMPARED_THREADS = 1  # intra-op threads of both servers in the comparison
SETTLE_S = 0.25  # pause before each point: the server drains what the last run left queued
RECORD_KEYS = (
    "server",
    "model",
    "mode",
    "batching",
    "protocol",
    "concurrency",
    "round",
    "duration_s",
    "requests",
    "rps",
    "samples_per_s",
    "mean_ms",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "errors",
    "error_kinds",
    "mean_batch_rows",
)
# A point: the records of one (server, model, batching, protocol, concurrency), one per round
POINT_KEY = ("server", "model", "batching", "protocol", "concurrency")
# Targets on the SmartMixed model's records (2 cores, single-sample requests). A plain target
# takes the worst of its metric over the points it selects (server smartmixed unless it says);
# a ratio target divides that metric between two selections of the same model and concurrency.
TARGETS: dict[str, dict[str, Any]] = {
    "p50_ms_concurrency_1": {
        "limit": 1.5,
        "op": "<=",
        "concurrency": 1,
        "batching": "on",
        "protocol": "rest",
        "metric": "p50_ms",
    },
    "rps_concurrency_64_batching_on": {
        "limit": 1500.0,
        "op": ">=",
        "concurrency": 64,
        "batching": "on",
        "protocol": "rest",
        "metric": "rps",
    },
    "p99_ms_concurrency_64_batching_on": {
        "limit": 100.0,
        "op": "<=",
        "concurrency": 64,
        "batching": "on",
        "protocol": "rest",
        "metric": "p99_ms",
    },
    "errors": {"limit": 0, "op": "<=", "metric": "errors"},
    # smartmixed's gRPC rps / MLServer's gRPC rps, same model, c=64
    "grpc_rps_vs_mlserver_concurrency_64": {
        "limit": 3.0,
        "op": ">=",
        "concurrency": 64,
        "metric": "rps",
        "ratio": (
            {"server": SMARTMIXED, "protocol": "grpc"},
            {"server": MLSERVER, "protocol": "grpc"},
        ),
    },
    # smartmixed's gRPC p50 / its REST p50, same model and batching, c=1
    "grpc_p50_vs_rest_concurrency_1": {
        "limit": 1.0,
        "op": "<=",
        "concurrency": 1,
        "metric": "p50_ms",
        "ratio": (
            {"server": SMARTMIXED, "protocol": "grpc"},
            {"server": SMARTMIXED, "protocol": "rest"},
        ),
    },
}


# what config.grpc_load_generator says of each
GRPC_GENERATOR_TEXT = {
    H2LOAD: "h2load (nghttp2, C), one thread pinned to one CPU, the framed request from a file; "
    "failed calls counted by the server's own gRPC counters before and after each point",
    PYTHON_GRPC: "grpc.aio closed loop, its own process pinned to one CPU, pre-serialised "
    "requests, answers not decoded",
}


class HttpBenchError(BenchError):
    """Options the HTTP bench cannot run with (a server that fails raises ServerError, a load
    generator LoadGeneratorError, a missing MLServer environment MLServerMissing; all are
    BenchErrors, which the CLI reports)."""


# --------------------------------------------------------------------------------------------
# Options


def parse_batching(text: str | Sequence[str]) -> list[str]:
    """'on,off' -> ['on', 'off'] (order kept, duplicates dropped)."""
    items = [v.lower() for v in split_list(text)]
    bad = [v for v in items if v not in BATCHING_MODES]
    if not items or bad:
        raise HttpBenchError(f"batching must be a list of on / off (got {text!r})")
    return list(dict.fromkeys(items))


def parse_models(text: str | Sequence[str] | None) -> list[str] | None:
    if text is None:
        return None
    items = split_list(text)
    if not items:
        raise HttpBenchError("--models is empty; expected names such as mixed,fixed-relu")
    return list(dict.fromkeys(items))


def parse_protocol(text: str) -> list[str]:
    """rest | grpc | both -> the protocols measured, REST first."""
    if text not in PROTOCOLS:
        raise HttpBenchError(f"--protocol must be one of {', '.join(PROTOCOLS)} (got {text!r})")
    return ["rest", "grpc"] if text == "both" else [text]


@contextlib.contextmanager
def running_server(
    repository: Path, *, batching: bool, log_dir: Path, grpc: bool, threads: int | None
) -> Iterator[ServerProcess]:
    """smartmixed-serve over ``repository``, batching on or off (``--max-batch-size 0``), its
    gRPC endpoint on a free port when ``grpc``, ``threads`` intra-op threads (None: ORT's)."""
    args = ["--log-level", "warning"] + ([] if batching else ["--max-batch-size", "0"])
    if threads is not None:
        args += ["--intra-op-threads", str(threads)]
    log_path = log_dir / f"server-{'on' if batching else 'off'}.log"
    with start_server(repository, args=args, log_path=log_path, grpc=grpc) as server:
        yield server


# --------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Measured:
    """One thing measured at every concurrency: a server's model over one protocol."""

    server: str  # smartmixed | mlserver
    protocol: str  # rest | grpc
    model: str
    mode: str | None  # the model's smartmixed mode (from smartmixed-serve's metadata)
    batching: str
    run: Callable[[int, int], dict[str, Any]]  # (concurrency, seconds) -> the raw result
    metrics_url: str | None  # smartmixed-serve's base URL, for rows per run


def _record(
    point: Measured, concurrency: int, raw: dict[str, Any], rows: float | None, round_: int
) -> dict:
    if point.protocol == "grpc":  # every failed call was answered, with its status code
        errors = failed = sum(raw["error_kinds"].values())
    else:  # wrk counts a >= 400 answer as a request; the other kinds never reached one
        errors, failed = sum(raw["error_kinds"].values()), raw["error_kinds"]["status"]
    ok = max(raw["requests"] - failed, 0)
    rps = ok / raw["duration_s"] if raw["duration_s"] > 0 else 0.0
    record = {
        "server": point.server,
        "model": point.model,
        "mode": point.mode,
        "batching": point.batching,
        "protocol": point.protocol,
        "concurrency": concurrency,
        "round": round_,
        "duration_s": round(raw["duration_s"], 3),
        "requests": raw["requests"],
        "rps": rps,
        "samples_per_s": rps * 1,  # 1 row per request
        "mean_ms": raw["mean_ms"],
        "p50_ms": raw["p50_ms"],
        "p95_ms": raw["p95_ms"],
        "p99_ms": raw["p99_ms"],
        "max_ms": raw["max_ms"],
        "errors": errors,
        "error_kinds": raw["error_kinds"],
        "mean_batch_rows": rows,
    }
    return {k: record[k] for k in RECORD_KEYS}


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per point (POINT_KEY) in run order: the median over its rounds of rps and the
    latencies, requests and errors summed, the largest max. One round: the record itself."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in POINT_KEY), []).append(r)

    def median(rows: list[Mapping[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    summary = []
    for rows in groups.values():
        kinds: dict[str, int] = {}
        for r in rows:
            for kind, n in r["error_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + n
        row = dict(rows[0])
        row |= {
            "round": None if len(rows) > 1 else rows[0]["round"],
            "rounds": len(rows),
            "duration_s": round(sum(r["duration_s"] for r in rows), 3),
            "requests": sum(r["requests"] for r in rows),
            "errors": sum(r["errors"] for r in rows),
            "error_kinds": kinds,
            "max_ms": max((r["max_ms"] for r in rows if r["max_ms"] is not None), default=None),
        }
        for key in ("rps", "samples_per_s", "mean_ms", "p50_ms", "p95_ms", "p99_ms"):
            row[key] = median(rows, key)
        row["mean_batch_rows"] = median(rows, "mean_batch_rows")
        summary.append(row)
    return summary


def _selects(r: Mapping[str, Any], selection: Mapping[str, Any]) -> bool:
    return all(r[k] == v for k, v in selection.items())


def evaluate_targets(records: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    """(measured value, met) per target, on the SmartMixed-mode models' points (medians over
    rounds; see TARGETS). A target whose points were not measured (no such concurrency,
    batching mode, protocol or server, no SmartMixed model) is None in both."""
    points = summarize(records)
    mixed = {r["model"] for r in points if r["mode"] == "smartmixed"}
    measured: dict[str, Any] = {}
    met: dict[str, bool | None] = {}
    for key, t in TARGETS.items():
        values: list[float] = []
        if "ratio" in t:
            top, bottom = t["ratio"]
            for r in points:
                if r["model"] not in mixed or r["concurrency"] != t["concurrency"]:
                    continue
                if not _selects(r, top):
                    continue
                under = [
                    d
                    for d in points
                    if d["model"] == r["model"]
                    and d["concurrency"] == r["concurrency"]
                    and _selects(d, bottom)
                    and (bottom["server"] != r["server"] or d["batching"] == r["batching"])
                ]
                values += [
                    r[t["metric"]] / d[t["metric"]]
                    for d in under
                    if r[t["metric"]] is not None and d[t["metric"]]
                ]
        elif key == "errors":  # every model, every smartmixed point
            values = [r["errors"] for r in points if r["server"] == SMARTMIXED]
        else:
            selection = {"server": SMARTMIXED} | {
                k: t[k] for k in ("concurrency", "batching", "protocol") if k in t
            }
            values = [
                r[t["metric"]]
                for r in points
                if r["model"] in mixed and _selects(r, selection) and r[t["metric"]] is not None
            ]
        if not values:
            measured[key], met[key] = None, None
            continue
        worst = max(values) if t["op"] == "<=" else min(values)
        measured[key] = worst
        met[key] = bool(worst <= t["limit"] if t["op"] == "<=" else worst >= t["limit"])
    return measured, met


@dataclass
class Plan:
    """Where the models come from and which servers to start, from validated options."""

    source: str  # generated | repository | url
    models: list[str]
    modes: list[str | None]  # batching per server to start; [None]: the running server at url
    arch: list[int] | None = None  # generated models only
    repository: Path | None = None  # --repository only
    url: str | None = None  # --url only
    grpc_address: str | None = None  # --url with gRPC only


def _plan(
    *,
    arch: str | Sequence[int] | None,
    repository: Path | str | None,
    models: str | Sequence[str] | None,
    url: str | None,
    grpc_address: str | None,
    batching: str | Sequence[str] | None,
    protocols: list[str],
    against_mlserver: bool,
) -> Plan:
    names = parse_models(models)
    try:
        arch_list = parse_arch(arch) if arch is not None else None
    except SpecError as e:
        raise HttpBenchError(f"--arch: {e}") from None
    if grpc_address is not None and url is None:
        raise HttpBenchError("--grpc-address goes with --url (a started server's port is known)")
    if url is not None:
        if repository is not None or arch is not None:
            raise HttpBenchError(
                "--url targets a running server: --repository and --arch "
                "belong to the server, not the bench"
            )
        if against_mlserver:
            raise HttpBenchError(
                "--against-mlserver starts both servers on the same model files; it cannot go "
                "with --url"
            )
        if batching is not None:
            raise HttpBenchError(
                "--url: batching is the running server's setting; leave "
                "--batching out (it is read from the model config)"
            )
        if "grpc" in protocols and grpc_address is None:
            raise HttpBenchError(
                "--url with --protocol grpc or both needs --grpc-address 127.0.0.1:PORT"
            )
        base = check_url(url)
        if grpc_address is not None:
            check_address(grpc_address)
        if names is None:
            raise HttpBenchError("--url needs --models NAME[,NAME] (the server's model names)")
        try:
            with http_client(timeout=3.0) as client:
                ready = client.get(base + HEALTH_READY_PATH).status_code
        except httpx.HTTPError as e:
            raise HttpBenchError(f"--url {url}: not reachable ({type(e).__name__}: {e})") from None
        if ready != 200:
            raise HttpBenchError(f"--url {url}: /v2/health/ready answered {ready}")
        return Plan(source="url", models=names, modes=[None], url=base, grpc_address=grpc_address)
    default_modes = MLSERVER_BATCHING if against_mlserver else BATCHING_MODES
    modes: list[str | None] = list(
        parse_batching(batching if batching is not None else default_modes)
    )
    if repository is not None:
        if arch is not None:
            raise HttpBenchError("--arch builds models; it cannot go with --repository")
        repository, names = pick_models(repository, names, HttpBenchError)
        return Plan(source="repository", models=names, modes=modes, repository=repository)
    names = names or list(MLSERVER_MODELS if against_mlserver else GENERATED_MODELS)
    unknown = [n for n in names if n not in GENERATED_MODELS]
    if unknown:
        raise HttpBenchError(
            f"--models {', '.join(unknown)}: without --repository the bench builds "
            f"{' and '.join(GENERATED_MODELS)}; pass --repository DIR for others"
        )
    return Plan(source="generated", models=names, modes=modes, arch=arch_list or list(PAPER_ARCH))


def _model_file(repository: Path, name: str) -> Path:
    """NAME/VERSION/model.onnx of the newest version (what smartmixed-serve serves)."""
    versions = sorted(
        int(v.name) for v in (repository / name).iterdir() if v.is_dir() and v.name.isdigit()
    )
    return repository / name / str(versions[-1]) / "model.onnx"


def measure_http(
    *,
    arch: str | Sequence[int] | None = None,
    repository: Path | str | None = None,
    models: str | Sequence[str] | None = None,
    url: str | None = None,
    grpc_address: str | None = None,
    protocol: str = "rest",
    against_mlserver: bool = False,
    concurrency: str | Sequence[int] | None = None,
    duration: int = DEFAULT_DURATION_S,
    warmup: int = DEFAULT_WARMUP_S,
    rounds: int | None = None,
    batching: str | Sequence[str] | None = None,
    load_generator: str = "auto",
    grpc_generator: str = H2LOAD,
    grpc_channels: int = DEFAULT_CHANNELS,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Drive the server(s) at every model x batching x concurrency (x protocol, x server with
    ``against_mlserver``, x round); returns the http.json record.

    ``concurrency`` defaults to 1,8,64 (1,64 with ``against_mlserver``), ``rounds`` to 1 (3).
    Options are validated before any server starts; HttpBenchError for bad options, and for a
    server or load generator that fails (not for failed requests: those are counted as errors);
    MLServerMissing when ``against_mlserver`` finds no .venv-mlserver.
    """
    from smartmixed.bench import mlserver

    started = time.perf_counter()
    levels = parse_positive_ints(
        concurrency
        if concurrency is not None
        else (MLSERVER_CONCURRENCY if against_mlserver else DEFAULT_CONCURRENCY),
        "concurrency",
    )
    if type(duration) is not int or duration < 1:
        raise HttpBenchError(f"duration must be a whole number of seconds >= 1 (got {duration!r})")
    if type(warmup) is not int or warmup < 0:
        raise HttpBenchError(f"warm-up must be a whole number of seconds >= 0 (got {warmup!r})")
    rounds = rounds if rounds is not None else (MLSERVER_ROUNDS if against_mlserver else 1)
    if type(rounds) is not int or rounds < 1:
        raise HttpBenchError(f"rounds must be a whole number >= 1 (got {rounds!r})")
    if type(grpc_channels) is not int or grpc_channels < 1:
        raise HttpBenchError(f"gRPC channels must be a whole number >= 1 (got {grpc_channels!r})")
    protocols = parse_protocol(protocol)
    generator = resolve_load_generator(load_generator) if "rest" in protocols else None
    grpc_gen = resolve_grpc_generator(grpc_generator) if "grpc" in protocols else None
    if against_mlserver:
        mlserver.mlserver_command()  # MLServerMissing: run make mlserver
    plan = _plan(
        arch=arch,
        repository=repository,
        models=models,
        url=url,
        grpc_address=grpc_address,
        batching=batching,
        protocols=protocols,
        against_mlserver=against_mlserver,
    )
    names, modes = plan.models, plan.modes
    threads = COMPARED_THREADS if against_mlserver else None
    records: list[dict[str, Any]] = []
    server_commands: list[list[str]] = []
    mlserver_info: dict[str, Any] | None = None
    targets_info: dict[str, dict[str, Any]] = {}
    servers = 2 if against_mlserver else 1
    total = len(modes) * len(names) * len(levels) * len(protocols) * servers * rounds
    with (
        tempfile.TemporaryDirectory(prefix="smartmixed-bench-http-") as tmp,
        tqdm(total=total, desc="http points", disable=not progress) as bar,
    ):
        work = Path(tmp)
        repo_dir = plan.repository
        if plan.source == "generated":
            repo_dir = work / "models"
            build_repository(repo_dir, arch=plan.arch, seed=seed, models=names)
        for mode in modes:
            if mode is None:  # the running server at --url
                server = contextlib.nullcontext(None)
            else:
                server = running_server(
                    repo_dir,
                    batching=mode == "on",
                    log_dir=work,
                    grpc="grpc" in protocols,
                    threads=threads,
                )
            with server as process:
                server_url = plan.url if process is None else process.url
                address = plan.grpc_address if process is None else process.grpc_address
                if process is not None:
                    server_commands.append(process.command)
                for name in names:
                    with contextlib.ExitStack() as stack:
                        points = _prepare_points(
                            name,
                            mode=mode,
                            protocols=protocols,
                            server_url=server_url,
                            grpc_address=address,
                            generator=generator,
                            grpc_generator=grpc_gen,
                            grpc_channels=grpc_channels,
                            work=work,
                            seed=seed,
                            info=targets_info,
                        )
                        if against_mlserver:
                            info = targets_info[name]
                            ml = stack.enter_context(
                                mlserver.start_mlserver(
                                    _model_file(repo_dir, name),
                                    name=name,
                                    input_shape=info["input_shape"],
                                    outputs=info["outputs"],
                                    n_classes=info["n_classes"],
                                    log_path=work / f"mlserver-{name}.log",
                                )
                            )
                            mlserver_info = {
                                "version": mlserver.mlserver_version(),
                                "command": ml.command,
                                "settings": ml.settings,
                                "runtime": mlserver.RUNTIME_CLASS,
                                "intra_op_threads": COMPARED_THREADS,
                            }
                            points += _prepare_points(
                                name,
                                mode=None,
                                protocols=protocols,
                                server_url=ml.url,
                                grpc_address=ml.grpc_address,
                                generator=generator,
                                grpc_generator=grpc_gen,
                                grpc_channels=grpc_channels,
                                work=work,
                                seed=seed,
                                info=None,
                                server=MLSERVER,
                                metrics_url=ml.metrics_url,
                            )
                        if warmup:  # not recorded: arenas, batcher, connection pools
                            for point in points:
                                point.run(max(levels), warmup)
                        for round_ in range(rounds):
                            for level in levels:
                                for point in points:
                                    bar.set_postfix_str(
                                        f"{point.server} {name} {point.protocol} "
                                        f"batching {point.batching} c={level}"
                                    )
                                    records.append(_measure_point(point, level, duration, round_))
                                    bar.update()

    measured, met = evaluate_targets(records)
    return {
        "config": {
            "source": plan.source,
            "arch": plan.arch,
            "repository": str(plan.repository) if plan.repository else None,
            "url": plan.url,
            "grpc_address": plan.grpc_address,
            "models": targets_info,
            "mixed_assignment": "uniformly random over the six default activations per neuron"
            if plan.source == "generated"
            else None,
            "lowering": "permuted" if plan.source == "generated" else None,
            "protocols": protocols,
            "concurrency": levels,
            "duration_s": duration,
            "warmup_s": warmup,
            "rounds": rounds,
            "batching": [m for m in modes if m is not None] or None,
            "rows_per_request": 1,
            "request": "POST /v2/models/NAME/infer, V2 JSON, FP32 [1, D], seeded raw pixels"
            if "rest" in protocols
            else None,
            "grpc_request": "ModelInfer, FP32 [1, D] (or the model's [1, C, H, W]) as "
            "raw_input_contents, the same seeded raw pixels"
            if "grpc" in protocols
            else None,
            "grpc_load_generator": GRPC_GENERATOR_TEXT.get(grpc_gen),
            "h2load_version": h2load_version() if grpc_gen == H2LOAD else None,
            "grpc_channels": grpc_channels if "grpc" in protocols else None,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "load_generator_threads": WRK_THREADS if generator == WRK else 1,
            "wrk_version": wrk_version() if generator == WRK else None,
            "server_commands": server_commands,
            "server_env": server_env() if plan.source != "url" else None,
            "mlserver": mlserver_info,
            "seed": seed,
        },
        "machine": {**machine_info(), "onnxruntime": _ort_version()},
        "load_generator": generator,
        "grpc_generator": grpc_gen,
        "records": records,
        "points": summarize(records),
        "targets": {k: {"limit": t["limit"], "op": t["op"]} for k, t in TARGETS.items()},
        "target_values": measured,
        "meets_targets": met,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def _prepare_points(
    name: str,
    *,
    mode: str | None,
    protocols: Sequence[str],
    server_url: str,
    grpc_address: str | None,
    generator: str | None,
    grpc_generator: str | None,
    grpc_channels: int,
    work: Path,
    seed: int,
    info: dict[str, dict[str, Any]] | None,
    server: str = SMARTMIXED,
    metrics_url: str | None = None,
) -> list[Measured]:
    """Check ``name`` on one server over each protocol; what to run at each concurrency.

    ``mode``: the batching of a smartmixed-serve this bench started (None: read from the
    running server's model config). MLServer runs without adaptive batching ("off"). ``info``
    (smartmixed-serve only) collects the model's description for the result. ``metrics_url``:
    MLServer's Prometheus endpoint, where h2load's failed calls are counted (smartmixed-serve's
    is SERVER_URL/metrics).
    """
    if server == MLSERVER:
        model_mode, batching = None, "off"
    else:
        meta = _metadata(server_url, name)
        model_mode = meta["mode"]
        batching = mode or _config_batching(server_url, name)
        if info is not None:
            info.setdefault(name, {}).update(meta)
    points: list[Measured] = []
    for protocol in protocols:
        if protocol == "rest":
            target = prepare_target(server_url, name, seed=seed, batching=batching)
            script = write_wrk_script(work, target.body) if generator == WRK else None
            runner = run_wrk if generator == WRK else run_python

            def run(level: int, seconds: int, target=target, script=script, runner=runner):
                return runner(target, concurrency=level, duration=seconds, script=script)

            request_bytes = {"request_bytes": len(target.body), "n_features": target.n_features}
        else:
            if grpc_address is None:
                raise HttpBenchError(f"{server}: no gRPC address to measure")
            grpc_target = prepare_grpc_target(grpc_address, name, seed=seed)
            if grpc_generator == H2LOAD:
                if server == MLSERVER:
                    assert metrics_url is not None, "MLServer's metrics URL counts its errors"
                    outcomes = partial(mlserver_outcomes, metrics_url)
                else:
                    outcomes = partial(smartmixed_outcomes, f"{server_url}/metrics")
                outcomes()  # a server whose counters cannot be read fails here, not mid-run

                def run(level: int, seconds: int, grpc_target=grpc_target, outcomes=outcomes):
                    return run_h2load(
                        grpc_target,
                        concurrency=level,
                        duration=seconds,
                        channels=grpc_channels,
                        outcomes=outcomes,
                    )
            else:

                def run(level: int, seconds: int, grpc_target=grpc_target):
                    return run_grpc(
                        grpc_target, concurrency=level, duration=seconds, channels=grpc_channels
                    )

            request_bytes = {"grpc_request_bytes": len(grpc_target.request)}
        if info is not None:
            info[name].update(request_bytes)
        points.append(
            Measured(
                server=server,
                protocol=protocol,
                model=name,
                mode=model_mode,
                batching=batching,
                run=run,
                metrics_url=server_url if server == SMARTMIXED else None,
            )
        )
    return points


def _metadata(base: str, name: str) -> dict[str, Any]:
    """smartmixed-serve's description of ``name``: mode, architecture, input shape (batch
    axis 1), outputs and classes (what MLServer's model settings need)."""
    try:
        with http_client() as client:
            response = client.get(f"{base}/v2/models/{name}")
    except httpx.HTTPError as e:
        raise ServerError(f"model {name!r}: {base} failed ({type(e).__name__}: {e})") from None
    if response.status_code != 200:
        raise ServerError(
            f"model {name!r}: GET /v2/models/{name} answered {response.status_code}: "
            f"{response.text[:300]}"
        )
    try:
        info = response.json()
        smartmixed = info.get("smartmixed") or {}
        return {
            "mode": smartmixed.get("mode"),
            "architecture": smartmixed.get("architecture"),
            "input_shape": [1, *(int(d) for d in info["inputs"][0]["shape"][1:])],
            "outputs": [o["name"] for o in info["outputs"]],
            "n_classes": int(info["outputs"][0]["shape"][-1]),
        }
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ServerError(f"model {name!r}: unexpected metadata {response.text[:300]!r}") from None


def _config_batching(base: str, name: str) -> str:
    with http_client() as client:
        config = client.get(f"{base}/v2/models/{name}/config")
    if config.status_code != 200:
        return "unknown"
    return "on" if "dynamic_batching" in config.json() else "off"


def _measure_point(point: Measured, level: int, duration: int, round_: int) -> dict[str, Any]:
    # requests the previous run left in flight must not count here
    time.sleep(SETTLE_S)
    before = batch_rows(point.metrics_url, point.model) if point.metrics_url else None
    raw = point.run(level, duration)
    after = batch_rows(point.metrics_url, point.model) if point.metrics_url else None
    rows = None
    if before and after and after[1] > before[1]:
        rows = (after[0] - before[0]) / (after[1] - before[1])
    return _record(point, level, raw, rows, round_)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --------------------------------------------------------------------------------------------
# Outputs


POINT_COLUMNS = (
    "concurrency",
    "server",
    "protocol",
    "requests/s",
    "samples/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "errors",
    "rows/run",
)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(result: Mapping[str, Any]) -> str:
    c, m = result["config"], result["machine"]
    generator = result["load_generator"]
    protocols = c.get("protocols", ["rest"])
    how = []
    if "rest" in protocols:
        how.append(
            f"REST: wrk ({c['load_generator_threads']} thread, keep-alive connections)"
            if generator == WRK
            else "REST: Python asyncio + httpx (in the bench process; shares the CPU with the "
            "server)"
        )
    if "grpc" in protocols:
        how.append(
            (
                "gRPC: h2load (1 thread, one CPU; failed calls counted by each server's own "
                "gRPC counters)"
                if result.get("grpc_generator") == H2LOAD
                else "gRPC: grpc.aio closed loop in its own process on one CPU"
            )
            + f", {c['grpc_channels']} connection(s)"
        )
    rounds = c.get("rounds", 1)
    per_point = f"{c['duration_s']} s per point" + (
        f", {rounds} interleaved rounds (medians shown)" if rounds > 1 else ""
    )
    lines = [
        "# Serving: requests/s and latency",
        "",
        f"Load generators: {'; '.join(how)}. {per_point} after a {c['warmup_s']} s warm-up; "
        "one sample per request (FP32 [1, D]); servers on 127.0.0.1.",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}. Run took {result['elapsed_s']} s.",
    ]
    if c.get("mlserver"):
        ml = c["mlserver"]
        lines.append(
            f"MLServer {ml['version']}: custom runtime {ml['runtime']} (onnxruntime, "
            f"{ml['intra_op_threads']} intra-op thread), parallel_workers "
            f"{ml['settings']['parallel_workers']}, no adaptive batching; smartmixed-serve with "
            f"--intra-op-threads {ml['intra_op_threads']}."
        )
    lines.append("")
    points = result.get("points") or summarize(result["records"])
    for (model, batching), rows in _by_model_and_batching(points).items():
        info = c["models"].get(model, {})
        arch = info.get("architecture")
        lines += [
            f"## {model} ({info.get('mode') or 'unknown mode'}"
            f"{f', {arch}' if arch else ''}), batching {batching}",
            "",
            *markdown_table(POINT_COLUMNS, [_point_cells(r) for r in rows]),
            "",
        ]
    comparison = _mlserver_rows(points)
    if comparison:
        lines += [
            "## smartmixed-serve against MLServer (gRPC, medians)",
            "",
            *markdown_table(
                (
                    "model",
                    "concurrency",
                    "smartmixed rps",
                    "MLServer rps",
                    "ratio",
                    "smartmixed p50 ms",
                    "MLServer p50 ms",
                ),
                comparison,
            ),
            "",
        ]
    targets = [
        (
            key,
            f"{t['op']} {t['limit']}",
            _fmt(result["target_values"].get(key)),
            _verdict(result["meets_targets"].get(key)),
        )
        for key, t in result["targets"].items()
    ]
    lines += [
        "## Targets (SmartMixed model)",
        "",
        *markdown_table(("target", "limit", "measured", "met"), targets),
        "",
        "requests/s counts successful answers; rows/run is smartmixed-serve's mean rows per ONNX "
        "Runtime run over the point (1.0 without batching; - for MLServer). The *_vs_* targets "
        "are ratios.",
    ]
    return "\n".join(lines) + "\n"


def _point_cells(r: Mapping[str, Any]) -> tuple[Any, ...]:
    """One point as its table row, in POINT_COLUMNS order."""
    return (
        r["concurrency"],
        r.get("server", SMARTMIXED),
        r.get("protocol", "rest"),
        _fmt(r["rps"], 0),
        _fmt(r["samples_per_s"], 0),
        _fmt(r["p50_ms"]),
        _fmt(r["p95_ms"]),
        _fmt(r["p99_ms"]),
        r["errors"],
        _fmt(r["mean_batch_rows"], 1),
    )


def _mlserver_rows(points: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """(model, concurrency, rps both, ratio, p50 both) for each gRPC point both servers ran."""
    rows = []
    for r in points:
        if r.get("server") != SMARTMIXED or r.get("protocol") != "grpc":
            continue
        for other in points:
            if (
                other.get("server") == MLSERVER
                and other.get("protocol") == "grpc"
                and other["model"] == r["model"]
                and other["concurrency"] == r["concurrency"]
            ):
                ratio = r["rps"] / other["rps"] if other["rps"] else None
                rows.append(
                    (
                        r["model"],
                        r["concurrency"],
                        _fmt(r["rps"], 0),
                        _fmt(other["rps"], 0),
                        _fmt(ratio, 2),
                        _fmt(r["p50_ms"]),
                        _fmt(other["p50_ms"]),
                    )
                )
    return rows


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def _by_model_and_batching(
    points: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """The points of each (model, smartmixed-serve's batching), by concurrency, then server and
    protocol in run order: one table each. MLServer's points go in every table of their model."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in points:
        if r.get("server", SMARTMIXED) == SMARTMIXED:
            groups.setdefault((r["model"], r["batching"]), []).append(r)
    for (model, _), rows in groups.items():
        rows += [r for r in points if r.get("server") == MLSERVER and r["model"] == model]
    order = {id(r): i for i, r in enumerate(points)}
    return {
        key: sorted(rows, key=lambda r: (r["concurrency"], order[id(r)]))
        for key, rows in groups.items()
    }


def plot(result: Mapping[str, Any], path: Path) -> None:
    plt = outputs.pyplot()

    points = result.get("points") or summarize(result["records"])
    lines: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in points:
        key = (r.get("server", SMARTMIXED), r["model"], r["batching"], r.get("protocol", "rest"))
        lines.setdefault(key, []).append(r)
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(10, 4))
    for (server, model, batching, protocol), rows in lines.items():
        rows = sorted(rows, key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        style = ("-" if batching == "on" else "--") if server == SMARTMIXED else ":"
        marker = "o" if protocol == "rest" else "s"
        label = f"{server} {model}, {protocol}" + (
            f", batching {batching}" if server == SMARTMIXED else ""
        )
        ax_rps.plot(xs, [r["rps"] for r in rows], style, marker=marker, label=label)
        ax_p99.plot(xs, [r["p99_ms"] for r in rows], style, marker=marker, label=label)
    levels = sorted({r["concurrency"] for r in points})
    for ax in (ax_rps, ax_p99):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, labels=[str(c) for c in levels])
        ax.set_xlabel("concurrent requests in flight")
        ax.grid(True, alpha=0.3)
    ax_rps.set_ylabel("requests/s (successful)")
    ax_p99.set_ylabel("p99 latency (ms)")
    ax_p99.set_yscale("log")
    ax_rps.legend(fontsize=7)
    protocols = "/".join(result["config"].get("protocols", ["rest"]))
    fig.suptitle(f"single-sample requests over {protocols}, servers on 127.0.0.1", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """DIR/http.{json,md,png}, each written atomically."""
    return outputs.write_outputs(result, out, "http", render=render_markdown, draw=plot)
