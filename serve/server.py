"""The HTTP/1.1 server: uvicorn's httptools protocol with the limits a public endpoint needs.

uvicorn's httptools protocol (the fast one) has no header size limit, no read or write timeout
and no connection cap: one client streaming an endless header line grew the server by 430 MB,
1,000 slow clients held every file descriptor, an upload whose Content-Length exceeded its body
held a request (and SIGTERM) forever, and clients that never read their answers held
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
  e.g. shed with 503), then one with pipelined requests waiting (its client retries them). An
  idle keep-alive connection whose next request has arrived unread, or idle for less than
  IDLE_EVICT_AFTER_S, is not idle (dropping it lost that request or the one its client was
  sending: 939-2,302 "no response" per overload run at the cap). When nothing can
  make room, the newcomer's first request decides: a health check or a scrape is answered (at
  most OVER_CAP such connections over the cap), anything else gets 503 with Retry-After and the
  connection closes. A connection dropped with unsent data is reset, never closed with a flush;
- **accepting**: the listener's queue is drained at each readiness (``_Listener``; uvloop
  accepts one connection per loop iteration, so a probe queued behind the 64 clients over the
  cap of a server whose open-file limit is 1024 waited 0.7-3 s), connections are accepted once
  their first bytes have arrived (TCP_DEFER_ACCEPT), and at the cap an inference request is
  refused straight from the accepted socket, with no transport or protocol made for it;
- **parser errors** answered as JSON 400s, like every other client mistake; an error that cannot
  be answered in order (an earlier answer is still being sent) resets the connection;
- **Retry-After, enforced**: a response whose ASGI scope carries ``PAUSE_READING`` (the app sets
  it on a load-shedding 503) stops reading that connection for that many seconds (up to 50% more,
  at random, so that shed clients do not return as one wave). Clients that
  retry a 503 at once would otherwise turn the event loop into a 503 machine: at c=1024 that
  held health checks for 1.8 s (the soak bench's overload measurement). New connections (health probes)
  and admitted requests are not slowed;
- **draining**: on shutdown an idle keep-alive connection is not closed under a client that may
  be writing its next request at that moment (the client would see a reset): its next request
  is answered with ``Connection: close``, or it is closed after a short grace. Pipelined
  requests not yet started are dropped, and an answer the client takes nothing of for
  DRAIN_SEND_TIMEOUT_S is not waited for, so a stop never waits on a client that does not read.

A connection that goes away, however it goes, marks the request being answered as disconnected
(uvicorn marks only the last request parsed, so a pipelined answer resumed after the loss wrote
to a closed transport: one traceback per connection).

``metrics_port`` (as Triton's --metrics-port): a second listener serving only the two health
paths and /metrics, from a thread and event loop of its own, so that neither a full main port
nor a busy serving loop delays a probe or a scrape there. Its health answers are 503 when the
serving loop has not turned for LOOP_STALL_S (a heartbeat stamped every HEARTBEAT_S): a live
thread must not hide a stuck server.

``run_server`` runs the app with these limits, glibc's mmap threshold fixed (MMAP_THRESHOLD) and
a garbage collector tuned for serving: what
exists once the models are loaded is frozen out of the collector's scans (``gc.freeze``) and
young collections run every GC_THRESHOLDS[0] allocations instead of 700. At c=1024 the default
collector's full scans stalled the event loop for ~100 ms at a time (health p99 104 ms; with
this, 36 ms, and 30% more answered requests: the soak bench's overload measurement); SIGTERM drains and
exits 0 (uvicorn re-raises the signal after draining, which makes a clean stop look like a crash
to supervisors).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import gc
import logging
import math
import random
import resource
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
import uvicorn
from uvicorn.config import STARTUP_FAILURE
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
# ... and bytes received that the server has not read (SIOCINQ, the same number as FIONREAD)
SIOCINQ = getattr(termios, "FIONREAD", None)
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
ACCEPT_BATCH = 256  # connections accepted per readiness of a listener (uvloop accepts one)
DEFER_ACCEPT_S = 1  # TCP_DEFER_ACCEPT (seconds; Linux)
AT_CAP_PAUSE_S = 0.05  # after refusing connections at the cap, accepting pauses this long
ACCEPT_RETRY_S = 0.1  # out of descriptors (EMFILE): accepting pauses this long
METRICS_MAX_CONNECTIONS = 16  # the metrics port's cap (probes and scrapes), within FD_RESERVE
OVER_CAP = 16  # connections accepted over the cap, each for one health check or one 503
OVER_CAP_HEADER_TIMEOUT_S = 1.0  # ... whose request line and headers must come this soon
IDLE_EVICT_AFTER_S = 1.0  # at the cap, a keep-alive connection idle this long may be dropped
ROOM_SEARCH_PAUSE_S = 0.1  # at the cap, a search for a connection to drop that failed waits
PEEK_BYTES = 1024  # at the cap: how much of a new connection's request is looked at
DRAIN_READS = 16  # ... and how many 64 KiB reads of it are taken before it is closed
AT_CAP_MESSAGE = "server at its connection limit; retry later"
HEARTBEAT_S = 0.25  # the serving event loop stamps the time this often
LOOP_STALL_S = 10.0  # metrics port: unhealthy when the serving loop has not turned for this long
HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
METRICS_PATH = "/metrics"
CHECK_PATHS = tuple(p.encode() for p in (*HEALTH_PATHS, METRICS_PATH))
HEALTH_CHECKS = CHECK_PATHS[:2]  # live, ready
HEALTH_TAIL = b"content-length: 0\r\nconnection: close\r\n\r\n"  # after the status line

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


AT_CAP_RESPONSE = _raw_response(503, AT_CAP_MESSAGE, retry_after=1)


class _Refused(Exception):
    """Raised from a parser callback: answer ``status`` with ``message`` and close."""

    def __init__(
        self, reason: str, status: int, message: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason, self.status, self.message = reason, status, message
        self.retry_after = retry_after


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
    over_cap_open: ClassVar[int] = 0  # connections open over the cap (at most OVER_CAP)
    room_search_failed_at: ClassVar[float] = -math.inf  # make_room found nothing then
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
        self.over_cap = False  # accepted over the cap: one health check answered, else 503

    # ---- connection life ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._ensure_sweeper()
        over = len(self.connections) > self.limits.max_connections
        if not self.over_cap and over and not self.make_room(self.connections, newcomer=self):
            self.over_cap = True  # accepted under the cap, over it now (others came first)
        if self.over_cap:
            # its first request decides: a health check or a scrape is answered, anything else
            # gets 503 (on_headers_complete); then it closes
            type(self).over_cap_open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        active = self.active
        if active is not None and not active.response_complete:
            # uvicorn marks only the last request parsed; the one being answered (pipelining)
            # would otherwise resume and write to a closed transport
            active.disconnected = True
            active.message_event.set()
        self.pipeline.clear()
        self._stalled.discard(self)
        if self.over_cap:
            type(self).over_cap_open -= 1
        super().connection_lost(exc)

    @classmethod
    def make_room(cls, connections: set, *, newcomer: object = None) -> bool:
        """At the cap: drop the connection that blocks others for nothing, if any (see the
        module's docstring for the order). An idle keep-alive connection whose next request
        has arrived unread (a client told to retry after a 503 whose reading is paused, or one
        the loop has not read yet) is not idle: dropping it would lose that request; nor is one
        idle for less than IDLE_EVICT_AFTER_S (its client is likely sending the next). A search
        that found nothing is not repeated for ROOM_SEARCH_PAUSE_S (it reads every
        connection: at the cap under overload, once per newcomer, it took the event loop)."""
        now = time.monotonic()
        if now - cls.room_search_failed_at < ROOM_SEARCH_PAUSE_S:
            return False
        candidates = []
        for c in connections:
            if c is newcomer or not isinstance(c, LimitedHttpProtocol) or c.dropped or c.over_cap:
                continue
            if c.stalled_since is not None or c.transport.is_closing():
                key = (0, c.stalled_since or c.phase_since)
            elif c.phase in (IDLE, HEADERS) or (c.phase == BODY and c.cycle.response_complete):
                key = (1, c.phase_since)
            elif c.pipeline:
                key = (2, c.phase_since)
            else:
                continue
            candidates.append((key, id(c), c))
        for _, _, c in sorted(candidates, key=lambda k: k[:2]):
            if c.phase == IDLE and (now - c.phase_since < IDLE_EVICT_AFTER_S or c._unread()):
                continue
            cls.stats.count("evicted_at_connection_limit")
            c._drop()
            return True
        cls.room_search_failed_at = now
        return False

    def _unread(self) -> int:
        """Bytes received on this connection that the server has not read (SIOCINQ)."""
        sock = self.transport.get_extra_info("socket")
        if SIOCINQ is None or sock is None:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCINQ, b"\0\0\0\0"))[0]
        except (OSError, ValueError):  # e.g. closed meanwhile
            return 0

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
        if refusal.reason != "connection_limit":  # one a request under overload: not logged
            log.info("%s: %s", self._peer(), refusal.message)
        self._refuse(refusal.status, refusal.message, retry_after=refusal.retry_after)

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
        if self.over_cap and not self._is_check(parser.get_method()):
            raise _Refused("connection_limit", 503, AT_CAP_MESSAGE, retry_after=1)
        self.phase, self.phase_since = BODY, time.monotonic()
        super().on_headers_complete()
        if (self.draining or self.over_cap) and self.cycle is not None:
            self.cycle.keep_alive = False

    def _is_check(self, method: bytes) -> bool:
        return is_check(method, self.url)

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
        # over the cap a connection holds one of OVER_CAP places: a probe sends at once
        header_timeout = (
            OVER_CAP_HEADER_TIMEOUT_S if self.over_cap else self.limits.header_timeout_s
        )
        if self.phase == HEADERS and waited > header_timeout:
            self._cut("header_timeout", f"headers not complete in {header_timeout} s")
        elif self.phase == BODY and waited > self.limits.body_timeout_s:
            self._cut("body_timeout", f"body not complete in {self.limits.body_timeout_s} s")
        elif self.phase == IDLE and self.cycle is None and waited > header_timeout:
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
        {
            "limits": limits,
            "stats": stats,
            "_sweepers": {},
            "_stalled": set(),
            "over_cap_open": 0,
            "room_search_failed_at": -math.inf,
        },
    )


def is_check(method: bytes, target: bytes) -> bool:
    """A health check or a scrape: GET or HEAD of a health path or /metrics."""
    return method in (b"GET", b"HEAD") and target.partition(b"?")[0] in CHECK_PATHS


class _Listener:
    """A listening socket whose queue is drained at each readiness, up to ACCEPT_BATCH
    connections, where uvloop's own server accepts one per loop iteration: with the 64 clients
    over the connection cap reconnecting as they were refused or evicted, a health probe queued
    behind them waited 0.7-3 s.

    Under the cap a connection becomes a transport of the protocol. At the cap, one that blocks
    others for nothing makes room (``make_room``); if none does, the newcomer's request is
    looked at (MSG_PEEK) here: one that is not a health check or a scrape is answered 503 with
    Retry-After and closed at once, with no transport (the cheapest refusal: clients that retry
    at once cost no more than their connects); a health check, or a request not arrived yet,
    gets one of OVER_CAP places over the cap, as a transport, and closes after its answer.
    Stands in for the asyncio.Server uvicorn keeps in ``servers`` (close, wait_closed)."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        *,
        protocol: type[LimitedHttpProtocol],
        connections: set,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.sock, self.factory, self.protocol = sock, factory, protocol
        self.connections, self.ready = connections, ready
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task] = set()
        self.over_cap_pending = 0  # handed over over the cap, not yet connected
        self.closed = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        cap = self.protocol.limits.max_connections
        refused = False
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:  # the client gave up while queued
                continue
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # out of descriptors: the queue waits (the reader would fire again at once)
                log.warning("cannot accept a connection (%s): retrying in %s s", e, ACCEPT_RETRY_S)
                self._pause(ACCEPT_RETRY_S)
                return
            conn.setblocking(False)
            if len(self.connections) + len(self.tasks) < cap or self.protocol.make_room(
                self.connections
            ):
                self._hand_over(conn, over_cap=False)
            else:
                refused |= self._at_cap(conn)
        if refused:
            # Retry-After, enforced for new connections: clients refused at the cap that
            # reconnect at once wait in the kernel's queue meanwhile, costing nothing, where
            # refusing them as fast as they came back took the bench's client 0.35 of a core
            # and the server a third of its answered requests
            self._pause(AT_CAP_PAUSE_S)

    def _pause(self, seconds: float) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(seconds, self._resume)

    def _at_cap(self, conn: socket.socket) -> bool:
        """True when ``conn`` was refused."""
        try:
            head = conn.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            head = b""  # not arrived yet
        except OSError:
            conn.close()
            return False
        line, complete, _ = head.partition(b"\r\n")
        method, _, rest = line.partition(b" ")
        target = rest.partition(b" ")[0]
        check = is_check(method, target)
        path = target.partition(b"?")[0]
        if check and path in HEALTH_CHECKS and self.ready is not None and b"\r\n\r\n" in head:
            # answered here, as the app answers it (its status alone): a probe at the cap waits
            # for no transport, protocol or loop iteration of its own
            status = 200 if path == HEALTH_CHECKS[0] or self.ready() else 503
            self._close_with(conn, STATUS_LINE[status] + HEALTH_TAIL)
            return False
        over = self.protocol.over_cap_open + self.over_cap_pending
        if (complete and not check) or over >= OVER_CAP:
            self._refuse(conn)
            return True
        self._hand_over(conn, over_cap=True)
        return False

    def _refuse(self, conn: socket.socket) -> None:
        self.protocol.stats.count("connection_limit")
        self._close_with(conn, AT_CAP_RESPONSE)

    @staticmethod
    def _close_with(conn: socket.socket, answer: bytes) -> None:
        """Send ``answer`` and close, with what arrived of the request read first: closing over
        unread bytes sends a reset, which can reach the client before it reads the answer."""
        with contextlib.suppress(OSError):  # BlockingIOError: all read; or the client is gone
            for _ in range(DRAIN_READS):
                if not conn.recv(65536):
                    break
        with contextlib.suppress(OSError):
            conn.send(answer)
        conn.close()

    def _hand_over(self, conn: socket.socket, *, over_cap: bool) -> None:
        def protocol() -> asyncio.Protocol:
            made = self.factory()
            made.over_cap = over_cap  # type: ignore[attr-defined]
            return made

        task = self.loop.create_task(self._connect(conn, protocol))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if over_cap:
            self.over_cap_pending += 1
            task.add_done_callback(self._connected_over_cap)

    def _connected_over_cap(self, _: asyncio.Task) -> None:
        self.over_cap_pending -= 1

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    async def _connect(self, conn: socket.socket, protocol: Callable[[], asyncio.Protocol]) -> None:
        try:
            await self.loop.connect_accepted_socket(protocol, conn)
        except OSError:  # reset before its transport was made
            conn.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    async def wait_closed(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks))


