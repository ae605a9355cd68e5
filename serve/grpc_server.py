"""The gRPC endpoint: ``inference.GRPCInferenceService`` (grpc.aio) beside the REST one.

It runs on the app's event loop, started and stopped by the app's lifespan (``create_app``), and
calls the same ``Service`` as the routes: inference goes through ``Service.admitted`` (admission
per model, deadline, body budget, metrics under the endpoint label ``grpc``) and ``Service.run``
(dynamic batching), tensors through codec.py. So a gRPC request meets every limit a REST one
does, and is counted with it.

- **Messages**: each RPC takes its request as bytes and parses it itself: a message that does not
  parse is the client's mistake (INVALID_ARGUMENT naming the message), where grpc's own
  deserializer would answer INTERNAL. A message over ``max_request_bytes`` is refused by grpc
  before it is read whole (RESOURCE_EXHAUSTED).
- **Errors** carry their HTTP status (models.ServeError, codec.CodecError) and the same message
  as over REST; ``CODES`` maps the status to a gRPC status code. Anything else is logged and
  answered INTERNAL, "internal server error".
- **API key**: as middleware.Guard reads it, from the metadata ``authorization: Bearer KEY`` (or
  ``x-api-key: KEY``); ServerLive and ServerReady are open, as the REST health endpoints are.
- **Deadlines**: a request waits for its model at most ``request_timeout_s``, or the client's
  own gRPC deadline when that comes first (work still queued then is dropped).

The message classes are serve/grpc_service.proto's (``make proto``); they live in a descriptor
pool of their own, so tritonclient.grpc (same message names) can be imported beside them.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from smartmixed.contract import INPUT, PLATFORM
from smartmixed.serve import codec, model_config
from smartmixed.serve import grpc_service_pb2 as pb
from smartmixed.serve.batching import Overloaded
from smartmixed.serve.middleware import Guard
from smartmixed.serve.models import ModelVersion, ServeError
from smartmixed.serve.routes import EXTENSIONS
from smartmixed.serve.settings import ServeSettings

if TYPE_CHECKING:  # app.py starts this server
    from smartmixed.serve.app import Admission, Service

log = logging.getLogger("smartmixed.serve")

SERVICE = "inference.GRPCInferenceService"
ENDPOINT = "grpc"  # the endpoint label of its inference requests in the metrics
OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})  # no API key: health, as over REST
# HTTP status of a ServeError / CodecError -> gRPC status code; any other: INTERNAL (logged)
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
UNAUTHENTICATED = "missing or wrong API key (send 'Authorization: Bearer KEY')"
INTERNAL = "internal server error"
# The typed contents field of each datatype: only FP32's is read (the model's datatype), the
# others are named when a request fills one of them.
OTHER_CONTENTS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp64_contents",
    "bytes_contents",
)
# An InferParameter's value, by its oneof member
_PARAMETER_VALUES = ("bool_param", "int64_param", "string_param", "double_param", "uint64_param")


class InferenceServicer:
    """The RPCs, each ``(request message, context) -> response message``; errors raised as
    ServeError / CodecError (``handlers`` turns them into status codes)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    # ---- health and metadata ----------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        try:
            self.service.repo.get(request.name, request.version or None)
        except ServeError as e:
            if e.status != 503:  # unknown model or version: NOT_FOUND, as REST's 404
                raise
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="smartmixed", version=self.service.version, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context
    ) -> pb.ModelMetadataResponse:
        repo = self.service.repo
        model = repo.get(request.name, request.version or None)
        versions = (
            [request.version] if request.version else sorted(repo.models[model.name], key=int)
        )
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=versions,
            platform=PLATFORM,
            inputs=[tensor(name=INPUT, datatype=codec.DATATYPE, shape=[-1, *model.input_shape])],
            outputs=[
                tensor(name=name, datatype=codec.DATATYPE, shape=[-1, model.n_classes])
                for name in model.outputs
            ],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        model = self.service.repo.get(request.name, request.version or None)
        return pb.ModelConfigResponse(config=self._config(model).SerializeToString())

    def _config(self, model: ModelVersion) -> Message:
        """Triton's ModelConfig of ``model`` as it is served (what REST's .../config says)."""
        batching = self.service.batching[(model.name, model.version)]
        config = model_config.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend=model_config.BACKEND,
            max_batch_size=batching.max_request_rows,
        )
        fp32 = model_config.ENUMS["DataType"].index("TYPE_" + codec.DATATYPE)
        config.input.add(name=INPUT, data_type=fp32, dims=model.input_shape)
        for name in model.outputs:
            config.output.add(name=name, data_type=fp32, dims=[model.n_classes])
        if batching.dynamic:
            config.dynamic_batching.max_queue_delay_microseconds = round(batching.max_delay_s * 1e6)
            config.dynamic_batching.preferred_batch_size.extend(model.config.preferred_batch_sizes)
        return config

    # ---- inference --------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context, raw: bytes
    ) -> pb.ModelInferResponse:
        """``raw``: the message as it came; its size is held from the body budget until it is
        answered, and decides where it is decoded (Service.decode)."""
        service = self.service

        async def run(admission: Admission) -> pb.ModelInferResponse:
            model = admission.model
            service.hold_body(admission, len(raw))
            started = time.perf_counter_ns()
            decoded = await service.decode(_decode, raw, request, service.signature(model))
            service.stats.record_input(model, started)
            result = await service.run(model, decoded.x, decoded.outputs, admission.deadline)
            started = time.perf_counter_ns()
            response = _encode(model, result, decoded)
            service.stats.record_output(model, started)
            return response

        return await service.admitted(
            ENDPOINT,
            request.model_name,
            request.model_version or None,
            run,
            timeout_s=context.time_remaining(),  # None: the client set no deadline
        )

    # ---- statistics and the repository ------------------------------------------------------

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context
    ) -> pb.ModelStatisticsResponse:
        report = self.service.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(report, pb.ModelStatisticsResponse())

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context
    ) -> pb.RepositoryIndexResponse:
        _check_repository(request.repository_name)
        index = self.service.repository_index(ready_only=request.ready)
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[entry(**model) for model in index])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository(request.repository_name, request.parameters)
        await self.service.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context
    ) -> pb.RepositoryModelUnloadResponse:
        # unload_dependents (tritonclient sends it): no model here has dependents
        _check_repository(
            request.repository_name, request.parameters, allowed=("unload_dependents",)
        )
        await self.service.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _check_repository(name: str, parameters=(), *, allowed: tuple[str, ...] = ()) -> None:
    """One repository, and no parameters but ``allowed`` ones (Triton's load parameters, a
    config override and model files, are not supported)."""
    if name:
        raise codec.CodecError(
            f"repository_name {name!r}: this server has one repository; leave it empty"
        )
    refused = sorted(set(parameters) - set(allowed))
    if refused:
        raise codec.CodecError(f"parameters {', '.join(refused)} are not supported; send none")


