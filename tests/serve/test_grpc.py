"""The gRPC endpoint (inference.GRPCInferenceService): its declaration against Triton's, and a
real ``smartmixed-serve`` process driven by tritonclient.grpc and a raw grpc channel."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from fastapi.testclient import TestClient
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub
from tritonclient.utils import InferenceServerException

from smartmixed.serve import grpc_service_pb2 as ours_pb2
from smartmixed.serve.app import create_app
from smartmixed.serve.cli import main as serve_main
from smartmixed.serve.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py")


# --------------------------------------------------------------------------------------------
# The declaration


def test_generated_modules_are_what_make_proto_writes(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools missing: pip install -e '.[dev]'")
    if shutil.which("make") is None:
        pytest.skip("make missing")
    result = subprocess.run(
        ["make", "-s", "proto", f"PROTO_OUT={tmp_path}", f"BIN={Path(sys.executable).parent}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (ROOT / "serve" / name).read_bytes(), (
            f"serve/{name} is not what `make proto` writes from serve/grpc_service.proto"
        )


def _fields(message) -> dict[str, tuple]:
    def kind(f) -> str | None:
        named = f.message_type or f.enum_type
        if named is None:
            return None
        if named.GetOptions().map_entry:  # map<K, V>: compare the key and value types
            return "map:" + ",".join(str(_fields(named)[k]) for k in ("key", "value"))
        return named.full_name

    return {
        f.name: (
            f.number,
            f.type,
            f.is_repeated,
            kind(f),
            f.containing_oneof.name if f.containing_oneof else None,
        )
        for f in message.fields
    }


def test_service_and_messages_are_tritons() -> None:
    """Every RPC, message and field of serve/grpc_service.proto is Triton's (name, number, type,
    label, oneof) but ModelConfigResponse.config, bytes on our side (the same wire bytes)."""
    ours = ours_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert len(ours.methods) == 11
    pending = []
    for method in ours.methods:
        their = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            their.input_type.full_name,
            their.output_type.full_name,
        )
        assert not their.server_streaming and not their.client_streaming
        pending += [method.input_type, method.output_type]
    seen = set()
    while pending:
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        their = triton_pb2.DESCRIPTOR.pool.FindMessageTypeByName(message.full_name)
        expected = _fields(their)
        if message.full_name == "inference.ModelConfigResponse":
            config = their.fields_by_name["config"]
            assert config.message_type.full_name == "inference.ModelConfig"
            expected["config"] = (1, config.TYPE_BYTES, False, None, None)
        assert _fields(message) == expected, message.full_name
        pending += [f.message_type for f in message.fields if f.message_type]
    assert len(seen) > 30
    # a pool of its own: importing tritonclient.grpc beside it (as here) works
    assert ours_pb2.DESCRIPTOR.pool is not triton_pb2.DESCRIPTOR.pool


# --------------------------------------------------------------------------------------------
# A real server: tritonclient.grpc against the same process's REST answers

KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_REQUEST_BYTES = 64 * 1024
ROWS = 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(server_starter, repository: Path) -> Iterator:
    """One process for the module: an API key, explicit model control (load/unload work), a
    small message limit (the oversize test), gRPC on a free port."""
    grpc_port = _free_port()
    process = server_starter(
        repository,
        "--grpc-port",
        str(grpc_port),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "mixed",
        "--load-model",
        "relu",
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--log-level",
        "warning",
        env={"SMARTMIXED_API_KEY": KEY},
    )
    process.grpc = f"127.0.0.1:{grpc_port}"
    try:
        yield process
    finally:
        process.proc.kill()
        process.proc.wait()


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(server.grpc)
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(server):
    """A plain grpc channel (its stub is tritonclient's generated one)."""
    with grpc.insecure_channel(server.grpc) as channel:
        yield channel


def _rest(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(
        method, f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"}, **kwargs
    )


def _infer(client, x: np.ndarray, *, datatype: str = "FP32", model: str = "mixed", **kwargs):
    tensor = triton.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], headers=AUTH, **kwargs)


