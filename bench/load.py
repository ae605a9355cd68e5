"""Load generators for the HTTP benches: wrk (C, epoll, one thread) and a Python fallback.

Both drive C keep-alive connections in closed loop at one ``Target`` (a V2 JSON infer URL and
body) for D seconds and return the same raw result: {requests, duration_s, mean/p50/p95/p99/max
latency (ms), error_kinds}. wrk is preferred: on 2 cores a Python generator (asyncio + httpx)
spends more CPU per request than the server path it drives. wrk prints its summary from a Lua
``done()`` hook as one JSON line after ``WRK_MARKER``, parsed here.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from smartmixed.bench import BenchError
from smartmixed.bench.server import Target

LOAD_GENERATORS = ("auto", "wrk", "python")
WRK, PYTHON_HTTPX = "wrk", "python-httpx"
WRK_THREADS = 1  # one wrk thread: the generator takes at most one of the two cores
REQUEST_TIMEOUT_S = 5  # a request slower than this counts as a timeout error
WRK_MARKER = "SMARTMIXED-WRK-RESULT "
ERROR_KINDS = ("connect", "read", "write", "status", "timeout")


class LoadGeneratorError(BenchError):
    """A load generator that is missing, failed, or printed no readable summary."""


def resolve_load_generator(choice: str) -> str:
    """auto -> wrk when it is on PATH, else the Python generator."""
    if choice not in LOAD_GENERATORS:
        raise LoadGeneratorError(
            f"unknown load generator {choice!r}; expected one of {', '.join(LOAD_GENERATORS)}"
        )
    has_wrk = shutil.which("wrk") is not None
    if choice == "wrk" and not has_wrk:
        raise LoadGeneratorError(
            "--load-generator wrk: wrk is not installed (apt-get install wrk), "
            "or use --load-generator python"
        )
    if choice == "python" or (choice == "auto" and not has_wrk):
        return PYTHON_HTTPX
    return WRK


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
                raise LoadGeneratorError(
                    f"wrk printed an unreadable summary ({e}): {line!r}"
                ) from None
            break
    else:
        raise LoadGeneratorError(f"wrk printed no summary line; its output was: {stdout[-1500:]!r}")
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
        raise LoadGeneratorError(f"wrk summary lacks {e}: {line!r}") from None


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
        "wrk",
        "-t",
        str(WRK_THREADS),
        "-c",
        str(concurrency),
        "-d",
        f"{duration}s",
        "--latency",
        "--timeout",
        f"{REQUEST_TIMEOUT_S}s",
        "-s",
        str(script),
        target.url,
    ]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise LoadGeneratorError(f"wrk did not finish within {duration + 60} s") from None
    if out.returncode != 0:
        raise LoadGeneratorError(
            f"wrk failed ({out.returncode}): {(out.stderr or out.stdout)[-800:]}"
        )
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
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        **latency_summary(latencies),
        "error_kinds": kinds,
    }


def latency_summary(latencies_ms) -> dict[str, float | None]:
    """mean_ms, p50_ms, p95_ms, p99_ms, max_ms of per-request latencies (ms); None for each
    when there is none (JSON has no NaN). Every Python-side generator reports these keys."""
    ms = np.asarray(latencies_ms, dtype=np.float64)
    if not ms.size:
        return dict.fromkeys(("mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms"))
    p50, p95, p99 = np.percentile(ms, [50, 95, 99]).tolist()
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "max_ms": float(ms.max()),
    }


def run_python(
    target: Target, *, concurrency: int, duration: int, script: Path | None = None
) -> dict[str, Any]:
    del script  # the body comes from target; the argument keeps both runners alike
    return asyncio.run(_python_load(target, concurrency, duration))
