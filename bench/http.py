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
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from tqdm.auto import tqdm

from smartmixed.bench import BenchError, parse_positive_ints
from smartmixed.bench.train_cost import machine_info
from smartmixed.train.model import PRESETS, SpecError, parse_arch

PAPER_ARCH = list(PRESETS["paper"])
DEFAULT_CONCURRENCY = (1, 8, 64)
DEFAULT_DURATION_S = 5
DEFAULT_WARMUP_S = 1
BATCHING_MODES = ("on", "off")
GENERATED_MODELS = ("mixed", "fixed-relu")
LOAD_GENERATORS = ("auto", "wrk", "python")
WRK, PYTHON_HTTPX = "wrk", "python-httpx"
WRK_THREADS = 1  # one wrk thread: the generator takes at most one of the two cores
REQUEST_TIMEOUT_S = 5  # a request slower than this counts as a timeout error
READY_TIMEOUT_S = 60.0  # startup of a server: imports + loading every model
STOP_TIMEOUT_S = 15.0  # SIGTERM, then kill
SETTLE_S = 0.25  # pause before each point: the server drains what the last run left queued
WRK_MARKER = "SMARTMIXED-WRK-RESULT "
ERROR_KINDS = ("connect", "read", "write", "status", "timeout")
RECORD_KEYS = (
    "model", "mode", "batching", "concurrency", "duration_s", "requests", "rps",
    "samples_per_s", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms", "errors",
    "error_kinds", "mean_batch_rows",
)  # fmt: skip
# Targets on the SmartMixed model's records (2 cores, wrk, single-sample V2 JSON requests).
TARGETS: dict[str, dict[str, Any]] = {
    "p50_ms_concurrency_1": {"limit": 1.5, "op": "<=", "concurrency": 1, "batching": "on",
                             "metric": "p50_ms"},
    "rps_concurrency_64_batching_on": {"limit": 1500.0, "op": ">=", "concurrency": 64,
                                       "batching": "on", "metric": "rps"},
    "p99_ms_concurrency_64_batching_on": {"limit": 100.0, "op": "<=", "concurrency": 64,
                                          "batching": "on", "metric": "p99_ms"},
    "errors": {"limit": 0, "op": "<=", "metric": "errors"},
}  # fmt: skip
LOOPBACK_NAMES = ("localhost",)


class HttpBenchError(BenchError):
    """Options the HTTP bench cannot run with, or a server / load generator that failed."""


# --------------------------------------------------------------------------------------------
# Options


def parse_batching(text: str | Sequence[str]) -> list[str]:
    """'on,off' -> ['on', 'off'] (order kept, duplicates dropped)."""
    items = [v.strip().lower() for v in text.split(",")] if isinstance(text, str) else list(text)
    items = [v for v in items if v]
    bad = [v for v in items if v not in BATCHING_MODES]
    if not items or bad:
        raise HttpBenchError(f"batching must be a list of on / off (got {text!r})")
    return list(dict.fromkeys(items))


def parse_models(text: str | Sequence[str] | None) -> list[str] | None:
    if text is None:
        return None
    items = [v.strip() for v in text.split(",")] if isinstance(text, str) else list(text)
    items = [v for v in items if v]
    if not items:
        raise HttpBenchError("--models is empty; expected names such as mixed,fixed-relu")
    return list(dict.fromkeys(items))


def resolve_load_generator(choice: str) -> str:
    """auto -> wrk when it is on PATH, else the Python generator."""
    if choice not in LOAD_GENERATORS:
        raise HttpBenchError(
            f"unknown load generator {choice!r}; expected one of {', '.join(LOAD_GENERATORS)}"
        )
    has_wrk = shutil.which("wrk") is not None
    if choice == "wrk" and not has_wrk:
        raise HttpBenchError(
            "--load-generator wrk: wrk is not installed (apt-get install wrk), "
            "or use --load-generator python"
        )
    if choice == "python" or (choice == "auto" and not has_wrk):
        return PYTHON_HTTPX
    return WRK


