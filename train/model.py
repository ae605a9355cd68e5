"""SmartMixed networks built from smartmixed.nn's layers: MLPs (``SelectiveMLP`` in phase 1,
``MixedMLP`` in phase 2) and networks described by a layered spec, such as conv nets
(``SelectiveConvNet``, ``MixedConvNet``).

The model spec (model.json) and the presets live in smartmixed.contract; re-exported here. The
method itself (the straight-through Gumbel selection, the candidate transform, the learned unit)
is smartmixed.nn's: ``MixedActivation`` after every hidden layer in phase 1, its frozen form
``FrozenMixedActivation`` in phase 2. This module only arranges those layers into networks and
keeps what the artifacts need (weights in neuron order, the assignment, the folded norm).

Phase 1 (``SelectiveMLP``): hidden neuron j of layer l keeps logits a_lj over the pool P; every
training forward draws a straight-through hard Gumbel sample per neuron (exactly one activation
in the forward, the logits reached through the soft sample in the backward); evaluation uses
argmax a.

Phase 2 (``MixedMLP``): c_lj = argmax_k a_ljk is frozen; neurons with the same activation form a
group; a layer is one affine map followed by each group's activation on its slice. Fixed
baselines are the special case of a single group.

A layered spec (``ModelSpec.layers``: conv, batchnorm, maxpool, avgpool, flatten, linear) is
built layer for layer, with a mixed activation after every hidden conv (one choice per channel,
dim 1) and every hidden linear (per neuron), placed after a batchnorm that directly follows it.

The learned activation unit (pool name ``afu``) is one ``AFUnit`` per hidden layer, or one
instance given to every layer (afu share "network"), trained with the weights in every phase.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# The spec, its validation and the presets are the stages' contract (torch-free), re-exported
# here where train/, bench/ and the tests import them from.
from smartmixed.contract import (  # noqa: F401
    AFU,
    AFU_PARAMS,
    PRESETS,
    SPEC_FORMAT,
    TABLE1,
    ModelSpec,
    SpecError,
    activation_after,
    afu_param_shape,
    afu_tensor_name,
    check_afu_config,
    hidden_layer_indices,
    layer_output_shapes,
    layered_arch,
    layered_weight_shapes,
    parse_arch,
    resolve_preset,
)
from smartmixed.nn import FrozenMixedActivation, MixedActivation, set_temperature
from smartmixed.nn.layers import (  # noqa: F401  (the option names, re-exported for the CLI)
    CANDIDATE_NORMS,
    GRANULARITIES,
    LOGIT_GRAD_NORMS,
    AFUnit,
    CandidateTransform,
)

# --------------------------------------------------------------------------------------------
# The learned units


def afu_units(config: dict[str, Any] | None, n_layers: int) -> list[AFUnit | None]:
    """The unit of every hidden layer: one per layer (share "layer"), or one instance given to
    every layer ("network": the same parameters; nn.Module.parameters() yields them once, so
    Adam updates them once); None everywhere without a unit in the pool."""
    if config is None:
        return [None] * n_layers
    if config["share"] == "network":
        return [AFUnit(config["units"], config["base"])] * n_layers
    return [AFUnit(config["units"], config["base"]) for _ in range(n_layers)]


def afu_state_dict(units: Sequence[AFUnit] | None) -> dict[str, Tensor]:
    """afu.{l}.w0|b0|w1|b1 for every hidden layer l, cloned (equal copies when shared)."""
    if units is None:
        return {}
    return {
        afu_tensor_name(layer, name): value.detach().clone()
        for layer, unit in enumerate(units)
        for name, value in unit.params().items()
    }


def afu_expected_shapes(config: dict[str, Any] | None, n_layers: int) -> dict[str, tuple]:
    if config is None:
        return {}
    return {
        afu_tensor_name(layer, name): afu_param_shape(name, config["units"])
        for layer in range(n_layers)
        for name in AFU_PARAMS
    }


def load_afu_state(units: Sequence[AFUnit] | None, config: dict | None, state: dict) -> None:
    """Copy afu.{l}.* into the units (shapes already checked); a shared unit must be stored
    with equal copies in every layer, else SpecError names the tensor."""
    if units is None:
        return
    if config["share"] == "network":
        for layer in range(1, len(units)):
            for name in AFU_PARAMS:
                key = afu_tensor_name(layer, name)
                if not torch.equal(state[key], state[afu_tensor_name(0, name)]):
                    raise SpecError(
                        f"tensor {key}: the AFU is shared by the network (afu.share "
                        f"'network'), but it differs from {afu_tensor_name(0, name)}"
                    )
    with torch.no_grad():
        for layer, unit in enumerate(units):
            for name, param in unit.params().items():
                param.copy_(state[afu_tensor_name(layer, name)].to(param))


# --------------------------------------------------------------------------------------------
# What every phase-1 and every phase-2 network offers the loop and the artifacts


def _every_layer(name: str, doc: str) -> property:
    """An option of every ``MixedActivation`` of the network: read from the first layer, set on
    each (the loop's schedule sets it per epoch)."""

    def get(self: SelectiveNetwork) -> Any:
        return getattr(self.activations[0], name)

    def set_(self: SelectiveNetwork, value: Any) -> None:
        for layer in self.activations:
            setattr(layer, name, value)

    return property(get, set_, doc=doc)


class _Network(nn.Module):
    """What every network here holds: its pool, preprocessing (``offset``/``scale`` buffers),
    candidate norm and learned-unit config, and ``activations``, one mixed layer per hidden
    layer, in order."""

    activations: nn.ModuleList

    def __init__(
        self,
        pool: Sequence[str],
        *,
        preprocessing: dict[str, Any] | None,
        candidate_norm: str,
        afu: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        self.pool = list(pool)
        self.preprocessing = preprocessing or {"offset": 0.0, "scale": 1.0}
        self.candidate_norm = candidate_norm
        # the learned unit's {units, base, share} when the pool holds it (trained in both phases)
        self.afu_config = check_afu_config(afu) if AFU in self.pool else None

    def _register_preprocessing(self, image_shape: Sequence[int] | None = None) -> None:
        """offset and scale as (non-persistent) buffers: a scalar, or one value per input
        feature; per feature of an image (C, H, W) reshaped to broadcast over (N, C, H, W)."""
        for name in ("offset", "scale"):
            value = torch.tensor(self.preprocessing[name], dtype=torch.float32)
            if image_shape is not None and value.dim():
                value = value.reshape(*image_shape)  # C*H*W values, in the flattened order
            self.register_buffer(name, value, persistent=False)

    def network_options(self, **changes: Any) -> dict[str, Any]:
        """preprocessing, candidate_norm and afu as this network holds them, ``changes`` on top:
        the keywords of a network on the same data with the same units."""
        options = {
            "preprocessing": self.preprocessing,
            "candidate_norm": self.candidate_norm,
            "afu": self.afu_config,
        }
        return options | changes

    @property
    def transform(self) -> CandidateTransform:
        return self.activations[0].transform

    @property
    def afus(self) -> list[AFUnit] | None:
        """Each hidden layer's learned unit (the same object at every layer when shared)."""
        return None if self.afu_config is None else [a.afu for a in self.activations]


class SelectiveNetwork(_Network):
    """Phase 1: a network whose hidden layers are followed by ``MixedActivation`` modules.
    ``tau``, ``relaxed`` and ``eval_noise`` read the first layer's and set every layer's (the
    loop's schedule)."""

    def __init__(
        self,
        pool: Sequence[str],
        *,
        preprocessing: dict[str, Any] | None = None,
        afu: dict[str, Any] | None = None,
        tau: float = 0.3,
        logit_init_std: float = 0.0,
        candidate_norm: str = "none",
        clamp: float | None = None,
        eval_noise: bool = False,
        logit_grad_norm: str = "none",
        granularity: str = "feature",
    ) -> None:
        """The options from ``tau`` on are every ``MixedActivation``'s (smartmixed.nn documents
        them); a subclass builds its layers, then the mixed ones with ``_mixed_layers``."""
        super().__init__(pool, preprocessing=preprocessing, candidate_norm=candidate_norm, afu=afu)
        self._layer_options = {
            "tau": tau,
            "candidate_norm": candidate_norm,
            "logit_init_std": logit_init_std,
            "clamp": clamp,
            "eval_noise": eval_noise,
            "logit_grad_norm": logit_grad_norm,
            "granularity": granularity,
        }

    def _mixed_layers(
        self, widths: Sequence[int], dims: Sequence[int], units: Sequence[AFUnit | None]
    ) -> nn.ModuleList:
        """One ``MixedActivation`` per hidden layer: its width, the axis of its features and
        its learned unit (None without one), with the network's options."""
        return nn.ModuleList(
            MixedActivation(width, pool=self.pool, dim=dim, afu=unit, **self._layer_options)
            for width, dim, unit in zip(widths, dims, units, strict=True)
        )

    @property
    def tau(self) -> float:
        return self.activations[0].tau

    @tau.setter
    def tau(self, value: float) -> None:
        set_temperature(self, value)

    relaxed = _every_layer(
        "relaxed",
        "Train the soft mixture sum_k s_k h_k(z) instead of the hard sample (--soft-epochs).",
    )
    eval_noise = _every_layer(
        "eval_noise", "Gumbel noise in evaluation too (the reference code's protocol)."
    )

    def choices(self) -> list[Tensor]:
        """argmax of the logits per hidden layer, (n_l,) int64 each."""
        return [layer.choice() for layer in self.activations]

    def assignment(self) -> list[list[str]]:
        return [[self.pool[k] for k in c.tolist()] for c in self.choices()]

    def activation_counts(self) -> list[dict[str, int]]:
        return [layer.activation_counts() for layer in self.activations]


class MixedNetwork(_Network):
    """Phase 2 (and fixed baselines): hidden layers followed by ``FrozenMixedActivation``
    modules; ``assignment`` holds the activation name of every neuron (or channel), in neuron
    order, per hidden layer."""

    def __init__(
        self,
        pool: Sequence[str],
        assignment: Sequence[Sequence[str]],
        *,
        preprocessing: dict[str, Any] | None = None,
        candidate_norm: str = "none",
        afu: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(pool, preprocessing=preprocessing, candidate_norm=candidate_norm, afu=afu)
        self.assignment = [list(layer) for layer in assignment]

    def activation_counts(self) -> list[dict[str, int]]:
        return [{n: layer.count(n) for n in self.pool} for layer in self.assignment]


# --------------------------------------------------------------------------------------------
# MLPs
#
# Inside the MLPs, activations are neuron-major: h^T of shape (n, B), and the mixed layers act
# along dim 0. A layer is z^T = W h^T + b (one addmm, the same cost as the usual h W^T + b), and
# a group of neurons is then a block of whole rows, so the phase-1 layer's gathers and scatters
# and the phase-2 layer's split and concat move contiguous memory (on the paper's network a
# batch-major layout, dim -1, makes a phase-1 step about 6% slower).


def linear_t(linear: nn.Linear, h_t: Tensor) -> Tensor:
    """z^T = W h^T + b for neuron-major h_t (n_in, B) -> (n_out, B)."""
    return torch.addmm(linear.bias.unsqueeze(1), linear.weight, h_t)


class SelectiveMLP(SelectiveNetwork):
    """Phase 1: Linear layers, each hidden one followed by a ``MixedActivation`` over its
    neurons (per-neuron logits, straight-through hard Gumbel-Softmax selection).

    ``options``: preprocessing, afu (the learned unit's {units, base, share}) and what passes
    straight through to every ``MixedActivation`` (``SelectiveNetwork``).
    """

    def __init__(
        self,
        arch: Sequence[int],
        pool: Sequence[str],
        **options: Any,
    ) -> None:
        super().__init__(pool, **options)
        self.arch = list(arch)
        self._register_preprocessing()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(arch))
        widths = self.arch[1:-1]
        units = afu_units(self.afu_config, len(widths))
        self.activations = self._mixed_layers(widths, [0] * len(widths), units)  # neuron-major

    def forward(self, x: Tensor) -> Tensor:  # x: (B, D) raw features -> logits (B, C)
        h = ((x - self.offset) * self.scale).t()  # (D, B) neuron-major
        for linear, activation in zip(self.layers[:-1], self.activations, strict=True):
            h = activation(linear_t(linear, h))  # (n_l, B)
        return linear_t(self.layers[-1], h).t()

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """The weights and units as artifacts name them: layers.{i}.weight|bias, afu.{l}.*."""
        state = {k: v.detach().clone() for k, v in self.layers.state_dict(prefix="layers.").items()}
        return state | afu_state_dict(self.afus)


class MixedMLP(MixedNetwork):
    """Phase 2 (and fixed baselines): Linear layers, each hidden one followed by a
    ``FrozenMixedActivation`` with the frozen per-neuron activations, grouped by activation.

    Internally each hidden layer's neurons are stored group by group (pool order, stable within a
    group): rows of W_l and b_l are permuted by P_l and the columns of W_{l+1} by the same P_l.
    Since W_{l+1} P_l^T f(P_l (W_l x + b_l)) = W_{l+1} f(W_l x + b_l) for an elementwise f that is
    permuted along with its neurons, the network computes the same function, while the frozen
    layer sees a sorted assignment: its groups are contiguous blocks of rows, so it runs one
    split (views), one activation per group and a concat, no index op.
    ``canonical_state_dict`` / ``load_canonical_state_dict`` speak neuron order, which is what
    artifacts store.
    """

    def __init__(
        self,
        arch: Sequence[int],
        pool: Sequence[str],
        assignment: Sequence[Sequence[str]],
        **options: Any,
    ) -> None:
        """``options``: preprocessing, candidate_norm, afu (``MixedNetwork``)."""
        super().__init__(pool, assignment, **options)
        self.arch = list(arch)
        self._register_preprocessing()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(arch))
        self.perms: list[Tensor] = []  # per hidden layer: internal position -> neuron index
        units = afu_units(self.afu_config, len(self.assignment))
        activations = []
        for names, unit in zip(self.assignment, units, strict=True):
            index = torch.tensor([self.pool.index(n) for n in names], dtype=torch.int64)
            perm = torch.argsort(index, stable=True)
            self.perms.append(perm)
            activations.append(
                FrozenMixedActivation(
                    self.pool, index[perm], dim=0, candidate_norm=self.candidate_norm, afu=unit
                )
            )
        self.activations = nn.ModuleList(activations)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> MixedMLP:
        return cls(
            spec.arch,
            spec.pool,
            spec.assignment,
            preprocessing=spec.preprocessing,
            afu=spec.afu,
        )

    @classmethod
    def from_selective(cls, selective: SelectiveMLP, *, preprocessing: dict[str, Any]) -> MixedMLP:
        """Freeze c_lj = argmax_k a_ljk and carry the phase-1 weights (and candidate norm) over."""
        options = selective.network_options(preprocessing=preprocessing)
        mixed = cls(selective.arch, selective.pool, selective.assignment(), **options)
        mixed.load_canonical_state_dict(selective.canonical_state_dict())
        return mixed.to(selective.offset.device)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, D) raw features -> logits (B, C)
        h = ((x - self.offset) * self.scale).t()  # (D, B) neuron-major
        for linear, activation in zip(self.layers[:-1], self.activations, strict=True):
            h = activation(linear_t(linear, h))  # (n_l, B), neurons grouped
        return linear_t(self.layers[-1], h).t()

    def folded(self) -> MixedMLP:
        """The same function as a plain network: the candidate norm folded into the next layer.

        Layer l+1 sees h_j = (f_j(z_j) - mu_j) g_j, so W h + b = (W diag(g)) f(z) + (b - W (g mu)):
        columns of W_{l+1} scaled by g, its bias shifted (computed in float64). Artifacts store
        this form, so export and serve see an ordinary mixed network.
        """
        state = {k: v.cpu() for k, v in self.canonical_state_dict().items()}  # folded on the CPU
        if self.transform.affine:
            for layer, names in enumerate(self.assignment):
                index = [self.pool.index(n) for n in names]
                shift = torch.tensor([self.transform.shift[k] for k in index], dtype=torch.float64)
                gain = torch.tensor([self.transform.gain[k] for k in index], dtype=torch.float64)
                w = state[f"layers.{layer + 1}.weight"].double() * gain  # (out, n_l)
                b = state[f"layers.{layer + 1}.bias"].double() - w @ shift
                state[f"layers.{layer + 1}.weight"] = w.float()
                state[f"layers.{layer + 1}.bias"] = b.float()
        options = self.network_options(candidate_norm="none")
        plain = MixedMLP(self.arch, self.pool, self.assignment, **options)
        plain.load_canonical_state_dict(state)
        return plain.to(self.offset.device)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """Weights in neuron order: layers.{i}.weight (out, in) and layers.{i}.bias (out,)."""
        state = {}
        for i, linear in enumerate(self.layers):
            w, b = linear.weight.detach(), linear.bias.detach()
            if i < len(self.perms):  # undo the row permutation: row perm[p] = internal row p
                inv = torch.argsort(self.perms[i].to(w.device))
                w, b = w[inv], b[inv]
            if i > 0:
                inv = torch.argsort(self.perms[i - 1].to(w.device))
                w = w[:, inv]
            state[f"layers.{i}.weight"] = w.contiguous().clone()
            state[f"layers.{i}.bias"] = b.contiguous().clone()
        return state | afu_state_dict(self.afus)

    def load_canonical_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = {}
        for i, (a, b) in enumerate(itertools.pairwise(self.arch)):
            expected[f"layers.{i}.weight"] = (b, a)
            expected[f"layers.{i}.bias"] = (b,)
        expected |= afu_expected_shapes(self.afu_config, len(self.arch) - 2)
        _check_state(state, expected)
        with torch.no_grad():
            for i, linear in enumerate(self.layers):
                w = state[f"layers.{i}.weight"].to(linear.weight)
                b = state[f"layers.{i}.bias"].to(linear.bias)
                if i < len(self.perms):
                    w, b = w[self.perms[i]], b[self.perms[i]]
                if i > 0:
                    w = w[:, self.perms[i - 1]]
                linear.weight.copy_(w)
                linear.bias.copy_(b)
        load_afu_state(self.afus, self.afu_config, state)


