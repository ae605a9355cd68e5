"""The drop-in layers: the straight-through function, MixedActivation per neuron and per
channel, FrozenMixedActivation, freeze and the frozen files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smartmixed.contract import SpecError
from smartmixed.nn import (
    FrozenFileError,
    FrozenMixedActivation,
    MixedActivation,
    assignment,
    freeze,
    load_frozen,
    save_frozen,
    selection_logits,
)
from smartmixed.nn.layers import (
    GUMBEL_EPS,
    CandidateTransform,
    _SelectActivation,
    gumbel_softmax_sample,
)
from smartmixed.nn.pool import ACTIVATIONS, DEFAULT_POOL, batch_sum_basis, standard_moments

POOL = list(DEFAULT_POOL)
ACTS = tuple(ACTIVATIONS[n] for n in POOL)


def _grouping(choice: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    return torch.argsort(choice, stable=True), torch.bincount(choice, minlength=k).tolist()


def _select(z_t, soft_t, choice, pool=POOL, transform: CandidateTransform | None = None):
    acts = tuple(ACTIVATIONS[n] for n in pool)
    perm, sizes = _grouping(choice, len(acts))
    transform = transform or CandidateTransform.build(pool)
    return _SelectActivation.apply(z_t, soft_t, perm, sizes, acts, batch_sum_basis(pool), transform)


def test_straight_through_forward_is_exactly_one_activation_per_neuron() -> None:
    n, batch = 40, 16
    logits = torch.randn(n, len(POOL))
    soft_t, choice = gumbel_softmax_sample(logits, tau=0.3)
    assert soft_t.shape == (len(POOL), n)
    torch.testing.assert_close(soft_t.sum(0), torch.ones(n))
    assert torch.equal(choice, soft_t.argmax(0))
    z_t = torch.randn(n, batch) * 3
    out = _select(z_t, soft_t, choice)
    # The forward never forms y = onehot - s + s (whose "1" may round to 0.99999994): it is f_c(z).
    # Only the last bit may differ, between the vectorised and scalar kernels of f itself.
    for j in range(n):
        torch.testing.assert_close(out[j], ACTS[choice[j]].fn(z_t[j]), rtol=2e-7, atol=1e-7)
        for other in set(range(len(POOL))) - {int(choice[j])}:
            mixture = 0.999 * ACTS[choice[j]].fn(z_t[j]) + 0.001 * ACTS[other].fn(z_t[j])
            if not torch.allclose(mixture, ACTS[choice[j]].fn(z_t[j]), rtol=1e-5, atol=1e-5):
                assert not torch.allclose(out[j], mixture, rtol=1e-5, atol=1e-5)


def test_gumbel_sample_is_fresh_each_call_and_follows_the_logits() -> None:
    logits = torch.zeros(2000, 6)
    logits[:, 2] = 3.0  # tanh strongly preferred
    _, c1 = gumbel_softmax_sample(logits, tau=0.3)
    _, c2 = gumbel_softmax_sample(logits, tau=0.3)
    assert not torch.equal(c1, c2)
    assert 0.6 < (c1 == 2).float().mean() < 0.95  # P = e^3 / (e^3 + 5) ~ 0.80


@pytest.mark.parametrize("pool", [POOL, ["relu", "gelu", "mish", "identity", "softsign"]])
def test_custom_backward_equals_textbook_straight_through(pool: list[str]) -> None:
    """Gradients of the custom function == autograd of sum_k y_k f_k(z), y = 1hot - sg(s) + s."""
    n, batch = 30, 12
    acts = tuple(ACTIVATIONS[p] for p in pool)
    logits = torch.randn(n, len(pool), dtype=torch.float64, requires_grad=True)
    z = (torch.randn(batch, n, dtype=torch.float64) * 2).requires_grad_(True)
    gumbel = -torch.log(-torch.log(torch.rand(n, len(pool), dtype=torch.float64)))
    target = torch.randn(batch, n, dtype=torch.float64)

    soft = F.softmax((logits + gumbel) / 0.3, dim=-1)
    choice = soft.argmax(-1)
    y = F.one_hot(choice, len(pool)).to(soft) - soft.detach() + soft
    reference = (torch.stack([a.fn(z) for a in acts], -1) * y).sum(-1)
    ref_dz, ref_da = torch.autograd.grad((reference * target).sum(), (z, logits))

    soft2 = F.softmax((logits + gumbel) / 0.3, dim=-1)
    out = _select(z.t(), soft2.t(), choice, pool).t()
    dz, da = torch.autograd.grad((out * target).sum(), (z, logits))
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(dz, ref_dz)
    torch.testing.assert_close(da, ref_da)
    assert da.abs().sum() > 0  # the logits do learn


@pytest.mark.parametrize(("norm", "clamp"), [("standard", None), ("none", 2.0), ("standard", 2.0)])
def test_custom_backward_with_candidate_transform_equals_textbook(norm, clamp) -> None:
    """h_k = (clamp(f_k(z)) - shift_k) * gain_k: same gradients as autograd of the stack."""
    n, batch = 30, 12
    acts = tuple(ACTIVATIONS[p] for p in POOL)
    transform = CandidateTransform.build(POOL, norm=norm, clamp=clamp)
    logits = torch.randn(n, len(POOL), dtype=torch.float64, requires_grad=True)
    z = (torch.randn(batch, n, dtype=torch.float64) * 3).requires_grad_(True)
    gumbel = -torch.log(-torch.log(torch.rand(n, len(POOL), dtype=torch.float64)))
    target = torch.randn(batch, n, dtype=torch.float64)

    def candidate(k: int, v: torch.Tensor) -> torch.Tensor:
        f = acts[k].fn(v)
        if clamp is not None:
            f = f.clamp(-clamp, clamp)
        return (f - transform.shift[k]) * transform.gain[k]

    soft = F.softmax((logits + gumbel) / 0.3, dim=-1)
    choice = soft.argmax(-1)
    y = F.one_hot(choice, len(POOL)).to(soft) - soft.detach() + soft
    reference = (torch.stack([candidate(k, z) for k in range(len(POOL))], -1) * y).sum(-1)
    ref_dz, ref_da = torch.autograd.grad((reference * target).sum(), (z, logits))
    out = _select(z.t(), F.softmax((logits + gumbel) / 0.3, -1).t(), choice, POOL, transform).t()
    dz, da = torch.autograd.grad((out * target).sum(), (z, logits))
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(dz, ref_dz)
    torch.testing.assert_close(da, ref_da)


def test_standard_moments_match_closed_forms_and_standardise() -> None:
    relu_mean = 1 / (2 * torch.pi) ** 0.5
    assert standard_moments("relu") == pytest.approx((relu_mean, (0.5 - relu_mean**2) ** 0.5))
    assert standard_moments("sigmoid")[0] == pytest.approx(0.5)
    assert standard_moments("tanh")[0] == pytest.approx(0.0, abs=1e-12)
    assert standard_moments("selu") == pytest.approx((0.0, 1.0), abs=1e-6)  # self-normalising
    g = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    transform = CandidateTransform.build(POOL, norm="standard")
    for k, name in enumerate(POOL):
        h = transform.apply(k, ACTIVATIONS[name].fn(g))
        assert abs(float(h.mean())) < 0.01 and abs(float(h.std()) - 1) < 0.01, name


# --------------------------------------------------------------------------------------------
# MixedActivation as a module


def _gumbel(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """The noise gumbel_softmax_sample draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    u = torch.rand_like(logits)
    return -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)


