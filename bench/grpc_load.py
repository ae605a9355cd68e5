"""The gRPC load generators of ``smartmixed-bench http --protocol grpc``: h2load, and a grpc.aio
closed loop.

h2load (``--grpc-generator h2load``, the default). gRPC over HTTP/2 is a POST to
``/inference.GRPCInferenceService/ModelInfer`` with ``content-type: application/grpc`` and
``te: trailers`` and a body of one flag byte (0: not compressed), the message's length as 4
big-endian bytes and the serialised ModelInferRequest. nghttp2's h2load (C, one thread, pinned to
one CPU) sends exactly that, closed loop: ``-c CHANNELS`` connections with ``-m C/CHANNELS``
streams each in flight, for D seconds, each answer's latency in ``--log-file``; it is to the
gRPC side what wrk is to the REST one. h2load cannot read ``grpc-status`` (it arrives in the
trailers, or a trailers-only answer with HTTP status 200), so a call that failed is counted by
the server itself: ``run_h2load`` reads the server's gRPC outcomes before and after the run
(smartmixed-serve: ``smartmixed_requests_total{endpoint="grpc"}`` by status, mapped to gRPC code
names as serve/grpc_server.py maps them; MLServer: ``grpc_server_handled_total`` by
``grpc_code`` for ModelInfer on its metrics port) and counts every outcome but OK as an error
of its code, and every call h2load completed that the server did not count as ``UNCOUNTED``.
h2load's own failures (connection errors, timeouts, a non-2xx HTTP status) are errors too.

The Python generator (``--grpc-generator python``). ``prepare_grpc_target`` reads a model's metadata over gRPC (ModelMetadata), builds
one ModelInferRequest (FP32, the model's input shape with its batch axis 1, the same seeded
raw-pixel values as the REST bench's JSON row, sent as ``raw_input_contents``) and checks that
one ModelInfer call answers every output with shape [1, classes]. ``run_grpc`` then starts this
module as its own process (``python -m smartmixed.bench.grpc_load``), which keeps C ModelInfer
calls in flight for D seconds: each of C coroutines sends its next call as soon as the previous
answer arrives (closed loop), like wrk's C connections on the REST side. It prints one JSON line,
the same raw result as bench/load.py's runners, except that ``error_kinds`` counts failed calls
by gRPC status code name (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...).

Why its own process, on one core. The generator must not share the server's event loop, and on a
2-core machine it must not take more than one core from the server it measures (wrk runs with
one thread for the same reason): the child pins itself to one CPU (the last) before it creates
its channels, so gRPC core's own threads stay on that CPU too.

Channels. ``channels`` HTTP/2 connections (each channel gets its own subchannel pool, so they
really are separate TCP connections) carry the C calls round-robin. One connection multiplexes
every call as streams, which is how a gRPC client normally talks to one server; a few channels
spread the server's per-connection work (HTTP/2 framing, flow control) the way several client
processes would. The default is ``DEFAULT_CHANNELS`` (see docs/results.md for the measurement
behind it); the value used is recorded with every run.

Bounds. 127.0.0.1 only (``check_address``); each call has a deadline of REQUEST_TIMEOUT_S (a
slower one counts as DEADLINE_EXCEEDED); the run stops at its duration or after
``MAX_CALLS_PER_SECOND`` x duration calls, whichever comes first, and the parent kills the child
if it outlives its duration by GRACE_S.

The serialised request is written once and sent as bytes (no per-call protobuf encoding), and
answers are not decoded in the loop (the check call decoded one): what is timed is the wire and
the server, not this generator's protobuf work.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smartmixed.bench.load import REQUEST_TIMEOUT_S, LoadGeneratorError, latency_summary
from smartmixed.bench.server import LOOPBACK_NAMES, ServerError

DEFAULT_CHANNELS = 1
GRPC_GENERATORS = ("h2load", "python")
H2LOAD, PYTHON_GRPC = "h2load", "python-grpc-aio"  # as recorded in the results
MAX_CALLS_PER_SECOND = 100_000  # the count bound: far above what 2 cores answer
GRACE_S = 30  # the child's start-up and shutdown on top of its duration
SERVER_COUNT_S = 0.2  # after h2load exits, before the server's counters are read again
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
RESULT_MARKER = "SMARTMIXED-GRPC-RESULT "
# gRPC's own limit (4 MiB) would refuse image models' larger answers; requests here are small
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
)


def check_address(address: str) -> str:
    """HOST:PORT on this machine (loopback only: the generator floods what it targets)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not port.isdigit() or not loopback:
        raise ServerError(f"gRPC address {address!r}: expected 127.0.0.1:PORT")
    return address


