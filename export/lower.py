"""Lower a frozen mixed network (model.json + weights) to an ONNX graph.

Five lowerings of the same function, all pure functions of (spec, weights):

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
- ``folded``: fewer groups per layer by exact algebra in the neighbouring affine maps, then
  lowered as ``permuted`` (Gemm -> Split -> one op per group -> Concat; Gemm -> op when one group
  is left). A neuron j of layer l with f(z) = a op(s z) + c, where op is its group's op, is
  rewritten as: row j of W_l and b_l times s (so the Gemm gives s z_j), column j of W_{l+1}
  times a, and b_{l+1} += c W_{l+1}[:, j] (the original column), since
      W_{l+1} f(z) + b_{l+1} = (W_{l+1} diag(a)) op(s z) + (b_{l+1} + W_{l+1} c).
  The folds:
  * relu, leaky_relu and identity: one PRelu group with a per-row slope 0, LEAKY_RELU_SLOPE, 1
    (s = a = 1, c = 0). PRelu(z, k) = z for z >= 0 and k z below is each of them, z = 0
    included; k is the float32 slope LeakyRelu and torch use, so every value is the same float
    (relu's k z = -0.0 equals 0). Only when at least two of them are in the layer; one alone
    keeps its own op (Relu, LeakyRelu, Identity).
  * tanh joins sigmoid, when the layer has both: tanh(z) = 2 sigmoid(2 z) - 1, so s = 2
    (exact in float), a = 2, c = -1: tanh rows of W_l, b_l doubled, their columns of W_{l+1}
    doubled, and b_{l+1} minus the sum of their original columns.
  The rest stays a group of its own: elu (Elu, alpha = ELU_ALPHA = 1) and selu (Selu, which is
  lambda elu_alpha with alpha = SELU_ALPHA) cannot share one Elu node: an Elu node has one alpha,
  and elu_alpha is no affine image of elu_1 (scaling z changes the rate of exp(z), scaling the
  output changes the slope above 0). The exact merge, selu = lambda alpha elu_1 + lambda
  (1 - alpha) relu, needs a second (relu) row per selu neuron; measured on the paper
  architecture it was slower at batch 1, 32 and 256 (the Gemms grow more than a node costs), so
  it is not done. Rewriting a lone selu group as Elu(alpha = SELU_ALPHA) with lambda in W_{l+1}
  saves nothing (one node either way). softsign, gelu, silu, softplus and mish have no exact
  affine relation to another group's op and stay as they are.
  Computed in float64 and rounded once to float32; rows untouched by a fold keep their weights
  bit for bit.
- ``folded_tanh``: ``folded`` without the PRelu merge (relu, leaky_relu, identity keep Relu,
  LeakyRelu, Identity). ONNX Runtime's CPU PRelu with a per-column slope runs about 25x slower
  per element than Relu or LeakyRelu (1.32), so the merge saves a node but costs more than that
  from batch ~32 on; ``auto`` times both.

The learned activation unit (``afu``) is a group like any other in every lowering and
folds with nothing: on its rows x (B, n), Reshape (1, B n) -> Gemm w0 (N, 1), b0 -> psi -> Gemm w1 (1, N), b1 ->
Reshape (B, n), with that layer's parameters ``afu.{l}.*`` (``_afu``).

Layers with a single group (every layer of a fixed model) lower to Gemm + activation in every
form. The input is raw features; the preprocessing (x - offset) * scale is part of the graph.

Each lowering is data (``FORMS``): the weights it reads (as trained, permuted into group order,
or folded) and the emitter of one hidden layer; ``lower`` writes the preprocessing, every hidden
layer through its lowering's emitter, the output Gemm and the softmax.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from smartmixed.contract import (
    AFU,
    AFU_PARAMS,
    ELU_ALPHA,
    INPUT,
    LEAKY_RELU_SLOPE,
    LOGITS,
    PROBABILITIES,
    SELU_ALPHA,
    SELU_SCALE,
    SOFTPLUS_THRESHOLD,
    ModelSpec,
    afu_tensor_name,
)

DEFAULT_OPSET = 17
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


def is_afu_node(node_name: str) -> bool:
    """Whether a node belongs to a learned unit's subgraph (``_afu`` names them so)."""
    return f"/{AFU}/" in node_name