def _candidate(layer: MixedActivation, k: int, z: torch.Tensor) -> torch.Tensor:
    t = layer.transform
    return (layer.acts[k].fn(z) - t.shift[k]) * t.gain[k]


@pytest.mark.parametrize(
    ("shape", "dim"),
    [((12, 30), -1), ((5, 7, 4, 3), 1), ((4, 6, 9), -1)],
    ids=["neuron", "channel", "token"],
)
@pytest.mark.parametrize("norm", ["standard", "none"])
@pytest.mark.parametrize("granularity", ["feature", "layer"])
def test_module_gradients_equal_textbook_straight_through(shape, dim, norm, granularity) -> None:
    """Through the module, in float64: out, dL/dx and dL/dlogits equal autograd of
    sum_k y_k h_k(x) with y = onehot(argmax s) - sg(s) + s, one y per feature along ``dim``
    (granularity feature), or one y for the whole layer, every feature's term summed into its
    one logit row (layer)."""
    n = shape[dim]
    layer = MixedActivation(
        n, dim=dim, candidate_norm=norm, logit_init_std=1.0, granularity=granularity
    ).double()
    x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_(True)
    target = torch.randn(shape, dtype=torch.float64)
    torch.manual_seed(3)
    out = layer(x)
    dx, da = torch.autograd.grad((out * target).sum(), (x, layer.logits))

    logits = layer.logits
    soft = F.softmax((logits + _gumbel(logits, 3)) / layer.tau, dim=-1)  # (n, K)
    y = F.one_hot(soft.argmax(-1), len(layer.pool)).to(soft) - soft.detach() + soft
    view = [1] * len(shape)
    view[dim] = n
    reference = sum(
        y[:, k].expand(n).reshape(view) * _candidate(layer, k, x) for k in range(len(layer.pool))
    )
    ref_dx, ref_da = torch.autograd.grad((reference * target).sum(), (x, logits))
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(dx, ref_dx)
    torch.testing.assert_close(da, ref_da)
    assert da.abs().sum() > 0