@dataclass
class GrpcTarget:
    """One model on one gRPC endpoint: the serialised ModelInferRequest and what it answers."""

    name: str
    address: str  # 127.0.0.1:PORT
    request: bytes  # a serialised inference.ModelInferRequest
    input_shape: list[int]  # the request's shape, batch axis 1
    n_classes: int
    outputs: list[str]


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

    check_address(address)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
        except grpc.RpcError as e:
            raise ServerError(
                f"model {name!r}: gRPC ModelMetadata at {address} failed "
                f"({e.code().name}: {e.details()})"
            ) from None
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
        outputs = [o.name for o in meta.outputs]
        n_classes = int(meta.outputs[0].shape[-1])
        request = infer_request(name, first.name, shape, seed=seed)
        try:
            answer = stub.ModelInfer(request, timeout=10)
        except grpc.RpcError as e:
            raise ServerError(
                f"model {name!r}: the gRPC check call failed ({e.code().name}: {e.details()})"
            ) from None
    got = {o.name: list(o.shape) for o in answer.outputs}
    want = {key: [1, n_classes] for key in outputs}
    if got != want:
        raise ServerError(
            f"model {name!r}: the gRPC check call returned shapes {got}, expected {want}"
        )
    return GrpcTarget(
        name=name,
        address=address,
        request=request.SerializeToString(),
        input_shape=shape,
        n_classes=n_classes,
        outputs=outputs,
    )


# --------------------------------------------------------------------------------------------
# The parent's side


def run_grpc(
    target: GrpcTarget, *, concurrency: int, duration: float, channels: int = DEFAULT_CHANNELS
) -> dict[str, Any]:
    """Run the closed loop in a child process; its raw result (bench/load.py's keys)."""
    check_address(target.address)
    command = [
        sys.executable,
        "-m",
        "smartmixed.bench.grpc_load",
        "--address",
        target.address,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--channels",
        str(channels),
    ]
    try:
        out = subprocess.run(
            command,
            input=target.request,  # the serialised request, as bytes on stdin
            capture_output=True,
            timeout=duration + GRACE_S,
        )
    except subprocess.TimeoutExpired:
        raise LoadGeneratorError(
            f"the gRPC load generator did not finish within {duration + GRACE_S:g} s"
        ) from None
    stdout, stderr = out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")
    if out.returncode != 0:
        raise LoadGeneratorError(
            f"the gRPC load generator failed ({out.returncode}): {(stderr or stdout)[-800:]}"
        )
    return parse_result(stdout)


def parse_result(stdout: str) -> dict[str, Any]:
    """The child's marker line -> its raw result."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER) :])
            except json.JSONDecodeError as e:
                raise LoadGeneratorError(
                    f"the gRPC load generator printed an unreadable result ({e}): {line!r}"
                ) from None
    raise LoadGeneratorError(
        f"the gRPC load generator printed no result line; its output was: {stdout[-1500:]!r}"
    )


# --------------------------------------------------------------------------------------------
# h2load


def resolve_grpc_generator(choice: str) -> str:
    """h2load | python -> H2LOAD or PYTHON_GRPC; LoadGeneratorError when h2load is missing (no
    fallback: the two are not comparable)."""
    if choice not in GRPC_GENERATORS:
        raise LoadGeneratorError(
            f"unknown gRPC load generator {choice!r}; expected one of {', '.join(GRPC_GENERATORS)}"
        )
    if choice == "python":
        return PYTHON_GRPC
    if shutil.which("h2load") is None:
        raise LoadGeneratorError(
            "--grpc-generator h2load: h2load is not installed; install nghttp2-client "
            "(make system-deps), or use --grpc-generator python"
        )
    return H2LOAD


def h2load_version() -> str | None:
    exe = shutil.which("h2load")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or None


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
    result of bench/load.py's runners. ``error_kinds`` holds h2load's own failures: ``failed``
    (the stream ended without a whole answer), ``errored``, ``timeout`` and ``http_status`` (an
    answer that was not 2xx); gRPC status codes are added by ``run_h2load``."""
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
    return {
        "requests": done,
        "cut": started - done,  # in flight when the duration ended: h2load drops them
        "duration_s": duration,
        **latency_summary(latencies),
        "error_kinds": {
            k: v
            for k, v in (
                ("failed", failed),
                ("errored", errored),
                ("timeout", timeout),
                ("http_status", non_2xx),
            )
            if v
        },
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
    return [
        "h2load",
        "-t",
        "1",
        "-c",
        str(channels),
        "-m",
        str(concurrency // channels),
        "-D",
        str(duration),
        "-N",
        f"{REQUEST_TIMEOUT_S}s",  # a connection silent this long is a timeout
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--log-file",
        str(log),
        f"http://{address}{MODEL_INFER}",
    ]


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
            target.address,
            body,
            log,
            concurrency=concurrency,
            duration=duration,
            channels=channels,
        )
        before = outcomes()
        try:
            out = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=duration + GRACE_S,
                preexec_fn=pin_to_one_cpu,  # in the child, before exec
            )
        except subprocess.TimeoutExpired:
            raise LoadGeneratorError(
                f"h2load did not finish within {duration + GRACE_S:g} s"
            ) from None
        time.sleep(SERVER_COUNT_S)  # the calls cut at the end: the server counts them too
        after = outcomes()
        if out.returncode != 0:
            raise LoadGeneratorError(
                f"h2load failed ({out.returncode}): {(out.stderr or out.stdout)[-800:]}"
            )
        raw = parse_h2load(out.stdout, log.read_text() if log.exists() else "", duration)
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