def _check_state(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """SpecError unless ``state`` holds exactly the tensors of ``expected``, of those shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [
            f"missing tensor(s) {', '.join(missing)}" if missing else "",
            f"unexpected tensor(s) {', '.join(unexpected)}" if unexpected else "",
        ]
        raise SpecError(
            "weights do not match the architecture: " + "; ".join(p for p in parts if p)
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise SpecError(
                f"tensor {name}: expected shape {list(shape)}, got {list(state[name].shape)}"
            )


# --------------------------------------------------------------------------------------------
# Networks from a layered spec (conv nets)
#
# Module names follow the spec, so that state_dict() gives the names artifacts store:
# layers.{i}.* is spec layer i (parameters and batchnorm statistics; pools and flatten hold
# none), afu.{l}.* the learned unit of hidden layer l (shared: the same module at every l). The
# mixed layers are activations.{l}: phase 1's logits live there (checkpoints hold them), phase
# 2's frozen assignment is the spec's, so artifacts leave those buffers out.


def build_layers(layers: Sequence[dict[str, Any]], input_shape: Sequence[int]) -> nn.ModuleList:
    """Spec layer i as module i: Conv2d, BatchNorm2d (after a conv) or BatchNorm1d (after a
    linear), MaxPool2d, AvgPool2d, Flatten, Linear. SpecError names a layer that does not fit
    ``input_shape`` (C, H, W)."""
    before = [list(input_shape), *layer_output_shapes(layers, input_shape)]  # input of layer i
    modules: list[nn.Module] = []
    for layer, shape in zip(layers, before, strict=False):
        kind = layer["type"]
        if kind == "conv":
            modules.append(
                nn.Conv2d(
                    shape[0],
                    layer["channels"],
                    layer["kernel"],
                    stride=layer.get("stride", 1),
                    padding=layer.get("padding", 0),
                )
            )
        elif kind == "batchnorm":
            modules.append(
                nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])
            )
        elif kind in ("maxpool", "avgpool"):
            pool = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
            modules.append(pool(layer["kernel"], stride=layer.get("stride", layer["kernel"])))
        elif kind == "flatten":
            modules.append(nn.Flatten())  # (N, C, H, W) -> (N, C*H*W), channel-major
        else:  # linear (the spec's validation allows nothing else)
            modules.append(nn.Linear(shape[0], layer["features"]))
    return nn.ModuleList(modules)


class _Layered:
    """What phase 1 and phase 2 of a layered network share: the spec's layers, the hidden layers'
    kinds and widths, where each mixed layer applies, the preprocessing and the forward."""

    layers: nn.ModuleList
    activations: nn.ModuleList

    def _init_layered(
        self, layers: Sequence[dict[str, Any]], input_shape: Sequence[int]
    ) -> list[AFUnit | None]:
        """The spec's layers as modules, the preprocessing buffers, and the hidden layers'
        learned units (returned; None without one)."""
        self.spec_layers = copy.deepcopy(list(layers))
        self.input_shape = list(input_shape)
        self.arch = layered_arch(self.spec_layers, self.input_shape)  # SpecError if misfit
        self._register_preprocessing(self.input_shape)
        self.layers = build_layers(self.spec_layers, self.input_shape)
        hidden = hidden_layer_indices(self.spec_layers)
        self.hidden_kinds = [self.spec_layers[i]["type"] for i in hidden]  # conv | linear
        # spec index after which each hidden layer's mixed layer applies -> hidden layer index
        self.activation_at = {i: h for h, i in enumerate(activation_after(self.spec_layers))}
        units = afu_units(self.afu_config, len(hidden))
        self.afu = None if self.afu_config is None else nn.ModuleList(units)
        return units

    def _feature_dim(self, hidden: int) -> int:
        """The axis of a hidden layer's features: channels of (N, C, H, W), or the last."""
        return 1 if self.hidden_kinds[hidden] == "conv" else -1

    def forward(self, x: Tensor) -> Tensor:  # x: (N, C, H, W) raw -> logits (N, classes)
        h = (x - self.offset) * self.scale
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in self.activation_at:
                h = self.activations[self.activation_at[i]](h)
        return h


class SelectiveConvNet(_Layered, SelectiveNetwork):
    """Phase 1 of a layered spec: ``MixedActivation(channels, dim=1)`` after every hidden conv,
    ``MixedActivation(features)`` after every hidden linear (after their batchnorm, if any).
    ``options`` pass straight through to every ``MixedActivation``, as for ``SelectiveMLP``."""

    def __init__(
        self,
        layers: Sequence[dict[str, Any]],
        input_shape: Sequence[int],
        pool: Sequence[str],
        **options: Any,
    ) -> None:
        super().__init__(pool, **options)
        units = self._init_layered(layers, input_shape)
        dims = [self._feature_dim(hidden) for hidden in range(len(units))]
        self.activations = self._mixed_layers(self.arch[1:-1], dims, units)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """The weights as artifacts name them: layers.{i}.* (no batchnorm step counters) and
        afu.{l}.*."""
        return _artifact_state(self)


class MixedConvNet(_Layered, MixedNetwork):
    """Phase 2 (and fixed baselines) of a layered spec: ``FrozenMixedActivation`` per hidden
    layer with the assignment in channel (neuron) order. ``candidate_norm`` is the norm the
    frozen layers still apply: phase 1's while training, "none" once ``folded`` could move it
    into the next layer."""

    def __init__(
        self,
        layers: Sequence[dict[str, Any]],
        input_shape: Sequence[int],
        pool: Sequence[str],
        assignment: Sequence[Sequence[str]],
        **options: Any,
    ) -> None:
        """``options``: preprocessing, candidate_norm, afu (``MixedNetwork``)."""
        super().__init__(pool, assignment, **options)
        units = self._init_layered(layers, input_shape)
        if len(self.assignment) != len(units):
            raise SpecError(
                f"assignment: expected {len(units)} hidden layers, got {len(self.assignment)}"
            )
        self.activations = nn.ModuleList(
            FrozenMixedActivation(
                self.pool,
                names,
                dim=self._feature_dim(hidden),
                candidate_norm=self.candidate_norm,
                afu=unit,
            )
            for hidden, (names, unit) in enumerate(zip(self.assignment, units, strict=True))
        )

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, candidate_norm: str = "none") -> MixedConvNet:
        return cls(
            spec.layers,
            spec.input_shape,
            spec.pool,
            spec.assignment,
            preprocessing=spec.preprocessing,
            candidate_norm=candidate_norm,
            afu=spec.afu,
        )

    @classmethod
    def from_selective(
        cls, selective: SelectiveConvNet, *, preprocessing: dict[str, Any]
    ) -> MixedConvNet:
        """Freeze every feature's argmax and carry the phase-1 weights, batchnorm statistics,
        units and candidate norm over."""
        options = selective.network_options(preprocessing=preprocessing)
        layers, shape = selective.spec_layers, selective.input_shape
        mixed = cls(layers, shape, selective.pool, selective.assignment(), **options)
        mixed.layers.load_state_dict(selective.layers.state_dict())  # step counters too
        load_afu_state(mixed.afus, mixed.afu_config, afu_state_dict(selective.afus))
        return mixed.to(selective.offset.device)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """The weights as artifacts name them: layers.{i}.* (no batchnorm step counters) and
        afu.{l}.*, in channel order (nothing is permuted inside this network)."""
        return _artifact_state(self)

    def load_canonical_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load artifacts' tensors; SpecError names a missing, unexpected or misshapen one."""
        expected = layered_weight_shapes(self.spec_layers, self.input_shape)
        expected |= afu_expected_shapes(self.afu_config, len(self.assignment))
        _check_state(state, expected)
        own = dict(self.layers.named_parameters(prefix="layers"))
        own |= dict(self.layers.named_buffers(prefix="layers"))
        with torch.no_grad():
            for name in layered_weight_shapes(self.spec_layers, self.input_shape):
                own[name].copy_(state[name].to(own[name]))
        load_afu_state(self.afus, self.afu_config, state)

    def norm_folds(self) -> bool:
        """Whether ``folded`` moves the candidate norm into the next layers exactly (see there)."""
        return norm_folds(
            self.spec_layers, self.pool, self.assignment, self.candidate_norm, self.afu_config
        )

    def folded(self) -> MixedConvNet:
        """The same function, the candidate norm moved into the next conv/linear where exact.

        Hidden layer l's feature j passes h_j = (f_j(z_j) - mu_j) g_j (g_j > 0) on to the next
        conv or linear layer, through max/avg pools (no padding) and a flatten between:
        - the gain commutes with the pools (max(g u) = g max(u) for g > 0; averages are linear)
          and goes into that layer's input channel j: W[:, j] *= g_j (for a linear after a
          flatten: the H*W columns of channel j), exact for any padding;
        - the shift commutes with the pools too (max(u - c) = max(u) - c; a pool without
          padding averages k*k real values) and becomes bias b -= sum over channel j's
          weights of W mu_j (computed in float64), exact where the layer sees h at every
          position it reads: a linear, or a conv with padding 0 (a padded conv reads zeros at
          the border, where the norm would have given -mu_j g_j; ``norm_folds`` says no).
        When the norm does not fold everywhere the network keeps it (a copy with the same
        ``candidate_norm``): model.json's training section then records it
        (``frozen_candidate_norm``), so that export rebuilds the same frozen layers.
        """
        keeps = self.candidate_norm != "none" and not self.norm_folds()
        norm = self.candidate_norm if keeps else "none"
        state = {k: v.cpu() for k, v in self.canonical_state_dict().items()}  # folded on the CPU
        if self.transform.affine and not keeps:
            shapes = [
                list(self.input_shape),
                *layer_output_shapes(self.spec_layers, self.input_shape),
            ]
            for hidden, at in enumerate(activation_after(self.spec_layers)):
                c = _next_affine(self.spec_layers, at)
                index = [self.pool.index(n) for n in self.assignment[hidden]]
                shift = torch.tensor([self.transform.shift[k] for k in index], dtype=torch.float64)
                gain = torch.tensor([self.transform.gain[k] for k in index], dtype=torch.float64)
                w = state[f"layers.{c}.weight"].double()
                if self.spec_layers[c]["type"] == "conv":  # (out, C, k, k): input channel j
                    w = w * gain.reshape(1, -1, 1, 1)
                    shifted = (w * shift.reshape(1, -1, 1, 1)).sum((1, 2, 3))
                else:  # linear (out, C * block): channel j's block of columns after a flatten
                    block = shapes[c][0] // len(index)  # H*W after a flatten, else 1
                    w = w * gain.repeat_interleave(block)
                    shifted = w @ shift.repeat_interleave(block)
                state[f"layers.{c}.weight"] = w.float()
                state[f"layers.{c}.bias"] = (state[f"layers.{c}.bias"].double() - shifted).float()
        options = self.network_options(candidate_norm=norm)
        plain = MixedConvNet(
            self.spec_layers, self.input_shape, self.pool, self.assignment, **options
        )
        plain.load_canonical_state_dict(state)
        plain.train(self.training)
        return plain.to(self.offset.device)


