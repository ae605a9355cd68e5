"""The Open Inference Protocol (KServe V2) codec: request bytes -> float32 rows, results -> bytes.

Pure numpy + orjson, no web framework, so every rule a client can trip is testable (and fuzzed,
tests/serve/test_codec.py) without a server. Every refusal is a ``CodecError`` carrying its HTTP
status and a message naming the field, what was expected and what came; no other exception
leaves ``decode_*`` for any input bytes (orjson refuses nesting deeper than 1024 levels, and
nothing here recurses into client values).

Order of the checks (issue F item 3): the body's structure, then the declared datatype and shape
against the model and ``max_rows``, the value count (or the binary byte count), outputs and id,
and only then the values themselves. JSON ``data`` takes numbers only (never booleans, strings or
null), flat (N*D) or nested exactly as the declared shape ([N][D], or [N][C][H][W] for a model
reading images); integer datatypes take integers within the type's range; values are converted
to the declared datatype, then float32, and must be finite there. The decoded array has the
model's input shape, (N, D) or (N, C, H, W).
``null`` for an optional field (``id``, ``parameters``, ``outputs``) means absent, as in
MLServer's and KServe's request models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson

# V2 datatypes accepted for the input tensor (converted to float32) and their byte layouts.
V2_DTYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}
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


# --------------------------------------------------------------------------------------------
# Decoding


def check_content_type(
    content_type: str | None, *, binary_ok: bool, has_binary_header: bool
) -> None:
    """JSON (or any +json type, or none given); octet-stream only for a binary infer request."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if not kind or kind == "application/json" or kind.endswith("+json"):
        return
    if kind == "application/octet-stream" and binary_ok:
        if has_binary_header:
            return
        raise CodecError(
            f"content type 'application/octet-stream' needs the {RESPONSE_BINARY_HEADER} header "
            "(binary tensor data); send application/json otherwise",
            415,
        )
    raise CodecError(f"content type {_show(kind)} is not supported; send application/json", 415)


def decode_infer(
    raw: bytes, signature: Signature, *, header_length: str | None = None
) -> InferRequest:
    """A V2 infer body -> its input rows and output choices.

    ``header_length``: the Inference-Header-Content-Length header, when the body is a JSON header
    followed by binary tensor data (the binary tensor data extension).
    """
    header, binary = _split_binary(raw, header_length)
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
    dtype, shape = _declared(tensor, signature)

    x: np.ndarray | None = None
    if "binary_data_size" in input_parameters:
        if "data" in tensor:
            raise CodecError(
                "input has both 'data' and parameters.binary_data_size; send one of them"
            )
        x = _from_binary(input_parameters["binary_data_size"], binary, dtype, shape)
    elif binary:
        raise CodecError(
            f"the body holds {len(binary)} bytes of binary data after the {len(header)}-byte "
            "JSON header, but no input has parameters.binary_data_size"
        )
    elif "data" not in tensor:
        raise CodecError("input needs 'data' (or binary data with parameters.binary_data_size)")

    binary_all = _flag(request_parameters, "binary_data_output", "parameters")
    outputs, binary_out = _requested_outputs(body, signature, binary_all)
    request_id = body.get("id")
    if request_id is not None and type(request_id) is not str:
        raise CodecError(f"'id' must be a string; got {_type_of(request_id)}")

    if x is None:  # values last: every cheaper check has passed
        x = _from_json(tensor["data"], dtype, shape)
    return InferRequest(x=x.reshape(shape), outputs=outputs, binary=binary_out, id=request_id)


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
    return _values_to_rows(instances, np.dtype(np.float32), (len(instances), d), "instances")


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
    return _values_to_rows(instances, np.dtype(np.float32), shape, "instances").reshape(n, *dims)


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
    hundreds of MB of Python objects (issue F: a 16 MiB body of "0," for shape [1, 784]). n
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


