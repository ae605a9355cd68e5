"""The Open Inference Protocol (KServe V2) codec: request bytes -> float32 rows, results -> bytes.

Pure numpy + orjson, no web framework, so every rule a client can trip is testable (and fuzzed,
tests/serve/test_codec.py) without a server. Every refusal is a ``CodecError`` carrying its HTTP
status and a message naming the field, what was expected and what came; no other exception
leaves ``decode_*`` for any input bytes (orjson refuses nesting deeper than 1024 levels, and
nothing here recurses into client values).

Order of the checks: the body's structure, then the declared datatype and shape
against the model and ``max_rows``, the value count (or the binary byte count), outputs and id,
and only then the values themselves. The declared datatype must be the model's, FP32, as Triton
requires (a request declaring INT32 or FP64 is refused, never converted). JSON ``data`` takes
numbers only (never booleans, strings or null), flat (N*D) or nested exactly as the declared
shape ([N][D], or [N][C][H][W] for a model reading images); values are converted to float32 and
must be finite there. The decoded array has the model's input shape, (N, D) or (N, C, H, W).
``null`` for an optional field (``id``, ``parameters``, ``outputs``) means absent, as in
MLServer's and KServe's request models.

Triton's extensions over the same body: binary tensor data (a JSON header, then raw bytes), its
raw binary request (``Inference-Header-Content-Length: 0``: the whole body is one row of the
input, every output answered as binary data), and classification (an output's
``parameters.classification`` K: the top K classes of each row as "value:index:label" strings).
The HTTP content codings (gzip, deflate) of request and response bodies are here too: plain
bytes in, bytes out.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import orjson

# The datatype of every model's input (and of its outputs): requests must declare exactly it.
DATATYPE = "FP32"
FP32_BYTES = 4
BINARY_HEADER = "inference-header-content-length"
RESPONSE_BINARY_HEADER = "Inference-Header-Content-Length"

_VALUE_BUDGET_FACTOR = 4  # bodies with this many times the values a request may hold: 413
_STRUCTURE_COMMAS = 4096  # commas a valid body may hold besides its values (fields, outputs)
_MAX_HEADER_DIGITS = 19  # a byte count longer than this fits no body (and int() stays cheap)
# JSON values type-checked and converted per C call. Each call holds the GIL throughout, and the
# event loop (health checks) waits for it: 32,768 values take about 1 ms; a whole 1,024 x 784
# body took 15-25 ms per pass, and the loop up to 150 ms to answer a probe.
SLICE_VALUES = 32_768
_JSON_TYPE = {
    bool: "a boolean",
    str: "a string",
    type(None): "null",
    dict: "an object",
    list: "a list",
    float: "a float",
    int: "an integer",
}


class CodecError(Exception):
    """A request the codec refuses; ``status`` is the HTTP status, ``str(e)`` the client message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Signature:
    """What the codec needs to know of a model version (and of the server's row limit)."""

    name: str
    input_name: str
    n_features: int  # values per row: the product of ``dims``
    outputs: tuple[str, ...]
    max_rows: int
    # one row's dims as the graph declares them, (1, 28, 28) for a model reading 28x28 images;
    # None: (n_features,), a row of features
    input_shape: tuple[int, ...] | None = None

    @property
    def dims(self) -> tuple[int, ...]:
        return self.input_shape or (self.n_features,)

    @property
    def shape_text(self) -> str:
        """The input shape a request declares, the batch as N: "[N, 784]", "[N, 1, 28, 28]"."""
        return _shape_text(("N", *self.dims))


@dataclass
class InferRequest:
    """A decoded V2 infer request."""

    x: np.ndarray  # (N, *dims) float32, C-contiguous, finite: (N, D) or (N, C, H, W)
    outputs: list[str]  # requested output names, in order
    binary: dict[str, bool]  # output name -> answer it as binary data
    id: str | None
    # output name -> K: answer its top K classes per row (Triton's classification extension)
    classification: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Decoding


def check_datatype(datatype: Any, signature: Signature) -> None:
    """The input's declared datatype is the model's (FP32); else Triton's message."""
    if type(datatype) is not str or datatype != DATATYPE:
        raise CodecError(
            f"inference input {signature.input_name!r} data-type is {_show(datatype)}, but model "
            f"{signature.name!r} expects {DATATYPE!r}"
        )


