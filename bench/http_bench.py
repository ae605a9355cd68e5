"""HTTP and gRPC serving throughput and latency of ``smartmixed-serve`` under a bounded load,
optionally beside MLServer 1.7 on the same model (docs/bench.md: what is measured, http.json).

A point is one (server, model, batching, protocol, concurrency): C closed-loop clients send
single-sample requests for D seconds from bench/load.py's generators; its record holds what the
generator saw and smartmixed-serve's mean rows per ONNX Runtime run. Unless ``url`` targets a
running server, one smartmixed-serve is started per batching mode (bench/server.py); each model
is checked with one request per protocol and warmed up, unrecorded. With ``against_mlserver``,
MLServer (bench/server.py's ``start_mlserver``) serves each model beside it, both at 1 intra-op thread, in
interleaved rounds (a slow minute of the shared machine hits both); tables show medians.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from smartmixed.bench import PAPER_ARCH, BenchError, flag, load, parse_positive_ints
from smartmixed.bench.server import (
    GENERATED_MODELS,
    RUNTIME_CLASS,
    batch_rows,
    build_repository,
    check_ready,
    check_url,
    config_batching,
    mlserver_command,
    mlserver_version,
    model_info,
    model_versions,
    pick_models,
    prepare_target,
    server_env,
    start_mlserver,
    start_server,
)
from smartmixed.contract import SpecError, outputs, parse_arch, split_list
from smartmixed.contract.outputs import machine_info, markdown_table

DEFAULT_CONCURRENCY = (1, 8, 64)
DEFAULT_ROUNDS = 1
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
    *("server", "model", "mode", "batching", "protocol", "concurrency", "round", "duration_s"),
    *("requests", "rps", "samples_per_s", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms"),
    *("errors", "error_kinds", "mean_batch_rows"),
)
# A point: the records of one (server, model, batching, protocol, concurrency), one per round
POINT_KEY = ("server", "model", "batching", "protocol", "concurrency")
# Targets on the SmartMixed model's records (2 cores, single-sample requests): name -> (op,
# limit, metric, concurrency, selection). A plain target takes the worst of its metric over the
# points it selects (server smartmixed unless it says); a ratio target's selection is a pair, the
# metric divided between them for the same model and concurrency.
SM_REST, SM_GRPC, ML_GRPC = (
    {"server": server, "protocol": protocol}
    for server, protocol in ((SMARTMIXED, "rest"), (SMARTMIXED, "grpc"), (MLSERVER, "grpc"))
)
REST_ON = {"protocol": "rest", "batching": "on"}
TARGETS: dict[str, tuple[str, float, str, int | None, Any]] = {
    "p50_ms_concurrency_1": ("<=", 1.5, "p50_ms", 1, REST_ON),
    "rps_concurrency_64_batching_on": (">=", 1500.0, "rps", 64, REST_ON),
    "p99_ms_concurrency_64_batching_on": ("<=", 100.0, "p99_ms", 64, REST_ON),
    "errors": ("<=", 0, "errors", None, {}),  # every model's smartmixed points
    "grpc_rps_vs_mlserver_concurrency_64": (">=", 3.0, "rps", 64, (SM_GRPC, ML_GRPC)),
    # its gRPC p50 / its REST p50, same model and batching
    "grpc_p50_vs_rest_concurrency_1": ("<=", 1.0, "p50_ms", 1, (SM_GRPC, SM_REST)),
}
# what config says of the generated models and of each protocol's and generator's requests
MIXED_ASSIGNMENT = "uniformly random over the six default activations per neuron"
REQUESTS = {
    "rest": "POST /v2/models/NAME/infer, V2 JSON, FP32 [1, D], seeded raw pixels",
    "grpc": "ModelInfer, FP32 [1, D] (or the model's [1, C, H, W]) as raw_input_contents, the "
    "same seeded raw pixels",
}
GRPC_GENERATOR_TEXT = {
    load.H2LOAD: "h2load (nghttp2, C), one thread pinned to one CPU, the framed request from a file; "
    "failed calls counted by the server's own gRPC counters before and after each point",
    load.PYTHON_GRPC: "grpc.aio closed loop, its own process pinned to one CPU, pre-serialised "
    "requests, answers not decoded",
}


# --------------------------------------------------------------------------------------------
# Options


def _listed(values: Sequence[Any]) -> str:
    return ",".join(map(str, values))


@dataclass
class HttpOptions:
    """What ``smartmixed-bench http`` measures (a flag per field: bench.add_options). Checked
    when made, before any server starts; the defaults ``against_mlserver`` changes filled in."""

    # one option a line: a table
    # fmt: off
    arch: str | Sequence[int] | None = flag("layer widths of the built models (default: the paper's)", default=None)
    repository: Path | None = flag("bench these exported models instead of building two", default=None)  # noqa: RUF009 (flag returns a dataclasses.field)
    models: str | Sequence[str] | None = flag("model names (default: mixed,fixed-relu, or all in --repository)", default=None)
    url: str | None = flag("http://127.0.0.1:PORT of a running server (none is started)", default=None)
    grpc_address: str | None = flag("with --url: 127.0.0.1:PORT of that server's gRPC endpoint", default=None)
    protocol: str = flag("rest (V2 JSON), grpc (ModelInfer, raw tensors) or both side by side", PROTOCOLS, default="rest")
    against_mlserver: bool = flag(
        "also serve each model with MLServer 1.7 (.venv-mlserver, make mlserver) and "
        f"measure both, both servers at {COMPARED_THREADS} intra-op thread (defaults then: "
        f"--models {_listed(MLSERVER_MODELS)}, --batching {_listed(MLSERVER_BATCHING)}, "
        f"--concurrency {_listed(MLSERVER_CONCURRENCY)}, --rounds {MLSERVER_ROUNDS})",
        default=False,
    )
    concurrency: str | Sequence[int] | None = flag(f"connections (REST) / calls in flight (gRPC) (default {_listed(DEFAULT_CONCURRENCY)})", default=None)
    duration: int = flag("seconds per point", default=5)
    rounds: int | None = flag(f"interleaved rounds; tables show medians (default {DEFAULT_ROUNDS})", default=None)
    grpc_channels: int = flag("HTTP/2 connections the gRPC calls share", default=load.DEFAULT_CHANNELS)
    grpc_generator: str = flag(
        "gRPC load: h2load (nghttp2-client, make system-deps; failed calls counted by the "
        "server's metrics) or python (grpc.aio closed loop)",
        load.GRPC_GENERATORS,
        default=load.H2LOAD,
    )
    warmup: int = flag("unrecorded seconds per server and model first", default=1)
    batching: str | Sequence[str] | None = flag("on,off (default both; not with --url)", default=None)
    load_generator: str = flag("auto: wrk when installed, else Python (asyncio + httpx)", load.LOAD_GENERATORS, default="auto")
    seed: int = flag("assignment, weights and request row", default=0)
    # fmt: on

    def __post_init__(self) -> None:
        mlserver = self.against_mlserver
        self.concurrency = parse_positive_ints(
            self.concurrency
            if self.concurrency is not None
            else (MLSERVER_CONCURRENCY if mlserver else DEFAULT_CONCURRENCY),
            "concurrency",
        )
        if self.rounds is None:
            self.rounds = MLSERVER_ROUNDS if mlserver else DEFAULT_ROUNDS
        for what, value, least in (
            ("duration must be a whole number of seconds", self.duration, 1),
            ("warm-up must be a whole number of seconds", self.warmup, 0),
            ("rounds must be a whole number", self.rounds, 1),
            ("gRPC channels must be a whole number", self.grpc_channels, 1),
        ):
            if type(value) is not int or value < least:
                raise BenchError(f"{what} >= {least} (got {value!r})")
        if self.protocol not in PROTOCOLS:
            raise BenchError(
                f"--protocol must be one of {', '.join(PROTOCOLS)} (got {self.protocol!r})"
            )

    @property
    def protocols(self) -> list[str]:
        """The protocols measured, REST first."""
        return ["rest", "grpc"] if self.protocol == "both" else [self.protocol]


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


def _plan(o: HttpOptions) -> Plan:
    names = None
    if o.models is not None:
        names = list(dict.fromkeys(split_list(o.models)))
        if not names:
            raise BenchError("--models is empty; expected names such as mixed,fixed-relu")
    try:
        arch = parse_arch(o.arch) if o.arch is not None else None
    except SpecError as e:
        raise BenchError(f"--arch: {e}") from None
    if o.grpc_address is not None and o.url is None:
        raise BenchError("--grpc-address goes with --url (a started server's port is known)")
    if o.url is not None:
        return _url_plan(o, names)
    default_modes = MLSERVER_BATCHING if o.against_mlserver else BATCHING_MODES
    batching = o.batching if o.batching is not None else default_modes
    modes: list[str | None] = list(dict.fromkeys(v.lower() for v in split_list(batching)))
    if not modes or any(v not in BATCHING_MODES for v in modes):
        raise BenchError(f"batching must be a list of on / off (got {batching!r})")
    if o.repository is not None:
        if arch is not None:
            raise BenchError("--arch builds models; it cannot go with --repository")
        repository, names = pick_models(o.repository, names, BenchError)
        return Plan(source="repository", models=names, modes=modes, repository=repository)
    names = names or list(MLSERVER_MODELS if o.against_mlserver else GENERATED_MODELS)
    unknown = [n for n in names if n not in GENERATED_MODELS]
    if unknown:
        raise BenchError(
            f"--models {', '.join(unknown)}: without --repository the bench builds "
            f"{' and '.join(GENERATED_MODELS)}; pass --repository DIR for others"
        )
    return Plan(source="generated", models=names, modes=modes, arch=arch or list(PAPER_ARCH))


def _url_plan(o: HttpOptions, names: list[str] | None) -> Plan:
    """The running server at ``o.url``, checked: loopback, ready, and the options it allows."""
    if o.repository is not None or o.arch is not None:
        raise BenchError(
            "--url targets a running server: --repository and --arch belong to the server, not "
            "the bench"
        )
    if o.against_mlserver:
        raise BenchError(
            "--against-mlserver starts both servers on the same model files; it cannot go with "
            "--url"
        )
    if o.batching is not None:
        raise BenchError(
            "--url: batching is the running server's setting; leave --batching out (it is read "
            "from the model config)"
        )
    if "grpc" in o.protocols and o.grpc_address is None:
        raise BenchError("--url with --protocol grpc or both needs --grpc-address 127.0.0.1:PORT")
    check_url(o.url)
    if o.grpc_address is not None:
        load.check_address(o.grpc_address)
    if names is None:
        raise BenchError("--url needs --models NAME[,NAME] (the server's model names)")
    base = check_ready(o.url, BenchError)
    return Plan(source="url", models=names, modes=[None], url=base, grpc_address=o.grpc_address)


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
    run: Callable[..., dict[str, Any]]  # (concurrency=, duration=) -> the raw result
    metrics_url: str | None  # smartmixed-serve's base URL, for rows per run


@dataclass
class HttpRun:
    """One measure_http call: its options and generators, its work folder, what it collects."""

    o: HttpOptions
    plan: Plan
    generator: str | None  # REST: load.WRK or load.PYTHON_HTTPX
    grpc_generator: str | None  # load.H2LOAD or load.PYTHON_GRPC
    work: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    server_commands: list[list[str]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # config.models
    mlserver: dict[str, Any] | None = None  # config.mlserver

    @contextlib.contextmanager
    def smartmixed(
        self, repository: Path | None, mode: str | None
    ) -> Iterator[tuple[str, str | None]]:
        """(base URL, gRPC address) of smartmixed-serve with batching ``mode`` (on: default,
        off: ``--max-batch-size 0``), started over ``repository``; mode None: the one at url."""
        if mode is None:
            yield self.plan.url, self.plan.grpc_address
            return
        args = ["--log-level", "warning"] + ([] if mode == "on" else ["--max-batch-size", "0"])
        if self.o.against_mlserver:
            args += ["--intra-op-threads", str(COMPARED_THREADS)]
        log_path = self.work / f"server-{mode}.log"
        grpc = "grpc" in self.o.protocols
        with start_server(repository, args=args, log_path=log_path, grpc=grpc) as server:
            self.server_commands.append(server.command)
            yield server.url, server.grpc_address

    def points(self, name: str, url: str, address: str | None, mode: str | None) -> list[Measured]:
        """``name`` on smartmixed-serve at ``url``, checked over each protocol."""
        info = self.models.setdefault(name, {})
        info.update(model_info(url, name))
        batching = mode or config_batching(url, name)
        outcomes = partial(load.smartmixed_outcomes, f"{url}/metrics")
        return [
            Measured(SMARTMIXED, protocol, name, info["mode"], batching, run, url)
            for protocol in self.o.protocols
            for run in [self._runner(protocol, name, url, address, outcomes, info)]
        ]

    @contextlib.contextmanager
    def mlserver_points(self, repository: Path, name: str) -> Iterator[list[Measured]]:
        """MLServer over the newest version of ``name`` (what smartmixed-serve serves) until
        the block ends: its points (no adaptive batching: "off"), checked over each protocol."""
        folder, info = repository / name, self.models[name]
        with start_mlserver(
            folder / str(model_versions(folder)[-1]) / "model.onnx",
            name=name,
            log_path=self.work / f"mlserver-{name}.log",
            input_shape=info["input_shape"],
            outputs=info["outputs"],
            n_classes=info["n_classes"],
        ) as server:
            self.mlserver = {
                "version": mlserver_version(),
                "command": server.command,
                "settings": server.settings,
                "runtime": RUNTIME_CLASS,
                "intra_op_threads": COMPARED_THREADS,
            }
            address, outcomes = (
                server.grpc_address,
                partial(load.mlserver_outcomes, server.metrics_url),
            )
            yield [
                Measured(MLSERVER, protocol, name, None, "off", run, None)
                for protocol in self.o.protocols
                for run in [self._runner(protocol, name, server.url, address, outcomes, {})]
            ]

    def _runner(
        self, protocol: str, name: str, url: str, address: str | None, outcomes, info: dict
    ) -> Callable[..., dict[str, Any]]:
        """The load of one protocol at ``name``, checked by one request (its sizes into
        ``info``). ``outcomes``: the server's gRPC outcomes, where h2load's failures count."""
        if protocol == "rest":
            target = prepare_target(url, name, seed=self.o.seed)
            info.update(request_bytes=len(target.body), n_features=target.n_features)
            if self.generator != load.WRK:
                return partial(load.run_python, target)
            return partial(
                load.run_wrk,
                target,
                script=load.write_wrk_script(self.work / "post.lua", target.body),
            )
        grpc_target = load.prepare_grpc_target(address, name, seed=self.o.seed)
        info.update(grpc_request_bytes=len(grpc_target.request))
        if self.grpc_generator != load.H2LOAD:
            return partial(load.run_grpc, grpc_target, channels=self.o.grpc_channels)
        outcomes()  # a server whose counters cannot be read fails here, not mid-run
        return partial(
            load.run_h2load, grpc_target, channels=self.o.grpc_channels, outcomes=outcomes
        )

    def measure(self, points: list[Measured], bar: tqdm) -> None:
        """Warm every point up (unrecorded: arenas, batcher, connection pools), then every
        round, concurrency and point in turn."""
        levels = self.o.concurrency
        if self.o.warmup:
            for point in points:
                point.run(concurrency=max(levels), duration=self.o.warmup)
        for round_, level, point in itertools.product(range(self.o.rounds), levels, points):
            bar.set_postfix_str(
                f"{point.server} {point.model} {point.protocol} batching {point.batching} c={level}"
            )
            # requests the previous run left in flight must not count here
            time.sleep(SETTLE_S)
            rows = point.metrics_url and batch_rows(point.metrics_url, point.model)
            raw = point.run(concurrency=level, duration=self.o.duration)
            after = point.metrics_url and batch_rows(point.metrics_url, point.model)
            per_run = None
            if rows and after and after[1] > rows[1]:
                per_run = (after[0] - rows[0]) / (after[1] - rows[1])
            self.records.append(_record(point, level, raw, per_run, round_))
            bar.update()


def measure_http(options: HttpOptions | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Drive the server(s) at every model x batching x concurrency (x protocol, x server with
    ``against_mlserver``, x round); returns the http.json record.

    Options are checked before any server starts. BenchError for bad ones, for a missing
    .venv-mlserver, a server or a load generator that fails (ServerError, LoadGeneratorError);
    failed requests are counted as errors.
    """
    started = time.perf_counter()
    o = options or HttpOptions()
    generator = load.resolve_generator(o.load_generator) if "rest" in o.protocols else None
    grpc_gen = (
        load.resolve_generator(o.grpc_generator, grpc=True) if "grpc" in o.protocols else None
    )
    if o.against_mlserver:
        mlserver_command()  # BenchError: run make mlserver
    plan = _plan(o)
    points = len(plan.modes) * len(plan.models) * len(o.concurrency) * len(o.protocols)
    total = points * (2 if o.against_mlserver else 1) * o.rounds
    with (
        tempfile.TemporaryDirectory(prefix="smartmixed-bench-http-") as tmp,
        tqdm(total=total, desc="http points", disable=not progress) as bar,
    ):
        run = HttpRun(o, plan, generator, grpc_gen, Path(tmp))
        repository = plan.repository
        if plan.source == "generated":
            repository = run.work / "models"
            build_repository(repository, arch=plan.arch, seed=o.seed, models=plan.models)
        for mode in plan.modes:
            with run.smartmixed(repository, mode) as (url, address):
                for name in plan.models:
                    with contextlib.ExitStack() as stack:
                        points = run.points(name, url, address, mode)
                        if o.against_mlserver:
                            points += stack.enter_context(run.mlserver_points(repository, name))
                        run.measure(points, bar)
    return _result(run, elapsed_s=round(time.perf_counter() - started, 1))


