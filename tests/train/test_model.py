from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smartmixed.train.model import (
    PRESETS,
    TABLE1,
    CandidateTransform,
    MixedMLP,
    ModelSpec,
    SelectiveMLP,
    SpecError,
    _SelectActivation,
    gumbel_softmax_sample,
    parse_arch,
)
from smartmixed.train.pool import ACTIVATIONS, DEFAULT_POOL, batch_sum_basis, standard_moments

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


def test_folded_network_computes_the_standardised_function() -> None:
    torch.manual_seed(3)
    assignment = [[POOL[i % 6] for i in range(12)], [POOL[(i * 5) % 6] for i in range(7)]]
    pre = {"offset": 0.5, "scale": 2.0}
    model = MixedMLP(
        [9, 12, 7, 4], POOL, assignment, preprocessing=pre, candidate_norm="standard"
    ).eval()
    plain = MixedMLP([9, 12, 7, 4], POOL, assignment, preprocessing=pre).eval()
    plain.load_canonical_state_dict(model.canonical_state_dict())
    folded = model.folded().eval()
    assert folded.candidate_norm == "none"
    x = torch.randn(64, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(x), model(x), atol=1e-2)  # the norm does change h


def test_selective_mlp_gradients_reach_every_layers_logits() -> None:
    model = SelectiveMLP([20, 16, 12, 3], POOL).train()
    loss = F.cross_entropy(model(torch.randn(32, 20)), torch.randint(0, 3, (32,)))
    loss.backward()
    grads = model.selection_logits.grad.split([16, 12])
    assert all(g.abs().sum() > 0 for g in grads)


def test_selective_eval_is_deterministic_argmax() -> None:
    model = SelectiveMLP([10, 8, 3], POOL, logit_init_std=1.0).eval()
    x = torch.randn(5, 10)
    assert torch.equal(model(x), model(x))
    assert [len(layer) for layer in model.assignment()] == [8]


def test_phase2_equals_phase1_argmax_for_the_same_weights() -> None:
    pre = {"offset": 0.0, "scale": 1 / 255}
    selective = SelectiveMLP([30, 25, 17, 9, 4], POOL, preprocessing=pre, logit_init_std=2.0)
    selective.eval()
    mixed = MixedMLP.from_selective(selective, preprocessing=pre).eval()
    assert mixed.assignment == selective.assignment()
    x = torch.rand(64, 30) * 255
    with torch.no_grad():
        a, b = selective(x), mixed(x)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))


def _per_neuron_reference(model: MixedMLP, x: torch.Tensor) -> torch.Tensor:
    """Neuron by neuron, straight from the canonical weights: the definition of the network."""
    state = model.canonical_state_dict()
    h = (x - model.offset) * model.scale
    n_hidden = len(model.arch) - 2
    for i in range(n_hidden):
        w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        h = torch.stack(
            [ACTIVATIONS[name].fn(h @ w[j] + b[j]) for j, name in enumerate(model.assignment[i])],
            dim=1,
        )
    return h @ state[f"layers.{n_hidden}.weight"].t() + state[f"layers.{n_hidden}.bias"]


@pytest.mark.parametrize("seed", range(4))
def test_grouped_layers_equal_per_neuron_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pool = [*POOL, "gelu", "softsign"]
    widths = [int(w) for w in torch.randint(1, 23, (3,), generator=gen)]
    arch = [11, *widths, 5]
    assignment = []
    for w in widths:  # a few pool entries only, so some groups are empty
        allowed = torch.randperm(len(pool), generator=gen)[:3]
        picks = allowed[torch.randint(0, 3, (w,), generator=gen)]
        assignment.append([pool[int(k)] for k in picks])
    assignment[0][0] = "selu"  # usually a single-neuron group
    model = MixedMLP(arch, pool, assignment, preprocessing={"offset": 1.0, "scale": 0.5})
    x = torch.randn(33, 11, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _per_neuron_reference(model, x), atol=1e-5, rtol=1e-5)


def test_canonical_state_round_trip_is_exact() -> None:
    model = MixedMLP([6, 9, 7, 3], POOL, [[POOL[i % 6] for i in range(9)], ["tanh"] * 6 + ["elu"]])
    state = model.canonical_state_dict()
    other = MixedMLP(model.arch, POOL, model.assignment)
    other.load_canonical_state_dict(state)
    for key, value in other.canonical_state_dict().items():
        assert torch.equal(value, state[key])