def _afu(g: _Graph, x: str, name: str, params: dict[str, np.ndarray], base: str) -> str:
    """The learned unit G(x) = sum_i w1_i psi(w0_i x + b0_i) + b1 on x (B, n), units on a
    leading axis as pool.afu_apply computes it: Reshape x to z (1, B n); Gemm w0 (N, 1) z + b0
    (N, 1) -> u (N, B n); psi; Gemm w1 (1, N) psi(u) + b1 -> (1, B n); Reshape to Shape(x).
    Standard ops, opset >= 13. The leading units axis keeps the elementwise work on contiguous
    rows (a trailing axis of size N, Unsqueeze -> Mul/Add [N] -> MatMul [N, 1], measured ~10x
    slower in ONNX Runtime 1.32 at batch 32), and the two Gemms do the affine maps in one node
    each."""
    row = g.const(f"{name}/row", np.array([1, -1], np.int64))
    z = g.op("Reshape", [x, row], f"{name}/flatten")
    w0 = g.const(f"{name}/w0", params["w0"].reshape(-1, 1))
    b0 = g.const(f"{name}/b0", params["b0"].reshape(-1, 1))
    u = g.op("Gemm", [w0, z, b0], f"{name}/inner")  # (N, B n)
    p = ACTIVATION_OPS[base](g, u, f"{name}/{base}")
    w1 = g.const(f"{name}/w1", params["w1"].reshape(1, -1))
    b1 = g.const(f"{name}/b1", params["b1"].reshape(1, 1))
    s = g.op("Gemm", [w1, p, b1], f"{name}/sum")  # (1, B n)
    return g.op("Reshape", [s, g.op("Shape", [x], f"{name}/shape")], name)


