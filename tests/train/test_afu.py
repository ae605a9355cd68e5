"""The learned activation unit: formula, init, gradients in both phases, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from smartmixed.contract import AFU_PARAMS, MODEL_WEIGHTS, ModelSpec, SpecError
from smartmixed.nn import AFUnit
from smartmixed.nn.layers import gumbel_softmax_sample
from smartmixed.nn.pool import ACTIVATIONS, afu_init
from smartmixed.train.artifacts import ArtifactError, load_model, save_model
from smartmixed.train.data import Dataset
from smartmixed.train.loop import TrainConfig, TrainError, train_run
from smartmixed.train.model import MixedMLP, SelectiveMLP, linear_t

POOL = ["relu", "tanh", "selu", "afu"]
NUMPY_BASES = {
    "relu": lambda u: np.maximum(u, 0.0),
    "sigmoid": lambda u: 1.0 / (1.0 + np.exp(-u)),
    "tanh": np.tanh,
}


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Move every AFU parameter away from its init, so that no test passes on G = relu."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[-1] in AFU_PARAMS:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def numpy_afu(z: np.ndarray, w0, b0, w1, b1, base: str) -> np.ndarray:
    """G(z) = sum_i w1_i psi(w0_i z + b0_i) + b1, written out unit by unit."""
    out = np.full_like(z, float(b1[0]))
    for i in range(len(w0)):
        out += w1[i] * NUMPY_BASES[base](w0[i] * z + b0[i])
    return out


@pytest.mark.parametrize("base", ["relu", "sigmoid", "tanh"])
def test_forward_matches_numpy_formula(base: str) -> None:
    unit = AFUnit(5, base).double()
    perturb(unit, seed=1)
    z = torch.linspace(-6, 6, 240, dtype=torch.float64).reshape(3, 80)
    p = {k: v.detach().numpy() for k, v in unit.params().items()}
    want = numpy_afu(z.numpy(), p["w0"], p["b0"], p["w1"], p["b1"], base)
    np.testing.assert_allclose(unit(z).detach().numpy(), want, rtol=1e-12, atol=1e-12)
    # the derivative the phase-1 function uses, against autograd
    zg = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(unit(zg).sum(), zg)
    torch.testing.assert_close(unit.activation().vjp(torch.ones_like(z), z), expected)


@pytest.mark.parametrize("base", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("units", [1, 2, 8])
def test_init_is_the_base_exactly_with_distinct_units(base: str, units: int) -> None:
    z = torch.linspace(-30, 30, 2001)
    unit = AFUnit(units, base)
    assert torch.equal(unit(z).detach(), ACTIVATIONS[base].fn(z))
    rows = {
        tuple(float(unit.params()[k][i].detach()) for k in ("w0", "b0", "w1")) for i in range(units)
    }
    assert len(rows) == units  # no two units alike: symmetry broken
    assert torch.equal(afu_init(units, base)["w0"], unit.w0.detach())  # deterministic
    assert torch.equal(ACTIVATIONS["afu"].fn(z), torch.relu(z))  # the registry entry: its init


def _selective(share: str = "layer") -> SelectiveMLP:
    torch.manual_seed(3)
    model = SelectiveMLP(
        [6, 9, 7, 3],
        POOL,
        logit_init_std=1.0,
        candidate_norm="standard",
        afu={"units": 3, "base": "tanh", "share": share},
    ).double()
    perturb(model, seed=4)
    with torch.no_grad():  # afu the argmax of a third of the neurons
        for layer in model.activations:
            layer.logits[::3, 3] += 5.0
    return model


def _seeded_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)  # the same Gumbel draw on every call
        return model(x)


@pytest.mark.parametrize("share", ["layer", "network"])
def test_phase1_afu_parameter_gradients_gradcheck(share: str) -> None:
    """Phase 1 (hard straight-through sample, fixed draw): d output / d theta of the AFU by
    autograd equals finite differences, float64."""
    model = _selective(share).train()
    x = torch.rand(5, 6, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters() if ".afu." in n]
    start = [dict(model.named_parameters())[n].detach().clone() for n in names]

    if share == "network":  # one unit, tied at every layer
        assert names == [f"activations.0.afu.{p}" for p in AFU_PARAMS]

    def f(*params: torch.Tensor) -> torch.Tensor:
        state = dict(zip(names, params, strict=True))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)  # the same Gumbel draw on every call
            return torch.func.functional_call(model, state, (x,))

    inputs = tuple(p.requires_grad_(True) for p in start)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)
    # every AFU parameter is reached: some neurons chose afu in the draw
    out = f(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert all(g.abs().sum() > 0 for g in grads)


def test_phase1_gradients_equal_textbook_straight_through() -> None:
    """Every parameter's gradient (logits, weights, AFU) equals textbook autograd of
    sum_k y_k h_k(z) with y = onehot(argmax s) - sg(s) + s, the same Gumbel draw."""
    model = _selective().train()
    x = torch.rand(8, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = torch.nn.functional.cross_entropy(_seeded_forward(model, x), y)
    got = dict(
        zip(
            [n for n, _ in model.named_parameters()],
            torch.autograd.grad(loss, list(model.parameters())),
            strict=True,
        )
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)  # the forward's draws: one per hidden layer, in order
        draws = [gumbel_softmax_sample(m.logits, m.tau) for m in model.activations]
    h = (x - model.offset) * model.scale
    t = model.transform
    for layer, (linear, (soft, choice)) in enumerate(zip(model.layers[:-1], draws, strict=True)):
        hard = torch.nn.functional.one_hot(choice, len(POOL)).t().double()
        ys = hard - soft.detach() + soft  # (K, n)
        z = linear_t(linear, h.t())  # (n, B)
        cands = [ACTIVATIONS[n].fn(z) if n != "afu" else model.afus[layer](z) for n in POOL]
        stack = torch.stack([(c - t.shift[k]) * t.gain[k] for k, c in enumerate(cands)])
        h = (ys.unsqueeze(2) * stack).sum(0).t()
    want_loss = torch.nn.functional.cross_entropy(model.layers[-1](h), y)
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    for (name, g), w in zip(got.items(), want, strict=True):
        torch.testing.assert_close(g, w, msg=name)


def test_relaxed_phase1_reaches_afu_parameters() -> None:
    model = _selective().train()
    model.relaxed = True
    _seeded_forward(model, torch.rand(4, 6, dtype=torch.float64)).sum().backward()
    assert all(model.afus[0].params()[k].grad.abs().sum() > 0 for k in AFU_PARAMS)


def _mixed(share: str = "layer", base: str = "relu") -> MixedMLP:
    torch.manual_seed(5)
    assignment = [["afu", "relu", "afu", "tanh", "afu"], ["tanh", "afu", "afu", "relu"]]
    model = MixedMLP(
        [6, 5, 4, 3],
        POOL,
        assignment,
        candidate_norm="standard",
        afu={"units": 4, "base": base, "share": share},
    ).double()
    perturb(model, seed=6)
    return model


def test_phase2_afu_parameter_gradients_gradcheck() -> None:
    model = _mixed(base="sigmoid")
    x = torch.rand(5, 6, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters() if ".afu." in n]
    params = tuple(
        dict(model.named_parameters())[n].detach().clone().requires_grad_(True) for n in names
    )

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6)


def test_phase2_carries_afu_over_from_phase1() -> None:
    selective = _selective().float().eval()
    mixed = MixedMLP.from_selective(selective, preprocessing={"offset": 0.0, "scale": 1.0})
    x = torch.rand(16, 6)
    with torch.no_grad():
        torch.testing.assert_close(mixed(x), selective(x), atol=1e-6, rtol=1e-5)
    for a, b in zip(selective.afus, mixed.afus, strict=True):
        assert all(torch.equal(a.params()[k], b.params()[k]) for k in AFU_PARAMS)


def _spec(model: MixedMLP) -> ModelSpec:
    return ModelSpec(
        arch=model.arch,
        pool=model.pool,
        mode="smartmixed",
        assignment=model.assignment,
        preprocessing={"offset": 0.0, "scale": 1.0},
        input_shape=[model.arch[0]],
        labels=["a", "b", "c"],
        afu=model.afu_config,
    )


@pytest.mark.parametrize("share", ["layer", "network"])
def test_save_load_identical_outputs(tmp_path: Path, share: str) -> None:
    model = _mixed(share).float().folded().eval()
    save_model(tmp_path, _spec(model), model.canonical_state_dict())
    stored = load_file(tmp_path / MODEL_WEIGHTS)
    assert {k for k in stored if k.startswith("afu.")} == {
        f"afu.{layer}.{p}" for layer in range(2) for p in AFU_PARAMS
    }
    assert stored["afu.0.w0"].shape == (4,) and stored["afu.1.b1"].shape == (1,)
    if share == "network":
        assert torch.equal(stored["afu.0.w1"], stored["afu.1.w1"])
    assert json.loads((tmp_path / "model.json").read_text())["afu"] == {
        "units": 4,
        "base": "relu",
        "share": share,
    }
    _, loaded = load_model(tmp_path)
    x = torch.rand(32, 6) * 4 - 2
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    ("tensor", "value", "message"),
    [
        ("afu.1.w1", torch.zeros(5), r"tensor afu\.1\.w1: expected shape \[4\], got \[5\]"),
        ("afu.0.b1", torch.zeros(2), r"tensor afu\.0\.b1: expected shape \[1\], got \[2\]"),
        ("afu.0.b0", torch.tensor([0.0, float("nan"), 0.0, 0.0]), r"weights afu\.0\.b0 hold 1 NaN"),
        ("afu.1.w0", None, r"missing tensor\(s\) afu\.1\.w0"),
    ],
)
def test_corrupt_afu_tensor_is_refused_by_name(
    tmp_path: Path, tensor: str, value: torch.Tensor | None, message: str
) -> None:
    model = _mixed().float().folded().eval()
    save_model(tmp_path, _spec(model), model.canonical_state_dict())
    stored = load_file(tmp_path / MODEL_WEIGHTS)
    if value is None:
        del stored[tensor]
    else:
        stored[tensor] = value
    save_file(stored, tmp_path / MODEL_WEIGHTS)
    with pytest.raises(ArtifactError, match=message):
        load_model(tmp_path)


def test_shared_unit_with_unequal_copies_is_refused(tmp_path: Path) -> None:
    model = _mixed("network").float().folded().eval()
    save_model(tmp_path, _spec(model), model.canonical_state_dict())
    stored = load_file(tmp_path / MODEL_WEIGHTS)
    stored["afu.1.b0"] = stored["afu.1.b0"] + 1
    save_file(stored, tmp_path / MODEL_WEIGHTS)
    with pytest.raises(ArtifactError, match=r"tensor afu\.1\.b0: the AFU is shared"):
        load_model(tmp_path)


def test_bad_afu_settings_are_refused() -> None:
    with pytest.raises(TrainError, match="--afu-units must be >= 1, got 0"):
        TrainConfig(arch=[4, 3, 2], mode="fixed:afu", afu_units=0)
    with pytest.raises(TrainError, match="--afu-base 'gelu'"):
        TrainConfig(arch=[4, 3, 2], mode="fixed:afu", afu_base="gelu")
    with pytest.raises(TrainError, match="--afu-share 'neuron'"):
        TrainConfig(arch=[4, 3, 2], mode="fixed:afu", afu_share="neuron")
    with pytest.raises(SpecError, match=r"spec field 'afu\.units'"):
        _spec(_mixed()).__class__(**{**_spec(_mixed()).to_dict(), "afu": {"units": -1}})


def test_fixed_afu_run_learns_the_unit(tmp_path: Path, digits: Dataset) -> None:
    """A real (tiny) fixed:afu run: the unit trains, model.json and afu.png record it (the
    smartmixed case: test_resume_with_a_shared_unit_is_exact)."""
    config = TrainConfig(arch=[64, 16, 8, 10], mode="fixed:afu", lr=3e-3, afu_units=4, epochs=3)
    spec = train_run(config=config, dataset=digits, out=tmp_path, progress=False)
    assert spec.afu == {"units": 4, "base": "relu", "share": "layer"}
    assert spec.metrics["test_accuracy"] > 0.2  # chance is 0.1; 2-3 epochs only
    moved = spec.metrics["afu"]["max_abs_diff_from_init"]
    assert len(moved) == 2 and min(moved) > 0  # the unit trained
    assert (tmp_path / "afu.png").stat().st_size > 1000
    assert "afu.png" in (tmp_path / "report.md").read_text()
    stored = load_file(tmp_path / MODEL_WEIGHTS)
    assert len(set(stored["afu.0.w0"].tolist())) > 1  # units did not stay alike
    _, model = load_model(tmp_path)
    assert model.afu_config == spec.afu


class _Interrupt(Exception):
    pass


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
def test_resume_with_a_shared_unit_is_exact(tmp_path: Path, digits: Dataset) -> None:
    """The checkpoint holds the network-shared unit (one tensor per layer index in the
    state_dict) and the resumed run ends bit for bit where an uninterrupted one does."""
    config = TrainConfig(
        arch=[64, 12, 8, 10],
        pool=["relu", "afu"],
        p1_epochs=2,
        p2_epochs=2,
        lr=3e-3,
        afu_units=3,
        afu_share="network",
    )
    spec = train_run(config=config, dataset=digits, out=tmp_path / "ref", progress=False)
    assert spec.afu == {"units": 3, "base": "relu", "share": "network"}
    assert min(spec.metrics["afu"]["max_abs_diff_from_init"]) > 0  # trained through 2 phases
    assert (tmp_path / "ref" / "afu.png").exists()

    def interrupt(record: dict) -> None:
        if record["epoch"] == 2:  # inside phase 2
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


def test_afu_lr_gives_the_units_their_own_adam_group() -> None:
    from smartmixed.train.loop import _optimizer

    config = TrainConfig(arch=[6, 5, 4, 3], pool=POOL, lr=1e-4, logit_lr=1e-2, afu_lr=1e-3)
    model = SelectiveMLP(config.arch, config.pool, afu=config.afu)
    groups = _optimizer(config, model).param_groups
    assert [g["lr"] for g in groups] == [1e-4, 1e-2, 1e-3]
    units = {id(p) for n, p in model.named_parameters() if ".afu." in n}
    assert {id(p) for p in groups[2]["params"]} == units and units
    assert not units & {id(p) for p in groups[0]["params"]}
    plain = TrainConfig(arch=[6, 5, 3], mode="fixed:relu", afu_lr=1e-3)  # no unit: no group
    assert len(_optimizer(plain, MixedMLP([6, 5, 3], ["relu"], [["relu"] * 5])).param_groups) == 1
    with pytest.raises(TrainError, match="--afu-lr must be > 0"):
        TrainConfig(arch=[4, 3, 2], mode="fixed:afu", afu_lr=0.0)