def decode_infer(
    raw: bytes, signature: Signature, *, header_length: str | None = None
) -> InferRequest:
    """A V2 infer body -> its input rows and output choices.

    ``header_length``: the Inference-Header-Content-Length header, when the body is a JSON header
    followed by binary tensor data (the binary tensor data extension); "0" makes it a raw binary
    request (``decode_raw``).
    """
    header, binary = _split_binary(raw, header_length)
    if header_length is not None and not header:
        return decode_raw(binary, signature)
    _check_value_budget(header, signature)
    body = _load_json(header)
    if type(body) is not dict or type(body.get("inputs")) is not list:
        raise CodecError(
            f"request body must be an object with an 'inputs' list; got {_kind_of_body(body, 'inputs')}"
        )
    request_parameters = _parameters(body, "parameters")
    inputs = body["inputs"]
    if len(inputs) != 1 or type(inputs[0]) is not dict:
        raise CodecError(
            f"'inputs' must hold exactly one tensor object ({signature.input_name!r}); got "
            f"{len(inputs)} item(s)" + ("" if not inputs else f", the first {_type_of(inputs[0])}")
        )
    tensor = inputs[0]
    if tensor.get("name") != signature.input_name:
        raise CodecError(
            f"unknown input {_show(tensor.get('name'))} in inputs[0].name; the model's input is "
            f"{signature.input_name!r}"
        )
    input_parameters = _parameters(tensor, "inputs[0].parameters")
    shape = _declared(tensor, signature)

    x: np.ndarray | None = None
    if "binary_data_size" in input_parameters:
        if "data" in tensor:
            raise CodecError(
                "input has both 'data' and parameters.binary_data_size; send one of them"
            )
        x = _from_binary(input_parameters["binary_data_size"], binary, shape)
    elif binary:
        raise CodecError(
            f"the body holds {len(binary)} bytes of binary data after the {len(header)}-byte "
            "JSON header, but no input has parameters.binary_data_size"
        )
    elif "data" not in tensor:
        raise CodecError("input needs 'data' (or binary data with parameters.binary_data_size)")

    binary_all = _flag(request_parameters, "binary_data_output", "parameters")
    outputs, binary_out, classification = _requested_outputs(body, signature, binary_all)
    request_id = body.get("id")
    if request_id is not None and type(request_id) is not str:
        raise CodecError(f"'id' must be a string; got {_type_of(request_id)}")

    if x is None:  # values last: every cheaper check has passed
        x = _from_json(tensor["data"], shape)
    return InferRequest(x.reshape(shape), outputs, binary_out, request_id, classification)


def decode_raw(raw: bytes | memoryview, signature: Signature) -> InferRequest:
    """Triton's raw binary request: the whole body is the input tensor's bytes, no JSON header.

    The model's config gives the datatype (FP32) and the dims; a model with a batch dimension
    takes the body as one row (Triton: "treated as batch-1 request"), so it must hold exactly
    one row's bytes, and every output is answered as binary data.
    """
    shape = (1, *signature.dims)
    needed = math.prod(shape) * FP32_BYTES
    if len(raw) != needed:
        raise CodecError(
            f"input byte size mismatch for input {signature.input_name!r} for model "
            f"{signature.name!r}. Expected {needed}, got {len(raw)} (a raw binary request, "
            f"{RESPONSE_BINARY_HEADER}: 0, is one row of {_shape_text(shape)} FP32)"
        )
    x = _from_bytes(raw, shape, "raw input")
    names = list(signature.outputs)
    return InferRequest(
        x=x.reshape(shape), outputs=names, binary=dict.fromkeys(names, True), id=None
    )


