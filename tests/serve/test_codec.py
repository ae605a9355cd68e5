"""The V2 codec without a server: every request rule, accepted and refused, and a fuzz test that
no bytes make ``decode_*`` raise anything but ``CodecError``."""

from __future__ import annotations

import ast
import gzip
import json
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartmixed.serve import codec
from smartmixed.serve.codec import (
    BINARY_HEADER,
    CodecError,
    InferRequest,
    Signature,
    decode_infer,
    decode_predict,
    encode_infer,
    encode_predict,
)

SIG = Signature(
    name="mixed", input_name="input", n_features=4, outputs=("logits", "probabilities"), max_rows=8
)
ROWS = [[0.5, -1.0, 2.0, 3.25], [0.0, 1.0, -2.5, 100.0]]
# the V2 datatypes besides FP32 (every model's input), with their numpy types
OTHER_DATATYPES = {
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
    "BOOL": np.bool_,
}


def _tensor(data=None, *, shape=(2, 4), datatype="FP32", **extra) -> dict:
    """An input tensor; ``shape`` as given (a tuple becomes a list), ``data`` only when given."""
    shape = list(shape) if isinstance(shape, tuple) else shape
    tensor = {"name": "input", "shape": shape, "datatype": datatype, **extra}
    if data is not None:
        tensor["data"] = data
    return tensor


def _body(data=ROWS, **extra) -> dict:
    return {"inputs": [_tensor(data)], **extra}


def _binary(array: np.ndarray, datatype: str = "FP32") -> tuple[bytes, str]:
    """A binary-extension body for ``array`` (sent little-endian) and its header length."""
    dtype = np.float32 if datatype == "FP32" else OTHER_DATATYPES[datatype]
    blob = array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    parameters = {"binary_data_size": len(blob)}
    header = orjson.dumps(
        {"inputs": [_tensor(shape=array.shape, datatype=datatype, parameters=parameters)]}
    )
    return header + blob, str(len(header))


def _refusal(raw: bytes | dict | list, *, header_length: str | None = None) -> CodecError:
    if not isinstance(raw, bytes):
        raw = json.dumps(raw).encode()  # the standard library also writes > 64-bit integers
    with pytest.raises(CodecError) as caught:
        decode_infer(raw, SIG, header_length=header_length)
    return caught.value


def _check_rows(x: np.ndarray) -> None:
    assert x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous
    assert x.shape[1] == SIG.n_features and 1 <= x.shape[0] <= SIG.max_rows
    assert np.isfinite(x).all()


# --------------------------------------------------------------------------------------------
# Accepted requests


def test_flat_and_nested_data_decode_alike() -> None:
    nested = decode_infer(orjson.dumps(_body()), SIG)
    flat = decode_infer(orjson.dumps(_body([v for row in ROWS for v in row])), SIG)
    for request in (nested, flat):
        _check_rows(request.x)
        np.testing.assert_array_equal(request.x, np.array(ROWS, np.float32))
        assert request.outputs == ["logits", "probabilities"]
        assert request.binary == {"logits": False, "probabilities": False}
        assert request.id is None


def test_json_and_binary_agree() -> None:
    values = [[0.1, -2.5, 3, 1000.0], [65504, -0.0, 1e-3, 3.4e38]]
    from_json = decode_infer(orjson.dumps({"inputs": [_tensor(values)]}), SIG).x
    raw, length = _binary(np.array(values))
    from_binary = decode_infer(raw, SIG, header_length=length).x
    _check_rows(from_json)
    np.testing.assert_array_equal(from_json, from_binary)
    np.testing.assert_array_equal(from_json, np.array(values, np.float32))


@pytest.mark.parametrize("datatype", [*OTHER_DATATYPES, "BYTES", "fp32", "FP32 "])
def test_a_datatype_other_than_the_models_is_refused(datatype: str) -> None:
    """As Triton: the declared datatype must be the model's (FP32); never converted, JSON or
    binary."""
    message = f"inference input 'input' data-type is {datatype!r}, but model 'mixed' expects 'FP32'"
    error = _refusal({"inputs": [_tensor([[0, 1, 0, 1], [1, 0, 1, 0]], datatype=datatype)]})
    assert (error.status, str(error)) == (400, message)
    if datatype in OTHER_DATATYPES:
        raw, length = _binary(np.array([[0, 1, 0, 1], [1, 0, 1, 0]]), datatype)
        error = _refusal(raw, header_length=length)
        assert (error.status, str(error)) == (400, message)


def test_id_parameters_and_output_choices() -> None:
    body = _body(
        id="req-1",
        parameters={"binary_data_output": True, "other": [1]},
        outputs=[
            {"name": "probabilities"},
            {"name": "logits", "parameters": {"binary_data": False}},
        ],
    )
    request = decode_infer(orjson.dumps(body), SIG)
    assert request.id == "req-1"
    assert request.outputs == ["probabilities", "logits"]
    assert request.binary == {"probabilities": True, "logits": False}
    everything = decode_infer(orjson.dumps(_body(parameters={"binary_data_output": True})), SIG)
    assert everything.binary == {"logits": True, "probabilities": True}


