"""SmartMixed as drop-in layers: ``MixedActivation`` (phase 1) and ``FrozenMixedActivation``.

Phase 1 (``MixedActivation``): each of the ``num_features`` slices of the input along ``dim`` (a
neuron after a Linear, ``dim=-1``; a channel after a Conv, ``dim=1``, one choice shared by every
position of that channel) keeps logits a_j over the pool P. Every training forward draws Gumbel
noise g = -log(-log(u + eps) + eps), takes s = softmax((a + g) / tau) and the straight-through
hard sample y = onehot(argmax s) - sg(s) + s. The feature's output is sum_k y_k h_k(z) = h_c(z)
with c = argmax s: exactly one activation in the forward, while the backward reaches the logits
through s. Evaluation uses c = argmax a (no noise, deterministic).

Phase 2 (``FrozenMixedActivation``): c_j = argmax_k a_jk is frozen (a buffer, so ``state_dict``
round-trips); features with the same activation form a group and each group's activation runs
once on its slice. Its forward equals the phase-1 evaluation forward exactly.

h_k is candidate k as the ``CandidateTransform`` shapes it: ``standard`` (the default)
standardises each candidate by its moments under a unit normal input (pool.standard_moments),
so that the logit gradient compares shapes, not output scales.

The learned activation unit (pool name ``afu``) is a candidate with parameters (``AFUnit``),
trained with the weights; in phase 1 only the features whose hard sample chose it pass gradient
to its parameters (``MixedActivation._afu_parameter_gradient``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartmixed.contract import (
    AFU,
    AFU_PARAMS,
    SpecError,
    check_afu_config,
    parse_pool,
)
from smartmixed.nn.pool import (
    Activation,
    afu_activation,
    afu_apply,
    afu_init,
    batch_sum_basis,
    get_activation,
    standard_moments,
)

GUMBEL_EPS = 1e-10

CANDIDATE_NORMS = ("none", "standard")
LOGIT_GRAD_NORMS = ("none", "candidate")
# feature: every feature keeps its own logits and draw (the method); layer: one logit vector and
# one draw per forward for the whole layer, so the layer freezes to a single activation
GRANULARITIES = ("feature", "layer")


@dataclass(frozen=True)
class CandidateTransform:
    """What each candidate's output passes through: clamp to [-clamp, clamp], then affine.

    h = (clamp(f_k(z)) - shift_k) * gain_k. ``standard`` sets shift_k, gain_k = mu_k, 1/sd_k of
    f_k(g), g ~ N(0, 1) (pool.standard_moments; why: the bias note there); ``none`` is
    the identity. The clamp reproduces the reference code's phase 1 (``--protocol
    reference-code``) and is None otherwise.
    """

    shift: tuple[float, ...]
    gain: tuple[float, ...]
    clamp: float | None = None
    affine: bool = field(init=False)  # any candidate with shift != 0 or gain != 1 (set once)

    def __post_init__(self) -> None:
        affine = any(self.shift) or any(g != 1.0 for g in self.gain)
        object.__setattr__(self, "affine", affine)  # frozen: derived once, not per forward

    @classmethod
    def build(
        cls,
        pool: Sequence[str],
        *,
        norm: str = "none",
        clamp: float | None = None,
        afu_base: str = "relu",
    ) -> CandidateTransform:
        """``afu`` is standardised with its base's moments: the unit starts as its base exactly
        (pool.afu_init), and a constant map keeps it foldable; the unit's own w1, b1 learn any
        further scale and offset."""
        if norm not in CANDIDATE_NORMS:
            raise SpecError(f"candidate norm {norm!r}: expected one of {CANDIDATE_NORMS}")
        if norm == "none":
            return cls((0.0,) * len(pool), (1.0,) * len(pool), clamp)
        moments = [standard_moments(afu_base if name == AFU else name) for name in pool]
        return cls(tuple(m for m, _ in moments), tuple(1.0 / sd for _, sd in moments), clamp)

    def apply(self, k: int, out: Tensor) -> Tensor:
        """The affine part for candidate k (the clamp is the caller's: it shapes derivatives)."""
        if self.shift[k] == 0.0 and self.gain[k] == 1.0:
            return out
        return (out - self.shift[k]) * self.gain[k]  # not in place: autograd may save out


class _SelectActivation(torch.autograd.Function):
    """Straight-through mixture sum_k y_k h_k(z) for a hard one-hot y, without the (n, B, K) stack.

    h_k = (clamp(f_k) - shift_k) * gain_k is candidate k as the ``CandidateTransform`` shapes it
    (plain f_k by default is the identity transform).
    z^T: (n, B) neuron-major; soft s^T: (K, n); perm orders the neurons by their choice c, and
    sizes[k] neurons chose activation k.
    Forward: out = h_c(z), exactly one activation per neuron, computed group by group on a
    grouped copy of z (each group a contiguous block of rows).
    Backward, with y = onehot(c) - sg(s) + s:
        dL/dz_jb = h_c'(z_jb) g_jb                (y is one-hot in value)
        dL/ds_jk = dL/dy_jk = sum_b g_jb h_k(z_jb)
                 = gain_k (sum_b g_jb f_k(z_jb) - shift_k sum_b g_jb)   (no clamp)
    Saved: z and h_c'(z), both (n, B) in neuron order (the derivative is taken in the forward,
    while each group is at hand), so backward needs no gather or scatter: one product for dz,
    and the candidates f_k(z), recomputed one at a time, for ds.
    """

    @staticmethod
    def forward(ctx, z, soft, perm, sizes, acts, basis, transform):
        z_grouped = z.index_select(0, perm)  # (n, B)
        one = z.new_ones(())
        # z computed under no_grad (evaluation) does not require grad: no derivative needed then
        keep = z.requires_grad
        clamp = transform.clamp
        out = torch.empty_like(z)
        derivative = torch.empty_like(z) if keep else None
        groups = zip(acts, z_grouped.split(sizes), perm.split(sizes), strict=True)
        for k, (act, zc, idx) in enumerate(groups):
            if not len(idx):
                continue
            f = act.fn(zc)
            if keep:
                d = act.vjp(one.expand_as(zc), zc)
                if clamp is not None:  # clamp passes the gradient where -c <= f <= c
                    d = d * (f.abs() <= clamp)
                derivative.index_copy_(0, idx, d * transform.gain[k] if transform.affine else d)
            if clamp is not None:
                f = f.clamp(-clamp, clamp)
            out.index_copy_(0, idx, transform.apply(k, f))
        ctx.save_for_backward(z, derivative)
        ctx.basis, ctx.acts, ctx.transform = basis, acts, transform
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, derivative = ctx.saved_tensors  # (n, B) neuron order
        grad_z = grad_out * derivative if ctx.needs_input_grad[0] else None
        grad_soft = None
        if ctx.needs_input_grad[1]:
            transform = ctx.transform
            if transform.clamp is None:
                # (K, n): row k is sum over the batch of g * f_k(z) = C @ (same sums, basis)
                basis, mix = ctx.basis
                sums = torch.stack(
                    [
                        (grad_out * z if b.name == "identity" else b.fn(z).mul_(grad_out)).sum(1)
                        for b in basis
                    ]
                )
                grad_soft = mix.to(sums) @ sums
            else:  # a clamp is not linear: no basis, every candidate itself
                c = transform.clamp
                grad_soft = torch.stack(
                    [a.fn(z).clamp_(-c, c).mul_(grad_out).sum(1) for a in ctx.acts]
                )
            if transform.affine:
                shift = grad_soft.new_tensor(transform.shift).unsqueeze(1)  # (K, 1)
                gain = grad_soft.new_tensor(transform.gain).unsqueeze(1)
                grad_soft = (grad_soft - shift * grad_out.sum(1)) * gain
        return grad_z, grad_soft, None, None, None, None, None


def gumbel_softmax_sample(logits: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Straight-through hard Gumbel-Softmax draw for logits a (N, K).

    Returns the soft sample s = softmax((a + g) / tau) transposed to (K, N) and the hard choice
    argmax_k s (N,). g = -log(-log(u + eps) + eps), u ~ U[0, 1), fresh on every call. The
    softmax runs over the leading dimension of a (K, N) copy: on CPU a softmax over a trailing
    dimension of size K ~ 6 costs ten times more.
    """
    gumbel = torch.rand_like(logits).add_(GUMBEL_EPS).log_().neg_().add_(GUMBEL_EPS).log_().neg_()
    perturbed = (logits + gumbel) / tau  # (N, K)
    choice = perturbed.detach().max(dim=-1).indices  # = argmax of the softmax; max is faster
    return F.softmax(perturbed.t().contiguous(), dim=0), choice


# --------------------------------------------------------------------------------------------
# The learned activation unit


class AFUnit(nn.Module):
    """G(z) = sum_i w1_i psi(w0_i z + b0_i) + b1 elementwise: parameters w0, b0, w1 (N,), b1 (1,),
    initialised by ``pool.afu_init`` (G = psi exactly, units distinct)."""

    def __init__(self, units: int, base: str) -> None:
        super().__init__()
        self.units, self.base = units, base
        for name, value in afu_init(units, base).items():
            setattr(self, name, nn.Parameter(value))

    def params(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in AFU_PARAMS}

    def forward(self, z: Tensor) -> Tensor:
        return afu_apply(z, self.w0, self.b0, self.w1, self.b1, self.base)

    def activation(self) -> Activation:
        """This unit as a pool entry (fn reaches the parameters where grad is enabled)."""
        return afu_activation(self.params(), self.base)

    def extra_repr(self) -> str:
        return f"units={self.units}, base={self.base!r}"


def _with_afu(acts: tuple[Activation, ...], afu: Activation) -> tuple[Activation, ...]:
    return tuple(afu if a.name == AFU else a for a in acts)


def _unit_for(pool: Sequence[str], afu: AFUnit | dict[str, Any] | None) -> AFUnit | None:
    """The layer's learned unit: the one given (shared with other layers), a new one from its
    {units, base, share} settings, or None when the pool has no ``afu``."""
    if AFU not in pool:
        if isinstance(afu, AFUnit):
            raise SpecError("an AFUnit was given, but the pool has no 'afu' entry")
        return None
    if isinstance(afu, AFUnit):
        return afu
    config = check_afu_config(afu)
    return AFUnit(config["units"], config["base"])


def _flatten_features(x: Tensor, dim: int) -> tuple[Tensor, tuple[int, ...]]:
    """x with its feature axis ``dim`` first and every other axis flattened: z (n, M) feature-major
    (M = batch x positions), plus the moved shape to restore it. For the usual (B, n) input this is
    the transposed view, no copy."""
    moved = x.movedim(dim, 0)  # (n, ...)
    return moved.reshape(moved.shape[0], -1), tuple(moved.shape)


def _restore_features(z: Tensor, moved_shape: tuple[int, ...], dim: int) -> Tensor:
    return z.reshape(moved_shape).movedim(0, dim)


class MixedActivation(nn.Module):
    """Phase 1 of SmartMixed as a layer: every feature along ``dim`` picks its activation.

    ``logits`` (num_features, |pool|) are this module's parameter: give them their own optimizer
    group (``smartmixed.nn.selection_logits``). A training forward draws one straight-through hard
    Gumbel sample per feature (exactly one candidate per feature, the same for every position of a
    channel); an eval forward uses argmax of the logits.

    Training options beyond the method's defaults (the study's controls, recorded by train/):
    ``logit_init_std`` (N(0, std) logits at reset; 0: uniform start), ``clamp`` (clamp every
    candidate to [-clamp, clamp], the reference code's phase 1), ``eval_noise`` (draw noise in
    evaluation too, the reference code's protocol), ``logit_grad_norm="candidate"`` (rescale each
    candidate's logit gradient to the layer's mean RMS), ``granularity="layer"`` (one logit row
    (1, |pool|) and one draw per forward for the whole layer: a per-layer choice, every feature's
    logit gradient summed into it), ``afu`` (the learned unit's settings, or an ``AFUnit`` to
    share with other layers). ``tau`` and ``relaxed`` (the soft mixture
    sum_k s_k h_k(z) instead of the hard sample) may be changed between steps.
    """

    def __init__(
        self,
        num_features: int,
        *,
        pool: Sequence[str] | str | None = None,
        dim: int = -1,
        tau: float = 0.3,
        candidate_norm: str = "standard",
        logit_init_std: float = 0.0,
        clamp: float | None = None,
        eval_noise: bool = False,
        logit_grad_norm: str = "none",
        afu: AFUnit | dict[str, Any] | None = None,
        granularity: str = "feature",
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features: expected an integer >= 1, got {num_features!r}")
        if logit_grad_norm not in LOGIT_GRAD_NORMS:
            raise SpecError(
                f"logit grad norm {logit_grad_norm!r}: expected one of {LOGIT_GRAD_NORMS}"
            )
        if granularity not in GRANULARITIES:
            raise SpecError(f"granularity {granularity!r}: expected one of {GRANULARITIES}")
        self.granularity = granularity
        self.num_features, self.dim, self.tau = num_features, dim, tau
        self.pool = list(parse_pool(pool))
        self.candidate_norm, self.logit_init_std = candidate_norm, logit_init_std
        self.clamp, self.eval_noise, self.logit_grad_norm = clamp, eval_noise, logit_grad_norm
        self.relaxed = False
        self.afu = _unit_for(self.pool, afu)
        self.transform = CandidateTransform.build(
            self.pool, norm=candidate_norm, clamp=clamp, afu_base=self.afu_base
        )
        self.acts = tuple(get_activation(n) for n in self.pool)
        self.basis = batch_sum_basis(self.pool)
        rows = num_features if granularity == "feature" else 1
        self.logits = nn.Parameter(torch.empty(rows, len(self.pool)))
        self.reset_parameters()

    @property
    def afu_base(self) -> str:
        return self.afu.base if self.afu is not None else "relu"

    def reset_parameters(self) -> None:
        """Logits N(0, logit_init_std), or all zero (every candidate equally likely) for std 0."""
        with torch.no_grad():
            if self.logit_init_std:
                self.logits.normal_(0.0, self.logit_init_std)
            else:
                self.logits.zero_()

    def extra_repr(self) -> str:
        norm = (
            "" if self.candidate_norm == "standard" else f", candidate_norm={self.candidate_norm!r}"
        )
        layer = ", granularity='layer'" if self.granularity == "layer" else ""
        return f"{self.num_features}, pool={self.pool}, dim={self.dim}, tau={self.tau}{norm}{layer}"

    def candidates(self) -> tuple[tuple[Activation, ...], tuple[tuple[Activation, ...], Tensor]]:
        """The pool's activations and batch-sum basis with ``afu`` bound to this layer's unit."""
        if self.afu is None:
            return self.acts, self.basis
        unit = self.afu.activation()
        return _with_afu(self.acts, unit), (_with_afu(self.basis[0], unit), self.basis[1])

    def forward(self, x: Tensor) -> Tensor:  # x: (..., n at dim, ...) -> same shape
        if x.shape[self.dim] != self.num_features:
            raise ValueError(
                f"MixedActivation({self.num_features}, dim={self.dim}): input of shape "
                f"{list(x.shape)} has {x.shape[self.dim]} features along dim {self.dim}"
            )
        logits = self.logits
        if self.training or self.eval_noise:
            soft, choice = gumbel_softmax_sample(logits, self.tau)  # (K, n), (n,)
            if self.logit_grad_norm == "candidate" and soft.requires_grad:
                soft.register_hook(_normalise_candidates)
            if self.granularity == "layer":  # the layer's one draw, for every feature
                soft, choice = soft.expand(-1, self.num_features), choice.expand(self.num_features)
        else:  # evaluation: argmax of the logits, no noise, computed as the frozen layer does
            groups = _groups(self.choice(), len(self.pool))
            return _apply_groups(x, self.dim, groups, self.candidates()[0], self.transform)
        z, moved = _flatten_features(x, self.dim)  # (n, M)
        acts, basis = self.candidates()
        if self.relaxed and self.training:
            return _restore_features(self._relaxed(z, soft, acts), moved, self.dim)
        order = torch.argsort(choice, stable=True)  # grouped position -> feature
        sizes = torch.bincount(choice, minlength=len(self.pool)).tolist()
        h = _SelectActivation.apply(z, soft, order, sizes, acts, basis, self.transform)
        if self.afu is not None and torch.is_grad_enabled():
            h = self._afu_parameter_gradient(z, h, choice)
        return _restore_features(h, moved, self.dim)

    def _afu_parameter_gradient(self, z: Tensor, h: Tensor, choice: Tensor) -> Tensor:
        """h plus zero, carrying dL/dtheta of the AFU to the features that chose it.

        _SelectActivation treats the unit as a fixed function (it gives dL/dz and every
        feature's logit gradient sum_b g h_afu(z), the straight-through rule). Textbook autograd
        of sum_k y_k h_k(z) also gives theta the term y_afu dh_afu/dtheta, and y_afu is 1 in
        value for the features whose hard choice is afu, 0 for the others. So add, on those rows,
        c - sg(c) with c = h_afu(sg(z)) (clamped like the candidate, times its gain): zero in
        value, dh_afu/dtheta in gradient, nothing to z (the function already gave it)."""
        k = self.pool.index(AFU)
        rows = (choice == k).nonzero().squeeze(1)  # features that chose afu
        if not len(rows):
            return h
        c = self.afu(z.detach().index_select(0, rows))  # (rows, M)
        if self.transform.clamp is not None:
            c = c.clamp(-self.transform.clamp, self.transform.clamp)
        c = (c - c.detach()) * self.transform.gain[k]
        return h.index_add(0, rows, c)

    def _relaxed(self, z: Tensor, soft: Tensor, acts: Sequence[Activation]) -> Tensor:
        """The soft Gumbel-Softmax mixture sum_k s_k h_k(z) for z (n, M), s (K, n): every
        candidate is computed and weighted, so the logits get the exact gradient of the relaxed
        network (no straight-through approximation); ``acts`` has afu bound to this layer's
        unit, whose parameters then get the relaxed gradient too."""
        out = torch.zeros_like(z)
        clamp = self.transform.clamp
        for k, act in enumerate(acts):
            f = act.fn(z)
            if clamp is not None:
                f = f.clamp(-clamp, clamp)
            out = out + soft[k].unsqueeze(1) * self.transform.apply(k, f)
        return out

    def choice(self) -> Tensor:
        """argmax of the logits, (n,) int64: the activation index each feature would freeze to."""
        return self.logits.detach().argmax(dim=-1).expand(self.num_features)

    def activation_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.choice(), minlength=len(self.pool)).tolist()
        return dict(zip(self.pool, counts, strict=True))

    def frozen(self) -> FrozenMixedActivation:
        """This layer frozen to the argmax of its logits (the same unit object, if any)."""
        return FrozenMixedActivation(
            self.pool,
            self.choice().cpu(),
            dim=self.dim,
            candidate_norm=self.candidate_norm,
            afu=self.afu,
        ).to(self.logits.device)


def _normalise_candidates(grad: Tensor) -> Tensor:
    """--logit-grad-norm candidate: dL/ds (K, n) with each candidate's row rescaled to the layer's
    mean RMS, so that no candidate's push is larger only because its output is larger; the
    direction per feature is kept."""
    rms = grad.pow(2).mean(1, keepdim=True).sqrt()  # (K, 1)
    return grad * (rms.mean() / rms.clamp_min(1e-12))


class FrozenMixedActivation(nn.Module):
    """Phase 2: every feature along ``dim`` applies its frozen activation, group by group.

    ``assignment`` (buffer, (n,) int64): the pool index of every feature, so ``state_dict()``
    round-trips through safetensors. The forward is ``_apply_groups``, the code the phase-1 eval
    forward runs: equal to it value for value. ``candidate_norm`` must be the phase-1 layer's (the
    standardisation's affine map stays part of each candidate).
    """

    def __init__(
        self,
        pool: Sequence[str] | str,
        assignment: Tensor | Sequence[int] | Sequence[str],
        *,
        dim: int = -1,
        candidate_norm: str = "standard",
        afu: AFUnit | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.pool = list(parse_pool(pool))
        self.dim, self.candidate_norm = dim, candidate_norm
        self.afu = _unit_for(self.pool, afu)
        self.transform = CandidateTransform.build(
            self.pool, norm=candidate_norm, afu_base=self.afu.base if self.afu else "relu"
        )
        self.acts = tuple(get_activation(n) for n in self.pool)
        index = _assignment_index(self.pool, assignment)
        self.register_buffer("assignment", index)
        self._set_groups()

    @property
    def num_features(self) -> int:
        return int(self.assignment.numel())

    def names(self) -> list[str]:
        """The activation name of every feature, in feature order."""
        return [self.pool[k] for k in self.assignment.tolist()]

    def activation_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.assignment.cpu(), minlength=len(self.pool)).tolist()
        return dict(zip(self.pool, counts, strict=True))

    def extra_repr(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.activation_counts().items() if v)
        norm = (
            "" if self.candidate_norm == "standard" else f", candidate_norm={self.candidate_norm!r}"
        )
        return f"{self.num_features}, dim={self.dim}, {counts}{norm}"

    def _set_groups(self) -> None:
        """Python-side state derived from the buffer (recomputed whenever it is loaded)."""
        self.groups = _groups(self.assignment, len(self.pool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "assignment"
        if key in state_dict and state_dict[key].shape != self.assignment.shape:
            self.assignment = torch.empty_like(state_dict[key])  # a different width: resized
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if key in state_dict:
            bad = (self.assignment < 0) | (self.assignment >= len(self.pool))
            if bad.any():
                raise SpecError(
                    f"{key}: activation index {int(self.assignment[bad][0])} outside the pool "
                    f"of {len(self.pool)}"
                )
            self._set_groups()

    def _apply(self, fn, *args, **kwargs):
        """.to(device) moves the group indices with the buffer."""
        out = super()._apply(fn, *args, **kwargs)
        self.groups = self.groups.to(self.assignment.device)
        return out

    def forward(self, x: Tensor) -> Tensor:  # x: (..., n at dim, ...) -> same shape
        acts = self.acts if self.afu is None else _with_afu(self.acts, self.afu.activation())
        return _apply_groups(x, self.dim, self.groups, acts, self.transform)


@dataclass(frozen=True)
class Groups:
    """Features grouped by activation: ``members`` (pool index, feature indices) in pool order;
    ``contiguous`` when the groups are blocks in pool order (then ``split`` replaces the index
    ops); ``inverse`` puts the concatenated groups back in feature order."""

    members: tuple[tuple[int, Tensor], ...]
    contiguous: bool
    inverse: Tensor

    def to(self, device: torch.device) -> Groups:
        members = tuple((k, rows.to(device)) for k, rows in self.members)
        return Groups(members, self.contiguous, self.inverse.to(device))


def _groups(index: Tensor, n_pool: int) -> Groups:
    """The groups of a (n,) pool-index assignment."""
    members = tuple(
        (k, rows) for k in range(n_pool) if len(rows := (index == k).nonzero().squeeze(1))
    )
    contiguous = bool((index[1:] >= index[:-1]).all()) if len(index) > 1 else True
    order = torch.cat([rows for _, rows in members])
    return Groups(members, contiguous, torch.argsort(order))


def _apply_groups(
    x: Tensor, dim: int, groups: Groups, acts: Sequence[Activation], transform: CandidateTransform
) -> Tensor:
    """Each group's candidate on its features along ``dim``: one call for a single group; else
    split (contiguous groups) or index_select per group, candidate, cat, and the inverse
    permutation. The frozen layer's forward and the phase-1 eval forward both run this, so they
    agree value for value; it is also the graph torch's ONNX exporter sees (Split or Gather,
    activation, Concat, Gather)."""
    members = groups.members

    def candidate(k: int, v: Tensor) -> Tensor:
        f = acts[k].fn(v)
        if transform.clamp is not None:  # the reference code's phase 1 (never a frozen layer)
            f = f.clamp(-transform.clamp, transform.clamp)
        return transform.apply(k, f)

    if len(members) == 1:
        return candidate(members[0][0], x)
    if groups.contiguous:
        blocks = x.split([len(rows) for _, rows in members], dim)
    else:
        blocks = [x.index_select(dim, rows) for _, rows in members]
    out = torch.cat([candidate(k, b) for (k, _), b in zip(members, blocks)], dim)
    return out if groups.contiguous else out.index_select(dim, groups.inverse)


def _assignment_index(
    pool: list[str], assignment: Tensor | Sequence[int] | Sequence[str]
) -> Tensor:
    """Pool indices (n,) int64 from indices or activation names; SpecError names a bad one."""
    if isinstance(assignment, Tensor):
        values = assignment.detach().cpu().reshape(-1).tolist()
    else:
        values = list(assignment)
    if not values:
        raise SpecError("assignment: expected at least one feature, got none")
    index = []
    for j, v in enumerate(values):
        if isinstance(v, str):
            if v not in pool:
                raise SpecError(f"assignment[{j}]: activation {v!r} not in the pool {pool}")
            index.append(pool.index(v))
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(pool):
            index.append(v)
        else:
            raise SpecError(f"assignment[{j}]: expected a pool index or name, got {v!r}")
    return torch.tensor(index, dtype=torch.int64)