def _parameter_values(parameters) -> dict[str, Any]:
    """An InferParameter map as plain values, as a JSON body's ``parameters`` would hold them."""
    values = {}
    for key, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        values[key] = None if which is None else getattr(parameter, which)
    return values


def _decode(
    raw: bytes, request: pb.ModelInferRequest, signature: codec.Signature
) -> codec.InferRequest:
    """The input rows and output choices of ``request`` (parsed from ``raw``), by
    codec.decode_tensors (REST's checks and messages), each input's values from
    raw_input_contents or its typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise codec.CodecError(
            f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} input(s); "
            "send one per input, in order"
        )
    inputs, values, fields = [], [], []
    for i, tensor in enumerate(request.inputs):
        inputs.append(
            {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        )
        contents = tensor.contents
        if raw:
            if contents.ByteSize():
                raise codec.CodecError(
                    f"inputs[{i}] has contents and raw_input_contents[{i}]; send one of them"
                )
            values.append(raw[i])
            fields.append(f"raw_input_contents[{i}]")
            continue
        other = [name for name in OTHER_CONTENTS if len(getattr(contents, name))]
        if other and tensor.datatype == codec.DATATYPE:
            raise codec.CodecError(
                f"inputs[{i}].contents.{other[0]} holds the values of another datatype; "
                f"{codec.DATATYPE} values go in contents.fp32_contents"
            )
        values.append(contents.fp32_contents)
        fields.append(f"inputs[{i}].contents.fp32_contents")
    outputs = [
        {"name": output.name, "parameters": _parameter_values(output.parameters)}
        for output in request.outputs
    ]
    return codec.decode_tensors(
        signature,
        inputs=inputs,
        values=values,
        fields=fields,
        outputs=outputs or None,  # none listed: every output, as over REST
        request_id=request.id or None,
    )


def _encode(
    model: ModelVersion, result: dict[str, np.ndarray], decoded: codec.InferRequest
) -> pb.ModelInferResponse:
    """The outputs asked for, in order, in raw_output_contents (what tritonclient reads): FP32
    little-endian, or BYTES (Triton's length-prefixed strings) for a classification output."""
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=model.version, id=decoded.id or ""
    )
    for name in decoded.outputs:
        array = np.ascontiguousarray(result[name], dtype=np.float32)
        k = decoded.classification.get(name)
        if k is None:
            datatype, shape, data = codec.DATATYPE, array.shape, array.astype("<f4").tobytes()
        else:
            classes = codec.top_classes(array, k, model.labels)
            shape = (array.shape[0], len(classes) // max(array.shape[0], 1))
            datatype, data = "BYTES", codec.bytes_tensor(classes)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(data)
    return response


# ---- the server ---------------------------------------------------------------------------------


def handlers(service: Service) -> grpc.GenericRpcHandler:
    """Every RPC of serve/grpc_service.proto's service, each guarded: API key, readiness, the
    request parsed, errors mapped to status codes."""
    servicer = InferenceServicer(service)
    key = service.settings.api_key
    expected = None if key is None else key.get_secret_value().encode()
    retry_after = (("retry-after", str(service.settings.retry_after_s)),)
    methods = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        call = getattr(servicer, method.name)
        methods[method.name] = grpc.unary_unary_rpc_method_handler(
            _guarded(
                method.name,
                call,
                request_class,
                service=service,
                key=None if method.name in OPEN_RPCS else expected,
                retry_after=retry_after,
            ),
            request_deserializer=None,  # bytes: parsed by _guarded
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def _guarded(
    name: str,
    call: Callable[..., Awaitable[Message]],
    request_class: type[Message],
    *,
    service: Service,
    key: bytes | None,
    retry_after: tuple[tuple[str, str], ...],
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
    infer = name == "ModelInfer"
    open_rpc = name in OPEN_RPCS

    async def guarded(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            if key is not None:
                metadata = context.invocation_metadata() or ()
                headers = [(k.encode(), _bytes(v)) for k, v in metadata]
                if not secrets.compare_digest(Guard._given_key({"headers": headers}), key):
                    raise ServeError(UNAUTHENTICATED, 401)
            if not open_rpc and not service.ready:
                raise ServeError("server is not ready", 503)
            try:
                request = request_class.FromString(raw)
            except DecodeError:  # its text names the message type and no more
                raise codec.CodecError(
                    f"malformed request: not a serialized {request_class.DESCRIPTOR.full_name} "
                    "message"
                ) from None
            if infer:
                return await call(request, context, raw)
            return await call(request, context)
        except (ServeError, codec.CodecError) as e:
            code, message = CODES.get(e.status), str(e)
            if code is None:
                log.error("gRPC %s: status %d: %s", name, e.status, e)
                code = grpc.StatusCode.INTERNAL
            if isinstance(e, Overloaded):
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:  # the client's deadline, not ours
                    code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
                else:
                    context.set_trailing_metadata(retry_after)
        except Exception:
            log.exception("unexpected error in gRPC %s", name)
            code, message = grpc.StatusCode.INTERNAL, INTERNAL
        await context.abort(code, message)  # raises: the RPC ends here

    return guarded


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_grpc_port(settings: ServeSettings) -> None:
    """OSError (one line) when ``settings.grpc_port`` cannot be bound on ``settings.host``
    (in use, say); nothing when it is 0 (off). A socket is bound and closed, as grpc binds
    (SO_REUSEADDR), so the answer holds unless another process takes the port meanwhile."""
    if not settings.grpc_port:
        return
    address = _address(settings.host, settings.grpc_port)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            settings.host, settings.grpc_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except OSError as e:
        raise OSError(f"cannot bind the gRPC port {address} (grpc_port): {e.strerror}") from None


async def start_grpc_server(service: Service, settings: ServeSettings) -> grpc.aio.Server:
    """The gRPC server on ``settings.host``:``settings.grpc_port``, started on the running
    event loop. OSError naming the address when it cannot bind."""
    server = grpc.aio.server(
        options=[
            # larger messages: RESOURCE_EXHAUSTED before they are read whole, as REST's 413
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", -1),  # answers are bounded by max_request_rows
            ("grpc.so_reuseport", 0),  # a port in use is an error, never shared
        ]
    )
    server.add_generic_rpc_handlers((handlers(service),))
    address = _address(settings.host, settings.grpc_port)
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind the gRPC port {address} (grpc_port): {e}") from None
    await server.start()
    log.info("gRPC (inference.GRPCInferenceService) on %s", address)
    return server


async def stop_grpc_server(server: grpc.aio.Server, settings: ServeSettings) -> None:
    """Stop taking RPCs, let those in progress finish (each is answered within
    ``request_timeout_s``, its deadline), then close."""
    await server.stop(grace=settings.request_timeout_s)
