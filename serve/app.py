"""The HTTP service: Open Inference Protocol (KServe V2) REST, a friendly predict, metrics.

Routes are thin: the V2 codec (codec.py, no FastAPI) turns bytes into numpy and back, the runtime
(runtime.py, batching.py) runs ONNX Runtime, the middleware (middleware.py) answers health and
checks the API key. This module adds what sits between them for a service under load:

- **admission**: at most ``max_queue`` inference requests per model are admitted (queued or
  running); the next one gets 503 with Retry-After at once, before its body is read;
- **a deadline**: an admitted request waits at most ``request_timeout_s`` for its model; queued
  work is then dropped (the batcher skips it, an unbatched run checks before it starts) and the
  client gets 503;
- **bounded decoding**: bodies over ``OFFLOAD_BYTES`` are parsed in a small thread pool, one or
  two at a time, so a large body never stalls the event loop (health checks) and a burst of them
  cannot multiply memory;
- **client disconnects** are one INFO line and the status ``client_closed`` in the metrics, never
  a 500.

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
from importlib import metadata
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from smartmixed.serve import codec
from smartmixed.serve.batching import AdaptiveBatcher, Overloaded
from smartmixed.serve.metrics import CLIENT_CLOSED, Metrics
from smartmixed.serve.middleware import Guard
from smartmixed.serve.runtime import (
    INPUT,
    ModelVersion,
    Repository,
    ServeError,
    load_repository,
)
from smartmixed.serve.server import ConnectionStats
from smartmixed.serve.settings import ServeSettings

log = logging.getLogger("smartmixed.serve")

OFFLOAD_BYTES = 256 * 1024  # bodies at least this large are parsed off the event loop
DECODE_THREADS = 2  # at most this many large bodies are parsed at once

INFER_SCHEMA = {  # documentation of the V2 infer body; parsing is codec.decode_infer
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string", "example": "input"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "datatype": {"type": "string", "enum": list(codec.V2_DTYPES)},
                    "parameters": {"type": "object"},
                    "data": {"type": "array", "items": {"type": "number"}},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}
PREDICT_SCHEMA = {
    "type": "object",
    "required": ["instances"],
    "properties": {
        "instances": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
    },
}


class ClientClosed(Exception):
    """The client went away before the request was answered."""


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status,
                    headers=headers, media_type="application/json")  # fmt: skip


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) one over ``limit`` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ServeError(f"request body of {declared} bytes is over the limit of {limit}", 413)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(f"request body is over the limit of {limit} bytes", 413)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosed from None
    return b"".join(chunks)


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
            settings.max_request_rows, settings.max_batch_size, settings.max_batch_delay_ms / 1000
        )  # fmt: skip
        if config.source is None:
            return cls(rows, settings.batching, batch, delay)
        if config.max_batch_size > 0:
            rows, batch = min(rows, config.max_batch_size), min(batch, config.max_batch_size)
        if config.max_queue_delay_s is not None:
            delay = config.max_queue_delay_s
        dynamic = settings.batching and config.dynamic_batching and batch > 1 and delay > 0
        return cls(rows, dynamic, batch, delay)


def _signature(model: ModelVersion, batching: Batching) -> codec.Signature:
    return codec.Signature(
        name=model.name, input_name=INPUT, n_features=model.n_features,
        outputs=tuple(model.outputs), max_rows=batching.max_request_rows,
    )  # fmt: skip


def create_app(settings: ServeSettings, repository: Repository | None = None,
               connections: ConnectionStats | None = None) -> FastAPI:  # fmt: skip
    """The service over ``repository`` (already loaded, as the CLI does before it binds a port),
    or over ``settings.repository``, loaded at startup. ``connections``: the HTTP protocol's
    counters of cut connections, exported with the metrics."""
    metrics = Metrics(connections)
    in_flight: dict[str, int] = {}  # model name -> admitted inference requests

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ready = False
        repo = repository or load_repository(
            settings.repository, device=settings.device, threads=settings.intra_op_threads,
            skip_bad_models=settings.skip_bad_models, max_model_bytes=settings.max_model_bytes,
        )  # fmt: skip
        # created once the models load, so a failed start leaves no thread pool behind
        executor = ThreadPoolExecutor(
            settings.inference_threads, thread_name_prefix="smartmixed-infer"
        )
        decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="smartmixed-decode")
        batching = {
            (name, version): Batching.of(model, settings)
            for name, versions in repo.models.items()
            for version, model in versions.items()
        }
        batchers = {
            key: AdaptiveBatcher(
                repo.models[key[0]][key[1]].predict, max_batch_size=b.max_batch_size,
                max_delay=b.max_delay_s, executor=executor, observe=_observer(key[0]),
            )
            for key, b in batching.items()
            if b.dynamic
        }  # fmt: skip
        app.state.repo, app.state.batching, app.state.batchers = repo, batching, batchers
        app.state.executor, app.state.decoder = executor, decoder
        app.state.ready = True
        log.info("serving %s from %s (dynamic batching: %s)", ", ".join(repo.models) or "nothing",
                 settings.repository, ", ".join(f"{n}/{v}" for n, v in batchers) or "none")  # fmt: skip
        try:
            yield
        finally:
            app.state.ready = False
            for batcher in batchers.values():
                await batcher.close()
            executor.shutdown(wait=True)
            decoder.shutdown(wait=True)

    def _observer(name: str):
        def observe(rows: int, waits: list[float], inference: float) -> None:
            metrics.batch_size.labels(name).observe(rows)
            metrics.inference.labels(name).observe(inference)
            for wait in waits:
                metrics.queue_wait.labels(name).observe(wait)

        return observe

    app = FastAPI(
        title="smartmixed",
        version=_version(),
        lifespan=lifespan,
        description="Open Inference Protocol (KServe V2) over ONNX Runtime for SmartMixed models.",
    )

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> Response:
        headers = None
        if isinstance(exc, Overloaded):
            headers = {"Retry-After": str(settings.retry_after_s)}
        return _json({"error": str(exc)}, exc.status, headers)

    @app.exception_handler(codec.CodecError)
    async def _codec_error(request: Request, exc: codec.CodecError) -> Response:
        return _json({"error": str(exc)}, exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _json({"error": str(exc.detail)}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _json({"error": f"invalid request: {exc.errors()}"}, 400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return _json({"error": "internal server error"}, 500)

    app.add_middleware(Guard, settings=settings, app_state=app.state)

    def repo(request: Request) -> Repository:
        return request.app.state.repo

    # ---- server metadata (health: middleware.Guard) -------------------------------------------

    @app.get("/v2", summary="Server metadata")
    async def server_metadata() -> Response:
        return _json(
            {"name": "smartmixed", "version": _version(), "extensions": ["binary_tensor_data"]}
        )

    @app.get("/v2/health/live", summary="Liveness (answered by the middleware, before routing)")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready", summary="Readiness: every model loaded (answered before routing)")
    async def ready(request: Request) -> Response:
        is_ready = getattr(request.app.state, "ready", False)
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    # ---- models -------------------------------------------------------------------------------

    def model_metadata(model: ModelVersion, versions: list[str]) -> dict[str, Any]:
        return {
            "name": model.name,
            "versions": versions,
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, model.n_features]}],
            "outputs": [
                {"name": o, "datatype": "FP32", "shape": [-1, model.n_classes]}
                for o in model.outputs
            ],
            "smartmixed": model.describe(),
        }

    @app.get("/v2/models/{model_name}", summary="Model metadata (latest version)")
    async def metadata_latest(request: Request, model_name: str) -> Response:
        model = repo(request).get(model_name)
        return _json(model_metadata(model, sorted(repo(request).models[model_name], key=int)))

    @app.get("/v2/models/{model_name}/versions/{version}", summary="Model metadata")
    async def metadata_version(request: Request, model_name: str, version: str) -> Response:
        model = repo(request).get(model_name, version)
        return _json(model_metadata(model, [version]))

    async def _ready(request: Request, model_name: str, version: str | None) -> Response:
        try:
            repo(request).get(model_name, version)
        except ServeError as e:
            if e.status != 503:
                raise
            return _json({"name": model_name, "ready": False, "error": str(e)}, 503)
        return _json({"name": model_name, "ready": True})

    @app.get("/v2/models/{model_name}/ready", summary="Model readiness")
    async def model_ready(request: Request, model_name: str) -> Response:
        return await _ready(request, model_name, None)

    @app.get("/v2/models/{model_name}/versions/{version}/ready", summary="Model readiness")
    async def model_version_ready(request: Request, model_name: str, version: str) -> Response:
        return await _ready(request, model_name, version)

    def model_config(request: Request, model: ModelVersion) -> dict[str, Any]:
        batching: Batching = request.app.state.batching[(model.name, model.version)]
        config: dict[str, Any] = {
            "name": model.name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": batching.max_request_rows,
            "input": [{"name": INPUT, "data_type": "TYPE_FP32", "dims": [model.n_features]}],
            "output": [
                {"name": o, "data_type": "TYPE_FP32", "dims": [model.n_classes]}
                for o in model.outputs
            ],
            "execution_providers": model.providers,
            "config_file": None if model.config.source is None else str(model.config.source),
        }
        if batching.dynamic:
            config["dynamic_batching"] = {
                "max_batch_size": batching.max_batch_size,
                "max_queue_delay_microseconds": round(batching.max_delay_s * 1e6),
            }
        return config

    @app.get("/v2/models/{model_name}/config", summary="Model configuration")
    async def config_latest(request: Request, model_name: str) -> Response:
        return _json(model_config(request, repo(request).get(model_name)))

    @app.get("/v2/models/{model_name}/versions/{version}/config", summary="Model configuration")
    async def config_version(request: Request, model_name: str, version: str) -> Response:
        return _json(model_config(request, repo(request).get(model_name, version)))

    # ---- inference ----------------------------------------------------------------------------

    async def inference(
        request: Request, endpoint: str, model_name: str, version: str | None,
        handler: Callable[[ModelVersion, float], Awaitable[Response]],
    ) -> Response:  # fmt: skip
        """Admit, run ``handler(model, deadline)``, and count the request by status and time."""
        started = time.perf_counter()
        label, status = "unknown", "500"
        try:
            model = repo(request).get(model_name, version)
            label = model.name
            if in_flight.get(label, 0) >= settings.max_queue:
                metrics.shed.labels(label, "queue_full").inc()
                raise Overloaded(
                    f"model {label!r} has {settings.max_queue} requests in progress (max_queue); "
                    "retry later"
                )
            in_flight[label] = in_flight.get(label, 0) + 1
            metrics.in_flight.labels(label).inc()
            try:
                response = await handler(model, started + settings.request_timeout_s)
            finally:
                in_flight[label] -= 1
                metrics.in_flight.labels(label).dec()
            status = str(response.status_code)
            return response
        except ClientClosed:
            status = CLIENT_CLOSED
            log.info("%s %s: the client closed the connection before the answer",
                     request.method, request.url.path)  # fmt: skip
            return Response(status_code=499)  # never delivered: the client is gone
        except (ServeError, codec.CodecError) as e:
            status = str(e.status)
            raise
        finally:
            metrics.requests.labels(label, endpoint, status).inc()
            metrics.latency.labels(label, endpoint).observe(time.perf_counter() - started)

    def signature(request: Request, model: ModelVersion) -> codec.Signature:
        return _signature(model, request.app.state.batching[(model.name, model.version)])

    async def body_of(request: Request, *, binary_ok: bool) -> bytes:
        codec.check_content_type(
            request.headers.get("content-type"), binary_ok=binary_ok,
            has_binary_header=codec.BINARY_HEADER in request.headers,
        )  # fmt: skip
        return await read_body(request, settings.max_request_bytes)

    async def decode(request: Request, function, *args, **kwargs):
        """``function(*args, **kwargs)``: here when small, in the decode pool when large."""
        if len(args[0]) < OFFLOAD_BYTES:
            return function(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            request.app.state.decoder, lambda: function(*args, **kwargs)
        )

    async def run_model(
        request: Request, model: ModelVersion, x: np.ndarray, outputs: list[str], deadline: float
    ) -> dict[str, np.ndarray]:
        """Run the model within the deadline; past it, queued work is dropped with 503."""
        remaining = deadline - time.perf_counter()
        batcher = request.app.state.batchers.get((model.name, model.version))
        try:
            async with asyncio.timeout(max(remaining, 0)):
                if batcher is not None:
                    result = await batcher.predict(x)  # a cancelled wait is skipped by the batcher
                    return {k: result[k] for k in outputs}
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    request.app.state.executor, _unbatched, model, x, outputs, deadline
                )
        except (TimeoutError, Overloaded):
            metrics.shed.labels(model.name, "deadline").inc()
            raise Overloaded(
                f"model {model.name!r} did not answer within {settings.request_timeout_s} s "
                "(request_timeout_s); retry later"
            ) from None

    def _unbatched(model: ModelVersion, x, outputs: list[str], deadline: float):
        if time.perf_counter() > deadline:
            raise Overloaded("deadline passed while queued")
        started = time.perf_counter()
        result = model.predict(x, outputs)
        metrics.batch_size.labels(model.name).observe(len(x))
        metrics.inference.labels(model.name).observe(time.perf_counter() - started)
        return result

    async def _infer(request: Request, model: ModelVersion, deadline: float) -> Response:
        raw = await body_of(request, binary_ok=True)
        decoded = await decode(
            request, codec.decode_infer, raw, signature(request, model),
            header_length=request.headers.get(codec.BINARY_HEADER),
        )  # fmt: skip
        result = await run_model(request, model, decoded.x, decoded.outputs, deadline)
        body, headers = codec.encode_infer(model.name, model.version, result, decoded)
        media = "application/octet-stream" if headers else "application/json"
        return Response(body, media_type=media, headers=headers)

    async def _predict(request: Request, model: ModelVersion, deadline: float) -> Response:
        raw = await body_of(request, binary_ok=False)
        x = await decode(request, codec.decode_predict, raw, signature(request, model))
        result = await run_model(request, model, x, ["probabilities"], deadline)
        return Response(
            codec.encode_predict(result["probabilities"], model.labels),
            media_type="application/json",
        )

    infer_docs = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": INFER_SCHEMA}}}
    }

    @app.post("/v2/models/{model_name}/infer", summary="Inference (latest version)",
              openapi_extra=infer_docs)  # fmt: skip
    async def infer_latest(request: Request, model_name: str) -> Response:
        return await inference(
            request, "infer", model_name, None, lambda m, d: _infer(request, m, d)
        )

    @app.post("/v2/models/{model_name}/versions/{version}/infer", summary="Inference",
              openapi_extra=infer_docs)  # fmt: skip
    async def infer_version(request: Request, model_name: str, version: str) -> Response:
        return await inference(
            request, "infer", model_name, version, lambda m, d: _infer(request, m, d)
        )

    predict_docs = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PREDICT_SCHEMA}},
        }
    }

    @app.post("/v1/models/{model_name}:predict", openapi_extra=predict_docs,
              summary="Labels and probabilities for rows of raw features")  # fmt: skip
    async def predict(request: Request, model_name: str) -> Response:
        return await inference(
            request, "predict", model_name, None, lambda m, d: _predict(request, m, d)
        )

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _version() -> str:
    try:
        return metadata.version("smartmixed")
    except metadata.PackageNotFoundError:
        return "unknown"
