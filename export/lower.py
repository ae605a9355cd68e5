"""Lower a frozen mixed network (model.json + weights) to an ONNX graph.

Three lowerings of the same function, all pure functions of (spec, weights):

- ``scatter``: the literal form. Per hidden layer one Gemm; per activation group a
  Gather(axis=1) of that group's neuron indices and the activation; the groups are concatenated
  and one Gather with the inverse permutation restores neuron order.
- ``permuted``: each hidden layer's neurons are reordered so that groups are contiguous: rows of
  W_l and b_l by the permutation P_l, and the columns of W_{l+1} by the same P_l. For an
  elementwise activation f applied neuron by neuron,
      W_{l+1} P_l^T f(P_l (W_l x + b_l)) = W_{l+1} f(W_l x + b_l),
  so the network computes the same function. A layer is then Gemm -> Split -> activations ->
  Concat, with no index ops.
- ``grouped``: the same permutation, then one Gemm per group (its rows of W_l, b_l) followed by
  the group's activation, and a Concat. ONNX Runtime's CPU provider fuses Gemm with a following
  activation for several ops.

Layers with a single group (every layer of a fixed model) lower to Gemm + activation in every
form. The input is raw features; the preprocessing (x - offset) * scale is part of the graph.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from smartmixed.train.model import ModelSpec
from smartmixed.train.pool import LEAKY_RELU_SLOPE, SELU_ALPHA, SELU_SCALE, SOFTPLUS_THRESHOLD

LOWERINGS = ("scatter", "permuted", "grouped")
DEFAULT_OPSET = 17
INPUT, LOGITS, PROBABILITIES = "input", "logits", "probabilities"
# Names and dynamic axes, declared once: every tensor's dim 0 is the batch.
IO_AXES: dict[str, dict[int, str]] = {
    INPUT: {0: "batch"},
    LOGITS: {0: "batch"},
    PROBABILITIES: {0: "batch"},
}
# Split with its sizes as an input (and Softmax over one axis) exist from opset 13.
MIN_OPSET = 13


class LoweringError(ValueError):
    """A model that cannot be lowered as asked (unknown lowering, opset lacking an op)."""


class _Graph:
    """Collects nodes and initializers; every value gets a unique, readable name."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self._names:
            candidate, i = f"{name}_{i}", i + 1
        self._names.add(candidate)
        return candidate

    def const(self, name: str, value: np.ndarray) -> str:
        name = self._unique(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, n_out: int = 1, **attrs):
        outputs = [self._unique(name if n_out == 1 else f"{name}_{i}") for i in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outputs, name=outputs[0], **attrs)
        )
        return outputs[0] if n_out == 1 else outputs


# --------------------------------------------------------------------------------------------
# Activations: pool name -> ONNX ops (torch semantics exactly, standard ops only)


def _softplus(g: _Graph, x: str, name: str) -> str:
    # torch: softplus(x) = x above the threshold 20, log(1 + exp(x)) below
    threshold = g.const(f"{name}/threshold", np.array(SOFTPLUS_THRESHOLD, np.float32))
    above = g.op("Greater", [x, threshold], f"{name}/above")
    return g.op("Where", [above, x, g.op("Softplus", [x], f"{name}/log1pexp")], name)


def _gelu(g: _Graph, x: str, name: str) -> str:
    if g.opset >= 20:
        return g.op("Gelu", [x], name, approximate="none")
    # x * 0.5 * (1 + erf(x / sqrt(2)))
    inv_sqrt2 = g.const(f"{name}/inv_sqrt2", np.array(1 / math.sqrt(2), np.float32))
    half, one = (
        g.const(f"{name}/{n}", np.array(v, np.float32)) for n, v in (("half", 0.5), ("one", 1.0))
    )
    erf = g.op("Erf", [g.op("Mul", [x, inv_sqrt2], f"{name}/scaled")], f"{name}/erf")
    cdf = g.op("Mul", [g.op("Add", [erf, one], f"{name}/erf1"), half], f"{name}/cdf")
    return g.op("Mul", [x, cdf], name)


