"""The soak suite's clients: how a hostile or a probing client behaves on the wire.

- Raw HTTP/1.1 over asyncio streams (``http_request``, ``read_reply``): the status, Retry-After
  and Connection of every answer, or how it failed (``NoResponse``, ``CutResponse``).
- ``closed_loop``: keep-alive connections that each send their next request when the last
  answer arrives, one ``Attempt`` per request; ``run_async`` runs them on uvloop when installed.
- ``Prober``: health or infer probes from a separate process (stdlib only, so the bench's busy
  event loop never delays one), a NEW connection per probe as the kubelet opens;
  ``summarize_probes`` turns its samples into percentiles and failures.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from smartmixed.bench.soak_server import HEALTH_PATH, Server, SoakError

PROBE_TIMEOUT_S = 5.0  # a health probe slower than this is a failure (counted at this value)
KUBELET_TIMEOUT_S = 1.0  # the kubelet's default probe timeoutSeconds
CONNECT_TIMEOUT_S = 5.0
REFUSED_PAUSE_S = 0.05  # a worker whose connect was refused waits this long (no spinning)


def http_request(
    method: str,
    path: str,
    host: str,
    body: bytes = b"",
    *,
    close: bool = False,
    extra: Sequence[str] = (),
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *extra]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class NoResponse(Exception):
    """The connection closed (or was reset) before any byte of a response."""


class CutResponse(Exception):
    """The connection closed partway through a response."""


@dataclass(slots=True)
class Reply:
    status: int
    retry_after: bool
    close: bool


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One HTTP/1.1 response (Content-Length, chunked or read-to-close body)."""
    buf = bytearray()
    try:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = await reader.read(65536)
            if not chunk:
                raise CutResponse() if buf else NoResponse()
            buf += chunk
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = buf[end + 4 :]
        close = headers.get("connection", "").lower() == "close"
        if "content-length" in headers:
            missing = int(headers["content-length"]) - len(body)
            while missing > 0:
                chunk = await reader.read(min(missing, 65536))
                if not chunk:
                    raise CutResponse()
                missing -= len(chunk)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            while not body.endswith(b"0\r\n\r\n"):  # the last chunk (no trailers here)
                chunk = await reader.read(65536)
                if not chunk:
                    raise CutResponse()
                body += chunk
        else:
            while await reader.read(65536):  # no length: the body ends with the connection
                pass
            close = True
    except (OSError, asyncio.IncompleteReadError):
        raise CutResponse() if buf else NoResponse() from None
    except (ValueError, IndexError):
        raise CutResponse() from None  # not an HTTP response
    return Reply(status=status, retry_after="retry-after" in headers, close=close)


@dataclass(slots=True)
class Attempt:
    """One request of a closed-loop client: outcome reply | timeout | no_response | cut |
    refused (connect refused) | connect_error."""

    start: float  # time.monotonic()
    seconds: float
    outcome: str
    status: int | None = None
    retry_after: bool = False
    close: bool = False
    reused: bool = False  # sent on a keep-alive connection that had already answered


async def closed_loop(
    host: str,
    port: int,
    request: bytes,
    *,
    concurrency: int,
    stop: Callable[[], bool],
    timeout: float,
) -> list[Attempt]:
    """``concurrency`` keep-alive connections, each sending its next request when the last
    answer arrives, until ``stop()``; a connection is reopened after a close or an error."""
    attempts: list[Attempt] = []

    async def worker() -> None:
        writer: asyncio.StreamWriter | None = None
        reused = False
        while not stop():
            t0 = time.monotonic()
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
                    )
                    reused = False
                except (OSError, TimeoutError) as e:
                    kind = "refused" if isinstance(e, ConnectionRefusedError) else "connect_error"
                    attempts.append(Attempt(t0, time.monotonic() - t0, kind))
                    await asyncio.sleep(REFUSED_PAUSE_S)
                    continue
            try:
                writer.write(request)
                reply = await asyncio.wait_for(read_reply(reader), timeout)
            except (TimeoutError, NoResponse, CutResponse, OSError) as e:
                kind = {TimeoutError: "timeout", NoResponse: "no_response", CutResponse: "cut"}.get(
                    type(e), "no_response"
                )
                attempts.append(Attempt(t0, time.monotonic() - t0, kind, reused=reused))
                writer.close()
                writer = None
                continue
            attempts.append(
                Attempt(
                    t0,
                    time.monotonic() - t0,
                    "reply",
                    reply.status,
                    reply.retry_after,
                    reply.close,
                    reused,
                )
            )
            if reply.close:
                writer.close()
                writer = None
            else:
                reused = True
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return attempts


