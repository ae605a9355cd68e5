"""export_module: a user's own nn.Module with frozen mixed layers, lowered scatter, permuted and
folded through torch's ONNX exporter, verified against the module, written as a repository
entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smartmixed.contract import (
    INPUT,
    LOGITS,
    META_LOWERING,
    META_RUN,
    META_SPEC,
    PROBABILITIES,
    ModelSpec,
)
from smartmixed.contract.sessions import make_session
from smartmixed.export import export_module, repository, verify
from smartmixed.export import folds as module_folds
from smartmixed.export import module as module_export
from smartmixed.export.entry import ExportError
from smartmixed.export.lower import get_metadata
from smartmixed.export.module import (
    MODULE_LOWERINGS,
    layer_nodes,
    module_lowerings,
    plan_folds,
)
from smartmixed.export.verify import ATOL, RTOL, VerificationError, input_sets
from smartmixed.nn import FrozenMixedActivation, MixedActivation, freeze

POOL = ["relu", "sigmoid", "tanh", "elu", "selu"]


def _spread_and_freeze(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Logits N(0, 3) so that the features pick different activations in no sorted order, BN
    statistics away from (0, 1) so that the fold must move them too; then frozen, eval."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MixedActivation):
                m.logits.copy_(torch.randn(m.logits.shape, generator=generator) * 3)
            elif isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=generator))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return freeze(model).eval()


def small_cnn() -> nn.Sequential:
    """(N, 1, 8, 8) -> conv 4 ch, BN, per-channel mix, pool -> flatten 64 -> 10, per-neuron mix
    -> 3 logits."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        MixedActivation(4, dim=1, pool=POOL),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
        MixedActivation(10, pool=POOL),
        nn.Linear(10, 3),
    )


class TokenBlock(nn.Module):
    """(B, T, D) tokens: x + mlp(x) with mlp = Linear -> mixed (per neuron, dim=-1) -> Linear,
    then the mean token -> 4 logits."""

    def __init__(self, d: int = 6, hidden: int = 12) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d, hidden), MixedActivation(hidden, pool=POOL), nn.Linear(hidden, d)
        )
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp(x)  # (B, T, D)
        return self.head(x.mean(1))  # (B, 4)