ACTIVATION_OPS: dict[str, Callable[[_Graph, str, str], str]] = {
    "relu": lambda g, x, n: g.op("Relu", [x], n),
    "sigmoid": lambda g, x, n: g.op("Sigmoid", [x], n),
    "tanh": lambda g, x, n: g.op("Tanh", [x], n),
    "leaky_relu": lambda g, x, n: g.op("LeakyRelu", [x], n, alpha=LEAKY_RELU_SLOPE),
    "elu": lambda g, x, n: g.op("Elu", [x], n, alpha=ELU_ALPHA),
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


def afu_parameters(
    spec: ModelSpec, state: dict[str, np.ndarray]
) -> list[dict[str, np.ndarray]] | None:
    """Per hidden layer, its AFU's float32 w0, b0, w1 (N,) and b1 (1,); None without afu."""
    if spec.afu is None:
        return None
    return [
        {p: np.asarray(state[afu_tensor_name(layer, p)], np.float32) for p in AFU_PARAMS}
        for layer in range(len(spec.arch) - 2)
    ]


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
# Folds (``folded`` and ``folded_tanh``; the algebra is in the module docstring)

PRELU = "prelu"  # the merged piecewise-linear group: one PRelu with a slope per row
# activation -> its PRelu slope: f(z) = z for z > 0, slope * z otherwise
PRELU_SLOPES: dict[str, float] = {"relu": 0.0, "leaky_relu": LEAKY_RELU_SLOPE, "identity": 1.0}
# folded lowering -> whether relu, leaky_relu and identity merge into one PRelu group; both fold
# tanh into sigmoid. ONNX Runtime's CPU PRelu with a per-column slope is ~25x slower per element
# than Relu or LeakyRelu (1.32, measured), so the merge only pays where nodes cost more than
# elements (batch 1); ``auto`` times both.
MERGES_PRELU: dict[str, bool] = {"folded": True, "folded_tanh": False}
# (activation, group) -> (s, a, c) with f(z) = a * op(s * z) + c for the group's op; every other
# member of a group has (1, 1, 0). tanh(z) = 2 sigmoid(2 z) - 1.
AFFINE_FOLDS: dict[tuple[str, str], tuple[float, float, float]] = {
    ("tanh", "sigmoid"): (2.0, 2.0, -1.0),
}


@dataclass(frozen=True)
class ActivationGroup:
    """A contiguous block of a hidden layer's rows, lowered as one activation op."""

    name: str  # the op's activation name, or PRELU
    neurons: np.ndarray  # (rows,) the neuron behind each row
    members: dict[str, int]  # activation -> its neurons in this group
    slopes: np.ndarray | None = None  # (rows,) float32 PRelu slopes; PRELU only


def fold_layer(
    names: Sequence[str], pool: Sequence[str], *, merge_prelu: bool
) -> list[ActivationGroup]:
    """One hidden layer's groups after the folds, in pool order of each group's first member."""
    activations = np.asarray(names)
    present = [a for a in pool if a in set(names)]
    family = [a for a in present if a in PRELU_SLOPES]

    def group_of(a: str) -> str:
        if merge_prelu and len(family) > 1 and a in family:
            return PRELU
        if a == "tanh" and "sigmoid" in present:
            return "sigmoid"
        return a

    by_group: dict[str, list[str]] = {}
    for a in present:
        by_group.setdefault(group_of(a), []).append(a)
    groups = []
    for name, members in by_group.items():
        neurons = np.concatenate([np.flatnonzero(activations == a) for a in members])
        slopes = None
        if name == PRELU:
            slopes = np.array([PRELU_SLOPES[names[j]] for j in neurons], np.float32)
        counts = {a: int((activations == a).sum()) for a in members}
        groups.append(ActivationGroup(name, neurons, counts, slopes))
    return groups


def lowering_groups(spec: ModelSpec, *, lowering: str) -> list[list[ActivationGroup]]:
    """Per hidden layer, the activation groups ``lowering`` emits, in graph order."""
    if lowering in MERGES_PRELU:
        merge = MERGES_PRELU[lowering]
        return [fold_layer(names, spec.pool, merge_prelu=merge) for names in spec.assignment]
    return [
        [ActivationGroup(act, idx, {act: len(idx)}) for act, idx in layer]
        for layer in layer_groups(spec)
    ]


def folded_weights(
    spec: ModelSpec, state: dict[str, np.ndarray], *, merge_prelu: bool
) -> tuple[list[np.ndarray], list[np.ndarray], list[list[ActivationGroup]]]:
    """Weights of the folded network (float64 arithmetic, float32 result) and its groups."""
    n_layers = len(spec.arch) - 1
    weights = [np.asarray(state[f"layers.{i}.weight"], np.float64) for i in range(n_layers)]
    biases = [np.asarray(state[f"layers.{i}.bias"], np.float64) for i in range(n_layers)]
    plans = []
    for i, names in enumerate(spec.assignment):
        groups = fold_layer(names, spec.pool, merge_prelu=merge_prelu)
        perm = np.concatenate([group.neurons for group in groups])  # row -> neuron
        s, a, c = np.array(
            [
                AFFINE_FOLDS.get((names[j], group.name), (1.0, 1.0, 0.0))
                for group in groups
                for j in group.neurons
            ]
        ).T  # (rows,) each
        # W_{l+1} (a op(s z) + c) + b_{l+1} = (W_{l+1} diag(a)) op(s z) + (b_{l+1} + W_{l+1} c)
        biases[i + 1] = biases[i + 1] + weights[i + 1][:, perm] @ c
        weights[i + 1] = weights[i + 1][:, perm] * a  # (n_{l+1}, n_l)
        weights[i] = weights[i][perm] * s[:, None]  # (n_l, n_{l-1}): s z = (s W_l) x + s b_l
        biases[i] = biases[i][perm] * s
        plans.append(groups)
    return (
        [w.astype(np.float32) for w in weights],
        [b.astype(np.float32) for b in biases],
        plans,
    )


def lowering_summary(model: onnx.ModelProto, spec: ModelSpec, *, lowering: str) -> dict[str, Any]:
    """What ``lowering`` made of ``spec``: per hidden layer its groups (name, rows, activations
    in it) and the number of ONNX nodes the layer takes (read from ``model``), and the total."""
    names = [node.name for node in model.graph.node]
    layers = []
    for i, groups in enumerate(lowering_groups(spec, lowering=lowering)):
        layers.append(
            {
                "groups": [
                    {"name": group.name, "rows": len(group.neurons), "activations": group.members}
                    for group in groups
                ],
                "nodes": sum(name.startswith(f"layer{i}/") for name in names),
            }
        )
    return {"lowering": lowering, "layers": layers, "total_nodes": len(names)}


# --------------------------------------------------------------------------------------------
# The lowering: per lowering, the weights it reads and a per-layer emitter


@dataclass(frozen=True)
class Layer:
    """One hidden layer as an emitter writes it: its nodes and initializers are named under
    ``prefix``; ``weight`` (n_l, n_{l-1}) and ``bias`` (n_l,) hold its rows in the order of
    ``groups`` (or in neuron order, for scatter), each group lowered as one op."""

    prefix: str
    weight: np.ndarray
    bias: np.ndarray
    groups: list[ActivationGroup]
    afu: dict[str, np.ndarray] | None  # the layer's learned unit, when the pool has afu
    afu_base: str | None


Weights = tuple[list[np.ndarray], list[np.ndarray], list[list[ActivationGroup]]]
Emitter = Callable[[_Graph, str, Layer], str]  # (graph, the layer's input) -> its output


def _gemm(g: _Graph, x: str, w: np.ndarray, b: np.ndarray, prefix: str, out: str = "") -> str:
    """x W^T + b: one Gemm (transB) reading the initializers PREFIX/W and PREFIX/b."""
    w_name, b_name = g.const(f"{prefix}/W", w), g.const(f"{prefix}/b", b)
    return g.op("Gemm", [x, w_name, b_name], out or f"{prefix}/gemm", transB=1)


def _activate(g: _Graph, group: ActivationGroup, x: str, layer: Layer) -> str:
    """The group's op on x: its pool activation, one PRelu with a slope per row, or the
    layer's learned unit; named PREFIX/GROUP."""
    name = f"{layer.prefix}/{group.name}"
    if group.name == PRELU:  # slope (rows,) broadcasts over (B, rows)
        return g.op("PRelu", [x, g.const(f"{name}/slope", group.slopes)], name)
    if group.name == AFU:
        return _afu(g, x, name, layer.afu, layer.afu_base)
    return ACTIVATION_OPS[group.name](g, x, name)


def _one_group_layer(g: _Graph, x: str, layer: Layer) -> str:
    """Gemm -> the group's op: a layer with one activation, in every lowering."""
    z = _gemm(g, x, layer.weight, layer.bias, layer.prefix)
    return _activate(g, layer.groups[0], z, layer)


def _scatter_layer(g: _Graph, x: str, layer: Layer) -> str:
    """Gemm; per group a Gather(axis=1) of its neurons and its op; Concat; one Gather with the
    inverse permutation back to neuron order."""
    p, z = layer.prefix, _gemm(g, x, layer.weight, layer.bias, layer.prefix)
    parts = []
    for group in layer.groups:
        indices = g.const(f"{p}/{group.name}/indices", group.neurons.astype(np.int64))
        picked = g.op("Gather", [z, indices], f"{p}/{group.name}/gather", axis=1)
        parts.append(_activate(g, group, picked, layer))
    grouped = g.op("Concat", parts, f"{p}/concat", axis=1)
    inverse = np.argsort(np.concatenate([group.neurons for group in layer.groups]))
    inverse_name = g.const(f"{p}/inverse", inverse.astype(np.int64))
    return g.op("Gather", [grouped, inverse_name], f"{p}/unpermute", axis=1)


def _split_layer(g: _Graph, x: str, layer: Layer) -> str:
    """Gemm -> Split into the groups' contiguous rows -> one op per group -> Concat."""
    p, z = layer.prefix, _gemm(g, x, layer.weight, layer.bias, layer.prefix)
    sizes = g.const(f"{p}/sizes", np.array([len(gr.neurons) for gr in layer.groups], np.int64))
    chunks = g.op("Split", [z, sizes], f"{p}/split", n_out=len(layer.groups), axis=1)
    parts = [_activate(g, gr, c, layer) for gr, c in zip(layer.groups, chunks, strict=True)]
    return g.op("Concat", parts, f"{p}/concat", axis=1)


def _grouped_layer(g: _Graph, x: str, layer: Layer) -> str:
    """One Gemm per group over its contiguous rows, then its op; Concat."""
    parts, start = [], 0
    for group in layer.groups:
        rows = slice(start, start + len(group.neurons))
        start = rows.stop
        prefix = f"{layer.prefix}/{group.name}"
        z = _gemm(g, x, layer.weight[rows], layer.bias[rows], prefix)
        parts.append(_activate(g, group, z, layer))
    return g.op("Concat", parts, f"{layer.prefix}/concat", axis=1)


def _neuron_order(spec: ModelSpec, state: dict[str, np.ndarray]) -> Weights:
    """The weights as trained, the groups over neuron indices (scatter)."""
    n_layers = len(spec.arch) - 1
    weights = [state[f"layers.{i}.weight"] for i in range(n_layers)]
    biases = [state[f"layers.{i}.bias"] for i in range(n_layers)]
    return weights, biases, lowering_groups(spec, lowering="scatter")


def _group_order(spec: ModelSpec, state: dict[str, np.ndarray]) -> Weights:
    """Each hidden layer's rows permuted into group order (permuted, grouped)."""
    return (*permuted_weights(spec, state), lowering_groups(spec, lowering="permuted"))


@dataclass(frozen=True)
class Form:
    """How one lowering writes a network: the weights (and groups) it reads, and the emitter
    of a hidden layer with more than one group (a layer with one is ``_one_group_layer`` in
    every form)."""

    weights: Callable[[ModelSpec, dict[str, np.ndarray]], Weights]
    emit: Emitter


# lowering -> its form; the order is LOWERINGS'
FORMS: dict[str, Form] = {
    "scatter": Form(_neuron_order, _scatter_layer),
    "permuted": Form(_group_order, _split_layer),
    "grouped": Form(_group_order, _grouped_layer),
    **{
        folded: Form(functools.partial(folded_weights, merge_prelu=merge), _split_layer)
        for folded, merge in MERGES_PRELU.items()
    },
}
LOWERINGS = tuple(FORMS)


def distinct_lowerings(spec: ModelSpec) -> tuple[str, ...]:
    """The lowerings that write different graphs for ``spec``: every one, or only permuted when
    every hidden layer has one activation (then each writes Gemm -> op per layer)."""
    if all(len(set(layer)) == 1 for layer in spec.assignment):
        return ("permuted",)
    return LOWERINGS


def _check_request(lowering: str, opset: int) -> Form:
    if lowering not in FORMS:
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
    return FORMS[lowering]


def _preprocess(g: _Graph, preprocessing: dict[str, Any]) -> str:
    """(x - offset) * scale on the raw input, each step only where it changes something."""
    h = INPUT
    offset, scale = preprocessing["offset"], preprocessing["scale"]
    if np.any(np.asarray(offset) != 0):
        h = g.op("Sub", [h, g.const("preprocess/offset", np.float32(offset))], "preprocess/sub")
    if np.any(np.asarray(scale) != 1):
        h = g.op("Mul", [h, g.const("preprocess/scale", np.float32(scale))], "preprocess/mul")
    return h


def lower(
    spec: ModelSpec,
    state: dict[str, np.ndarray],
    *,
    lowering: str,
    opset: int = DEFAULT_OPSET,
    name: str = "smartmixed",
) -> onnx.ModelProto:
    """ONNX model: input "input" float32 [batch, D] raw features -> "logits", "probabilities"."""
    form = _check_request(lowering, opset)
    state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    g = _Graph(opset)
    h = _preprocess(g, spec.preprocessing)
    weights, biases, groups = form.weights(spec, state)
    afus = afu_parameters(spec, state)
    base = None if spec.afu is None else spec.afu["base"]
    for i, in_order in enumerate(groups):  # hidden layer i, its groups in graph order
        afu = None if afus is None else afus[i]
        layer = Layer(f"layer{i}", weights[i], biases[i], in_order, afu, base)
        h = (_one_group_layer if len(in_order) == 1 else form.emit)(g, h, layer)
    _gemm(g, h, weights[-1], biases[-1], "output", out=LOGITS)
    g.op("Softmax", [LOGITS], PROBABILITIES, axis=1)
    return _model(g, spec, lowering=lowering, name=name)


def _model(g: _Graph, spec: ModelSpec, *, lowering: str, name: str) -> onnx.ModelProto:
    """The graph's nodes and initializers as a model with the contract's input and outputs
    (IO_AXES) at ``g.opset``."""
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
    opset_ids = [helper.make_opsetid("", g.opset)]
    return helper.make_model(
        graph,
        opset_imports=opset_ids,
        producer_name="smartmixed",
        ir_version=helper.find_min_ir_version_for(opset_ids),
    )


def set_metadata(model: onnx.ModelProto, entries: dict[str, Any]) -> None:
    """metadata_props: strings as they are, everything else as JSON."""
    del model.metadata_props[:]
    for key, value in entries.items():
        text = value if isinstance(value, str) else json.dumps(value)
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=text))


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
