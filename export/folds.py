"""How a module's ``permuted``, ``folded`` and ``folded_tanh`` lowerings rewrite a copy of it,
found with torch.fx; the function is unchanged (export/module.py exports the copy).

- ``permuted``: a copy of the model in which every frozen layer's features are reordered so its
  groups are contiguous (Split -> one op per group -> Concat, no index ops), the permutation
  folded into the neighbours so that the function is unchanged. With P the permutation
  (z'_i = z_{p_i}) along the layer's axis:
      producer (Linear or Conv2d):  W' = P W, b' = P b                   so  z' = P z
      per-channel modules between:  parameters theta' = P theta (BatchNorm's weight, bias,
                                    running_mean, running_var)          m_{P theta}(P z) = P m_theta(z)
      the frozen layer:             assignment c' = P c                  f_{P c}(P z) = P f_c(z)
      consumer (Linear or Conv2d):  columns (input channels) W'' = W P^T  W P^T P y = W y
  Per-channel modules (BatchNorm1d/2d, MaxPool2d, AvgPool2d, their adaptive forms, Dropout,
  Dropout2d, Identity; the pools also as F.max_pool2d etc.) act on each feature alone and may
  sit on either side (a module without parameters, such as one pool, may be called in several
  places); a Flatten (module, torch.flatten or .flatten, from the layer's axis to the end)
  before the consumer Linear turns channel c into the columns c*HW .. c*HW + HW - 1, so the
  columns move in blocks of HW = H*W. Producers and
  consumers are found by ``torch.fx`` symbolic tracing (frozen layers are leaves) and shape
  propagation with the example input. A layer whose neighbours do not allow the fold (no
  Linear/Conv2d before or after it, an output used twice, a residual add, a module called
  twice, a shared parameter, an unknown module or function between, a model fx cannot trace)
  keeps the scatter form, and the report says which layer and why (``LayerFold.reason``).

  ``permuted`` also runs a frozen layer (in any form) after the max pool that reads its output
  (an nn.MaxPool2d call, F.max_pool2d or torch.max_pool2d; nothing else reads the layer's
  output) when every activation the layer uses is monotone non-decreasing (``MONOTONE``: not
  gelu, silu, mish, afu) and its candidate norm's gain g_k = 1/sd_k is positive. Then for each
  window W of the pool, max_{i in W} h(z_i) = h(max_{i in W} z_i) with h = g (f - mu): the
  window lies in one channel (the pool runs over the last two axes, the features along
  another, or the layer has one activation) and holds at least one real value (the padding is
  -inf), so pool(layer(z)) = layer(pool(z)), exact up to the last bit of f's implementation.
  The layer, its Split and its Concat then run on k*k times fewer elements (a k x k pool of
  stride k), as a fixed network's activation after Conv+pool would. The rewrite is done in the
  copy's torch.fx graph, call by call (a pool module called elsewhere too keeps those calls),
  and that copy is exported as the GraphModule. A layer that stays before its pool is reported
  with the reason (``LayerFold.pool_reason``: an activation that is not monotone, its output
  read elsewhere too, a pool that returns indices, windows along the feature axis).

In ``scatter`` and ``permuted`` the candidate norm's per-group affine map (Sub, Mul after each
activation) stays in the graph.

- ``folded``: ``permuted`` with fewer groups per frozen layer, by exact algebra in the
  neighbours, as export/lower.py's ``folded`` does for an MLP (``FoldedMixedActivation``). A
  feature j whose candidate is h_j(z) = A op(S z) + C, op its group's op, is rewritten as
      the rows of the module that makes the layer's input (``LayerFold.scales``: the producer's
      weight and bias; the last BatchNorm between them instead, when there is one: its weight
      and bias, since w'(z - m)/s + b' = S (w (z - m)/s + b) for w' = S w, b' = S b) times S,
      the consumer's input column (channel) j times A (the block of H*W columns after a flatten),
      the consumer's bias plus C times the sum of its original weights of feature j (for a
      Conv2d consumer summed over the kernel's taps as well),
  since W (A op(S z) + C) + b = (W A) op(S z) + (b + W C). The per-channel modules between the
  layer and its consumer have to carry A and C: a max pool (A > 0: max_i (A u_i + C) =
  A max_i u_i + C), an average pool without padding, or with count_include_pad=False, and
  without divisor_override (it averages real values only), adaptive pools, dropout and identity,
  a flatten; a Conv2d consumer must not pad (its zero padding is not shifted by C). Between the
  producer and the layer every per-channel module is positively homogeneous (pools, dropout) or
  is the BatchNorm that takes S, so S reaches the layer. S and A are 1 or 2 and rows without a
  fold keep their weights bit for bit; C is added in float64, rounded once. The merges:
  * tanh joins sigmoid when the layer has both: tanh(z) = 2 sigmoid(2 z) - 1, S = 2 (exact in
    float), A = 2, C = -1 (``lower.AFFINE_FOLDS``).
  * relu, leaky_relu and identity, when at least two of them are in the layer, become one PRelu
    group (torch's F.prelu with a weight of one slope per feature, 0, LEAKY_RELU_SLOPE or 1):
    PRelu(z, k) = z for z >= 0 and k z below is each of them, value for value (relu's k z =
    -0.0 equals 0). S = A = 1, C = 0: no neighbour changes, so this merge needs none, only the
    feature axis 1 that torch's prelu weight runs along (channels of (N, C, H, W), features
    of (N, n)). The exporter writes PRelu with the slope as [C, 1, 1] or [n].
  * the candidate norm h = g_k (f - mu_k), when the layer still has one (``candidate_norm=
    "standard"``), goes into the same A and C for every feature of the layer: A = g_k A_f,
    C = g_k (C_f - mu_k), g_k > 0; the layer then runs no Sub or Mul at all. Where the constant
    cannot reach the consumer exactly, such a layer keeps its norm and every group.
  Where the constant cannot pass (a padded conv consumer, a BatchNorm after the layer, an
  average pool that pads, a neighbour ``permuted`` could not fold), tanh stays apart from
  sigmoid and ``LayerFold.folded_kept`` says why. The merged groups are made contiguous by the
  permutation fold above where the neighbours allow it, else gathered as in ``scatter``. A
  layer that runs after its max pool in ``permuted`` does so in ``folded`` too (the merged
  ops, sigmoid and PRelu with slopes >= 0, are monotone non-decreasing as well).
- ``folded_tanh``: ``folded`` without the PRelu merge. ONNX Runtime's CPU PRelu with a
  per-column slope was measured ~25x slower per element than Relu on 2-D inputs (docs/design.md), so
  ``auto`` times both.

``module_lowerings`` names the lowerings that change something for a model (permuted when it
permutes or moves a layer, folded when it merges or folds a norm, folded_tanh when it differs
from both): ``auto`` verifies and times those beside scatter.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from smartmixed.contract import AFU
from smartmixed.export.lower import AFFINE_FOLDS, MERGES_PRELU, PRELU, PRELU_SLOPES
from smartmixed.nn import AFUnit, FrozenMixedActivation, frozen_layers
from smartmixed.nn.pool import get_activation

MODULE_LOWERINGS = ("scatter", "permuted", "folded", "folded_tanh")
# Modules that act on each feature (channel) alone, through which a permutation passes
PER_CHANNEL = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
# the same pooling as functions (torch.fx records F.max_pool2d(x, 2) as a call of the function)
POOL_FUNCTIONS = frozenset(
    {F.max_pool2d, torch.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
)
# max pools a frozen layer may move after (F.max_pool2d with return_indices=True is another
# function under torch.fx, max_pool2d_with_indices: not here)
MAX_POOL_FUNCTIONS = frozenset({F.max_pool2d, torch.max_pool2d})
# Pool activations that are monotone non-decreasing on all of R, so that max_i f(x_i) =
# f(max_i x_i): relu, sigmoid, tanh, leaky_relu and elu (slope and alpha >= 0), selu, softplus,
# softsign, identity. Not gelu, silu, mish (each dips below 0 before rising), nor afu (a learned
# sum sum_i w1_i psi(w0_i z + b0_i) whose terms may have either sign).
MONOTONE = frozenset(
    {"relu", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "softplus", "softsign", "identity"}
)
ANY_AXIS = (nn.Dropout, nn.Dropout2d, nn.Identity)  # identity in eval: any axis, any shape
PERMUTED_PARAMS = ("weight", "bias", "running_mean", "running_var")  # BatchNorm's, per channel


@dataclass
class LayerFold:
    """What ``permuted`` does with one frozen layer.

    ``form``: "permuted" (its features reordered, the permutation folded into ``producer``,
    ``between`` and ``consumer``), "contiguous" (already sorted by pool index: Split as it is),
    "single group" (one activation: one op), or "scatter" (kept as it is, ``reason`` says why).
    ``block``: the columns per channel the consumer's permutation moves (H*W after a Flatten).
    ``max_pool``: the max pool that reads the layer's output, if one does (its module path, or
    the function's name); ``after_pool``: the layer runs after it in ``permuted`` (every form
    may move), else ``pool_reason`` says why not.

    For ``folded`` (the producer, between and consumer are filled in for a contiguous or
    single-group layer too, when its neighbours allow the fold): ``axis`` the layer's feature
    axis; ``scales`` the module whose rows take an input scale S (the producer, or the last
    BatchNorm between), else ``scale_reason``; ``affine_reason`` why an output affine
    A h + C cannot go into the consumer (None: it can); ``folded`` what ``folded`` merges
    ("tanh into sigmoid, relu + leaky_relu as prelu: 5 -> 3 groups"), ``folded_kept`` what it
    keeps apart and why.
    """

    layer: str
    features: int
    groups: int
    form: str = "scatter"
    reason: str | None = None
    producer: str | None = None
    between: list[str] = field(default_factory=list)
    consumer: str | None = None
    block: int = 1
    max_pool: str | None = None
    after_pool: bool = False
    pool_reason: str | None = None
    axis: int | None = None
    scales: str | None = None
    scale_reason: str | None = None
    affine_reason: str | None = None
    folded: str | None = None
    folded_kept: str | None = None

    @property
    def changes(self) -> bool:
        """Whether ``permuted``'s copy runs this layer otherwise than the model does."""
        return self.form == "permuted" or self.after_pool

    def describe(self) -> str:
        """One line: 'features.2: 6 features, 3 groups: permuted (through features.0 > ... >
        head.1), after maxpool features.3 (monotone)'."""
        head = f"{self.layer}: {self.features} features, {self.groups} groups"
        if self.form == "permuted":
            path = " > ".join([self.producer, *self.between, self.consumer])
            line = f"{head}: permuted (through {path})"
        elif self.form == "scatter":
            line = f"{head}: kept scatter ({self.reason})"
        else:
            line = f"{head}: {self.form}"
        if self.after_pool:
            return f"{line}, after maxpool {self.max_pool} (monotone)"
        if self.max_pool is not None:
            return f"{line}, kept before maxpool {self.max_pool} ({self.pool_reason})"
        return line

    def describe_folded(self) -> str:
        """One line: 'layers.2: folded tanh into sigmoid: 5 -> 4 groups; keeps relu + leaky_relu
        apart (...)', or 'layers.2: folded merges nothing (...)'."""
        done = f"folded {self.folded}" if self.folded else "folded merges nothing"
        if self.folded_kept:
            done += f"; keeps {self.folded_kept}" if self.folded else f" ({self.folded_kept})"
        return f"{self.layer}: {done}"


