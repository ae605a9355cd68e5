"""The HTTP/1.1 server: uvicorn's httptools protocol with the limits a public endpoint needs.

uvicorn's httptools protocol (the fast one) has no header size limit, no header or body read
timeout and no connection cap: one client streaming an endless header line grew the server by
430 MB, 1,000 slow clients held every file descriptor, and an upload whose Content-Length
exceeded its body held a request (and SIGTERM) forever (issue F). ``LimitedHttpProtocol`` adds,
per connection:

- **header size**: request line + headers over ``max_header_bytes`` get 431 and the connection
  closes; httptools buffers an incomplete header in memory, so the bound is also a memory bound
  (at most the limit plus one read);
- **header and body read timeouts**: a request whose line and headers have not arrived
  ``header_timeout_s`` after its first byte (or after the connection opened), or whose body has
  not arrived ``body_timeout_s`` after its headers, gets 408 and is closed. One sweeper task per
  server checks every connection once a second, so the hot path only stores two timestamps;
- **a connection cap**: ``max_connections``, lowered to stay under the process's open-file limit
  (an exhausted limit makes every new client fail, health checks included). At the cap a new
  connection takes the place of the connection that has been waiting longest with no request in
  progress (idle keep-alive, or a slow client still sending headers); only when every connection
  has a request in progress is the newcomer refused, with 503;
- **parser errors** answered as JSON 400s, like every other client mistake;
- **Retry-After, enforced**: a response whose ASGI scope carries ``PAUSE_READING`` (the app sets
  it on a load-shedding 503) stops reading that connection for that many seconds (up to 50% more,
  at random, so that shed clients do not return as one wave). Clients that
  retry a 503 at once would otherwise turn the event loop into a 503 machine: at c=1024 that
  held health checks for 1.8 s (issue F's overload measurement). New connections (health probes)
  and admitted requests are not slowed;
- **draining**: on shutdown an idle keep-alive connection is not closed under a client that may
  be writing its next request at that moment (the client would see a reset): its next request
  is answered with ``Connection: close``, or it is closed after a short grace.

``run_server`` runs the app with these limits and a garbage collector tuned for serving: what
exists once the models are loaded is frozen out of the collector's scans (``gc.freeze``) and
young collections run every GC_THRESHOLDS[0] allocations instead of 700. At c=1024 the default
collector's full scans stalled the event loop for ~100 ms at a time (health p99 104 ms; with
this, 36 ms, and 30% more answered requests: issue F's overload measurement); SIGTERM drains and exits 0 (uvicorn re-raises the
signal after draining, which makes a clean stop look like a crash to supervisors).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import resource
import signal
import time
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("smartmixed.serve")

SWEEP_INTERVAL_S = 1.0  # how often the read timeouts are checked
DRAIN_GRACE_S = 0.5  # shutdown: how long an idle keep-alive connection may still send a request
GC_THRESHOLDS = (50_000, 50, 100)  # gc.set_threshold while serving (default 700, 10, 10)
FD_RESERVE = 64  # descriptors kept free under the open-file limit (models, pools, logs, epoll)

PAUSE_READING = "smartmixed.pause_reading_s"  # ASGI scope key: stop reading after this response

# Connection phases (what a connection is waiting for).
IDLE, HEADERS, BODY, RESPONSE = "idle", "headers", "body", "response"


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
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


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body limits, a connection cap and a clean drain.

    ``limits`` and ``stats`` are class attributes, set by ``protocol_class`` (uvicorn builds
    the protocol itself, with a fixed set of arguments).
    """

    limits: ConnectionLimits
    stats: ConnectionStats
    _sweepers: dict[int, asyncio.Task] = {}  # noqa: RUF012  (one per event loop, shared)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = IDLE
        self.phase_since = time.monotonic()
        self.header_bytes = 0
        self.draining = False

    # ---- connection life ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._ensure_sweeper()
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self.stats.count("connection_limit")
            self._refuse(503, "server at its connection limit; retry later", retry_after=1)

    def _make_room(self) -> bool:
        """At the cap: close the connection idle (or sending headers) the longest, if any."""
        waiting = [
            c
            for c in self.connections
            if c is not self and isinstance(c, LimitedHttpProtocol) and c.phase in (IDLE, HEADERS)
        ]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.phase_since)
        self.stats.count("evicted_at_connection_limit")
        oldest.transport.close()
        return True

    def _refuse(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        if not self.transport.is_closing():
            self.transport.write(_raw_response(status, message, retry_after=retry_after))
            self.transport.close()

    # ---- reading a request --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.phase == IDLE:
            self.phase, self.phase_since, self.header_bytes = HEADERS, time.monotonic(), 0
        if self.phase == HEADERS:
            self.header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
            self._refuse(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as e:
            self.stats.count("invalid_http")
            log.info("%s: invalid HTTP request (%s)", self._peer(), e)
            self._refuse(400, f"invalid HTTP request: {e}")
            return
        if self.phase == HEADERS and self.header_bytes > self.limits.max_header_bytes:
            self.stats.count("header_too_large")
            log.info(
                "%s: request headers over %d bytes", self._peer(), self.limits.max_header_bytes
            )
            self._refuse(
                431, f"request line and headers are over {self.limits.max_header_bytes} bytes"
            )

    def on_headers_complete(self) -> None:
        self.phase, self.phase_since = BODY, time.monotonic()
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
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
        if not self.transport.is_closing():
            self.flow.resume_reading()

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
                if isinstance(c, LimitedHttpProtocol):
                    c._check_timeouts(now)

    def _check_timeouts(self, now: float) -> None:
        if self.transport.is_closing():
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

    def _cut(self, reason: str, message: str) -> None:
        self.stats.count(reason)
        log.info("%s: closed: %s", self._peer(), message)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app sees a disconnect, never writes after us
        self._refuse(408, f"request timeout: {message}")

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"

    # ---- shutdown -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful stop: answer what is in progress with Connection: close, then close."""
        self.draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif self.phase == IDLE:
            self.loop.call_later(DRAIN_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.phase == IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_class(limits: ConnectionLimits, stats: ConnectionStats) -> type[LimitedHttpProtocol]:
    return type(
        "SmartmixedHttpProtocol",
        (LimitedHttpProtocol,),
        {"limits": limits, "stats": stats, "_sweepers": {}},
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
        loop="auto",
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=keep_alive_timeout_s,
        timeout_graceful_shutdown=graceful_shutdown_s,
        server_header=False,
    )
    server = _Server(config)
    gc.collect()
    gc.freeze()  # the loaded models, the app, the imports: never garbage, never scanned again
    gc.set_threshold(*GC_THRESHOLDS)
    server.run()
    return server.started
