"""The routes: Open Inference Protocol (KServe V2) REST, a friendly predict, metrics.

Each route is a translation: path -> ``Service`` call -> codec -> Response. Health is answered
before routing (middleware.Guard); the two health routes here only document it in the OpenAPI.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from smartmixed.contract import INPUT, PLATFORM, PROBABILITIES
from smartmixed.serve import codec
from smartmixed.serve.models import ModelVersion, ServeError

if TYPE_CHECKING:  # app.py imports this module
    from smartmixed.serve.app import Deadline

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
                    "name": {"type": "string", "example": INPUT},
                    "shape": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "description": "[N, *dims] of the model's input (GET /v2/models/{m}): "
                        "[N, D] for rows of features, [N, C, H, W] for a model reading images",
                    },
                    "datatype": {"type": "string", "enum": [codec.DATATYPE]},
                    "parameters": {"type": "object"},
                    "data": {
                        "type": "array",
                        "items": {"type": "number"},
                        "description": "the values row-major, flat or nested exactly as shape",
                    },
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
        "instances": {
            "type": "array",
            "items": {"type": "array"},
            "description": "one instance per row: the model's D raw values as a flat list of "
            "numbers; for a model reading images (input [C, H, W]) either that flat list of "
            "C*H*W values, row-major, or lists nested as [C][H][W]",
        }
    },
}


INFER_DOCS = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": INFER_SCHEMA}}}
}
PREDICT_DOCS = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": PREDICT_SCHEMA}}}
}

router = APIRouter()
Endpoint = Callable[..., Awaitable[Response]]


def get(path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """``@router.get(path, ...)`` that answers HEAD too, as GET without the body (the server
    sends the headers only). HEAD stays out of the OpenAPI schema: one operation per path."""

    def register(endpoint: Endpoint) -> Endpoint:
        router.head(path, include_in_schema=False, **options)(endpoint)
        return router.get(path, **options)(endpoint)

    return register


def service(request: Request):
    """The app's ``Service`` (serve/app.py), created with the app, filled in its lifespan."""
    return request.app.state.service


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None):
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status, headers=headers, media_type="application/json")


# ---- inference (first: routes are matched in order, and these are the hot ones) ----------


async def _infer(request: Request, model: ModelVersion, deadline: Deadline) -> Response:
    s = service(request)
    raw = await s.read_body(request, binary_ok=True)
    started = time.perf_counter_ns()
    decoded = await s.decode(
        codec.decode_infer,
        raw,
        s.signature(model),
        header_length=request.headers.get(codec.BINARY_HEADER),
    )
    s.stats.record_input(model, started)  # Triton's compute_input: the decode
    result = await s.run(model, decoded.x, decoded.outputs, deadline)
    started = time.perf_counter_ns()
    body, headers = codec.encode_infer(
        model.name, model.version, result, decoded, labels=model.labels
    )
    s.stats.record_output(model, started)  # compute_output: the encode
    media = "application/octet-stream" if headers else "application/json"
    return await _answer(request, body, media, headers)


async def _predict(request: Request, model: ModelVersion, deadline: Deadline) -> Response:
    s = service(request)
    raw = await s.read_body(request)
    started = time.perf_counter_ns()
    x = await s.decode(codec.decode_predict, raw, s.signature(model))
    s.stats.record_input(model, started)
    result = await s.run(model, x, [PROBABILITIES], deadline)
    started = time.perf_counter_ns()
    body = codec.encode_predict(result[PROBABILITIES], model.labels)
    s.stats.record_output(model, started)
    return await _answer(request, body, "application/json", {})


async def _answer(request: Request, body: bytes, media: str, headers: dict[str, str]) -> Response:
    """An inference answer, compressed when Accept-Encoding asks for gzip or deflate (as Triton
    answers infer; Inference-Header-Content-Length still counts the uncompressed header)."""
    coding = codec.response_coding(request.headers.get("accept-encoding"))
    if coding is not None:
        # a large answer is compressed off the event loop (zlib releases the GIL)
        body = await service(request).decode(codec.compress, body, coding)
        headers["Content-Encoding"] = coding
    return Response(body, media_type=media, headers=headers)


