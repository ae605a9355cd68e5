"""The load generators of the benches, REST and gRPC, each in closed loop (a client sends its
next request when the previous answer arrives) at one target for D seconds, each returning
{requests, duration_s, mean/p50/p95/p99/max latency (ms), error_kinds}.

REST (``Target``): wrk (C, one thread), its summary printed by a Lua ``done()`` hook after
``WRK_MARKER``; the Python generator (asyncio + httpx) only when wrk is missing: on 2 cores it
spends more CPU per request than the server path it drives. gRPC (``GrpcTarget``): h2load (C, one
thread pinned to one CPU) POSTs the framed request; it cannot read ``grpc-status`` (a trailer),
so ``run_h2load`` counts failed calls in the server's own Prometheus counters before and after
the run. Or ``run_grpc``: this module as a child process pinned to one CPU, C grpc.aio
coroutines over ``channels`` HTTP/2 connections, answers not decoded. Targets are on 127.0.0.1
only; a request times out after REQUEST_TIMEOUT_S; a generator is killed GRACE_S after its end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from smartmixed.bench import BenchError
from smartmixed.bench.server import (
    ServerError,
    Target,
    check_shapes,
    is_loopback,
    read_prometheus,
)
from smartmixed.contract.outputs import percentiles

LOAD_GENERATORS = ("auto", "wrk", "python")
GRPC_GENERATORS = ("h2load", "python")
WRK, PYTHON_HTTPX = "wrk", "python-httpx"  # as recorded in the results
H2LOAD, PYTHON_GRPC = "h2load", "python-grpc-aio"
INSTALL = {
    WRK: "install wrk (apt-get install wrk)",
    H2LOAD: "install nghttp2-client (make system-deps)",
}
WRK_THREADS = 1  # one wrk thread: the generator takes at most one of the two cores
DEFAULT_CHANNELS = 1  # HTTP/2 connections of the gRPC calls (docs/results.md: more gave nothing)
REQUEST_TIMEOUT_S = 5  # a request slower than this counts as a timeout error
GRACE_S = 30  # a generator's start-up and shutdown on top of its duration
MAX_CALLS_PER_SECOND = 100_000  # the Python gRPC loop's count bound: far above what 2 cores answer
SERVER_COUNT_S = 0.2  # after h2load exits, before the server's counters are read again
WRK_MARKER = "SMARTMIXED-WRK-RESULT "
RESULT_MARKER = "SMARTMIXED-GRPC-RESULT "
ERROR_KINDS = ("connect", "read", "write", "status", "timeout")
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
# gRPC's own limit (4 MiB) would refuse image models' larger answers; requests here are small
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
)


class LoadGeneratorError(BenchError):
    """A load generator that is missing, failed, or printed no readable result."""


def resolve_generator(choice: str, *, grpc: bool = False) -> str:
    """The generator a --load-generator (auto: wrk when it is on PATH, else Python) or
    --grpc-generator choice names, as recorded in the results; LoadGeneratorError for a tool
    that is missing (h2load has no fallback: the two are not comparable)."""
    flag, choices = (
        ("--grpc-generator", GRPC_GENERATORS) if grpc else ("--load-generator", LOAD_GENERATORS)
    )
    if choice not in choices:
        raise LoadGeneratorError(f"{flag} {choice!r}: expected one of {', '.join(choices)}")
    tool = H2LOAD if grpc else WRK
    if choice == "auto":
        choice = tool if shutil.which(tool) else "python"
    if choice == tool and shutil.which(tool) is None:
        raise LoadGeneratorError(
            f"{flag} {tool}: {tool} is not installed; {INSTALL[tool]}, or use {flag} python"
        )
    return tool if choice == tool else PYTHON_GRPC if grpc else PYTHON_HTTPX


def tool_version(tool: str) -> str | None:
    """The first line of ``wrk -v`` / ``h2load --version`` (None: not installed)."""
    exe = shutil.which(tool)
    if exe is None:
        return None
    flag = "-v" if tool == WRK else "--version"
    out = subprocess.run([exe, flag], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0].strip() if first else None


def run_tool(command: list[str], what: str, timeout: float, **kwargs: Any) -> str:
    """The standard output of ``command`` run to its end; LoadGeneratorError naming ``what``
    when it overruns ``timeout`` s or fails (with its output's tail)."""
    try:
        out = subprocess.run(command, capture_output=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise LoadGeneratorError(f"{what} did not finish within {timeout:g} s") from None
    stdout, stderr = out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")
    if out.returncode != 0:
        raise LoadGeneratorError(f"{what} failed ({out.returncode}): {(stderr or stdout)[-800:]}")
    return stdout


def marked_result(stdout: str, marker: str, what: str) -> dict[str, Any]:
    """The JSON object after ``marker`` on the line that starts with it."""
    for line in stdout.splitlines():
        if line.startswith(marker):
            try:
                return json.loads(line[len(marker) :])
            except json.JSONDecodeError as e:
                raise LoadGeneratorError(
                    f"{what} printed an unreadable result ({e}): {line!r}"
                ) from None
    raise LoadGeneratorError(f"{what} printed no result line; its output was: {stdout[-1500:]!r}")


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """mean_ms, p50_ms, p95_ms, p99_ms, max_ms of per-request latencies (ms); None for each
    when there is none (JSON has no NaN). Every Python-side generator reports these keys."""
    if not len(latencies_ms):
        return dict.fromkeys(("mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms"))
    p50, p95, p99 = percentiles(latencies_ms, (50, 95, 99))
    return {
        "mean_ms": sum(latencies_ms) / len(latencies_ms),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "max_ms": max(latencies_ms),
    }


# --------------------------------------------------------------------------------------------
# REST: wrk and the Python fallback


# The body of wrk's done(): the summary as one JSON line after {marker} (parse_wrk_output reads
# it). A str.format template, like the scripts that include it.
WRK_SUMMARY = """\
  local e = summary.errors
  io.write(string.format(
    '{marker}{{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,' ..
    '"p50_us":%.1f,"p95_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, latency.max))
"""
WRK_SCRIPT = (
    """\
-- written by smartmixed-bench http: POST one V2 JSON body, print the summary as one JSON line
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
"""
    + WRK_SUMMARY
    + "end\n"
)


def lua_long_string(text: str) -> str:
    """A Lua long-bracket literal holding ``text`` verbatim (no escapes to get wrong)."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def write_wrk_script(path: Path, body: bytes, template: str = WRK_SCRIPT, **fields: str) -> Path:
    """``template`` (a str.format template) with {body} the Lua literal of ``body``, {marker}
    WRK_MARKER and ``fields``, written to ``path``."""
    text = body.decode()
    if "\n" in text[:1]:  # Lua drops a newline right after the opening bracket
        text = "\n" + text
    path.write_text(template.format(body=lua_long_string(text), marker=WRK_MARKER, **fields))
    return path


def wrk_command(
    url: str, script: Path, *, concurrency: int, duration: int, timeout: float = REQUEST_TIMEOUT_S
) -> list[str]:
    """wrk (WRK_THREADS thread) running ``script`` at ``url``: ``concurrency`` keep-alive
    connections for ``duration`` s, a request slower than ``timeout`` s a timeout."""
    command = ["wrk", "-t", str(WRK_THREADS), "-c", str(concurrency), "-d", f"{duration}s"]
    return [*command, "--latency", "--timeout", f"{timeout:g}s", "-s", str(script), url]


def parse_wrk_output(stdout: str) -> dict[str, Any]:
    """The marker line the Lua done() prints -> the raw result (ms, s)."""
    data = marked_result(stdout, WRK_MARKER, "wrk")
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
        raise LoadGeneratorError(f"wrk's result lacks {e}: {data!r}") from None


def run_wrk(
    target: Target, *, concurrency: int, duration: int, script: Path | None = None
) -> dict[str, Any]:
    assert script is not None, "write_wrk_script first"
    command = wrk_command(target.url, script, concurrency=concurrency, duration=duration)
    return parse_wrk_output(run_tool(command, "wrk", duration + GRACE_S))


def run_python(target: Target, *, concurrency: int, duration: int) -> dict[str, Any]:
    return asyncio.run(_python_load(target, concurrency, duration))


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
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        **latency_summary(latencies),
        "error_kinds": kinds,
    }


# --------------------------------------------------------------------------------------------
# gRPC: the target, h2load, and the grpc.aio loop in a child process


def check_address(address: str) -> str:
    """HOST:PORT on this machine (loopback only: the generator floods what it targets)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not is_loopback(host.strip("[]")):
        raise ServerError(f"gRPC address {address!r}: expected 127.0.0.1:PORT")
    return address


@dataclass
class GrpcTarget:
    """One model on one gRPC endpoint and the serialised ModelInferRequest the generators send."""

    name: str
    address: str  # 127.0.0.1:PORT
    request: bytes


def infer_request(name: str, input_name: str, shape: list[int], *, seed: int):
    """A ModelInferRequest: FP32 ``shape`` of seeded raw pixels (integers 0..255, the values of
    the REST bench's JSON row) in raw_input_contents."""
    from smartmixed.serve import grpc_service_pb2 as pb

    size = int(np.prod(shape))
    values = np.random.default_rng(seed).integers(0, 256, size).astype("<f4")
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name=input_name, datatype="FP32", shape=shape)
    request.raw_input_contents.append(values.tobytes())
    return request


def prepare_grpc_target(address: str, name: str, *, seed: int) -> GrpcTarget:
    """Read the model's metadata over gRPC, build its request and check that one call works
    (ServerError naming the model and what was wrong otherwise)."""
    import grpc

    from smartmixed.serve import grpc_service_pb2 as pb
    from smartmixed.serve import grpc_service_pb2_grpc as pb_grpc

    def call(method, request, what: str):
        try:
            return method(request, timeout=10)
        except grpc.RpcError as e:
            raise ServerError(
                f"model {name!r}: {what} failed ({e.code().name}: {e.details()})"
            ) from None

    check_address(address)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelMetadataRequest(name=name)
        meta = call(stub.ModelMetadata, request, f"gRPC ModelMetadata at {address}")
        if not meta.inputs or not meta.outputs:
            raise ServerError(f"model {name!r}: gRPC metadata lists no inputs or no outputs")
        first = meta.inputs[0]
        # the batch axis (-1) becomes 1; the rest is the model's own: [1, D] or [1, C, H, W]
        shape = [1, *(int(d) for d in first.shape[1:])]
        if first.datatype != "FP32" or any(d < 1 for d in shape):
            raise ServerError(
                f"model {name!r}: input {first.name} is {first.datatype} {list(first.shape)}; "
                "the bench sends FP32 with one dynamic batch axis"
            )
        request = infer_request(name, first.name, shape, seed=seed)
        answer = call(stub.ModelInfer, request, "the gRPC check call")
    got = {o.name: list(o.shape) for o in answer.outputs}
    outputs, n_classes = [o.name for o in meta.outputs], int(meta.outputs[0].shape[-1])
    check_shapes(name, got, n_classes, outputs, "gRPC check call")
    return GrpcTarget(name, address, request.SerializeToString())


def run_grpc(
    target: GrpcTarget, *, concurrency: int, duration: float, channels: int = DEFAULT_CHANNELS
) -> dict[str, Any]:
    """Run the grpc.aio closed loop in a child process (the serialised request on its stdin)."""
    check_address(target.address)
    command = [sys.executable, "-m", "smartmixed.bench.load", target.address]
    command += [str(concurrency), str(duration), str(channels)]
    what = "the gRPC load generator"
    stdout = run_tool(command, what, duration + GRACE_S, input=target.request)
    return marked_result(stdout, RESULT_MARKER, what)


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


# h2load's summary: "requests: 10 total, 11 started, 10 done, 10 succeeded, 0 failed, 0 errored,
# 0 timeout" and "status codes: 10 2xx, 0 3xx, 0 4xx, 0 5xx"
_H2LOAD_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_H2LOAD_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def parse_h2load(stdout: str, log_text: str, duration: float) -> dict[str, Any]:
    """h2load's summary and per-request log (start us, HTTP status, latency us) -> the raw
    result, ``error_kinds`` h2load's own failures (``failed``: a stream ended without a whole
    answer; ``http_status``: not 2xx); ``run_h2load`` adds the gRPC codes."""
    counts, statuses = _H2LOAD_REQUESTS.search(stdout), _H2LOAD_STATUS.search(stdout)
    if counts is None or statuses is None:
        raise LoadGeneratorError(
            f"h2load printed no request summary; its output was: {stdout[-1500:]!r}"
        )
    _, started, done, _, failed, errored, timeout = (int(v) for v in counts.groups())
    non_2xx = sum(int(v) for v in statuses.groups()[1:])
    latencies = []
    for line in log_text.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[2].isdigit():
            latencies.append(int(fields[2]) / 1e3)  # us -> ms
    kinds = {"failed": failed, "errored": errored, "timeout": timeout, "http_status": non_2xx}
    return {
        "requests": done,
        "cut": started - done,  # in flight when the duration ended: h2load drops them
        "duration_s": duration,
        **latency_summary(latencies),
        "error_kinds": {kind: n for kind, n in kinds.items() if n},
    }


def h2load_command(
    address: str, body: Path, log: Path, *, concurrency: int, duration: int, channels: int
) -> list[str]:
    """h2load, one thread: ``channels`` connections, C/channels streams each in flight."""
    if concurrency % channels:
        raise LoadGeneratorError(
            f"h2load keeps the same number of calls in flight on every connection: concurrency "
            f"{concurrency} is not a multiple of {channels} gRPC channels"
        )
    streams = str(concurrency // channels)
    command = ["h2load", "-t", "1", "-c", str(channels), "-m", streams, "-D", str(duration)]
    # a connection silent for REQUEST_TIMEOUT_S is a timeout
    command += ["-N", f"{REQUEST_TIMEOUT_S}s", "-d", str(body), "--log-file", str(log)]
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    return [*command, *headers, f"http://{address}{MODEL_INFER}"]


def run_h2load(
    target: GrpcTarget,
    *,
    concurrency: int,
    duration: int,
    channels: int = DEFAULT_CHANNELS,
    outcomes: Callable[[], Counter[str]],
) -> dict[str, Any]:
    """C ModelInfer calls in flight for ``duration`` s from h2load (one thread, pinned to one
    CPU); failed calls counted by the server (``outcomes``: its gRPC outcomes so far, by code
    name, OK included) before and after."""
    check_address(target.address)
    with tempfile.TemporaryDirectory(prefix="smartmixed-h2load-") as tmp:
        body, log = Path(tmp) / "request.bin", Path(tmp) / "requests.log"
        body.write_bytes(grpc_frame(target.request))
        command = h2load_command(
            target.address, body, log, concurrency=concurrency, duration=duration, channels=channels
        )
        before = outcomes()
        # pinned in the child, before exec
        stdout = run_tool(command, "h2load", duration + GRACE_S, preexec_fn=pin_to_one_cpu)
        time.sleep(SERVER_COUNT_S)  # the calls cut at the end: the server counts them too
        after = outcomes()
        raw = parse_h2load(stdout, log.read_text() if log.exists() else "", duration)
    counted = after - before
    kinds = raw["error_kinds"]
    cut = raw.pop("cut")
    for code, n in counted.items():
        if code == "CANCELLED":  # h2load went away from the calls it cut: not failures
            n -= min(n, cut)
        if code != "OK" and n:
            kinds[code] = kinds.get(code, 0) + n
    # completed by h2load, never counted by the server: refused before it counts (say, a
    # message it could not parse)
    uncounted = raw["requests"] - sum(counted.values())
    if uncounted > 0:
        kinds["UNCOUNTED"] = uncounted
    raw["error_kinds"] = dict(sorted(kinds.items()))
    raw["server_counted"] = dict(sorted(counted.items()))
    return raw


def grpc_outcomes(
    metrics_url: str, family: str, code_of: Callable[[dict[str, str]], str | None]
) -> Counter[str]:
    """The calls so far, by gRPC code name, of the counter ``family`` (its _total samples;
    ``code_of`` gives a sample's code from its labels, None for one that is not an inference
    call)."""
    found: Counter[str] = Counter()
    for metric in read_prometheus(metrics_url):
        if metric.name != family:
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and (code := code_of(sample.labels)) is not None:
                found[code] += int(sample.value)
    return found


def smartmixed_outcomes(metrics_url: str) -> Counter[str]:
    """smartmixed-serve's gRPC inference calls (``smartmixed_requests_total{endpoint="grpc"}``
    by status, mapped as grpc_server.py maps a status: 200 OK, client_closed CANCELLED, any other
    unknown status INTERNAL)."""
    from smartmixed.serve.grpc_server import CODES, ENDPOINT
    from smartmixed.serve.metrics import CLIENT_CLOSED

    def code_of(labels: dict[str, str]) -> str | None:
        status = labels.get("status", "")
        if labels.get("endpoint") != ENDPOINT:
            return None
        if status == "200":
            return "OK"
        if status == CLIENT_CLOSED:
            return "CANCELLED"
        return CODES[int(status)].name if status.isdigit() and int(status) in CODES else "INTERNAL"

    return grpc_outcomes(metrics_url, "smartmixed_requests", code_of)


def mlserver_outcomes(metrics_url: str) -> Counter[str]:
    """MLServer's ModelInfer calls (``grpc_server_handled_total``, py-grpc-prometheus's counter
    on its metrics port)."""

    def code_of(labels: dict[str, str]) -> str | None:
        return (
            labels.get("grpc_code", "UNKNOWN")
            if labels.get("grpc_method") == "ModelInfer"
            else None
        )

    return grpc_outcomes(metrics_url, "grpc_server_handled", code_of)


def pin_to_one_cpu() -> int | None:
    """Pin this process (and the threads it starts later) to its last allowed CPU."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


async def closed_loop(
    address: str, request: bytes, *, concurrency: int, duration: float, channels: int
) -> dict[str, Any]:
    """C coroutines, each with one ModelInfer in flight, over ``channels`` connections."""
    import grpc

    latencies = array("d")  # ms, completed calls (OK or not)
    codes: Counter[str] = Counter()
    max_calls = int(MAX_CALLS_PER_SECOND * duration)
    opened = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(channels)]
    try:
        for channel in opened:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        # bytes in, bytes out: no protobuf work per call on this side
        calls = [channel.unary_unary(MODEL_INFER) for channel in opened]
        start = time.perf_counter()
        deadline = start + duration

        async def worker(call) -> None:
            while (t0 := time.perf_counter()) < deadline and len(latencies) < max_calls:
                try:
                    await call(request, timeout=REQUEST_TIMEOUT_S)
                except grpc.aio.AioRpcError as e:
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    codes[e.code().name] += 1
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        await asyncio.sleep(0.01)  # a refused connection must not spin
                    continue
                latencies.append((time.perf_counter() - t0) * 1e3)

        await asyncio.gather(*(worker(calls[i % channels]) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        for channel in opened:
            await channel.close()
    failed = sum(codes.values())
    return {
        # every answered call, like wrk's count (failed ones included; rps counts OK only)
        "requests": len(latencies),
        "failed": failed,
        "duration_s": elapsed,
        **latency_summary(latencies),
        "error_kinds": dict(sorted(codes.items())),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m smartmixed.bench.load ADDRESS CONCURRENCY DURATION CHANNELS``, the serialised
    request on stdin (``run_grpc``'s child): the grpc.aio closed loop, one result line."""
    try:
        address, concurrency, duration, channels = sys.argv[1:] if argv is None else argv
        check_address(address)
        concurrency, duration, channels = int(concurrency), float(duration), int(channels)
        if min(concurrency, channels) < 1 or duration <= 0:
            raise ValueError("concurrency and channels must be >= 1, duration > 0")
    except ValueError as e:  # ServerError too
        print(f"python -m smartmixed.bench.load: {e}", file=sys.stderr)
        return 2
    request = sys.stdin.buffer.read()
    cpu = pin_to_one_cpu()
    result = asyncio.run(
        closed_loop(
            address,
            request,
            concurrency=concurrency,
            duration=duration,
            channels=min(channels, concurrency),
        )
    )
    print(RESULT_MARKER + json.dumps(result | {"cpu": cpu}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
