from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from smartmixed.export import repository
from smartmixed.export.cli import main
from smartmixed.export.lower import LOWERINGS, get_metadata
from smartmixed.train import artifacts
from smartmixed.train.data import Dataset, load_dataset
from smartmixed.train.loop import TrainConfig, train_run


def config_text(entry: Path) -> str:
    return (entry / "config.pbtxt").read_text()


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_auto_export_writes_a_verified_triton_entry(run_dir: Path, tmp_path: Path, capsys) -> None:
    models = tmp_path / "models"
    assert main([str(run_dir), "--repository", str(models)]) == 0
    printed = capsys.readouterr().out
    assert "test       360 samples" in printed and "argmax agreement 1.0000" in printed
    entry = models / "digits-mixed"
    assert sorted(p.name for p in entry.iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (entry / "1").iterdir()) == ["export.json", "model.onnx"]
    # no staging folder is left; the entry's lock file stays (a file: the server skips it)
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == [".digits-mixed.lock"]
    assert (models / ".digits-mixed.lock").is_file()

    config = text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == (
        "digits-mixed",
        "onnxruntime_onnx",
        repository.MAX_BATCH_SIZE,
    )
    assert [(i.name, list(i.dims), i.data_type) for i in config.input] == [
        ("input", [64], model_config_pb2.TYPE_FP32)
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("logits", [10]),
        ("probabilities", [10]),
    ]

    # no batching delay stated: the server's own applies
    assert config.HasField("dynamic_batching") and "max_queue_delay" not in config_text(entry)

    report = json.loads((entry / "1" / "export.json").read_text())
    assert report["requested_lowering"] == "auto"
    assert report["lowering"] == "folded_tanh"  # the fastest by conftest's fixed timer
    assert set(report["selection"]["score_ms"]) == set(LOWERINGS)
    assert max(r["tolerance_used"] for r in report["verification"]["results"]) <= 1
    sets = {r["input_set"]: r for r in report["verification"]["results"]}
    assert sets["test"]["samples"] == 360 and sets["test"]["argmax_agreement"] == 1.0
    assert config.parameters["smartmixed_lowering"].string_value == report["lowering"]

    model = onnx.load(str(entry / "1" / "model.onnx"))
    meta = get_metadata(model)
    assert json.loads(meta["smartmixed.spec"]) == artifacts.load_spec(run_dir).to_dict()
    assert meta["smartmixed.lowering"] == report["lowering"]
    assert json.loads(meta["smartmixed.verification"]) == report["verification"]
    assert "onnxruntime" in json.loads(meta["smartmixed.versions"])


def test_versions_overwrite_and_verify_only(run_dir: Path, tmp_path: Path, capsys) -> None:
    models = str(tmp_path / "models")
    assert main([str(run_dir), "--repository", models, "--lowering", "scatter"]) == 0
    assert main([str(run_dir), "--repository", models, "--lowering", "grouped"]) == 2
    assert "1 already exists; pass --overwrite" in capsys.readouterr().err
    assert (
        main([str(run_dir), "--repository", models, "--lowering", "grouped", "--version", "2"]) == 0
    )
    assert (
        main([str(run_dir), "--repository", models, "--lowering", "permuted", "--overwrite"]) == 0
    )
    entry = Path(models) / "digits-mixed"
    assert sorted(p.name for p in entry.iterdir()) == ["1", "2", "config.pbtxt"]
    assert json.loads((entry / "1" / "export.json").read_text())["lowering"] == "permuted"
    capsys.readouterr()
    assert main(["--verify-only", str(entry)]) == 0
    assert "verified" in capsys.readouterr().out

    # tamper with the latest version's weights: re-verification must fail
    path = entry / "2" / "model.onnx"
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.name.endswith("/b"))
    values = onnx.numpy_helper.to_array(weight) + np.float32(0.01)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(path))
    assert main(["--verify-only", str(entry)]) == 1
    assert "verification failed: ONNX Runtime does not match PyTorch" in capsys.readouterr().err


def test_failed_verification_writes_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    real_lower = repository.lower

    def wrong_lower(spec, state, **kwargs):
        state = {**state, "layers.0.bias": state["layers.0.bias"] + np.float32(0.05)}
        return real_lower(spec, state, **kwargs)

    monkeypatch.setattr(repository, "lower", wrong_lower)
    models = tmp_path / "models"
    assert main([str(run_dir), "--repository", str(models), "--lowering", "permuted"]) == 1
    err = capsys.readouterr().err
    assert "max abs diff" in err and "test (basic, 360 samples)" in err
    assert not models.exists() or not any(models.iterdir())


