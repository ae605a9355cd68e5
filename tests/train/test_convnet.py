"""Conv networks from a layered spec: phase 1 -> phase 2, the folded norm, artifacts, the run
(train_run and the CLI), fixed baselines, resume, and data that holds no images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smartmixed.contract import MODEL_SPEC, MODEL_WEIGHTS, layered_arch
from smartmixed.nn import FrozenMixedActivation, MixedActivation, selection_logits
from smartmixed.train import artifacts
from smartmixed.train.cli import main
from smartmixed.train.data import Dataset
from smartmixed.train.loop import TrainConfig, TrainError, evaluate, train_run
from smartmixed.train.model import MixedConvNet, ModelSpec, SelectiveConvNet, mixed_from_selective

POOL = ["relu", "sigmoid", "tanh", "leaky_relu", "elu", "selu"]
DIGITS = [1, 8, 8]  # sklearn's digits: 8x8 images, one channel
# lenet5 in small, for 8x8 digits: (1, 8, 8) -> (4, 8, 8) -> (4, 4, 4) -> (8, 2, 2) -> 32 -> 16 -> 10
TINY = [
    {"type": "conv", "channels": 4, "kernel": 3, "padding": 1},
    {"type": "maxpool", "kernel": 2},
    {"type": "conv", "channels": 8, "kernel": 3},
    {"type": "flatten"},
    {"type": "linear", "features": 16},
    {"type": "linear", "features": 10},
]
# with batchnorm and an average pool; the second conv is padded, so the first layer's norm
# shift cannot fold into it
TINY_BN = [
    {"type": "conv", "channels": 4, "kernel": 3, "padding": 1},
    {"type": "batchnorm"},
    {"type": "avgpool", "kernel": 2},
    {"type": "conv", "channels": 8, "kernel": 3, "padding": 1},
    {"type": "maxpool", "kernel": 2},
    {"type": "flatten"},
    {"type": "linear", "features": 16},
    {"type": "batchnorm"},
    {"type": "linear", "features": 10},
]


def _config(layers: list[dict] = TINY, **overrides) -> TrainConfig:
    base = {"p1_epochs": 1, "p2_epochs": 1, "epochs": 2, "lr": 3e-3, "seed": 3}
    return TrainConfig(arch=layered_arch(layers, DIGITS), layers=layers, **{**base, **overrides})


def _trained_phase1(layers: list[dict]) -> SelectiveConvNet:
    """A phase-1 net with spread logits and batchnorm statistics moved by a few batches."""
    torch.manual_seed(1)
    net = SelectiveConvNet(
        layers,
        DIGITS,
        POOL,
        preprocessing={"offset": 0.0, "scale": 1 / 16},
        candidate_norm="standard",
        logit_init_std=2.0,
    ).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, *DIGITS) * 16)
    return net.eval()


def test_layers_and_mixed_layers_follow_the_spec() -> None:
    net = _trained_phase1(TINY_BN)
    kinds = [type(m).__name__ for m in net.layers]
    assert kinds == [
        "Conv2d",
        "BatchNorm2d",
        "AvgPool2d",
        "Conv2d",
        "MaxPool2d",
        "Flatten",
        "Linear",
        "BatchNorm1d",
        "Linear",
    ]
    assert net.activation_at == {1: 0, 3: 1, 7: 2}  # after the batchnorm that follows a layer
    assert [(type(m), m.num_features, m.dim) for m in net.activations] == [
        (MixedActivation, 4, 1),  # one choice per channel
        (MixedActivation, 8, 1),
        (MixedActivation, 16, -1),  # one per neuron
    ]
    assert [tuple(p.shape) for p in selection_logits(net)] == [(4, 6), (8, 6), (16, 6)]
    assert net(torch.rand(5, *DIGITS)).shape == (5, 10)
    assert [sum(c.values()) for c in net.activation_counts()] == [4, 8, 16]


@pytest.mark.parametrize(("layers", "norm"), [(TINY, "none"), (TINY_BN, "standard")])
def test_phase2_equals_phase1_and_folds_the_norm_where_exact(
    tmp_path: Path, layers: list[dict], norm: str
) -> None:
    selective = _trained_phase1(layers)
    mixed = mixed_from_selective(selective, preprocessing=selective.preprocessing).eval()
    assert isinstance(mixed, MixedConvNet) and mixed.assignment == selective.assignment()
    assert all(isinstance(m, FrozenMixedActivation) for m in mixed.activations)
    x = torch.rand(64, *DIGITS) * 16
    with torch.no_grad():
        assert torch.equal(mixed(x), selective(x))  # the same function, value for value
        folded = mixed.folded().eval()
        assert folded.candidate_norm == norm  # TINY_BN: the padded conv keeps the norm
        torch.testing.assert_close(folded(x), mixed(x), rtol=1e-5, atol=1e-5)
    spec = ModelSpec(
        arch=mixed.arch,
        pool=POOL,
        mode="smartmixed",
        assignment=mixed.assignment,
        preprocessing=mixed.preprocessing,
        input_shape=DIGITS,
        labels=[str(d) for d in range(10)],
        training={"frozen_candidate_norm": folded.candidate_norm},
        layers=layers,
    )
    state = folded.canonical_state_dict()
    assert set(state) == set(artifacts.weight_shapes(spec))  # no step counters, no assignment
    artifacts.save_model(tmp_path, spec, state)
    _, loaded = artifacts.load_model(tmp_path)
    assert isinstance(loaded, MixedConvNet) and not loaded.training
    assert loaded.candidate_norm == norm
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))


def test_unknown_frozen_candidate_norm_is_refused(tmp_path: Path) -> None:
    mixed = mixed_from_selective(_trained_phase1(TINY), preprocessing={"offset": 0, "scale": 1})
    spec = ModelSpec.untrained(
        pool=POOL, assignment=mixed.assignment, layers=TINY, input_shape=DIGITS
    )
    spec.training["frozen_candidate_norm"] = "cube"
    artifacts.save_model(tmp_path, spec, mixed.canonical_state_dict())
    with pytest.raises(artifacts.ArtifactError) as error:
        artifacts.load_model(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / MODEL_SPEC}: spec field 'training.frozen_candidate_norm': expected one of "
        "none, standard, got 'cube'"
    )


def test_tiny_conv_run_writes_a_layered_spec_and_loads(digits: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "run"
    spec = train_run(config=_config(), dataset=digits, out=out, progress=False)
    stored = json.loads((out / MODEL_SPEC).read_text())
    assert stored["layers"][0] == {
        "type": "conv",
        "channels": 4,
        "kernel": 3,
        "stride": 1,
        "padding": 1,
    }
    assert stored["arch"] == [64, 4, 8, 16, 10] and stored["input_shape"] == DIGITS
    assert [len(layer) for layer in stored["assignment"]] == [4, 8, 16]  # per channel, neuron
    assert stored["training"]["frozen_candidate_norm"] == "none"  # folded: unpadded consumers
    weights = load_file(out / MODEL_WEIGHTS)
    assert weights["layers.0.weight"].shape == (4, 1, 3, 3)
    assert weights["layers.4.weight"].shape == (16, 32)
    history = artifacts.read_history(out)
    assert [r["phase"] for r in history] == ["selective", "mixed"]
    assert [sum(c.values()) for c in history[0]["activation_counts"]] == [4, 8, 16]
    report = (out / "report.md").read_text()
    assert "conv 4 k3 p1 -> maxpool 2 -> conv 8 k3 -> flatten -> linear 16 -> linear 10" in report
    assert "| 1 | conv | 4 |" in report and "| 3 | linear | 16 |" in report
    loaded_spec, model = artifacts.load_model(out)
    assert loaded_spec.layers == spec.layers and loaded_spec.assignment == spec.assignment
    # the loaded network is the run's final one: the same test metrics, bit for bit
    x = torch.from_numpy(digits.x_test).reshape(-1, *DIGITS)  # raw (N, C, H, W)
    y = torch.from_numpy(digits.y_test)
    assert evaluate(model, x, y) == (spec.metrics["test_loss"], spec.metrics["test_accuracy"])


def test_fixed_conv_baseline(digits: Dataset, tmp_path: Path) -> None:
    spec = train_run(
        config=_config(TINY_BN, mode="fixed:relu"), dataset=digits, out=tmp_path, progress=False
    )
    assert spec.activation_counts() == [{"relu": 4}, {"relu": 8}, {"relu": 16}]
    assert "phase1" not in spec.metrics and spec.training["frozen_candidate_norm"] == "none"
    _, model = artifacts.load_model(tmp_path)
    assert [m.names() for m in model.activations] == spec.assignment


class _Interrupt(Exception):
    pass


@pytest.mark.slow  # resume is exact for MLPs in the quick suite (test_loop); conv in .ci/run
def test_conv_resume_is_exact(digits: Dataset, tmp_path: Path) -> None:
    """Killed after phase 1's first epoch (logits, batchnorm statistics and step counters in
    the checkpoint), resumed: the same weights, bit for bit, as an uninterrupted run."""
    config = _config(TINY_BN, p1_epochs=2, p2_epochs=1, phase2_init="continue")
    reference = train_run(config=config, dataset=digits, out=tmp_path / "ref", progress=False)
    assert reference.training["frozen_candidate_norm"] == "standard"

    def interrupt(record: dict) -> None:
        if record["epoch"] == 0:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_run(
            config=config,
            dataset=digits,
            out=tmp_path / "cut",
            progress=False,
            after_epoch=interrupt,
        )
    train_run(config=config, dataset=digits, out=tmp_path / "cut", resume=True, progress=False)
    a, b = (load_file(tmp_path / d / MODEL_WEIGHTS) for d in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # over 1.5 s: .ci/run runs it after make test
def test_cli_trains_lenet5_on_28x28_images(tmp_path: Path, mnist_like, capsys) -> None:
    mnist_like(tmp_path / "mnist", n_train=120, n_test=30)
    out = tmp_path / "lenet"
    argv = ["--data", "mnist", "--data-dir", str(tmp_path / "mnist"), "--preset", "lenet5"]
    assert main([*argv, "--p1-epochs", "1", "--p2-epochs", "1", "--quiet", "--out", str(out)]) == 0
    assert "layers: conv 6 k5 p2 -> maxpool 2" in capsys.readouterr().out
    stored = json.loads((out / MODEL_SPEC).read_text())
    assert stored["arch"] == [784, 6, 16, 120, 84, 10] and stored["input_shape"] == [1, 28, 28]
    assert [len(layer) for layer in stored["assignment"]] == [6, 16, 120, 84]
    _, model = artifacts.load_model(out)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_conv_preset_on_data_without_images_is_refused(tmp_path: Path, capsys) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b,c,label\n" + "".join(f"{i},{i % 5},{i % 7},{i % 2}\n" for i in range(40)))
    out = tmp_path / "run"
    assert main(["--data", f"csv:{csv}", "--preset", "convnet", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "smartmixed-train: error: --preset convnet is a conv net and needs image-shaped data "
        f"([H, W] or [C, H, W] per sample); csv:{csv} holds samples of shape [3]\n"
    )
    assert not captured.out and sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]
    # the library says the same in its words, before anything is written
    from smartmixed.train.data import load_dataset

    rows = load_dataset(f"csv:{csv}")
    with pytest.raises(TrainError, match=r"a conv net needs image-shaped data .* shape \[3\]$"):
        train_run(config=_config(), dataset=rows, out=out, progress=False)
    assert not out.exists()