def _declared(tensor: dict, signature: Signature) -> tuple[np.dtype, tuple[int, ...]]:
    """The input's datatype and shape, [N, D] or [N, *dims] (an image model's [N, C, H, W]),
    checked against the model and the row limit."""
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if type(datatype) is not str or datatype not in V2_DTYPES:
        raise CodecError(
            f"input datatype {_show(datatype)} is not supported (use one of {', '.join(V2_DTYPES)})"
        )
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
    return np.dtype(V2_DTYPES[datatype]), tuple(shape)


def _requested_outputs(
    body: dict, signature: Signature, binary_all: bool | None
) -> tuple[list[str], dict[str, bool]]:
    """The output names asked for, in order, and whether each is answered as binary data."""
    requested = body.get("outputs")
    if requested is None:
        names = list(signature.outputs)
        return names, dict.fromkeys(names, bool(binary_all))
    if type(requested) is not list or not requested:
        raise CodecError(
            "'outputs' must be a non-empty list of objects with a 'name' (leave it out for "
            f"every output); got {_show(requested)}"
        )
    names, binary = [], {}
    for i, entry in enumerate(requested):
        if type(entry) is not dict:
            raise CodecError(f"outputs[{i}] must be an object with a 'name'; got {_show(entry)}")
        name = entry.get("name")
        if type(name) is not str:
            raise CodecError(f"outputs[{i}].name must be a string; got {_show(name)}")
        if name in binary:
            raise CodecError(f"output {_show(name)} is requested twice (outputs[{i}])")
        flag = _flag(
            _parameters(entry, f"outputs[{i}].parameters"),
            "binary_data",
            f"outputs[{i}].parameters",
        )
        names.append(name)
        binary[name] = bool(binary_all) if flag is None else flag
    unknown = [name for name in names if name not in signature.outputs]
    if unknown:
        raise CodecError(
            f"unknown output(s) {_show(unknown)}; the model has {list(signature.outputs)}"
        )
    return names, binary


def _from_binary(
    size: Any, binary: memoryview | bytes, dtype: np.dtype, shape: tuple[int, ...]
) -> np.ndarray:
    """Binary tensor data (little-endian, row-major) -> (N, D) float32."""
    n, d = shape[0], math.prod(shape[1:])
    needed = n * d * dtype.itemsize
    if type(size) is not int or size < 0:
        raise CodecError(
            "'inputs[0].parameters.binary_data_size' must be a non-negative integer; got "
            f"{_show(size)}"
        )
    if size != needed:
        raise CodecError(
            f"binary_data_size {size} does not match the input: shape {_shape_text(shape)} of "
            f"{_datatype_name(dtype)} needs {needed} bytes"
        )
    if len(binary) != size:
        raise CodecError(
            f"binary_data_size {size} does not fit the {len(binary)} bytes of binary data "
            f"after the JSON header ({RESPONSE_BINARY_HEADER})"
        )
    array = np.frombuffer(binary, dtype=dtype.newbyteorder("<")).reshape(n, d)
    with np.errstate(over="ignore"):  # FP64 beyond FP32's range becomes inf, refused below
        x = array.astype(np.float32)
    values = array.reshape(-1)
    return _finite_rows(
        x, "binary input", values.__getitem__, shape=shape, nested=True, dtype=dtype
    )


