"""The Open Inference Protocol as Triton speaks it, over REST, in process: raw binary requests,
the classification extension, gzip / deflate bodies both ways, any content type for a JSON
body, the model's datatype only, empty health bodies and the extensions ``/v2`` lists.

tritonclient.http runs here with its own request building and response parsing (compression
included); only its socket is replaced by the in-process client (``TritonOverTestClient``).
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from smartmixed.serve.app import create_app
from smartmixed.serve.settings import ServeSettings

RAW = {"Inference-Header-Content-Length": "0"}


@pytest.fixture(scope="module")
def client(repository: Path):
    with TestClient(create_app(ServeSettings(repository=repository))) as c:
        # httpx asks for gzip answers by default; here every test says what it accepts
        del c.headers["accept-encoding"]
        yield c


@pytest.fixture(scope="module")
def rows(digits) -> np.ndarray:
    return digits.x_test[:5].astype(np.float32)  # (5, 64)


@pytest.fixture(scope="module")
def labels(client: TestClient) -> list[str]:
    return client.get("/v2/models/mixed").json()["smartmixed"]["labels"]


def _infer_body(x: np.ndarray, **extra) -> dict:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
    return {"inputs": [tensor], **extra}


def _outputs(client: TestClient, x: np.ndarray) -> dict[str, np.ndarray]:
    """The plain JSON answer's outputs, (N, 10) each."""
    answer = client.post("/v2/models/mixed/infer", json=_infer_body(x))
    assert answer.status_code == 200, answer.text
    return {
        o["name"]: np.array(o["data"], np.float32).reshape(o["shape"])
        for o in answer.json()["outputs"]
    }


def _error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


def _split(response: httpx.Response) -> tuple[dict, bytes]:
    """A binary-extension answer: its JSON header and the bytes after it."""
    length = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:length]), response.content[length:]


# ---- raw binary requests ---------------------------------------------------------------------


def test_a_raw_binary_request_is_one_row_and_answers_binary(client: TestClient, rows) -> None:
    """Triton's raw binary request: Inference-Header-Content-Length 0, the body is the input's
    bytes; the model's config gives datatype and dims, the batch is 1, every output binary."""
    response = client.post(
        "/v2/models/mixed/infer", content=rows[0].astype("<f4").tobytes(), headers=RAW
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header, blob = _split(response)
    assert header["model_name"] == "mixed" and "id" not in header
    assert [(o["name"], o["datatype"], o["shape"], o["parameters"]) for o in header["outputs"]] == [
        ("logits", "FP32", [1, 10], {"binary_data_size": 40}),
        ("probabilities", "FP32", [1, 10], {"binary_data_size": 40}),
    ]
    expected = _outputs(client, rows[:1])
    got = np.frombuffer(blob, "<f4").reshape(2, 1, 10)
    np.testing.assert_allclose(got[0], expected["logits"], rtol=1e-6)
    np.testing.assert_allclose(got[1], expected["probabilities"], rtol=1e-6)


@pytest.mark.parametrize(("n_bytes", "got"), [(512, 512), (255, 255), (0, 0)])
def test_a_raw_binary_request_must_hold_one_row(client: TestClient, n_bytes: int, got: int) -> None:
    response = client.post("/v2/models/mixed/infer", content=b"\0" * n_bytes, headers=RAW)
    assert _error(response) == (
        400,
        f"input byte size mismatch for input 'input' for model 'mixed'. Expected 256, got {got} "
        "(a raw binary request, Inference-Header-Content-Length: 0, is one row of [1, 64] FP32)",
    )


def test_a_raw_binary_request_with_nan_is_refused(client: TestClient) -> None:
    row = np.zeros(64, "<f4")
    row[7] = np.nan
    response = client.post("/v2/models/mixed/infer", content=row.tobytes(), headers=RAW)
    assert _error(response) == (400, "input holds NaN or infinite values: raw input[0][7] = nan")


# ---- classification ----------------------------------------------------------------------------


def _expected_classes(scores: np.ndarray, k: int, labels: list[str]) -> list[str]:
    """Triton's strings for the top k of each row, computed here independently of the codec."""
    strings = []
    for row in scores:
        for i in sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]:
            strings.append(f"{row[i]:f}:{i}:{labels[i]}")
    return strings


def test_classification_answers_the_top_k_as_bytes(client: TestClient, rows, labels) -> None:
    body = _infer_body(
        rows,
        outputs=[
            {"name": "probabilities", "parameters": {"classification": 3}},
            {"name": "logits"},
        ],
    )
    response = client.post("/v2/models/mixed/infer", json=body)
    assert response.status_code == 200, response.text
    classes, logits = response.json()["outputs"]
    expected = _outputs(client, rows)
    assert (classes["name"], classes["datatype"], classes["shape"]) == (
        "probabilities",
        "BYTES",
        [5, 3],
    )
    assert classes["data"] == _expected_classes(expected["probabilities"], 3, labels)
    assert logits["datatype"] == "FP32" and logits["shape"] == [5, 10]
    # the first class of each row is the predicted label
    assert [s.split(":")[2] for s in classes["data"][::3]] == [
        labels[i] for i in expected["probabilities"].argmax(1)
    ]


