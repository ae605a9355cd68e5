"""The soak suite's instruments (bench/soak.py runs the scenarios with them): raw HTTP/1.1
clients over asyncio streams (closed-loop keep-alive load, slowloris, one huge header), the
health prober (its own stdlib-only process, a new connection per probe as the kubelet opens),
the wire attackers on raw non-blocking sockets whose buffers, reads and closes the bench
controls, and what the bench reads of the server in /proc (RSS, open-file limit, descriptors,
the sockets and queues of /proc/net/tcp).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from asyncio import IncompleteReadError, LimitOverrunError
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smartmixed.bench import BenchError
from smartmixed.bench.server import HEALTH_READY_PATH
from smartmixed.contract import outputs

HEALTH_PATH = HEALTH_READY_PATH
LIVE_PATH = "/v2/health/live"
PROBE_TIMEOUT_S = 5.0  # a health probe slower than this is a failure (counted at this value)
KUBELET_TIMEOUT_S = 1.0  # the kubelet's default probe timeoutSeconds
CONNECT_TIMEOUT_S = 5.0
REFUSED_PAUSE_S = 0.05  # a worker whose connect was refused waits this long (no spinning)
SEND_TIMEOUT_S = 5.0  # a request the server does not take within this is a send timeout
ANSWER_TIMEOUT_S = 10.0
BODY_CHUNK = 64 * 1024  # header and body streams are sent in chunks of this
QUEUE_SAMPLE_S = 0.2  # pipelined header: how often the socket queues are read
TCP_LISTEN = 0x0A  # /proc/net/tcp state of a listening socket
# TCP states 1, 2, ... (include/net/tcp_states.h); the server has not closed its side in
# SERVER_OPEN_STATES
TCP_STATES = (
    "established syn_sent syn_recv fin_wait1 fin_wait2 time_wait close close_wait last_ack listen "
    "closing"
)
SERVER_OPEN_STATES = ("established", "syn_sent", "fin_wait1", "fin_wait2")


class SoakError(BenchError):
    """Options the soak suite cannot run with, or a scenario that could not be measured."""


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def percentile_values(values: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    """The ``qs`` percentiles of ``values`` to 3 digits; None for each when there is none."""
    if not values:
        return [None] * len(qs)
    return [round(float(v), 3) for v in outputs.percentiles(values, qs)]


# ---- raw HTTP/1.1 over asyncio streams


def http_request(
    method: str, path: str, host: str, body: bytes = b"", *, close: bool = False
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
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
    """One HTTP/1.1 response (Content-Length, chunked or read-to-close body); the bytes after
    it stay in ``reader`` for the next one (pipelined answers). NoResponse: the connection
    closed or was reset before a whole status line and headers; CutResponse: after them, or
    the bytes are not HTTP."""
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    except IncompleteReadError as e:
        raise CutResponse() if e.partial else NoResponse() from None
    except OSError:
        raise NoResponse() from None
    except LimitOverrunError:
        raise CutResponse() from None  # no end of headers within the reader's limit
    try:
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        close = headers.get("connection", "").lower() == "close"
        if "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)  # the chunk and its CRLF
            await reader.readuntil(b"\r\n")  # the end of the (empty) trailers
        else:
            while await reader.read(65536):  # no length: the body ends with the connection
                pass
            close = True
    except (OSError, ValueError, IndexError, IncompleteReadError, LimitOverrunError):
        raise CutResponse() from None  # cut partway, or not an HTTP response
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
    failures = {TimeoutError: "timeout", NoResponse: "no_response", CutResponse: "cut"}

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
                kind = failures.get(type(e), "no_response")
                attempts.append(Attempt(t0, time.monotonic() - t0, kind, reused=reused))
                writer.close()
                writer = None
                continue
            seconds = time.monotonic() - t0
            attempts.append(Attempt(t0, seconds, "reply", reply.status, reply.retry_after, reused))
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


async def slow_connections(
    host: str, port: int, *, slots: int, duration: float, interval: float
) -> list[dict[str, Any]]:
    """``slots`` slowloris clients for ``duration`` s. Each opens a connection, sends a request
    line, then one header line per interval until the server closes the connection; at its next
    tick it opens a new one (a slowloris tool keeps its connection count up). One record per
    connection: t_connect_s (since the start) or error, closed_after_s and answer if the server
    closed it."""
    t0 = time.monotonic()
    end = t0 + duration
    start_line = f"GET {LIVE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    records: list[dict[str, Any]] = []

    async def dribble(
        record: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(start_line)
        closed = asyncio.ensure_future(reader.read(65536))  # the server's answer, or EOF
        connected_at = time.monotonic()
        while True:
            wait = min(interval, end - time.monotonic())
            if wait > 0:
                await asyncio.wait({closed}, timeout=wait)
            if closed.done():
                record["closed_after_s"] = round(time.monotonic() - connected_at, 3)
                try:
                    data = closed.result()
                    record["answer"] = data.split(b" ", 2)[1].decode() if data else "eof"
                except (OSError, IndexError, UnicodeDecodeError):
                    record["answer"] = "reset"
                break
            if time.monotonic() >= end:
                closed.cancel()
                break
            record["header_lines"] += 1
            with contextlib.suppress(OSError):
                writer.write(f"X-Slow-{record['header_lines']}: 1\r\n".encode())
        writer.close()

    async def slot() -> None:
        while time.monotonic() < end:
            record: dict[str, Any] = {"t_connect_s": None, "error": None, "header_lines": 0}
            records.append(record)
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as e:
                record["error"] = "client_fds" if getattr(e, "errno", 0) == 24 else type(e).__name__
            else:
                record["t_connect_s"] = round(time.monotonic() - t0, 3)
                await dribble(record, reader, writer)
            await asyncio.sleep(min(interval, max(end - time.monotonic(), 0)))

    await asyncio.gather(*(slot() for _ in range(slots)))
    return records


async def big_header(host: str, port: int, *, size: int, limit: float) -> dict[str, Any]:
    """Stream one header line of ``size`` bytes; stop at the server's answer or close."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    answer = asyncio.ensure_future(reader.read(4096))
    chunk = b"a" * BODY_CHUNK
    t0 = time.monotonic()
    sent, complete, broken = 0, False, False
    try:
        writer.write(f"GET {LIVE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nX-Big: ".encode())
        while sent < size and not answer.done() and time.monotonic() - t0 < limit:
            part = chunk[: size - sent]
            writer.write(part)
            drain = asyncio.ensure_future(writer.drain())
            await asyncio.wait(
                {drain, answer},
                timeout=limit - (time.monotonic() - t0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not drain.done():
                drain.cancel()
                continue
            drain.result()
            sent += len(part)
        if sent >= size and not answer.done():
            writer.write(b"\r\n\r\n")
            complete = True
    except OSError:
        broken = True  # the server closed or reset the connection while we were sending
    remaining = limit - (time.monotonic() - t0)
    if not answer.done() and remaining > 0:
        await asyncio.wait({answer}, timeout=remaining)
    elapsed = time.monotonic() - t0
    status: str | int | None = None
    if answer.done():
        try:
            data = answer.result()
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else "closed"
        except (OSError, ValueError, IndexError):
            status = "reset"
    else:
        answer.cancel()
    writer.close()
    closed_early = status in ("closed", "reset") or broken
    return {
        "status": status,
        "bytes_sent": sent,
        "header_complete": complete,
        "answer_s": rounded(elapsed, 4),
        "timed_out": status is None and not broken,
        "refused": bool(
            (isinstance(status, int) and 400 <= status < 500) or (closed_early and not complete)
        ),
    }


# ---- the health/infer prober: its own process (stdlib only, starts in ~50 ms) so the bench's
# busy event loop never delays a probe. Every INTERVAL s it opens a NEW connection, sends the
# next of its REQUESTs (hex, taken in turn), reads one response; stops after DURATION s or when
# its stdin closes; prints a JSON list of [monotonic start, ms, status | error name, request index].
PROBE_SCRIPT = r"""
import json, select, socket, sys, time
host, port, interval, timeout, duration = sys.argv[1:6]
port, interval, timeout, duration = int(port), float(interval), float(timeout), float(duration)
requests = [bytes.fromhex(r) for r in sys.argv[6:]]

def probe(request):
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
    which = len(samples) % len(requests)
    try:
        status = probe(requests[which])
    except TimeoutError:
        status = "timeout"
    except (OSError, ValueError, IndexError) as e:
        status = type(e).__name__
    samples.append([round(t0, 4), round((time.monotonic() - t0) * 1e3, 3), status, which])
    tick = max(tick + interval, time.monotonic())
print(json.dumps(samples))
"""


class Prober:
    """A running prober process on host:port; ``stop()`` returns its samples. Several requests
    are sent in turn (one per probe)."""

    def __init__(
        self, host: str, port: int, requests: Sequence[bytes], *, interval: float, duration: float
    ):
        args = [host, str(port), str(interval), str(PROBE_TIMEOUT_S), str(duration)]
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROBE_SCRIPT, *args, *(r.hex() for r in requests)],
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


def health_probe(host: str, port: int, path: str = HEALTH_PATH) -> bytes:
    """The kubelet's HTTP probe of ``path``."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.30\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode()


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


# ---- the wire attackers: raw non-blocking sockets on asyncio's selector loop (``asyncio.run``),
# which lets one socket wait for reading in one task and for writing in another.


def tcp_state(sock: socket.socket) -> str:
    """The kernel's TCP state of a client socket (TCP_INFO's first byte): "established" while
    the server keeps the connection, "fin_wait2" after our half-close, "close_wait" once the
    server closed it, "close" after a reset."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return "close"
    names = TCP_STATES.split()
    return names[info[0] - 1] if 0 < info[0] <= len(names) else str(info[0])