def _next_affine(layers: Sequence[dict[str, Any]], after: int) -> int:
    """The index of the first conv or linear layer after spec index ``after`` (one always
    follows a hidden layer: the last layer is linear)."""
    return next(i for i in range(after + 1, len(layers)) if layers[i]["type"] in ("conv", "linear"))


def norm_folds(
    layers: Sequence[dict[str, Any]],
    pool: Sequence[str],
    assignment: Sequence[Sequence[str]],
    candidate_norm: str,
    afu: dict[str, Any] | None,
) -> bool:
    """Whether a layered network's candidate norm folds exactly into the layers after each
    hidden layer (``MixedConvNet.folded``): every hidden layer whose features shift (mu_j != 0
    for an activation it uses) is read by a linear or an unpadded conv (the pools between have
    no padding: the spec has none)."""
    transform = CandidateTransform.build(
        pool, norm=candidate_norm, afu_base=afu["base"] if afu else "relu"
    )
    for hidden, at in enumerate(activation_after(layers)):
        shifts = any(transform.shift[pool.index(n)] for n in set(assignment[hidden]))
        consumer = layers[_next_affine(layers, at)]
        if shifts and consumer["type"] == "conv" and consumer.get("padding", 0):
            return False
    return True


def _artifact_state(model: _Layered) -> dict[str, Tensor]:
    """layers.{i}.* without the batchnorm step counters (artifacts hold float32 only; they
    matter only to a BatchNorm without momentum) and afu.{l}.*, detached copies."""
    state = {
        k: v.detach().clone()
        for k, v in model.layers.state_dict(prefix="layers.").items()
        if not k.endswith(".num_batches_tracked")
    }
    return state | afu_state_dict(model.afus)


def mixed_from_selective(
    selective: SelectiveNetwork, *, preprocessing: dict[str, Any]
) -> MixedNetwork:
    """Phase 2's network from phase 1's: its argmax frozen, its weights carried over."""
    if isinstance(selective, SelectiveConvNet):
        return MixedConvNet.from_selective(selective, preprocessing=preprocessing)
    return MixedMLP.from_selective(selective, preprocessing=preprocessing)