def test_classification_as_binary_data_and_more_classes_than_the_model_has(
    client: TestClient, rows, labels
) -> None:
    """binary_data for BYTES: each element a 4-byte length, then its bytes; K above the class
    count answers every class (Triton's min(K, C))."""
    body = _infer_body(
        rows[:2],
        outputs=[{"name": "logits", "parameters": {"classification": 50, "binary_data": True}}],
    )
    response = client.post("/v2/models/mixed/infer", json=body)
    assert response.status_code == 200, response.text
    header, blob = _split(response)
    [output] = header["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [2, 10])
    assert output["parameters"] == {"binary_data_size": len(blob)}
    strings, at = [], 0
    while at < len(blob):
        size = int.from_bytes(blob[at : at + 4], "little")
        strings.append(blob[at + 4 : at + 4 + size].decode())
        at += 4 + size
    assert strings == _expected_classes(_outputs(client, rows[:2])["logits"], 10, labels)


@pytest.mark.parametrize(
    ("k", "shown"), [(0, "0"), (-1, "-1"), (1.5, "1.5"), ("2", "'2'"), (True, "true")]
)
def test_classification_needs_a_positive_integer(client: TestClient, rows, k, shown: str) -> None:
    body = _infer_body(
        rows[:1], outputs=[{"name": "probabilities", "parameters": {"classification": k}}]
    )
    response = client.post("/v2/models/mixed/infer", json=body)
    assert _error(response) == (
        400,
        "'outputs[0].parameters.classification' must be a positive integer (the number of top "
        f"classes to answer); got {shown}",
    )


# ---- gzip / deflate ----------------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_compressed_request_bodies(client: TestClient, rows, coding: str) -> None:
    packed = gzip.compress if coding == "gzip" else zlib.compress
    expected = _outputs(client, rows)
    response = client.post(
        "/v2/models/mixed/infer",
        content=packed(orjson.dumps(_infer_body(rows))),
        headers={"Content-Encoding": coding, "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        response.json()["outputs"][1]["data"], expected["probabilities"].ravel(), rtol=1e-6
    )
    # the binary extension: the header length counts the decompressed body
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [5, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ]
        }
    )
    response = client.post(
        "/v2/models/mixed/infer",
        content=packed(header + rows.astype("<f4").tobytes()),
        headers={"Content-Encoding": coding, "Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    # a raw binary request, and predict
    response = client.post(
        "/v2/models/mixed/infer",
        content=packed(rows[0].astype("<f4").tobytes()),
        headers={"Content-Encoding": coding, **RAW},
    )
    assert response.status_code == 200, response.text
    response = client.post(
        "/v1/models/mixed:predict",
        content=packed(orjson.dumps({"instances": rows.tolist()})),
        headers={"Content-Encoding": coding},
    )
    assert response.status_code == 200 and len(response.json()["predictions"]) == 5


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_answers_compressed_when_asked(client: TestClient, rows, coding: str) -> None:
    plain = client.post("/v2/models/mixed/infer", json=_infer_body(rows))
    assert "content-encoding" not in plain.headers
    unpack = gzip.decompress if coding == "gzip" else zlib.decompress
    for path, body in (
        ("/v2/models/mixed/infer", _infer_body(rows)),
        ("/v1/models/mixed:predict", {"instances": rows.tolist()}),
    ):
        with client.stream(
            "POST", path, json=body, headers={"Accept-Encoding": f"br;q=1, {coding};q=0.9"}
        ) as response:
            raw = b"".join(response.iter_raw())
        assert response.status_code == 200
        assert response.headers["content-encoding"] == coding
        assert response.headers["content-length"] == str(len(raw))
        answer = json.loads(unpack(raw))
        if path.endswith("infer"):
            assert answer == plain.json()


def test_a_binary_answer_compressed_keeps_the_uncompressed_header_length(
    client: TestClient, rows
) -> None:
    body = _infer_body(rows, parameters={"binary_data_output": True})
    plain = client.post("/v2/models/mixed/infer", json=body)
    with client.stream(
        "POST", "/v2/models/mixed/infer", json=body, headers={"Accept-Encoding": "gzip"}
    ) as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert (
        response.headers["inference-header-content-length"]
        == plain.headers["inference-header-content-length"]
    )
    assert gzip.decompress(raw) == plain.content


def test_an_unknown_content_encoding_is_415(client: TestClient, rows) -> None:
    response = client.post(
        "/v2/models/mixed/infer",
        content=orjson.dumps(_infer_body(rows)),
        headers={"Content-Encoding": "br"},
    )
    assert _error(response) == (
        415,
        "Content-Encoding 'br' is not supported; send gzip, deflate or identity",
    )
    response = client.post(
        "/v2/models/mixed/infer",
        content=orjson.dumps(_infer_body(rows)),
        headers={"Content-Encoding": "identity"},
    )
    assert response.status_code == 200


def test_bad_compressed_bodies_are_400(client: TestClient, rows) -> None:
    response = client.post(
        "/v2/models/mixed/infer", content=b"{not gzip}", headers={"Content-Encoding": "gzip"}
    )
    assert _error(response) == (
        400,
        "request body is not valid gzip data (Error -3 while decompressing data: incorrect header check)",
    )
    truncated = gzip.compress(orjson.dumps(_infer_body(rows)))[:-30]
    response = client.post(
        "/v2/models/mixed/infer", content=truncated, headers={"Content-Encoding": "gzip"}
    )
    assert _error(response) == (400, "request body is truncated gzip data")


def test_a_zip_bomb_is_413_and_holds_nothing(repository: Path) -> None:
    """8 MiB of JSON whitespace in about 8 KB of gzip, against a 1 MiB limit: 413 once
    decompression passes the limit; the body budget is whole again after."""
    bomb = gzip.compress(b"{" + b" " * (8 << 20) + b"}")
    assert len(bomb) < 20_000
    with TestClient(
        create_app(ServeSettings(repository=repository, max_request_bytes=1 << 20))
    ) as c:
        for path in ("/v2/models/mixed/infer", "/v1/models/mixed:predict"):
            response = c.post(path, content=bomb, headers={"Content-Encoding": "gzip"})
            assert _error(response) == (
                413,
                "request body decompresses (gzip) to more than the limit of 1048576 bytes",
            )
        assert c.app.state.service.body_bytes == 0
        assert c.get("/v2/health/live").status_code == 200


def test_decompressed_bodies_count_against_the_body_budget(repository: Path, rows) -> None:
    """An admitted request holds its decompressed size: when the bodies other requests hold
    leave room for the compressed body but not for what it inflates to, 503."""
    body = orjson.dumps(_infer_body(rows)) + b" " * 200_000  # about 2 KB compressed
    packed = gzip.compress(body)
    budget = 1 << 20
    settings = ServeSettings(
        repository=repository, max_request_bytes=budget, max_body_bytes_in_flight=budget
    )
    with TestClient(create_app(settings)) as c:
        service = c.app.state.service
        held = service.body_bytes = budget - len(packed) - 1000  # as if others were in flight
        response = c.post(
            "/v2/models/mixed/infer", content=packed, headers={"Content-Encoding": "gzip"}
        )
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"] == (
            f"request bodies being received or answered would exceed {budget} bytes "
            "(max_body_bytes_in_flight) once decompressed; retry later"
        )
        assert service.body_bytes == held
        service.body_bytes = 0
        response = c.post(
            "/v2/models/mixed/infer", content=packed, headers={"Content-Encoding": "gzip"}
        )
        assert response.status_code == 200 and service.body_bytes == 0


# ---- tritonclient.http ---------------------------------------------------------------------------


class _Answer:
    """What tritonclient reads of a geventhttpclient response: status, headers, read()."""

    def __init__(self, response: httpx.Response, raw: bytes) -> None:
        self.status_code, self.headers, self.raw, self.at = (
            response.status_code,
            response.headers,
            raw,
            0,
        )

    def get(self, name: str, default=None):
        return self.headers.get(name, default)

    def read(self, length: int = -1) -> bytes:
        end = len(self.raw) if length < 0 else self.at + length
        chunk, self.at = self.raw[self.at : end], min(end, len(self.raw))
        return chunk


class TritonOverTestClient:
    """tritonclient.http's transport (its ``_client_stub``) over the in-process client: the bytes
    tritonclient writes go to the app as they are, the bytes the app answers come back raw."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def get(self, request_uri: str, headers=None) -> _Answer:
        return self._send("GET", request_uri, None, headers)

    def post(self, request_uri: str, body=b"", headers=None) -> _Answer:
        return self._send("POST", request_uri, body, headers)

    def close(self) -> None:  # the TestClient is closed by its own fixture
        pass

    def _send(self, method: str, uri: str, body, headers) -> _Answer:
        headers = {k: str(v) for k, v in (headers or {}).items()}
        with self.client.stream(method, "/" + uri.lstrip("/"), content=body, headers=headers) as r:
            return _Answer(r, b"".join(r.iter_raw()))


@pytest.fixture(scope="module")
def triton_client(client: TestClient) -> triton.InferenceServerClient:
    tc = triton.InferenceServerClient("127.0.0.1:1")  # connects lazily: never, here
    tc._client_stub = TritonOverTestClient(client)
    return tc


@pytest.mark.parametrize("request_coding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("response_coding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_compression_both_ways(
    triton_client, client: TestClient, rows, request_coding, response_coding, binary: bool
) -> None:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    result = triton_client.infer(
        "mixed",
        [tensor],
        outputs=[triton.InferRequestedOutput("logits", binary_data=binary)],
        request_compression_algorithm=request_coding,
        response_compression_algorithm=response_coding,
    )
    response = result.get_response()
    assert response["model_name"] == "mixed"
    np.testing.assert_allclose(
        result.as_numpy("logits"), _outputs(client, rows)["logits"], rtol=1e-6
    )


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_classification(
    triton_client, client: TestClient, rows, labels, binary: bool
) -> None:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    result = triton_client.infer(
        "mixed",
        [tensor],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)],
        response_compression_algorithm="gzip",
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (5, 2)
    expected = _expected_classes(_outputs(client, rows)["probabilities"], 2, labels)
    got = [c.decode() if isinstance(c, bytes) else c for c in classes.ravel()]
    assert got == expected


def test_tritonclient_health_and_metadata(triton_client) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.get_server_metadata()["extensions"][:2] == [
        "binary_tensor_data",
        "classification",
    ]


def test_tritonclient_wrong_datatype(triton_client, rows) -> None:
    tensor = triton.InferInput("input", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows.astype(np.float64))
    with pytest.raises(triton.InferenceServerException) as caught:
        triton_client.infer("mixed", [tensor])
    assert caught.value.message() == (
        "inference input 'input' data-type is 'FP64', but model 'mixed' expects 'FP32'"
    )
    assert caught.value.status() == "400"


# ---- content types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "application/x-www-form-urlencoded",  # curl -d
        "text/plain; charset=utf-8",
        "text/csv",
        "application/octet-stream",
        "multipart/form-data; boundary=x",
        "image/png",
    ],
)
def test_any_content_type_for_a_json_body(client: TestClient, rows, content_type) -> None:
    """As Triton: the declared type is not looked at; the body is JSON (or the binary extension
    where Inference-Header-Content-Length says so)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path, body in (
        ("/v2/models/mixed/infer", _infer_body(rows)),
        ("/v1/models/mixed:predict", {"instances": rows.tolist()}),
    ):
        response = client.post(path, content=orjson.dumps(body), headers=headers)
        assert response.status_code == 200, response.text
    response = client.post("/v2/models/mixed/infer", content=b"a,b\n1,2", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"].startswith("request body is not valid JSON (")


def test_the_binary_header_only_where_binary_data_is_taken(client: TestClient, rows) -> None:
    body = orjson.dumps({"instances": rows.tolist()})
    response = client.post(
        "/v1/models/mixed:predict",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(body))},
    )
    assert _error(response) == (
        400,
        "Inference-Header-Content-Length (binary tensor data) is for inference requests; this "
        "route takes a JSON body",
    )


# ---- the model's datatype only --------------------------------------------------------------


@pytest.mark.parametrize("datatype", ["INT32", "FP64", "FP16", "UINT8", "BYTES", "BOOL", "fp32"])
def test_the_declared_datatype_must_be_the_models(client: TestClient, rows, datatype: str) -> None:
    message = f"inference input 'input' data-type is '{datatype}', but model 'mixed' expects 'FP32'"
    as_ints = rows.astype(np.int32)
    body = {
        "inputs": [
            {"name": "input", "shape": [5, 64], "datatype": datatype, "data": as_ints.tolist()}
        ]
    }
    assert _error(client.post("/v2/models/mixed/infer", json=body)) == (400, message)
    # binary: the bytes of that type, which a server converting types would have taken
    blob = as_ints.astype(np.float64 if datatype == "FP64" else np.int32).tobytes()
    del body["inputs"][0]["data"]
    body["inputs"][0]["parameters"] = {"binary_data_size": len(blob)}
    header = orjson.dumps(body)
    response = client.post(
        "/v2/models/mixed/infer",
        content=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert _error(response) == (400, message)


# ---- health and server metadata ------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
def test_health_is_the_status_alone(
    client: TestClient, repository: Path, method: str, path: str
) -> None:
    response = client.request(method, path)
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["content-length"] == "0" and "content-type" not in response.headers
    loading = TestClient(create_app(ServeSettings(repository=repository)))  # no lifespan: not ready
    response = loading.request(method, path)
    assert (response.status_code, response.content) == (200 if path.endswith("live") else 503, b"")
    assert response.headers["content-length"] == "0"


def test_server_metadata_lists_the_extensions_that_work(client: TestClient) -> None:
    assert client.get("/v2").json()["extensions"] == [
        "binary_tensor_data",
        "classification",
        "model_repository",
        "model_configuration",
        "statistics",
    ]