class _NoFold(Exception):
    """Why a layer's neighbours do not allow the fold (the message is the report's reason)."""


# --------------------------------------------------------------------------------------------
# Finding producers and consumers (torch.fx)


class _Tracer(fx.Tracer):
    """torch.fx's tracer with the frozen layers as leaves: each is one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, FrozenMixedActivation | FoldedMixedActivation) or (
            super().is_leaf_module(m, qualname)
        )


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _trace(model: nn.Module, example: Tensor) -> fx.GraphModule:
    """The model's graph, each node's output shape in node.meta['tensor_meta']."""
    graph = _Tracer().trace(model)
    module = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(module).propagate(example)
    return module


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _describe_node(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target}"
    if node.op == "placeholder":
        return "the model's input"
    if node.op == "output":
        return "the model's output"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    name = getattr(node.target, "__name__", str(node.target))
    return f"the function {name}"


def _flatten_start(node: fx.Node) -> int | None:
    """start_dim of a flatten up to the last axis (nn.Flatten, torch.flatten, .flatten), else
    None."""
    if node.op == "call_function" and node.target is torch.flatten:
        args = dict(zip(("input", "start_dim", "end_dim"), node.args)) | node.kwargs
        start, end = args.get("start_dim", 0), args.get("end_dim", -1)
    elif node.op == "call_method" and node.target == "flatten":
        args = dict(zip(("self", "start_dim", "end_dim"), node.args)) | node.kwargs
        start, end = args.get("start_dim", 0), args.get("end_dim", -1)
    else:
        return None
    shape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if shape is None or not isinstance(start, int) or not isinstance(end, int):
        return None
    return start % len(shape) if end % len(shape) == len(shape) - 1 else None


class _Neighbours:
    """The fold plan of every frozen layer of one traced model."""

    def __init__(self, model: nn.Module, traced: fx.GraphModule) -> None:
        self.model = model
        self.graph = traced.graph
        self.calls = Counter(n.target for n in self.graph.nodes if n.op == "call_module")
        # parameters and buffers held by more than one module (tied weights): permuting one
        # would permute the other
        seen: Counter[int] = Counter()
        for _, tensor in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]:
            seen[id(tensor)] += 1
        self.shared = {key for key, count in seen.items() if count > 1}

    def plan(self, path: str, layer: FrozenMixedActivation) -> LayerFold:
        fold = LayerFold(path, layer.num_features, len(layer.groups.members))
        nodes = [n for n in self.graph.nodes if n.op == "call_module" and n.target == path]
        try:  # the neighbours the permutation (and folded's algebra) go into
            node = self._called_once(nodes)
            fold.axis = self._axis(node, layer)
            producer, before = self._producer(node, fold.axis)
            consumer, after, block, walked = self._consumer(node, fold.axis)
            fold.producer, fold.between, fold.consumer, fold.block = (
                producer,
                [*before, *after],
                consumer,
                block,
            )
        except _NoFold as e:
            fold.reason = fold.scale_reason = fold.affine_reason = str(e)
        except Exception as e:  # a graph the walk does not foresee: the layer stays as it is
            why = f"torch.fx cannot follow its neighbours ({first_line(e)})"
            fold.reason = fold.scale_reason = fold.affine_reason = why
        if fold.groups == 1:
            fold.form, fold.reason = "single group", None
        elif layer.groups.contiguous:
            fold.form, fold.reason = "contiguous", None
        elif fold.reason is None:
            fold.form = "permuted"
        if fold.consumer is not None:
            fold.scales, fold.scale_reason = self._scale_target(producer, before)
            try:
                self._check_constants_pass(walked, consumer)
            except _NoFold as e:
                fold.affine_reason = str(e)
        pool = next((u for n in nodes for u in n.users if self._is_max_pool(u)), None)
        if pool is not None:  # a max pool reads its output: may the layer run after it?
            fold.max_pool = pool.target if pool.op == "call_module" else "max_pool2d()"
            try:
                self._check_pool_swap(self._called_once(nodes), layer)
                fold.after_pool = True
            except _NoFold as e:
                fold.pool_reason = str(e)
        merge = plan_merge(layer, fold, merge_prelu=True)
        fold.folded, fold.folded_kept = merge.describe(fold.groups), merge.kept_text
        return fold

    @staticmethod
    def _called_once(nodes: list[fx.Node]) -> fx.Node:
        if len(nodes) != 1:
            raise _NoFold(
                "torch.fx sees no call of it" if not nodes else f"it is called {len(nodes)} times"
            )
        return nodes[0]

    @staticmethod
    def _axis(node: fx.Node, layer: FrozenMixedActivation) -> int:
        """The layer's feature axis, counted from 0, in its input's shape."""
        shape = _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if shape is None:
            raise _NoFold("torch.fx cannot tell the shape of its input")
        return layer.dim % len(shape)

    def _is_max_pool(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.model.get_submodule(node.target), nn.MaxPool2d)
        return node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS

    def _check_pool_swap(self, node: fx.Node, layer: FrozenMixedActivation) -> None:
        """_NoFold unless the layer called at ``node`` may run after the max pool that reads
        its output: max over a window W commutes with an elementwise f that is monotone
        non-decreasing, max_{i in W} f(x_i) = f(max_{i in W} x_i), when every position of the
        window has the same f (the window does not span the feature axis, or one group) and
        holds at least one real value (a max pool pads with -inf, and its windows start inside
        the input or its left padding); f here is the candidate (g_k (f_k(z) - mu_k) with the
        candidate norm, g_k > 0: still monotone non-decreasing)."""
        pool = self._only_user(node, "its output")
        if pool.args[0] is not node:
            raise _NoFold(f"it is not the input of {_describe_node(pool)}")
        if pool.op == "call_module" and self.model.get_submodule(pool.target).return_indices:
            raise _NoFold(f"{pool.target} returns indices")
        used = [k for k, _ in layer.groups.members]
        bad = [layer.pool[k] for k in used if layer.pool[k] not in MONOTONE]
        if bad:
            raise _NoFold(f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not monotone")
        for k in used:
            if not layer.transform.gain[k] > 0:  # 1/sd_k for "standard", 1 for "none"
                raise _NoFold(
                    f"its candidate norm's gain for {layer.pool[k]} is {layer.transform.gain[k]:g},"
                    " not positive"
                )
        if len(used) > 1:
            axis, ndim = self._axis(node, layer), len(_shape(node.args[0]))
            if axis >= ndim - 2:  # a 2-D max pool's windows run over the last two axes
                raise _NoFold(
                    f"the pool's windows run along its feature axis {axis} of {ndim}, across "
                    "features with different activations"
                )

    def _module(self, node: fx.Node) -> nn.Module:
        """The module a call_module node calls; _NoFold when its parameters or buffers (those
        the fold would permute) are also used elsewhere: the module called twice, or a tensor
        tied to another module's. A module without any (a pool) may be called anywhere."""
        module = self.model.get_submodule(node.target)
        held = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if held and self.calls[node.target] > 1:
            raise _NoFold(f"{node.target} is called {self.calls[node.target]} times")
        if any(id(t) in self.shared for t in held):
            raise _NoFold(f"{node.target} shares a parameter with another module")
        return module

    @staticmethod
    def _only_user(node: fx.Node, what: str) -> fx.Node:
        users = list(node.users)
        if len(users) != 1:
            named = ", ".join(_describe_node(u) for u in users)
            raise _NoFold(f"{what} is used {len(users)} times ({named})")
        return users[0]

    @staticmethod
    def _fits(node: fx.Node, op: nn.Module | Any, axis: int) -> None:
        """_NoFold unless ``op`` (a module, or a pooling function) at ``node`` acts on the
        layer's feature axis ``axis`` of its input feature by feature."""
        shape = _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        ndim = len(shape) if shape is not None else -1
        if isinstance(op, nn.Linear):
            fits = axis == ndim - 1
        elif isinstance(op, nn.Conv2d):
            if op.groups != 1:
                raise _NoFold(f"{node.target} is a grouped convolution (groups={op.groups})")
            fits = ndim == 4 and axis == 1
        elif isinstance(op, ANY_AXIS):
            fits = True
        elif isinstance(op, nn.BatchNorm1d | nn.BatchNorm2d):
            fits = axis == 1  # per channel along axis 1
        else:  # 2-D pooling, module or function: per channel, over the last two axes
            indices = getattr(op, "return_indices", node.kwargs.get("return_indices", False))
            fits = ndim == 4 and axis == 1 and not indices
        if not fits:
            what = type(op).__name__ if isinstance(op, nn.Module) else "pooling"
            raise _NoFold(
                f"{_describe_node(node)} ({what}) does not act on the layer's feature axis "
                f"{axis} of its {ndim}-D input feature by feature"
            )

    def _step(self, node: fx.Node, axis: int, side: str) -> tuple[str, nn.Module | None]:
        """What ``node`` is on the way from the layer to its producer or consumer:
        ("affine", the Linear/Conv2d) or ("per-channel", the module or None for a pooling
        function); _NoFold for anything else."""
        if node.op == "call_module":
            module = self._module(node)
            if isinstance(module, nn.Linear | nn.Conv2d):
                self._fits(node, module, axis)
                return "affine", module
            if isinstance(module, PER_CHANNEL):
                self._fits(node, module, axis)
                return "per-channel", module
            what = f"{node.target} ({type(module).__name__})"
        elif node.op == "call_function" and node.target in POOL_FUNCTIONS:
            self._fits(node, node.target, axis)
            return "per-channel", None
        else:
            what = _describe_node(node)
        raise _NoFold(f"{what} {side} it is not a Linear, Conv2d or per-channel module")

    def _producer(self, node: fx.Node, axis: int) -> tuple[str, list[str]]:
        """(the Linear/Conv2d whose rows become the layer's features, the per-channel modules
        between them, in graph order)."""
        between: list[str] = []
        current, walked = node.args[0], None
        while True:
            if not isinstance(current, fx.Node) or current.op in ("placeholder", "get_attr"):
                what = _describe_node(current) if isinstance(current, fx.Node) else "a constant"
                where = "its input" if walked is None else f"the input of {_describe_node(walked)}"
                raise _NoFold(f"{where} is {what}, not a Linear or Conv2d output")
            kind, module = self._step(current, axis, "before")
            self._only_user(current, f"the output of {_describe_node(current)}")
            if kind == "affine":
                return current.target, between
            if module is not None:
                between.insert(0, current.target)
            current, walked = current.args[0], current

    def _consumer(self, node: fx.Node, axis: int) -> tuple[str, list[str], int, list[fx.Node]]:
        """(the Linear/Conv2d whose columns (input channels) read the layer's features, the
        per-channel modules between, the columns per feature: H*W after a flatten, the nodes
        walked from the layer's first user to the consumer's call, both included)."""
        between: list[str] = []
        block = None  # set by a flatten: the columns each feature becomes
        current = self._only_user(node, "its output")
        walked: list[fx.Node] = []
        while True:
            walked.append(current)
            start = _flatten_start(current)
            if current.op == "call_module" and isinstance(
                flatten := self.model.get_submodule(current.target), nn.Flatten
            ):
                ndim = len(_shape(current.args[0]))
                last = flatten.end_dim % ndim == ndim - 1
                start = flatten.start_dim % ndim if last else None
            if start is not None:  # a flatten from `start` to the last axis
                if block is not None or start != axis:
                    raise _NoFold(
                        f"{_describe_node(current)} after it flattens from axis {start}, not "
                        f"from the layer's axis {axis}"
                    )
                # (N, ..., C, H, W) -> (N, ..., C*H*W): feature c becomes `block` columns
                block = math.prod(_shape(current.args[0])[axis + 1 :])
            else:
                kind, module = self._step(current, axis, "after")
                if kind == "affine":
                    if block is not None and not isinstance(module, nn.Linear):
                        raise _NoFold(f"{current.target} after a flatten is not a Linear")
                    return current.target, between, block or 1, walked
                if block is not None and not isinstance(module, ANY_AXIS):
                    raise _NoFold(f"{_describe_node(current)} between a flatten and the consumer")
                if module is not None:
                    between.append(current.target)
            current = self._only_user(current, f"the output of {_describe_node(current)}")

    def _scale_target(self, producer: str, before: list[str]) -> tuple[str | None, str | None]:
        """(the module whose rows an input scale S of the layer goes into, or None, and why
        not): the last BatchNorm between the producer and the layer (S BN(z) = BN'(z) with its
        weight and bias times S; scaling the producer instead would scale z inside the BN),
        else the producer (S (W x + b) = (S W) x + S b). Every other module between (pools,
        dropout, identity) is positively homogeneous: m(S u) = S m(u) for S > 0."""
        norms = [
            p
            for p in before
            if isinstance(self.model.get_submodule(p), nn.BatchNorm1d | nn.BatchNorm2d)
        ]
        if not norms:
            return producer, None
        norm = self.model.get_submodule(norms[-1])
        if norm.weight is None or norm.bias is None:
            return None, f"{norms[-1]} (BatchNorm) between has no affine weight and bias to scale"
        return norms[-1], None

    def _check_constants_pass(self, walked: list[fx.Node], consumer: str) -> None:
        """_NoFold unless an output affine A h + C (A > 0, C per feature) of the layer reaches
        its consumer exactly (``walked``: the nodes from the layer to the consumer's call):
        through max pools (max(A u + C) = A max(u) + C, -inf padding included), average pools
        that average real values only (no padding, or count_include_pad=False, and no
        divisor_override), adaptive pools, dropout, identity and a flatten; a Conv2d consumer
        without padding (zeros it pads with would not be shifted by C)."""
        for current in walked[:-1]:
            if current.op == "call_module":
                module = self.model.get_submodule(current.target)
                if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                    raise _NoFold(
                        f"{current.target} (BatchNorm) after it would normalise the constant "
                        "with its running mean"
                    )
                if isinstance(module, nn.AvgPool2d):
                    padded = _pads(module.padding) and module.count_include_pad
                    override = module.divisor_override
                    self._check_average(current, padded, override)
            elif current.op == "call_function" and current.target is F.avg_pool2d:
                names = ("input", "kernel_size", "stride", "padding", "ceil_mode",
                         "count_include_pad", "divisor_override")  # fmt: skip
                args = dict(zip(names, current.args)) | current.kwargs
                padded = _pads(args.get("padding", 0)) and args.get("count_include_pad", True)
                self._check_average(current, padded, args.get("divisor_override"))
        conv = self.model.get_submodule(consumer)
        if isinstance(conv, nn.Conv2d) and (
            conv.padding == "same" or (conv.padding != "valid" and _pads(conv.padding))
        ):
            raise _NoFold(
                f"{consumer} pads its input by {_padding_text(conv.padding)} with zeros, which "
                "the constant would not shift"
            )

    @staticmethod
    def _check_average(node: fx.Node, padded: bool, override: Any) -> None:
        if padded:
            raise _NoFold(
                f"{_describe_node(node)} (average pool) counts its zero padding into the mean"
            )
        if override is not None:
            raise _NoFold(f"{_describe_node(node)} (average pool) divides by {override}")