def _record(
    point: Measured, concurrency: int, raw: dict[str, Any], rows: float | None, round_: int
) -> dict:
    if point.protocol == "grpc":  # every failed call was answered, with its status code
        errors = failed = sum(raw["error_kinds"].values())
    else:  # wrk counts a >= 400 answer as a request; the other kinds never reached one
        errors, failed = sum(raw["error_kinds"].values()), raw["error_kinds"]["status"]
    ok = max(raw["requests"] - failed, 0)
    rps = ok / raw["duration_s"] if raw["duration_s"] > 0 else 0.0
    record = raw | {k: getattr(point, k) for k in ("server", "model", "mode", "batching")}
    record |= {
        "protocol": point.protocol,
        "concurrency": concurrency,
        "round": round_,
        "duration_s": round(raw["duration_s"], 3),
        "rps": rps,
        "samples_per_s": rps * 1,  # 1 row per request
        "errors": errors,
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
        kinds: Counter[str] = Counter()
        for r in rows:
            kinds.update(r["error_kinds"])  # update keeps the zero counts
        row = dict(rows[0])
        row |= {
            "round": None if len(rows) > 1 else rows[0]["round"],
            "rounds": len(rows),
            "duration_s": round(sum(r["duration_s"] for r in rows), 3),
            "requests": sum(r["requests"] for r in rows),
            "errors": sum(r["errors"] for r in rows),
            "error_kinds": dict(kinds),
            "max_ms": max((r["max_ms"] for r in rows if r["max_ms"] is not None), default=None),
        }
        for key in ("rps", "samples_per_s", "mean_ms", "p50_ms", "p95_ms", "p99_ms"):
            row[key] = median(rows, key)
        row["mean_batch_rows"] = median(rows, "mean_batch_rows")
        summary.append(row)
    return summary


def _selects(r: Mapping[str, Any], selection: Mapping[str, Any]) -> bool:
    return all(r[k] == v for k, v in selection.items())


def _target_values(target: tuple, points: list[dict], mixed: set[str]) -> list[float]:
    """The values ``target`` (see TARGETS) is judged on."""
    _, _, metric, concurrency, selection = target
    if isinstance(selection, dict):
        selection = {"server": SMARTMIXED, "concurrency": concurrency} | selection
        if concurrency is None:  # errors: every model
            return [r[metric] for r in points if r["server"] == SMARTMIXED]
        return [
            r[metric]
            for r in points
            if r["model"] in mixed and _selects(r, selection) and r[metric] is not None
        ]
    top, bottom = selection
    values = []
    for r in points:
        if r["model"] not in mixed or r["concurrency"] != concurrency or r[metric] is None:
            continue
        if not _selects(r, top):
            continue
        values += [
            r[metric] / d[metric]
            for d in points
            if d["model"] == r["model"]
            and d["concurrency"] == r["concurrency"]
            and _selects(d, bottom)
            and (bottom["server"] != r["server"] or d["batching"] == r["batching"])
            and d[metric]
        ]
    return values


def evaluate_targets(records: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    """(measured value, met) per target, on the SmartMixed-mode models' points (medians over
    rounds; see TARGETS). A target whose points were not measured (no such concurrency,
    batching mode, protocol or server, no SmartMixed model) is None in both."""
    points = summarize(records)
    mixed = {r["model"] for r in points if r["mode"] == "smartmixed"}
    measured: dict[str, Any] = {}
    met: dict[str, bool | None] = {}
    for key, target in TARGETS.items():
        op, limit = target[:2]
        values = _target_values(target, points, mixed)
        worst = (max(values) if op == "<=" else min(values)) if values else None
        measured[key] = worst
        met[key] = None if worst is None else bool(worst <= limit if op == "<=" else worst >= limit)
    return measured, met


def _result(run: HttpRun, *, elapsed_s: float) -> dict[str, Any]:
    """The http.json record of a finished run."""
    import onnxruntime

    o, plan, protocols = run.o, run.plan, run.o.protocols
    generated, rest, grpc = plan.source == "generated", "rest" in protocols, "grpc" in protocols
    measured, met = evaluate_targets(run.records)
    config = {
        "source": plan.source,
        "arch": plan.arch,
        "repository": str(plan.repository) if plan.repository else None,
        "url": plan.url,
        "grpc_address": plan.grpc_address,
        "models": run.models,
        "mixed_assignment": MIXED_ASSIGNMENT if generated else None,
        "lowering": "permuted" if generated else None,
        "protocols": protocols,
        "concurrency": o.concurrency,
        "duration_s": o.duration,
        "warmup_s": o.warmup,
        "rounds": o.rounds,
        "batching": [m for m in plan.modes if m is not None] or None,
        "rows_per_request": 1,
        "request": REQUESTS["rest"] if rest else None,
        "grpc_request": REQUESTS["grpc"] if grpc else None,
        "grpc_load_generator": GRPC_GENERATOR_TEXT.get(run.grpc_generator),
        "h2load_version": load.tool_version(load.H2LOAD)
        if run.grpc_generator == load.H2LOAD
        else None,
        "grpc_channels": o.grpc_channels if grpc else None,
        "request_timeout_s": load.REQUEST_TIMEOUT_S,
        "load_generator_threads": load.WRK_THREADS if run.generator == load.WRK else 1,
        "wrk_version": load.tool_version(load.WRK) if run.generator == load.WRK else None,
        "server_commands": run.server_commands,
        "server_env": server_env() if plan.source != "url" else None,
        "mlserver": run.mlserver,
        "seed": o.seed,
    }
    return {
        "config": config,
        "machine": {**machine_info(), "onnxruntime": onnxruntime.__version__},
        "load_generator": run.generator,
        "grpc_generator": run.grpc_generator,
        "records": run.records,
        "points": summarize(run.records),
        "targets": {k: {"limit": limit, "op": op} for k, (op, limit, *_) in TARGETS.items()},
        "target_values": measured,
        "meets_targets": met,
        "elapsed_s": elapsed_s,
    }


# --------------------------------------------------------------------------------------------
# Outputs


# how each load generator is described, REST then gRPC
HOW = {
    load.WRK: "REST: wrk ({threads} thread, keep-alive connections)",
    load.PYTHON_HTTPX: "REST: Python asyncio + httpx (in the bench process; shares the CPU with "
    "the server)",
    load.H2LOAD: "gRPC: h2load (1 thread, one CPU; failed calls counted by each server's own "
    "gRPC counters), {channels} connection(s)",
    load.PYTHON_GRPC: "gRPC: grpc.aio closed loop in its own process on one CPU, {channels} "
    "connection(s)",
}
POINT_COLUMNS = (
    *("concurrency", "server", "protocol", "requests/s", "samples/s"),
    *("p50 ms", "p95 ms", "p99 ms", "errors", "rows/run"),
)
MLSERVER_COLUMNS = (
    *("model", "concurrency", "smartmixed rps", "MLServer rps", "ratio"),
    *("smartmixed p50 ms", "MLServer p50 ms"),
)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _how(result: Mapping[str, Any]) -> list[str]:
    """The lines that say how the load was made, on what machine."""
    c, m = result["config"], result["machine"]
    how = [
        HOW[g].format(threads=c["load_generator_threads"], channels=c["grpc_channels"])
        for g in (result["load_generator"], result["grpc_generator"])
        if g
    ]
    rounds = c["rounds"]
    per_point = f"{c['duration_s']} s per point" + (
        f", {rounds} interleaved rounds (medians shown)" if rounds > 1 else ""
    )
    lines = [
        f"Load generators: {'; '.join(how)}. {per_point} after a {c['warmup_s']} s warm-up; "
        "one sample per request (FP32 [1, D]); servers on 127.0.0.1.",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}. Run took {result['elapsed_s']} s.",
    ]
    if ml := c.get("mlserver"):
        lines.append(
            f"MLServer {ml['version']}: custom runtime {ml['runtime']} (onnxruntime, "
            f"{ml['intra_op_threads']} intra-op thread), parallel_workers "
            f"{ml['settings']['parallel_workers']}, no adaptive batching; smartmixed-serve with "
            f"--intra-op-threads {ml['intra_op_threads']}."
        )
    return lines


def render_markdown(result: Mapping[str, Any]) -> str:
    c = result["config"]
    lines = ["# Serving: requests/s and latency", "", *_how(result), ""]
    points = result["points"]
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
    if comparison := _mlserver_rows(points):
        lines += [
            "## smartmixed-serve against MLServer (gRPC, medians)",
            "",
            *markdown_table(MLSERVER_COLUMNS, comparison),
            "",
        ]
    targets = [
        (key, f"{t['op']} {t['limit']}", _fmt(result["target_values"].get(key)), verdict)
        for key, t in result["targets"].items()
        for ok in [result["meets_targets"].get(key)]
        for verdict in ["-" if ok is None else "yes" if ok else "NO"]
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
    rates = (_fmt(r["rps"], 0), _fmt(r["samples_per_s"], 0))
    latencies = (_fmt(r["p50_ms"]), _fmt(r["p95_ms"]), _fmt(r["p99_ms"]))
    rows = _fmt(r["mean_batch_rows"], 1)
    return (r["concurrency"], r["server"], r["protocol"], *rates, *latencies, r["errors"], rows)


def _mlserver_rows(points: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """(model, concurrency, rps both, ratio, p50 both) for each gRPC point both servers ran."""
    grpc = [r for r in points if r["protocol"] == "grpc"]
    return [
        (
            r["model"],
            r["concurrency"],
            _fmt(r["rps"], 0),
            _fmt(other["rps"], 0),
            _fmt(r["rps"] / other["rps"] if other["rps"] else None, 2),
            _fmt(r["p50_ms"]),
            _fmt(other["p50_ms"]),
        )
        for r in grpc
        if r["server"] == SMARTMIXED
        for other in grpc
        if other["server"] == MLSERVER
        and (other["model"], other["concurrency"]) == (r["model"], r["concurrency"])
    ]


def _by_model_and_batching(
    points: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """The points of each (model, smartmixed-serve's batching), by concurrency, then server and
    protocol in run order: one table each. MLServer's points go in every table of their model."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in points:
        if r["server"] == SMARTMIXED:
            groups.setdefault((r["model"], r["batching"]), []).append(r)
    for (model, _), rows in groups.items():
        rows += [r for r in points if r["server"] == MLSERVER and r["model"] == model]
    order = {id(r): i for i, r in enumerate(points)}
    return {
        key: sorted(rows, key=lambda r: (r["concurrency"], order[id(r)]))
        for key, rows in groups.items()
    }


def plot(result: Mapping[str, Any], path: Path) -> None:
    plt = outputs.pyplot()
    points = result["points"]
    lines: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in points:
        lines.setdefault((r["server"], r["model"], r["batching"], r["protocol"]), []).append(r)
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
    protocols = "/".join(result["config"]["protocols"])
    fig.suptitle(f"single-sample requests over {protocols}, servers on 127.0.0.1", fontsize=10)
    outputs.save_figure(fig, path)