def test_null_optional_fields_mean_absent() -> None:
    """As MLServer's and KServe's request models send them."""
    body = {
        "id": None,
        "parameters": None,
        "outputs": None,
        "inputs": [_tensor(ROWS, parameters=None)],
    }
    request = decode_infer(orjson.dumps(body), SIG)
    assert request.id is None and request.outputs == ["logits", "probabilities"]
    one = decode_infer(orjson.dumps(_body(outputs=[{"name": "logits", "parameters": None}])), SIG)
    assert one.binary == {"logits": False}


def test_json_integers_are_fp32_values() -> None:
    """JSON integers, however large, are numbers for FP32 (rounded to float32 as floats are)."""
    ints = {"inputs": [_tensor([2**64 - 1, -(2**63), 2**70, 3], shape=(1, 4))]}
    x = decode_infer(json.dumps(ints).encode(), SIG).x
    np.testing.assert_array_equal(x, np.array([[2**64, -(2**63), 2**70, 3]], np.float32))


def test_binary_data_is_little_endian() -> None:
    x = np.array(ROWS, np.float32)
    header = orjson.dumps({"inputs": [_tensor(parameters={"binary_data_size": x.nbytes})]})
    little = decode_infer(header + x.astype("<f4").tobytes(), SIG, header_length=str(len(header)))
    np.testing.assert_array_equal(little.x, x)
    assert little.x.flags.writeable and little.x.flags.c_contiguous
    big = decode_infer(header + x.astype(">f4").tobytes(), SIG, header_length=str(len(header)))
    np.testing.assert_array_equal(big.x, x.astype(">f4").view("<f4"))  # read as little-endian
    # JSON data and an empty binary section: a client asking for binary outputs only
    plain = orjson.dumps(_body())
    assert decode_infer(plain, SIG, header_length=str(len(plain))).x.shape == (2, 4)


# --------------------------------------------------------------------------------------------
# Refused requests: each message names the field, what was expected and what came

T = _tensor  # shorter rows in the table below