def _refused(call, code: str, message: str, client) -> None:
    """``call()`` fails with ``code`` and exactly ``message``; the server is still alive."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert (caught.value.status(), caught.value.message()) == (f"StatusCode.{code}", message)
    assert client.is_server_live()


def test_health_metadata_and_config(server, client) -> None:
    assert client.is_server_live() and client.is_server_ready()  # open: no key
    assert client.is_model_ready("mixed", headers=AUTH)
    assert client.is_model_ready("relu", "1", headers=AUTH)
    metadata = client.get_server_metadata(headers=AUTH, as_json=True)
    rest = _rest(server, "GET", "/v2").json()
    assert metadata == {
        "name": "smartmixed",
        "version": rest["version"],
        "extensions": rest["extensions"],
    }
    for version in ("", "1"):
        model = client.get_model_metadata("mixed", version, headers=AUTH, as_json=True)
        assert model == {
            "name": "mixed",
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}],
            "outputs": [
                {"name": name, "datatype": "FP32", "shape": ["-1", "10"]}
                for name in ("logits", "probabilities")
            ],
        }
    rest = _rest(server, "GET", "/v2/models/relu/config").json()
    for version in ("", "1"):
        config = client.get_model_config("relu", version, headers=AUTH).config
        assert (config.name, config.platform, config.backend) == (
            "relu",
            rest["platform"],
            "onnxruntime",
        )
        assert config.max_batch_size == rest["max_batch_size"]
        assert [(t.name, list(t.dims)) for t in config.input] == [("input", [64])]
        assert [(t.name, list(t.dims)) for t in config.output] == [
            (o["name"], o["dims"]) for o in rest["output"]
        ]
        assert config.input[0].data_type == model_config_pb2.TYPE_FP32
        assert (
            config.dynamic_batching.max_queue_delay_microseconds
            == (rest["dynamic_batching"]["max_queue_delay_microseconds"])
        )


def test_infer_raw_and_typed_contents_match_rest(server, client, channel, digits) -> None:
    x = digits.x_test[:ROWS].astype(np.float32)
    body = {
        "id": "r1",
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
    }
    rest = {
        o["name"]: np.array(o["data"], np.float32).reshape(o["shape"])
        for o in _rest(server, "POST", "/v2/models/mixed/infer", json=body).json()["outputs"]
    }

    # raw_input_contents (tritonclient's way), the outputs asked for in an order of our own
    outputs = [triton.InferRequestedOutput(name) for name in ("probabilities", "logits")]
    result = _infer(client, x, outputs=outputs, request_id="g1")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("mixed", "1", "g1")
    assert [o.name for o in response.outputs] == ["probabilities", "logits"]
    for name in ("logits", "probabilities"):
        np.testing.assert_allclose(result.as_numpy(name), rest[name], rtol=1e-6, atol=1e-7)

    # typed contents (fp32_contents), through tritonclient's generated stub on a plain channel
    request = triton_pb2.ModelInferRequest(model_name="mixed", model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="logits")
    typed = GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=tuple(AUTH.items()))
    assert [(o.name, o.datatype, list(o.shape)) for o in typed.outputs] == [
        ("logits", "FP32", [ROWS, 10])
    ]
    logits = np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(ROWS, 10)
    np.testing.assert_allclose(logits, rest["logits"], rtol=1e-6, atol=1e-7)

    # classification: the top 3 classes of each row, as Triton writes them
    top = _infer(client, x, outputs=[triton.InferRequestedOutput("probabilities", class_count=3)])
    classes = top.as_numpy("probabilities")
    assert classes.shape == (ROWS, 3)
    assert [int(c.split(b":")[1]) for c in classes[:, 0]] == rest["probabilities"].argmax(
        1
    ).tolist()


def test_statistics_metrics_index_load_and_unload(server, client) -> None:
    def success(name: str) -> tuple[int, int]:
        stats = client.get_inference_statistics(name, headers=AUTH).model_stats
        assert [(s.name, s.version) for s in stats] == [(name, "1")]
        return stats[0].inference_stats.success.count, stats[0].inference_count

    before = success("relu")
    _infer(client, np.zeros((3, 64), np.float32), model="relu")
    assert success("relu") == (before[0] + 1, before[1] + 3)
    rest = _rest(server, "GET", "/v2/models/relu/stats").json()["model_stats"][0]
    assert (rest["inference_stats"]["success"]["count"], rest["inference_count"]) == success("relu")
    metrics = _rest(server, "GET", "/metrics").text
    assert 'smartmixed_requests_total{endpoint="grpc",model="relu",status="200"}' in metrics

    def index() -> list[tuple[str, str, str]]:
        models = client.get_model_repository_index(headers=AUTH).models
        return [(m.name, m.version, m.state) for m in models]

    assert index() == [("mixed", "1", "READY"), ("relu", "1", "READY")]
    client.unload_model("relu", headers=AUTH)
    assert index() == [("mixed", "1", "READY"), ("relu", "", "UNAVAILABLE")]
    _refused(
        lambda: _infer(client, np.zeros((1, 64), np.float32), model="relu"),
        "NOT_FOUND",
        "model 'relu' is not loaded",
        client,
    )
    client.load_model("relu", headers=AUTH)
    assert client.is_model_ready("relu", headers=AUTH)
    assert index() == [("mixed", "1", "READY"), ("relu", "1", "READY")]


def test_bad_requests_get_their_code_and_message(server, client, channel, digits) -> None:
    x = digits.x_test[:2].astype(np.float32)
    for datatype, dtype in (("INT32", np.int32), ("FP64", np.float64)):
        _refused(
            lambda d=datatype, t=dtype: _infer(client, x.astype(t), datatype=d),
            "INVALID_ARGUMENT",
            f"inference input 'input' data-type is '{datatype}', but model 'mixed' expects 'FP32'",
            client,
        )
    _refused(
        lambda: _infer(client, x[:, :63]),
        "INVALID_ARGUMENT",
        "input shape [2, 63]: the input has 63 features per row; model 'mixed' expects 64",
        client,
    )
    _refused(lambda: _infer(client, x, model="nope"), "NOT_FOUND", "unknown model 'nope'", client)
    _refused(
        lambda: client.get_model_metadata("mixed", "7", headers=AUTH),
        "NOT_FOUND",
        "model 'mixed' has no version '7' (has 1)",
        client,
    )
    for headers in (None, {"authorization": "Bearer wrong"}):
        _refused(
            lambda h=headers: client.get_model_metadata("mixed", headers=h),
            "UNAUTHENTICATED",
            "missing or wrong API key (send 'Authorization: Bearer KEY')",
            client,
        )
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

    def call(message: bytes) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            infer(message, metadata=tuple(AUTH.items()))
        return caught.value.code(), caught.value.details()

    def request(**fields) -> triton_pb2.ModelInferRequest:
        message = triton_pb2.ModelInferRequest(model_name="mixed")
        message.inputs.add(name="input", datatype="FP32", shape=[1, 64], **fields)
        return message

    both = request(contents={"fp32_contents": [0.0] * 64})
    both.raw_input_contents.append(bytes(64 * 4))
    nan = request(contents={"fp32_contents": [0.0] * 5 + [float("nan")] + [0.0] * 58})
    asked = request(contents={"fp32_contents": [0.0] * 64})
    asked.outputs.add(name="scores")
    short_raw = request()
    short_raw.raw_input_contents.append(bytes(63 * 4))
    for message, expected in (
        (both, "inputs[0] has contents and raw_input_contents[0]; send one of them"),
        (
            request(contents={"fp32_contents": [0.0] * 63}),
            "inputs[0].contents.fp32_contents holds 63 values; shape [1, 64] needs 64",
        ),
        (
            request(contents={"int_contents": [0] * 64}),
            "inputs[0].contents.int_contents holds the values of another datatype; FP32 values "
            "go in contents.fp32_contents",
        ),
        (
            nan,
            "input holds NaN or infinite values: inputs[0].contents.fp32_contents[5] = nan",
        ),
        (
            short_raw,
            "input byte size mismatch for input 'input' for model 'mixed'. Expected 256, got "
            "252 (raw_input_contents[0]: shape [1, 64] of FP32)",
        ),
        (asked, "unknown output(s) ['scores']; the model has ['logits', 'probabilities']"),
    ):
        assert call(message.SerializeToString()) == (grpc.StatusCode.INVALID_ARGUMENT, expected)

    oversize = triton_pb2.ModelInferRequest(model_name="mixed")
    oversize.inputs.add(name="input", datatype="FP32", shape=[257, 64])
    oversize.raw_input_contents.append(bytes(257 * 64 * 4))  # 64 KiB and a row
    message = oversize.SerializeToString()
    assert call(message) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"SERVER: Received message larger than max ({len(message)} vs. {MAX_REQUEST_BYTES})",
    )
    assert client.is_server_live()
    assert call(b"\xff\xff\xff") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed request: not a serialized inference.ModelInferRequest message",
    )
    assert client.is_server_live()


def test_a_grpc_port_in_use_is_one_line_and_exit_2(repository: Path, capsys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = serve_main(
            ["--repository", str(repository), "--port", str(_free_port()), "--grpc-port", str(port)]
        )
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"smartmixed-serve: error: cannot bind the gRPC port 127.0.0.1:{port} (grpc_port): "
        "Address already in use"
    ]


def test_max_queue_is_unavailable_with_retry_after(repository: Path, monkeypatch, digits) -> None:
    """In process (the gRPC server runs on the app's loop): one request held in ``Service.run``
    fills max_queue 1; the next is UNAVAILABLE at once, with REST's message."""
    port = _free_port()
    app = create_app(ServeSettings(repository=repository, grpc_port=port, max_queue=1))
    x = digits.x_test[:2].astype(np.float32)
    with TestClient(app), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        service, release = app.state.service, threading.Event()
        run = service.run

        async def held(*args):
            while not release.is_set():
                await asyncio.sleep(0.01)
            return await run(*args)

        monkeypatch.setattr(service, "run", held)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_infer, client, x)
            deadline = time.monotonic() + 30
            while service.in_flight.get("mixed") != 1:
                assert time.monotonic() < deadline, "the first request was never admitted"
                time.sleep(0.01)
            request = triton_pb2.ModelInferRequest(model_name="mixed")
            request.inputs.add(name="input", datatype="FP32", shape=x.shape)
            request.raw_input_contents.append(x.tobytes())
            with pytest.raises(grpc.RpcError) as caught:
                GRPCInferenceServiceStub(channel).ModelInfer(request)
            assert (caught.value.code(), caught.value.details()) == (
                grpc.StatusCode.UNAVAILABLE,
                "model 'mixed' has 1 requests in progress (max_queue); retry later",
            )
            assert ("retry-after", "1") in caught.value.trailing_metadata()
            release.set()
            assert first.result(timeout=30).as_numpy("logits").shape == (2, 10)
        client.close()
