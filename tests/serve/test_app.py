from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from smartmixed.serve import codec
from smartmixed.serve.app import create_app
from smartmixed.serve.models import LoadError
from smartmixed.serve.settings import ServeSettings


def _client(repository: Path, **settings) -> TestClient:
    return TestClient(create_app(ServeSettings(repository=repository, **settings)))


def _tensor(x: np.ndarray, **extra) -> dict:
    return {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.tolist(),
        **extra,
    }


@pytest.fixture(scope="module")
def client(repository: Path):
    with _client(repository) as c:
        yield c


@pytest.fixture(scope="module")
def rows(digits) -> np.ndarray:
    return digits.x_test[:5]


def test_health_and_server_metadata(client: TestClient) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):  # the status alone, as the spec says
        response = client.get(path)
        assert (response.status_code, response.content) == (200, b"")
        assert response.headers["content-length"] == "0"
    body = client.get("/v2").json()
    assert body["name"] == "smartmixed"
    assert body["extensions"] == [
        "binary_tensor_data",
        "classification",
        "model_repository",
        "model_configuration",
        "statistics",
    ]


def test_model_metadata_config_and_readiness(client: TestClient) -> None:
    meta = client.get("/v2/models/mixed").json()
    assert meta["name"] == "mixed" and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    extra = meta["smartmixed"]
    assert extra["architecture"] == [64, 32, 16, 10] and extra["lowering"] == "permuted"
    assert sum(extra["activation_mix"][0].values()) == 32 and extra["verification"]["passed"]
    assert extra["execution_providers"] == ["CPUExecutionProvider"]
    assert client.get("/v2/models/mixed/versions/1").json()["versions"] == ["1"]
    assert client.get("/v2/models/mixed/ready").json() == {"name": "mixed", "ready": True}
    assert client.get("/v2/models/relu/versions/1/ready").status_code == 200
    config = client.get("/v2/models/relu/config").json()
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert client.get("/v2/models/relu/versions/1/config").json()["name"] == "relu"


def test_infer_nested_flat_and_output_selection(client: TestClient, rows: np.ndarray) -> None:
    nested = client.post("/v2/models/mixed/infer", json={"id": "req-1", "inputs": [_tensor(rows)]})
    assert nested.status_code == 200
    body = nested.json()
    assert body["id"] == "req-1" and body["model_name"] == "mixed" and body["model_version"] == "1"
    assert [(o["name"], o["shape"]) for o in body["outputs"]] == [
        ("logits", [5, 10]),
        ("probabilities", [5, 10]),
    ]
    flat = {**_tensor(rows), "data": rows.ravel().tolist()}
    again = client.post(
        "/v2/models/mixed/versions/1/infer",
        json={"inputs": [flat], "outputs": [{"name": "probabilities"}]},
    ).json()
    assert [o["name"] for o in again["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(again["outputs"][0]["data"], body["outputs"][1]["data"], rtol=1e-6)
    probabilities = np.array(again["outputs"][0]["data"]).reshape(5, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)
    # integer values are numbers like any other for FP32; another declared datatype is refused
    ints = _tensor(rows.astype(np.int64))
    as_ints = client.post("/v2/models/mixed/infer", json={"inputs": [ints]}).json()
    np.testing.assert_allclose(as_ints["outputs"][0]["data"], body["outputs"][0]["data"], rtol=1e-5)
    response = client.post(
        "/v2/models/mixed/infer", json={"inputs": [{**ints, "datatype": "INT64"}]}
    )
    assert (response.status_code, response.json()) == (
        400,
        {"error": "inference input 'input' data-type is 'INT64', but model 'mixed' expects 'FP32'"},
    )


def test_binary_tensor_extension(client: TestClient, rows: np.ndarray) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [5, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    )
    response = client.post(
        "/v2/models/mixed/infer",
        content=header + rows.astype("<f4").tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 200
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 5 * 10 * 4
    logits = np.frombuffer(response.content[length:], "<f4").reshape(5, 10)
    plain = client.post("/v2/models/mixed/infer", json={"inputs": [_tensor(rows)]}).json()
    np.testing.assert_allclose(logits.ravel(), plain["outputs"][0]["data"], rtol=1e-6)


def test_friendly_predict(client: TestClient, rows: np.ndarray, digits) -> None:
    body = client.post("/v1/models/relu:predict", json={"instances": rows.tolist()}).json()
    assert len(body["predictions"]) == 5
    first = body["predictions"][0]
    assert first["label"] in digits.labels and len(first["probabilities"]) == 10
    assert first["label"] == digits.labels[int(np.argmax(first["probabilities"]))]


BAD_INFER = [
    (
        {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0.0] * 127}]},
        400,
        "holds 127 values; shape [2, 64] needs 128",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]},
        400,
        "input has 63 features per row; model 'mixed' expects 64",
    ),
    (
        {"inputs": [{"name": "input", "shape": [64], "datatype": "FP32", "data": [0.0] * 64}]},
        400,
        "input shape [64]: expected [N, 64]",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "BYTES", "data": ["a"] * 64}]},
        400,
        "data-type is 'BYTES', but model 'mixed' expects 'FP32'",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["x"] * 64}]},
        400,
        "must hold numbers only",
    ),
    (
        {"inputs": [{"name": "input", "shape": [0, 64], "datatype": "FP32", "data": []}]},
        400,
        "empty batch",
    ),
    (
        {
            "inputs": [
                {"name": "input", "shape": [2000, 64], "datatype": "FP32", "data": [0] * 128000}
            ]
        },
        400,
        "batch of 2000 rows is over the limit of 1024",
    ),
    (
        {"inputs": [{"name": "images", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]},
        400,
        "unknown input 'images'",
    ),
    (
        {
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}],
            "outputs": [{"name": "scores"}],
        },
        400,
        "unknown output(s) ['scores']",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]},
        400,
        "input needs 'data'",
    ),
    ({"inputs": "nope"}, 400, "'inputs' list"),
    ([1, 2], 400, "'inputs' list"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_INFER, ids=[m for _, _, m in BAD_INFER])