def read_prometheus(url: str) -> list:
    """The metric families at ``url`` (LoadGeneratorError when it cannot be read: the errors
    of an h2load run are counted there)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            response = client.get(url)
        response.raise_for_status()
        return list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError) as e:
        raise LoadGeneratorError(
            f"cannot read the server's metrics at {url} (h2load's failed calls are counted "
            f"there): {type(e).__name__}: {e}"
        ) from None


def smartmixed_outcomes(metrics_url: str) -> Counter[str]:
    """smartmixed-serve's gRPC inference calls so far, by gRPC code name: its
    ``smartmixed_requests_total{endpoint="grpc"}`` by status, mapped as grpc_server.py maps a
    status (200: OK; client_closed: CANCELLED; any other unknown status: INTERNAL)."""
    from smartmixed.serve.grpc_server import CODES, ENDPOINT
    from smartmixed.serve.metrics import CLIENT_CLOSED

    found: Counter[str] = Counter()
    for family in read_prometheus(metrics_url):
        if family.name != "smartmixed_requests":
            continue
        for sample in family.samples:
            labels = sample.labels
            if not sample.name.endswith("_total") or labels.get("endpoint") != ENDPOINT:
                continue
            status = labels.get("status", "")
            if status == "200":
                code = "OK"
            elif status == CLIENT_CLOSED:
                code = "CANCELLED"
            else:
                code = (
                    CODES[int(status)].name
                    if status.isdigit() and int(status) in CODES
                    else ("INTERNAL")
                )
            found[code] += int(sample.value)
    return found


def mlserver_outcomes(metrics_url: str) -> Counter[str]:
    """MLServer's ModelInfer calls so far, by gRPC code name (``grpc_server_handled_total``,
    py-grpc-prometheus's counter on its metrics port)."""
    found: Counter[str] = Counter()
    for family in read_prometheus(metrics_url):
        if family.name != "grpc_server_handled":
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_total") and labels.get("grpc_method") == "ModelInfer":
                found[labels.get("grpc_code", "UNKNOWN")] += int(sample.value)
    return found


# --------------------------------------------------------------------------------------------
# The child's side


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
        **latency_summary(np.frombuffer(latencies, dtype=np.float64) if latencies else []),
        "error_kinds": dict(sorted(codes.items())),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m smartmixed.bench.grpc_load",
        description="Closed-loop gRPC ModelInfer load (the serialised request on stdin); prints "
        "one result line. Started by smartmixed-bench http --protocol grpc.",
    )
    p.add_argument("--address", required=True, help="127.0.0.1:PORT")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--channels", type=int, default=DEFAULT_CHANNELS)
    args = p.parse_args(argv)
    try:
        address = check_address(args.address)
    except ServerError as e:
        p.error(str(e))
    if min(args.concurrency, args.channels) < 1 or args.duration <= 0:
        p.error("--concurrency and --channels must be >= 1, --duration > 0")
    request = sys.stdin.buffer.read()
    cpu = pin_to_one_cpu()
    result = asyncio.run(
        closed_loop(
            address,
            request,
            concurrency=args.concurrency,
            duration=args.duration,
            channels=min(args.channels, args.concurrency),
        )
    )
    result["cpu"] = cpu
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
