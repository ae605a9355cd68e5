"""Bring your own network, end to end: a CNN nobody on the project wrote (BatchNorm, a per-channel
and a per-neuron mixed layer) trained with a plain PyTorch loop, frozen, exported with
export_module, served, and asked through tritonclient with image-shaped input; and a conv run of
smartmixed-train through export, serve and V2 infer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.http as triton
from fastapi.testclient import TestClient
from torch import nn

from smartmixed.contract import layered_arch
from smartmixed.export import export_module, export_run
from smartmixed.nn import MixedActivation, assignment, freeze, selection_logits
from smartmixed.serve.app import create_app
from smartmixed.serve.settings import ServeSettings
from smartmixed.train.artifacts import load_model
from smartmixed.train.data import Dataset
from smartmixed.train.loop import TrainConfig, train_run


class DigitNet(nn.Module):
    """A small CNN for 1x8x8 digits, written as any PyTorch user would."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act1 = MixedActivation(8, dim=1)  # one activation per channel
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 32)
        self.act2 = MixedActivation(32)  # one activation per neuron
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8) pixels 0..16
        h = self.pool(self.act1(self.bn(self.conv(x / 16))))
        return self.out(self.act2(self.fc(torch.flatten(h, 1))))


def _images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).reshape(-1, 1, 8, 8)


@pytest.mark.slow  # a real server process and three epochs: .ci/run (export_module: test_module)
def test_a_users_cnn_trains_freezes_exports_and_answers_tritonclient(
    digits: Dataset, tmp_path: Path, server_starter
) -> None:
    torch.manual_seed(0)
    model = DigitNet()
    logits = selection_logits(model)
    weights = [p for p in model.parameters() if all(p is not q for q in logits)]
    optimizer = torch.optim.Adam([{"params": weights}, {"params": logits, "lr": 0.05}], lr=3e-3)
    x, y = _images(digits.x_train), torch.from_numpy(digits.y_train)
    for _ in range(3):
        for batch in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    freeze(model.eval())
    chosen = assignment(model)
    assert sorted(chosen) == ["act1", "act2"] and len(chosen["act1"]) == 8
    test_x = _images(digits.x_test)
    result = export_module(
        model,
        test_x[:4],
        repository=tmp_path / "models",
        name="digitnet",
        test_inputs=test_x,
        lowering="permuted",  # auto's timing is the conv run's test below
    )
    assert result.report["lowering"] == "permuted"
    with torch.no_grad():
        expected = torch.softmax(model(test_x), 1).numpy()
    accuracy = float((expected.argmax(1) == digits.y_test).mean())
    assert accuracy > 0.8, accuracy  # it learned: three epochs on 8x8 digits

    server = server_starter(tmp_path / "models", "--log-level", "warning")
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.get_model_metadata("digitnet")["inputs"][0]["shape"] == [-1, 1, 8, 8]
        tensor = triton.InferInput("input", [len(test_x), 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(test_x.numpy(), binary_data=True)
        answer = client.infer("digitnet", [tensor])
        np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, atol=1e-5, rtol=0)
        client.close()
    finally:
        server.proc.kill()
        server.proc.wait()


TINY = [
    {"type": "conv", "channels": 4, "kernel": 3, "padding": 1},
    {"type": "batchnorm"},
    {"type": "maxpool", "kernel": 2},
    {"type": "flatten"},
    {"type": "linear", "features": 16},
    {"type": "linear", "features": 10},
]


@pytest.mark.parametrize("mode", ["smartmixed", "fixed:relu"])
def test_a_conv_run_trains_exports_and_answers_v2_infer(
    digits: Dataset, tmp_path: Path, mode: str
) -> None:
    config = TrainConfig(
        arch=layered_arch(TINY, [1, 8, 8]),
        layers=TINY,
        mode=mode,
        p1_epochs=1,
        p2_epochs=1,
        epochs=2,
        lr=3e-3,
    )
    run = tmp_path / "runs" / "conv"
    train_run(config=config, dataset=digits, out=run, progress=False)
    models = tmp_path / "models"
    export_run(run_dir=run, repository=models, name="conv", lowering="auto")
    spec, network = load_model(run)
    assert spec.layers is not None and spec.input_shape == [1, 8, 8]
    x = _images(digits.x_test[:5])
    with torch.no_grad():
        expected = torch.softmax(network(x), 1).numpy()
    settings = ServeSettings(repository=models)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/conv").json()["inputs"][0]["shape"] == [-1, 1, 8, 8]
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [5, 1, 8, 8],
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),
                }
            ],
            "outputs": [{"name": "probabilities"}],
        }
        answer = client.post("/v2/models/conv/infer", json=body)
        assert answer.status_code == 200, answer.text
        out = answer.json()["outputs"][0]
        assert out["shape"] == [5, 10]
        np.testing.assert_allclose(np.reshape(out["data"], (5, 10)), expected, atol=1e-5, rtol=0)
        flat = {**body, "inputs": [{**body["inputs"][0], "shape": [5, 64]}]}
        refused = client.post("/v2/models/conv/infer", json=flat)
        assert refused.status_code == 400
        assert refused.json() == {"error": "input shape [5, 64]: model 'conv' expects [N, 1, 8, 8]"}