def check_url(url: str) -> str:
    """A base URL http://127.0.0.1:PORT (loopback only: this bench floods what it targets)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise HttpBenchError(f"--url {url!r}: expected http://127.0.0.1:PORT")
    host = parts.hostname
    try:
        loopback = host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise HttpBenchError(f"--url {url!r}: only a server on this machine (127.0.0.1) is benched")
    try:
        port = parts.port
    except ValueError:
        raise HttpBenchError(f"--url {url!r}: bad port") from None
    if parts.path.strip("/") or parts.query:
        raise HttpBenchError(f"--url {url!r}: give the server's base URL, without a path")
    netloc = f"[{host}]" if ":" in host else host
    return f"http://{netloc}:{port or 80}"


# --------------------------------------------------------------------------------------------
# Models and servers


def build_repository(
    root: Path, *, arch: Sequence[int], seed: int, models: Sequence[str] = GENERATED_MODELS
) -> None:
    """ROOT/{mixed,fixed-relu}/1/model.onnx: seeded random weights, permuted lowering."""
    import torch

    from smartmixed.export.lower import lower, set_metadata
    from smartmixed.train.model import MixedMLP, ModelSpec
    from smartmixed.train.pool import DEFAULT_POOL

    arch = list(arch)
    hidden = arch[1:-1]
    rng = np.random.default_rng(seed)
    pool = list(DEFAULT_POOL)
    # uniformly random per neuron: every layer holds all six groups (the fragmented case)
    mixed = [[pool[i] for i in rng.integers(len(pool), size=w)] for w in hidden]
    assignments = {
        "mixed": (pool, "smartmixed", mixed),
        "fixed-relu": (["relu"], "fixed:relu", [["relu"] * w for w in hidden]),
    }
    with torch.random.fork_rng(devices=[]):  # seeded weights, caller's RNG untouched
        torch.manual_seed(seed)
        for name in models:
            pool_, mode, assignment = assignments[name]
            spec = ModelSpec(
                arch=arch, pool=pool_, mode=mode, assignment=assignment,
                preprocessing={"offset": 0.0, "scale": 1 / 255}, input_shape=[arch[0]],
                labels=[str(i) for i in range(arch[-1])],
            )  # fmt: skip
            model = MixedMLP.from_spec(spec)
            state = {k: v.numpy() for k, v in model.canonical_state_dict().items()}
            proto = lower(spec, state, lowering="permuted")
            # the server reads the spec (features, labels, mix) from this metadata
            set_metadata(
                proto, {"smartmixed.spec": spec.to_dict(), "smartmixed.lowering": "permuted"}
            )
            version = root / name / "1"
            version.mkdir(parents=True, exist_ok=True)
            (version / "model.onnx").write_bytes(proto.SerializeToString())


def repository_models(root: Path) -> list[str]:
    """Model folders of an exported repository (NAME/VERSION/model.onnx)."""
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and any(v.is_dir() and v.name.isdigit() for v in p.iterdir())
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(timeout: float = 10.0) -> httpx.Client:
    # trust_env=False: a proxy from the environment must never see loopback benchmark traffic
    return httpx.Client(timeout=timeout, trust_env=False)


def server_env() -> dict[str, str]:
    """The SMARTMIXED_* settings the started servers inherit (the API key left out)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith("SMARTMIXED_") and k != "SMARTMIXED_API_KEY"
    }


@contextlib.contextmanager
def running_server(
    repository: Path, *, batching: bool, log_dir: Path, ready_timeout: float = READY_TIMEOUT_S
) -> Iterator[tuple[str, list[str]]]:
    """Start smartmixed-serve on a free 127.0.0.1 port; yields (base URL, command)."""
    port = free_port()
    command = [
        sys.executable, "-m", "smartmixed.serve", "--repository", str(repository),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    if not batching:
        command += ["--max-batch-size", "0"]
    env = {k: v for k, v in os.environ.items() if k != "SMARTMIXED_API_KEY"}  # we send no key
    log_path = log_dir / f"server-{'on' if batching else 'off'}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        with _client(timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise HttpBenchError(
                        f"the server exited with status {process.returncode} before it was "
                        f"ready: {_tail(log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/v2/health/ready").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise HttpBenchError(
                        f"the server was not ready within {ready_timeout:.0f} s: {_tail(log_path)}"
                    )
                time.sleep(0.1)
        yield url, command
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace").strip()
    return text[-chars:] or "(no output)"