BAD_INFER = [
    ([1, 2], "request body must be an object with an 'inputs' list; got a list"),
    (
        {"inputs": "nope"},
        "request body must be an object with an 'inputs' list; got 'inputs' as a string",
    ),
    (
        {"input": []},
        "request body must be an object with an 'inputs' list; got an object without 'inputs'",
    ),
    ({"inputs": []}, "'inputs' must hold exactly one tensor object ('input'); got 0 item(s)"),
    (
        {"inputs": [T(ROWS), T(ROWS)]},
        "'inputs' must hold exactly one tensor object ('input'); got 2 item(s), the first an object",
    ),
    (
        {"inputs": [5]},
        "'inputs' must hold exactly one tensor object ('input'); got 1 item(s), the first an integer",
    ),
    (
        {"inputs": [T(ROWS, name="images")]},
        "unknown input 'images' in inputs[0].name; the model's input is 'input'",
    ),
    (
        {"inputs": [T(ROWS, name=["input"])]},
        "unknown input ['input'] in inputs[0].name; the model's input is 'input'",
    ),
    (
        {"inputs": [T(ROWS, datatype="BYTES")]},
        "inference input 'input' data-type is 'BYTES', but model 'mixed' expects 'FP32'",
    ),
    (
        {"inputs": [T(ROWS, datatype=None)]},
        "inference input 'input' data-type is null, but model 'mixed' expects 'FP32'",
    ),
    (
        {"inputs": [{"name": "input", "shape": [2, 4], "data": ROWS}]},
        "inference input 'input' data-type is null, but model 'mixed' expects 'FP32'",
    ),
    (
        {"inputs": [T(ROWS, datatype=["FP32"])]},
        "inference input 'input' data-type is ['FP32'], but model 'mixed' expects 'FP32'",
    ),
    ({"inputs": [T(ROWS, shape=[8])]}, "input shape [8]: expected [N, 4], two integers"),
    (
        {"inputs": [T(ROWS, shape=[True, 4])]},
        "input shape [true, 4]: expected [N, 4], two integers",
    ),
    ({"inputs": [T(ROWS, shape=[2.0, 4])]}, "input shape [2.0, 4]: expected [N, 4], two integers"),
    ({"inputs": [T(ROWS, shape="2,4")]}, "input shape '2,4': expected [N, 4], two integers"),
    (
        {"inputs": [T(ROWS, shape=[2, 4, 1])]},
        "input shape [2, 4, 1]: expected [N, 4], two integers",
    ),
    (
        {"inputs": [T(ROWS, shape=[2, 3])]},
        "input shape [2, 3]: the input has 3 features per row; model 'mixed' expects 4",
    ),
    ({"inputs": [T([], shape=[0, 4])]}, "input shape [0, 4]: empty batch: the input has no rows"),
    (
        {"inputs": [T(ROWS, shape=[-2, 4])]},
        "input shape [-2, 4]: empty batch: the input has no rows",
    ),
    (
        {"inputs": [T([0] * 36, shape=[9, 4])]},
        "input shape [9, 4]: batch of 9 rows is over the limit of 8",
    ),
    ({"inputs": [T()]}, "input needs 'data' (or binary data with parameters.binary_data_size)"),
    (
        {"inputs": [T("0.5,1")]},
        "input 'data' must be a list of numbers (flat, or nested [N][D]); got a string",
    ),
    (
        {"inputs": [{**T(), "data": None}]},
        "input 'data' must be a list of numbers (flat, or nested [N][D]); got null",
    ),
    ({"inputs": [T([0.0] * 7)]}, "input 'data' holds 7 values; shape [2, 4] needs 8"),
    ({"inputs": [T([])]}, "input 'data' holds 0 values; shape [2, 4] needs 8"),
    (
        {"inputs": [T([*ROWS, ROWS[0]])]},
        "input 'data' holds 3 rows; shape [2, 4] needs 2 lists of 4 numbers",
    ),
    (
        {"inputs": [T([ROWS[0], [1, 2, 3]])]},
        "input 'data'[1] holds 3 values; shape [2, 4] needs 4 per row",
    ),
    (
        {"inputs": [T([ROWS[0], *range(4)])]},
        "input 'data' mixes lists and values: [0] is a list, [1] is an integer; send 8 numbers or 2 lists of 4",
    ),
    (
        {"inputs": [T([0, 1, [2], 3, 4, 5, 6, 7])]},
        "input 'data' must hold numbers only (ints or floats for FP32): input 'data'[2] is a list ([2])",
    ),
    (
        {"inputs": [T([0, "0.5", *range(6)])]},
        "input 'data' must hold numbers only (ints or floats for FP32): input 'data'[1] is a string ('0.5')",
    ),
    (
        {"inputs": [T([[0, 1, 2, 3], [0, True, 2, 3]])]},
        "input 'data' must hold numbers only (ints or floats for FP32): input 'data'[1][1] is a boolean (true)",
    ),
    (
        {"inputs": [T([0, 1, 2, None, 4, 5, 6, 7])]},
        "input 'data' must hold numbers only (ints or floats for FP32): input 'data'[3] is null",
    ),
    (
        {"inputs": [T([0, 1, 2, {}, 4, 5, 6, 7])]},
        "input 'data' must hold numbers only (ints or floats for FP32): input 'data'[3] is an object",
    ),
    (
        {"inputs": [T([[[0], [1], [2], [3]]], shape=[1, 4])]},
        "input 'data' must hold numbers only (ints or floats for FP32): input 'data'[0][0] is a list ([0])",
    ),
    (
        {"inputs": [T([0, 1e39, 2, 3], shape=[1, 4])]},
        "input holds NaN or infinite values: input 'data'[1] = 1e+39 overflows FP32",
    ),
    (
        {"inputs": [T([[0, 1, 2, 3], [0, 1, 2, -1e300]])]},
        "input holds NaN or infinite values: input 'data'[1][3] = -1e+300 overflows FP32",
    ),
    (
        {"inputs": [T([0, 10**39, 2, 3], shape=[1, 4])]},
        "input holds NaN or infinite values: input 'data'[1] = 1e+39 overflows FP32",
    ),
    (
        {"inputs": [T(ROWS)], "outputs": [{"name": "logits", "parameters": {"classification": 0}}]},
        "'outputs[0].parameters.classification' must be a positive integer (the number of top classes to answer); got 0",
    ),
    (
        {
            "inputs": [T(ROWS)],
            "outputs": [
                {"name": "logits"},
                {"name": "probabilities", "parameters": {"classification": -3}},
            ],
        },
        "'outputs[1].parameters.classification' must be a positive integer (the number of top classes to answer); got -3",
    ),
    (
        {
            "inputs": [T(ROWS)],
            "outputs": [{"name": "logits", "parameters": {"classification": 2.0}}],
        },
        "'outputs[0].parameters.classification' must be a positive integer (the number of top classes to answer); got 2.0",
    ),
    (
        {
            "inputs": [T(ROWS)],
            "outputs": [{"name": "logits", "parameters": {"classification": "3"}}],
        },
        "'outputs[0].parameters.classification' must be a positive integer (the number of top classes to answer); got '3'",
    ),
    (
        {
            "inputs": [T(ROWS)],
            "outputs": [{"name": "logits", "parameters": {"classification": True}}],
        },
        "'outputs[0].parameters.classification' must be a positive integer (the number of top classes to answer); got true",
    ),
    (
        {
            "inputs": [T(ROWS)],
            "outputs": [{"name": "logits", "parameters": {"classification": None}}],
        },
        "'outputs[0].parameters.classification' must be a positive integer (the number of top classes to answer); got null",
    ),
    ({"inputs": [T(ROWS)], "parameters": [1]}, "'parameters' must be an object; got a list"),
    (
        {"inputs": [T(ROWS, parameters="x")]},
        "'inputs[0].parameters' must be an object; got a string",
    ),
    (
        {"inputs": [T(ROWS)], "outputs": [{"name": "logits", "parameters": []}]},
        "'outputs[0].parameters' must be an object; got a list",
    ),
    (
        {"inputs": [T(ROWS)], "outputs": [{"name": "logits", "parameters": "binary"}]},
        "'outputs[0].parameters' must be an object; got a string",
    ),
    (
        {"inputs": [T(ROWS)], "parameters": {"binary_data_output": "yes"}},
        "'parameters.binary_data_output' must be true or false; got 'yes'",
    ),
    (
        {"inputs": [T(ROWS)], "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]},
        "'outputs[0].parameters.binary_data' must be true or false; got 1",
    ),
    (
        {"inputs": [T(ROWS)], "outputs": "logits"},
        "'outputs' must be a non-empty list of objects with a 'name' (leave it out for every output); got 'logits'",
    ),
    (
        {"inputs": [T(ROWS)], "outputs": []},
        "'outputs' must be a non-empty list of objects with a 'name' (leave it out for every output); got []",
    ),
    (
        {"inputs": [T(ROWS)], "outputs": ["logits"]},
        "outputs[0] must be an object with a 'name'; got 'logits'",
    ),
    ({"inputs": [T(ROWS)], "outputs": [{"name": 3}]}, "outputs[0].name must be a string; got 3"),
    ({"inputs": [T(ROWS)], "outputs": [{}]}, "outputs[0].name must be a string; got null"),
    (
        {"inputs": [T(ROWS)], "outputs": [{"name": "scores"}, {"name": "x"}]},
        "unknown output(s) ['scores', 'x']; the model has ['logits', 'probabilities']",
    ),
    (
        {"inputs": [T(ROWS)], "outputs": [{"name": "logits"}, {"name": "logits"}]},
        "output 'logits' is requested twice (outputs[1])",
    ),
    ({"inputs": [T(ROWS)], "id": 5}, "'id' must be a string; got an integer"),
    ({"inputs": [T(ROWS)], "id": {"a": 1}}, "'id' must be a string; got an object"),
    (
        {"inputs": [T(ROWS, parameters={"binary_data_size": 32})]},
        "input has both 'data' and parameters.binary_data_size; send one of them",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_INFER, ids=[m[:60] for _, m in BAD_INFER])
def test_bad_infer_requests(body, message: str) -> None:
    error = _refusal(body)
    assert (error.status, str(error)) == (400, message)


def test_invalid_json() -> None:
    for raw in (b"{not json", b"", b"\xff", b'{"inputs": [1e400]}', b"[" * 1100 + b"]" * 1100):
        error = _refusal(raw)
        assert error.status == 400 and str(error).startswith("request body is not valid JSON (")


def test_bodies_with_more_values_than_any_request_are_refused_before_parsing() -> None:
    # max_rows x n_features = 32 values; a body of 20,000 (over 4 x 32 + 4096) is refused by
    # counting commas, so even a body that is not JSON at all gets 413, not a parse error
    many = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ['
    for raw in (many + b"0," * 20_000 + b"0]}]}", b"," * 20_000):
        error = _refusal(raw)
        assert error.status == 413 and "at most 8 x 4 values" in str(error)
    with pytest.raises(CodecError, match="at most 8 x 4 values"):
        decode_predict(b'{"instances": [' + b"[0]," * 10_000 + b"[0]]}", SIG)
    # a valid body near the budget passes
    assert decode_infer(
        orjson.dumps({"inputs": [_tensor(np.zeros((8, 4)).tolist(), shape=(8, 4))]}), SIG
    ).x.shape == (8, 4)


def test_deep_nesting_and_huge_values_anywhere_are_refused_briefly() -> None:
    """orjson's depth limit (1024) bounds nesting; nothing here recurses into client values, and
    messages show them briefly."""
    deep = b"[" * 1000 + b"1" + b"]" * 1000  # within orjson's limit, too deep for orjson.dumps
    huge = b"9" * 5000  # beyond int() of a str, past float range
    bodies = [
        _body(["@"] * 8),
        _body([ROWS[0], ["@"] * 4]),
        _body(inputs=[T(ROWS, shape="@")]),
        _body(inputs=[T(ROWS, shape=["@", 4])]),
        _body(inputs=[T(ROWS, name="@")]),
        _body(inputs=[T(ROWS, datatype="@")]),
        _body(outputs="@"),
        _body(outputs=[{"name": "@"}]),
        _body(id="@"),
        _body(parameters={"binary_data_output": "@"}),
        _body(inputs=[T("@")]),
        _body(inputs=[T(ROWS, parameters={"binary_data_size": "@"})]),
        _body(inputs=[T(ROWS, name="x" * 100_000)]),
        _body(inputs=[T(ROWS, shape=list(range(100_000)))]),
    ]
    for body in bodies:
        for value in (deep, huge, b"-" + huge, b"1e" + huge, b'"' + b"y" * 100_000 + b'"'):
            raw = orjson.dumps(body).replace(b'"@"', value)
            try:
                decode_infer(raw, SIG)  # a long string id is an id
            except CodecError as error:
                assert error.status in (400, 413) and len(str(error)) < 300, str(error)[:300]
            with pytest.raises(CodecError):
                decode_predict(raw.replace(b'"inputs"', b'"instances"'), SIG)


# --------------------------------------------------------------------------------------------
# The binary tensor data extension

HEADER = orjson.dumps({"inputs": [T(parameters={"binary_data_size": 32})]})
BLOB = np.array(ROWS, "<f4").tobytes()


@pytest.mark.parametrize(
    "length",
    ["²", "-1", "", " 12", "12a", "0x10", "9" * 30, "0" * 5000, str(len(HEADER) + len(BLOB) + 1)],
)
def test_bad_header_lengths(length: str) -> None:
    error = _refusal(HEADER + BLOB, header_length=length)
    shown = repr(length) if len(length) <= 40 else repr(length[:40]) + "..."
    assert str(error) == (
        f"Inference-Header-Content-Length {shown} is not a byte count within the body of "
        f"{len(HEADER) + len(BLOB)} bytes"
    )


@pytest.mark.parametrize(
    ("size", "blob", "message"),
    [
        (
            True,
            BLOB,
            "'inputs[0].parameters.binary_data_size' must be a non-negative integer; got true",
        ),
        (
            -1,
            BLOB,
            "'inputs[0].parameters.binary_data_size' must be a non-negative integer; got -1",
        ),
        (
            "32",
            BLOB,
            "'inputs[0].parameters.binary_data_size' must be a non-negative integer; got '32'",
        ),
        (
            32.0,
            BLOB,
            "'inputs[0].parameters.binary_data_size' must be a non-negative integer; got 32.0",
        ),
        (
            None,
            BLOB,
            "'inputs[0].parameters.binary_data_size' must be a non-negative integer; got null",
        ),
        (
            31,
            BLOB,
            "binary_data_size 31 does not match the input: shape [2, 4] of FP32 needs 32 bytes",
        ),
        (
            32,
            BLOB[:16],
            "binary_data_size 32 does not fit the 16 bytes of binary data after the JSON header (Inference-Header-Content-Length)",
        ),
        (
            32,
            BLOB + b"\0" * 8,
            "binary_data_size 32 does not fit the 40 bytes of binary data after the JSON header (Inference-Header-Content-Length)",
        ),
    ],
)
def test_bad_binary_data(size, blob: bytes, message: str) -> None:
    header = orjson.dumps({"inputs": [T(parameters={"binary_data_size": size})]})
    error = _refusal(header + blob, header_length=str(len(header)))
    assert (error.status, str(error)) == (400, message)


def test_binary_data_without_its_header_or_size() -> None:
    error = _refusal(HEADER + BLOB)  # no Inference-Header-Content-Length: all of it is JSON
    assert str(error).startswith("request body is not valid JSON")
    error = _refusal(HEADER)  # size given, no binary section
    assert str(error) == (
        "binary_data_size 32 does not fit the 0 bytes of binary data after the JSON header "
        "(Inference-Header-Content-Length)"
    )
    plain = orjson.dumps(_body())
    error = _refusal(plain + b"extra", header_length=str(len(plain)))
    assert str(error) == (
        f"the body holds 5 bytes of binary data after the {len(plain)}-byte JSON header, but no "
        "input has parameters.binary_data_size"
    )


def test_binary_non_finite_values() -> None:
    x = np.array(ROWS, np.float32)
    x[1, 2] = np.nan
    raw, length = _binary(x, "FP32")
    assert str(_refusal(raw, header_length=length)) == (
        "input holds NaN or infinite values: binary input[1][2] = nan"
    )
    raw, length = _binary(np.array([[0, 0, 0, -np.inf]]))
    assert str(_refusal(raw, header_length=length)) == (
        "input holds NaN or infinite values: binary input[0][3] = -inf"
    )


# --------------------------------------------------------------------------------------------
# Content codings (gzip, deflate) and content types


def test_content_types_are_not_the_codecs_business() -> None:
    """As Triton: the body is JSON whatever its Content-Type says; the codec never sees it."""
    assert not hasattr(codec, "check_content_type")
    assert BINARY_HEADER == "inference-header-content-length"  # as ASGI servers spell header names


@pytest.mark.parametrize(
    ("header", "coding"),
    [(None, None), ("", None), ("identity", None), (" GZIP ", "gzip"), ("deflate", "deflate")],
)
def test_request_codings(header: str | None, coding: str | None) -> None:
    assert codec.request_coding(header) == coding


@pytest.mark.parametrize("header", ["br", "gzip, deflate", "x-gzip", "compress", "*"])
def test_other_request_codings_are_refused_with_415(header: str) -> None:
    with pytest.raises(CodecError) as caught:
        codec.request_coding(header)
    assert (caught.value.status, str(caught.value)) == (
        415,
        f"Content-Encoding {header!r} is not supported; send gzip, deflate or identity",
    )


def test_inflate_round_trips_and_stops_at_the_limit() -> None:
    body = orjson.dumps(_body())
    for coding in ("gzip", "deflate"):
        packed = codec.compress(body, coding)
        assert codec.inflate(packed, coding, len(body)) == body
        # either header inflates under either name, as Triton's inflate detects it
        assert codec.inflate(codec.compress(body, "gzip"), coding, len(body)) == body
        with pytest.raises(CodecError) as caught:
            codec.inflate(packed, coding, len(body) - 1)
        assert (caught.value.status, str(caught.value)) == (
            413,
            f"request body decompresses ({coding}) to more than the limit of {len(body) - 1} bytes",
        )
    assert codec.inflate(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 4) == b"abcd"


def test_a_zip_bomb_is_refused_without_inflating_past_the_limit(monkeypatch) -> None:
    bomb = codec.compress(b"\0" * (64 << 20), "gzip")  # 64 MiB of zeros in about 64 KB
    assert len(bomb) < 100_000
    produced: list[int] = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args) -> None:
            self.inner = real(*args)

        def decompress(self, data, max_length=0):
            out = self.inner.decompress(data, max_length)
            produced.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(codec.zlib, "decompressobj", Counting)
    with pytest.raises(CodecError) as caught:
        codec.inflate(bomb, "gzip", 1 << 20)
    assert caught.value.status == 413
    assert sum(produced) == (1 << 20) + 1  # one byte past the limit, never more


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b"not compressed",
            "request body is not valid gzip data (Error -3 while decompressing data: incorrect header check)",
        ),
        # mtime=0: the header holds the time otherwise, and xdist's workers must collect the
        # same test ids
        (gzip.compress(b"x" * 100, mtime=0)[:20], "request body is truncated gzip data"),
        (b"", "request body is truncated gzip data"),
        (
            gzip.compress(b"ab", mtime=0) + b"junk",
            "request body is not valid gzip data (Error -3 while decompressing data: incorrect header check)",
        ),
    ],
)
def test_bad_compressed_bodies(raw: bytes, message: str) -> None:
    with pytest.raises(CodecError) as caught:
        codec.inflate(raw, "gzip", 1000)
    assert (caught.value.status, str(caught.value)) == (400, message)


