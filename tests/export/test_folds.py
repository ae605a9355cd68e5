"""export/folds.py: what permuted, folded and folded_tanh do to a copy of a module (torch only:
the copies compute the model's function; ONNX is test_module.py's business)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from smartmixed.export import folds as module_folds
from smartmixed.export.folds import (
    MODULE_LOWERINGS,
    PRELU,
    FoldedMixedActivation,
    lowered_network,
    module_lowerings,
    plan_folds,
)
from smartmixed.export.verify import ATOL, RTOL
from smartmixed.nn import FrozenMixedActivation

MIX = ["relu", "sigmoid", "tanh", "leaky_relu", "elu"]


def net(channels: list[str], neurons: list[str], *, candidate_norm: str = "none") -> nn.Module:
    """(N, 1, 6, 6) -> conv, BN, frozen layer per channel, max pool, flatten, Linear, frozen
    layer per neuron, Linear -> 3 logits; seeded weights and BN statistics away from (0, 1)."""
    torch.manual_seed(len(channels) + len(neurons))
    model = nn.Sequential(
        nn.Conv2d(1, len(channels), 3, padding=1),
        nn.BatchNorm2d(len(channels)),
        FrozenMixedActivation(MIX, channels, dim=1, candidate_norm=candidate_norm),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(len(channels) * 9, len(neurons)),
        FrozenMixedActivation(MIX, neurons, candidate_norm=candidate_norm),
        nn.Linear(len(neurons), 3),
    )
    with torch.no_grad():
        bn = model[1]
        for tensor in (bn.weight, bn.bias, bn.running_mean):
            tensor.copy_(torch.randn(tensor.shape))
        bn.running_var.copy_(torch.rand(bn.running_var.shape) + 0.5)
    return model.eval()


CHANNELS = ["tanh", "relu", "sigmoid", "leaky_relu", "relu", "tanh"]  # unsorted: permuted works
NEURONS = ["elu", "relu", "leaky_relu", "sigmoid", "tanh", "relu", "elu"]


@pytest.mark.parametrize("candidate_norm", ["none", "standard"])
def test_every_lowerings_copy_computes_the_models_function(candidate_norm: str) -> None:
    model = net(CHANNELS, NEURONS, candidate_norm=candidate_norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plans = plan_folds(model, torch.randn(2, 1, 6, 6))
    x = torch.randn(32, 1, 6, 6) * 5
    with torch.no_grad():
        want = model(x).numpy()
        for lowering in MODULE_LOWERINGS:
            got = lowered_network(model, plans, lowering)(x).numpy()
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=lowering)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_the_plan_names_each_layers_neighbours() -> None:
    plans = plan_folds(net(CHANNELS, NEURONS), torch.randn(2, 1, 6, 6))
    assert [p.describe() for p in plans] == [
        "2: 6 features, 4 groups: permuted (through 0 > 1 > 3 > 5), after maxpool 3 (monotone)",
        "6: 7 features, 5 groups: permuted (through 5 > 7)",
    ]
    assert [(p.scales, p.block, p.affine_reason) for p in plans] == [("1", 9, None), ("5", 1, None)]
    assert [p.describe_folded() for p in plans] == [
        "2: folded relu + leaky_relu as prelu, tanh into sigmoid: 4 -> 2 groups",
        "6: folded relu + leaky_relu as prelu, tanh into sigmoid: 5 -> 3 groups",
    ]


def test_folded_merges_into_one_prelu_and_folded_tanh_does_not() -> None:
    model = net(CHANNELS, NEURONS)
    plans = plan_folds(model, torch.randn(2, 1, 6, 6))
    folded = lowered_network(model, plans, "folded")
    tanh_only = lowered_network(model, plans, "folded_tanh")
    layers = [m for m in folded.modules() if isinstance(m, FoldedMixedActivation)]
    assert [layer.ops for layer in layers] == [[PRELU, "sigmoid"], [PRELU, "sigmoid", "elu"]]
    assert all(layer.contiguous for layer in layers)  # the neighbours took the permutation
    ops = [m.ops for m in tanh_only.modules() if isinstance(m, FoldedMixedActivation)]
    assert ops == [["relu", "sigmoid", "leaky_relu"], ["relu", "sigmoid", "leaky_relu", "elu"]]


def test_module_lowerings_leave_out_what_changes_nothing() -> None:
    example = torch.randn(2, 1, 6, 6)
    for channels, neurons, expected in [
        (CHANNELS, NEURONS, MODULE_LOWERINGS),
        # one activation per layer: permuted only moves the channels' after their max pool
        (["elu"] * 4, ["relu"] * 3, ("scatter", "permuted")),
        # nothing to merge: relu alone of its family, no tanh beside sigmoid
        (["relu", "elu"] * 2, ["elu", "sigmoid"], ("scatter", "permuted")),
    ]:
        model = net(channels, neurons)
        assert module_lowerings(model, plan_folds(model, example)) == expected, channels


def test_a_copy_whose_fold_is_wrong_differs(monkeypatch) -> None:
    """The check above can fail: a fold that forgets the consumer's columns changes the function."""
    monkeypatch.setattr(module_folds, "_permute_neighbours", lambda model, fold, perm: None)
    model = net(CHANNELS, NEURONS)
    copy = lowered_network(model, plan_folds(model, torch.randn(2, 1, 6, 6)), "permuted")
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        assert not np.allclose(copy(x).numpy(), model(x).numpy(), atol=1e-3)


