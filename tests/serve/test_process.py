"""A real uvicorn process on 127.0.0.1, driven by tritonclient.http, plain httpx and raw sockets.

Requests are held in flight deterministically by sending their headers and all but the last byte
of their bodies: the server has admitted them (``smartmixed_in_flight`` says so) and cannot
answer until the rest arrives, whatever the machine's load.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from rawhttp import read_response

from smartmixed.serve.cli import main as serve_main

# Settings from the environment; a long request deadline because held requests are admitted
# (and their deadline starts) before their bodies arrive.
ENV = {"SMARTMIXED_MAX_BATCH_SIZE": "32", "SMARTMIXED_REQUEST_TIMEOUT_S": "60"}


@pytest.fixture
def server(serve_process):
    return serve_process("--log-level", "warning", env=ENV)


def _infer_body(rows: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
    return json.dumps({"inputs": [tensor], "outputs": [{"name": "logits"}]}).encode()


def _hold(port: int, body: bytes) -> socket.socket:
    """An infer request for model 'mixed' whose last body byte is not sent yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        "POST /v2/models/mixed/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:-1])
    return sock


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample the server exports: (name, sorted labels) -> value."""
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _wait_in_flight(url: str, expected: int) -> None:
    """Until the server has admitted ``expected`` requests for 'mixed' (they wait for bodies)."""
    deadline = time.monotonic() + 30
    key = ("smartmixed_in_flight", (("model", "mixed"),))
    while _samples(url).get(key, 0) != expected:
        assert time.monotonic() < deadline, f"{expected} requests never in flight"
        time.sleep(0.02)


def test_tritonclient_and_httpx(server, digits) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mixed")
    assert client.get_model_metadata("mixed")["inputs"][0]["shape"] == [-1, 64]
    assert client.get_model_config("relu")["dynamic_batching"]["max_batch_size"] == 32
    x = digits.x_test[:7]
    for binary in (True, False):
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
        result = client.infer("mixed", [tensor], outputs=outputs, request_id="t1")
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (7, 10) and result.get_response()["id"] == "t1"
        np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)
    predicted = httpx.post(
        f"{server.url}/v1/models/mixed:predict", json={"instances": x.tolist()}
    ).json()["predictions"]
    assert [p["label"] for p in predicted] == [str(k) for k in probabilities.argmax(1)]
    with pytest.raises(triton.InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")


def test_concurrent_requests_are_batched_and_exact(server, digits) -> None:
    url = f"{server.url}/v2/models/mixed/infer"
    rows = digits.x_test[:64]
    whole = httpx.post(url, content=_infer_body(rows), headers={"Content-Type": "application/json"})
    expected = np.array(whole.json()["outputs"][0]["data"]).reshape(64, 10)

    def one(i: int) -> tuple[int, np.ndarray]:
        body = _infer_body(rows[i : i + 1])
        response = httpx.post(
            url, content=body, headers={"Content-Type": "application/json"}, timeout=30
        )
        return response.status_code, np.array(response.json()["outputs"][0]["data"])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    for i, (status, logits) in enumerate(results):
        assert status == 200
        np.testing.assert_allclose(logits, expected[i], rtol=1e-5, atol=1e-5)

    # Eight requests admitted and waiting for their last byte, then completed together: they
    # reach the batcher in the same event-loop turns and share runs.
    before = _samples(server.url)
    held = [_hold(server.port, _infer_body(rows[i : i + 1])) for i in range(8)]
    _wait_in_flight(server.url, 8)
    for sock in held:
        sock.sendall(b"}")
    for i, sock in enumerate(held):
        status, _, body = read_response(sock)
        assert status == 200
        np.testing.assert_allclose(body["outputs"][0]["data"], expected[i], rtol=1e-5, atol=1e-5)
        sock.close()
    after = _samples(server.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"model": "mixed", **labels}.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("smartmixed_batch_rows_sum") == 8
    runs = delta("smartmixed_batch_rows_count")
    assert runs < 8  # some runs held more than one request's row
    assert delta("smartmixed_batch_rows_bucket", le="1.0") < runs


def test_sigterm_drains_a_request_in_flight_and_exits_0(server, digits) -> None:
    x = digits.x_test[:3]
    held = _hold(server.port, _infer_body(x))
    _wait_in_flight(server.url, 1)  # admitted: the server is waiting for the last byte
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:  # draining: the listening socket is closed, new connections are refused
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.02)
    assert server.proc.poll() is None  # still running: the held request keeps it
    held.sendall(b"}")
    status, headers, body = read_response(held)
    held.close()
    assert status == 200 and headers["connection"] == "close"
    assert np.asarray(body["outputs"][0]["data"]).shape == (30,)
    # a clean drain exits 0 (uvicorn alone would re-raise the signal: serve/server.py)
    assert server.proc.wait(timeout=60) == 0, server.output()


def test_refuses_to_start_on_a_bad_repository(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"junk")
    result = subprocess.run(
        [sys.executable, "-m", "smartmixed.serve", "--repository", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "m/1: cannot read" in result.stderr + result.stdout


def test_a_body_budget_below_the_largest_request_is_refused(capsys) -> None:
    assert serve_main(["--max-request-bytes", "4096", "--max-body-bytes-in-flight", "2048"]) == 2
    assert capsys.readouterr().err == (
        "smartmixed-serve: error: max_body_bytes_in_flight (2048) is below max_request_bytes "
        "(4096): a request of the largest size could never be read\n"
    )
