from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smartmixed.bench.cli import main


def test_train_cost_writes_json_md_png(tmp_path: Path) -> None:
    code = main(
        [
            "train-cost",
            "--out",
            str(tmp_path),
            "--arch",
            "64,48,32,10",
            "--rounds",
            "2",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "train-cost.json").read_text())
    assert set(result["models"]) == {"fixed_relu", "phase1", "phase2", "phase1_naive"}
    for model in result["models"].values():
        assert model["ms_per_step"] > 0 and model["steps"] == 6
    assert set(result["ratios"]) == {"phase1_vs_fixed", "phase2_vs_fixed", "phase1_naive_vs_fixed"}
    assert all(r > 0 for r in result["ratios"].values())
    assert result["targets"] == {"phase1_vs_fixed": 1.3, "phase2_vs_fixed": 1.1}
    assert "| phase1 |" in (tmp_path / "train-cost.md").read_text()
    assert (tmp_path / "train-cost.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arch_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["train-cost", "--out", str(tmp_path), "--arch", "1,2"]) == 2
    assert "smartmixed-bench: error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["train-cost", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda was asked for, but torch sees no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_cost_on_cuda(tmp_path: Path) -> None:
    argv = ["train-cost", "--out", str(tmp_path), "--device", "cuda", "--quiet"]
    assert main([*argv, "--arch", "64,48,32,10", "--rounds", "2", "--steps", "3"]) == 0
    result = json.loads((tmp_path / "train-cost.json").read_text())
    assert result["config"]["device"] == "cuda" and result["config"]["gpu"]
    assert all(m["ms_per_step"] > 0 and m["steps"] == 6 for m in result["models"].values())
    assert "GPU " in (tmp_path / "train-cost.md").read_text()