class PoolCases(nn.Module):
    """Frozen layers before max pools, each with one reason to stay before its pool but one."""

    def __init__(self) -> None:
        super().__init__()
        pool = ["relu", "gelu", "tanh", "silu"]

        def frozen(names: list[str], dim: int = 1) -> FrozenMixedActivation:
            return FrozenMixedActivation(pool, names, dim=dim)

        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gelu = frozen(["gelu", "relu", "silu", "relu"])  # two non-monotone activations
        self.no_gelu = frozen(["tanh", "relu", "tanh", "relu"])  # gelu in the pool, not used
        self.read_twice = frozen(["relu", "tanh", "relu", "tanh"])
        self.along_w = frozen(["relu", "tanh"] * 2, dim=-1)  # features along W: windows mix them
        self.indices = frozen(["tanh", "relu", "tanh", "relu"])
        self.pool = nn.MaxPool2d(2)
        self.pool_with_indices = nn.MaxPool2d(2, return_indices=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 4, 4)
        h = self.conv(x)  # (N, 4, 4, 4)
        a = self.pool(self.gelu(h)) + self.pool(self.no_gelu(h))  # (N, 4, 2, 2)
        r = self.read_twice(h)
        a = a + self.pool(r) + r.mean((2, 3), keepdim=True) + self.pool(self.along_w(h))
        a = a + self.pool_with_indices(self.indices(h))[0]
        return self.fc(a.mean((2, 3)))


def test_a_layer_stays_before_its_max_pool_where_the_swap_is_not_exact() -> None:
    model = PoolCases().eval()
    folds = plan_folds(model, torch.randn(2, 1, 4, 4))
    assert {f.layer: (f.max_pool, f.after_pool, f.pool_reason) for f in folds} == {
        "gelu": ("pool", False, "gelu, silu are not monotone"),
        "no_gelu": ("pool", True, None),
        "read_twice": (
            "pool",
            False,
            "its output is used 2 times (pool, the tensor method .mean())",
        ),
        "along_w": (
            "pool",
            False,
            "the pool's windows run along its feature axis 3 of 4, across features with "
            "different activations",
        ),
        "indices": ("pool_with_indices", False, "pool_with_indices returns indices"),
    }
    assert folds[0].describe() == (
        "gelu: 4 features, 3 groups: kept scatter (the output of conv is used 5 times "
        "(gelu, no_gelu, read_twice, along_w, indices)), kept before maxpool pool (gelu, silu "
        "are not monotone)"
    )
    # only no_gelu moves; the copy computes the same function
    x = torch.randn(16, 1, 4, 4) * 4
    copied = module_folds.permuted_copy(model, folds)
    with torch.no_grad():
        np.testing.assert_allclose(copied(x).numpy(), model(x).numpy(), atol=ATOL, rtol=RTOL)
