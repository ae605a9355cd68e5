"""Every lowering writes the graph it wrote before its emitters became a table: the same nodes
(op, name, inputs, outputs, attributes) and the same initializers (name, type, shape, bytes), in
the same order. The fingerprints below were computed once from the five-way ``lower`` of
d12fde2, on seeded numpy weights (no torch: the fingerprints depend on nothing but the lowering).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from export_checks import mlp_spec
from onnx import helper, numpy_helper

from smartmixed.contract import AFU_PARAMS, ModelSpec, afu_tensor_name
from smartmixed.export.lower import LOWERINGS, lower

ALL = ["relu", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "gelu", "silu", "softplus", "mish",
       "softsign", "identity"]  # fmt: skip


def _shuffled(names: list[str], seed: int) -> list[str]:
    return [names[i] for i in np.random.default_rng(seed).permutation(len(names))]


# name -> (spec, opset): every branch of every lowering (one group, several, the folds' PRelu and
# tanh-into-sigmoid, extras at both gelu forms, the learned unit, a fixed model, no offset)
CASES: dict[str, tuple[ModelSpec, int]] = {
    "default-pool": (
        mlp_spec(
            [12, 18, 8, 3],
            ["relu", "sigmoid", "tanh", "leaky_relu", "elu", "selu"],
            [
                _shuffled(["relu", "sigmoid", "tanh", "leaky_relu", "elu", "selu"] * 3, 1),
                ["selu"] * 8,  # one group in a mixed network
            ],
        ),
        17,
    ),
    "extras-opset17": (mlp_spec([6, 24, 3], ALL, [_shuffled(ALL * 2, 2)]), 17),
    "extras-opset20": (mlp_spec([6, 24, 3], ALL, [_shuffled(ALL * 2, 3)]), 20),
    "afu": (
        mlp_spec(
            [8, 7, 5, 3],
            ["relu", "sigmoid", "tanh", "identity", "afu"],
            [
                ["afu", "relu", "tanh", "afu", "sigmoid", "identity", "afu"],
                ["afu"] * 5,
            ],
            afu={"units": 3, "base": "tanh", "share": "layer"},
        ),
        13,
    ),
    "fixed": (
        # fixed:tanh, pixels scaled by 1/255 (no offset)
        ModelSpec.untrained(
            arch=[10, 8, 6, 3], pool=["tanh"], assignment=[["tanh"] * 8, ["tanh"] * 6]
        ),
        17,
    ),
}


def _state(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 weights of the spec's shapes (and its learned units' parameters)."""
    rng = np.random.default_rng(seed)
    state = {}
    for i, (n_in, n_out) in enumerate(zip(spec.arch[:-1], spec.arch[1:], strict=True)):
        state[f"layers.{i}.weight"] = rng.normal(0, 1, (n_out, n_in)).astype(np.float32)
        state[f"layers.{i}.bias"] = rng.normal(0, 1, n_out).astype(np.float32)
    if spec.afu is not None:
        for layer in range(len(spec.arch) - 2):
            for p in AFU_PARAMS:
                size = 1 if p == "b1" else spec.afu["units"]
                state[afu_tensor_name(layer, p)] = rng.normal(0, 1, size).astype(np.float32)
    return state


def fingerprint(model: onnx.ModelProto) -> str:
    """sha256 (16 hex digits) of the graph's nodes, initializers, inputs and outputs, in order."""
    digest = hashlib.sha256()
    graph = model.graph
    for node in graph.node:
        attributes = sorted((a.name, repr(helper.get_attribute_value(a))) for a in node.attribute)
        described = (node.op_type, node.name, list(node.input), list(node.output), attributes)
        digest.update(repr(described).encode())
    for tensor in graph.initializer:
        digest.update(repr((tensor.name, tensor.data_type, list(tensor.dims))).encode())
        digest.update(numpy_helper.to_array(tensor).tobytes())
    for value in (*graph.input, *graph.output):
        digest.update(value.SerializeToString(deterministic=True))
    digest.update(repr((graph.name, graph.doc_string, model.ir_version)).encode())
    digest.update(repr([(o.domain, o.version) for o in model.opset_import]).encode())
    return digest.hexdigest()[:16]


# (case, lowering) -> fingerprint, computed at d12fde2
EXPECTED: dict[tuple[str, str], str] = {
    ("default-pool", "scatter"): "6139ec1eb94d432d",
    ("default-pool", "permuted"): "c176aab7417dff28",
    ("default-pool", "grouped"): "e273a4f20f3a752b",
    ("default-pool", "folded"): "ccc7fb049a126b9e",
    ("default-pool", "folded_tanh"): "b934bd1112a564e2",
    ("extras-opset17", "scatter"): "7c5ea0184d8e2fa5",
    ("extras-opset17", "permuted"): "7069562f47e40ded",
    ("extras-opset17", "grouped"): "46af971f291d46c6",
    ("extras-opset17", "folded"): "9983305fa7b72238",
    ("extras-opset17", "folded_tanh"): "05efa975404c15c1",
    ("extras-opset20", "scatter"): "27076b969b072f70",
    ("extras-opset20", "permuted"): "3b2db425a135984e",
    ("extras-opset20", "grouped"): "7df3aca8da0a26f6",
    ("extras-opset20", "folded"): "f61e7dce6caea177",
    ("extras-opset20", "folded_tanh"): "893a8f3836b7241b",
    ("afu", "scatter"): "6f62297cd36ee406",
    ("afu", "permuted"): "3867a1f2d2c97423",
    ("afu", "grouped"): "6b17cadb8598c909",
    ("afu", "folded"): "4c2256c56b142bd3",
    ("afu", "folded_tanh"): "f1a445f9e78ebc30",
    ("fixed", "scatter"): "e3f9143095925e10",
    ("fixed", "permuted"): "97df08fbe39c50cd",
    ("fixed", "grouped"): "76990a0d48072398",
    ("fixed", "folded"): "2c1744a41f38c078",
    ("fixed", "folded_tanh"): "24cd1e2a5194efe8",
}


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_the_graph_is_the_one_the_branchy_lower_wrote(case: str, lowering: str) -> None:
    spec, opset = CASES[case]
    model = lower(spec, _state(spec, seed=len(case)), lowering=lowering, opset=opset)
    assert fingerprint(model) == EXPECTED[(case, lowering)]


def test_a_changed_graph_changes_its_fingerprint() -> None:
    spec, opset = CASES["default-pool"]
    state = _state(spec, seed=0)
    model = lower(spec, state, lowering="permuted", opset=opset)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node[1].name = "other"
    nudged = lower(
        spec, {**state, "layers.1.bias": state["layers.1.bias"] + 1e-6}, lowering="permuted"
    )
    assert len({fingerprint(m) for m in (model, renamed, nudged)}) == 3