@pytest.mark.parametrize(
    ("header", "coding"),
    [
        (None, None),
        ("", None),
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("gzip, deflate, br", "gzip"),  # a tie: the first listed
        ("br, deflate", "deflate"),
        ("gzip;q=0.5, deflate;q=0.8", "deflate"),
        ("gzip;q=0.5, identity", None),
        ("gzip;q=0", None),
        ("GZIP; Q=1", "gzip"),
        ("gzip;q=x, deflate;q=0.1", "deflate"),  # malformed: skipped
        ("*", None),  # as Triton: no wildcard
        ("br", None),
    ],
)
def test_response_coding_picks_as_triton(header: str | None, coding: str | None) -> None:
    assert codec.response_coding(header) == coding


def test_compress_writes_what_http_clients_read() -> None:
    body = b'{"outputs": []}' * 50
    assert gzip.decompress(codec.compress(body, "gzip")) == body
    assert zlib.decompress(codec.compress(body, "deflate")) == body  # zlib format, not raw


@settings(deadline=None, database=None, max_examples=300)
@given(raw=st.binary(max_size=300), limit=st.integers(0, 400))
def test_fuzz_inflate(raw: bytes, limit: int) -> None:
    for candidate in (raw, gzip.compress(raw), zlib.compress(raw)[: len(raw) // 2 + 2]):
        try:
            out = codec.inflate(candidate, "gzip", limit)
        except CodecError as e:
            assert e.status in (400, 413) and 0 < len(str(e)) < 300
        else:
            assert len(out) <= limit


# --------------------------------------------------------------------------------------------
# Predict


def test_predict_decodes_rows() -> None:
    x = decode_predict(orjson.dumps({"instances": ROWS}), SIG)
    _check_rows(x)
    np.testing.assert_array_equal(x, np.array(ROWS, np.float32))


BAD_PREDICT = [
    ([ROWS], 'request body must be {"instances": [[feature, ...], ...]}; got a list'),
    (
        {"rows": ROWS},
        "request body must be {\"instances\": [[feature, ...], ...]}; got an object without 'instances'",
    ),
    (
        {"instances": "x"},
        "request body must be {\"instances\": [[feature, ...], ...]}; got 'instances' as a string",
    ),
    ({"instances": []}, "empty batch: 'instances' holds no rows"),
    ({"instances": [ROWS[0]] * 9}, "batch of 9 rows is over the limit of 8"),
    ({"instances": ROWS[0]}, "every instance must be a list of numbers; instances[0] is a float"),
    (
        {"instances": [[1, 2], [3]]},
        "all instances must have the same number of features: instances[0] has 2, instances[1] has 1",
    ),
    ({"instances": [[1, 2, 3]]}, "instances have 3 features per row; model 'mixed' expects 4"),
    (
        {"instances": [[[0.1], [0.2], [0.3], [0.4]]]},
        "instances must hold numbers only (ints or floats for FP32): instances[0][0] is a list ([0.1])",
    ),
    (
        {"instances": [[0, True, 2, 3]]},
        "instances must hold numbers only (ints or floats for FP32): instances[0][1] is a boolean (true)",
    ),
    (
        {"instances": [ROWS[0], [0, 1, "2", 3]]},
        "instances must hold numbers only (ints or floats for FP32): instances[1][2] is a string ('2')",
    ),
    (
        {"instances": [[0, 1, 2, 3], [1e39, 0, 0, 0]]},
        "input holds NaN or infinite values: instances[1][0] = 1e+39 overflows FP32",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_PREDICT, ids=[m[:60] for _, m in BAD_PREDICT])
def test_bad_predict_requests(body, message: str) -> None:
    with pytest.raises(CodecError) as caught:
        decode_predict(orjson.dumps(body), SIG)
    assert (caught.value.status, str(caught.value)) == (400, message)


# --------------------------------------------------------------------------------------------
# Encoding


def _result(n: int = 2) -> dict[str, np.ndarray]:
    logits = np.arange(n * 3, dtype=np.float64).reshape(n, 3) / 7  # float64 in, FP32 out
    return {"logits": logits, "probabilities": np.full((n, 3), 1 / 3, np.float32)}


def test_encode_json_response() -> None:
    request = InferRequest(
        x=np.zeros((2, 4), np.float32),
        outputs=["probabilities", "logits"],
        binary={"probabilities": False, "logits": False},
        id="req-1",
    )
    body, headers = encode_infer("mixed", "1", _result(), request)
    assert headers == {}
    response = json.loads(body)
    assert response["model_name"] == "mixed" and response["model_version"] == "1"
    assert response["id"] == "req-1"
    assert [(o["name"], o["datatype"], o["shape"]) for o in response["outputs"]] == [
        ("probabilities", "FP32", [2, 3]),
        ("logits", "FP32", [2, 3]),
    ]
    np.testing.assert_array_equal(  # orjson writes the shortest float32 repr
        np.array(response["outputs"][1]["data"], np.float32),
        _result()["logits"].astype(np.float32).ravel(),
    )
    no_id = InferRequest(x=request.x, outputs=["logits"], binary={"logits": False}, id=None)
    assert "id" not in json.loads(encode_infer("mixed", "1", _result(), no_id)[0])


def test_binary_outputs_round_trip() -> None:
    body = _body(
        id="r",
        outputs=[
            {"name": "logits", "parameters": {"binary_data": True}},
            {"name": "probabilities"},
        ],
    )
    request = decode_infer(orjson.dumps(body), SIG)
    encoded, headers = encode_infer("mixed", "3", _result(), request)
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(encoded[:length])
    logits, probabilities = header["outputs"]
    assert header["id"] == "r" and header["model_version"] == "3"
    assert logits["parameters"] == {"binary_data_size": 2 * 3 * 4} and "data" not in logits
    np.testing.assert_array_equal(
        np.frombuffer(encoded[length:], "<f4").reshape(logits["shape"]),
        _result()["logits"].astype(np.float32),
    )
    assert len(encoded) == length + 2 * 3 * 4
    np.testing.assert_allclose(probabilities["data"], 1 / 3, rtol=1e-7)


def test_top_classes_as_triton_writes_them() -> None:
    """ "<value>:<index>[:<label>]", best first, the value as C's %f (std::to_string)."""
    scores = np.array([[1.1, 3.3, 0.5, 2.4], [0.25, 0.25, 1e-7, -2.0]], np.float32)
    assert codec.top_classes(scores, 2) == ["3.300000:1", "2.400000:3", "0.250000:0", "0.250000:1"]
    assert codec.top_classes(scores, 9, list("abcd")) == [
        "3.300000:1:b",
        "2.400000:3:d",
        "1.100000:0:a",
        "0.500000:2:c",
        "0.250000:0:a",  # a tie: the lower index first
        "0.250000:1:b",
        "0.000000:2:c",
        "-2.000000:3:d",
    ]
    assert codec.bytes_tensor(["ab", "", "é"]) == b"\2\0\0\0ab\0\0\0\0\2\0\0\0\xc3\xa9"


def test_encode_classification_json_and_binary() -> None:
    result = {"logits": np.array([[0.0, 2.0, 1.0], [5.0, -1.0, 0.5]], np.float32)}
    request = InferRequest(
        x=np.zeros((2, 4), np.float32),
        outputs=["logits"],
        binary={"logits": False},
        id=None,
        classification={"logits": 2},
    )
    body, headers = encode_infer("mixed", "1", result, request, labels=["x", "y", "z"])
    [output] = json.loads(body)["outputs"]
    assert headers == {} and output == {
        "name": "logits",
        "datatype": "BYTES",
        "shape": [2, 2],
        "data": ["2.000000:1:y", "1.000000:2:z", "5.000000:0:x", "0.500000:2:z"],
    }
    request.binary["logits"] = True
    body, headers = encode_infer("mixed", "1", result, request, labels=["x", "y", "z"])
    length = int(headers["Inference-Header-Content-Length"])
    [output] = json.loads(body[:length])["outputs"]
    blob = codec.bytes_tensor(["2.000000:1:y", "1.000000:2:z", "5.000000:0:x", "0.500000:2:z"])
    assert output["parameters"] == {"binary_data_size": len(blob)} and body[length:] == blob


def test_encode_predict() -> None:
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    body = json.loads(encode_predict(probabilities, ["a", "b", "c"]))
    assert [p["label"] for p in body["predictions"]] == ["b", "a"]
    np.testing.assert_allclose(body["predictions"][0]["probabilities"], probabilities[0])


def test_codec_imports_no_web_framework() -> None:
    source = Path(codec.__file__)
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {
        "__future__",
        "collections",
        "dataclasses",
        "itertools",
        "math",
        "typing",
        "zlib",
        "numpy",
        "orjson",
    }, imported


# --------------------------------------------------------------------------------------------
# Fuzz: whatever arrives, a valid request or a CodecError, never anything else
#
# The structured requests are valid field by field nine times in ten, so that a good share of
# them reach the value checks (and about a third are accepted); the tenth is anything JSON holds.

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
edge_values = st.sampled_from(
    [2**63, 2**64 - 1, -(2**63), -129, -1, 256, 65536, 1e39, -1e300, 65504.0, 7e4, 1e-40, 0.5, True]
)
float_values = st.floats(-1e6, 1e6) | st.integers(-300, 300)
int_values = st.integers(0, 127)


def mostly(valid: st.SearchStrategy, junk: st.SearchStrategy = json_values) -> st.SearchStrategy:
    """``valid`` nine times in ten, else ``junk``."""
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda ok: valid if ok else junk)


@st.composite
def tensor_data(draw, n: int) -> object:
    """(About) n x 4 values, flat or nested: numbers, or anything mixed in."""
    element = float_values | int_values
    dirty = element | edge_values | scalars | st.lists(element, max_size=2)
    element = draw(st.sampled_from([element, element, dirty]))
    size = max(n, 0) * 4 + draw(mostly(st.just(0), st.sampled_from([-1, 1])))
    flat = draw(st.lists(element, min_size=max(size, 0), max_size=max(size, 0)))
    if draw(st.booleans()):
        return flat
    return [flat[i : i + 4] for i in range(0, len(flat), 4)]


@st.composite
def infer_requests(draw) -> tuple[bytes, str | None]:
    n = draw(mostly(st.integers(1, SIG.max_rows), st.sampled_from([0, -1, SIG.max_rows + 1])))
    datatype = draw(mostly(st.just("FP32"), st.sampled_from([*OTHER_DATATYPES, "BYTES"])))
    shape = draw(mostly(st.just([n, 4]), st.just([n, 3]) | st.lists(scalars, max_size=3)))
    tensor = {"name": draw(mostly(st.just("input"))), "shape": shape, "datatype": datatype}
    if draw(mostly(st.just(True), st.just(False))):
        tensor["data"] = draw(mostly(tensor_data(n)))
    if draw(st.booleans()):
        tensor["parameters"] = draw(mostly(st.fixed_dictionaries({}, optional={"x": scalars})))
    body: dict = {"inputs": draw(mostly(st.just([tensor]), st.just([tensor, tensor])))}
    flags = st.fixed_dictionaries(
        {},
        optional={
            "binary_data": mostly(st.booleans()),
            "classification": mostly(st.integers(1, 12), st.integers(-2, 0) | scalars),
        },
    )
    output = st.fixed_dictionaries(
        {"name": mostly(st.sampled_from(SIG.outputs))}, optional={"parameters": mostly(flags)}
    )
    optional = {
        "id": mostly(st.text(max_size=5) | st.none()),
        "parameters": mostly(
            st.fixed_dictionaries({}, optional={"binary_data_output": mostly(st.booleans())})
        ),
        "outputs": mostly(st.lists(output, min_size=1, max_size=2)),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    mode = draw(st.sampled_from(["json", "json", "json", "binary", "binary", "header junk"]))
    if mode == "binary" and (datatype == "FP32" or datatype in OTHER_DATATYPES):
        itemsize = np.dtype(OTHER_DATATYPES.get(datatype, np.float32)).itemsize
        size = max(n, 0) * 4 * itemsize
        size = draw(mostly(st.just(size), st.integers(0, size + 8)))
        tensor.pop("data", None)
        tensor["parameters"] = {"binary_data_size": draw(mostly(st.just(size)))}
        header = json.dumps(body).encode()
        blob = draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=size + 2))
        return header + blob, draw(mostly(st.just(str(len(header))), st.just("²")))
    header = json.dumps(body).encode()  # the standard library also writes > 64-bit integers
    if mode == "json":
        return header, None
    length = draw(st.sampled_from([str(len(header)), str(len(header) + 1), "²", "-3", ""]))
    return header + draw(st.binary(max_size=24)), length


def _assert_valid(request: InferRequest) -> None:
    _check_rows(request.x)
    assert request.outputs and len(set(request.outputs)) == len(request.outputs)
    assert set(request.outputs) <= set(SIG.outputs) and set(request.binary) == set(request.outputs)
    assert all(type(flag) is bool for flag in request.binary.values())
    assert request.id is None or type(request.id) is str
    assert set(request.classification) <= set(request.outputs)
    assert all(type(k) is int and k >= 1 for k in request.classification.values())
    body, headers = encode_infer("mixed", "1", _result(len(request.x)), request, labels=list("abc"))
    header = json.loads(body[: int(headers.get("Inference-Header-Content-Length", len(body)))])
    assert [o["name"] for o in header["outputs"]] == request.outputs


@settings(FUZZ, max_examples=250)
@given(
    raw=st.binary(max_size=200),
    header_length=st.none() | st.text("0123456789²-", max_size=4) | st.integers(0, 200).map(str),
)
def test_fuzz_arbitrary_bytes(raw: bytes, header_length: str | None) -> None:
    for decode in (
        lambda: _assert_valid(decode_infer(raw, SIG, header_length=header_length)),
        lambda: _check_rows(decode_predict(raw, SIG)),
    ):
        try:
            decode()
        except CodecError as e:
            assert e.status == 400 and str(e)


@settings(FUZZ, max_examples=300)
@given(request=infer_requests())
def test_fuzz_infer_requests(request: tuple[bytes, str | None]) -> None:
    raw, header_length = request
    try:
        _assert_valid(decode_infer(raw, SIG, header_length=header_length))
    except CodecError as e:
        assert e.status == 400 and 0 < len(str(e)) < 400


@settings(FUZZ, max_examples=250)
@given(
    body=st.one_of(
        st.integers(0, 9).flatmap(
            lambda n: st.fixed_dictionaries({"instances": mostly(tensor_data(n))})
        ),
        st.fixed_dictionaries({"instances": json_values}),
        json_values,
    )
)
def test_fuzz_predict_requests(body) -> None:
    try:
        _check_rows(decode_predict(json.dumps(body).encode(), SIG))
    except CodecError as e:
        assert e.status == 400 and 0 < len(str(e)) < 400