def _pads(padding: Any) -> bool:
    """Whether a pool's or conv's padding (an int or a tuple) adds anything."""
    return any(p != 0 for p in (padding if isinstance(padding, tuple | list) else (padding,)))


def _padding_text(padding: Any) -> str:
    if isinstance(padding, tuple | list) and len(set(padding)) == 1:
        return str(padding[0])
    return str(padding)


def plan_folds(model: nn.Module, example: Tensor) -> list[LayerFold]:
    """What ``permuted`` and ``folded`` do with each frozen layer of ``model`` (module order)."""
    layers = list(frozen_layers(model))
    try:
        neighbours = _Neighbours(model, _trace(model, example))
    except Exception as e:  # any error of the user's forward under fx: every layer stays
        reason = f"torch.fx cannot trace {type(model).__name__} ({first_line(e)})"
        folds = []
        for path, layer in layers:
            fold = LayerFold(path, layer.num_features, len(layer.groups.members), "scatter", reason)
            fold.scale_reason = fold.affine_reason = reason
            fold.axis = layer.dim if layer.dim >= 0 else None  # no shapes: only a dim >= 0 is sure
            merge = plan_merge(layer, fold, merge_prelu=True)
            fold.folded, fold.folded_kept = merge.describe(fold.groups), merge.kept_text
            folds.append(fold)
        return folds
    return [neighbours.plan(path, layer) for path, layer in layers]


