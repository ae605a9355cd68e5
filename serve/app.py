"""The HTTP service: ``create_app`` and the ``Service`` its routes (routes.py) call.

Routes are thin: the V2 codec (codec.py, no FastAPI) turns bytes into numpy and back, the runtime
(models.py, batching.py) runs ONNX Runtime, the middleware (middleware.py) answers health and
checks the API key. ``Service`` adds what sits between them for a service under load:

- **admission**: at most ``max_queue`` inference requests per model are admitted (queued or
  running); the next one gets 503 with Retry-After at once, before its body is read;
- **a body budget**: every route that reads a body reserves its declared Content-Length (the
  route's limit for a chunked body) from one server-wide budget, ``body_budget`` (by default
  one request of the largest size), before reading a byte; a request that would exceed it
  gets 503 with Retry-After, one over the route's own limit 413. An admitted inference request
  holds its share until it is answered (its body, then its decoded rows, live until then).
  Without it, 250 clients pacing 16 MiB bodies held 3 GB, and 128 admitted requests per model
  2.7 GB;
- **a deadline**: an admitted request waits at most ``request_timeout_s`` for its model,
  counted from when its body has been received (an upload's pace is the client's: a 16 MiB
  body sent over 8 s got 503 when the deadline counted from admission); queued work is then
  dropped (the batcher skips it, an unbatched run checks before it starts) and the client gets
  503;
- **bounded decoding**: bodies over ``OFFLOAD_BYTES`` are parsed in a thread, one at a time,
  so a large body never stalls the event loop (health checks) and a burst of them cannot
  multiply memory;
- **client disconnects** are one INFO line (and the status ``client_closed`` in the metrics of
  inference requests), never a 500 or a traceback, on every route.

Domain errors carry their HTTP status; one handler turns them into {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from smartmixed.contract import INPUT, package_version
from smartmixed.serve import codec
from smartmixed.serve.batching import AdaptiveBatcher, Overloaded
from smartmixed.serve.grpc_server import start_grpc_server, stop_grpc_server
from smartmixed.serve.management import ModelManager, load_at_start
from smartmixed.serve.metrics import CLIENT_CLOSED, Metrics
from smartmixed.serve.middleware import Guard
from smartmixed.serve.models import (
    ModelVersion,
    Repository,
    ServeError,
)
from smartmixed.serve.page import add_page
from smartmixed.serve.routes import json_response, router
from smartmixed.serve.server import PAUSE_READING, ConnectionStats
from smartmixed.serve.settings import ServeSettings

log = logging.getLogger("smartmixed.serve")

OFFLOAD_BYTES = 256 * 1024  # bodies at least this large are parsed off the event loop
# Large bodies are parsed one at a time: parsing holds the GIL (orjson, then numpy over Python
# lists), so a second thread adds no throughput, only a second holder the event loop waits on
# (health checks), and a second body's worth of Python objects.
DECODE_THREADS = 1
BODY_HELD = "smartmixed.body_bytes_held"  # ASGI scope key: body budget an admitted request holds
DEADLINE = "smartmixed.deadline"  # ASGI scope key: an admitted request's Deadline


class Deadline:
    """When an admitted request stops waiting for its model (``at``, perf_counter seconds):
    ``timeout_s`` after admission, restarted by ``Service.read_body`` once the body is in."""

    __slots__ = ("at", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.start()

    def start(self) -> None:
        self.at = time.perf_counter() + self.timeout_s


Handler = Callable[[Request, ModelVersion, Deadline], Awaitable[Response]]
T = TypeVar("T")


@dataclass
class Admission:
    """An admitted inference request: its model, its deadline, the body budget it holds."""

    model: ModelVersion
    deadline: Deadline
    body_held: int = 0  # bytes of Service.body_bytes, released once it is answered


class ClientClosed(Exception):
    """The client went away before the request was answered."""


@dataclass(frozen=True)
class Batching:
    """How one model version is served: the settings, narrowed by its config.pbtxt.

    The settings are server-wide defaults; a config.pbtxt speaks for its model, as in Triton:
    its ``max_batch_size`` (> 0) caps the rows of a request and of a merged batch, dynamic
    batching runs only if it has a ``dynamic_batching`` block (and the settings allow batching),
    and its ``max_queue_delay_microseconds`` replaces ``max_batch_delay_ms``.
    """

    max_request_rows: int
    dynamic: bool
    max_batch_size: int
    max_delay_s: float

    @classmethod
    def of(cls, model: ModelVersion, settings: ServeSettings) -> Batching:
        config = model.config
        rows, batch, delay = (
            settings.max_request_rows,
            settings.max_batch_size,
            settings.max_batch_delay_ms / 1000,
        )
        if config.source is None:
            return cls(rows, settings.batching, batch, delay)
        if config.max_batch_size > 0:
            rows, batch = min(rows, config.max_batch_size), min(batch, config.max_batch_size)
        if config.max_queue_delay_s is not None:
            delay = config.max_queue_delay_s
        dynamic = settings.batching and config.dynamic_batching and batch > 1 and delay > 0
        return cls(rows, dynamic, batch, delay)


class Service:
    """What the routes call: the loaded models, how each is batched, admission, the pools."""

    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.version = package_version("smartmixed")
        self.ready = False
        self.repo = Repository(root=settings.repository)
        self.batching: dict[tuple[str, str], Batching] = {}
        self.batchers: dict[tuple[str, str], AdaptiveBatcher] = {}
        # the object each (name, version) of ``batching``/``batchers`` is for: a request
        # admitted on a version swapped out since is not run on its successor's batcher
        self.batched: dict[tuple[str, str], ModelVersion] = {}
        self.in_flight = metrics.in_flight  # model name -> admitted inference requests
        self.stats = metrics.stats  # Triton's statistics extension (statistics.py)
        self.management = ModelManager(self)  # load / unload / poll (management.py)
        self.body_bytes = 0  # of settings.body_budget, held by bodies being read or answered
        self.executor: ThreadPoolExecutor | None = None
        self.decoder: ThreadPoolExecutor | None = None

    async def start(self, repo: Repository) -> None:
        settings = self.settings
        # created once the models load, so a failed start leaves no thread pool behind
        self.executor = ThreadPoolExecutor(
            settings.inference_threads, thread_name_prefix="smartmixed-infer"
        )
        self.decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="smartmixed-decode")
        self.repo = repo
        for versions in repo.models.values():
            for model in versions.values():
                self.serve_version(model)
        await self.management.start()
        self.ready = True
        log.info(
            "serving %s from %s (dynamic batching: %s; model control mode %s)",
            ", ".join(repo.models) or "nothing",
            settings.repository,
            ", ".join(f"{n}/{v}" for n, v in self.batchers) or "none",
            settings.model_control_mode,
        )

    async def stop(self) -> None:
        self.ready = False
        await self.management.stop()
        for batcher in self.batchers.values():
            await batcher.close()
        for pool in (self.executor, self.decoder):
            if pool is not None:
                pool.shutdown(wait=True)

    def serve_version(self, model: ModelVersion) -> None:
        """Route NAME/VERSION's requests to ``model`` from now on: its Batching, its batcher
        when it batches dynamically, its statistics (kept when it replaces the version)."""
        key = (model.name, model.version)
        batching = self.batching[key] = Batching.of(model, self.settings)
        self.batched[key] = model
        if batching.dynamic:
            self.batchers[key] = AdaptiveBatcher(
                model.predict,
                max_batch_size=batching.max_batch_size,
                max_delay=batching.max_delay_s,
                executor=self.executor,
                observe=self._observer(model),
            )
        else:
            self.batchers.pop(key, None)
        self.stats.add(*key)

    def _observer(self, model: ModelVersion):
        """What the batcher of ``model`` reports of each run: metrics and statistics."""
        name, stats = model.name, self.stats

        def observe(rows: int, waits: list[float], inference: float) -> None:
            metrics = self.metrics
            metrics.child(metrics.batch_size, name).observe(rows)
            metrics.child(metrics.inference, name).observe(inference)
            queue_wait = metrics.child(metrics.queue_wait, name)
            for wait in waits:
                queue_wait.observe(wait)
            stats.record_execution(
                model,
                rows=rows,
                infer_ns=int(inference * 1e9),
                queue_ns=[int(wait * 1e9) for wait in waits],
            )

        return observe

    def signature(self, model: ModelVersion) -> codec.Signature:
        batching = self.batching.get((model.name, model.version))
        if batching is None or self.batched.get((model.name, model.version)) is not model:
            batching = Batching.of(model, self.settings)  # swapped out since its admission
        rows = batching.max_request_rows
        return codec.Signature(
            name=model.name,
            input_name=INPUT,
            n_features=model.n_features,
            outputs=tuple(model.outputs),
            max_rows=rows,
            input_shape=model.input_shape,
        )

    # ---- one inference request ------------------------------------------------------------------

    async def admit(
        self,
        request: Request,
        endpoint: str,
        model_name: str,
        version: str | None,
        handler: Handler,
    ) -> Response:
        """A REST inference request through ``admitted``: ``handler(request, model, deadline)``,
        counted by its response's status; a client gone before the answer gets 499 (never
        delivered)."""

        async def run(admission: Admission) -> Response:
            request.scope[BODY_HELD] = 0  # read_body reserves; released once answered
            request.scope[DEADLINE] = admission.deadline
            try:
                return await handler(request, admission.model, admission.deadline)
            finally:
                admission.body_held += request.scope[BODY_HELD]

        try:
            return await self.admitted(
                endpoint, model_name, version, run, status_of=lambda r: str(r.status_code)
            )
        except ClientClosed:
            log.info(
                "%s %s: the client closed the connection before the answer",
                request.method,
                request.url.path,
            )
            return Response(status_code=499)  # never delivered: the client is gone

    async def admitted(
        self,
        endpoint: str,
        model_name: str,
        version: str | None,
        run: Callable[[Admission], Awaitable[T]],
        *,
        status_of: Callable[[T], str] = lambda _: "200",
        timeout_s: float | None = None,
    ) -> T:
        """One inference request, whatever its protocol (REST: ``admit``; gRPC: grpc_server.py):
        admitted if its model has fewer than ``max_queue`` requests in progress (else
        Overloaded, at once), ``run(admission)`` within its deadline (``request_timeout_s``, or
        ``timeout_s`` when that is sooner: a gRPC client's own deadline), then the body budget it
        held released; counted by status (``status_of(result)`` when answered, the error's
        status, ``client_closed``) and timed, under ``endpoint``."""
        started = time.perf_counter()
        label, status = "unknown", "500"
        metrics, max_queue = self.metrics, self.settings.max_queue
        model: ModelVersion | None = None
        try:
            model = self.repo.get(model_name, version)
            label = model.name
            if self.in_flight.get(label, 0) >= max_queue:
                metrics.child(metrics.shed, label, "queue_full").inc()
                raise Overloaded(
                    f"model {label!r} has {max_queue} requests in progress (max_queue); retry later"
                )
            self.in_flight[label] = self.in_flight.get(label, 0) + 1
            timeout = self.settings.request_timeout_s
            admission = Admission(
                model, Deadline(timeout if timeout_s is None else min(timeout, timeout_s))
            )
            try:
                result = await run(admission)
            finally:
                self.in_flight[label] -= 1
                self.body_bytes -= admission.body_held
            status = status_of(result)
            return result
        except (ClientClosed, asyncio.CancelledError):  # cancelled: a gRPC client went away
            status = CLIENT_CLOSED
            raise
        except (ServeError, codec.CodecError) as e:
            status = str(e.status)
            raise
        finally:
            elapsed = time.perf_counter() - started
            metrics.child(metrics.requests, label, endpoint, status).inc()
            metrics.child(metrics.latency, label, endpoint).observe(elapsed)
            if model is not None:  # Triton's statistics: refused and failed ones are "fail"
                self.stats.record_request(
                    model, success=status.startswith("2"), duration_ns=int(elapsed * 1e9)
                )

    def hold_body(self, admission: Admission, size: int) -> None:
        """``size`` bytes of the body budget held by an admitted request whose body arrived
        whole before it was admitted (a gRPC message, already within ``max_request_bytes``),
        until it is answered: its decoded rows and its answer live that long. Overloaded when
        the budget cannot hold them."""
        self._reserve(size)
        admission.body_held += size

    def _reserve(self, size: int, *, why: str = "") -> None:
        """``size`` bytes more of the server-wide body budget; Overloaded when it cannot hold
        them (``why`` says what the bytes are, in the message)."""
        budget = self.settings.body_budget
        if self.body_bytes + size > budget:
            raise Overloaded(
                f"request bodies being received or answered would exceed {budget} bytes "
                f"(max_body_bytes_in_flight){why}; retry later"
            )
        self.body_bytes += size

    async def read_body(
        self, request: Request, *, binary_ok: bool = False, limit: int | None = None
    ) -> bytes | bytearray:
        """The body, decompressed when its Content-Encoding is gzip or deflate; 413 over
        ``limit`` (default ``max_request_bytes``), read, declared or decompressed; 503 when the
        body budget cannot hold it.

        Its Content-Type is not looked at: as in Triton, a body is JSON whatever it declares
        (``curl -d`` sends application/x-www-form-urlencoded), or, where ``binary_ok`` (the
        infer routes), a JSON header and binary tensor data as Inference-Header-Content-Length
        says; on other routes that header is a 400, not ignored. Another Content-Encoding is
        415 before a byte is read.

        The declared size (``limit`` when chunked) is reserved before a byte is read: by an
        admitted request (``admit``) until it is answered, by any other until its body is read;
        an admitted request also holds what decompression adds. An admitted request's deadline
        starts again once its body is in.
        """
        if not binary_ok and codec.BINARY_HEADER in request.headers:
            raise codec.CodecError(
                f"{codec.RESPONSE_BINARY_HEADER} (binary tensor data) is for inference "
                "requests; this route takes a JSON body"
            )
        coding = codec.request_coding(request.headers.get("content-encoding"))
        limit = self.settings.max_request_bytes if limit is None else limit
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit():
            size = int(declared)
        else:  # chunked: up to the limit; neither header: no body
            size = limit if "transfer-encoding" in request.headers else 0
        if size > limit:
            raise ServeError(f"request body of {declared} bytes is over the limit of {limit}", 413)
        self._reserve(size)
        admitted = BODY_HELD in request.scope
        if admitted:
            request.scope[BODY_HELD] += size
        body = bytearray()  # grown in place: held once, not as chunks and then their join
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ServeError(f"request body is over the limit of {limit} bytes", 413)
        except ClientDisconnect:
            raise ClientClosed from None
        finally:
            if not admitted:
                self.body_bytes -= size
        if coding is not None:
            body = await self._inflate(request, body, coding, limit, reserved=size)
        if admitted:
            request.scope[DEADLINE].start()
        return body

    async def _inflate(
        self, request: Request, body: bytearray, coding: str, limit: int, *, reserved: int
    ) -> bytes:
        """``body`` decompressed (codec.inflate: at most ``limit`` bytes), in the decode pool: a
        few KB can inflate to the limit, tens of ms of zlib. That pool's one thread also bounds
        what inflation holds beyond the budget to one body of ``limit`` bytes at a time; an
        admitted request then reserves what it grew by (503 when the budget cannot hold it)."""
        loop = asyncio.get_running_loop()
        inflated = await loop.run_in_executor(self.decoder, codec.inflate, body, coding, limit)
        grown = len(inflated) - reserved
        if BODY_HELD in request.scope and grown > 0:
            self._reserve(grown, why=" once decompressed")
            request.scope[BODY_HELD] += grown
        return inflated

    async def decode(self, function, raw: bytes, *args, **kwargs):
        """``function(raw, *args, **kwargs)``: here when small, in the decode pool when large."""
        if len(raw) < OFFLOAD_BYTES:
            return function(raw, *args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decoder, lambda: function(raw, *args, **kwargs))

    async def run(
        self, model: ModelVersion, x: np.ndarray, outputs: list[str], deadline: Deadline
    ) -> dict[str, np.ndarray]:
        """The model's outputs within the deadline; past it, queued work is dropped with 503.

        Runs on ``model`` itself: a request admitted before its version was swapped out
        (management.py) finishes there, in that version's batcher while it is open, else alone.
        """
        key = (model.name, model.version)
        batcher = self.batchers.get(key)
        if batcher is not None and self.batched[key] is not model:
            batcher = None
        loop = asyncio.get_running_loop()
        if batcher is not None:
            future = batcher.submit(x)  # a cancelled future is skipped by the batcher
        else:
            future = loop.run_in_executor(
                self.executor,
                self._unbatched,
                model,
                x,
                outputs,
                deadline.at,
                time.perf_counter_ns(),
            )
        model.pending += 1  # the version is not closed while this is queued or running
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            future.cancel()

        # one timer handle, not asyncio.timeout: 1 us instead of 4 on the hot path
        timer = loop.call_later(max(deadline.at - time.perf_counter(), 0), expire)
        try:
            result = await future
            return result if batcher is None else {k: result[k] for k in outputs}
        except asyncio.CancelledError:
            if not expired:
                raise  # the request itself was cancelled
            self.metrics.child(self.metrics.shed, model.name, "deadline").inc()
        except Overloaded:
            self.metrics.child(self.metrics.shed, model.name, "deadline").inc()
        finally:
            timer.cancel()
            model.pending -= 1
        raise Overloaded(
            f"model {model.name!r} did not answer within {self.settings.request_timeout_s} s "
            "(request_timeout_s); retry later"
        )

    def _unbatched(
        self, model: ModelVersion, x, outputs: list[str], deadline: float, queued_ns: int
    ):
        """(In an inference thread.) One request's run, unless its deadline has passed while
        it was queued (since ``queued_ns``, perf_counter_ns)."""
        if time.perf_counter() > deadline:
            raise Overloaded("deadline passed while queued")
        started = time.perf_counter_ns()
        result = model.predict(x, outputs)
        infer_ns = time.perf_counter_ns() - started
        metrics = self.metrics
        metrics.child(metrics.batch_size, model.name).observe(len(x))
        metrics.child(metrics.inference, model.name).observe(infer_ns / 1e9)
        self.stats.record_execution(
            model, rows=len(x), infer_ns=infer_ns, queue_ns=[started - queued_ns]
        )
        return result

    # ---- model management and statistics (management.py, statistics.py) ---------------------

    async def load_model(self, name: str) -> None:
        """Load NAME, or reload it: every version its version_policy selects, verified beside
        what is served, then swapped in. BadRequest (400) for a version that does not load
        (what was serving keeps serving), NotFound (404) for a name not in the repository,
        ServeError 503 unless model_control_mode is explicit (as Triton answers)."""
        self.management.check_control()
        await self.management.load(name)

    async def unload_model(self, name: str) -> None:
        """Stop admitting NAME's requests (404 from now on), wait for those admitted, then close
        its batchers and drop its sessions. NotFound for a name not in the repository; ServeError
        503 unless model_control_mode is explicit."""
        self.management.check_control()
        await self.management.unload(name)

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: {name, version, state READY | UNLOADING} per version, and
        {name, state UNAVAILABLE, reason} per model folder not loaded (reason "unloaded", or
        why it failed to load); ``ready_only``: the READY ones."""
        return self.management.index(ready_only=ready_only)

    def statistics(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics, {"model_stats": [...]}: of every version served (no name), of
        NAME's versions, or of NAME/VERSION; NotFound for a model or version not served."""
        return self.management.statistics(name, version)


def create_app(
    settings: ServeSettings,
    repository: Repository | None = None,
    connections: ConnectionStats | None = None,
) -> FastAPI:
    """The service over ``repository`` (already loaded, as the CLI does before it binds a port),
    or over ``settings.repository``, loaded at startup. ``connections``: the HTTP protocol's
    counters of cut connections, exported with the metrics."""
    service = Service(settings, Metrics(connections))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repo = repository or load_at_start(settings)
        await service.start(repo)
        grpc_server = None
        try:
            if settings.grpc_port:  # 0: no gRPC endpoint
                grpc_server = await start_grpc_server(service, settings)
            yield
        finally:
            if grpc_server is not None:  # its requests in progress are answered first
                await stop_grpc_server(grpc_server, settings)
            await service.stop()

    app = FastAPI(
        title="smartmixed",
        version=service.version,
        lifespan=lifespan,
        description="Open Inference Protocol (KServe V2) over ONNX Runtime for SmartMixed models.",
    )
    app.state.service = service

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> Response:
        headers = None
        if isinstance(exc, Overloaded):
            headers = {"Retry-After": str(settings.retry_after_s)}
            request.scope[PAUSE_READING] = settings.retry_after_s  # server.py enforces it
        return json_response({"error": str(exc)}, exc.status, headers)

    @app.exception_handler(ClientClosed)
    async def _client_closed(request: Request, exc: ClientClosed) -> Response:
        log.info(
            "%s %s: the client closed the connection before the answer",
            request.method,
            request.url.path,
        )
        return Response(status_code=499)  # never delivered: the client is gone

    @app.exception_handler(codec.CodecError)
    async def _codec_error(request: Request, exc: codec.CodecError) -> Response:
        return json_response({"error": str(exc)}, exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return json_response({"error": str(exc.detail)}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": f"invalid request: {exc.errors()}"}, 400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return json_response({"error": "internal server error"}, 500)

    app.add_middleware(Guard, settings=settings, service=service)
    app.include_router(router)
    add_page(app)  # GET /: the page for people, plain files in serve/static/
    _render_openapi_once(app)
    return app


def _render_openapi_once(app: FastAPI) -> None:
    """GET /openapi.json answered with bytes rendered on its first request.

    FastAPI renders the schema's JSON (about 9 KB, 150 us with json.dumps) on every request; open
    without a key, it was the costliest answer a client could pipeline: 512 connections
    pipelining it held health checks for 200 ms, half of the event loop's time spent rendering.
    The schema is complete once ``create_app`` returns (the routes are fixed).
    """
    rendered: list[bytes] = []

    async def openapi(request: Request) -> Response:
        if not rendered:
            rendered.append(orjson.dumps(app.openapi()))
        return Response(rendered[0], media_type="application/json")

    routes = app.router.routes  # FastAPI's own route first, where it was: matched first
    i = next(i for i, r in enumerate(routes) if getattr(r, "path", None) == app.openapi_url)
    routes[i] = Route(app.openapi_url, openapi, include_in_schema=False)