def test_training_forward_uses_one_candidate_per_channel_at_every_position() -> None:
    layer = MixedActivation(16, dim=1, candidate_norm="none")
    x = torch.randn(3, 16, 5, 5) * 3
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    _, choice = gumbel_softmax_sample(layer.logits, layer.tau)
    assert len(set(choice.tolist())) > 1  # uniform logits: several candidates drawn
    for c in range(16):
        torch.testing.assert_close(
            out[:, c], layer.acts[choice[c]].fn(x[:, c]), rtol=2e-7, atol=1e-7
        )


def test_a_per_layer_choice_draws_one_activation_and_freezes_to_it() -> None:
    layer = MixedActivation(32, granularity="layer", candidate_norm="none")
    assert layer.logits.shape == (1, len(POOL))
    x = torch.randn(8, 32) * 3
    drawn = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = layer(x)
        torch.manual_seed(seed)
        _, (c,) = gumbel_softmax_sample(layer.logits, layer.tau)
        torch.testing.assert_close(out, layer.acts[c].fn(x), rtol=2e-7, atol=1e-7)
        drawn.add(int(c))
    assert len(drawn) > 1  # uniform logits: the layer's draw changes between forwards
    with torch.no_grad():
        layer.logits[0, POOL.index("elu")] = 1.0
    net = freeze(nn.Sequential(nn.Linear(4, 32), layer))
    assert assignment(net) == {"1": ["elu"] * 32}
    with pytest.raises(SpecError, match="granularity 'neuron'"):
        MixedActivation(4, granularity="neuron")


def test_eval_forward_is_the_deterministic_argmax() -> None:
    layer = MixedActivation(10, logit_init_std=1.0).eval()
    x = torch.randn(8, 10)
    out = layer(x)
    assert torch.equal(out, layer(x))
    for j, k in enumerate(layer.logits.argmax(-1).tolist()):
        torch.testing.assert_close(out[:, j], _candidate(layer, k, x[:, j]), rtol=2e-7, atol=1e-7)


def test_wrong_feature_count_is_one_clear_error() -> None:
    with pytest.raises(
        ValueError,
        match=r"MixedActivation\(8, dim=1\): input of shape \[2, 6, 3, 3\] has 6 features along dim 1",
    ):
        MixedActivation(8, dim=1)(torch.zeros(2, 6, 3, 3))