@dataclass(frozen=True)
class LayerMerge:
    """What ``folded`` (``merge_prelu``) or ``folded_tanh`` does with one frozen layer.

    ``groups``: (op, the layer's features it runs on) in graph order, op a pool name or PRELU.
    ``s``, ``a``, ``c`` (n,) float64 in the layer's feature order: feature j's candidate is
    h_j(z) = a_j op(s_j z) + c_j (see the module docstring). ``merged``: what changed,
    ``kept``: what stays apart and why; ``prelu``: relu / leaky_relu / identity merged.
    """

    groups: tuple[tuple[str, Tensor], ...]
    s: Tensor
    a: Tensor
    c: Tensor
    merged: tuple[str, ...]
    kept: tuple[str, ...]
    prelu: bool

    @property
    def changes(self) -> bool:
        """Whether the layer runs otherwise than in ``permuted``."""
        return bool(self.merged)

    @property
    def kept_text(self) -> str | None:
        return "; ".join(self.kept) or None

    def describe(self, groups: int) -> str | None:
        if not self.merged:
            return None
        return f"{', '.join(self.merged)}: {groups} -> {len(self.groups)} groups"


def plan_merge(layer: FrozenMixedActivation, fold: LayerFold, *, merge_prelu: bool) -> LayerMerge:
    """The merges of one frozen layer (module docstring, ``folded``), given what its neighbours
    allow (``fold``): tanh into sigmoid when both are there and the neighbours take S = 2 and
    A = 2, C = -1; relu, leaky_relu and identity as one PRelu group (``merge_prelu``) when two
    of them are there and the features lie along axis 1; the candidate norm into A and C for
    every feature. A layer whose norm cannot go into its consumer merges nothing."""
    index = layer.assignment.detach().cpu()
    names = layer.names()
    present = [a for k, a in enumerate(layer.pool) if bool((index == k).any())]
    transform = layer.transform
    takes_affine = fold.consumer is not None and fold.affine_reason is None
    family = [a for a in present if a in PRELU_SLOPES]
    prelu = merge_prelu and len(family) > 1
    tanh = "tanh" in present and "sigmoid" in present
    norm = transform.affine
    kept: list[str] = []
    if norm and not takes_affine:
        kept.append(f"the candidate norm and every group ({fold.affine_reason})")
        prelu = tanh = norm = False
    elif norm and any(not transform.gain[layer.pool.index(a)] > 0 for a in present):
        kept.append("the candidate norm and every group (a gain is not positive)")
        prelu = tanh = norm = False
    if prelu and fold.axis != 1:
        where = "an unknown axis" if fold.axis is None else f"axis {fold.axis}"
        kept.append(
            f"{' + '.join(family)} apart (torch's prelu weight runs along axis 1, the "
            f"features along {where})"
        )
        prelu = False
    if tanh and not takes_affine:
        kept.append(f"tanh apart from sigmoid ({fold.affine_reason})")
        tanh = False
    elif tanh and fold.scales is None:
        kept.append(f"tanh apart from sigmoid ({fold.scale_reason})")
        tanh = False

    def group_of(a: str) -> str:
        if prelu and a in family:
            return PRELU
        return "sigmoid" if tanh and a == "tanh" else a

    members: dict[str, list[str]] = {}
    for a in present:  # groups in pool order of their first member
        members.setdefault(group_of(a), []).append(a)
    groups = tuple(
        (op, torch.cat([(index == layer.pool.index(a)).nonzero().squeeze(1) for a in acts]))
        for op, acts in members.items()
    )
    # (n, 3): h_j = A op(S z) + C without the norm; tanh in sigmoid: (2, 2, -1)
    sac = torch.tensor(
        [AFFINE_FOLDS.get((a, group_of(a)), (1.0, 1.0, 0.0)) for a in names], dtype=torch.float64
    )
    s, a, c = sac.unbind(1)
    if norm:  # g (A op + C - mu) = (g A) op + g (C - mu)
        gain = torch.tensor([transform.gain[k] for k in index.tolist()], dtype=torch.float64)
        shift = torch.tensor([transform.shift[k] for k in index.tolist()], dtype=torch.float64)
        a, c = gain * a, gain * (c - shift)
    merged = [f"{' + '.join(family)} as prelu"] if prelu else []
    merged += ["tanh into sigmoid"] if tanh else []
    merged += [f"candidate norm into {fold.consumer}"] if norm else []
    return LayerMerge(groups, s, a, c, tuple(merged), tuple(kept), prelu)