def decode_tensors(
    signature: Signature,
    *,
    inputs: list[dict[str, Any]],
    values: list[bytes | memoryview | Sequence[float]],
    outputs: list[dict[str, Any]] | None,
    request_id: str | None,
    fields: list[str],
) -> InferRequest:
    """A V2 request whose input values travel apart from their description (the gRPC protocol:
    ModelInferRequest's ``raw_input_contents`` or typed ``contents``), checked in
    ``decode_infer``'s order and with its messages: the inputs, their datatype and shape, the
    value count, the outputs, then the values.

    ``inputs``: each input as a JSON body's tensor object without ``data`` (name, datatype,
    shape); ``values``: each input's values, as little-endian FP32 bytes or as the numbers
    themselves; ``fields``: where each came from, for messages; ``outputs``: as a JSON body's
    (None: every output, as when a JSON body leaves them out).
    """
    if len(inputs) != 1:
        raise CodecError(
            f"'inputs' must hold exactly one tensor object ({signature.input_name!r}); got "
            f"{len(inputs)} item(s)"
        )
    tensor, data, field = inputs[0], values[0], fields[0]
    if tensor.get("name") != signature.input_name:
        raise CodecError(
            f"unknown input {_show(tensor.get('name'))} in inputs[0].name; the model's input is "
            f"{signature.input_name!r}"
        )
    shape = _declared(tensor, signature)
    n, d = shape[0], math.prod(shape[1:])
    if isinstance(data, bytes | memoryview):
        if len(data) != n * d * FP32_BYTES:
            raise CodecError(
                f"input byte size mismatch for input {signature.input_name!r} for model "
                f"{signature.name!r}. Expected {n * d * FP32_BYTES}, got {len(data)} ({field}: "
                f"shape {_shape_text(shape)} of {DATATYPE})"
            )
    elif len(data) != n * d:
        raise CodecError(
            f"{field} holds {len(data)} values; shape {_shape_text(shape)} needs {n * d}"
        )
    body = {} if outputs is None else {"outputs": outputs}
    names, binary, classification = _requested_outputs(body, signature, None)
    if isinstance(data, bytes | memoryview):
        x = _from_bytes(data, shape, field)
    else:  # values of a float field: float32 already, but NaN and inf are possible
        x = np.array(data, dtype=np.float32).reshape(n, d)
        x = _finite_rows(x, field, data.__getitem__, shape=shape, nested=False)
    return InferRequest(x.reshape(shape), names, binary, request_id, classification)


def decode_predict(raw: bytes, signature: Signature) -> np.ndarray:
    """``{"instances": [instance, ...]}`` -> (N, *dims) float32 rows (FP32 value rules).

    An instance is a list of the model's D values; for a model whose input has several dims
    (an image, [C, H, W]) it may also be nested exactly as them ([C][H][W] lists).
    """
    _check_value_budget(raw, signature)
    body = _load_json(raw)
    instances = body.get("instances") if type(body) is dict else None
    if type(instances) is not list:
        raise CodecError(
            'request body must be {"instances": [[feature, ...], ...]}; got '
            + _kind_of_body(body, "instances")
        )
    if not instances:
        raise CodecError("empty batch: 'instances' holds no rows")
    if len(instances) > signature.max_rows:
        raise CodecError(
            f"batch of {len(instances)} rows is over the limit of {signature.max_rows}"
        )
    for i, row in enumerate(instances):
        if type(row) is not list:
            raise CodecError(
                f"every instance must be a list of numbers; instances[{i}] is {_type_of(row)}"
            )
    if len(signature.dims) > 1:
        return _image_instances(instances, signature)
    lengths = set(map(len, instances))
    if len(lengths) > 1:
        first = len(instances[0])
        i = next(i for i, row in enumerate(instances) if len(row) != first)
        raise CodecError(
            "all instances must have the same number of features: instances[0] has "
            f"{first}, instances[{i}] has {len(instances[i])}"
        )
    d = lengths.pop()
    if d != signature.n_features:
        raise CodecError(
            f"instances have {d} features per row; model {signature.name!r} expects "
            f"{signature.n_features}"
        )
    return _values_to_rows(instances, (len(instances), d), "instances")


def _image_instances(instances: list[list], signature: Signature) -> np.ndarray:
    """Instances of a model reading several dims (C, H, W) -> (N, C, H, W): each instance its
    D values flat, or nested exactly as the dims ([C][H][W]); one form for every instance."""
    dims, d = signature.dims, signature.n_features
    forms = f"{d} numbers or nested as {_brackets(dims)}"
    nested = bool(instances[0]) and type(instances[0][0]) is list
    for i, row in enumerate(instances):
        if (bool(row) and type(row[0]) is list) != nested:
            first, this = ("nested", "flat") if nested else ("flat", "nested")
            raise CodecError(
                f"instances[0] is {first} and instances[{i}] {this}; send every instance the "
                f"same way, as {forms}"
            )
        if nested and (got := _nesting(row, len(dims) + 1)) != dims:
            raise CodecError(
                f"instances[{i}] is nested as {_brackets(got)}; model {signature.name!r} takes "
                f"an instance as {forms}"
            )
        if not nested and len(row) != d:
            raise CodecError(
                f"instances[{i}] holds {len(row)} values; model {signature.name!r} takes an "
                f"instance as {forms}"
            )
    n = len(instances)
    shape = (n, *dims) if nested else (n, d)  # every nested list is checked by _leaves
    return _values_to_rows(instances, shape, "instances").reshape(n, *dims)


