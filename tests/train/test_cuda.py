"""Training on a CUDA GPU (run where torch sees one; CI has none, so they skip there).

A run trained on the GPU is an ordinary run folder: it loads on the CPU, predicts what the GPU
model predicted, exports and verifies like a CPU run, and a killed GPU run resumes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smartmixed.export.repository import export_run
from smartmixed.train import artifacts
from smartmixed.train.data import Dataset
from smartmixed.train.loop import TrainConfig, train_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARCH = [64, 48, 32, 10]


def _config(**overrides) -> TrainConfig:
    base = {"arch": ARCH, "p1_epochs": 4, "p2_epochs": 6, "lr": 3e-3, "seed": 7}
    return TrainConfig(**{**base, **overrides})


def test_a_cuda_run_loads_on_the_cpu_and_exports(digits: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "cuda"
    spec = train_run(
        config=_config(p1_epochs=8, p2_epochs=20),
        dataset=digits,
        out=out,
        device="cuda",
        progress=False,
    )
    assert spec.metrics["test_accuracy"] > 0.85
    _, model = artifacts.load_model(out)  # on the CPU, as export and serve load it
    assert all(p.device.type == "cpu" for p in model.parameters())
    x, y = torch.as_tensor(digits.x_test), torch.as_tensor(digits.y_test)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.to("cuda")(x.to("cuda")).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
    agree = (cpu.argmax(1) == y).float().mean().item()
    assert abs(agree - spec.metrics["test_accuracy"]) <= 1 / len(y)  # at most one borderline flip
    result = export_run(run_dir=out, repository=tmp_path / "models", lowering="folded")
    assert result.report["verification"]["passed"]


def test_a_cuda_run_with_learned_units(digits: Dataset, tmp_path: Path) -> None:
    pool = ["relu", "tanh", "afu"]
    spec = train_run(
        config=_config(pool=pool), dataset=digits, out=tmp_path / "afu", device="cuda",
        progress=False,
    )  # fmt: skip
    assert len(spec.metrics["afu"]["max_abs_diff_from_relu"]) == len(ARCH) - 2
    result = export_run(run_dir=tmp_path / "afu", repository=tmp_path / "models")
    assert result.report["verification"]["passed"]


@pytest.mark.parametrize("stop_after", [2, 7])  # inside phase 1, inside phase 2
def test_a_killed_cuda_run_resumes(digits: Dataset, tmp_path: Path, stop_after: int) -> None:
    class Interrupt(Exception):
        pass

    def interrupt(record: dict) -> None:
        if record["epoch"] + 1 == stop_after:
            raise Interrupt

    out = tmp_path / "killed"
    with pytest.raises(Interrupt):
        train_run(
            config=_config(),
            dataset=digits,
            out=out,
            device="cuda",
            progress=False,
            after_epoch=interrupt,
        )
    assert "rng.cuda" in artifacts.load_tensors(out / "checkpoint.safetensors")
    resumed = train_run(
        config=_config(), dataset=digits, out=out, device="cuda", resume=True, progress=False
    )
    history = artifacts.read_history(out)
    assert [r["epoch"] for r in history] == list(range(10))
    assert resumed.metrics["test_accuracy"] > 0.7
    reference = train_run(
        config=_config(), dataset=digits, out=tmp_path / "ref", device="cuda", progress=False
    )
    # the same GPU replays the same kernels: the resumed run is the uninterrupted one
    assert resumed.assignment == reference.assignment
    a = artifacts.load_tensors(tmp_path / "ref" / "model.safetensors")
    b = artifacts.load_tensors(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed GPU run differs from the reference"


def test_torchrun_on_one_gpu(tmp_path: Path) -> None:
    # one rank is no DDP job (nccl needs a GPU per rank): what is tested is the launch path
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
        "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
        "-m", "smartmixed.train", "--data", "digits", "--arch", "64,32,10",
        "--p1-epochs", "2", "--p2-epochs", "3", "--lr", "3e-3", "--device", "cuda",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    history = artifacts.read_history(out)
    assert len(history) == 5 and not any("ranks" in r for r in history)
    assert json.loads((out / "model.json").read_text())["training"]["world_size"] == 1
