"""A real uvicorn process on 127.0.0.1, driven by tritonclient.http and plain httpx."""

from __future__ import annotations

import os
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(repository: Path):
    port = _free_port()
    env = {**os.environ, "SMARTMIXED_MAX_BATCH_SIZE": "32"}  # settings from the environment
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartmixed.serve", "--repository", str(repository),
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"server did not become ready: {proc.stdout.read()}")
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_tritonclient_and_httpx(server, digits) -> None:
    _, port = server
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
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
    predicted = httpx.post(f"http://127.0.0.1:{port}/v1/models/mixed:predict",
                           json={"instances": x.tolist()}).json()["predictions"]  # fmt: skip
    assert [p["label"] for p in predicted] == [str(k) for k in probabilities.argmax(1)]
    with pytest.raises(triton.InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")


def test_concurrent_requests_are_batched_and_exact_then_sigterm_drains(server, digits) -> None:
    proc, port = server
    url = f"http://127.0.0.1:{port}/v2/models/mixed/infer"
    rows = digits.x_test[:64]

    def one(i: int) -> tuple[int, np.ndarray]:
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": rows[i].tolist()}],
                "outputs": [{"name": "logits"}]}  # fmt: skip
        response = httpx.post(url, json=body, timeout=30)
        return response.status_code, np.array(response.json()["outputs"][0]["data"])

    whole = httpx.post(url, json={"inputs": [{"name": "input", "shape": [64, 64], "datatype": "FP32",
                                              "data": rows.tolist()}]}).json()  # fmt: skip
    expected = np.array(whole["outputs"][0]["data"]).reshape(64, 10)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    for i, (status, logits) in enumerate(results):
        assert status == 200
        np.testing.assert_allclose(logits, expected[i], rtol=1e-5, atol=1e-5)
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    merged = [line for line in metrics.splitlines()
              if line.startswith('smartmixed_batch_rows_bucket{le="1.0",model="mixed"}')]  # fmt: skip
    runs = [
        line
        for line in metrics.splitlines()
        if line.startswith('smartmixed_batch_rows_count{model="mixed"}')
    ]
    assert float(merged[0].split()[-1]) < float(runs[0].split()[-1])  # some runs held > 1 row

    # SIGTERM while requests are in flight: every one of them still completes
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        statuses = [f.result()[0] if not f.exception() else "refused" for f in futures]
    # a clean drain exits 0 (uvicorn alone would re-raise the signal: serve/server.py)
    assert proc.wait(timeout=60) == 0
    started = [s for s in statuses if s != "refused"]
    assert started and all(s == 200 for s in started)


def test_refuses_to_start_on_a_bad_repository(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"junk")
    result = subprocess.run([sys.executable, "-m", "smartmixed.serve", "--repository", str(tmp_path),
                             "--port", "0"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert "m/1: cannot read" in result.stderr + result.stdout