def _nesting(value: list, depth: int) -> tuple[int, ...]:
    """The lengths of ``value``, of its first item, of that item's first item, ... while they
    are lists, at most ``depth`` of them."""
    lengths = []
    while type(value) is list and len(lengths) < depth:
        lengths.append(len(value))
        value = value[0] if value else None
    return tuple(lengths)


def _split_binary(raw: bytes, header_length: str | None) -> tuple[bytes, memoryview | bytes]:
    """The JSON header and the binary tensor data after it (empty without the header)."""
    if header_length is None:
        return raw, b""
    if not (
        header_length.isascii()
        and header_length.isdigit()  # "²".isdigit() is True; int("²") fails
        and len(header_length) <= _MAX_HEADER_DIGITS
        and int(header_length) <= len(raw)
    ):
        raise CodecError(
            f"{RESPONSE_BINARY_HEADER} {_show(header_length)} is not a byte count within the "
            f"body of {len(raw)} bytes"
        )
    length = int(header_length)
    return raw[:length], memoryview(raw)[length:]


def _check_value_budget(raw: bytes, signature: Signature) -> None:
    """Refuse, before parsing, a JSON body holding more values than any valid request could.

    The shape is only known after parsing, and parsing 8 million values costs seconds and
    hundreds of MB of Python objects (measured: a 16 MiB body of "0," for shape [1, 784]). n
    values need n - 1 commas, flat or nested, so a body with more commas than
    max_rows x n_features plus the few the other fields need cannot be valid. Counting commas is
    a C scan (a few ms for 16 MiB). The budget is _VALUE_BUDGET_FACTOR times that, so a body
    merely over the row limit still gets the exact message from the shape check.
    """
    budget = _VALUE_BUDGET_FACTOR * signature.max_rows * signature.n_features + _STRUCTURE_COMMAS
    commas = raw.count(b",") if len(raw) > budget else 0
    if commas > budget:
        raise CodecError(
            f"request body holds {commas + 1} comma-separated items; model {signature.name!r} "
            f"takes at most {signature.max_rows} x {signature.n_features} values per request",
            413,
        )


def _load_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:  # also nesting deeper than 1024 levels
        raise CodecError(f"request body is not valid JSON ({e})") from None


def _parameters(owner: dict, field: str) -> dict:
    """``owner["parameters"]`` (the last part of ``field``): an object, {} when absent or null."""
    value = owner.get("parameters")
    if value is None:
        return {}
    if type(value) is not dict:
        raise CodecError(f"'{field}' must be an object; got {_type_of(value)}")
    return value


def _flag(parameters: dict, key: str, field: str) -> bool | None:
    """A boolean parameter, None when absent."""
    value = parameters.get(key)
    if key in parameters and type(value) is not bool:
        raise CodecError(f"'{field}.{key}' must be true or false; got {_show(value)}")
    return value


def _declared(tensor: dict, signature: Signature) -> tuple[int, ...]:
    """The input's shape, [N, D] or [N, *dims] (an image model's [N, C, H, W]), checked with its
    datatype against the model and the row limit."""
    check_datatype(tensor.get("datatype"), signature)
    shape = tensor.get("shape")
    dims = signature.dims
    if len(dims) > 1:  # a model reading images: the shape is its own, [N, C, H, W]
        if not (
            type(shape) is list
            and len(shape) == 1 + len(dims)
            and all(type(s) is int for s in shape)
            and tuple(shape[1:]) == dims
        ):
            raise CodecError(
                f"input shape {_show(shape)}: model {signature.name!r} expects "
                f"{signature.shape_text}"
            )
    elif not (type(shape) is list and len(shape) == 2 and all(type(s) is int for s in shape)):
        raise CodecError(
            f"input shape {_show(shape)}: expected [N, {signature.n_features}], two integers"
        )
    elif shape[1] != signature.n_features:
        raise CodecError(
            f"input shape {_shape_text(shape)}: the input has {shape[1]} features per row; "
            f"model {signature.name!r} expects {signature.n_features}"
        )
    n = shape[0]
    if n < 1:
        raise CodecError(f"input shape {_shape_text(shape)}: empty batch: the input has no rows")
    if n > signature.max_rows:
        raise CodecError(
            f"input shape {_shape_text(shape)}: batch of {n} rows is over the limit of "
            f"{signature.max_rows}"
        )
    return tuple(shape)