@dataclass
class Target:
    """One model on one server: what a request looks like and what it must answer."""

    name: str
    url: str  # .../v2/models/NAME/infer
    body: bytes
    n_features: int
    n_classes: int
    outputs: list[str]
    mode: str | None
    architecture: list[int] | None
    batching: str


def request_body(n_features: int, seed: int) -> bytes:
    """One V2 JSON request: a seeded row of raw pixels (integers 0..255) as FP32 [1, D]."""
    row = np.random.default_rng(seed).integers(0, 256, n_features).tolist()
    body = {"inputs": [{"name": "input", "shape": [1, n_features], "datatype": "FP32",
                        "data": row}]}  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode()


def prepare_target(base: str, name: str, *, seed: int, batching: str | None) -> Target:
    """Read the model's metadata, build its request body and check that one request works."""
    try:
        with _client() as client:
            return _prepare(client, base, name, seed=seed, batching=batching)
    except httpx.HTTPError as e:
        raise HttpBenchError(f"model {name!r}: {base} failed ({type(e).__name__}: {e})") from None
    except ValueError as e:  # a body that is not JSON, or JSON of another shape
        if isinstance(e, HttpBenchError):
            raise
        raise HttpBenchError(f"model {name!r}: unexpected answer from {base} ({e})") from None


def _prepare(
    client: httpx.Client, base: str, name: str, *, seed: int, batching: str | None
) -> Target:
    meta = client.get(f"{base}/v2/models/{name}")
    if meta.status_code != 200:
        raise HttpBenchError(
            f"model {name!r}: GET /v2/models/{name} answered {meta.status_code}: {meta.text[:300]}"
        )
    info = meta.json()
    try:
        n_features = int(info["inputs"][0]["shape"][-1])
        outputs = [o["name"] for o in info["outputs"]]
        n_classes = int(info["outputs"][0]["shape"][-1])
    except (KeyError, IndexError, TypeError):
        raise HttpBenchError(f"model {name!r}: unexpected metadata {info!r:.300}") from None
    smartmixed = info.get("smartmixed") or {}
    if batching is None:  # a server we did not start: its model config says
        config = client.get(f"{base}/v2/models/{name}/config")
        batching = "unknown"
        if config.status_code == 200:
            batching = "on" if "dynamic_batching" in config.json() else "off"
    body = request_body(n_features, seed)
    url = f"{base}/v2/models/{name}/infer"
    response = client.post(url, content=body, headers={"Content-Type": "application/json"})
    if response.status_code != 200:
        raise HttpBenchError(
            f"model {name!r}: the check request answered {response.status_code}: "
            f"{response.text[:300]}"
        )
    got = {o.get("name"): o.get("shape") for o in response.json().get("outputs", [])}
    want = {key: [1, n_classes] for key in outputs}
    if got != want:
        raise HttpBenchError(
            f"model {name!r}: the check request returned shapes {got}, expected {want}"
        )
    return Target(
        name=name, url=url, body=body, n_features=n_features, n_classes=n_classes,
        outputs=outputs, mode=smartmixed.get("mode"), architecture=smartmixed.get("architecture"),
        batching=batching,
    )  # fmt: skip


_BATCH_ROWS = re.compile(r'^smartmixed_batch_rows_(sum|count)\{model="([^"]*)"\}\s+(\S+)$', re.M)


def batch_rows(base: str, model: str) -> tuple[float, float] | None:
    """(rows, runs) so far from the server's Prometheus histogram; None when unavailable."""
    try:
        with _client(timeout=5.0) as client:
            text = client.get(f"{base}/metrics").text
    except httpx.HTTPError:
        return None
    found = {kind: float(v) for kind, name, v in _BATCH_ROWS.findall(text) if name == model}
    if "sum" not in found or "count" not in found:
        return None
    return found["sum"], found["count"]


# --------------------------------------------------------------------------------------------
# Load generators. Both return the same raw result:
# {requests, duration_s, latencies p50/p95/p99/mean/max (ms), error_kinds}