def run_async(coro: Any) -> Any:
    """Run on uvloop when it is installed (a cheaper client on 2 cores), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# The health/infer prober: its own process (stdlib only, starts in ~50 ms) so the bench's busy
# event loop never delays a probe. Every INTERVAL s it opens a NEW connection, sends REQUEST
# (hex), reads one response; stops after DURATION s or when its stdin closes; prints a JSON list
# of [monotonic start, ms, status | error name].
PROBE_SCRIPT = r"""
import json, select, socket, sys, time
host, port, interval, timeout, duration, request = sys.argv[1:7]
port, interval, timeout, duration = int(port), float(interval), float(timeout), float(duration)
request = bytes.fromhex(request)

def probe():
    t0 = time.monotonic()
    end = t0 + timeout
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            s.settimeout(max(end - time.monotonic(), 0.001))
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = [l.split(b":", 1)[1] for l in head.split(b"\r\n")
                          if l.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0]):
                    break
    if not data.startswith(b"HTTP/"):
        return "no_response"
    return int(data.split(b" ", 2)[1])

samples = []
start = time.monotonic()
tick = start
while tick < start + duration:
    if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.buffer.read1(1):
        break
    time.sleep(max(tick - time.monotonic(), 0))
    t0 = time.monotonic()
    try:
        status = probe()
    except TimeoutError:
        status = "timeout"
    except (OSError, ValueError, IndexError) as e:
        status = type(e).__name__
    samples.append([round(t0, 4), round((time.monotonic() - t0) * 1e3, 3), status])
    tick = max(tick + interval, time.monotonic())
print(json.dumps(samples))
"""


class Prober:
    """A running prober process; ``stop()`` returns its samples."""

    def __init__(self, server: Server, request: bytes, *, interval: float, duration: float):
        host, port = server.host_port
        args = [host, str(port), str(interval), str(PROBE_TIMEOUT_S), str(duration), request.hex()]
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROBE_SCRIPT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> list[list[Any]]:
        """Closing stdin ends the prober after its current probe."""
        try:
            out, err = self.process.communicate(timeout=PROBE_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise SoakError("the health prober did not stop") from None
        if self.process.returncode != 0:
            raise SoakError(f"the health prober failed: {err.decode(errors='replace')[-500:]}")
        return json.loads(out)


def health_probe(server: Server) -> bytes:
    host, port = server.host_port
    return http_request(
        "GET",
        HEALTH_PATH,
        f"{host}:{port}",
        close=True,
        extra=["User-Agent: kube-probe/1.30", "Accept: */*"],
    )


def summarize_probes(samples: Sequence[Sequence[Any]], prefix: str) -> dict[str, Any]:
    """p50/p99/max of probes; a failed probe (not 200) counts as PROBE_TIMEOUT_S."""
    failed = [s for s in samples if s[2] != 200]
    values = [s[1] if s[2] == 200 else PROBE_TIMEOUT_S * 1e3 for s in samples]
    p50, p99 = percentile_values(values, [50, 99])
    return {
        f"{prefix}_probes": len(samples),
        f"{prefix}_failures": len(failed),
        f"{prefix}_failure_kinds": dict(Counter(str(s[2]) for s in failed)),
        f"{prefix}_p50_ms": p50,
        f"{prefix}_p99_ms": p99,
        f"{prefix}_max_ms": rounded(max(values, default=None)),
        f"{prefix}_over_1s": sum(v > KUBELET_TIMEOUT_S * 1e3 for v in values),
    }


def probe_series(samples: Sequence[Sequence[Any]], t0: float) -> list[list[Any]]:
    """[[s since t0, ms, status]] for the plot."""
    return [[round(s[0] - t0, 3), s[1], s[2]] for s in samples]


def percentile_values(values: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    if not values:
        return [None] * len(qs)
    return [round(float(v), 3) for v in np.percentile(values, qs)]


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)