class SmallCNN(nn.Module):
    """A model nobody on the project wrote: BatchNorm, a per-channel and a per-neuron mixed layer."""

    def __init__(self, afu: bool = False) -> None:
        super().__init__()
        pool = ["relu", "tanh", "elu", "afu"] if afu else None
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            MixedActivation(6, dim=1, pool=pool),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 12),
            MixedActivation(12, pool=pool),
            nn.Linear(12, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _trained_a_little(model: nn.Module) -> nn.Module:
    """Logits pushed apart so that the argmax mixes several candidates."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in selection_logits(model):
            p.normal_(0.0, 2.0)
    model.train()
    model(torch.randn(16, 1, 8, 8))  # BatchNorm running statistics move
    return model.eval()


@pytest.mark.parametrize("afu", [False, True], ids=["pool", "afu"])
def test_freeze_equals_the_eval_forward_exactly(afu: bool) -> None:
    model = _trained_a_little(SmallCNN(afu))
    x = torch.randn(5, 1, 8, 8) * 4
    before, chosen = model(x), assignment(model)
    assert freeze(model) is model
    assert [type(m) for m in (model.features[2], model.head[2])] == [FrozenMixedActivation] * 2
    assert assignment(model) == chosen
    assert len(set(chosen["features.2"])) > 1 and len(set(chosen["head.2"])) > 1
    assert torch.equal(model(x), before)
    assert selection_logits(model) == []


def test_frozen_split_and_gather_forms_agree() -> None:
    index = torch.tensor([2, 0, 2, 1, 0, 5, 5])
    scattered = FrozenMixedActivation(DEFAULT_POOL, index, dim=1)
    ordered = FrozenMixedActivation(DEFAULT_POOL, index.sort().values, dim=1)
    assert not scattered.groups.contiguous and ordered.groups.contiguous
    x = torch.randn(3, 7, 2, 2)
    perm = torch.argsort(index, stable=True)
    torch.testing.assert_close(
        scattered(x).index_select(1, perm), ordered(x.index_select(1, perm)), rtol=0, atol=0
    )


def test_frozen_state_dict_round_trips_and_rebuilds_groups() -> None:
    a = FrozenMixedActivation(DEFAULT_POOL, [0, 1, 2, 3])
    b = FrozenMixedActivation(DEFAULT_POOL, [5, 5, 5, 5])
    b.load_state_dict(a.state_dict())
    assert b.names() == ["relu", "sigmoid", "tanh", "leaky_relu"]
    x = torch.randn(2, 4)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="assignment: activation index 9 outside the pool of 6"):
        b.load_state_dict({"assignment": torch.tensor([9, 0, 0, 0])})


def test_freeze_refuses_a_model_without_mixed_layers() -> None:
    with pytest.raises(
        ValueError, match=r"freeze: Sequential holds no MixedActivation \(nothing to freeze\)"
    ):
        freeze(nn.Sequential(nn.Linear(2, 2)))


# --------------------------------------------------------------------------------------------
# save_frozen / load_frozen


def test_save_and_load_frozen_round_trip(tmp_path) -> None:
    model = freeze(_trained_a_little(SmallCNN(afu=True)))
    weights, spec = save_frozen(model, tmp_path / "net.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.json", "net.safetensors"]
    description = json.loads(spec.read_text())
    assert description["layers"]["features.2"]["dim"] == 1
    assert description["layers"]["head.2"]["assignment"] == assignment(model)["head.2"]
    fresh = load_frozen(SmallCNN(afu=True), weights).eval()  # a phase-1 model from the user's code
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    assert assignment(fresh) == assignment(model)


def test_save_frozen_refuses_unfrozen_layers(tmp_path) -> None:
    with pytest.raises(
        ValueError, match=r"save_frozen: layer\(s\) features.2, head.2 are not frozen"
    ):
        save_frozen(SmallCNN(), tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


class Wider(SmallCNN):
    def __init__(self) -> None:
        super().__init__()
        self.head[1], self.head[2], self.head[3] = (
            nn.Linear(96, 20),
            MixedActivation(20),
            nn.Linear(20, 10),
        )


@pytest.mark.parametrize(
    ("target", "tamper", "message"),
    [
        (Wider, None, r"net.json: layer 'head.2': 12 features saved, the model's layer has 20"),
        (
            lambda: nn.Sequential(nn.Linear(2, 2)),
            None,
            r"net.json: layer 'features.2': the model has no module there",
        ),
        (
            SmallCNN,
            lambda w, s: w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0"),
            r"net.safetensors: its sha256 is not the one net.json records",
        ),
        (SmallCNN, lambda w, s: s.write_text("{"), r"net.json: not valid JSON"),
        (
            SmallCNN,
            lambda w, s: s.write_text('{"format": "x"}'),
            r"net.json: not a frozen-model description",
        ),
    ],
    ids=["width", "no-module", "digest", "json", "format"],
)
def test_load_frozen_refuses_what_does_not_fit_and_leaves_the_model(
    tmp_path, target, tamper, message
) -> None:
    weights, spec = save_frozen(freeze(_trained_a_little(SmallCNN())), tmp_path / "net.safetensors")
    if tamper:
        tamper(weights, spec)
    model = target()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FrozenFileError, match=message):
        load_frozen(model, weights)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