class FoldedMixedActivation(nn.Module):
    """A frozen layer as ``folded`` leaves it: groups of features along ``dim``, each one op (a
    pool activation, or PRELU: F.prelu with one slope per feature, buffer ``slope``), no
    candidate norm (it went into the consumer). ``groups``: (op, the features it runs on) in
    graph order. When they are consecutive blocks in that order (the neighbours took the
    permutation) the layer is Split -> one op per group -> Concat; else each group is gathered
    and the features put back (Gather ... Concat, Gather), as a frozen layer's scatter form."""

    def __init__(
        self,
        groups: Sequence[tuple[str, Tensor]],
        *,
        dim: int,
        slope: Tensor | None = None,
        afu: AFUnit | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.afu = dim, afu
        self.ops = [op for op, _ in groups]
        self.rows = [rows for _, rows in groups]
        self.sizes = [len(rows) for rows in self.rows]
        order = torch.cat(self.rows)  # position in the concatenation -> feature
        self.contiguous = bool((order == torch.arange(len(order), device=order.device)).all())
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        if slope is not None and len(groups) == 1:  # one op on x itself: slopes in feature order
            slope = slope[self.inverse.to(slope.device)]
        self.register_buffer("slope", slope)
        self.acts = [None if op in (PRELU, AFU) else get_activation(op) for op in self.ops]

    def _apply(self, fn, *args, **kwargs):
        """.to(device) moves the group indices with the buffers."""
        out = super()._apply(fn, *args, **kwargs)
        self.rows = [rows.to(self.inverse.device) for rows in self.rows]
        return out

    def extra_repr(self) -> str:
        groups = ", ".join(f"{op}={n}" for op, n in zip(self.ops, self.sizes, strict=True))
        return f"{sum(self.sizes)}, dim={self.dim}, {groups}"

    def _run(self, i: int, v: Tensor) -> Tensor:
        if self.ops[i] == PRELU:  # the slopes run along axis 1 (checked by plan_merge)
            return F.prelu(v, self.slope)
        if self.ops[i] == AFU:
            return self.afu.activation().fn(v)
        return self.acts[i].fn(v)

    def forward(self, x: Tensor) -> Tensor:  # x: (..., n at dim, ...) -> same shape
        if len(self.ops) == 1:
            return self._run(0, x)
        if self.contiguous:
            blocks = x.split(self.sizes, self.dim)
        else:
            blocks = [x.index_select(self.dim, rows) for rows in self.rows]
        out = torch.cat([self._run(i, b) for i, b in enumerate(blocks)], self.dim)
        return out if self.contiguous else out.index_select(self.dim, self.inverse)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _permute_neighbours(model: nn.Module, fold: LayerFold, perm: Tensor) -> None:
    """The permutation P (``perm``: new position -> old feature) of one layer's features folded
    into its neighbours: rows of the producer and per-channel parameters between, the consumer's
    columns (blocks of ``fold.block``)."""
    for path in (fold.producer, *fold.between):  # rows / per-channel parameters
        module = model.get_submodule(path)
        for name in PERMUTED_PARAMS:
            tensor = getattr(module, name, None)
            if isinstance(tensor, Tensor) and tensor.dim() >= 1:
                tensor.copy_(tensor[perm.to(tensor.device)])
    consumer = model.get_submodule(fold.consumer)
    # columns: channel p_i's block of `block` columns moves to position i
    columns = (perm[:, None] * fold.block + torch.arange(fold.block)).reshape(-1)
    weight = consumer.weight
    weight.copy_(weight[:, columns.to(weight.device)])


def permuted_copy(model: nn.Module, folds: Sequence[LayerFold]) -> nn.Module:
    """A copy of ``model`` with every "permuted" fold applied, each of those layers' groups
    contiguous, and every layer with ``after_pool`` run after its max pool
    (``_move_after_pools``): the same function (see the module docstring)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for fold in folds:
            if fold.form == "permuted":
                _permute_layer(out, fold)
    return _move_after_pools(out, [f.layer for f in folds if f.after_pool])


def _permute_layer(model: nn.Module, fold: LayerFold) -> None:
    layer = model.get_submodule(fold.layer)
    perm = torch.argsort(layer.assignment, stable=True)  # new position -> old feature
    _permute_neighbours(model, fold, perm)
    _replace(
        model,
        fold.layer,
        FrozenMixedActivation(
            layer.pool,
            layer.assignment[perm],
            dim=layer.dim,
            candidate_norm=layer.candidate_norm,
            afu=layer.afu,
        ).to(layer.assignment.device),
    )


def folded_copy(model: nn.Module, folds: Sequence[LayerFold], *, merge_prelu: bool) -> nn.Module:
    """A copy of ``model`` as ``folded`` (``merge_prelu``) or ``folded_tanh`` lowers it: every
    layer that ``plan_merge`` changes becomes a ``FoldedMixedActivation``, its merged groups
    made contiguous by the permutation fold where the neighbours are known, S into the rows of
    ``fold.scales``, A and C into the consumer; every other layer as in ``permuted_copy``, and
    every layer with ``after_pool`` after its max pool. The same function (module docstring)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for fold in folds:
            layer = out.get_submodule(fold.layer)
            merge = plan_merge(layer, fold, merge_prelu=merge_prelu)
            if not merge.changes:
                if fold.form == "permuted":
                    _permute_layer(out, fold)
                continue
            names = layer.names()
            groups = [(op, rows.to(layer.assignment.device)) for op, rows in merge.groups]
            slope = next(
                (
                    torch.tensor([PRELU_SLOPES[names[j]] for j in rows.tolist()])  # float32
                    for op, rows in groups
                    if op == PRELU
                ),
                None,
            )
            s, a, c = merge.s, merge.a, merge.c
            if fold.consumer is not None:  # the neighbours take P: each group one block
                perm = torch.cat([rows for _, rows in groups])  # new position -> old feature
                _permute_neighbours(out, fold, perm)
                s, a, c = s[perm.cpu()], a[perm.cpu()], c[perm.cpu()]
                starts = np.cumsum([0, *(len(rows) for _, rows in groups)])
                groups = [
                    (op, torch.arange(start, start + len(rows), device=rows.device))
                    for (op, rows), start in zip(groups, starts, strict=False)
                ]
            if bool((s != 1).any()):
                _scale_rows(out.get_submodule(fold.scales), s)
            if bool((a != 1).any() or (c != 0).any()):
                _fold_into_consumer(out.get_submodule(fold.consumer), a, c, fold.block)
            _replace(
                out,
                fold.layer,
                FoldedMixedActivation(groups, dim=layer.dim, slope=slope, afu=layer.afu).to(
                    layer.assignment.device
                ),
            )
    return _move_after_pools(out, [f.layer for f in folds if f.after_pool])


def _scale_rows(module: nn.Module, s: Tensor) -> None:
    """Rows of a Linear / Conv2d (weight (out, ...), bias) or a BatchNorm's weight and bias
    times s (n,): S = 1 or 2, exact in float32, so its output rows are exactly S times."""
    for tensor in (module.weight, module.bias):
        if tensor is not None:
            tensor.mul_(s.to(tensor).reshape(-1, *[1] * (tensor.dim() - 1)))


def _fold_into_consumer(module: nn.Module, a: Tensor, c: Tensor, block: int) -> None:
    """W (a h + c) + b = (W diag(a)) h + (b + W c) for the consumer (a, c (C,) float64 per
    input feature): a Conv2d's input channel j (its kernel summed over the taps for the
    constant), a Linear's block of ``block`` columns per feature. Float64, rounded once."""
    w = module.weight.detach().double()
    if isinstance(module, nn.Conv2d):  # (out, C, kh, kw)
        shift = (w * c.reshape(1, -1, 1, 1)).sum((1, 2, 3))  # (out,)
        w = w * a.reshape(1, -1, 1, 1)
    else:  # Linear (out, C * block): channel j's block of columns after a flatten
        shift = w @ c.repeat_interleave(block)  # (out,)
        w = w * a.repeat_interleave(block)
    module.weight.copy_(w.to(module.weight))
    if bool((shift != 0).any()):
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(shift, dtype=module.weight.dtype))
        module.bias.copy_((module.bias.detach().double() + shift).to(module.bias))


