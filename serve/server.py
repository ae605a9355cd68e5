"""The HTTP/1.1 server: uvicorn's httptools protocol with the limits a public endpoint needs.

uvicorn's httptools protocol (the fast one) has no header size limit, no read or write timeout
and no connection cap: one client streaming an endless header line grew the server by 430 MB,
1,000 slow clients held every file descriptor, an upload whose Content-Length exceeded its body
held a request (and SIGTERM) forever (issue F), and clients that never read their answers held
their connections, their answers and SIGTERM forever. ``LimitedHttpProtocol`` adds, per
connection:

- **header size**: request line + headers over ``max_header_bytes`` get 431 and the connection
  closes. The bytes are counted whatever the connection is doing, an answer to an earlier
  (pipelined) request included: httptools buffers an incomplete header in memory and joins a
  long value piece by piece (quadratic), so the bound is a memory and a CPU bound (at most the
  limit plus one read);
- **pipelining bounded**: at most MAX_PIPELINED requests wait behind the one being answered;
  past that the connection is read no further and closes after their answers (a pipelining
  client retries what was not answered, RFC 9112 section 9.3.2). One 256 KB read of tiny
  requests would otherwise queue thousands of them;
- **RFC 9112 section 3.2**: an HTTP/1.1 request with no Host header, or any request with more
  than one, gets 400; so does a protocol upgrade (WebSocket, CONNECT), which the service has
  no use for;
- **read timeouts**: a request whose line and headers have not arrived ``header_timeout_s``
  after its first byte (or after the connection opened), or whose body has not arrived
  ``body_timeout_s`` after its headers, gets 408 and is closed;
- **a write timeout**: an answer the client takes nothing of for ``send_timeout_s`` (writes
  paused by flow control: uvloop's buffer over its high-water mark, the kernel's full) is
  dropped and the connection reset (``transport.abort()``: ``close()`` would wait for a flush
  that never comes, holding the descriptor and the answer). So is a connection closed with
  unsent data that the client does not take. One sweeper task per server checks every
  connection once a second, so the hot path only stores a few attributes;
- **unsent answers bounded**: when the answers waiting for clients that stopped reading exceed
  ``max_unsent_bytes`` server-wide, the connections stalled longest are reset. An answer counts
  whole: what uvloop still buffers plus what the kernel holds unacknowledged (SIOCOUTQ). uvloop
  keeps the whole answer in memory until its last byte is written; counting only its buffer
  (2.2 MB of a 5 MB answer, the kernel holding the other 2.8 MB) let 512 such clients grow the
  server by 240 MB;
- **a connection cap**: ``max_connections``, lowered to stay under the process's open-file limit
  (an exhausted limit makes every new client fail, health checks included). Every connection
  counts until its descriptor is closed, closing ones included. At the cap a new connection
  takes the place of one that blocks others for nothing: first one whose writes are stalled or
  one closing, then the one waiting longest with no request in progress (idle keep-alive, a
  slow client still sending headers, or the rest of a body whose request was answered already,
  e.g. shed with 503), then one with pipelined requests waiting (its client retries them); only
  when every other connection has one request in progress is the newcomer refused, with 503. A
  connection dropped with unsent data is reset, never closed with a flush;
- **parser errors** answered as JSON 400s, like every other client mistake; an error that cannot
  be answered in order (an earlier answer is still being sent) resets the connection;
- **Retry-After, enforced**: a response whose ASGI scope carries ``PAUSE_READING`` (the app sets
  it on a load-shedding 503) stops reading that connection for that many seconds (up to 50% more,
  at random, so that shed clients do not return as one wave). Clients that
  retry a 503 at once would otherwise turn the event loop into a 503 machine: at c=1024 that
  held health checks for 1.8 s (issue F's overload measurement). New connections (health probes)
  and admitted requests are not slowed;
- **draining**: on shutdown an idle keep-alive connection is not closed under a client that may
  be writing its next request at that moment (the client would see a reset): its next request
  is answered with ``Connection: close``, or it is closed after a short grace. Pipelined
  requests not yet started are dropped, and an answer the client takes nothing of for
  DRAIN_SEND_TIMEOUT_S is not waited for, so a stop never waits on a client that does not read.

A connection that goes away, however it goes, marks the request being answered as disconnected
(uvicorn marks only the last request parsed, so a pipelined answer resumed after the loss wrote
to a closed transport: one traceback per connection).

``run_server`` runs the app with these limits, glibc's mmap threshold fixed (MMAP_THRESHOLD) and
a garbage collector tuned for serving: what
exists once the models are loaded is frozen out of the collector's scans (``gc.freeze``) and
young collections run every GC_THRESHOLDS[0] allocations instead of 700. At c=1024 the default
collector's full scans stalled the event loop for ~100 ms at a time (health p99 104 ms; with
this, 36 ms, and 30% more answered requests: issue F's overload measurement); SIGTERM drains and
exits 0 (uvicorn re-raises the signal after draining, which makes a clean stop look like a crash
to supervisors).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import logging
import random
import resource
import signal
import socket
import struct
import termios
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

log = logging.getLogger("smartmixed.serve")

SWEEP_INTERVAL_S = 1.0  # how often the read and write timeouts are checked
DRAIN_GRACE_S = 0.5  # shutdown: how long an idle keep-alive connection may still send a request
DRAIN_SEND_TIMEOUT_S = 2.0  # shutdown: longest wait for a client that takes none of its answer
MAX_PIPELINED = 16  # requests queued behind the one being answered, per connection
GC_THRESHOLDS = (50_000, 50, 100)  # gc.set_threshold while serving (default 700, 10, 10)
FD_RESERVE = 64  # descriptors kept free under the open-file limit (models, pools, logs, epoll)

RESET_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops the queue
# Linux: bytes in a socket's send queue that the peer has not acknowledged (SIOCOUTQ, the same
# request number as the terminal's TIOCOUTQ)
SIOCOUTQ = getattr(termios, "TIOCOUTQ", None)
# glibc malloc: blocks from this size up are mmapped, and unmapped when freed. glibc raises its
# threshold (128 KiB at first) to the size of any mmapped block freed, up to 32 MiB: after the
# first multi-MB body or answer is freed, later ones come from the heap, whose free space stays
# resident. Setting it keeps it there (mallopt turns the raising off): 512 clients sending 5 MB
# requests grew the server by 86-88 MB with the raising, 73-74 MB without. 1 MiB rather than
# 128 KiB: uvicorn's body chunks (up to 256 KiB a read) stay on the heap; mapping and zeroing
# each of them slowed the event loop enough that health checks waited up to 1.2 s.
MMAP_THRESHOLD = 1024 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
PAUSE_READING = "smartmixed.pause_reading_s"  # ASGI scope key: stop reading after this response

# Connection phases (what a connection is waiting for).
IDLE, HEADERS, BODY, RESPONSE = "idle", "headers", "body", "response"


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    send_timeout_s: float
    max_unsent_bytes: int
    max_connections: int


@dataclass
class ConnectionStats:
    """Connections cut by a limit, by reason (exported as a Prometheus counter by the app)."""

    cut: dict[str, int]

    def count(self, reason: str) -> None:
        self.cut[reason] = self.cut.get(reason, 0) + 1


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to leave FD_RESERVE descriptors under RLIMIT_NOFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_RESERVE))


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (as Go and nginx do); return the soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # e.g. a hard limit the kernel refuses
            log.warning("cannot raise the open-file limit from %s to %s (%s)", soft, hard, e)
    return soft


def _raw_response(status: int, message: str, *, retry_after: int | None = None) -> bytes:
    body = orjson.dumps({"error": message})
    head = [
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"connection: close\r\n",
    ]
    if retry_after is not None:
        head.append(b"retry-after: " + str(retry_after).encode() + b"\r\n")
    return b"".join([*head, b"\r\n", body])


class _Refused(Exception):
    """Raised from a parser callback: answer ``status`` with ``message`` and close."""

    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason, self.status, self.message = reason, status, message


class _PipelineFull(Exception):
    """Raised from a parser callback: MAX_PIPELINED requests already wait on this connection."""


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body/send limits, a connection cap and a clean
    drain.

    ``limits``, ``stats`` and the shared state below are class attributes, set by
    ``protocol_class`` for one server (uvicorn builds the protocol itself, with a fixed set of
    arguments).
    """

    limits: ConnectionLimits
    stats: ConnectionStats
    _sweepers: ClassVar[dict[int, asyncio.Task]] = {}  # one per event loop
    _stalled: ClassVar[set[LimitedHttpProtocol]] = set()  # writes blocked (see pause_writing)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = IDLE
        self.phase_since = time.monotonic()
        self.in_head = True  # the parser is reading a request line and headers
        self.header_bytes = 0  # ... and has been fed this many bytes of them
        self.active: RequestResponseCycle | None = None  # the request being answered
        self.stalled_since: float | None = None  # when the client last took any of the answer
        self.unsent = 0  # bytes of answer waiting in the transport at the last sweep
        self.held = 0  # ... plus what the kernel holds unacknowledged (the unsent budget's count)
        self.stopped_reading = False  # MAX_PIPELINED reached: nothing more is parsed
        self.dropped = False  # reset or closed by a limit; its descriptor goes next loop turn
        self.draining = False

    # ---- connection life ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._ensure_sweeper()
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self.stats.count("connection_limit")
            self._refuse(503, "server at its connection limit; retry later", retry_after=1)

    def connection_lost(self, exc: Exception | None) -> None:
        active = self.active
        if active is not None and not active.response_complete:
            # uvicorn marks only the last request parsed; the one being answered (pipelining)
            # would otherwise resume and write to a closed transport
            active.disconnected = True
            active.message_event.set()
        self.pipeline.clear()
        self._stalled.discard(self)
        super().connection_lost(exc)

    def _make_room(self) -> bool:
        """At the cap: drop the connection that blocks others for nothing, if any (see the
        module's docstring for the order)."""
        chosen, chosen_key = None, None
        for c in self.connections:
            if c is self or not isinstance(c, LimitedHttpProtocol) or c.dropped:
                continue
            if c.stalled_since is not None or c.transport.is_closing():
                key = (0, c.stalled_since or c.phase_since)
            elif c.phase in (IDLE, HEADERS) or (c.phase == BODY and c.cycle.response_complete):
                key = (1, c.phase_since)
            elif c.pipeline:
                key = (2, c.phase_since)
            else:
                continue
            if chosen_key is None or key < chosen_key:
                chosen, chosen_key = c, key
        if chosen is None:
            return False
        self.stats.count("evicted_at_connection_limit")
        chosen._drop()
        return True

    def _drop(self) -> None:
        """Close, or reset when an answer is still unsent: a flush may never come."""
        if self.transport.is_closing() or self.transport.get_write_buffer_size():
            self._abort()
        else:
            self.dropped = True
            self.transport.close()

    def _reset(self, reason: str, message: str) -> None:
        self.stats.count(reason)
        log.info("%s: reset: %s", self._peer(), message)
        self._abort()

    def _abort(self) -> None:
        """Reset: close at once, unsent data dropped (the descriptor goes next loop turn). With
        a zero linger the kernel drops its send queue too and sends RST; a plain close would
        keep up to its send buffer (MBs) for a peer that never reads."""
        self.dropped = True
        self._stalled.discard(self)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # e.g. the peer is gone already
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
        self.transport.abort()

    def _answer_in_progress(self) -> bool:
        """An earlier answer is being made or is not sent yet: a refusal now would jump ahead
        of it, or wait behind a client that may never read it."""
        active = self.active
        return (
            active is not None and not active.response_complete and not active.disconnected
        ) or self.transport.get_write_buffer_size() > 0

    def _refuse(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        """Answer ``status`` and close; reset instead when an earlier answer is in the way."""
        if self.transport.is_closing():
            return
        if self._answer_in_progress():
            self._abort()
            return
        self.transport.write(_raw_response(status, message, retry_after=retry_after))
        self.transport.close()

    # ---- reading a request --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.stopped_reading:
            return  # MAX_PIPELINED reached: what follows is never parsed
        self._unset_keepalive_if_required()
        if self.phase == IDLE:
            self.phase, self.phase_since = HEADERS, time.monotonic()
        if self.in_head:  # whatever the phase: a pipelined request's headers count too
            self.header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__  # what the callback raised
            if isinstance(cause, _Refused):
                self._refused(cause)
            elif isinstance(cause, _PipelineFull):
                self._stop_reading()
            else:  # e.g. uvicorn's URL parsing: its message, not "User callback error"
                self._invalid(cause if isinstance(cause, httptools.HttpParserError) else e)
            return
        except httptools.HttpParserUpgrade:  # refused in on_headers_complete; kept for safety
            self._refused(_Refused("upgrade", 400, "protocol upgrades are not supported"))
            return
        except httptools.HttpParserError as e:
            self._invalid(e)
            return
        if self.in_head and self.header_bytes > self.limits.max_header_bytes:
            self.stats.count("header_too_large")
            log.info(
                "%s: request headers over %d bytes", self._peer(), self.limits.max_header_bytes
            )
            self._refuse(
                431, f"request line and headers are over {self.limits.max_header_bytes} bytes"
            )

    def _invalid(self, error: Exception) -> None:
        self.stats.count("invalid_http")
        log.info("%s: invalid HTTP request (%s)", self._peer(), error)
        self._refuse(400, f"invalid HTTP request: {error}")

    def _refused(self, refusal: _Refused) -> None:
        self.stats.count(refusal.reason)
        log.info("%s: %s", self._peer(), refusal.message)
        self._refuse(refusal.status, refusal.message)

    def _stop_reading(self) -> None:
        """MAX_PIPELINED requests wait: answer them, then close; parse nothing more."""
        self.stats.count("pipeline_limit")
        log.info("%s: over %d pipelined requests: closing after them", self._peer(), MAX_PIPELINED)
        self.stopped_reading = True
        self.flow.pause_reading()
        self.cycle.keep_alive = False  # the last request queued: the connection closes after it

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        if parser.should_upgrade():
            raise _Refused(
                "upgrade", 400, "protocol upgrades (WebSocket, CONNECT) are not supported"
            )
        hosts = 0
        for name, _ in self.headers:
            if name == b"host":
                hosts += 1
        if hosts != 1 and (hosts or parser.get_http_version() == "1.1"):
            raise _Refused(
                "bad_host",
                400,
                f"expected one Host header, got {hosts} (RFC 9112 section 3.2)",
            )
        if len(self.pipeline) >= MAX_PIPELINED:
            raise _PipelineFull
        self.phase, self.phase_since = BODY, time.monotonic()
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self.active = cycle
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.header_bytes = True, 0  # the next request's line and headers
        if self.cycle.response_complete:  # answered before its body was read (413, 503, ...)
            self.phase, self.phase_since = IDLE, time.monotonic()
        else:
            self.phase = RESPONSE

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # BODY: answered early, the rest of the body is still read (and dropped) under the body
        # timeout; a pipelined request may already be the current cycle
        if self.phase == RESPONSE and self.cycle.response_complete:
            self.phase, self.phase_since = IDLE, time.monotonic()
        if self.draining and not self.transport.is_closing():
            self.transport.close()
        pause = self.cycle.scope.get(PAUSE_READING)
        if pause and not self.transport.is_closing():
            self.flow.pause_reading()
            # up to 50% longer, at random: shed clients must not come back as one wave
            self.loop.call_later(pause * (1 + 0.5 * random.random()), self._resume_reading)

    def _resume_reading(self) -> None:
        if not self.transport.is_closing() and not self.stopped_reading:
            self.flow.resume_reading()

    # ---- writing an answer --------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport's buffer is over its high-water mark: the client is not keeping up."""
        super().pause_writing()
        self._stalled_now(time.monotonic())
        self._enforce_unsent_budget()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stalled_since = None
        self._stalled.discard(self)

    def _stalled_now(self, now: float) -> None:
        self.stalled_since = now
        self._count_unsent()
        self._stalled.add(self)

    def _count_unsent(self) -> None:
        """``unsent``: the transport's buffer; ``held``: that plus the kernel's unacknowledged
        bytes, the whole of an answer uvloop keeps until its last byte is written."""
        self.unsent = self.held = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if SIOCOUTQ is not None and sock is not None:
            with contextlib.suppress(OSError, ValueError):  # e.g. closed meanwhile
                queued = fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0")
                self.held += struct.unpack("i", queued)[0]

    def _enforce_unsent_budget(self) -> None:
        """Over ``max_unsent_bytes`` held for clients that stopped reading: reset the
        connections stalled longest (never this one: its answer has only just stalled)."""
        stalled, budget = self._stalled, self.limits.max_unsent_bytes
        total = sum(c.held for c in stalled)
        if total <= budget:
            return
        for c in sorted(stalled - {self}, key=lambda c: c.stalled_since or 0.0):
            message = f"answers not read hold {total} bytes, over {budget} server-wide"
            c._reset("unsent_budget", message)
            total -= c.held
            if total <= budget:
                return

    # ---- timeouts -----------------------------------------------------------------------------

    def _ensure_sweeper(self) -> None:
        key = id(self.loop)
        task = self._sweepers.get(key)
        if task is None or task.done():
            self._sweepers[key] = self.loop.create_task(self._sweep(self.connections))

    @classmethod
    async def _sweep(cls, connections: set) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for c in list(connections):
                if isinstance(c, LimitedHttpProtocol) and not c.dropped:
                    c._check_timeouts(now)

    def _check_timeouts(self, now: float) -> None:
        closing = self.transport.is_closing()
        if self.stalled_since is None:
            if closing and self.transport.get_write_buffer_size():
                self._stalled_now(now)  # closed with an answer the client has not taken
        elif self._check_send(now):
            return
        if closing:
            return
        waited = now - self.phase_since
        if self.phase == HEADERS and waited > self.limits.header_timeout_s:
            self._cut("header_timeout", f"headers not complete in {self.limits.header_timeout_s} s")
        elif self.phase == BODY and waited > self.limits.body_timeout_s:
            self._cut("body_timeout", f"body not complete in {self.limits.body_timeout_s} s")
        elif self.phase == IDLE and self.cycle is None and waited > self.limits.header_timeout_s:
            # a connection that never sent a byte: uvicorn arms no keep-alive timer for it
            self.stats.count("idle_new_connection")
            self.transport.close()

    def _check_send(self, now: float) -> bool:
        """Reset the connection (True) when its client took none of the answer for the send
        timeout (shorter while draining)."""
        before = self.unsent
        self._count_unsent()
        unsent = self.unsent
        if unsent < before:  # the client took some
            self.stalled_since = now
        timeout = self.limits.send_timeout_s
        if self.draining:
            timeout = min(timeout, DRAIN_SEND_TIMEOUT_S)
        if now - self.stalled_since <= timeout:
            return False
        self._reset("send_timeout", f"answer not read for {timeout} s ({unsent} bytes unsent)")
        return True

    def _cut(self, reason: str, message: str) -> None:
        self.stats.count(reason)
        log.info("%s: closed: %s", self._peer(), message)
        cycle = self.cycle
        if cycle is not None and cycle is self.active and not cycle.response_started:
            cycle.disconnected = True  # the app sees a disconnect, never writes after our 408
        self._refuse(408, f"request timeout: {message}")

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"

    # ---- shutdown -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful stop: answer what is in progress with Connection: close, then close."""
        self.draining = True
        # requests queued behind the one being answered are dropped (the client retries them)
        self.pipeline.clear()
        active = self.active
        if active is not None and not active.response_complete:
            active.keep_alive = False
        elif self.phase == IDLE:
            self.loop.call_later(DRAIN_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.phase == IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_class(limits: ConnectionLimits, stats: ConnectionStats) -> type[LimitedHttpProtocol]:
    return type(
        "SmartmixedHttpProtocol",
        (LimitedHttpProtocol,),
        {"limits": limits, "stats": stats, "_sweepers": {}, "_stalled": set()},
    )


class _Server(uvicorn.Server):
    """SIGTERM: drain, then return (exit 0); uvicorn would re-raise it after draining."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def run_server(
    app: Any,
    *,
    host: str,
    port: int,
    limits: ConnectionLimits,
    stats: ConnectionStats,
    keep_alive_timeout_s: float,
    graceful_shutdown_s: float,
    log_level: str,
) -> bool:
    """Serve ``app`` until SIGTERM/SIGINT; False when it did not start (the reason is logged)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(limits, stats),
        ws="none",  # upgrades are refused by the protocol (400)
        loop="auto",
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=keep_alive_timeout_s,
        timeout_graceful_shutdown=graceful_shutdown_s,
        server_header=False,
    )
    server = _Server(config)
    _fix_mmap_threshold()
    gc.collect()
    gc.freeze()  # the loaded models, the app, the imports: never garbage, never scanned again
    gc.set_threshold(*GC_THRESHOLDS)
    server.run()
    return server.started


def _fix_mmap_threshold() -> None:
    """glibc's mmap threshold fixed at MMAP_THRESHOLD. Other C libraries have no mallopt (macOS)
    or ignore it (musl), and do not raise a threshold: nothing to do there."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        log.debug("malloc's mmap threshold not set (not glibc)")
