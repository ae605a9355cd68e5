from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smartmixed.nn import FrozenMixedActivation, MixedActivation, selection_logits
from smartmixed.nn.layers import _normalise_candidates, gumbel_softmax_sample
from smartmixed.nn.pool import ACTIVATIONS, DEFAULT_POOL, standard_moments
from smartmixed.train.model import (
    PRESETS,
    TABLE1,
    MixedMLP,
    ModelSpec,
    SelectiveMLP,
    SpecError,
    parse_arch,
)

POOL = list(DEFAULT_POOL)
ACTS = tuple(ACTIVATIONS[n] for n in POOL)


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
    logits = selection_logits(model)  # one parameter per hidden layer, for the optimizer
    assert [tuple(p.shape) for p in logits] == [(16, len(POOL)), (12, len(POOL))]
    assert all(p.grad.abs().sum() > 0 for p in logits)


def test_networks_are_built_from_the_drop_in_layers() -> None:
    selective = SelectiveMLP([9, 5, 4, 3], POOL, candidate_norm="standard", tau=0.7)
    assert [type(m) for m in selective.activations] == [MixedActivation] * 2
    assert [m.num_features for m in selective.activations] == [5, 4]
    assert all(m.candidate_norm == "standard" and m.tau == 0.7 for m in selective.activations)
    selective.tau, selective.relaxed = 0.2, True  # the loop's schedule reaches every layer
    assert [(m.tau, m.relaxed) for m in selective.activations] == [(0.2, True)] * 2
    mixed = MixedMLP.from_selective(selective, preprocessing={"offset": 0.0, "scale": 1.0})
    assert [type(m) for m in mixed.activations] == [FrozenMixedActivation] * 2
    # the frozen layers see the neurons grouped (sorted): split and concat, no index op
    assert all(m.groups.contiguous for m in mixed.activations)
    assert [m.names() for m in mixed.activations] == [
        sorted(a, key=POOL.index) for a in mixed.assignment
    ]


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
    soft, _ = gumbel_softmax_sample(model.activations[0].logits, model.tau)  # (K, 5)
    z = model.layers[0](x)  # (4, 5)
    moments = [standard_moments(n) for n in POOL]
    h = sum(soft[k] * (ACTS[k].fn(z) - moments[k][0]) / moments[k][1] for k in range(len(POOL)))
    torch.testing.assert_close(out, model.layers[1](h), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert (model.activations[0].logits.grad.abs() > 0).all()  # every candidate of every neuron
    model.eval()  # evaluation stays the hard argmax, relaxed or not
    with torch.no_grad():
        relaxed_eval = model(x)
        model.relaxed = False
        torch.testing.assert_close(relaxed_eval, model(x))


def test_logit_grad_norm_equalises_each_candidates_rms_per_layer() -> None:
    """--logit-grad-norm candidate: every layer rescales its own dL/ds (K, n_l) so that each
    candidate's RMS over the layer's neurons is the layer's mean RMS, direction kept."""
    model = SelectiveMLP([6, 5, 4, 3], POOL, logit_grad_norm="candidate")
    assert [m.logit_grad_norm for m in model.activations] == ["candidate"] * 2
    scales = torch.tensor([1.0, 100, 0.01, 3, 7, 1e-3]).unsqueeze(1)
    for width in (5, 4):
        g = torch.randn(len(POOL), width) * scales
        n = _normalise_candidates(g)
        rms = n.pow(2).mean(1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, float(rms.mean())))
        torch.testing.assert_close(rms.mean(), g.pow(2).mean(1).sqrt().mean())
        assert torch.equal(n.sign(), g.sign())  # direction per neuron kept
    with pytest.raises(SpecError, match="logit grad norm 'x'"):
        SelectiveMLP([6, 5, 3], POOL, logit_grad_norm="x")