class Unfoldable(nn.Module):
    """Three mixed layers whose neighbours forbid the fold, one that allows it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = MixedActivation(6, pool=POOL)  # reads the model's input
        self.fc1 = nn.Linear(6, 8)
        self.residual = MixedActivation(8, pool=POOL)  # act(h) + h: h used twice
        self.fc2 = nn.Linear(8, 8)
        self.viewed = MixedActivation(8, pool=POOL)  # followed by .view()
        self.fc3 = nn.Linear(8, 8)
        self.ok = MixedActivation(8, pool=POOL)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.first(x))
        h = self.residual(h) + h
        h = self.viewed(self.fc2(h)).view(-1, 8)
        return self.out(self.ok(self.fc3(h)))


def _unsorted(model: nn.Module) -> list[str]:
    """The frozen layers with several groups in no sorted order (what permuted has to fold)."""
    return [
        path
        for path, m in model.named_modules()
        if isinstance(m, FrozenMixedActivation)
        and len(m.groups.members) > 1
        and not m.groups.contiguous
    ]


def _ort_matches_torch(path: Path, model: nn.Module, x: torch.Tensor) -> None:
    session = make_session(path.read_bytes(), device="cpu")
    logits, probabilities = session.run([LOGITS, PROBABILITIES], {INPUT: x.numpy()})
    with torch.no_grad():
        want = model(x)
    np.testing.assert_allclose(logits, want.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(probabilities, torch.softmax(want, 1).numpy(), atol=ATOL, rtol=RTOL)


def _op_types(model: onnx.ModelProto, path: str) -> set[str]:
    return {n.op_type for n in layer_nodes(model, path)}


def _pool_order(model: onnx.ModelProto, path: str, pool: int = 0) -> tuple[str, str]:
    """(what the ``pool``-th MaxPool of the graph reads: ``path`` for the frozen layer at
    ``path``, else the op type; "pool first" when that layer reads the pool's output, "layer
    first" when it runs before the pool). The graph's nodes are in topological order."""
    nodes = list(model.graph.node)
    maxpool = [n for n in nodes if n.op_type == "MaxPool"][pool]
    (source,) = [n for n in nodes if maxpool.input[0] in n.output]
    layer = {n.name for n in layer_nodes(model, path)}
    reads = path if source.name in layer else source.op_type
    at = [i for i, n in enumerate(nodes) if n.name in layer]
    if min(at) > nodes.index(maxpool):  # every node of the layer after the pool
        entry = [n for n in nodes if n.name in layer and maxpool.output[0] in n.input]
        assert [n.op_type for n in entry] in (["Split"], ["Gather"] * len(entry))
        return reads, "pool first"
    assert max(at) < nodes.index(maxpool)
    return reads, "layer first"


@pytest.fixture(scope="module")
def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = _spread_and_freeze(small_cnn())
    assert _unsorted(model) == ["2", "6"]  # both layers mix their groups: the fold has work
    return model


def test_a_cnn_exports_verified_in_every_lowering(cnn: nn.Sequential, tmp_path: Path) -> None:
    example = torch.randn(2, 1, 8, 8)
    x = torch.randn(33, 1, 8, 8) * 4
    graphs = {}
    for lowering in ("scatter", "permuted", "auto"):
        result = export_module(
            cnn,
            example,
            repository=tmp_path,
            name=lowering,
            lowering=lowering,
            labels="a,b,c",
            auto_batches=[1, 4],
        )
        onnx_path = result.entry / "1" / "model.onnx"
        _ort_matches_torch(onnx_path, cnn, x)
        graphs[lowering] = onnx.load(str(onnx_path))
        assert get_metadata(graphs[lowering])[META_LOWERING] == result.lowering
    # auto timed those that change something (no relu/leaky_relu/identity pair: no folded_tanh)
    assert result.lowering in ("scatter", "permuted", "folded")
    assert set(result.report["selection"]["median_ms"]) == {"scatter", "permuted", "folded"}

    # scatter: Gather per group and the inverse Gather; permuted: Split, no index op
    for path in ("2", "6"):
        assert {"Gather", "Concat"} <= _op_types(graphs["scatter"], path)
        assert "Split" not in _op_types(graphs["scatter"], path)
        assert {"Split", "Concat"} <= _op_types(graphs["permuted"], path)
        assert "Gather" not in _op_types(graphs["permuted"], path)
    assert not [
        n for n in graphs["permuted"].graph.node if n.op_type in ("Gather", "ScatterElements")
    ]
    folds = {
        f["layer"]: f
        for f in json.loads((tmp_path / "permuted/1/export.json").read_text())["folds"]
    }
    assert folds["2"] | {"reason": None} == {
        "layer": "2", "features": 4, "groups": folds["2"]["groups"], "form": "permuted",
        "reason": None, "producer": "0", "between": ["1", "3"], "consumer": "5", "block": 16,
        "max_pool": "3", "after_pool": True, "pool_reason": None, "axis": 1, "scales": "1",
        "scale_reason": None, "affine_reason": None,
        "folded": f"candidate norm into 5: {folds['2']['groups']} -> {folds['2']['groups']} groups",
        "folded_kept": None,
    }  # fmt: skip
    assert (folds["6"]["producer"], folds["6"]["between"], folds["6"]["consumer"]) == ("5", [], "7")
    assert (folds["6"]["max_pool"], folds["6"]["after_pool"]) == (None, False)
    # conv -> BN -> mixed -> MaxPool: scatter keeps that order, permuted runs the pool first, on
    # the Conv's output (the exporter folds the BN into the Conv), and the layer on the pool's
    assert _pool_order(graphs["scatter"], "2") == ("2", "layer first")
    assert _pool_order(graphs["permuted"], "2") == ("Conv", "pool first")

    # the entry: config dims of the example, the spec of the module
    config = (tmp_path / "permuted" / "config.pbtxt").read_text()
    assert "dims: [ 1, 8, 8 ]" in config and "dims: [ 3 ]" in config
    meta = get_metadata(graphs["permuted"])
    assert META_RUN not in meta
    spec = ModelSpec.from_dict(json.loads(meta[META_SPEC]))
    assert (spec.arch, spec.input_shape, spec.layers, spec.labels) == (
        [64, 4, 10, 3],
        [1, 8, 8],
        None,
        ["a", "b", "c"],
    )
    assert spec.pool == POOL and spec.mode == "smartmixed"
    assert spec.assignment == [cnn[2].names(), cnn[6].names()]
    assert spec.preprocessing == {"offset": 0.0, "scale": 1.0}
    assert spec.training["frozen_layers"] == ["2", "6"]
    # an MLP-like spec of an image model's shape is valid as it is
    ModelSpec(
        arch=[784, 6, 10],
        pool=["relu", "tanh"],
        mode="smartmixed",
        assignment=[["relu", "tanh"] * 3],
        preprocessing={"offset": 0.0, "scale": 1.0},
        input_shape=[1, 28, 28],
        labels=[str(i) for i in range(10)],
    ).validate()


def test_an_mlp_block_inside_another_module_on_tokens(tmp_path: Path) -> None:
    torch.manual_seed(1)
    block = _spread_and_freeze(TokenBlock(), seed=1)
    assert _unsorted(block) == ["mlp.1"]
    tokens = torch.randn(20, 5, 6)
    result = export_module(
        block,
        tokens[:2],
        repository=tmp_path,
        name="tokens",
        lowering="permuted",
        test_inputs=tokens,
    )
    assert [_brief(f) for f in result.report["folds"]] == [("mlp.1", "permuted", "mlp.0", "mlp.2")]
    assert result.report["test_data"] == "20 test inputs given"
    sets = {r["input_set"] for r in result.report["verification"]["results"]}
    assert sets == {"test", "random", "edge"}
    path = result.entry / "1" / "model.onnx"
    _ort_matches_torch(path, block, torch.randn(7, 5, 6))
    assert "Gather" not in _op_types(onnx.load(str(path)), "mlp.1")
    assert "dims: [ 5, 6 ]" in (result.entry / "config.pbtxt").read_text()


def _brief(fold: dict) -> tuple:
    return tuple(fold[k] for k in ("layer", "form", "producer", "consumer"))


def test_layers_whose_neighbours_forbid_the_fold_are_reported(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = _spread_and_freeze(Unfoldable(), seed=2)
    assert _unsorted(model) == ["first", "residual", "viewed", "ok"]
    example = torch.randn(2, 6)
    reasons = {f.layer: (f.form, f.reason) for f in plan_folds(model, example)}
    assert reasons == {
        "first": ("scatter", "its input is the model's input, not a Linear or Conv2d output"),
        "residual": ("scatter", "the output of fc1 is used 2 times (residual, the function add)"),
        "viewed": (
            "scatter",
            "the tensor method .view() after it is not a Linear, Conv2d or per-channel module",
        ),
        "ok": ("permuted", None),
    }
    result = export_module(model, example, repository=tmp_path, name="m", lowering="permuted")
    graph = onnx.load(str(result.entry / "1" / "model.onnx"))
    for path in ("first", "residual", "viewed"):  # kept as they are, and verified
        assert "Gather" in _op_types(graph, path)
    assert "Gather" not in _op_types(graph, "ok")

    class Untraceable(nn.Module):  # control flow on a value: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = (
                nn.Linear(6, 8),
                MixedActivation(8, pool=POOL),
                nn.Linear(8, 3),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.out(self.act(h if h.sum() > 0 else -h))

    folds = plan_folds(_spread_and_freeze(Untraceable(), seed=3), example)
    assert [(f.form, f.reason.split(" (")[0]) for f in folds] == [
        ("scatter", "torch.fx cannot trace Untraceable")
    ]


class LeNetStyle(nn.Module):
    """Written as such networks often are: one pool module called twice, a pooling function and
    torch.flatten in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(1, 4, 3, padding=1), MixedActivation(4, dim=1, pool=POOL)
        self.conv2, self.act2 = nn.Conv2d(4, 6, 3, padding=1), MixedActivation(6, dim=1, pool=POOL)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.act3, self.fc2 = (
            nn.Linear(24, 8),
            MixedActivation(8, pool=POOL),
            nn.Linear(8, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8)
        x = self.pool(self.act1(self.conv1(x)))  # (N, 4, 4, 4)
        x = self.pool(self.act2(self.conv2(x)))  # (N, 6, 2, 2)
        x = F.avg_pool2d(x, 1)
        return self.fc2(self.act3(self.fc1(torch.flatten(x, 1))))


def test_reused_pools_pooling_functions_and_torch_flatten_fold(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = _spread_and_freeze(LeNetStyle(), seed=4)
    assert _unsorted(model) == ["act1", "act2", "act3"]
    example = torch.randn(2, 1, 8, 8)
    folds = [
        (f.layer, f.producer, f.between, f.consumer, f.block, f.max_pool, f.after_pool)
        for f in plan_folds(model, example)
    ]
    assert folds == [
        ("act1", "conv1", ["pool"], "conv2", 1, "pool", True),
        ("act2", "conv2", ["pool"], "fc1", 4, "pool", True),
        ("act3", "fc1", [], "fc2", 1, None, False),
    ]
    result = export_module(model, example, repository=tmp_path, name="lenet", lowering="permuted")
    path = result.entry / "1" / "model.onnx"
    graph = onnx.load(str(path))
    assert not [n for n in graph.graph.node if n.op_type == "Gather"]
    # the one pool module runs first at each of its two calls, each call before its own layer
    assert _pool_order(graph, "act1", pool=0) == ("Conv", "pool first")
    assert _pool_order(graph, "act2", pool=1) == ("Conv", "pool first")
    _ort_matches_torch(path, model, torch.randn(9, 1, 8, 8) * 3)


class FunctionalPools(nn.Module):
    """Max pools written as functions, F.max_pool2d (padded) and torch.max_pool2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(1, 4, 3, padding=1), MixedActivation(4, dim=1, pool=POOL)
        self.conv2, self.act2 = nn.Conv2d(4, 6, 3, padding=1), MixedActivation(6, dim=1, pool=POOL)
        self.fc = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 7, 7)
        x = F.max_pool2d(self.act1(self.conv1(x)), 3, stride=2, padding=1)  # (N, 4, 4, 4)
        x = torch.max_pool2d(self.act2(self.conv2(x)), 2)  # (N, 6, 2, 2)
        return self.fc(x.flatten(1))


def test_a_layer_runs_after_a_max_pool_function(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = _spread_and_freeze(FunctionalPools(), seed=5)
    assert _unsorted(model) == ["act1", "act2"]
    example = torch.randn(2, 1, 7, 7)
    described = [f.describe().split(": ", 1)[1] for f in plan_folds(model, example)]
    assert described == [
        "4 features, 3 groups: permuted (through conv1 > conv2), after maxpool max_pool2d() "
        "(monotone)",
        "6 features, 4 groups: permuted (through conv2 > fc), after maxpool max_pool2d() "
        "(monotone)",
    ]
    result = export_module(model, example, repository=tmp_path, name="f", lowering="permuted")
    path = result.entry / "1" / "model.onnx"
    graph = onnx.load(str(path))
    assert _pool_order(graph, "act1", pool=0) == ("Conv", "pool first")
    assert _pool_order(graph, "act2", pool=1) == ("Conv", "pool first")
    # large values reach every activation's tails, the padded border included
    _ort_matches_torch(path, model, torch.randn(9, 1, 7, 7) * 6)


def test_failed_verification_writes_nothing(
    cnn: nn.Sequential, tmp_path: Path, monkeypatch
) -> None:
    real = module_folds.permuted_copy

    def wrong_fold(model, plans):  # a fold that forgot to move one bias
        out = real(model, plans)
        with torch.no_grad():
            out.get_submodule("0").bias.add_(0.05)
        return out

    monkeypatch.setattr(module_folds, "permuted_copy", wrong_fold)
    models = tmp_path / "models"
    with pytest.raises(
        VerificationError,
        match=r"^the \w+ lowering: ONNX Runtime does not match PyTorch: .*random \(basic, 512 "
        r"samples\): logits max abs diff",
    ):
        export_module(
            cnn, torch.randn(2, 1, 8, 8), repository=models, name="cnn", lowering="permuted"
        )
    assert not models.exists() or not any(models.iterdir())


MERGE_POOL = ["relu", "sigmoid", "tanh", "leaky_relu", "elu"]


class MergeNet(nn.Module):
    """Frozen layers holding relu, leaky_relu, tanh, sigmoid and elu, set explicitly, in no sorted
    order: conv -> BN -> act1 -> max pool -> conv2 (padding ``pad``) -> act2 -> flatten -> fc1
    -> act3 (with the candidate norm) -> fc2."""

    def __init__(self, *, pad: int = 0, norm1: str = "none") -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.act1 = FrozenMixedActivation(
            MERGE_POOL,
            ["tanh", "relu", "sigmoid", "leaky_relu", "elu", "tanh"],
            dim=1,
            candidate_norm=norm1,
        )
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=pad)
        self.act2 = FrozenMixedActivation(
            MERGE_POOL,
            ["sigmoid", "elu", "tanh", "relu", "leaky_relu", "tanh", "relu", "sigmoid"],
            dim=1,
            candidate_norm="none",
        )
        self.fc1 = nn.Linear(8 * (3 + 2 * pad) ** 2, 10)
        self.act3 = FrozenMixedActivation(MERGE_POOL, [2, 0, 3, 1, 4, 2, 1, 0, 3, 4])  # standard
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 10, 10)
        x = self.pool(self.act1(self.bn(self.conv1(x))))  # (N, 6, 5, 5)
        x = self.act2(self.conv2(x))  # (N, 8, 3, 3), padded (N, 8, 5, 5)
        return self.fc2(self.act3(self.fc1(torch.flatten(x, 1))))