def lowered_network(model: nn.Module, folds: Sequence[LayerFold], lowering: str) -> nn.Module:
    """The network ``lowering`` exports: the model itself (scatter), ``permuted_copy`` or
    ``folded_copy`` (folded, folded_tanh)."""
    if lowering == "scatter":
        return model
    if lowering == "permuted":
        return permuted_copy(model, folds)
    return folded_copy(model, folds, merge_prelu=MERGES_PRELU[lowering])


def module_lowerings(model: nn.Module, folds: Sequence[LayerFold]) -> tuple[str, ...]:
    """The lowerings of ``model`` that differ from each other, scatter first: permuted when it
    permutes or moves a layer, folded when it merges or folds a norm somewhere, folded_tanh
    when it changes a layer and folded merges a PRelu group somewhere (else it is folded's or
    permuted's graph). ``auto`` times these."""
    layers = dict(frozen_layers(model))
    merges = {
        lw: [plan_merge(layers[f.layer], f, merge_prelu=merge) for f in folds]
        for lw, merge in MERGES_PRELU.items()
    }
    out = ["scatter"]
    if any(f.changes for f in folds):
        out.append("permuted")
    if any(m.changes for m in merges["folded"]):
        out.append("folded")
    if any(m.changes for m in merges["folded_tanh"]) and any(m.prelu for m in merges["folded"]):
        out.append("folded_tanh")
    return tuple(out)