def error_kind(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.EMFILE:
        return "client_fds"
    return "timeout" if isinstance(e, TimeoutError) else type(e).__name__


async def open_socket(host: str, port: int, *, rcvbuf: int | None = None) -> socket.socket:
    """A connected non-blocking socket; ``rcvbuf`` (SO_RCVBUF) is set before connect, so the
    window the server sees is small from the first byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    return sock


async def wait_ready(sock: socket.socket, *, write: bool) -> None:
    """Until the socket is writable (``write``) or readable, without reading from it."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def done() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(sock, done)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(sock)


async def send_some(sock: socket.socket, data: bytes | memoryview) -> int:
    """What the kernel takes of ``data`` now (> 0 bytes), waiting until it takes some: the
    count of bytes sent stays exact when the caller stops waiting."""
    while True:
        try:
            return sock.send(data)
        except BlockingIOError:
            await wait_ready(sock, write=True)


async def send_all(sock: socket.socket, data: bytes | memoryview) -> int:
    """Send all of ``data``; returns the bytes sent (an exception stops it)."""
    view, sent = memoryview(data), 0
    while sent < len(view):
        sent += await send_some(sock, view[sent:])
    return sent


class Replies:
    """Reads a socket in a task and parses the HTTP answers on it: ``statuses`` counts them,
    ``ended`` says how the stream ended (None: still open; "eof", "reset", ...). With
    ``read_until`` N it stops reading once N answers have arrived (what follows stays unread,
    in the socket's buffers and the server's)."""

    def __init__(self, sock: socket.socket, *, read_until: int | None = None) -> None:
        self.statuses: Counter[int] = Counter()
        self.ended: str | None = None
        self._read_until = read_until
        self._stream = asyncio.StreamReader(limit=2**24)
        self._tasks = [
            asyncio.ensure_future(self._receive(sock)),
            asyncio.ensure_future(self._parse()),
        ]

    async def _receive(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._read_until is None or self.statuses.total() < self._read_until:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    self.ended = "eof"
                    break
                self._stream.feed_data(data)
                await asyncio.sleep(0)  # let the parser count what arrived
        except OSError as e:
            self.ended = error_kind(e)
        if self.ended is not None:
            self._stream.feed_eof()

    async def _parse(self) -> None:
        while True:
            try:
                reply = await read_reply(self._stream)
            except (NoResponse, CutResponse):
                return
            self.statuses[reply.status] += 1

    async def first(self, timeout: float) -> int | str:
        """The status of the first answer, or how waiting for it ended."""
        end = time.monotonic() + timeout
        while not self.statuses:
            if self._tasks[1].done():
                return "no_response" if self.ended in (None, "eof") else self.ended
            if time.monotonic() >= end:
                return "timeout"
            await asyncio.sleep(0.01)
        return next(iter(self.statuses))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()


async def open_slow_readers(
    host: str, port: int, *, connections: int, payload: bytes, rcvbuf: int
) -> tuple[list[socket.socket], Counter[str]]:
    """``connections`` sockets with a ``rcvbuf``-byte receive buffer, each sending ``payload``
    (pipelined requests) and never reading an answer. Returns the sockets that sent it and the
    errors of the others (closed)."""
    errors: Counter[str] = Counter()

    async def one() -> socket.socket | None:
        try:
            sock = await open_socket(host, port, rcvbuf=rcvbuf)
        except (OSError, TimeoutError) as e:
            errors[error_kind(e)] += 1
            return None
        try:
            await asyncio.wait_for(send_all(sock, payload), SEND_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            errors[f"send_{error_kind(e)}"] += 1
        return sock  # held even when the server stopped reading: it is still a connection

    socks = await asyncio.gather(*(one() for _ in range(connections)))
    return [s for s in socks if s is not None], errors


async def pipelined_header(
    host: str,
    port: int,
    *,
    connections: int,
    requests: bytes,
    read_answers: int,
    header_start: bytes,
    duration: float,
) -> list[dict[str, Any]]:
    """``connections`` clients that each send ``requests`` (pipelined; the first
    ``read_answers`` answers are read as they come, the rest never) and then ``header_start``
    and an endless header value in 64 KiB chunks, until the server closes the connection or
    ``duration`` s pass. What the server took of the header (pad: the request line on) is
    estimated from the socket queues every QUEUE_SAMPLE_S s: written to the kernel, minus what
    the client's socket still holds, minus what the server has not read yet (/proc/net/tcp),
    minus the requests. One record per connection (pad_sent, pad_accepted in bytes)."""
    chunk = b"a" * BODY_CHUNK
    end = time.monotonic() + duration
    records: list[dict[str, Any]] = []

    async def one() -> None:
        record: dict[str, Any] = {"error": None, "pad_sent": 0, "pad_accepted": 0}
        records.append(record)
        try:
            sock = await open_socket(host, port)
        except (OSError, TimeoutError) as e:
            record["error"] = error_kind(e)
            return
        client_port = sock.getsockname()[1]
        replies = Replies(sock, read_until=read_answers)
        written = 0
        t_pad = time.monotonic()

        def estimate() -> None:
            sockets = read_tcp_sockets()
            mine, theirs = sockets.get((client_port, port)), sockets.get((port, client_port))
            if mine is None or theirs is None or theirs.inode == 0:
                return  # the server closed it: the last estimate stands
            accepted = written - mine.tx_queue - theirs.rx_queue - len(requests)
            record["pad_accepted"] = max(accepted, 0, record["pad_accepted"])

        async def watch() -> None:
            while True:
                estimate()
                await asyncio.sleep(QUEUE_SAMPLE_S)

        watcher = asyncio.ensure_future(watch())
        try:
            for data in (requests, header_start):
                view = memoryview(data)
                while view and time.monotonic() < end:
                    n = await asyncio.wait_for(send_some(sock, view), end - time.monotonic())
                    view, written = view[n:], written + n
            t_pad = time.monotonic()
            while time.monotonic() < end and replies.ended is None:
                written += await asyncio.wait_for(send_some(sock, chunk), end - time.monotonic())
        except TimeoutError:
            pass  # the duration is over while the server was not reading
        except OSError as e:
            record["send_ended"] = error_kind(e)
        record["pad_sent"] = max(written - len(requests), 0)
        estimate()
        watcher.cancel()
        await asyncio.sleep(QUEUE_SAMPLE_S)  # answers already on their way
        record["closed_by_server"] = replies.ended is not None or tcp_state(sock) not in (
            SERVER_OPEN_STATES
        )
        record["pad_s"] = round(time.monotonic() - t_pad, 3)
        record["answers"] = dict(sorted(replies.statuses.items()))
        replies.stop()
        sock.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return records


async def unsent_close(
    host: str, port: int, *, connections: int, request: bytes, rcvbuf: int, ramp: float
) -> tuple[list[socket.socket], list[dict[str, Any]]]:
    """``connections`` clients opened evenly over ``ramp`` s, each with a ``rcvbuf``-byte
    receive buffer: it sends ``request`` (whose answer is larger than every buffer on the way),
    never reads, and half-closes (shutdown SHUT_WR) once the answer has started to arrive (or
    after SEND_TIMEOUT_S). The sockets stay open for the caller to hold, then close; one
    record per client (error, sent, answered)."""
    records: list[dict[str, Any]] = []
    socks: list[socket.socket] = []

    async def one(i: int) -> None:
        await asyncio.sleep(ramp * i / connections)
        record: dict[str, Any] = {"error": None, "sent": False, "answered": False}
        records.append(record)
        try:
            sock = await open_socket(host, port, rcvbuf=rcvbuf)
        except (OSError, TimeoutError) as e:
            record["error"] = error_kind(e)
            return
        socks.append(sock)
        try:
            await asyncio.wait_for(send_all(sock, request), SEND_TIMEOUT_S)
            record["sent"] = True
            await asyncio.wait_for(wait_ready(sock, write=False), SEND_TIMEOUT_S)
            record["answered"] = True  # bytes wait in the receive buffer, never read
        except (OSError, TimeoutError) as e:
            record["error"] = error_kind(e)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    await asyncio.gather(*(one(i) for i in range(connections)))
    return socks, records


@dataclass(frozen=True)
class Upload:
    """A request whose body a slow-body client uploads: its route, head and whole body."""

    route: str
    head: bytes
    body: bytes


async def slow_uploads(
    host: str, port: int, *, uploads: Sequence[Upload], seconds: float
) -> list[dict[str, Any]]:
    """Every upload at once, on its own connection: the head, then the body in 64 KiB chunks
    paced evenly over ``seconds``; then its answer (an early answer stops the upload). One
    record per upload: route, status (or how it ended), body bytes sent."""

    async def one(upload: Upload) -> dict[str, Any]:
        record: dict[str, Any] = {"route": upload.route, "status": None, "sent": 0}
        t0 = time.monotonic()
        try:
            sock = await open_socket(host, port)
        except (OSError, TimeoutError) as e:
            record["status"] = f"connect_{error_kind(e)}"
            return record
        replies = Replies(sock)
        body = memoryview(upload.body)
        chunks = max(1, -(-len(body) // BODY_CHUNK))
        try:
            await asyncio.wait_for(send_all(sock, upload.head), SEND_TIMEOUT_S)
            for i in range(chunks):
                if replies.statuses or replies.ended:
                    break  # answered (or closed) before the whole body: stop sending
                await asyncio.sleep(max(t0 + seconds * i / chunks - time.monotonic(), 0))
                part = body[i * BODY_CHUNK : (i + 1) * BODY_CHUNK]
                record["sent"] += await asyncio.wait_for(send_all(sock, part), SEND_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            record["send_ended"] = error_kind(e)
        record["status"] = await replies.first(ANSWER_TIMEOUT_S)
        replies.stop()
        sock.close()
        return record

    return list(await asyncio.gather(*(one(u) for u in uploads)))


# ---- /proc


def _proc_fields(path: str, prefix: str) -> list[str] | None:
    """The fields of the first line of ``path`` that starts with ``prefix`` (None: unreadable,
    or no such line)."""
    try:
        with open(path) as f:
            return next((line.split() for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def read_rss_mib(pid: int | None) -> float | None:
    """VmRSS of /proc/PID/status in MiB; None once the process is gone (or without a PID)."""
    found = _proc_fields(f"/proc/{pid}/status", "VmRSS:") if pid else None
    return int(found[1]) / 1024 if found else None


def read_nofile(pid: int) -> int | None:
    """The soft open-file limit of a running process (/proc/PID/limits; None: unlimited)."""
    found = _proc_fields(f"/proc/{pid}/limits", "Max open files")
    return int(found[3]) if found and found[3] != "unlimited" else None


def read_fd_count(pid: int | None) -> int | None:
    """Open descriptors of a process (entries of /proc/PID/fd); None once it is gone."""
    if not pid:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One IPv4 TCP socket of /proc/net/tcp: its state and queues (bytes)."""

    state: int  # 1 established, 8 close-wait, 10 listen, ... (include/net/tcp_states.h)
    tx_queue: int  # written by its owner, not yet acknowledged by the peer
    rx_queue: int  # received, not yet read by its owner
    inode: int  # 0: no process holds it any more (time-wait, orphaned)


def parse_proc_net_tcp(text: str) -> dict[tuple[int, int], TcpSocket]:
    """/proc/net/tcp -> {(local port, remote port): socket} for sockets on 127.0.0.1."""
    sockets = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        local_ip, local_port = f[1].split(":")
        if local_ip != "0100007F":
            continue
        tx, rx = f[4].split(":")
        key = (int(local_port, 16), int(f[2].split(":")[1], 16))
        sockets[key] = TcpSocket(int(f[3], 16), int(tx, 16), int(rx, 16), int(f[9]))
    return sockets


def read_tcp_sockets() -> dict[tuple[int, int], TcpSocket]:
    try:
        return parse_proc_net_tcp(Path("/proc/net/tcp").read_text())
    except OSError:
        return {}


def server_sockets(sockets: Mapping[tuple[int, int], TcpSocket], port: int) -> int:
    """Connections on the server's port that a process still holds (the listener left out)."""
    return sum(
        1
        for (local, _), s in sockets.items()
        if local == port and s.state != TCP_LISTEN and s.inode != 0
    )


class Sampler:
    """Calls ``read`` every ``interval`` s in a thread while the block runs; ``samples``:
    [(s since start, *row)] for each row it returned (None: nothing to record)."""

    def __init__(self, read: Callable[[], tuple | None], interval: float) -> None:
        self.read, self.interval = read, interval
        self.samples: list[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while True:
            row = self.read()
            if row is not None:
                self.samples.append((round(time.monotonic() - start, 3), *row))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, column: int = 1) -> float | None:
        """The largest value of a column (1: the first of ``read``'s row)."""
        return max((s[column] for s in self.samples if s[column] is not None), default=None)


def server_sampler(pid: int | None, interval: float, port: int | None = None) -> Sampler:
    """[(s, RSS MiB)] of a process while it runs; with ``port``: [(s, RSS MiB, open
    descriptors, connections on ``port`` a process holds)]."""

    def read() -> tuple | None:
        rss = rounded(read_rss_mib(pid), 2)
        if port is None:
            return None if rss is None else (rss,)
        return rss, read_fd_count(pid), server_sockets(read_tcp_sockets(), port)

    return Sampler(read, interval)


@contextlib.contextmanager
def raised_nofile() -> Iterator[tuple[int, int]]:
    """This process's soft open-file limit raised to its hard limit (1000+ client sockets),
    restored afterwards; yields (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield soft, target
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