def _activation_counts(structure: dict[str, int]) -> int:
    """The activation nodes of one layer's structure (no Split, Concat, candidate norm)."""
    return sum(n for op, n in structure.items() if op not in ("Split", "Concat", "Sub", "Mul"))


def test_folded_merges_groups_through_the_neighbours(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = _spread_and_freeze(MergeNet(), seed=6)
    example = torch.randn(2, 1, 10, 10)
    folds = plan_folds(model, example)
    assert [(f.layer, f.folded, f.folded_kept, f.scales) for f in folds] == [
        ("act1", "relu + leaky_relu as prelu, tanh into sigmoid: 5 -> 3 groups", None, "bn"),
        ("act2", "relu + leaky_relu as prelu, tanh into sigmoid: 5 -> 3 groups", None, "conv2"),
        (
            "act3",
            "relu + leaky_relu as prelu, tanh into sigmoid, candidate norm into fc2: 5 -> 3 groups",
            None,
            "fc1",
        ),
    ]
    assert module_lowerings(model, folds) == MODULE_LOWERINGS  # each one a different graph
    x = torch.randn(33, 1, 10, 10) * 4
    structure = {}
    for lowering in ("permuted", "folded", "folded_tanh"):
        result = export_module(
            model, example, repository=tmp_path, name=lowering, lowering=lowering
        )
        assert result.lowering == lowering
        path = result.entry / "1" / "model.onnx"
        _ort_matches_torch(path, model, x)
        structure[lowering] = result.report["structure"][lowering]
        if lowering == "folded":  # torch's prelu: the slope per channel [C, 1, 1], per neuron [n]
            graph = onnx.load(str(path))
            shapes = {i.name: list(i.dims) for i in graph.graph.initializer}
            slopes = {
                layer: [
                    shapes[n.input[1]] for n in layer_nodes(graph, layer) if n.op_type == "PRelu"
                ]
                for layer in ("act1", "act2", "act3")
            }
            assert slopes == {"act1": [[2, 1, 1]], "act2": [[3, 1, 1]], "act3": [[4]]}
    for layer in ("act1", "act2", "act3"):
        counts = [_activation_counts(structure[lw][layer]) for lw in structure]
        assert counts == [5, 3, 4]  # permuted, folded, folded_tanh
        assert "Tanh" not in structure["folded"][layer] | structure["folded_tanh"][layer]
    assert structure["folded"]["act1"] == {
        "Concat": 1, "Elu": 1, "PRelu": 1, "Sigmoid": 1, "Split": 1,
    }  # fmt: skip
    # the candidate norm went into fc2: no Sub or Mul left in act3
    assert {"Sub", "Mul"} <= set(structure["permuted"]["act3"])
    assert not {"Sub", "Mul"} & set(structure["folded"]["act3"])


def test_folded_keeps_tanh_apart_where_the_constant_cannot_pass(tmp_path: Path) -> None:
    torch.manual_seed(7)
    model = _spread_and_freeze(MergeNet(pad=1), seed=7)
    example = torch.randn(2, 1, 10, 10)
    first = plan_folds(model, example)[0]
    assert first.describe_folded() == (
        "act1: folded relu + leaky_relu as prelu: 5 -> 4 groups; keeps tanh apart from sigmoid "
        "(conv2 pads its input by 1 with zeros, which the constant would not shift)"
    )
    result = export_module(model, example, repository=tmp_path, name="m", lowering="folded")
    assert result.report["structure"]["folded"]["act1"] == {
        "Concat": 1, "Elu": 1, "PRelu": 1, "Sigmoid": 1, "Split": 1, "Tanh": 1,
    }  # fmt: skip
    _ort_matches_torch(result.entry / "1" / "model.onnx", model, torch.randn(9, 1, 10, 10) * 4)
    # a layer that still has its candidate norm there merges nothing
    normed = _spread_and_freeze(MergeNet(pad=1, norm1="standard"), seed=7)
    assert plan_folds(normed, example)[0].describe_folded() == (
        "act1: folded merges nothing (the candidate norm and every group (conv2 pads its input "
        "by 1 with zeros, which the constant would not shift))"
    )


@pytest.mark.parametrize(
    ("build", "example", "options", "message"),
    [
        (
            lambda: small_cnn(),
            torch.zeros(2, 1, 8, 8),
            {},
            "Sequential: 2, 6 still a MixedActivation; freeze it first (smartmixed.nn.freeze(model))",
        ),
        (
            lambda: nn.Sequential(nn.Linear(4, 3)),
            torch.zeros(2, 4),
            {},
            "Sequential holds no FrozenMixedActivation: nothing SmartMixed to export "
            "(torch.onnx.export it directly)",
        ),
        (
            lambda: freeze(small_cnn()),
            torch.zeros(2, 1, 12, 12),
            {},
            "the model fails on an input of shape [2, 1, 12, 12] (RuntimeError: mat1 and mat2 "
            "shapes cannot be multiplied (2x144 and 64x10))",
        ),
        (
            lambda: freeze(small_cnn()),
            torch.zeros(2, 1, 8, 8),
            {"labels": ["a", "b"]},
            "spec field 'labels': expected 3 class labels, got 2",
        ),
        (
            lambda: freeze(small_cnn()),
            torch.zeros(2, 1, 8, 8),
            {"lowering": "grouped"},
            "--lowering 'grouped': a module is lowered auto, scatter, permuted, folded, "
            "folded_tanh",
        ),
        (
            lambda: freeze(small_cnn()),
            torch.zeros(2, 1, 8, 8),
            {"test_inputs": np.zeros((5, 64))},
            "test_inputs: expected shape (N, 1, 8, 8) with N >= 1, got [5, 64]",
        ),
    ],
    ids=["not frozen", "no mixed layer", "fails on the shape", "labels", "lowering", "test inputs"],
)
def test_bad_requests_are_refused_in_one_line(
    build, example, options, message, tmp_path: Path
) -> None:
    with pytest.raises(ExportError) as refused:
        export_module(build(), example, repository=tmp_path / "models", name="m", **options)
    assert str(refused.value) == message
    assert not (tmp_path / "models" / "m").exists()


def test_a_layered_run_is_exported_as_a_module(tmp_path: Path, monkeypatch) -> None:
    """A run whose spec has layers (a conv net): the network train's load_model builds goes
    through the module path, with the run's spec as META_SPEC and its test set (flat rows of
    the data, reshaped to (N, *input_shape)) among the verification inputs. The network is given
    here (what load_model returns for such a run), so the export path is tested on its own."""
    torch.manual_seed(3)
    net = nn.Sequential(*small_cnn()[:-1], nn.Linear(10, 10))  # digits: 10 classes
    net = _spread_and_freeze(net, seed=3)
    spec = ModelSpec(
        arch=[64, 4, 10, 10],
        pool=POOL,
        mode="smartmixed",
        assignment=[net[2].names(), net[6].names()],
        preprocessing={"offset": 0.0, "scale": 1.0},
        input_shape=[1, 8, 8],
        labels=[str(i) for i in range(10)],
        training={"data_request": {"source": "digits", "seed": 42}},
        layers=[
            {"type": "conv", "channels": 4, "kernel": 3, "padding": 1},
            {"type": "batchnorm"},
            {"type": "maxpool", "kernel": 2},
            {"type": "flatten"},
            {"type": "linear", "features": 10},
            {"type": "linear", "features": 10},
        ],
    )
    monkeypatch.setattr(repository, "load_model", lambda run_dir: (spec, net))
    run = tmp_path / "conv"
    models = tmp_path / "models"
    result = repository.export_run(run_dir=run, repository=models, lowering="permuted")
    tested = [r for r in result.report["verification"]["results"] if r["input_set"] == "test"]
    assert [(r["samples"], r["argmax_agreement"]) for r in tested] == [(360, 1.0)] * 2
    assert [f["form"] for f in result.report["folds"]] == ["permuted", "permuted"]
    meta = get_metadata(onnx.load(str(result.entry / "1" / "model.onnx")))
    assert json.loads(meta[META_SPEC]) == spec.to_dict() and meta[META_RUN] == str(run)
    assert "dims: [ 1, 8, 8 ]" in (models / "conv" / "config.pbtxt").read_text()
    # --verify-only reads it back: the run's network on inputs of the spec's input_shape
    report = repository.verify_entry(models / "conv")
    assert max(r["tolerance_used"] for r in report["results"]) <= 1
    assert {r["input_set"] for r in report["results"]} == {
        "test",
        "random",
        "edge",
    }

    for options, message in (
        ({"quantize": "int8"}, f"{run}: --quantize int8 applies to MLP runs; this run is a layered (conv) network"),
        ({"lowering": "grouped"}, f"--lowering grouped: {run} is a layered (conv) network, lowered scatter or permuted or folded or folded_tanh (or auto)"),
    ):  # fmt: skip
        with pytest.raises(ExportError) as refused:
            repository.export_run(run_dir=run, repository=models, name="other", **options)
        assert str(refused.value) == message
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["conv"]


def _random_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), MixedActivation(16, dim=1),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 14 * 14, 64), MixedActivation(64),
        nn.Linear(64, 10),
    )  # fmt: skip
    return freeze(net.eval())