def test_load_canonical_state_reports_missing_and_misshapen_tensors() -> None:
    model = MixedMLP([4, 5, 2], ["relu"], [["relu"] * 5])
    state = model.canonical_state_dict()
    with pytest.raises(SpecError, match=r"missing tensor\(s\) layers.1.bias"):
        model.load_canonical_state_dict({k: v for k, v in state.items() if k != "layers.1.bias"})
    bad = {**state, "layers.0.weight": torch.zeros(5, 3)}
    with pytest.raises(SpecError, match=r"layers.0.weight: expected shape \[5, 4\], got \[5, 3\]"):
        model.load_canonical_state_dict(bad)


def test_presets_cover_table1() -> None:
    assert len(TABLE1) == 18
    assert PRESETS["table1-1"] == (784, 512, 10)
    assert PRESETS["paper"] == (784, 768, 512, 512, 256, 256, 128, 10)
    assert len(PRESETS["table1-18"]) == 15


def test_parse_arch_errors() -> None:
    assert parse_arch("784, 10 ,10") == [784, 10, 10]
    for bad, message in [
        ("784,x", "not a comma-separated"),
        ("784,10", ">= 3"),
        ("784,0,10", "width < 1"),
        ("784,5,1", ">= 2 classes"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_arch(bad)


def _spec(**overrides) -> dict:
    data = {
        "arch": [4, 3, 2],
        "pool": ["relu", "tanh"],
        "mode": "smartmixed",
        "assignment": [["relu", "tanh", "relu"]],
        "preprocessing": {"offset": 0.0, "scale": 1.0},
        "input_shape": [4],
        "labels": ["a", "b"],
    }
    return {**data, **overrides}


def test_spec_json_round_trip_and_validation() -> None:
    spec = ModelSpec.from_dict(_spec())
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.activation_counts() == [{"relu": 2, "tanh": 1}]
    cases = [
        (_spec(assignment=[["relu", "gelu", "relu"]]), r"assignment\[0\].*gelu not in the pool"),
        (_spec(assignment=[["relu"]]), r"assignment\[0\]': expected 3 neurons, got 1"),
        (_spec(labels=["a"]), "expected 2 class labels, got 1"),
        (_spec(pool=["relu", "swish"]), "unknown activation 'swish'"),
        (_spec(preprocessing={"offset": [0, 1], "scale": 1}), "preprocessing.offset"),
        ({k: v for k, v in _spec().items() if k != "labels"}, r"missing field\(s\) labels"),
    ]
    for data, message in cases:
        with pytest.raises(SpecError, match=message):
            ModelSpec.from_dict(data)


def test_relaxed_forward_is_the_soft_mixture_and_reaches_every_logit() -> None:
    torch.manual_seed(3)
    model = SelectiveMLP([6, 5, 3], POOL, candidate_norm="standard").train()
    model.relaxed = True
    x = torch.randn(4, 6)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)  # the same Gumbel draw, by hand
    soft, _ = gumbel_softmax_sample(model.selection_logits, model.tau)  # (K, 5)
    z = model.layers[0](x)  # (4, 5)
    moments = [standard_moments(n) for n in POOL]
    h = sum(soft[k] * (ACTS[k].fn(z) - moments[k][0]) / moments[k][1] for k in range(len(POOL)))
    torch.testing.assert_close(out, model.layers[1](h), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert (model.selection_logits.grad.abs() > 0).all()  # every candidate of every neuron
    model.eval()  # evaluation stays the hard argmax, relaxed or not
    with torch.no_grad():
        relaxed_eval = model(x)
        model.relaxed = False
        torch.testing.assert_close(relaxed_eval, model(x))


def test_logit_grad_norm_equalises_each_candidates_rms_per_layer() -> None:
    model = SelectiveMLP([6, 5, 4, 3], POOL, logit_grad_norm="candidate")
    grad = torch.randn(len(POOL), 9) * torch.tensor([1.0, 100, 0.01, 3, 7, 1e-3]).unsqueeze(1)
    normalised = model._normalise_candidates(grad)
    for g, n in zip(grad.split([5, 4], 1), normalised.split([5, 4], 1), strict=True):
        rms = n.pow(2).mean(1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, float(rms.mean())))
        torch.testing.assert_close(rms.mean(), g.pow(2).mean(1).sqrt().mean())
        assert torch.equal(n.sign(), g.sign())  # direction per neuron kept
    with pytest.raises(SpecError, match="logit grad norm 'x'"):
        SelectiveMLP([6, 5, 3], POOL, logit_grad_norm="x")
