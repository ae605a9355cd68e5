"""Bilevel selection, the logit prior, selection by removal and the per-layer choice
(train/loop.py): what each step may change, in float64."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smartmixed.nn.layers import GUMBEL_EPS, gumbel_softmax_sample
from smartmixed.nn.pool import ACTIVATIONS, DEFAULT_POOL
from smartmixed.train import loop
from smartmixed.train.data import load_dataset
from smartmixed.train.loop import (
    TrainConfig,
    TrainError,
    _phase_rows,
    evaluate,
    remove_activations,
    train_epoch,
    train_run,
)
from smartmixed.train.model import SelectiveMLP

POOL = list(DEFAULT_POOL)
TAU = 0.3


def _network(seed: int = 0) -> SelectiveMLP:
    torch.manual_seed(seed)
    return SelectiveMLP([5, 7, 3], POOL, tau=TAU, logit_init_std=1.0).double()


def _textbook_logit_grad(net: SelectiveMLP, x, y, gumbel) -> torch.Tensor:
    """dL/da of the held-out loss by the straight-through rule written out by hand:
    h = sum_k y_k f_k(z), y = onehot(argmax s) - sg(s) + s, s = softmax((a + g) / tau)."""
    first, last = net.layers
    logits = net.activations[0].logits.detach().clone().requires_grad_(True)
    z = x @ first.weight.detach().t() + first.bias.detach()  # (B, n)
    soft = F.softmax((logits + gumbel) / TAU, dim=-1)  # (n, K)
    hard = F.one_hot(soft.argmax(-1), len(POOL)).to(soft) - soft.detach() + soft
    h = (torch.stack([ACTIVATIONS[p].fn(z) for p in POOL], -1) * hard).sum(-1)
    out = h @ last.weight.detach().t() + last.bias.detach()
    (grad,) = torch.autograd.grad(F.cross_entropy(out, y), logits)
    return grad


def test_a_logit_step_follows_the_held_out_gradient_and_leaves_the_weights() -> None:
    net = _network()
    optimizer = loop._optimizer(TrainConfig(arch=[5, 7, 3], logit_lr=1e-2), net)
    x = torch.randn(11, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (11,))
    weights = {k: v.detach().clone() for k, v in net.layers.state_dict().items()}
    before = net.activations[0].logits.detach().clone()

    torch.manual_seed(123)  # the layer's Gumbel draw, reproduced here
    gumbel = torch.rand_like(before).add_(GUMBEL_EPS).log_().neg_().add_(GUMBEL_EPS).log_().neg_()
    expected = _textbook_logit_grad(net, x, y, gumbel)
    torch.manual_seed(123)
    net.train()
    (grad,) = loop._logit_step(
        net, optimizer, (x, y), loop.selection_logits(net), 1e9, double_softmax=False
    )

    torch.testing.assert_close(grad, expected)
    assert grad.abs().sum() > 0
    # Adam's first step moves each logit by lr * g / (|g| + eps); nothing else moves
    step = 1e-2 * expected / (expected.abs() + 1e-8)
    torch.testing.assert_close(net.activations[0].logits.detach(), before - step)
    for name, value in net.layers.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert all(not optimizer.state[p] for p in net.layers.parameters())


def test_bilevel_weight_steps_leave_the_logits_to_the_held_out_steps(monkeypatch) -> None:
    net = _network(seed=1)
    optimizer = loop._optimizer(TrainConfig(arch=[5, 7, 3]), net)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    held = (torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,)))
    seen: list[torch.Tensor] = []

    def no_step(model, optimizer, batch, logit_params, grad_clip, *, double_softmax):
        seen.append(batch[1])
        return [torch.zeros_like(p) for p in logit_params]

    monkeypatch.setattr(loop, "_logit_step", no_step)
    logits = net.activations[0].logits.detach().clone()
    first = net.layers[0].weight.detach().clone()
    train_epoch(
        net, optimizer, x, y, batch_size=16, grad_clip=1.0,
        generator=torch.Generator().manual_seed(0), select=held,
    )  # fmt: skip
    assert torch.equal(net.activations[0].logits.detach(), logits)  # the weight steps left them
    assert not torch.equal(net.layers[0].weight.detach(), first)  # and did train the weights
    assert len(seen) == 4  # one held-out step after each of the 4 weight steps
    # batches of 16 from the 20 held-out rows: a pass, then a fresh permutation
    assert all(len(b) == 16 for b in seen)


def test_held_out_rows_are_a_fixed_share_disjoint_from_the_weight_rows() -> None:
    x = torch.arange(50, dtype=torch.float32).reshape(50, 1)
    data = {"x_train": x, "y_train": torch.arange(50)}
    config = TrainConfig(arch=[1, 4, 2], selection="bilevel", selection_holdout=0.2, seed=3)
    kept_x, kept_y, (_, held_y) = _phase_rows(config, "selective", data)
    assert len(held_y) == 10 and len(kept_y) == 40
    assert sorted(kept_y.tolist() + held_y.tolist()) == list(range(50))
    assert torch.equal(_phase_rows(config, "selective", data)[2][1], held_y)  # same on resume
    assert torch.equal(kept_x[:, 0].long(), kept_y)
    whole = _phase_rows(config, "mixed", data)  # phase 2 trains on every row
    assert whole[2] is None and torch.equal(whole[1], data["y_train"])
    joint = TrainConfig(arch=[1, 4, 2], selection="joint")
    assert _phase_rows(joint, "selective", data)[2] is None


def test_the_prior_starts_the_named_candidate_ahead_by_its_gap() -> None:
    config = TrainConfig(arch=[5, 7, 3], logit_prior="relu=2")
    net = SelectiveMLP([5, 7, 3], POOL, tau=TAU)
    loop._apply_prior(config, net)
    logits = net.activations[0].logits.detach()
    assert torch.equal(logits[:, POOL.index("relu")], torch.full((7,), 2.0))
    others = [k for k, name in enumerate(POOL) if name != "relu"]
    assert torch.equal(logits[:, others], torch.zeros(7, len(others)))
    draws = torch.stack([gumbel_softmax_sample(logits, TAU)[1] for _ in range(400)])
    share = (draws == POOL.index("relu")).double().mean().item()
    assert abs(share - math.exp(2) / (math.exp(2) + 5)) < 0.03  # 0.596


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"logit_prior": "relu"}, "--logit-prior 'relu': expected ACTIVATION=GAP with a gap > 0"),
        ({"logit_prior": "relu=-1"}, "expected ACTIVATION=GAP with a gap > 0, e.g. relu=2"),
        ({"logit_prior": "gelu=1"}, "--logit-prior 'gelu=1': 'gelu' is not in the pool"),
        ({"selection": "darts"}, "--selection 'darts': expected one of joint, bilevel"),
        ({"selection_holdout": 1.0}, "--selection-holdout is a fraction of the training split"),
        (
            {"freeze_rule": "removal", "selection": "joint"},
            "--freeze-rule removal measures removals on bilevel selection's held-out rows",
        ),
        ({"granularity": "neuron"}, "--granularity 'neuron': expected one of feature, layer"),
        ({"shrink_to": -1}, "--shrink-to -1: expected 0 (off) or N >= 1"),
    ],
)
def test_bad_selection_options_are_refused(options, message) -> None:
    with pytest.raises(TrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(arch=[5, 7, 3], **options)


def test_a_bilevel_run_resumes_to_the_same_model(tmp_path: Path) -> None:
    data = load_dataset("digits")
    options = {"arch": [64, 8, 10], "p1_epochs": 2, "p2_epochs": 1, "lr": 3e-3, "seed": 5}
    config = TrainConfig(**options, selection="bilevel", logit_prior="relu=1")
    whole = train_run(config=config, dataset=data, out=tmp_path / "a", progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(record):
        if record["epoch"] == 0:
            raise Stop

    with pytest.raises(Stop):
        train_run(
            config=config, dataset=data, out=tmp_path / "b", progress=False,
            after_epoch=stop_after_first,
        )  # fmt: skip
    resumed = train_run(
        config=config, dataset=data, out=tmp_path / "b", resume=True, progress=False
    )
    assert resumed.assignment == whole.assignment
    assert resumed.metrics["test_accuracy"] == whole.metrics["test_accuracy"]
    first = json.loads((tmp_path / "a" / "history.jsonl").read_text().splitlines()[0])
    assert set(first["logit_grad"]) == set(POOL)  # the instrument reads the held-out steps


def test_removal_stops_where_no_removal_lowers_the_held_out_loss() -> None:
    torch.manual_seed(4)
    net = SelectiveMLP([6, 24, 16, 3], POOL, tau=TAU, logit_init_std=1.0).double()
    x = torch.randn(64, 6, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (64,))
    start = evaluate(net, x, y)[0]
    removed = remove_activations(net, x, y)

    losses = [start] + [r["loss"] for r in removed]
    assert len(removed) >= 2 and all(b < a for a, b in itertools.pairwise(losses))
    assert evaluate(net, x, y)[0] == pytest.approx(losses[-1], abs=1e-12)
    for r in removed:  # a removed activation is chosen by no feature of its layer
        assert net.activations[r["layer"]].activation_counts()[r["activation"]] == 0
    for layer in net.activations:  # the greedy stop: no further removal would lower the loss
        for k in set(layer.choice().tolist()):
            column = layer.logits[:, k].detach().clone()
            with torch.no_grad():
                layer.logits[:, k] = -1e9
            assert evaluate(net, x, y)[0] >= losses[-1]
            with torch.no_grad():
                layer.logits[:, k] = column


@pytest.mark.slow  # two training runs: over 1 s
def test_a_run_records_its_removals_and_a_per_layer_run_freezes_one_activation_a_layer(
    tmp_path: Path,
) -> None:
    data = load_dataset("digits")
    options = {"arch": [64, 16, 8, 10], "p1_epochs": 2, "p2_epochs": 1, "lr": 3e-3, "seed": 1}
    run = train_run(
        config=TrainConfig(**options, freeze_rule="removal", logit_init_std=1.0),
        dataset=data,
        out=tmp_path / "removal",
        progress=False,
    )
    phase1 = run.metrics["phase1"]
    assert isinstance(phase1["removed"], list)
    for r in phase1["removed"]:
        assert phase1["activation_counts"][r["layer"]][r["activation"]] == 0
        assert r["activation"] not in run.assignment[r["layer"]]
    layered = train_run(
        config=TrainConfig(**options, granularity="layer", logit_init_std=1.0),
        dataset=data,
        out=tmp_path / "layer",
        progress=False,
    )
    assert [len(set(names)) for names in layered.assignment] == [1, 1]
    spec = json.loads((tmp_path / "layer" / "model.json").read_text())
    assert spec["training"]["granularity"] == "layer"


def test_shrinking_removes_the_least_likely_candidates_on_schedule(tmp_path: Path) -> None:
    config = TrainConfig(arch=[64, 16, 8, 10], p1_epochs=10, shrink_to=2)
    assert [config.shrinks_after(e) for e in range(10)] == [0, 1, 0, 1, 0, 1, 0, 1, 0, 0]
    short = TrainConfig(arch=[64, 16, 8, 10], p1_epochs=1, shrink_to=2)
    assert short.shrinks_after(0) == 4  # every removal, however short phase 1 is
    warm = TrainConfig(arch=[64, 16, 8, 10], p1_epochs=10, shrink_to=4, logit_warmup=0.5)
    assert [warm.shrinks_after(e) for e in range(10)] == [0] * 6 + [1, 1, 0, 0]
    assert TrainConfig(arch=[64, 8, 10], mode="fixed:relu").shrinks_after(0) == 0
    tied = SelectiveMLP([5, 7, 3], POOL, tau=TAU)  # uniform logits: the pool's last go first
    assert loop.shrink(tied, 2)[0] == ["selu", "elu"]
    net = SelectiveMLP([5, 7, 3], POOL, tau=TAU, logit_init_std=1.0)
    share = torch.softmax(net.activations[0].logits.detach(), -1).mean(0)
    lowest = [POOL[k] for k in share.argsort()[:2].tolist()]
    assert loop.shrink(net, 2)[0] == lowest

    run = train_run(
        config=TrainConfig(
            arch=[64, 16, 8, 10], p1_epochs=5, p2_epochs=1, lr=3e-3, shrink_to=2, seed=2
        ),
        dataset=load_dataset("digits"),
        out=tmp_path / "shrink",
        progress=False,
    )
    history = [json.loads(line) for line in (tmp_path / "shrink" / "history.jsonl").open()]
    shrunk = [r["shrunk"] for r in history if "shrunk" in r]
    assert [r["phase_epoch"] for r in history if "shrunk" in r] == [0, 1, 2, 3]
    for layer, names in enumerate(run.assignment):  # two candidates left, the rest removed
        gone = {name for removal in shrunk for name in removal[layer]}
        assert len(gone) == 4 and not gone & set(names)