class _Server(uvicorn.Server):
    """Accepts with ``_Listener``; SIGTERM: drain, then return (exit 0), where uvicorn would
    re-raise it after draining. ``heartbeat`` is when the event loop last turned (stamped every
    HEARTBEAT_S)."""

    heartbeat: float = 0.0
    listen_sock: socket.socket | None = None  # bound already (the metrics port), else bind
    ready: Callable[[], bool] | None = None  # the app's readiness (health answered at the cap)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is not None:  # not used by run_server; uvicorn's own path
            return await super().startup(sockets)
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        sock = self.listen_sock
        if sock is None:
            sock = config.bind_socket()  # logs "Uvicorn running on ...", exits if it cannot bind
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Linux: a connection is accepted once its first bytes have arrived, so that at the
            # cap its request can be looked at (a health check or not) when it is accepted
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
        sock.listen(config.backlog)
        self.servers = [  # type: ignore[list-item]
            _Listener(
                sock,
                create_protocol,
                protocol=config.http_protocol_class,  # type: ignore[arg-type]
                connections=self.server_state.connections,
                ready=self.ready,
            )
        ]
        self._beat()
        self.started = True

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()
        if not self.should_exit:
            asyncio.get_running_loop().call_later(HEARTBEAT_S, self._beat)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def metrics_port_app(app: Any, heartbeat: Callable[[], float]) -> Any:
    """The metrics port's ASGI app: GET/HEAD of the two health paths and /metrics, answered by
    ``app`` (from the metrics port's thread: the health answers read a flag, the metrics a
    registry that Prometheus' own server also reads from a thread); anything else 404. Health
    is 503 when the serving event loop has not turned for LOOP_STALL_S: this thread answering
    must not hide a serving loop that is stuck."""

    async def serve(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        status, message = 0, ""
        if path not in (*HEALTH_PATHS, METRICS_PATH):
            status = 404
            message = f"the metrics port serves {', '.join((*HEALTH_PATHS, METRICS_PATH))}"
        elif method not in ("GET", "HEAD"):
            status, message = 405, f"{path} takes GET or HEAD, got {method}"
        elif path in HEALTH_PATHS and time.monotonic() - heartbeat() > LOOP_STALL_S:
            status = 503
            message = f"the serving event loop has not turned for over {LOOP_STALL_S:g} s"
        if not status:
            return await app(scope, receive, send)
        body = orjson.dumps({"error": message})
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return serve


def _metrics_server(
    app: Any,
    *,
    host: str,
    port: int,
    limits: ConnectionLimits,
    stats: ConnectionStats,
    heartbeat: Callable[[], float],
    log_level: str,
) -> tuple[_Server, threading.Thread]:
    """The metrics port on its own thread and event loop: a full accept queue or a busy serving
    loop on the main port never delays a probe or a scrape here. Bound here, in the caller's
    thread: a port that cannot be bound stops the start (OSError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1)
    limits = ConnectionLimits(
        **{**limits.__dict__, "max_connections": METRICS_MAX_CONNECTIONS},
    )
    config = uvicorn.Config(
        metrics_port_app(app, heartbeat),
        host=host,
        port=port,
        http=protocol_class(limits, stats),
        ws="none",
        lifespan="off",
        log_level=log_level,
        access_log=False,
        server_header=False,
    )
    server = _Server(config)
    server.listen_sock = sock
    log.info("health and metrics also on http://%s:%d", host, sock.getsockname()[1])

    def run() -> None:
        loop = _new_event_loop()
        try:
            loop.run_until_complete(server.serve())
        finally:
            loop.close()

    return server, threading.Thread(target=run, name="metrics-port", daemon=True)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


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
    metrics_port: int = 0,
    ready: Callable[[], bool] | None = None,
) -> bool:
    """Serve ``app`` until SIGTERM/SIGINT, with health and metrics on ``metrics_port`` too
    (0: none); False when it did not start (the reason is logged). ``ready``: the app's
    readiness, for health checks answered by the listener at the connection cap (without it
    they get a place over the cap)."""
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
    server.ready = ready
    metrics: tuple[_Server, threading.Thread] | None = None
    if metrics_port:
        try:
            metrics = _metrics_server(
                app,
                host=host,
                port=metrics_port,
                limits=limits,
                stats=stats,
                heartbeat=lambda: server.heartbeat,
                log_level=log_level,
            )
        except OSError as e:
            log.error("cannot listen on the metrics port %s:%d (%s)", host, metrics_port, e)
            return False
    _fix_mmap_threshold()
    gc.collect()
    gc.freeze()  # the loaded models, the app, the imports: never garbage, never scanned again
    gc.set_threshold(*GC_THRESHOLDS)
    if metrics is not None:
        server.heartbeat = time.monotonic()  # healthy while the main loop starts
        metrics[1].start()
    try:
        server.run()
    finally:
        if metrics is not None:
            metrics[0].should_exit = True
            metrics[1].join(timeout=DRAIN_GRACE_S + 1)
    return server.started and (metrics is None or metrics[0].started)


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
