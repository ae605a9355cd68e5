"""HTTP serving throughput and latency of ``smartmixed-serve`` under a bounded load.

What is measured. A point is one (model, batching, concurrency): C clients, each with one
keep-alive connection to 127.0.0.1, send single-sample Open Inference Protocol (KServe V2) JSON
requests (``POST /v2/models/NAME/infer``, FP32 [1, D], the same seeded raw-pixel row every time)
back to back for D seconds; a client sends its next request as soon as the previous answer
arrives (closed loop). A record holds what the load generator saw: completed requests,
``rps`` (2xx responses per second of the run), ``samples_per_s`` (rps x rows per request),
p50/p95/p99 latency over the completed requests (send to last byte), and errors (connect, read,
write and timeout errors, plus responses with status >= 400). ``mean_batch_rows`` is read from
the server's own Prometheus histogram (rows per ONNX Runtime run) before and after the point.

Servers. Unless ``url`` targets a running server, one ``smartmixed-serve`` subprocess is started
per batching mode (batching off: ``--max-batch-size 0``) on a free 127.0.0.1 port, waited for
through /v2/health/ready and stopped with SIGTERM (kill after a timeout). Every model is first
checked with one request (it must answer 200 with outputs of shape [1, classes], so a broken
body fails loudly instead of as 100% errors) and warmed up for ``warmup`` seconds at the highest
concurrency (ORT arenas, batcher, keep-alive pools), which is not recorded.

Why wrk. On a 2-core machine a load generator competes with the server for the CPU it measures;
a Python generator (asyncio + httpx) spends far more CPU per request than the server path it
drives and becomes the bottleneck. ``wrk`` (C, epoll) is used when it is installed, with ONE
thread (``-t 1``) so it takes at most one core, and a Lua script that sets the POST body and
prints its summary as one JSON line that is parsed here. The Python generator remains as a
fallback; which one ran is recorded (``load_generator``), and numbers from the two are not
comparable.

Models. By default two networks of the paper architecture with seeded random weights are built
and exported (permuted lowering): "mixed", every hidden neuron's activation drawn uniformly from
the six default activations, and "fixed-relu". ``repository`` + ``models`` bench exported models
instead. The targets are evaluated on the records of SmartMixed-mode models and reported, never
asserted.

Modules: the load generators are in bench/load.py, the server (its models, process, check
request and metrics) in bench/server.py; this one holds the options, the measurement loop, the
targets and the outputs.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from smartmixed.bench import BenchError, common, parse_positive_ints
from smartmixed.bench.common import machine_info, markdown_table
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
    ServerProcess,
    Target,
    batch_rows,
    build_repository,
    check_url,
    http_client,
    pick_models,
    prepare_target,
    server_env,
    start_server,
)
from smartmixed.contract import SpecError, parse_arch, split_list

DEFAULT_CONCURRENCY = (1, 8, 64)
DEFAULT_DURATION_S = 5
DEFAULT_WARMUP_S = 1
BATCHING_MODES = ("on", "off")
SETTLE_S = 0.25  # pause before each point: the server drains what the last run left queued
RECORD_KEYS = (
    "model",
    "mode",
    "batching",
    "concurrency",
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
# Targets on the SmartMixed model's records (2 cores, wrk, single-sample V2 JSON requests).
TARGETS: dict[str, dict[str, Any]] = {
    "p50_ms_concurrency_1": {
        "limit": 1.5,
        "op": "<=",
        "concurrency": 1,
        "batching": "on",
        "metric": "p50_ms",
    },
    "rps_concurrency_64_batching_on": {
        "limit": 1500.0,
        "op": ">=",
        "concurrency": 64,
        "batching": "on",
        "metric": "rps",
    },
    "p99_ms_concurrency_64_batching_on": {
        "limit": 100.0,
        "op": "<=",
        "concurrency": 64,
        "batching": "on",
        "metric": "p99_ms",
    },
    "errors": {"limit": 0, "op": "<=", "metric": "errors"},
}


class HttpBenchError(BenchError):
    """Options the HTTP bench cannot run with (a server that fails raises ServerError, a load
    generator LoadGeneratorError; both are BenchErrors, which the CLI reports)."""


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


@contextlib.contextmanager
def running_server(repository: Path, *, batching: bool, log_dir: Path) -> Iterator[ServerProcess]:
    """smartmixed-serve over ``repository``, batching on or off (``--max-batch-size 0``)."""
    args = ["--log-level", "warning"] + ([] if batching else ["--max-batch-size", "0"])
    log_path = log_dir / f"server-{'on' if batching else 'off'}.log"
    with start_server(repository, args=args, log_path=log_path) as server:
        yield server


# --------------------------------------------------------------------------------------------
# Measurement


def _record(target: Target, concurrency: int, raw: dict[str, Any], rows: float | None) -> dict:
    errors = sum(raw["error_kinds"].values())
    ok = max(raw["requests"] - raw["error_kinds"]["status"], 0)
    rps = ok / raw["duration_s"] if raw["duration_s"] > 0 else 0.0
    record = {
        "model": target.name,
        "mode": target.mode,
        "batching": target.batching,
        "concurrency": concurrency,
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


def evaluate_targets(records: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    """(measured value, met) per target, on the SmartMixed-mode models' records.

    A target whose point was not measured (no such concurrency or batching mode, no SmartMixed
    model) is None in both.
    """
    mixed = [r for r in records if r["mode"] == "smartmixed"]
    measured: dict[str, Any] = {}
    met: dict[str, bool | None] = {}
    for key, t in TARGETS.items():
        points = [
            r
            for r in mixed
            if r["concurrency"] == t.get("concurrency", r["concurrency"])
            and r["batching"] == t.get("batching", r["batching"])
        ]
        if key == "errors":
            points = list(records)  # every model, every point
        if not points:
            measured[key], met[key] = None, None
            continue
        values = [p[t["metric"]] for p in points]
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


def _plan(
    *,
    arch: str | Sequence[int] | None,
    repository: Path | str | None,
    models: str | Sequence[str] | None,
    url: str | None,
    batching: str | Sequence[str] | None,
) -> Plan:
    names = parse_models(models)
    try:
        arch_list = parse_arch(arch) if arch is not None else None
    except SpecError as e:
        raise HttpBenchError(f"--arch: {e}") from None
    if url is not None:
        if repository is not None or arch is not None:
            raise HttpBenchError(
                "--url targets a running server: --repository and --arch "
                "belong to the server, not the bench"
            )
        if batching is not None:
            raise HttpBenchError(
                "--url: batching is the running server's setting; leave "
                "--batching out (it is read from the model config)"
            )
        base = check_url(url)
        if names is None:
            raise HttpBenchError("--url needs --models NAME[,NAME] (the server's model names)")
        try:
            with http_client(timeout=3.0) as client:
                ready = client.get(base + HEALTH_READY_PATH).status_code
        except httpx.HTTPError as e:
            raise HttpBenchError(f"--url {url}: not reachable ({type(e).__name__}: {e})") from None
        if ready != 200:
            raise HttpBenchError(f"--url {url}: /v2/health/ready answered {ready}")
        return Plan(source="url", models=names, modes=[None], url=base)
    modes: list[str | None] = list(
        parse_batching(batching if batching is not None else BATCHING_MODES)
    )
    if repository is not None:
        if arch is not None:
            raise HttpBenchError("--arch builds models; it cannot go with --repository")
        repository, names = pick_models(repository, names, HttpBenchError)
        return Plan(source="repository", models=names, modes=modes, repository=repository)
    names = names or list(GENERATED_MODELS)
    unknown = [n for n in names if n not in GENERATED_MODELS]
    if unknown:
        raise HttpBenchError(
            f"--models {', '.join(unknown)}: without --repository the bench builds "
            f"{' and '.join(GENERATED_MODELS)}; pass --repository DIR for others"
        )
    return Plan(source="generated", models=names, modes=modes, arch=arch_list or list(PAPER_ARCH))


def measure_http(
    *,
    arch: str | Sequence[int] | None = None,
    repository: Path | str | None = None,
    models: str | Sequence[str] | None = None,
    url: str | None = None,
    concurrency: str | Sequence[int] = DEFAULT_CONCURRENCY,
    duration: int = DEFAULT_DURATION_S,
    warmup: int = DEFAULT_WARMUP_S,
    batching: str | Sequence[str] | None = None,
    load_generator: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Drive the server(s) at every model x batching x concurrency; returns the http.json record.

    Options are validated before any server starts; HttpBenchError for bad options, and for a
    server or load generator that fails (not for failed requests: those are counted as errors).
    """
    started = time.perf_counter()
    levels = parse_positive_ints(concurrency, "concurrency")
    if type(duration) is not int or duration < 1:
        raise HttpBenchError(f"duration must be a whole number of seconds >= 1 (got {duration!r})")
    if type(warmup) is not int or warmup < 0:
        raise HttpBenchError(f"warm-up must be a whole number of seconds >= 0 (got {warmup!r})")
    generator = resolve_load_generator(load_generator)
    plan = _plan(arch=arch, repository=repository, models=models, url=url, batching=batching)
    names, modes, base = plan.models, plan.modes, plan.url
    run = run_wrk if generator == WRK else run_python
    records: list[dict[str, Any]] = []
    server_commands: list[list[str]] = []
    targets_info: dict[str, dict[str, Any]] = {}
    total = len(modes) * len(names) * len(levels)
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
                server = running_server(repo_dir, batching=mode == "on", log_dir=work)
            with server as process:
                server_url = base if process is None else process.url
                if process is not None:
                    server_commands.append(process.command)
                for name in names:
                    target = prepare_target(server_url, name, seed=seed, batching=mode)
                    targets_info[name] = {
                        "mode": target.mode,
                        "architecture": target.architecture,
                        "n_features": target.n_features,
                        "request_bytes": len(target.body),
                    }
                    script = write_wrk_script(work, target.body) if generator == WRK else None
                    if warmup:  # not recorded: arenas, batcher, connection pools
                        run(target, concurrency=max(levels), duration=warmup, script=script)
                    for level in levels:
                        bar.set_postfix_str(f"{name} batching {target.batching} c={level}")
                        # requests the previous run left in flight must not count here
                        time.sleep(SETTLE_S)
                        before = batch_rows(server_url, name)
                        raw = run(target, concurrency=level, duration=duration, script=script)
                        after = batch_rows(server_url, name)
                        rows = None
                        if before and after and after[1] > before[1]:
                            rows = (after[0] - before[0]) / (after[1] - before[1])
                        records.append(_record(target, level, raw, rows))
                        bar.update()

    measured, met = evaluate_targets(records)
    return {
        "config": {
            "source": plan.source,
            "arch": plan.arch,
            "repository": str(plan.repository) if plan.repository else None,
            "url": plan.url,
            "models": targets_info,
            "mixed_assignment": "uniformly random over the six default activations per neuron"
            if plan.source == "generated"
            else None,
            "lowering": "permuted" if plan.source == "generated" else None,
            "concurrency": levels,
            "duration_s": duration,
            "warmup_s": warmup,
            "batching": [m for m in modes if m is not None] or None,
            "rows_per_request": 1,
            "request": "POST /v2/models/NAME/infer, V2 JSON, FP32 [1, D], seeded raw pixels",
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "load_generator_threads": WRK_THREADS if generator == WRK else 1,
            "wrk_version": wrk_version() if generator == WRK else None,
            "server_commands": server_commands,
            "server_env": server_env() if plan.source != "url" else None,
            "seed": seed,
        },
        "machine": {**machine_info(), "onnxruntime": _ort_version()},
        "load_generator": generator,
        "records": records,
        "targets": {k: {"limit": t["limit"], "op": t["op"]} for k, t in TARGETS.items()},
        "target_values": measured,
        "meets_targets": met,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --------------------------------------------------------------------------------------------
# Outputs


POINT_COLUMNS = (
    "concurrency",
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
    how = (
        f"wrk ({c['load_generator_threads']} thread, keep-alive connections)"
        if generator == WRK
        else "Python asyncio + httpx (in the bench process; shares the CPU with the server)"
    )
    lines = [
        "# HTTP serving: requests/s and latency",
        "",
        f"Load generator: {how}; {c['duration_s']} s per point after a {c['warmup_s']} s "
        f"warm-up; one sample per request (V2 JSON, FP32 [1, D]); server on 127.0.0.1.",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}. Run took {result['elapsed_s']} s.",
        "",
    ]
    for (model, batching), rows in _by_model_and_batching(result["records"]).items():
        info = c["models"].get(model, {})
        arch = info.get("architecture")
        lines += [
            f"## {model} ({info.get('mode') or 'unknown mode'}"
            f"{f', {arch}' if arch else ''}), batching {batching}",
            "",
            *markdown_table(POINT_COLUMNS, [_point_cells(r) for r in rows]),
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
        "requests/s counts 2xx responses; rows/run is the server's mean rows per ONNX Runtime "
        "run over the point (1.0 without batching).",
    ]
    return "\n".join(lines) + "\n"


def _point_cells(r: Mapping[str, Any]) -> tuple[Any, ...]:
    """One point (a concurrency level) as its table row, in POINT_COLUMNS order."""
    return (
        r["concurrency"],
        f"{r['rps']:.0f}",
        f"{r['samples_per_s']:.0f}",
        _fmt(r["p50_ms"]),
        _fmt(r["p95_ms"]),
        _fmt(r["p99_ms"]),
        r["errors"],
        _fmt(r["mean_batch_rows"], 1),
    )


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def _by_model_and_batching(
    records: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """The records of each (model, batching) in run order: one table and one line each."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["batching"]), []).append(r)
    return groups


def plot(result: Mapping[str, Any], path: Path) -> None:
    plt = common.pyplot()

    groups = _by_model_and_batching(result["records"])
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(10, 4))
    for (model, batching), rows in groups.items():
        xs = [r["concurrency"] for r in rows]
        style = "-" if batching == "on" else "--"
        label = f"{model}, batching {batching}"
        ax_rps.plot(xs, [r["rps"] for r in rows], style, marker="o", label=label)
        ax_p99.plot(xs, [r["p99_ms"] for r in rows], style, marker="o", label=label)
    levels = sorted({r["concurrency"] for r in result["records"]})
    for ax in (ax_rps, ax_p99):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, labels=[str(c) for c in levels])
        ax.set_xlabel("concurrent connections")
        ax.grid(True, alpha=0.3)
    ax_rps.set_ylabel("requests/s (2xx)")
    ax_p99.set_ylabel("p99 latency (ms)")
    ax_p99.set_yscale("log")
    ax_rps.legend(fontsize=8)
    fig.suptitle(
        f"smartmixed-serve, single-sample V2 JSON, load: {result['load_generator']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """DIR/http.{json,md,png}, each written atomically."""
    return common.write_outputs(result, out, "http", render=render_markdown, draw=plot)