def test_corrupt_or_mismatched_runs_give_clear_errors(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    models = str(tmp_path / "models")

    def export(run: Path) -> str:
        assert main([str(run), "--repository", models]) == 2
        err = capsys.readouterr().err
        assert err.startswith("smartmixed-export: error: ") and "Traceback" not in err
        return err

    run = _copy_run(run_dir, tmp_path / "a")
    weights = artifacts.load_tensors(run / "model.safetensors")
    artifacts.save_tensors(
        run / "model.safetensors", {**weights, "layers.1.weight": torch.zeros(24, 39)}
    )
    assert "tensor layers.1.weight: expected shape [24, 40], got [24, 39]" in export(run)

    run = _copy_run(run_dir, tmp_path / "b")
    artifacts.save_tensors(
        run / "model.safetensors", {k: v for k, v in weights.items() if k != "layers.2.bias"}
    )
    assert "missing tensor(s) layers.2.bias" in export(run)

    run = _copy_run(run_dir, tmp_path / "c")
    spec = json.loads((run / "model.json").read_text())
    spec["assignment"][0][3] = "swish"
    (run / "model.json").write_text(json.dumps(spec))
    assert "activation(s) swish not in the pool" in export(run)

    run = _copy_run(run_dir, tmp_path / "d")
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "model.safetensors: not a readable safetensors file" in export(run)

    assert "run folder not found" in export(tmp_path / "nowhere")
    assert main([str(run_dir), "--repository", models, "--opset", "12"]) == 2
    assert "opset 12 lacks ops" in capsys.readouterr().err
    assert not Path(models).exists() or not any(Path(models).iterdir())


def test_auto_on_a_fixed_model_exports_its_one_graph(digits: Dataset, tmp_path: Path) -> None:
    run = tmp_path / "relu"
    config = TrainConfig(arch=[64, 16, 10], mode="fixed:relu", epochs=2, lr=3e-3)
    train_run(config=config, dataset=digits, out=run, progress=False)
    result = repository.export_run(run_dir=run, repository=tmp_path / "models")
    assert result.lowering == "permuted" and result.report["selection"] is None
    ops = [n.op_type for n in onnx.load(str(result.entry / "1" / "model.onnx")).graph.node]
    assert ops == ["Mul", "Gemm", "Relu", "Gemm", "Softmax"]


def test_auto_batches_times_the_served_batch_sizes(run_dir: Path, tmp_path: Path, capsys) -> None:
    models = tmp_path / "models"
    argv = [str(run_dir), "--repository", str(models), "--threads", "1"]
    assert main([*argv, "--auto-batches", "8, 1,8"]) == 0
    assert "geometric mean over batch 1 / 8" in capsys.readouterr().out
    selection = json.loads((models / "digits-mixed" / "1" / "export.json").read_text())["selection"]
    assert selection["batches"] == [1, 8]
    assert all(list(per) == ["1", "8"] for per in selection["median_ms"].values())
    for bad, message in [
        ("0,32", "--auto-batches must be one or more integers >= 1 (got '0,32')"),
        ("1,x", "--auto-batches '1,x' is not a comma-separated list of integers"),
        (",", "--auto-batches must be one or more integers >= 1 (got ',')"),
    ]:
        assert main([*argv, "--overwrite", "--auto-batches", bad]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--lowering", "folded", "--auto-batches", "1"])
    assert exit_info.value.code == 2
    assert "--auto-batches applies to --lowering auto (got folded)" in capsys.readouterr().err


def test_a_run_trained_elsewhere_verifies_with_data_dir(
    tmp_path: Path, mnist_like, capsys, monkeypatch
) -> None:
    mnist_like(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # a relative --data-dir is recorded as an absolute folder
    dataset = load_dataset("fashion-mnist", data_dir="data")
    assert dataset.request["data_dir"] == str(tmp_path / "data")
    run = tmp_path / "idx"
    config = TrainConfig(arch=[784, 16, 10], mode="fixed:relu", epochs=1, lr=3e-3)
    train_run(config=config, dataset=dataset, out=run, progress=False)
    moved = (tmp_path / "data").rename(tmp_path / "elsewhere")  # as on another machine
    models = tmp_path / "models"
    assert main([str(run), "--repository", str(models)]) == 2
    err = capsys.readouterr().err
    assert "cannot reload the run's test data" in err and "--data-dir DIR names its folder" in err
    assert not (models / "idx").exists()
    assert main([str(run), "--repository", str(models), "--data-dir", str(moved)]) == 0
    assert "fashion-mnist (IDX files in" in capsys.readouterr().out
    assert main(["--verify-only", str(models / "idx"), "--data-dir", str(moved)]) == 0
    assert main(["--verify-only", str(models / "idx")]) == 2
    capsys.readouterr()


def test_data_dir_is_refused_for_runs_without_an_idx_folder(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    assert main([str(run_dir), "--repository", str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    assert "--data-dir applies to runs trained on IDX files" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_batching_delay_is_written_only_when_asked(run_dir: Path, tmp_path: Path, capsys) -> None:
    models = tmp_path / "models"
    argv = [str(run_dir), "--repository", str(models), "--lowering", "permuted"]
    assert main([*argv, "--max-queue-delay-us", "250"]) == 0
    config = text_format.Parse(config_text(models / "digits-mixed"), model_config_pb2.ModelConfig())
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    for bad in ("0", "-3"):
        assert main([*argv, "--overwrite", "--max-queue-delay-us", bad]) == 2
        assert capsys.readouterr().err == (
            f"smartmixed-export: error: --max-queue-delay-us {bad}: expected a positive number "
            "of microseconds (without it, the server's own batching delay applies)\n"
        )
    assert "max_queue_delay_microseconds: 250" in config_text(models / "digits-mixed")
