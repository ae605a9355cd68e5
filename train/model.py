"""SmartMixed networks built from smartmixed.nn's layers: the phase-1 selective MLP and the
phase-2 mixed MLP.

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

The learned activation unit (pool name ``afu``) is one ``AFUnit`` per hidden layer, or one
instance given to every layer (afu share "network"), trained with the weights in every phase.
"""

from __future__ import annotations

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
    afu_param_shape,
    afu_tensor_name,
    check_afu_config,
    parse_arch,
    resolve_preset,
)
from smartmixed.nn import FrozenMixedActivation, MixedActivation, set_temperature
from smartmixed.nn.layers import (  # noqa: F401  (the option names, re-exported for the CLI)
    CANDIDATE_NORMS,
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


class SelectiveNetwork(nn.Module):
    """Phase 1: a network whose hidden layers are followed by ``MixedActivation`` modules
    (``self.activations``, one per hidden layer, in order). ``tau``, ``relaxed`` and
    ``eval_noise`` read the first layer's and set every layer's (the loop's schedule)."""

    activations: nn.ModuleList
    pool: list[str]
    afu_config: dict[str, Any] | None

    @property
    def tau(self) -> float:
        return self.activations[0].tau

    @tau.setter
    def tau(self, value: float) -> None:
        set_temperature(self, value)

    @property
    def relaxed(self) -> bool:
        """Train the soft mixture sum_k s_k h_k(z) instead of the hard sample (--soft-epochs)."""
        return self.activations[0].relaxed

    @relaxed.setter
    def relaxed(self, value: bool) -> None:
        for layer in self.activations:
            layer.relaxed = value

    @property
    def eval_noise(self) -> bool:
        """Gumbel noise in evaluation too (the reference code's protocol)."""
        return self.activations[0].eval_noise

    @eval_noise.setter
    def eval_noise(self, value: bool) -> None:
        for layer in self.activations:
            layer.eval_noise = value

    @property
    def transform(self) -> CandidateTransform:
        return self.activations[0].transform

    @property
    def afus(self) -> list[AFUnit] | None:
        """Each hidden layer's learned unit (the same object at every layer when shared)."""
        return None if self.afu_config is None else [a.afu for a in self.activations]

    def choices(self) -> list[Tensor]:
        """argmax of the logits per hidden layer, (n_l,) int64 each."""
        return [layer.choice() for layer in self.activations]

    def assignment(self) -> list[list[str]]:
        return [[self.pool[k] for k in c.tolist()] for c in self.choices()]

    def activation_counts(self) -> list[dict[str, int]]:
        return [layer.activation_counts() for layer in self.activations]


class MixedNetwork(nn.Module):
    """Phase 2 (and fixed baselines): hidden layers followed by ``FrozenMixedActivation``
    modules (``self.activations``); ``assignment`` holds the activation name of every neuron
    (or channel), in neuron order, per hidden layer."""

    activations: nn.ModuleList
    pool: list[str]
    assignment: list[list[str]]
    afu_config: dict[str, Any] | None

    @property
    def transform(self) -> CandidateTransform:
        return self.activations[0].transform

    @property
    def afus(self) -> list[AFUnit] | None:
        return None if self.afu_config is None else [a.afu for a in self.activations]

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


def _preprocessing_tensor(value: float | list[float]) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)


class SelectiveMLP(SelectiveNetwork):
    """Phase 1: Linear layers, each hidden one followed by a ``MixedActivation`` over its
    neurons (per-neuron logits, straight-through hard Gumbel-Softmax selection).

    The options beyond arch and pool pass straight through to every ``MixedActivation``
    (smartmixed.nn documents them); ``afu``: the learned unit's {units, base, share}.
    """

    def __init__(
        self,
        arch: Sequence[int],
        pool: Sequence[str],
        *,
        preprocessing: dict[str, Any] | None = None,
        tau: float = 0.3,
        logit_init_std: float = 0.0,
        candidate_norm: str = "none",
        clamp: float | None = None,
        eval_noise: bool = False,
        logit_grad_norm: str = "none",
        afu: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.arch, self.pool = list(arch), list(pool)
        self.candidate_norm = candidate_norm
        # the learned unit's {units, base, share} when the pool holds it
        self.afu_config = check_afu_config(afu) if AFU in self.pool else None
        pre = preprocessing or {"offset": 0.0, "scale": 1.0}
        self.register_buffer("offset", _preprocessing_tensor(pre["offset"]), persistent=False)
        self.register_buffer("scale", _preprocessing_tensor(pre["scale"]), persistent=False)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(arch))
        widths = self.arch[1:-1]
        self.activations = nn.ModuleList(
            MixedActivation(
                width,
                pool=self.pool,
                dim=0,  # neuron-major (see above)
                tau=tau,
                candidate_norm=candidate_norm,
                logit_init_std=logit_init_std,
                clamp=clamp,
                eval_noise=eval_noise,
                logit_grad_norm=logit_grad_norm,
                afu=unit,
            )
            for width, unit in zip(widths, afu_units(self.afu_config, len(widths)), strict=True)
        )

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
        *,
        preprocessing: dict[str, Any] | None = None,
        candidate_norm: str = "none",
        afu: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.arch, self.pool = list(arch), list(pool)
        self.assignment = [list(layer) for layer in assignment]
        pre = preprocessing or {"offset": 0.0, "scale": 1.0}
        self.preprocessing = pre
        self.candidate_norm = candidate_norm
        # the learned unit's {units, base, share} when the pool holds it; its parameters keep
        # training in phase 2
        self.afu_config = check_afu_config(afu) if AFU in self.pool else None
        self.register_buffer("offset", _preprocessing_tensor(pre["offset"]), persistent=False)
        self.register_buffer("scale", _preprocessing_tensor(pre["scale"]), persistent=False)
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
                    self.pool, index[perm], dim=0, candidate_norm=candidate_norm, afu=unit
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
        mixed = cls(
            selective.arch,
            selective.pool,
            selective.assignment(),
            preprocessing=preprocessing,
            candidate_norm=selective.candidate_norm,
            afu=selective.afu_config,
        )
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
        plain = MixedMLP(
            self.arch,
            self.pool,
            self.assignment,
            preprocessing=self.preprocessing,
            afu=self.afu_config,
        )
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