def _from_json(data: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if type(data) is not list:
        nested = "[N][D]" if len(shape) == 2 else "as the shape"
        raise CodecError(
            f"input 'data' must be a list of numbers (flat, or nested {nested}); got "
            f"{_type_of(data)}"
        )
    return _values_to_rows(data, dtype, shape, "input 'data'")


def _values_to_rows(data: list, dtype: np.dtype, shape: tuple[int, ...], field: str) -> np.ndarray:
    """JSON values, flat (N*D) or nested exactly as ``shape`` ([N][D], [N][C][H][W]), ->
    (N, D) float32, every rule checked (D: the product of shape[1:]).

    One pass collects the values' types (``set(map(type, ...))``, about 14 us for 784 values):
    numpy alone would take booleans as 0/1 and numeric strings as numbers, and checking its
    result's dtype cannot see booleans. Measured alternatives (isinstance maps, a scan of the
    raw body for ``true``/``false``) were slower. Integers are read as int64 (exact; numpy raises
    OverflowError beyond it, in every supported version) and range-checked there; only UINT64
    values past int64 are compared as Python ints.

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

    integer = dtype.kind in "iu"
    allowed = (int,) if integer else (int, float)
    parts = _slices(data, nested, width)
    types: set[type] = set()
    for part in parts:
        types.update(map(type, chain.from_iterable(part) if nested else part))
    if not types.issubset(allowed):
        i, value = next((i, v) for i, v in enumerate(values()) if type(v) not in allowed)
        wanted = "integers" if integer else "ints or floats"
        raise CodecError(
            f"{field} must hold numbers only ({wanted} for {_datatype_name(dtype)}): "
            f"{field}{_index(i, nested, shape)} is {_described(value)}"
        )
    if integer:
        info = np.iinfo(dtype)
        try:
            wide = _array(parts, n, d, np.int64)  # exact; OverflowError beyond int64
            in_range = int(wide.min()) >= info.min and int(wide.max()) <= info.max
        except OverflowError:  # only UINT64 holds such values: compare as Python ints
            wide, in_range = None, min(values()) >= info.min and max(values()) <= info.max
        if not in_range:
            i, value = next((i, v) for i, v in enumerate(values()) if not info.min <= v <= info.max)
            raise CodecError(
                f"{field}{_index(i, nested, shape)} = {value} is outside {_datatype_name(dtype)}'s "
                f"range [{info.min}, {info.max}]"
            )
        if wide is None:
            wide = np.array(data, dtype=np.uint64)
        return np.ascontiguousarray(wide.reshape(n, d), dtype=np.float32)
    with np.errstate(over="ignore"):  # overflow becomes inf, refused below
        # FP16 through its own type: its rounding and range, as its binary form would have
        array = _array(parts, n, d, np.float16 if dtype == np.float16 else np.float32)
        x = np.ascontiguousarray(array, dtype=np.float32)
    value_at = (lambda i: data[i // width][i % width]) if nested else data.__getitem__
    return _finite_rows(x, field, value_at, shape=shape, nested=nested, dtype=dtype)


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
    dtype: np.dtype,
) -> np.ndarray:
    """``x`` (N, D) when every value is finite; else the first culprit, as the request held it
    (``value_at(i)``: value i, row-major, of the request's tensor of ``shape``)."""
    finite = np.isfinite(x)
    if finite.all():
        return x
    i = int(np.flatnonzero(~finite)[0])
    value = float(value_at(i))
    overflows = "FP16" if dtype == np.float16 else "FP32"  # JSON holds no NaN or inf itself
    why = f" overflows {overflows}" if math.isfinite(value) else ""
    raise CodecError(
        f"input holds NaN or infinite values: {field}{_index(i, nested, shape)} = {value!r}{why}"
    )


# --------------------------------------------------------------------------------------------
# Encoding


def encode_infer(
    model_name: str, model_version: str, result: dict[str, np.ndarray], request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """The V2 response for ``request``: (body, extra headers).

    Outputs are FP32, in the order asked for, ``id`` echoed. With any output as binary data the
    body is the JSON header followed by those outputs' little-endian bytes, and the headers hold
    Inference-Header-Content-Length (send it as application/octet-stream); with none, the
    headers are empty and the body is JSON.
    """
    outputs, blobs = [], []
    for name in request.outputs:
        array = np.ascontiguousarray(result[name], dtype=np.float32)
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if request.binary.get(name, False):
            data = array.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = array.ravel()
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


def encode_predict(probabilities: np.ndarray, labels: list[str]) -> bytes:
    """(N, C) probabilities -> ``{"predictions": [{"label": ..., "probabilities": [...]}]}``."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    predictions = [
        {"label": labels[int(k)], "probabilities": row}
        for k, row in zip(probabilities.argmax(1), probabilities, strict=True)
    ]
    return orjson.dumps({"predictions": predictions}, option=orjson.OPT_SERIALIZE_NUMPY)


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


def _datatype_name(dtype: np.dtype) -> str:
    return next(name for name, t in V2_DTYPES.items() if np.dtype(t) == dtype)
