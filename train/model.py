"""SmartMixed networks: the phase-1 selective MLP and the phase-2 mixed MLP.

The model spec (model.json) and the presets live in smartmixed.contract; re-exported here.

Phase 1 (``SelectiveMLP``): hidden neuron j of layer l keeps logits a_lj over the pool P. Every
training forward draws Gumbel noise g = -log(-log(u + eps) + eps), takes s = softmax((a + g)/tau)
and the straight-through hard sample y = onehot(argmax s) - sg(s) + s. The neuron's output is
sum_k y_k f_k(z) = f_c(z) with c = argmax s: exactly one activation in the forward, while the
backward reaches the logits through s. Evaluation uses c = argmax a.

Phase 2 (``MixedMLP``): c_lj = argmax_k a_ljk is frozen; neurons with the same activation form a
group; a layer is one affine map followed by each group's activation on its slice. Fixed
baselines are the special case of a single group.

The learned activation unit (pool name ``afu``, issue I) is a candidate with parameters:
``AFUnit`` per hidden layer (or one shared by the network), trained with the weights in every
phase; in phase 1 only the neurons whose hard sample chose it pass gradient to its parameters
(``SelectiveMLP._afu_parameter_gradient``).
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
from smartmixed.nn.layers import (  # noqa: F401
    CANDIDATE_NORMS,
    GUMBEL_EPS,
    LOGIT_GRAD_NORMS,
    AFUnit,
    CandidateTransform,
    _SelectActivation,
    _with_afu,
    gumbel_softmax_sample,
)
from smartmixed.nn.pool import (
    Activation,
    batch_sum_basis,
    get_activation,
)

# --------------------------------------------------------------------------------------------
# Activations applied group by group
#
# Inside the networks, activations are neuron-major: h^T of shape (n, B). A layer is
# z^T = W h^T + b (one addmm, same cost as the usual h W^T + b), and a group of neurons is then a
# block of whole rows, so gathering, slicing and concatenating groups moves contiguous memory.


def linear_t(linear: nn.Linear, h_t: Tensor) -> Tensor:
    """z^T = W h^T + b for neuron-major h_t (n_in, B) -> (n_out, B)."""
    return torch.addmm(linear.bias.unsqueeze(1), linear.weight, h_t)


def apply_contiguous(
    z: Tensor,
    groups: Sequence[tuple[int, int]],
    acts: Sequence[Activation],
    transform: CandidateTransform | None = None,
) -> Tensor:
    """Group (k, size) takes activation acts[k] on its block of rows of z (n, B), in order:
    split (views), apply (then the candidate transform, if any), concat."""
    blocks = z.split([size for _, size in groups])
    parts = [acts[k].fn(c) for (k, _), c in zip(groups, blocks)]
    if transform is not None:
        parts = [transform.apply(k, p) for (k, _), p in zip(groups, parts)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def build_afus(config: dict[str, Any] | None, n_layers: int) -> nn.ModuleList | None:
    """One AFU per hidden layer (share "layer"), or one module at every index ("network": the
    same parameters; nn.Module.parameters() yields them once, so Adam updates them once)."""
    if config is None:
        return None
    if config["share"] == "network":
        unit = AFUnit(config["units"], config["base"])
        return nn.ModuleList([unit] * n_layers)
    return nn.ModuleList(AFUnit(config["units"], config["base"]) for _ in range(n_layers))


def afu_state_dict(afus: nn.ModuleList | None) -> dict[str, Tensor]:
    """afu.{l}.w0|b0|w1|b1 for every hidden layer l, cloned (equal copies when shared)."""
    if afus is None:
        return {}
    return {
        afu_tensor_name(layer, name): value.detach().clone()
        for layer, unit in enumerate(afus)
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


def load_afu_state(afus: nn.ModuleList | None, config: dict | None, state: dict) -> None:
    """Copy afu.{l}.* into the units (shapes already checked); a shared unit must be stored
    with equal copies in every layer, else SpecError names the tensor."""
    if afus is None:
        return
    if config["share"] == "network":
        for layer in range(1, len(afus)):
            for name in AFU_PARAMS:
                key = afu_tensor_name(layer, name)
                if not torch.equal(state[key], state[afu_tensor_name(0, name)]):
                    raise SpecError(
                        f"tensor {key}: the AFU is shared by the network (afu.share "
                        f"'network'), but it differs from {afu_tensor_name(0, name)}"
                    )
    with torch.no_grad():
        for layer, unit in enumerate(afus):
            for name, param in unit.params().items():
                param.copy_(state[afu_tensor_name(layer, name)].to(param))


# --------------------------------------------------------------------------------------------
# Networks


def _preprocessing_tensor(value: float | list[float]) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)


class SelectiveMLP(nn.Module):
    """Phase 1: per-neuron activation logits, straight-through hard Gumbel-Softmax selection.

    The logits of all hidden layers live in one (sum n_l, K) parameter, so that one Gumbel
    sample and one grouping (argsort, bincount) per step serve every layer.
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
        self.arch, self.pool, self.tau = list(arch), list(pool), tau  # tau: set per epoch
        # the learned unit's {units, base, share} when the pool holds it (issue I)
        self.afu_config = check_afu_config(afu) if AFU in self.pool else None
        self.afus = build_afus(self.afu_config, len(self.arch) - 2)
        # relaxed: the soft mixture sum_k s_k h_k(z) instead of the hard sample (--soft-epochs;
        # set per epoch by the loop)
        self.relaxed = False
        if logit_grad_norm not in LOGIT_GRAD_NORMS:
            raise SpecError(
                f"logit grad norm {logit_grad_norm!r}: expected one of {LOGIT_GRAD_NORMS}"
            )
        self.logit_grad_norm = logit_grad_norm
        self.acts = tuple(get_activation(n) for n in pool)
        self.basis = batch_sum_basis(pool)
        self.candidate_norm = candidate_norm
        self.transform = CandidateTransform.build(
            pool, norm=candidate_norm, clamp=clamp, afu_base=self._afu_base()
        )
        # the reference code's evaluation draws Gumbel noise too (--protocol reference-code)
        self.eval_noise = eval_noise
        pre = preprocessing or {"offset": 0.0, "scale": 1.0}
        self.register_buffer("offset", _preprocessing_tensor(pre["offset"]), persistent=False)
        self.register_buffer("scale", _preprocessing_tensor(pre["scale"]), persistent=False)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(arch))
        widths = self.arch[1:-1]
        self.selection_logits = nn.Parameter(torch.randn(sum(widths), len(pool)) * logit_init_std)
        # layer index of every hidden neuron, for grouping all layers with one argsort
        layer_of = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
        self.register_buffer("layer_of_neuron", layer_of, persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, D) raw features -> logits (B, C)
        logits = self.selection_logits
        if self.training or self.eval_noise:
            soft, choice = gumbel_softmax_sample(logits, self.tau)  # (K, N), (N,)
            if self.logit_grad_norm == "candidate" and soft.requires_grad:
                soft.register_hook(self._normalise_candidates)
        else:  # evaluation: argmax of the logits, no noise
            soft, choice = logits.detach().t(), logits.detach().argmax(dim=-1)
        n_acts, widths = len(self.acts), self.arch[1:-1]
        key = self.layer_of_neuron * n_acts + choice  # sorts by layer, then by activation
        order = torch.argsort(key, stable=True)
        sizes = torch.bincount(key, minlength=len(widths) * n_acts).tolist()
        h = ((x - self.offset) * self.scale).t()  # (D, B) neuron-major
        start = 0
        for layer, (linear, width) in enumerate(zip(self.layers[:-1], widths, strict=True)):
            acts, basis = self._layer_candidates(layer)
            if self.relaxed and self.training:
                h = self._relaxed(linear_t(linear, h), soft[:, start : start + width], acts)
                start += width
                continue
            perm = order[start : start + width] - start  # (n_l,) grouped position -> neuron
            z = linear_t(linear, h)
            h = _SelectActivation.apply(
                z,
                soft[:, start : start + width],
                perm,
                sizes[layer * n_acts : (layer + 1) * n_acts],
                acts,
                basis,
                self.transform,
            )
            if self.afus is not None and torch.is_grad_enabled():
                h = self._afu_parameter_gradient(layer, z, h, choice[start : start + width])
            start += width
        return linear_t(self.layers[-1], h).t()

    def _afu_base(self) -> str:
        return self.afu_config["base"] if self.afu_config else "relu"

    def _layer_candidates(
        self, layer: int
    ) -> tuple[tuple[Activation, ...], tuple[tuple[Activation, ...], Tensor]]:
        """The pool's activations and batch-sum basis with ``afu`` bound to this layer's unit."""
        if self.afus is None:
            return self.acts, self.basis
        afu = self.afus[layer].activation()
        return _with_afu(self.acts, afu), (_with_afu(self.basis[0], afu), self.basis[1])

    def _afu_parameter_gradient(self, layer: int, z: Tensor, h: Tensor, choice: Tensor) -> Tensor:
        """h plus zero, carrying dL/dtheta of the AFU to the neurons that chose it.

        _SelectActivation treats the unit as a fixed function (it gives dL/dz and every
        neuron's logit gradient sum_b g h_afu(z), the straight-through rule). Textbook autograd
        of sum_k y_k h_k(z) also gives theta the term y_afu dh_afu/dtheta, and y_afu is 1 in
        value for the neurons whose hard choice is afu, 0 for the others. So add, on those rows,
        c - sg(c) with c = h_afu(sg(z)) (clamped like the candidate, times its gain): zero in
        value, dh_afu/dtheta in gradient, nothing to z (the function already gave it)."""
        k = self.pool.index(AFU)
        rows = (choice == k).nonzero().squeeze(1)  # neurons of this layer that chose afu
        if not len(rows):
            return h
        c = self.afus[layer](z.detach().index_select(0, rows))  # (rows, B)
        if self.transform.clamp is not None:
            c = c.clamp(-self.transform.clamp, self.transform.clamp)
        c = (c - c.detach()) * self.transform.gain[k]
        return h.index_add(0, rows, c)

    def _relaxed(self, z: Tensor, soft: Tensor, acts: Sequence[Activation]) -> Tensor:
        """The soft Gumbel-Softmax mixture sum_k s_k h_k(z) for z (n, B), s (K, n): every
        candidate is computed and weighted, so the logits get the exact gradient of the relaxed
        network (no straight-through approximation). ``acts``: the layer's candidates (afu bound
        to the layer's unit, whose parameters then get the relaxed gradient too)."""
        out = torch.zeros_like(z)
        clamp = self.transform.clamp
        for k, act in enumerate(acts):
            f = act.fn(z)
            if clamp is not None:
                f = f.clamp(-clamp, clamp)
            out = out + soft[k].unsqueeze(1) * self.transform.apply(k, f)
        return out

    def _normalise_candidates(self, grad: Tensor) -> Tensor:
        """--logit-grad-norm candidate: dL/ds (K, N) with each candidate's row rescaled, layer by
        layer, to the layer's mean RMS, so that no candidate's push is larger only because its
        output is larger (the issue-E bias); the direction per neuron is kept."""
        parts = []
        for g in grad.split(self.arch[1:-1], dim=1):  # (K, n_l)
            rms = g.pow(2).mean(1, keepdim=True).sqrt()  # (K, 1)
            parts.append(g * (rms.mean() / rms.clamp_min(1e-12)))
        return torch.cat(parts, dim=1)

    def choices(self) -> list[Tensor]:
        """argmax of the logits per hidden layer, (n_l,) int64 each."""
        return list(self.selection_logits.detach().argmax(dim=-1).split(self.arch[1:-1]))

    def assignment(self) -> list[list[str]]:
        return [[self.pool[k] for k in c.tolist()] for c in self.choices()]

    def activation_counts(self) -> list[dict[str, int]]:
        return [
            dict(zip(self.pool, torch.bincount(c, minlength=len(self.pool)).tolist(), strict=True))
            for c in self.choices()
        ]


