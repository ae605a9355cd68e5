"""The gRPC load generator of ``smartmixed-bench http --protocol grpc``: a grpc.aio closed loop.

What it does. ``prepare_grpc_target`` reads a model's metadata over gRPC (ModelMetadata), builds
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
import subprocess
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from smartmixed.bench.load import REQUEST_TIMEOUT_S, LoadGeneratorError
from smartmixed.bench.server import LOOPBACK_NAMES, ServerError

DEFAULT_CHANNELS = 1
MAX_CALLS_PER_SECOND = 100_000  # the count bound: far above what 2 cores answer
GRACE_S = 30  # the child's start-up and shutdown on top of its duration
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
    ok = np.frombuffer(latencies, dtype=np.float64) if latencies else np.empty(0)
    if ok.size:
        p50, p95, p99 = np.percentile(ok, [50, 95, 99]).tolist()
        mean, peak = float(ok.mean()), float(ok.max())
    else:
        p50 = p95 = p99 = mean = peak = None  # JSON has no NaN
    return {
        # every answered call, like wrk's count (failed ones included; rps counts OK only)
        "requests": len(latencies),
        "failed": failed,
        "duration_s": elapsed,
        "mean_ms": mean,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "max_ms": peak,
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