def _move_after_pools(model: nn.Module, paths: Sequence[str]) -> nn.Module:
    """``model`` with each frozen layer at ``paths`` run after the max pool that reads its
    output (checked by ``_Neighbours._check_pool_swap``): in the model's torch.fx graph (the
    one ``plan_folds`` traced), z -> layer -> pool -> users becomes z -> pool -> layer ->
    users, so the layer, its Split and Concat run on the pool's output (k*k times fewer
    elements for a k x k window of stride k). The same function: pool(f(z)) = f(pool(z)) for
    the monotone non-decreasing f of each window's channel (max_i f(z_i) = f(max_i z_i)),
    exact up to the last bit of f's implementation. The result is that graph as a
    GraphModule (named as the model's class): its modules and parameters keep their paths,
    so the ONNX scopes do; the rewrite is per call, so a pool module called elsewhere too
    keeps those calls as they are. ``model`` itself when there is nothing to move."""
    if not paths:
        return model
    graph = _Tracer().trace(model)
    for path in paths:
        (node,) = [n for n in graph.nodes if n.op == "call_module" and n.target == path]
        (pool,) = node.users
        pool.replace_input_with(node, node.args[0])  # the pool reads z
        with graph.inserting_after(pool):
            moved = graph.call_module(path, (pool, *node.args[1:]), node.kwargs)
        for user in [u for u in pool.users if u is not moved]:
            user.replace_input_with(pool, moved)
        graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(model, graph, class_name=type(model).__name__)