def _requested_outputs(
    body: dict, signature: Signature, binary_all: bool | None
) -> tuple[list[str], dict[str, bool], dict[str, int]]:
    """The output names asked for, in order, whether each is answered as binary data, and the
    K of those asked as their top K classes."""
    requested = body.get("outputs")
    if requested is None:
        names = list(signature.outputs)
        return names, dict.fromkeys(names, bool(binary_all)), {}
    if type(requested) is not list or not requested:
        raise CodecError(
            "'outputs' must be a non-empty list of objects with a 'name' (leave it out for "
            f"every output); got {_show(requested)}"
        )
    names, binary, classification = [], {}, {}
    for i, entry in enumerate(requested):
        if type(entry) is not dict:
            raise CodecError(f"outputs[{i}] must be an object with a 'name'; got {_show(entry)}")
        name = entry.get("name")
        if type(name) is not str:
            raise CodecError(f"outputs[{i}].name must be a string; got {_show(name)}")
        if name in binary:
            raise CodecError(f"output {_show(name)} is requested twice (outputs[{i}])")
        parameters = _parameters(entry, f"outputs[{i}].parameters")
        flag = _flag(parameters, "binary_data", f"outputs[{i}].parameters")
        names.append(name)
        binary[name] = bool(binary_all) if flag is None else flag
        if "classification" in parameters:
            k = parameters["classification"]
            if type(k) is not int or k < 1:
                raise CodecError(
                    f"'outputs[{i}].parameters.classification' must be a positive integer (the "
                    f"number of top classes to answer); got {_show(k)}"
                )
            classification[name] = k
    unknown = [name for name in names if name not in signature.outputs]
    if unknown:
        raise CodecError(
            f"unknown output(s) {_show(unknown)}; the model has {list(signature.outputs)}"
        )
    return names, binary, classification


