"""The folded lowerings: exact folds, checked against PyTorch, and their structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_checks import assert_verified, mlp_spec

from smartmixed.export.lower import (
    LOWERINGS,
    MERGES_PRELU,
    fold_layer,
    get_metadata,
    lower,
    lowering_summary,
)
from smartmixed.export.repository import export_run
from smartmixed.export.verify import input_sets, verify_against_torch
from smartmixed.nn.pool import ACTIVATIONS, DEFAULT_POOL, LEAKY_RELU_SLOPE
from smartmixed.train.model import MixedMLP, ModelSpec

ALL = list(ACTIVATIONS)
FOLDED = tuple(MERGES_PRELU)  # ("folded", "folded_tanh")
# A neuron whose presence triggers each activation's fold (or none, for the unfolded ones).
PARTNER = {
    "relu": "leaky_relu",
    "leaky_relu": "identity",
    "identity": "relu",
    "sigmoid": "tanh",
    "tanh": "sigmoid",
    "elu": "selu",
    "selu": "elu",
}
# The group an activation lands in when its partner shares the layer.
FOLDED_GROUP = {
    "folded": {"relu": "prelu", "leaky_relu": "prelu", "identity": "prelu", "tanh": "sigmoid"},
    "folded_tanh": {"tanh": "sigmoid"},
}
SINGLE_OP = {
    "relu": "Relu",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "leaky_relu": "LeakyRelu",
    "elu": "Elu",
    "selu": "Selu",
    "softsign": "Softsign",
    "identity": "Identity",
}


def spec_of(assignment: list[list[str]], pool: list[str], n_in: int = 8) -> ModelSpec:
    return mlp_spec([n_in, *(len(layer) for layer in assignment), 3], pool, assignment)


def verified(spec: ModelSpec, lowering: str, seed: int, span: float = 3.0) -> onnx.ModelProto:
    """Lower ``spec`` with seeded weights and verify it against the PyTorch model (ATOL/RTOL)."""
    torch.manual_seed(seed)
    model = MixedMLP.from_spec(spec).eval()
    state = {k: v.numpy() for k, v in model.canonical_state_dict().items()}
    onnx_model = lower(spec, state, lowering=lowering)
    inputs = input_sets(spec.arch[0], test_x=None, low=-span, high=span, seed=seed)
    report = verify_against_torch(onnx_model, model, inputs, n_classes=spec.arch[-1])
    assert_verified(report, onnx_model, model, inputs)
    return onnx_model


def ops(model: onnx.ModelProto, layer: int) -> list[str]:
    return [n.op_type for n in model.graph.node if n.name.startswith(f"layer{layer}/")]


@pytest.mark.parametrize("lowering", FOLDED)
@pytest.mark.parametrize("activation", ALL)
def test_every_activation_folds_exactly(lowering: str, activation: str) -> None:
    """Layer 0: the activation beside the partner that triggers its fold; layer 1: it alone."""
    partner = PARTNER.get(activation, "relu")
    layers = [[activation, partner, activation, partner, activation], [activation] * 4]
    spec = spec_of(layers, [activation, partner])
    model = verified(spec, lowering, seed=len(activation), span=30.0)
    summary = lowering_summary(model, spec, lowering=lowering)
    first, alone = summary["layers"]
    group = FOLDED_GROUP[lowering].get(activation, activation)
    merged = FOLDED_GROUP[lowering].get(partner, partner) == group
    names = [g["name"] for g in first["groups"]]
    assert group in names and len(names) == (1 if merged else 2)
    assert sum(g["rows"] for g in first["groups"]) == 5
    assert [g["name"] for g in alone["groups"]] == [activation]  # no fold without a partner
    if activation in SINGLE_OP:
        assert ops(model, 1) == ["Gemm", SINGLE_OP[activation]]


@pytest.mark.parametrize("lowering", FOLDED)
def test_a_layer_with_every_default_group(lowering: str) -> None:
    layer = [a for a in DEFAULT_POOL for _ in range(3)]
    rng = np.random.default_rng(0)
    spec = spec_of([list(rng.permutation(layer)), ["tanh", "sigmoid"] * 4], list(DEFAULT_POOL))
    model = verified(spec, lowering, seed=1)
    first, second = lowering_summary(model, spec, lowering=lowering)["layers"]
    groups = {g["name"]: g["activations"] for g in first["groups"]}
    if lowering == "folded":  # 6 activations -> 4 groups: Gemm, Split, 4 ops, Concat
        assert groups == {
            "prelu": {"relu": 3, "leaky_relu": 3},
            "sigmoid": {"sigmoid": 3, "tanh": 3},
            "elu": {"elu": 3},
            "selu": {"selu": 3},
        }
        assert ops(model, 0) == ["Gemm", "Split", "PRelu", "Sigmoid", "Elu", "Selu", "Concat"]
    else:  # relu and leaky_relu keep their ops: 5 groups
        assert list(groups) == ["relu", "sigmoid", "leaky_relu", "elu", "selu"]
        assert ops(model, 0) == [
            "Gemm",
            "Split",
            "Relu",
            "Sigmoid",
            "LeakyRelu",
            "Elu",
            "Selu",
            "Concat",
        ]
    # tanh and sigmoid only: one Sigmoid, no Split
    assert second["groups"] == [
        {"name": "sigmoid", "rows": 8, "activations": {"sigmoid": 4, "tanh": 4}}
    ]
    assert ops(model, 1) == ["Gemm", "Sigmoid"] and second["nodes"] == 2


@pytest.mark.parametrize("lowering", FOLDED)
def test_extras_keep_their_groups(lowering: str) -> None:
    rng = np.random.default_rng(2)
    layers = [list(rng.permutation(ALL * 2)), list(rng.permutation(ALL)), ["gelu", "silu"] * 3]
    spec = spec_of(layers, ALL)
    model = verified(spec, lowering, seed=2, span=30.0)
    summary = lowering_summary(model, spec, lowering=lowering)
    names = [g["name"] for g in summary["layers"][0]["groups"]]
    extras = ["gelu", "silu", "softplus", "mish", "softsign"]
    if lowering == "folded":
        assert names == ["prelu", "sigmoid", "elu", "selu", *extras, "afu"]
    else:
        assert names == ["relu", "sigmoid", "leaky_relu", "elu", "selu", *extras, "identity", "afu"]
    assert [g["name"] for g in summary["layers"][2]["groups"]] == ["gelu", "silu"]
    assert summary["total_nodes"] == len(model.graph.node)
    assert summary["total_nodes"] == sum(layer["nodes"] for layer in summary["layers"]) + 4


def test_prelu_slopes_and_tanh_rows() -> None:
    """The PRelu slope per row is the activation's; tanh rows come after sigmoid rows."""
    names = ["tanh", "identity", "relu", "sigmoid", "leaky_relu", "tanh"]
    groups = fold_layer(names, [*DEFAULT_POOL, "identity"], merge_prelu=True)
    assert [g.name for g in groups] == ["prelu", "sigmoid"]
    prelu, sigmoid = groups
    assert prelu.neurons.tolist() == [2, 4, 1]
    assert prelu.slopes.tolist() == [0.0, np.float32(LEAKY_RELU_SLOPE), 1.0]
    assert sigmoid.neurons.tolist() == [3, 0, 5] and sigmoid.slopes is None
    # a single relu-family activation keeps its own op; tanh without sigmoid stays tanh
    alone = fold_layer(["relu", "tanh", "tanh"], list(DEFAULT_POOL), merge_prelu=True)
    assert [(g.name, g.members) for g in alone] == [("relu", {"relu": 1}), ("tanh", {"tanh": 2})]