ACTIVATION_OPS: dict[str, Callable[[_Graph, str, str], str]] = {
    "relu": lambda g, x, n: g.op("Relu", [x], n),
    "sigmoid": lambda g, x, n: g.op("Sigmoid", [x], n),
    "tanh": lambda g, x, n: g.op("Tanh", [x], n),
    "leaky_relu": lambda g, x, n: g.op("LeakyRelu", [x], n, alpha=LEAKY_RELU_SLOPE),
    "elu": lambda g, x, n: g.op("Elu", [x], n, alpha=1.0),
    "selu": lambda g, x, n: g.op("Selu", [x], n, alpha=SELU_ALPHA, gamma=SELU_SCALE),
    "gelu": _gelu,
    "silu": lambda g, x, n: g.op("Mul", [x, g.op("Sigmoid", [x], f"{n}/sigmoid")], n),
    "softplus": _softplus,
    "mish": lambda g, x, n: g.op(
        "Mul", [x, g.op("Tanh", [_softplus(g, x, f"{n}/softplus")], f"{n}/tanh")], n
    ),
    "softsign": lambda g, x, n: g.op("Softsign", [x], n),
    "identity": lambda g, x, n: g.op("Identity", [x], n),
}


# --------------------------------------------------------------------------------------------
# Groups and permutations


def layer_groups(spec: ModelSpec) -> list[list[tuple[str, np.ndarray]]]:
    """Per hidden layer: [(activation, neuron indices)] for each non-empty group, pool order."""
    layers = []
    for names in spec.assignment:
        index = np.array([spec.pool.index(n) for n in names])
        layers.append(
            [(a, np.flatnonzero(index == k)) for k, a in enumerate(spec.pool) if (index == k).any()]
        )
    return layers