def _from_binary(size: Any, binary: memoryview | bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Binary tensor data (FP32, little-endian, row-major) -> (N, D) float32."""
    n, d = shape[0], math.prod(shape[1:])
    needed = n * d * FP32_BYTES
    if type(size) is not int or size < 0:
        raise CodecError(
            "'inputs[0].parameters.binary_data_size' must be a non-negative integer; got "
            f"{_show(size)}"
        )
    if size != needed:
        raise CodecError(
            f"binary_data_size {size} does not match the input: shape {_shape_text(shape)} of "
            f"{DATATYPE} needs {needed} bytes"
        )
    if len(binary) != size:
        raise CodecError(
            f"binary_data_size {size} does not fit the {len(binary)} bytes of binary data "
            f"after the JSON header ({RESPONSE_BINARY_HEADER})"
        )
    return _from_bytes(binary, shape, "binary input")


def _from_bytes(binary: memoryview | bytes, shape: tuple[int, ...], field: str) -> np.ndarray:
    """Little-endian FP32 bytes of ``shape`` -> (N, D) native float32, writable, finite."""
    array = np.frombuffer(binary, dtype="<f4").reshape(shape[0], -1)
    x = array.astype(np.float32)  # a copy: writable, native byte order
    return _finite_rows(x, field, array.reshape(-1).__getitem__, shape=shape, nested=True)


def _from_json(data: Any, shape: tuple[int, ...]) -> np.ndarray:
    if type(data) is not list:
        nested = "[N][D]" if len(shape) == 2 else "as the shape"
        raise CodecError(
            f"input 'data' must be a list of numbers (flat, or nested {nested}); got "
            f"{_type_of(data)}"
        )
    return _values_to_rows(data, shape, "input 'data'")


def _values_to_rows(data: list, shape: tuple[int, ...], field: str) -> np.ndarray:
    """JSON values, flat (N*D) or nested exactly as ``shape`` ([N][D], [N][C][H][W]), ->
    (N, D) float32, every rule checked (D: the product of shape[1:]).

    One pass collects the values' types (``set(map(type, ...))``, about 14 us for 784 values):
    numpy alone would take booleans as 0/1 and numeric strings as numbers, and checking its
    result's dtype cannot see booleans. Measured alternatives (isinstance maps, a scan of the
    raw body for ``true``/``false``) were slower. JSON integers are numbers like any other
    (orjson reads those past 64 bits as floats).

    Nested values are walked as their innermost lists (``_leaves``: [N][D] as it came, deeper
    nestings as N*C*H lists of W). Both passes go SLICE_VALUES values at a time (``_slices``):
    each is one C call that holds the GIL throughout, and large bodies are decoded in a thread
    beside the event loop.
    """
    n, d = shape[0], math.prod(shape[1:])
    nested = bool(data) and type(data[0]) is list
    if nested:
        data = _leaves(data, shape, field)  # (N * ... , shape[-1]) lists of values
    elif len(data) != n * d:
        raise CodecError(
            f"{field} holds {len(data)} values; shape {_shape_text(shape)} needs {n * d}"
        )
    width = shape[-1]  # values per innermost list when nested

    def values():  # every value, row by row
        return chain.from_iterable(data) if nested else iter(data)

    allowed = (int, float)
    parts = _slices(data, nested, width)
    types: set[type] = set()
    for part in parts:
        types.update(map(type, chain.from_iterable(part) if nested else part))
    if not types.issubset(allowed):
        i, value = next((i, v) for i, v in enumerate(values()) if type(v) not in allowed)
        raise CodecError(
            f"{field} must hold numbers only (ints or floats for {DATATYPE}): "
            f"{field}{_index(i, nested, shape)} is {_described(value)}"
        )
    with np.errstate(over="ignore"):  # overflow becomes inf, refused below
        x = np.ascontiguousarray(_array(parts, n, d, np.float32))
    value_at = (lambda i: data[i // width][i % width]) if nested else data.__getitem__
    return _finite_rows(x, field, value_at, shape=shape, nested=nested)


def _leaves(data: list, shape: tuple[int, ...], field: str) -> list:
    """``data`` nested exactly as ``shape`` -> its innermost lists (each of shape[-1] values),
    row-major: ``data`` itself for [N][D], N*C*H lists of W for [N][C][H][W]. CodecError
    naming the first list that departs from the shape.

    Each level is checked whole (``set(map(type, ...))``, ``set(map(len, ...))``: C loops)
    before the next is built, so an image batch costs N*C*H list entries, not a Python step
    per value.
    """
    rank, total = len(shape), math.prod(shape)
    if rank == 2:
        send, rows = (
            f"{total} numbers or {shape[0]} lists of {shape[1]}",
            f"lists of {shape[1]} numbers",
        )
    else:
        send = f"{total} numbers or lists nested as {_brackets(shape)}"
        rows = f"lists nested as {_brackets(shape[1:])}"
    level = data  # the lists at depth t (row-major), each of which must hold shape[t] items
    for depth in range(1, rank):
        if depth > 1:
            level = list(chain.from_iterable(level))
        if set(map(type, level)) != {list}:
            i = next(i for i, item in enumerate(level) if type(item) is not list)
            if depth == 1:  # data[0] is a list (it made the data nested)
                raise CodecError(
                    f"{field} mixes lists and values: [0] is a list, [{i}] is "
                    f"{_type_of(level[i])}; send {send}"
                )
            raise CodecError(
                f"{field}{_path(i, shape[:depth])} is {_type_of(level[i])}, not a list of "
                f"{shape[depth]}; send {send}"
            )
        if depth == 1 and len(data) != shape[0]:
            raise CodecError(
                f"{field} holds {len(data)} rows; shape {_shape_text(shape)} needs {shape[0]} {rows}"
            )
        size = shape[depth]
        if set(map(len, level)) != {size}:
            i = next(i for i, item in enumerate(level) if len(item) != size)
            where = f"{field}{_path(i, shape[:depth])}"
            if rank == 2:
                raise CodecError(
                    f"{where} holds {len(level[i])} values; shape {_shape_text(shape)} needs "
                    f"{size} per row"
                )
            raise CodecError(
                f"{where} holds {len(level[i])} items; shape {_shape_text(shape)} needs {size} there"
            )
    return level


def _slices(data: list, nested: bool, d: int) -> list[list]:
    """``data`` in parts of about SLICE_VALUES values (whole innermost lists when nested, of
    ``d`` values each)."""
    step = max(1, SLICE_VALUES // d) if nested else SLICE_VALUES
    if len(data) <= step:
        return [data]
    return [data[start : start + step] for start in range(0, len(data), step)]


def _array(parts: list[list], n: int, d: int, dtype: type) -> np.ndarray:
    """``np.array(data, dtype).reshape(n, d)``, converted a part at a time (the same values,
    element by element)."""
    if len(parts) == 1:
        return np.array(parts[0], dtype=dtype).reshape(n, d)
    out, filled = np.empty(n * d, dtype=dtype), 0
    for part in parts:
        values = np.array(part, dtype=dtype).reshape(-1)
        out[filled : filled + values.size] = values
        filled += values.size
    return out.reshape(n, d)


def _finite_rows(
    x: np.ndarray,
    field: str,
    value_at: Callable[[int], Any],
    *,
    shape: tuple[int, ...],
    nested: bool,
) -> np.ndarray:
    """``x`` (N, D) when every value is finite; else the first culprit, as the request held it
    (``value_at(i)``: value i, row-major, of the request's tensor of ``shape``)."""
    finite = np.isfinite(x)
    if finite.all():
        return x
    i = int(np.flatnonzero(~finite)[0])
    value = float(value_at(i))
    # JSON holds no NaN or inf itself: a finite value there overflowed float32
    why = f" overflows {DATATYPE}" if math.isfinite(value) else ""
    raise CodecError(
        f"input holds NaN or infinite values: {field}{_index(i, nested, shape)} = {value!r}{why}"
    )


# --------------------------------------------------------------------------------------------
# Encoding


def encode_infer(
    model_name: str,
    model_version: str,
    result: dict[str, np.ndarray],
    request: InferRequest,
    *,
    labels: list[str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The V2 response for ``request``: (body, extra headers).

    Outputs are FP32, in the order asked for, ``id`` echoed; an output asked with
    ``classification`` K is BYTES [N, min(K, C)] instead (``top_classes``, with ``labels``).
    With any output as binary data the body is the JSON header followed by those outputs'
    bytes (FP32 little-endian; BYTES as Triton's length-prefixed strings), and the headers hold
    Inference-Header-Content-Length (send it as application/octet-stream); with none, the
    headers are empty and the body is JSON.
    """
    outputs, blobs = [], []
    for name in request.outputs:
        array = np.ascontiguousarray(result[name], dtype=np.float32)
        k = request.classification.get(name)
        if k is not None:
            classes = top_classes(array, k, labels)  # (N, min(k, C)), row-major
            shape = [array.shape[0], min(k, array.shape[1])]
            entry: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": shape}
        else:
            entry = {"name": name, "datatype": DATATYPE, "shape": list(array.shape)}
        if request.binary.get(name, False):
            data = bytes_tensor(classes) if k is not None else array.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = classes if k is not None else array.ravel()
        outputs.append(entry)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": outputs,
    }
    if request.id is not None:
        response["id"] = request.id
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {RESPONSE_BINARY_HEADER: str(len(header))}


def top_classes(scores: np.ndarray, k: int, labels: list[str] | None = None) -> list[str]:
    """(N, C) scores -> the top min(k, C) classes of each row, best first, row-major, as
    Triton's classification extension writes them: "<value>:<index>[:<label>]", the value as
    C's ``%f`` (Triton's ``std::to_string``). Ties go to the lower index."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k)
    return [
        f"{float(row[i]):f}:{i}:{labels[i]}" if labels is not None else f"{float(row[i]):f}:{i}"
        for row, best in zip(scores, order.tolist(), strict=True)
        for i in best
    ]


def bytes_tensor(strings: list[str]) -> bytes:
    """A BYTES tensor as binary data: each element a 4-byte little-endian length, then its
    UTF-8 bytes (the binary tensor data extension)."""
    encoded = [s.encode() for s in strings]
    return b"".join(len(e).to_bytes(4, "little") + e for e in encoded)


def encode_predict(probabilities: np.ndarray, labels: list[str]) -> bytes:
    """(N, C) probabilities -> ``{"predictions": [{"label": ..., "probabilities": [...]}]}``."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    predictions = [
        {"label": labels[int(k)], "probabilities": row}
        for k, row in zip(probabilities.argmax(1), probabilities, strict=True)
    ]
    return orjson.dumps({"predictions": predictions}, option=orjson.OPT_SERIALIZE_NUMPY)


# --------------------------------------------------------------------------------------------
# HTTP content codings of bodies (Content-Encoding, Accept-Encoding), as Triton takes and gives
# them: gzip and deflate (zlib's format, RFC 9110 section 8.4.1.2).

CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # coding -> zlib wbits
_DETECT_WBITS = 32 + zlib.MAX_WBITS  # inflate gzip or zlib, whichever came (Triton: 15 | 32)
COMPRESS_LEVEL = 6  # zlib's default, Triton's (Z_DEFAULT_COMPRESSION)


def request_coding(content_encoding: str | None) -> str | None:
    """A request's Content-Encoding: "gzip" or "deflate", None for none or identity; any other
    is 415 naming it."""
    coding = (content_encoding or "").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in CODINGS:
        raise CodecError(
            f"Content-Encoding {_show(coding)} is not supported; send gzip, deflate or identity",
            415,
        )
    return coding


def inflate(raw: bytes | bytearray, coding: str, limit: int) -> bytes:
    """A gzip or deflate body, decompressed; 413 once it passes ``limit`` bytes, without ever
    holding more than ``limit`` + 1 of them (a small body can inflate a thousandfold: a zip
    bomb stops at the limit). Concatenated gzip members decompress as one (RFC 1952)."""
    out = bytearray()
    data: bytes | bytearray = raw
    stream = zlib.decompressobj(_DETECT_WBITS)
    try:
        while True:
            # max_length keeps each step's output within the limit (0 would mean unlimited:
            # it is at least 1 here)
            out += stream.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise CodecError(
                    f"request body decompresses ({coding}) to more than the limit of {limit} bytes",
                    413,
                )
            if stream.eof:
                if not stream.unused_data:
                    return bytes(out)
                data, stream = stream.unused_data, zlib.decompressobj(_DETECT_WBITS)
            elif stream.unconsumed_tail:  # (under the cap zlib takes every byte in at once)
                data = stream.unconsumed_tail
            else:
                raise CodecError(f"request body is truncated {coding} data", 400)
    except zlib.error as e:
        raise CodecError(f"request body is not valid {coding} data ({e})", 400) from None


def response_coding(accept_encoding: str | None) -> str | None:
    """The coding to answer with for an Accept-Encoding header, as Triton picks it: the
    highest q among gzip, deflate and identity (the first listed on a tie; q=0 never);
    None for identity or nothing acceptable."""
    best, weight = None, 0.0
    for item in (accept_encoding or "").split(","):
        name, _, q = item.partition(";")
        name, q = name.strip().lower(), q.strip().lower()
        if not q:
            value = 1.0
        elif q.startswith("q="):
            try:
                value = float(q[2:])
            except ValueError:  # malformed: skipped, as Triton does
                continue
        else:
            continue
        if name in ("gzip", "deflate", "identity") and value > weight:
            best, weight = (None if name == "identity" else name), value
    return best


def compress(body: bytes, coding: str) -> bytes:
    """``body`` in ``coding`` ("gzip" or "deflate"), at zlib's default level."""
    packer = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, CODINGS[coding])
    return packer.compress(body) + packer.flush()


# --------------------------------------------------------------------------------------------
# Messages: client values shown briefly and safely (no recursion into a deep nesting)


def _show(value: Any, depth: int = 0) -> str:
    kind = type(value)
    if kind is str:
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    if kind is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    if kind in (int, float):
        return repr(value)
    if kind is list and depth < 2 and len(value) <= 8:
        return "[" + ", ".join(_show(v, depth + 1) for v in value) + "]"
    if kind is list:
        return f"a list of {len(value)} items"
    return _JSON_TYPE.get(kind, kind.__name__)


def _described(value: Any) -> str:
    """Its JSON type, and the value itself when that says more ('a string ('0.5')', 'null')."""
    if value is None or type(value) is dict:
        return _type_of(value)
    return f"{_type_of(value)} ({_show(value)})"


def _type_of(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _kind_of_body(body: Any, key: str) -> str:
    if type(body) is not dict:
        return _type_of(body)
    if key not in body:
        return f"an object without {key!r}"
    return f"{key!r} as {_type_of(body[key])}"


def _index(i: int, nested: bool, shape: tuple[int, ...]) -> str:
    """Where value ``i`` (row-major) of a tensor of ``shape`` was sent: [i] in flat data,
    [row][column] (or [n][c][h][w]) in nested data."""
    return _path(i, shape) if nested else f"[{i}]"


def _path(i: int, shape: tuple[int, ...]) -> str:
    """Index ``i`` of a row-major ``shape`` as [a][b]..."""
    return "".join(f"[{k}]" for k in np.unravel_index(i, shape))


def _brackets(dims: tuple[int, ...]) -> str:
    return "".join(f"[{k}]" for k in dims)


def _shape_text(shape) -> str:
    return f"[{', '.join(map(str, shape))}]"