def test_fewer_nodes_than_permuted_on_a_full_mix() -> None:
    rng = np.random.default_rng(3)
    spec = spec_of(
        [list(rng.permutation(list(DEFAULT_POOL) * 4)) for _ in range(3)], list(DEFAULT_POOL)
    )
    torch.manual_seed(3)
    state = {k: v.numpy() for k, v in MixedMLP.from_spec(spec).canonical_state_dict().items()}
    nodes = {
        lw: lowering_summary(lower(spec, state, lowering=lw), spec, lowering=lw)
        for lw in ("permuted", *FOLDED)
    }
    per_layer = {lw: [layer["nodes"] for layer in s["layers"]] for lw, s in nodes.items()}
    assert per_layer == {"permuted": [9] * 3, "folded": [7] * 3, "folded_tanh": [8] * 3}
    groups = [len(layer["groups"]) for layer in nodes["permuted"]["layers"]]
    assert groups == [6, 6, 6]


def test_auto_times_the_folded_lowerings_and_records_every_structure(
    repository: Path, tmp_path: Path
) -> None:
    assert set(FOLDED) <= set(LOWERINGS)
    meta = get_metadata(onnx.load(str(repository / "mixed" / "1" / "model.onnx")))
    result = export_run(run_dir=meta["smartmixed.run"], repository=tmp_path, lowering="auto")
    report = json.loads((result.entry / "1" / "export.json").read_text())
    assert set(report["selection"]["score_ms"]) == set(LOWERINGS)
    assert set(report["structure"]) == set(LOWERINGS)
    spec = ModelSpec.from_dict(json.loads(meta["smartmixed.spec"]))
    for lowering, structure in report["structure"].items():
        assert structure["lowering"] == lowering
        assert [sum(g["rows"] for g in layer["groups"]) for layer in structure["layers"]] == (
            spec.arch[1:-1]
        )
