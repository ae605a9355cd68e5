"""The HTTP service: Open Inference Protocol (KServe V2) REST, a friendly predict, metrics.

Routes translate HTTP <-> numpy and call the FastAPI-free runtime (runtime.py). Request bodies
are parsed with orjson and converted straight to numpy (no per-element validation models);
inference runs in a thread pool, so the event loop stays free for health checks. Domain errors
carry their HTTP status; one handler turns them into {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from smartmixed.serve.runtime import (
    AdaptiveBatcher,
    BadRequest,
    ModelVersion,
    NotReady,
    Repository,
    ServeError,
    load_repository,
)
from smartmixed.serve.settings import ServeSettings

log = logging.getLogger("smartmixed.serve")

# V2 datatypes accepted for the input tensor (converted to float32) and their byte layouts.
V2_DTYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
}  # fmt: skip
BINARY_HEADER = "inference-header-content-length"
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics", "/docs", "/openapi.json", "/redoc")

INFER_SCHEMA = {  # documentation (and fuzzing) of the V2 infer body; parsing is by hand
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
                    "datatype": {"type": "string", "enum": list(V2_DTYPES)},
                    "parameters": {"type": "object"},
                    "data": {"type": "array", "items": {}},
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


class Metrics:
    """Prometheus metrics, on a registry of the app's own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "smartmixed_requests", "Requests by model, endpoint and status",
            ["model", "endpoint", "status"], registry=self.registry,
        )  # fmt: skip
        latency_buckets = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
        self.latency = Histogram(
            "smartmixed_request_seconds", "Request latency, end to end in the handler",
            ["model", "endpoint"], buckets=latency_buckets, registry=self.registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "smartmixed_queue_wait_seconds", "Wait in the dynamic-batching queue",
            ["model"], buckets=latency_buckets, registry=self.registry,
        )  # fmt: skip
        self.inference = Histogram(
            "smartmixed_inference_seconds", "ONNX Runtime run time per batch",
            ["model"], buckets=latency_buckets, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "smartmixed_batch_rows", "Rows per ONNX Runtime run",
            ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry,
        )  # fmt: skip


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status,
                    media_type="application/json")  # fmt: skip


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


# --------------------------------------------------------------------------------------------
# Request bodies


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) one over ``limit`` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(f"request body of {declared} bytes is over the limit of {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(f"request body is over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_content_type(request: Request, *, binary_ok: bool) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind or kind == "application/json" or kind.endswith("+json"):
        return
    if binary_ok and kind == "application/octet-stream" and BINARY_HEADER in request.headers:
        return
    raise ServeError(f"content type {kind!r} is not supported; send application/json", 415)


def _parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON ({e})") from None


def _rows(
    model: ModelVersion, data: Any, shape: Any, datatype: str, settings: ServeSettings,
    binary: bytes | None = None,
) -> np.ndarray:  # fmt: skip
    """One input tensor -> float32 (N, D), with every check a client may trip."""
    if datatype not in V2_DTYPES:
        raise BadRequest(
            f"input datatype {datatype!r} is not supported (use one of {', '.join(V2_DTYPES)})"
        )
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int for s in shape)):
        raise BadRequest(f"input shape {shape!r}: expected [N, {model.n_features}]")
    n, d = shape
    if d != model.n_features:
        raise BadRequest(
            f"input has {d} features per row; model {model.name!r} expects {model.n_features}"
        )
    if n < 1:
        raise BadRequest("empty batch: the input has no rows")
    if n > settings.max_request_rows:
        raise BadRequest(f"batch of {n} rows is over the limit of {settings.max_request_rows}")
    dtype = np.dtype(V2_DTYPES[datatype])
    if binary is not None:
        if len(binary) != n * d * dtype.itemsize:
            raise BadRequest(
                f"binary input holds {len(binary)} bytes; shape {shape} of {datatype} needs "
                f"{n * d * dtype.itemsize}"
            )
        array = np.frombuffer(binary, dtype=dtype.newbyteorder("<")).reshape(n, d)
    else:
        if not isinstance(data, list):
            raise BadRequest("input 'data' must be a list (flat or nested) of numbers")
        try:
            array = np.asarray(data, dtype=np.float64 if dtype.kind == "f" else np.int64)
        except (ValueError, TypeError, OverflowError):
            raise BadRequest(
                "input 'data' must hold numbers only, in a rectangular nesting"
            ) from None
        if array.size != n * d:
            raise BadRequest(f"input 'data' holds {array.size} values; shape {shape} needs {n * d}")
        array = array.reshape(n, d)
    x = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(x).all():
        raise BadRequest("input holds NaN or infinite values")
    return x