def test_edge_inputs_allow_pytorchs_own_float32_error(tmp_path: Path, monkeypatch) -> None:
    """An untrained CNN fed the edge set's +-1000 inputs: float32 cannot hold 1e-4 there (the
    convolution's terms cancel), ORT and torch round apart by ~1.1x atol + rtol |torch| on this
    seed; the rule allows twice torch's own distance from the float64 model, and says so."""
    net = _random_cnn(2)
    sample = torch.rand(2, 1, 28, 28)
    result = export_module(net, sample, repository=tmp_path, name="cnn", lowering="scatter")
    rule = result.report["verification"]["tolerance"]
    assert rule["rule"] == "|onnx - torch| <= atol + rtol * |torch| + 2 |torch - torch64|"
    assert rule["torch64"] == "float64 copy of the model"
    # without the torch64 term this graph fails on the edge set: the term is what passes it
    onnx_model = module_export.to_onnx(net, sample, opset=17)
    inputs = input_sets((1, 28, 28), test_x=None, low=0.0, high=1.0)
    monkeypatch.setattr(verify, "exact_outputs", lambda reference, inputs: (None, "off"))
    with pytest.raises(VerificationError, match=r"edge \(basic, 7 samples\)"):
        verify.verify_against_torch(onnx_model, net, inputs, n_classes=10)


def test_a_model_that_cannot_run_in_float64_is_checked_without_torch64() -> None:
    class Strict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _random_cnn(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.float32:
                raise TypeError("float32 input only")
            return self.net(x)

    model = Strict().eval()
    sample = torch.rand(2, 1, 28, 28)
    inputs = input_sets((1, 28, 28), test_x=None, low=0.0, high=1.0)
    inputs = {"random": inputs["random"][:8]}
    report = verify.verify_against_torch(
        module_export.to_onnx(model, sample, opset=17), model, inputs, n_classes=10
    )
    assert report["tolerance"]["rule"] == "|onnx - torch| <= atol + rtol * |torch|"
    assert report["tolerance"]["torch64"] == (
        "the model does not run in float64 (TypeError: float32 input only)"
    )