def test_bad_infer_requests(client: TestClient, body, status: int, message: str) -> None:
    response = client.post("/v2/models/mixed/infer", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_bad_requests_outside_the_body(client: TestClient, repository: Path) -> None:
    ok = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
    response = client.post("/v2/models/nope/infer", json=ok)
    assert (response.status_code, response.json()) == (404, {"error": "unknown model 'nope'"})
    response = client.post("/v2/models/mixed/versions/7/infer", json=ok)
    assert response.status_code == 404 and "has no version '7'" in response.json()["error"]
    response = client.post(
        "/v2/models/mixed/infer", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    # the declared content type is not looked at (as in Triton): a body that is not JSON is a 400
    response = client.post(
        "/v2/models/mixed/infer", content=b"a,b", headers={"content-type": "text/csv"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    response = client.post(
        "/v2/models/mixed/infer", content=orjson.dumps(ok), headers={"content-type": "text/csv"}
    )
    assert response.status_code == 200
    nan = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    )
    data = np.full(64, np.nan, np.float32).tobytes()
    response = client.post(
        "/v2/models/mixed/infer",
        content=nan + data,
        headers={"Inference-Header-Content-Length": str(len(nan))},
    )
    assert response.status_code == 400 and "NaN or infinite" in response.json()["error"]
    response = client.post("/v1/models/relu:predict", json={"instances": [[1, 2], [3]]})
    assert response.status_code == 400 and "same number of features" in response.json()["error"]
    assert client.get("/v2/nothing").status_code == 404
    assert client.get("/v2/nothing").json() == {"error": "Not Found"}
    with _client(repository, max_request_bytes=2048) as small:
        response = small.post("/v2/models/mixed/infer", json={**ok, "pad": "x" * 4000})
        assert response.status_code == 413 and "over the limit of 2048" in response.json()["error"]


def test_api_key(repository: Path) -> None:
    with _client(repository, api_key="s3cret") as c:
        ok = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2/health/live").status_code == 200
        assert c.post("/v2/models/mixed/infer", json=ok).status_code == 401
        wrong = c.post("/v2/models/mixed/infer", json=ok, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
        assert (
            c.post(
                "/v2/models/mixed/infer", json=ok, headers={"Authorization": "Bearer s3cret"}
            ).status_code
            == 200
        )
        assert c.get("/v2/models/mixed", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_an_empty_api_key_means_no_key(repository: Path, monkeypatch) -> None:
    """docker-compose passes SMARTMIXED_API_KEY= (empty) by default: that is auth off."""
    monkeypatch.setenv("SMARTMIXED_API_KEY", "")
    assert ServeSettings(repository=repository).api_key is None
    assert ServeSettings(repository=repository, api_key="  ").api_key is None
    ok = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
    with TestClient(create_app(ServeSettings(repository=repository))) as c:
        for headers in ({}, {"Authorization": "Bearer anything"}, {"X-API-Key": ""}):
            assert c.post("/v2/models/mixed/infer", json=ok, headers=headers).status_code == 200


def test_bad_repository_entries(repository: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(repository, models)
    (models / "broken" / "1").mkdir(parents=True)
    (models / "broken" / "1" / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(LoadError, match="broken/1: cannot read"), _client(models):
        pass
    with _client(models, skip_bad_models=True) as c:
        assert c.get("/v2/models/mixed/ready").status_code == 200
        broken = c.get("/v2/models/broken/ready")
        assert broken.status_code == 503 and broken.json()["ready"] is False
        ok = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
        response = c.post("/v2/models/broken/infer", json=ok)
        assert response.status_code == 503 and "not ready" in response.json()["error"]


def test_devices(repository: Path, caplog) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the CPU-only paths are not testable here")
    with (
        pytest.raises(LoadError, match="CUDAExecutionProvider is not in this onnxruntime build"),
        _client(repository, device="cuda"),
    ):
        pass
    with _client(repository, device="auto") as c:
        assert c.get("/v2/models/mixed").json()["smartmixed"]["execution_providers"] == [
            "CPUExecutionProvider"
        ]


def _samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    """Every sample /metrics exports: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
    }


def test_metrics(repository: Path) -> None:
    """Samples with values, on an app of its own: its registry starts with no relu samples."""
    one_row = {
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]
    }
    with _client(repository) as client:
        # Triton's nv_* families list every version loaded, at 0 (test_statistics.py)
        assert not [
            key
            for key in _samples(client)
            if ("model", "relu") in key[1] and not key[0].startswith("nv_")
        ]
        assert client.post("/v2/models/relu/infer", json=one_row).status_code == 200
        assert client.post("/v2/models/relu/infer", json={"inputs": []}).status_code == 400
        samples = _samples(client)
    relu = (("model", "relu"),)
    infer = (("endpoint", "infer"), ("model", "relu"))
    assert samples[("smartmixed_requests_total", (*infer, ("status", "200")))] == 1.0
    assert samples[("smartmixed_requests_total", (*infer, ("status", "400")))] == 1.0
    assert samples[("smartmixed_request_seconds_count", infer)] == 2.0
    assert samples[("smartmixed_inference_seconds_count", relu)] == 1.0  # the 400 never ran
    assert samples[("smartmixed_batch_rows_count", relu)] == 1.0
    assert samples[("smartmixed_batch_rows_sum", relu)] == 1.0
    assert samples[("smartmixed_queue_wait_seconds_count", relu)] == 1.0
    assert samples[("smartmixed_in_flight", relu)] == 0.0


HEAD_PATHS = (
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/mixed",
    "/v2/models/mixed/versions/1",
    "/v2/models/mixed/ready",
    "/v2/models/mixed/versions/1/ready",
    "/v2/models/mixed/config",
    "/v2/models/mixed/versions/1/config",
    "/metrics",
)


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_head_answers_like_get_without_a_body(client: TestClient, path: str) -> None:
    head, get = client.head(path), client.get(path)
    assert (head.status_code, head.content, get.status_code) == (200, b"", 200)
    assert head.headers.get("content-type") == get.headers.get("content-type")  # health: none
    if path != "/metrics":  # its counters move between the two requests
        assert head.headers["content-length"] == str(len(get.content))


def test_openapi_docs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v2/models/{model_name}/infer" in schema["paths"]
    assert list(schema["paths"]["/v2/models/{model_name}"]) == ["get"]  # HEAD: not an operation
    assert client.get("/docs").status_code == 200


def test_openapi_json_is_rendered_once(repository: Path, monkeypatch) -> None:
    """Open without a key, /openapi.json was the costliest answer to pipeline: FastAPI renders
    the schema on every request. It is rendered on the first and its bytes served after."""
    app = create_app(ServeSettings(repository=repository))
    schema, calls = app.openapi(), []
    monkeypatch.setattr(app, "openapi", lambda: calls.append(1) or schema)
    with TestClient(app) as c:
        answers = [c.get("/openapi.json") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(a.json() == schema for a in answers)
    assert answers[0].headers["content-type"] == "application/json"
    assert len(calls) == 1


def test_large_bodies_are_converted_a_slice_at_a_time(
    client: TestClient, digits, monkeypatch
) -> None:
    """A large body is decoded in a thread beside the event loop; each numpy conversion holds
    the GIL throughout, so none takes more than SLICE_VALUES values (the loop waits for at most
    one). The rows are the same as converted whole, flat or nested."""
    x = np.repeat(digits.x_test[:4], 300, axis=0)[:1024]  # (1024, 64): 65,536 values
    largest, array = [], np.array

    def recording_array(values, *args, **kwargs):
        if isinstance(values, list):
            largest.append(sum(len(v) if isinstance(v, list) else 1 for v in values))
        return array(values, *args, **kwargs)

    monkeypatch.setattr(codec.np, "array", recording_array)
    for data in (x.tolist(), x.ravel().tolist()):
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}
        answer = client.post("/v2/models/mixed/infer", json={"inputs": [tensor]})
        assert answer.status_code == 200, answer.text
        logits = np.array(answer.json()["outputs"][0]["data"]).reshape(len(x), -1)
        expected = client.post("/v2/models/mixed/infer", json={"inputs": [_tensor(x[:4])]})
        np.testing.assert_allclose(
            logits[:4], np.array(expected.json()["outputs"][0]["data"]).reshape(4, -1), atol=1e-6
        )
    assert largest and max(largest) <= codec.SLICE_VALUES


def test_a_chunked_body_is_read_whole(client: TestClient, rows: np.ndarray) -> None:
    """No Content-Length: the body grows as it comes, up to the route's limit."""
    body = json.dumps({"inputs": [_tensor(rows)]}).encode()
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    answer = client.post(
        "/v2/models/mixed/infer",
        content=iter(chunks),
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["shape"] == [len(rows), 10]


def test_not_ready_until_the_lifespan_has_loaded_the_models(repository: Path) -> None:
    c = _client(repository)  # no `with`: the lifespan has not run, nothing is loaded
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 503
    response = c.post("/v2/models/mixed/infer", json={"inputs": []})
    assert (response.status_code, response.json()) == (503, {"error": "server is not ready"})


def test_config_pbtxt_batching_values_are_honoured(
    repository: Path, tmp_path: Path, digits
) -> None:
    models = tmp_path / "models"
    shutil.copytree(repository, models)
    config = models / "mixed" / "config.pbtxt"
    text = config.read_text()
    assert "max_batch_size: 1024" in text and "dynamic_batching { }" in text  # no delay stated
    with _client(models, max_batch_delay_ms=3) as client:  # so the server's own applies
        delay = client.get("/v2/models/mixed/config").json()["dynamic_batching"]
        assert delay["max_queue_delay_microseconds"] == 3000
    config.write_text(
        text.replace("max_batch_size: 1024", "max_batch_size: 4").replace(
            "dynamic_batching { }", "dynamic_batching { max_queue_delay_microseconds: 250 }"
        )
    )
    (models / "relu" / "config.pbtxt").write_text(
        (models / "relu" / "config.pbtxt").read_text().split("dynamic_batching")[0]
    )
    with _client(models, max_batch_size=32) as client:
        mixed = client.get("/v2/models/mixed/config").json()
        assert mixed["max_batch_size"] == 4 and mixed["config_file"] == str(config)
        assert mixed["dynamic_batching"] == {
            "max_batch_size": 4,
            "max_queue_delay_microseconds": 250,
        }
        assert "dynamic_batching" not in client.get("/v2/models/relu/config").json()  # no block
        x = digits.x_test[:5]
        response = client.post("/v2/models/mixed/infer", json={"inputs": [_tensor(x)]})
        assert response.status_code == 400 and "over the limit of 4" in response.json()["error"]
        assert (
            client.post("/v2/models/mixed/infer", json={"inputs": [_tensor(x[:4])]}).status_code
            == 200
        )