def permuted_weights(
    spec: ModelSpec, state: dict[str, np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Weights with each hidden layer's neurons in grouped order (see the module docstring)."""
    n_layers = len(spec.arch) - 1
    weights = [state[f"layers.{i}.weight"] for i in range(n_layers)]
    biases = [state[f"layers.{i}.bias"] for i in range(n_layers)]
    for i, groups in enumerate(layer_groups(spec)):
        perm = np.concatenate([idx for _, idx in groups])  # grouped position -> neuron
        weights[i], biases[i] = weights[i][perm], biases[i][perm]
        weights[i + 1] = weights[i + 1][:, perm]
    return weights, biases


# --------------------------------------------------------------------------------------------
# The lowering


def lower(
    spec: ModelSpec,
    state: dict[str, np.ndarray],
    *,
    lowering: str,
    opset: int = DEFAULT_OPSET,
    name: str = "smartmixed",
) -> onnx.ModelProto:
    """ONNX model: input "input" float32 [batch, D] raw features -> "logits", "probabilities"."""
    if lowering not in LOWERINGS:
        raise LoweringError(
            f"unknown lowering {lowering!r}; expected one of {', '.join(LOWERINGS)}"
        )
    if opset < MIN_OPSET:
        raise LoweringError(
            f"opset {opset} lacks ops this model needs (Split with its sizes as an input, "
            f"opset >= {MIN_OPSET}); choose --opset {MIN_OPSET} or newer"
        )
    if opset > onnx.defs.onnx_opset_version():
        raise LoweringError(
            f"opset {opset} is newer than this onnx package knows "
            f"({onnx.defs.onnx_opset_version()})"
        )
    state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    g = _Graph(opset)
    h = INPUT
    pre = spec.preprocessing
    if np.any(np.asarray(pre["offset"]) != 0):
        h = g.op(
            "Sub", [h, g.const("preprocess/offset", np.float32(pre["offset"]))], "preprocess/sub"
        )
    if np.any(np.asarray(pre["scale"]) != 1):
        h = g.op(
            "Mul", [h, g.const("preprocess/scale", np.float32(pre["scale"]))], "preprocess/mul"
        )

    if lowering == "scatter":
        n_layers = len(spec.arch) - 1
        weights = [state[f"layers.{i}.weight"] for i in range(n_layers)]
        biases = [state[f"layers.{i}.bias"] for i in range(n_layers)]
    else:
        weights, biases = permuted_weights(spec, state)

    for i, groups in enumerate(layer_groups(spec)):
        p = f"layer{i}"
        w, b = weights[i], biases[i]
        if len(groups) == 1:  # one activation for the whole layer
            z = g.op("Gemm", [h, g.const(f"{p}/W", w), g.const(f"{p}/b", b)], f"{p}/gemm", transB=1)
            h = ACTIVATION_OPS[groups[0][0]](g, z, f"{p}/{groups[0][0]}")
            continue
        if lowering == "scatter":
            z = g.op("Gemm", [h, g.const(f"{p}/W", w), g.const(f"{p}/b", b)], f"{p}/gemm", transB=1)
            parts = []
            for act, idx in groups:
                picked = g.op(
                    "Gather", [z, g.const(f"{p}/{act}/indices", idx.astype(np.int64))],
                    f"{p}/{act}/gather", axis=1,
                )  # fmt: skip
                parts.append(ACTIVATION_OPS[act](g, picked, f"{p}/{act}"))
            grouped = g.op("Concat", parts, f"{p}/concat", axis=1)
            inverse = np.argsort(np.concatenate([idx for _, idx in groups])).astype(np.int64)
            h = g.op(
                "Gather", [grouped, g.const(f"{p}/inverse", inverse)], f"{p}/unpermute", axis=1
            )
        elif lowering == "permuted":
            z = g.op("Gemm", [h, g.const(f"{p}/W", w), g.const(f"{p}/b", b)], f"{p}/gemm", transB=1)
            sizes = g.const(f"{p}/sizes", np.array([len(idx) for _, idx in groups], np.int64))
            chunks = g.op("Split", [z, sizes], f"{p}/split", n_out=len(groups), axis=1)
            parts = [
                ACTIVATION_OPS[act](g, c, f"{p}/{act}")
                for (act, _), c in zip(groups, chunks, strict=True)
            ]
            h = g.op("Concat", parts, f"{p}/concat", axis=1)
        else:  # grouped
            parts, start = [], 0
            for act, idx in groups:
                rows = slice(start, start + len(idx))
                start += len(idx)
                zk = g.op(
                    "Gemm", [h, g.const(f"{p}/{act}/W", w[rows]), g.const(f"{p}/{act}/b", b[rows])],
                    f"{p}/{act}/gemm", transB=1,
                )  # fmt: skip
                parts.append(ACTIVATION_OPS[act](g, zk, f"{p}/{act}"))
            h = g.op("Concat", parts, f"{p}/concat", axis=1)

    last = len(spec.arch) - 2
    g.op("Gemm", [h, g.const("output/W", weights[last]), g.const("output/b", biases[last])],
         LOGITS, transB=1)  # fmt: skip
    g.op("Softmax", [LOGITS], PROBABILITIES, axis=1)

    graph = helper.make_graph(
        g.nodes,
        name,
        [
            helper.make_tensor_value_info(
                INPUT, TensorProto.FLOAT, [IO_AXES[INPUT][0], spec.arch[0]]
            )
        ],
        [
            helper.make_tensor_value_info(out, TensorProto.FLOAT, [IO_AXES[out][0], spec.arch[-1]])
            for out in (LOGITS, PROBABILITIES)
        ],
        initializer=g.initializers,
        doc_string=f"smartmixed {spec.mode} {spec.arch}, lowering {lowering}",
    )
    opset_ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=opset_ids,
        producer_name="smartmixed",
        ir_version=helper.find_min_ir_version_for(opset_ids),
    )
    return model


def set_metadata(model: onnx.ModelProto, entries: dict[str, Any]) -> None:
    """metadata_props: strings as they are, everything else as JSON."""
    del model.metadata_props[:]
    for key, value in entries.items():
        text = value if isinstance(value, str) else json.dumps(value)
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=text))


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
