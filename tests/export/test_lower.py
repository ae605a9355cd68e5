from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_checks import assert_verified, mlp_spec

from smartmixed.export.lower import LOWERINGS, LoweringError, get_metadata, lower, set_metadata
from smartmixed.export.verify import VerificationError, input_sets, verify_against_torch
from smartmixed.nn.pool import ACTIVATIONS, DEFAULT_POOL
from smartmixed.train.model import MixedMLP, ModelSpec

ALL = list(ACTIVATIONS)


def make_spec(arch: list[int], pool: list[str], seed: int, **extra) -> ModelSpec:
    rng = np.random.default_rng(seed)
    assignment = []
    for width in arch[1:-1]:  # a random subset of the pool per layer: some groups stay empty
        allowed = rng.choice(len(pool), size=min(len(pool), int(rng.integers(1, 4))), replace=False)
        layer = [pool[int(k)] for k in rng.choice(allowed, width)]
        assignment.append(layer)
    if arch[1] > 2:
        assignment[0][0] = pool[-1]  # often a single-neuron group
    return mlp_spec(arch, pool, assignment, **extra)


def build(spec: ModelSpec, seed: int) -> tuple[MixedMLP, dict[str, np.ndarray]]:
    torch.manual_seed(seed)
    model = MixedMLP.from_spec(spec).eval()
    return model, {k: v.numpy() for k, v in model.canonical_state_dict().items()}


ARCHS = [[7, 5, 3], [13, 1, 4], [16, 31, 17, 9, 3], [5, 6, 6, 6, 6, 6, 6, 2], [30, 64, 2]]


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "x".join(map(str, a)))
@pytest.mark.parametrize("pool", [list(DEFAULT_POOL), ALL], ids=["default", "all"])
def test_every_lowering_verifies(lowering: str, arch: list[int], pool: list[str]) -> None:
    seed = len(arch) * 31 + arch[1]
    spec = make_spec(arch, pool, seed)
    model, state = build(spec, seed)
    onnx_model = lower(spec, state, lowering=lowering)
    inputs = input_sets(arch[0], test_x=None, low=-3.0, high=3.0, seed=seed)
    report = verify_against_torch(onnx_model, model, inputs, n_classes=arch[-1])
    assert_verified(report, onnx_model, model, inputs)


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def test_index_ops_only_in_scatter() -> None:
    spec = make_spec([20, 24, 12, 4], list(DEFAULT_POOL), 3)
    assert all(len(set(layer)) > 1 for layer in spec.assignment)
    _, state = build(spec, 3)
    graphs = {name: lower(spec, state, lowering=name) for name in LOWERINGS}
    assert {"Gather"} <= _op_types(graphs["scatter"])
    for name in ("permuted", "grouped"):
        assert not _op_types(graphs[name]) & {
            "Gather",
            "GatherElements",
            "ScatterElements",
            "Scatter",
        }
    assert "Split" in _op_types(graphs["permuted"])
    n_gemm = sum(n.op_type == "Gemm" for n in graphs["grouped"].graph.node)
    assert n_gemm == sum(len(set(layer)) for layer in spec.assignment) + 1


def test_fixed_model_is_gemm_and_one_activation_per_layer() -> None:
    arch = [10, 8, 6, 3]
    spec = ModelSpec(
        arch=arch,
        pool=["tanh"],
        mode="fixed:tanh",
        assignment=[["tanh"] * 8, ["tanh"] * 6],
        preprocessing={"offset": 0.0, "scale": 1 / 255},
        input_shape=[10],
        labels=["a", "b", "c"],
    )
    _, state = build(spec, 0)
    for lowering in LOWERINGS:
        ops = [n.op_type for n in lower(spec, state, lowering=lowering).graph.node]
        assert ops == ["Mul", "Gemm", "Tanh", "Gemm", "Tanh", "Gemm", "Softmax"]


def test_io_names_dynamic_batch_and_opsets() -> None:
    spec = make_spec([6, 5, 3], ALL, 1)
    _, state = build(spec, 1)
    model = lower(spec, state, lowering="permuted")
    (inp,) = model.graph.input
    assert inp.name == "input"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 6]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    assert model.opset_import[0].version == 17
    gelu_spec = ModelSpec(**{**spec.to_dict(), "pool": ["gelu"], "assignment": [["gelu"] * 5]})
    assert "Gelu" in _op_types(lower(gelu_spec, state, lowering="permuted", opset=20))
    assert "Erf" in _op_types(lower(gelu_spec, state, lowering="permuted", opset=17))
    with pytest.raises(LoweringError, match="opset 12 lacks ops this model needs"):
        lower(spec, state, lowering="permuted", opset=12)
    with pytest.raises(LoweringError, match="unknown lowering 'fast'"):
        lower(spec, state, lowering="fast")


def test_metadata_round_trip() -> None:
    spec = make_spec([6, 5, 3], ALL, 2)
    _, state = build(spec, 2)
    model = lower(spec, state, lowering="grouped")
    set_metadata(model, {"smartmixed.spec": spec.to_dict(), "smartmixed.lowering": "grouped"})
    loaded = onnx.load_from_string(model.SerializeToString())
    meta = get_metadata(loaded)
    assert meta["smartmixed.lowering"] == "grouped"
    import json

    assert ModelSpec.from_dict(json.loads(meta["smartmixed.spec"])) == spec


def test_a_wrong_graph_fails_verification_with_the_differences() -> None:
    spec = make_spec([9, 7, 3], list(DEFAULT_POOL), 4)
    model, state = build(spec, 4)
    bad = dict(state)
    bad["layers.1.bias"] = state["layers.1.bias"] + np.float32(1e-3)
    inputs = input_sets(
        9,
        test_x=np.random.default_rng(0).uniform(0, 1, (50, 9)).astype(np.float32),
        low=0.0,
        high=1.0,
    )
    with pytest.raises(
        VerificationError,
        match=r"test \(basic, 50 samples\): logits max abs diff [0-9.e-]+, max "
        r"rel diff [0-9.e-]+, [0-9.e+]+x the tolerance",
    ) as info:
        verify_against_torch(lower(spec, bad, lowering="permuted"), model, inputs, n_classes=3)
    assert info.value.report["passed"] is False
    assert {r["input_set"] for r in info.value.report["results"]} == {"test", "random", "edge"}


@pytest.mark.parametrize("opset", [13, 17, 20, 21])
def test_every_activation_at_every_supported_opset(opset: int) -> None:
    spec = ModelSpec(
        arch=[8, len(ALL) * 2, 3],
        pool=ALL,
        mode="smartmixed",
        assignment=[ALL + ALL],
        preprocessing={"offset": 0.0, "scale": 1.0},
        input_shape=[8],
        labels=["a", "b", "c"],
    )
    model, state = build(spec, opset)
    for lowering in LOWERINGS:
        onnx_model = lower(spec, state, lowering=lowering, opset=opset)
        assert onnx_model.opset_import[0].version == opset
        inputs = input_sets(8, test_x=None, low=-30.0, high=30.0, seed=opset)
        report = verify_against_torch(onnx_model, model, inputs, n_classes=3)
        assert_verified(report, onnx_model, model, inputs)