# --------------------------------------------------------------------------------------------
# The app


class Guard:
    """API key and readiness checks, as plain ASGI middleware.

    (Starlette's @app.middleware("http") wraps every request in task groups and memory streams;
    on this hot path that halved the requests/s the service could take. See the README's HTTP
    results.)
    """

    def __init__(self, app, *, settings: ServeSettings, app_state) -> None:
        self.app, self.state = app, app_state
        key = settings.api_key
        self.key = None if key is None else key.get_secret_value().encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        if self.key is not None and not secrets.compare_digest(self._given_key(scope), self.key):
            return await _send_error(
                send, "missing or wrong API key (send 'Authorization: Bearer KEY')", 401
            )
        if not getattr(self.state, "ready", False):
            return await _send_error(send, "server is not ready", 503)
        return await self.app(scope, receive, send)

    @staticmethod
    def _given_key(scope) -> bytes:
        given = b""
        for name, value in scope["headers"]:
            if name == b"x-api-key" and not given:
                given = value
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:]
        return given


async def _send_error(send, message: str, status: int) -> None:
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: ServeSettings, repository: Repository | None = None) -> FastAPI:
    """The service over ``repository`` (already loaded, as the CLI does before it binds a port),
    or over ``settings.repository``, loaded at startup."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ready = False
        repo = repository or load_repository(
            settings.repository, device=settings.device, threads=settings.intra_op_threads,
            skip_bad_models=settings.skip_bad_models,
        )  # fmt: skip
        # created once the models load, so a failed start leaves no thread pool behind
        executor = ThreadPoolExecutor(
            settings.inference_threads, thread_name_prefix="smartmixed-infer"
        )
        batchers: dict[tuple[str, str], AdaptiveBatcher] = {}
        if settings.batching:
            for name, versions in repo.models.items():
                for version, model in versions.items():
                    batchers[(name, version)] = AdaptiveBatcher(
                        model.predict, max_batch_size=settings.max_batch_size,
                        max_delay=settings.max_batch_delay_ms / 1000, executor=executor,
                        observe=_observer(name),
                    )  # fmt: skip
        app.state.repo, app.state.batchers, app.state.executor = repo, batchers, executor
        app.state.ready = True
        log.info("serving %s from %s (batching %s)", ", ".join(repo.models) or "nothing",
                 settings.repository, "on" if settings.batching else "off")  # fmt: skip
        try:
            yield
        finally:
            app.state.ready = False
            for batcher in batchers.values():
                await batcher.close()
            executor.shutdown(wait=True)

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
        return _error(str(exc), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(str(exc.detail), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(f"invalid request: {exc.errors()}", 400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return _error("internal server error", 500)

    app.add_middleware(Guard, settings=settings, app_state=app.state)

    def repo(request: Request) -> Repository:
        return request.app.state.repo

    async def run_model(request: Request, model: ModelVersion, x: np.ndarray, outputs: list[str]):
        batcher = request.app.state.batchers.get((model.name, model.version))
        if batcher is not None:
            result = await batcher.predict(x)
            return {k: result[k] for k in outputs}
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(request.app.state.executor, model.predict, x, outputs)
        metrics.batch_size.labels(model.name).observe(len(x))
        metrics.inference.labels(model.name).observe(time.perf_counter() - started)
        return result

    def model_label(request: Request, name: str) -> str:
        return name if name in repo(request).models else "unknown"

    # ---- server and health ------------------------------------------------------------------

    @app.get("/v2", summary="Server metadata")
    async def server_metadata() -> Response:
        return _json(
            {"name": "smartmixed", "version": _version(), "extensions": ["binary_tensor_data"]}
        )

    @app.get("/v2/health/live", summary="Liveness")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready", summary="Readiness: every model loaded")
    async def ready(request: Request) -> Response:
        is_ready = getattr(request.app.state, "ready", False)
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    # ---- models -----------------------------------------------------------------------------

    def model_metadata(model: ModelVersion, versions: list[str]) -> dict[str, Any]:
        return {
            "name": model.name,
            "versions": versions,
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, model.n_features]}],
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
        except NotReady as e:
            return _json({"name": model_name, "ready": False, "error": str(e)}, 503)
        return _json({"name": model_name, "ready": True})

    @app.get("/v2/models/{model_name}/ready", summary="Model readiness")
    async def model_ready(request: Request, model_name: str) -> Response:
        return await _ready(request, model_name, None)

    @app.get("/v2/models/{model_name}/versions/{version}/ready", summary="Model readiness")
    async def model_version_ready(request: Request, model_name: str, version: str) -> Response:
        return await _ready(request, model_name, version)

    def model_config(model: ModelVersion) -> dict[str, Any]:
        config: dict[str, Any] = {
            "name": model.name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": settings.max_request_rows,
            "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [model.n_features]}],
            "output": [
                {"name": o, "data_type": "TYPE_FP32", "dims": [model.n_classes]}
                for o in model.outputs
            ],
            "execution_providers": model.providers,
        }
        if settings.batching:
            config["dynamic_batching"] = {
                "max_batch_size": settings.max_batch_size,
                "max_queue_delay_microseconds": int(settings.max_batch_delay_ms * 1000),
            }
        return config

    @app.get("/v2/models/{model_name}/config", summary="Model configuration")
    async def config_latest(request: Request, model_name: str) -> Response:
        return _json(model_config(repo(request).get(model_name)))

    @app.get("/v2/models/{model_name}/versions/{version}/config", summary="Model configuration")
    async def config_version(request: Request, model_name: str, version: str) -> Response:
        return _json(model_config(repo(request).get(model_name, version)))

    # ---- inference --------------------------------------------------------------------------

    async def measured(request: Request, endpoint: str, model_name: str, handler) -> Response:
        """Run ``handler()``, counting the request by status and timing it."""
        started = time.perf_counter()
        status = 500
        try:
            response = await handler()
            status = response.status_code
            return response
        except ServeError as e:
            status = e.status
            raise
        finally:
            label = model_label(request, model_name)
            metrics.requests.labels(label, endpoint, str(status)).inc()
            metrics.latency.labels(label, endpoint).observe(time.perf_counter() - started)

    async def _infer(request: Request, model_name: str, version: str | None) -> Response:
        model = repo(request).get(model_name, version)
        _check_content_type(request, binary_ok=True)
        raw = await read_body(request, settings.max_request_bytes)
        header_length = request.headers.get(BINARY_HEADER)
        binary = b""
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(raw):
                raise BadRequest(
                    f"{BINARY_HEADER} {header_length!r} does not fit the body of {len(raw)} bytes"
                )
            raw, binary = raw[: int(header_length)], raw[int(header_length) :]
        body = _parse_json(raw)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise BadRequest("request body must be an object with an 'inputs' list")
        if len(body["inputs"]) != 1 or not isinstance(body["inputs"][0], dict):
            raise BadRequest(
                f"expected exactly one input tensor ('input'), got {len(body['inputs'])}"
            )
        tensor = body["inputs"][0]
        if tensor.get("name") != "input":
            raise BadRequest(f"unknown input {tensor.get('name')!r}; the model's input is 'input'")
        parameters = tensor.get("parameters") or {}
        blob = None
        if isinstance(parameters, dict) and "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if type(size) is not int or size < 0 or size > len(binary):
                raise BadRequest(
                    f"binary_data_size {size!r} does not fit the {len(binary)} binary bytes"
                )
            blob = binary[:size]
        elif "data" not in tensor:
            raise BadRequest("input needs 'data' (or binary data with parameters.binary_data_size)")
        x = _rows(
            model, tensor.get("data"), tensor.get("shape"), tensor.get("datatype"), settings, blob
        )

        request_params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        binary_all = bool(request_params.get("binary_data_output", False))
        requested = body.get("outputs")
        if requested is None:
            names, binary_out = list(model.outputs), dict.fromkeys(model.outputs, binary_all)
        else:
            if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
                raise BadRequest("'outputs' must be a list of objects with a 'name'")
            names = [o.get("name") for o in requested]
            unknown = [n for n in names if n not in model.outputs]
            if unknown or not names:
                raise BadRequest(f"unknown output(s) {unknown}; the model has {model.outputs}")
            binary_out = {
                o["name"]: bool((o.get("parameters") or {}).get("binary_data", binary_all))
                for o in requested
            }
        result = await run_model(request, model, x, names)

        outputs, blobs = [], []
        for name in names:
            array = np.ascontiguousarray(result[name], dtype=np.float32)
            entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
            if binary_out[name]:
                data = array.astype("<f4").tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                blobs.append(data)
            else:
                entry["data"] = array.ravel()
            outputs.append(entry)
        response: dict[str, Any] = {
            "model_name": model.name,
            "model_version": model.version,
            "outputs": outputs,
        }
        if "id" in body:
            response["id"] = body["id"]
        header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
        if not blobs:
            return Response(header, media_type="application/json")
        return Response(
            header + b"".join(blobs), media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )  # fmt: skip

    infer_docs = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": INFER_SCHEMA}}}
    }

    @app.post(
        "/v2/models/{model_name}/infer",
        summary="Inference (latest version)",
        openapi_extra=infer_docs,
    )
    async def infer_latest(request: Request, model_name: str) -> Response:
        return await measured(
            request, "infer", model_name, lambda: _infer(request, model_name, None)
        )

    @app.post(
        "/v2/models/{model_name}/versions/{version}/infer",
        summary="Inference",
        openapi_extra=infer_docs,
    )
    async def infer_version(request: Request, model_name: str, version: str) -> Response:
        return await measured(
            request, "infer", model_name, lambda: _infer(request, model_name, version)
        )

    predict_docs = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PREDICT_SCHEMA}},
        }
    }

    @app.post("/v1/models/{model_name}:predict", summary="Labels and probabilities for rows of raw features",
              openapi_extra=predict_docs)  # fmt: skip
    async def predict(request: Request, model_name: str) -> Response:
        return await measured(request, "predict", model_name, lambda: _predict(request, model_name))

    async def _predict(request: Request, model_name: str) -> Response:
        model = repo(request).get(model_name)
        _check_content_type(request, binary_ok=False)
        body = _parse_json(await read_body(request, settings.max_request_bytes))
        instances = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(instances, list):
            raise BadRequest('request body must be {"instances": [[feature, ...], ...]}')
        if instances and not all(isinstance(row, list) for row in instances):
            raise BadRequest("every instance must be a list of numbers")
        shape = [len(instances), len(instances[0]) if instances else model.n_features]
        if any(len(row) != shape[1] for row in instances):
            raise BadRequest("all instances must have the same number of features")
        x = _rows(model, instances, shape, "FP32", settings)
        probabilities = (await run_model(request, model, x, ["probabilities"]))["probabilities"]
        labels = model.labels
        predictions = [
            {"label": labels[int(k)], "probabilities": row}
            for k, row in zip(probabilities.argmax(1), probabilities, strict=True)
        ]
        return _json({"predictions": predictions})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _version() -> str:
    try:
        return metadata.version("smartmixed")
    except metadata.PackageNotFoundError:
        return "unknown"