class MixedMLP(nn.Module):
    """Phase 2 (and fixed baselines): frozen per-neuron activations, grouped by activation.

    Internally each hidden layer's neurons are stored group by group (pool order, stable within a
    group): rows of W_l and b_l are permuted by P_l and the columns of W_{l+1} by the same P_l.
    Since W_{l+1} P_l^T f(P_l (W_l x + b_l)) = W_{l+1} f(W_l x + b_l) for an elementwise f that is
    permuted along with its neurons, the network computes the same function, while each group is
    a contiguous block of rows: one addmm, a split (views), one activation per group, a concat.
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
        # the learned unit's {units, base, share} when the pool holds it (issue I); its
        # parameters keep training in phase 2
        self.afu_config = check_afu_config(afu) if AFU in self.pool else None
        self.afus = build_afus(self.afu_config, len(self.arch) - 2)
        base = self.afu_config["base"] if self.afu_config else "relu"
        self.transform = CandidateTransform.build(pool, norm=candidate_norm, afu_base=base)
        self.register_buffer("offset", _preprocessing_tensor(pre["offset"]), persistent=False)
        self.register_buffer("scale", _preprocessing_tensor(pre["scale"]), persistent=False)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(arch))
        self.perms: list[Tensor] = []  # per hidden layer: internal position -> neuron index
        self.groups: list[list[tuple[int, int]]] = []  # per hidden layer: (pool index, size)
        for names in self.assignment:
            index = torch.tensor([self.pool.index(n) for n in names], dtype=torch.int64)
            self.perms.append(torch.argsort(index, stable=True))
            counts = torch.bincount(index, minlength=len(self.pool)).tolist()
            self.groups.append([(k, c) for k, c in enumerate(counts) if c])
        self.acts = tuple(get_activation(n) for n in self.pool)

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
        mixed.load_canonical_state_dict(
            {k: v for k, v in selective.state_dict().items() if k.startswith("layers.")}
            | afu_state_dict(selective.afus)
        )
        return mixed.to(selective.offset.device)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, D) raw features -> logits (B, C)
        h = ((x - self.offset) * self.scale).t()  # (D, B) neuron-major
        transform = self.transform if self.transform.affine else None
        for layer, (linear, groups) in enumerate(zip(self.layers[:-1], self.groups, strict=True)):
            z = linear_t(linear, h)  # (n_l, B), neurons grouped
            acts = (
                self.acts
                if self.afus is None
                else _with_afu(self.acts, self.afus[layer].activation())
            )
            h = apply_contiguous(z, groups, acts, transform)
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
        for i, (a, b) in enumerate(zip(self.arch[:-1], self.arch[1:])):
            expected[f"layers.{i}.weight"] = (b, a)
            expected[f"layers.{i}.bias"] = (b,)
        expected |= afu_expected_shapes(self.afu_config, len(self.arch) - 2)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise SpecError(
                "weights do not match the architecture: "
                + "; ".join(
                    part
                    for part in (
                        f"missing tensor(s) {', '.join(missing)}" if missing else "",
                        f"unexpected tensor(s) {', '.join(unexpected)}" if unexpected else "",
                    )
                    if part
                )
            )
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise SpecError(
                    f"tensor {name}: expected shape {list(shape)}, got {list(state[name].shape)}"
                )
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