@router.post(
    "/v2/models/{model_name}/infer", summary="Inference (latest version)", openapi_extra=INFER_DOCS
)
async def infer_latest(request: Request, model_name: str) -> Response:
    return await service(request).admit(request, "infer", model_name, None, _infer)


@router.post(
    "/v2/models/{model_name}/versions/{version}/infer",
    summary="Inference",
    openapi_extra=INFER_DOCS,
)
async def infer_version(request: Request, model_name: str, version: str) -> Response:
    return await service(request).admit(request, "infer", model_name, version, _infer)


@router.post(
    "/v1/models/{model_name}:predict",
    openapi_extra=PREDICT_DOCS,
    summary="Labels and probabilities for rows of raw features",
    description="Each instance is a flat list of the model's raw values; an image model's "
    "(input [C, H, W], e.g. [1, 28, 28]) may also be nested as [C][H][W]. Answers "
    '{"predictions": [{"label": ..., "probabilities": [...]}]}.',
)
async def predict(request: Request, model_name: str) -> Response:
    return await service(request).admit(request, "predict", model_name, None, _predict)


# ---- server metadata ---------------------------------------------------------------------------


# Triton's protocol extensions this server speaks (GET /v2 lists them): binary tensor data (and
# its raw binary request), classification, model repository (index, load, unload), model
# configuration, statistics.
EXTENSIONS = (
    "binary_tensor_data",
    "classification",
    "model_repository",
    "model_configuration",
    "statistics",
)


@get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    return json_response(
        {"name": "smartmixed", "version": service(request).version, "extensions": EXTENSIONS}
    )


# Health is the status alone (200, or 503 while not ready), with an empty body, as the protocol
# defines it; the middleware answers it, so these two only document it in the OpenAPI schema.


@get("/v2/health/live", summary="Liveness: 200, empty body (answered before routing)")
async def live() -> Response:
    return Response(status_code=200)


@get("/v2/health/ready", summary="Readiness: 200 when every model is loaded, else 503; empty body")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if service(request).ready else 503)


# ---- models ------------------------------------------------------------------------------------


INDEX_BODY_BYTES = 4096  # a repository route's body is a small JSON object: larger ones get 413
UNLOAD_PARAMETERS = {"unload_dependents"}  # Triton's; no model here has dependents (no ensembles)


async def _json_object(request: Request, expected: str) -> dict[str, Any]:
    """The body of a repository route: a JSON object, or none ({})."""
    raw = await service(request).read_body(request, binary_ok=False, limit=INDEX_BODY_BYTES)
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as e:
        raise codec.CodecError(f"malformed JSON body: {e}", 400) from None
    if not isinstance(body, dict):
        raise codec.CodecError(f"expected a JSON object {expected} or no body", 400)
    return body


def _parameters(body: dict[str, Any], supported: set[str], action: str) -> dict[str, Any]:
    """The body's "parameters" object; 400 naming those this server does not support."""
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise codec.CodecError(f"'parameters' must be a JSON object, got {parameters!r:.60}", 400)
    if unsupported := sorted(parameters.keys() - supported):
        raise codec.CodecError(
            f"unsupported {action} parameter(s) {', '.join(map(repr, unsupported))}: this server "
            "loads models from its repository as they are (supported: "
            f"{', '.join(sorted(supported)) or 'none'})",
            400,
        )
    return parameters


@router.post("/v2/repository/index", summary="Every model of the repository and its state")
async def repository_index(request: Request) -> Response:
    """Triton's repository index: one entry per served version (READY), per version being
    drained (UNLOADING), and per model not loaded (UNAVAILABLE, with the reason: why it failed,
    or "unloaded"). Body: none, or {"ready": true} for the ready ones only."""
    body = await _json_object(request, '{"ready": true|false}')
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise codec.CodecError('expected a JSON object {"ready": true|false} or no body', 400)
    return json_response(service(request).repository_index(ready_only))


@router.post("/v2/repository/models/{model_name}/load", summary="Load or reload a model")
async def load_model(request: Request, model_name: str) -> Response:
    """Model control mode explicit: load the model (every version its version_policy selects,
    verified), or reload it beside what is served and swap. Body: none, or {"parameters": {}}
    (Triton's config and file overrides are refused). 400 for a version that does not load."""
    _parameters(await _json_object(request, '{"parameters": {...}}'), set(), "load")
    await service(request).load_model(model_name)
    return Response(status_code=200)