WRK_SCRIPT = """\
-- written by smartmixed-bench http: POST one V2 JSON body, print the summary as one JSON line
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{marker}{{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,' ..
    '"p50_us":%.1f,"p95_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def lua_long_string(text: str) -> str:
    """A Lua long-bracket literal holding ``text`` verbatim (no escapes to get wrong)."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def write_wrk_script(directory: Path, body: bytes) -> Path:
    path = directory / "post.lua"
    text = body.decode()
    if "\n" in text[:1]:  # Lua drops a newline right after the opening bracket
        text = "\n" + text
    path.write_text(WRK_SCRIPT.format(body=lua_long_string(text), marker=WRK_MARKER))
    return path


def parse_wrk_output(stdout: str) -> dict[str, Any]:
    """The marker line the Lua done() prints -> the raw result (ms, s)."""
    for line in stdout.splitlines():
        if line.startswith(WRK_MARKER):
            try:
                data = json.loads(line[len(WRK_MARKER) :])
            except json.JSONDecodeError as e:
                raise HttpBenchError(f"wrk printed an unreadable summary ({e}): {line!r}") from None
            break
    else:
        raise HttpBenchError(f"wrk printed no summary line; its output was: {stdout[-1500:]!r}")
    try:
        return {
            "requests": int(data["requests"]),
            "duration_s": data["duration_us"] / 1e6,
            "mean_ms": data["mean_us"] / 1e3,
            "p50_ms": data["p50_us"] / 1e3,
            "p95_ms": data["p95_us"] / 1e3,
            "p99_ms": data["p99_us"] / 1e3,
            "max_ms": data["max_us"] / 1e3,
            "error_kinds": {k: int(data[k]) for k in ERROR_KINDS},
        }
    except KeyError as e:
        raise HttpBenchError(f"wrk summary lacks {e}: {line!r}") from None


def wrk_version() -> str | None:
    exe = shutil.which("wrk")
    if exe is None:
        return None
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0].strip() if first else None


def run_wrk(
    target: Target, *, concurrency: int, duration: int, script: Path | None = None
) -> dict[str, Any]:
    assert script is not None, "write_wrk_script first"
    command = [
        "wrk", "-t", str(WRK_THREADS), "-c", str(concurrency), "-d", f"{duration}s",
        "--latency", "--timeout", f"{REQUEST_TIMEOUT_S}s", "-s", str(script), target.url,
    ]  # fmt: skip
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise HttpBenchError(f"wrk did not finish within {duration + 60} s") from None
    if out.returncode != 0:
        raise HttpBenchError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout)[-800:]}")
    return parse_wrk_output(out.stdout)


async def _python_load(target: Target, concurrency: int, duration: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    kinds = dict.fromkeys(ERROR_KINDS, 0)
    async with httpx.AsyncClient(
        limits=limits, timeout=REQUEST_TIMEOUT_S, trust_env=False, headers=headers
    ) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            while (t0 := time.perf_counter()) < deadline:
                try:
                    response = await client.post(target.url, content=target.body)
                    await response.aread()
                except httpx.TimeoutException:
                    kinds["timeout"] += 1
                    continue
                except httpx.ConnectError:
                    kinds["connect"] += 1
                    await asyncio.sleep(0.01)  # a refused connection must not spin
                    continue
                except httpx.WriteError:
                    kinds["write"] += 1
                    continue
                except httpx.HTTPError:
                    kinds["read"] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1e3)
                if response.status_code >= 400:  # wrk's rule, so both count the same
                    kinds["status"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if latencies:
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99]).tolist()
        mean, peak = float(np.mean(latencies)), float(np.max(latencies))
    else:
        p50 = p95 = p99 = mean = peak = None  # JSON has no NaN
    return {
        "requests": len(latencies), "duration_s": elapsed, "mean_ms": mean, "p50_ms": p50,
        "p95_ms": p95, "p99_ms": p99, "max_ms": peak, "error_kinds": kinds,
    }  # fmt: skip


def run_python(
    target: Target, *, concurrency: int, duration: int, script: Path | None = None
) -> dict[str, Any]:
    del script  # the body comes from target; the argument keeps both runners alike
    return asyncio.run(_python_load(target, concurrency, duration))


# --------------------------------------------------------------------------------------------
# Measurement


