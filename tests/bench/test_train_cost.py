from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from smartmixed.bench import BenchError
from smartmixed.bench.cli import main
from smartmixed.bench.train_cost import TrainCostOptions
from smartmixed.contract import CONV_PRESETS


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


def test_train_cost_of_a_conv_preset(tmp_path: Path) -> None:
    argv = ["train-cost", "--out", str(tmp_path), "--preset", "lenet5", "--batch-size", "8"]
    assert main([*argv, "--rounds", "3", "--steps", "2", "--warmup", "1", "--quiet"]) == 0
    result = json.loads((tmp_path / "train-cost.json").read_text())
    config = result["config"]
    assert config["preset"] == "lenet5" and config["layers"] == CONV_PRESETS["lenet5"]
    assert config["arch"] == [784, 6, 16, 120, 84, 10] and config["input_shape"] == [1, 28, 28]
    # the default protocol: phase 1 and phase 2 standardise their candidates, fixed ReLU not
    assert config["candidate_norm"] == {
        "fixed_relu": "none",
        "phase1": "standard",
        "phase2": "standard",
        "phase1_naive": "standard",
    }
    models = result["models"]
    assert list(models) == ["fixed_relu", "phase1", "phase2", "phase1_naive"]
    for m in models.values():
        assert m["steps"] == 6 and len(m["round_ms"]) == 3 and min(m["round_ms"]) > 0
        assert m["samples_per_s"] == pytest.approx(8 * 1e3 / m["ms_per_step"])
    fixed = models["fixed_relu"]["round_ms"]
    for name in ("phase1", "phase2", "phase1_naive"):
        per_round = [a / b for a, b in zip(models[name]["round_ms"], fixed, strict=True)]
        assert result["ratios"][f"{name}_vs_fixed"] == pytest.approx(statistics.median(per_round))
    assert result["targets"] == {"phase1_vs_fixed": 1.3, "phase2_vs_fixed": 1.1}
    assert result["meets_targets"] == {
        key: result["ratios"][key] <= target for key, target in result["targets"].items()
    }
    markdown = (tmp_path / "train-cost.md").read_text()
    assert markdown.startswith("# Training-step cost: lenet5\n")
    assert "Conv preset lenet5 (arch [784, 6, 16, 120, 84, 10]), batch 8" in markdown
    assert (tmp_path / "train-cost.png").read_bytes()[:4] == b"\x89PNG"


def test_arch_with_preset_is_one_clear_error(tmp_path: Path, capsys) -> None:
    argv = ["train-cost", "--out", str(tmp_path), "--arch", "64,32,10", "--preset", "lenet5"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(
        "smartmixed-bench train-cost: error: argument --preset: not allowed with argument --arch\n"
    )
    assert "Traceback" not in err and not list(tmp_path.iterdir())
    with pytest.raises(BenchError) as error:  # the library refuses the pair too
        TrainCostOptions(arch=[64, 32, 10], preset="lenet5")
    assert str(error.value) == "--arch and --preset are exclusive: an MLP's widths or a conv preset"


def test_unknown_preset_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train-cost", "--out", str(tmp_path), "--preset", "paper"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err  # newer Pythons quote the choices
    assert "train-cost: error: argument --preset: invalid choice: 'paper' (choose from " in err
    assert "lenet5" in err.splitlines()[-1] and "convnet" in err.splitlines()[-1]
    with pytest.raises(BenchError) as error:
        TrainCostOptions(preset="vgg")
    assert str(error.value) == "--preset 'vgg': expected one of lenet5, convnet"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--arch", "1,2"], "architecture [1, 2] needs an input width"),
        (["--steps", "0"], "--batch-size, --rounds, --steps must be >= 1, --warmup >= 0"),
        (["--warmup", "-1"], "--batch-size, --rounds, --steps must be >= 1, --warmup >= 0"),
    ],
)
def test_bad_options_are_one_line(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    assert main(["train-cost", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"smartmixed-bench: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


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