@router.post("/v2/repository/models/{model_name}/unload", summary="Unload a model")
async def unload_model(request: Request, model_name: str) -> Response:
    """Model control mode explicit: refuse the model's new requests, wait for those in progress,
    then close it. Body: none, or {"parameters": {"unload_dependents": bool}}."""
    body = await _json_object(request, '{"parameters": {...}}')
    dependents = _parameters(body, UNLOAD_PARAMETERS, "unload").get("unload_dependents", False)
    if not isinstance(dependents, bool):
        raise codec.CodecError(
            f"parameter 'unload_dependents' must be true or false, got {dependents!r:.60}", 400
        )
    await service(request).unload_model(model_name)
    return Response(status_code=200)


# ---- statistics (before /v2/models/{model_name}: "stats" is not a model name here) --------


@get("/v2/models/stats", summary="Statistics of every model version served")
async def statistics_all(request: Request) -> Response:
    return json_response(service(request).statistics())


@get("/v2/models/{model_name}/stats", summary="Statistics of a model's versions")
async def statistics_model(request: Request, model_name: str) -> Response:
    return json_response(service(request).statistics(model_name))


@get("/v2/models/{model_name}/versions/{version}/stats", summary="Statistics of a model version")
async def statistics_version(request: Request, model_name: str, version: str) -> Response:
    return json_response(service(request).statistics(model_name, version))


def _metadata(model: ModelVersion, versions: list[str]) -> dict[str, Any]:
    return {
        "name": model.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *model.input_shape]}],
        "outputs": [
            {"name": o, "datatype": "FP32", "shape": [-1, model.n_classes]} for o in model.outputs
        ],
        "smartmixed": model.describe(),
    }


@get("/v2/models/{model_name}", summary="Model metadata (latest version)")
async def metadata_latest(request: Request, model_name: str) -> Response:
    repo = service(request).repo
    model = repo.get(model_name)
    return json_response(_metadata(model, sorted(repo.models[model_name], key=int)))


@get("/v2/models/{model_name}/versions/{version}", summary="Model metadata")
async def metadata_version(request: Request, model_name: str, version: str) -> Response:
    return json_response(_metadata(service(request).repo.get(model_name, version), [version]))


async def _ready(request: Request, model_name: str, version: str | None) -> Response:
    try:
        service(request).repo.get(model_name, version)
    except ServeError as e:
        if e.status != 503:
            raise
        return json_response({"name": model_name, "ready": False, "error": str(e)}, 503)
    return json_response({"name": model_name, "ready": True})


@get("/v2/models/{model_name}/ready", summary="Model readiness")
async def model_ready(request: Request, model_name: str) -> Response:
    return await _ready(request, model_name, None)


@get("/v2/models/{model_name}/versions/{version}/ready", summary="Model readiness")
async def model_version_ready(request: Request, model_name: str, version: str) -> Response:
    return await _ready(request, model_name, version)


def _config(request: Request, model: ModelVersion) -> dict[str, Any]:
    batching = service(request).batching[(model.name, model.version)]
    config: dict[str, Any] = {
        "name": model.name,
        "platform": PLATFORM,
        "max_batch_size": batching.max_request_rows,
        "input": [{"name": INPUT, "data_type": "TYPE_FP32", "dims": list(model.input_shape)}],
        "output": [
            {"name": o, "data_type": "TYPE_FP32", "dims": [model.n_classes]} for o in model.outputs
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


@get("/v2/models/{model_name}/config", summary="Model configuration")
async def config_latest(request: Request, model_name: str) -> Response:
    return json_response(_config(request, service(request).repo.get(model_name)))


@get("/v2/models/{model_name}/versions/{version}/config", summary="Model configuration")
async def config_version(request: Request, model_name: str, version: str) -> Response:
    return json_response(_config(request, service(request).repo.get(model_name, version)))


@get("/metrics", summary="Prometheus metrics")
async def prometheus(request: Request) -> Response:
    registry = service(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