def _record(target: Target, concurrency: int, raw: dict[str, Any], rows: float | None) -> dict:
    errors = sum(raw["error_kinds"].values())
    ok = max(raw["requests"] - raw["error_kinds"]["status"], 0)
    rps = ok / raw["duration_s"] if raw["duration_s"] > 0 else 0.0
    record = {
        "model": target.name, "mode": target.mode, "batching": target.batching,
        "concurrency": concurrency, "duration_s": round(raw["duration_s"], 3),
        "requests": raw["requests"], "rps": rps, "samples_per_s": rps * 1,  # 1 row per request
        "mean_ms": raw["mean_ms"], "p50_ms": raw["p50_ms"], "p95_ms": raw["p95_ms"],
        "p99_ms": raw["p99_ms"], "max_ms": raw["max_ms"], "errors": errors,
        "error_kinds": raw["error_kinds"], "mean_batch_rows": rows,
    }  # fmt: skip
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
            r for r in mixed
            if r["concurrency"] == t.get("concurrency", r["concurrency"])
            and r["batching"] == t.get("batching", r["batching"])
        ]  # fmt: skip
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
            raise HttpBenchError("--url targets a running server: --repository and --arch "
                                 "belong to the server, not the bench")  # fmt: skip
        if batching is not None:
            raise HttpBenchError("--url: batching is the running server's setting; leave "
                                 "--batching out (it is read from the model config)")  # fmt: skip
        base = check_url(url)
        if names is None:
            raise HttpBenchError("--url needs --models NAME[,NAME] (the server's model names)")
        try:
            with _client(timeout=3.0) as client:
                ready = client.get(f"{base}/v2/health/ready").status_code
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
        repository = Path(repository)
        if not repository.is_dir():
            raise HttpBenchError(f"--repository {repository} is not a folder")
        present = repository_models(repository)
        names = names or present
        missing = [n for n in names if n not in present]
        if missing or not names:
            raise HttpBenchError(f"--repository {repository}: no model(s) "
                                 f"{', '.join(missing) or '(none)'}; it holds "
                                 f"{', '.join(present) or 'nothing'}")  # fmt: skip
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
            server = (
                running_server(repo_dir, batching=mode == "on", log_dir=work)
                if mode is not None
                else contextlib.nullcontext((base, None))
            )
            with server as (server_url, command):
                if command is not None:
                    server_commands.append(command)
                for name in names:
                    target = prepare_target(server_url, name, seed=seed, batching=mode)
                    targets_info[name] = {"mode": target.mode, "architecture": target.architecture,
                                          "n_features": target.n_features,
                                          "request_bytes": len(target.body)}  # fmt: skip
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
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in result["records"]:
        groups.setdefault((r["model"], r["batching"]), []).append(r)
    for (model, batching), rows in groups.items():
        info = c["models"].get(model, {})
        arch = info.get("architecture")
        lines += [
            f"## {model} ({info.get('mode') or 'unknown mode'}"
            f"{f', {arch}' if arch else ''}), batching {batching}",
            "",
            "| concurrency | requests/s | samples/s | p50 ms | p95 ms | p99 ms | errors | "
            "rows/run |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['concurrency']} | {r['rps']:.0f} | {r['samples_per_s']:.0f} | "
                f"{_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | "
                f"{r['errors']} | {_fmt(r['mean_batch_rows'], 1)} |"
            )
        lines.append("")
    lines += ["## Targets (SmartMixed model)", "", "| target | limit | measured | met |",
              "|---|---|---|---|"]  # fmt: skip
    for key, t in result["targets"].items():
        value, ok = result["target_values"].get(key), result["meets_targets"].get(key)
        lines.append(
            f"| {key} | {t['op']} {t['limit']} | {_fmt(value)} | "
            f"{'-' if ok is None else ('yes' if ok else 'NO')} |"
        )
    lines += [
        "",
        "requests/s counts 2xx responses; rows/run is the server's mean rows per ONNX Runtime "
        "run over the point (1.0 without batching).",
    ]
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in result["records"]:
        groups.setdefault((r["model"], r["batching"]), []).append(r)
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
    fig.suptitle(f"smartmixed-serve, single-sample V2 JSON, load: {result['load_generator']}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """DIR/http.{json,md,png}, each written atomically."""
    from smartmixed.bench.train_cost import write_outputs as write

    return write(result, out, "http", render=render_markdown, draw=plot)
