"""The training protocol: phase 1 (selective) -> phase 2 (mixed), or one fixed-activation phase.

A run (``_Run``) is its phases in order, each started explicitly (``_start_phase``: model,
optimizer groups, temperature schedule), trained epoch by epoch and ended explicitly (which
epoch's state is kept). A checkpoint (model, optimizer, kept state, RNG states, history) is
written after every epoch, so ``resume=True`` continues a killed run from its last completed
epoch with identical results.

Protocols (``--protocol``) are named sets of defaults, one table (``PROTOCOLS``): TrainConfig's
defaults are the default protocol's, and smartmixed-train's help shows them; explicit options
override them:
- ``paper``: exactly the paper's protocol (PAPER.md): Adam lr 1e-4 for weights and logits,
  batch 128, 50 + 350 epochs (400 fixed), tau 0.3 fixed, clip 1.0, plain candidates, the
  argmax at phase 1's best-validation-loss epoch is frozen.
- ``reference-code``: ``paper`` plus the reference code's quirks: softmax before the
  cross-entropy, Gumbel noise at evaluation, phase-1 candidates clamped to [-10, 10], phase-2
  weights re-initialised.
- ``default``: ``paper`` with the selection fixes the study chose (docs/method.md, "Why the mix
  was worse than ReLU"): standardised candidates, a separate logit learning rate, the argmax at
  phase 1's last epoch frozen, phase 2 trained from a fresh initialisation (phase 1 only
  chooses; its weights, trained under switching activations, are a worse start), bilevel
  selection (the logits step on a held-out fifth of the training split, the weights on the
  rest) and progressive shrinking of every layer's pool to two candidates over phase 1.
Runs written while the default protocol was called ``smartmixed`` record that name; reading
them (resume, --mode auto's complete sub-runs) takes it for ``default`` (``recorded_options``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from smartmixed import contract
from smartmixed.nn import AFUnit, MixedActivation, mixed_layers, selection_logits
from smartmixed.nn.pool import afu_apply, afu_init, get_activation, parse_pool
from smartmixed.train import artifacts, report
from smartmixed.train.data import Dataset
from smartmixed.train.distributed import (
    Ranks,
    all_reduce_sum,
    barrier,
    check_ranks_agree,
    init_distributed,
)
from smartmixed.train.model import (
    CANDIDATE_NORMS,
    GRANULARITIES,
    LOGIT_GRAD_NORMS,
    MixedConvNet,
    MixedMLP,
    MixedNetwork,
    ModelSpec,
    SelectiveConvNet,
    SelectiveMLP,
    SelectiveNetwork,
    mixed_from_selective,
    norm_folds,
    parse_arch,
)

EVAL_BATCH = 4096
PHASE2_INITS = ("continue", "fresh")
PHASE2_NORMS = ("keep", "fold")
SELECT_RULES = ("val-loss", "val-accuracy", "last")
# joint: logits and weights step on the same training batches (the paper); bilevel: the logits
# step on batches of a slice of the training split that the weights never see (first-order
# DARTS), so a choice must pay off on data the weights did not fit
SELECTIONS = ("joint", "bilevel")
# argmax: every feature freezes to its logits' argmax; removal: first, activations are removed
# from layers while a removal lowers the held-out loss (selection by removal, Wang et al. 2021)
FREEZE_RULES = ("argmax", "removal")
REMOVED = -1e4  # a removed candidate's logits (removal, shrinking): no draw picks it
REFERENCE_CLAMP = 10.0  # the reference code clamps phase-1 candidates to [-10, 10]

# The protocols: every TrainConfig field a protocol sets, with the paper's value; the others
# say what they change. TrainConfig's defaults are DEFAULT_PROTOCOL's (``_protocol_defaults``).
PAPER_PROTOCOL: dict[str, Any] = {
    "p1_epochs": 50,
    "p2_epochs": 350,
    "epochs": 400,
    "lr": 1e-4,
    "logit_lr": None,
    "batch_size": 128,
    "tau": 0.3,
    "tau_end": None,
    "grad_clip": 1.0,
    "select": "val-loss",
    "candidate_norm": "none",
    "logit_grad_norm": "none",
    "soft_epochs": 0,
    "logit_warmup": 0,
    "phase2_init": "continue",
    "phase2_norm": "keep",
    "double_softmax": False,
    "eval_noise": False,
    "clamp": None,
    "selection": "joint",
    "selection_holdout": 0.2,
    "logit_prior": None,
    "shrink_to": 0,
}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "paper": PAPER_PROTOCOL,
    "reference-code": {
        **PAPER_PROTOCOL,
        "phase2_init": "fresh",
        "double_softmax": True,
        "eval_noise": True,
        "clamp": REFERENCE_CLAMP,
    },
    # Chosen by the selection study on validation accuracy (docs/results.md); see the docstring.
    "default": {
        **PAPER_PROTOCOL,
        "candidate_norm": None,
        "logit_lr": 1e-2,
        "select": "last",
        "phase2_init": "fresh",
        "selection": "bilevel",
        "shrink_to": 2,
    },
}
DEFAULT_PROTOCOL = "default"
# former name -> name: runs written under a former name record it (model.json, checkpoints)
FORMER_PROTOCOL_NAMES = {"smartmixed": DEFAULT_PROTOCOL}
# the values a field may take (its flag's choices)
CHOICES: dict[str, tuple[str, ...]] = {
    "phase2_init": PHASE2_INITS,
    "phase2_norm": PHASE2_NORMS,
    "select": SELECT_RULES,
    "selection": SELECTIONS,
    "freeze_rule": FREEZE_RULES,
    "granularity": GRANULARITIES,
    "candidate_norm": CANDIDATE_NORMS,
    "logit_grad_norm": LOGIT_GRAD_NORMS,
    "protocol": tuple(PROTOCOLS),
    "afu_base": contract.AFU_BASES,
    "afu_share": contract.AFU_SHARES,
}


class TrainError(ValueError):
    """A training request that cannot run (bad options, clobbering a run, device missing)."""


# options added since runs were first recorded, with the value that does what runs recorded
# before them did
LATER_OPTIONS: dict[str, Any] = {
    "selection": "joint",
    "selection_holdout": 0.2,
    "logit_prior": None,
    "granularity": "feature",
    "freeze_rule": "argmax",
    "shrink_to": 0,
}


def recorded_options(training: Mapping[str, Any]) -> dict[str, Any]:
    """A run's recorded options (model.json's ``training``, a checkpoint's ``config``) in this
    version's names: a former protocol name becomes the protocol's name, and an option added
    since the run was recorded takes the value that reproduces it (``LATER_OPTIONS``)."""
    recorded = {**LATER_OPTIONS, **training}
    protocol = training.get("protocol")
    if isinstance(protocol, str) and protocol in FORMER_PROTOCOL_NAMES:
        recorded["protocol"] = FORMER_PROTOCOL_NAMES[protocol]
    return recorded


def flag(text: str, *, metavar: str | None = None, unset: str | None = None, **kw: Any) -> Any:
    """A TrainConfig field that smartmixed-train sets with the flag of its name (--p1-epochs
    for p1_epochs). ``text`` is the flag's help less its default: the command line adds
    "(default X)" from the field's default, or "(default: UNSET)" where that is None (``unset``
    says what None means). ``kw``: dataclasses.field's (a default; a field a protocol sets has
    none here, ``_protocol_defaults`` gives it)."""
    return field(metadata={"help": text, "metavar": metavar, "unset": unset}, **kw)


def _protocol_defaults(cls: type) -> type:
    """Give every field a protocol sets the default protocol's value as its default, before
    @dataclass reads the defaults: each value is written once, in PROTOCOLS."""
    missing = dataclasses.MISSING
    for name, value in PROTOCOLS[DEFAULT_PROTOCOL].items():
        declared = cls.__dict__.get(name, missing)
        if declared is missing and name in cls.__annotations__:
            setattr(cls, name, value)
        elif isinstance(declared, dataclasses.Field) and (
            declared.default is missing and declared.default_factory is missing
        ):
            declared.default = value
        else:
            raise TypeError(f"{cls.__name__}.{name}: set by PROTOCOLS, declared with a default")
    return cls


@dataclass
@_protocol_defaults
class TrainConfig:
    """Hyper-parameters of one run; stored in model.json under 'training'.

    Defaults are the default protocol's (the fields PROTOCOLS sets have theirs from it);
    ``TrainConfig.from_protocol`` starts from another. A field with a ``flag`` is an option of
    smartmixed-train, its metadata the flag's help.
    """

    arch: list[int]
    mode: str = flag(
        "smartmixed, fixed:ACTIVATION, or auto: screen the pool's fixed activations, then train "
        "SmartMixed and the best of them alike and keep the better on validation accuracy, its "
        "sub-runs in OUT/auto/",
        default="smartmixed",
    )
    # a layered spec's layers (a conv net; contract.CONV_PRESETS): the network is built from
    # them, and arch must be the one they give for the data's image shape (layered_arch)
    layers: list[dict[str, Any]] | None = None
    pool: list[str] = flag(  # noqa: RUF009 (flag returns a dataclasses.field)
        "comma-separated candidate activations (smartmixed)",
        default_factory=lambda: list(parse_pool(None)),
    )
    protocol: str = DEFAULT_PROTOCOL
    p1_epochs: int = flag("phase-1 epochs")
    p2_epochs: int = flag("phase-2 epochs")
    epochs: int = flag("epochs of a fixed run")
    lr: float = flag("Adam learning rate")
    logit_lr: float | None = flag(
        "learning rate of the activation logits, --lr's under the paper protocols", unset="--lr"
    )
    batch_size: int = flag("rows per mini-batch")
    tau: float = flag("Gumbel-Softmax temperature")
    tau_end: float | None = flag(
        "phase-1 temperature at the last epoch, annealed exponentially from --tau",
        unset="constant",
    )
    seed: int = flag("data split and initialisation", default=42)
    grad_clip: float = flag("gradient-norm clip")
    select: str = flag(
        "which phase-1 epoch's argmax is frozen: best validation loss, best validation "
        "accuracy, or the last"
    )
    candidate_norm: str | None = flag(
        "standard: each candidate scaled to zero mean, unit variance under N(0, 1) inputs, so "
        "candidates compete on shape, not scale; none under the paper protocols",
        unset="standard for smartmixed, none for fixed baselines",
    )
    logit_grad_norm: str = flag(
        "candidate: each candidate's logit gradient rescaled, layer by layer, to the same RMS "
        "over neurons"
    )
    soft_epochs: int = flag(
        "the first N phase-1 epochs train the relaxed network sum_k s_k h_k(z) (every "
        "candidate, soft Gumbel-Softmax weights) before the hard one"
    )
    logit_warmup: float = flag(
        "this fraction of phase 1 first keeps the selection logits frozen (uniform draws: the "
        "weights learn under every candidate before the logits learn), e.g. 0.5: the first half",
        metavar="FRACTION",
    )
    phase2_init: str = flag(
        "continue: phase 2 starts from the phase-1 weights; fresh: from new ones, as the "
        "reference code does"
    )
    phase2_norm: str = flag(
        "keep: phase 2 trains the candidates as phase 1 did; fold: the candidate norm is folded "
        "into the weights when phase 2 starts, so phase 2 trains the plain mixed network: the "
        "same function, the fixed baselines' parameterisation; with a fresh phase 2, plain "
        "candidates from the start"
    )
    logit_init_std: float = flag("std of the initial activation logits, 0: all equal", default=0.0)
    granularity: str = flag(
        "feature: every hidden neuron (conv channel) chooses its own activation; layer: one "
        "choice per hidden layer (one logit vector, one draw per forward), the per-layer search "
        "the per-neuron mix is measured against",
        default="feature",
    )
    selection: str = flag(
        "joint: the logits step on the training batches, as the weights do; bilevel: on a "
        "held-out slice of the training split the weights never see (--selection-holdout), one "
        "logit step after each weight step"
    )
    selection_holdout: float = flag(
        "bilevel: the share of the training split held out for the logit steps in phase 1; "
        "phase 2 trains on all of it",
        metavar="FRACTION",
    )
    freeze_rule: str = flag(
        "argmax: each neuron freezes to its logits' argmax; removal (with --selection bilevel): "
        "first, one (layer, activation) at a time, the removal that lowers the loss on the "
        "held-out slice the most, until none lowers it; the neurons of a removed activation fall "
        "back to their next-best (selection by removal, Wang et al. 2021)",
        default="argmax",
    )
    shrink_to: int = flag(
        "progressive shrinking: phase 1 removes from each hidden layer, at evenly spaced epochs, "
        "the candidate of lowest mean probability over its features, until at most N are left; "
        "0: off",
        metavar="N",
    )
    logit_prior: str | None = flag(
        "every phase-1 logit of ACTIVATION starts GAP above the others, a prior toward it that "
        "the mix must overcome, e.g. relu=2",
        metavar="ACTIVATION=GAP",
        unset="none",
    )
    # set by --protocol alone (the reference code's quirks)
    double_softmax: bool
    eval_noise: bool
    clamp: float | None
    # the learned activation unit (pool name afu): hidden units N, base psi, sharing
    afu_units: int = flag(
        "hidden units N of the learned activation unit afu, "
        "G(z) = sum_i w1_i psi(w0_i z + b0_i) + b1",
        default=contract.AFU_DEFAULTS["units"],
    )
    afu_base: str = flag("the AFU's base activation psi", default=contract.AFU_DEFAULTS["base"])
    afu_share: str = flag(
        "layer: one AFU per hidden layer; network: one for the whole network",
        default=contract.AFU_DEFAULTS["share"],
    )
    afu_lr: float | None = flag(
        "learning rate of the AFU parameters, their own Adam group", unset="--lr", default=None
    )

    @classmethod
    def from_protocol(cls, protocol: str, **options: Any) -> TrainConfig:
        """The protocol's settings, then ``options`` (those not None) on top."""
        if protocol not in PROTOCOLS:
            renamed = FORMER_PROTOCOL_NAMES.get(protocol)
            hint = f" ({protocol!r} is now called {renamed!r})" if renamed else ""
            raise TrainError(
                f"--protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}{hint}"
            )
        given = {k: v for k, v in options.items() if v is not None}
        return cls(**{**PROTOCOLS[protocol], "protocol": protocol, **given})

    def __post_init__(self) -> None:
        self.arch = parse_arch(self.arch)
        if self.layers is not None and not (
            isinstance(self.layers, list) and all(isinstance(x, dict) for x in self.layers)
        ):
            raise TrainError(f"layers: expected a list of layer objects, got {self.layers!r:.80}")
        if self.mode.startswith("fixed:"):
            self.pool = [get_activation(self.mode.removeprefix("fixed:")).name]
            # auto: a fixed baseline is the plain network people deploy; the norm is there so
            # that candidates compete on shape, which a single activation does not need
            if self.candidate_norm is None:
                self.candidate_norm = "none"
        elif self.mode == "smartmixed":
            self.pool = list(parse_pool(self.pool))
            if self.candidate_norm is None:
                self.candidate_norm = "standard"
        else:
            raise TrainError(f"--mode {self.mode!r}: expected smartmixed or fixed:ACTIVATION")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise TrainError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected one of "
                    f"{', '.join(allowed)}"
                )
        if isinstance(self.afu_units, bool) or not isinstance(self.afu_units, int):
            raise TrainError(f"--afu-units must be an integer, got {self.afu_units!r}")
        if self.afu_units < 1:
            raise TrainError(f"--afu-units must be >= 1, got {self.afu_units}")
        for name in ("p1_epochs", "p2_epochs", "epochs", "soft_epochs"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 0")
        if not 0 <= self.logit_warmup < 1:
            raise TrainError(
                f"--logit-warmup is a fraction of phase 1 in [0, 1), got {self.logit_warmup}"
            )
        if not 0 < self.selection_holdout < 1:
            raise TrainError(
                "--selection-holdout is a fraction of the training split in (0, 1), got "
                f"{self.selection_holdout}"
            )
        self.prior()  # refuses a malformed --logit-prior now, not at phase 1
        if isinstance(self.shrink_to, bool) or not isinstance(self.shrink_to, int):
            raise TrainError(f"--shrink-to must be an integer, got {self.shrink_to!r}")
        if self.shrink_to < 0:
            raise TrainError(f"--shrink-to {self.shrink_to}: expected 0 (off) or N >= 1")
        if self.freeze_rule == "removal" and self.selection != "bilevel":
            raise TrainError(
                "--freeze-rule removal measures removals on bilevel selection's held-out rows: "
                f"it needs --selection bilevel, got --selection {self.selection}"
            )
        if all(n == 0 for _, n in self.phases()):
            raise TrainError("the run has no epochs to train")
        positive = {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "tau": self.tau,
            "grad_clip": self.grad_clip,
            "logit_lr": self.logit_lr,
            "tau_end": self.tau_end,
            "clamp": self.clamp,
            "afu_lr": self.afu_lr,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise TrainError(f"--{name.replace('_', '-')} must be > 0, got {value}")

    @property
    def afu(self) -> dict[str, Any] | None:
        """model.json's ``afu`` ({units, base, share}) when the pool holds the learned unit."""
        if contract.AFU not in self.pool:
            return None
        return {"units": self.afu_units, "base": self.afu_base, "share": self.afu_share}

    def prior(self) -> tuple[str, float] | None:
        """--logit-prior as (activation, gap): the activation must be in the pool, the gap > 0."""
        if self.logit_prior is None:
            return None
        name, sep, gap = str(self.logit_prior).partition("=")
        try:
            value = float(gap)
        except ValueError:
            value = math.nan
        if not sep or not value > 0 or math.isinf(value):
            raise TrainError(
                f"--logit-prior {self.logit_prior!r}: expected ACTIVATION=GAP with a gap > 0, "
                "e.g. relu=2"
            )
        if self.mode == "smartmixed" and name not in self.pool:
            raise TrainError(
                f"--logit-prior {self.logit_prior!r}: {name!r} is not in the pool "
                f"({', '.join(self.pool)})"
            )
        return name, value

    def phases(self) -> list[tuple[str, int]]:
        if self.mode == "smartmixed":
            return [("selective", self.p1_epochs), ("mixed", self.p2_epochs)]
        return [("fixed", self.epochs)]

    def shrinks_after(self, epoch: int) -> int:
        """How many candidates --shrink-to removes from every layer after phase-1 epoch
        ``epoch`` (0-based). Over the E epochs whose logits learn (after the --logit-warmup
        ones, W), removal i of r = |pool| - N comes after epoch W + round(i * E / (r + 1)) - 1
        (at least W), so the last stretch trains the shrunk pool."""
        if not self.shrink_to:
            return 0
        r = max(len(self.pool) - self.shrink_to, 0)  # a pool of N or fewer: nothing to remove
        warm = int(self.logit_warmup * self.p1_epochs)
        learn = self.p1_epochs - warm
        after = (warm + max(round(i * learn / (r + 1)) - 1, 0) for i in range(1, r + 1))
        return sum(e == epoch for e in after)

    def logits_frozen_at(self, epoch: int) -> bool:
        """Whether phase-1 epoch ``epoch`` (0-based) is one of the first
        floor(logit_warmup * p1_epochs), whose logits stay frozen."""
        return epoch < int(self.logit_warmup * self.p1_epochs)

    def tau_at(self, epoch: int) -> float:
        """Phase-1 temperature at ``epoch`` (0-based): tau * (tau_end / tau)^(e / (E - 1))."""
        if self.tau_end is None or self.p1_epochs <= 1:
            return self.tau
        return self.tau * (self.tau_end / self.tau) ** (epoch / (self.p1_epochs - 1))


def package_versions() -> dict[str, str]:
    """What model.json records as ``versions``."""
    packages = contract.package_versions(("smartmixed", "torch", "numpy", "safetensors"))
    return {"python": platform.python_version(), **packages}


# --------------------------------------------------------------------------------------------
# One epoch


def loss_fn(logits: Tensor, y: Tensor, *, double_softmax: bool, reduction: str = "mean") -> Tensor:
    """Cross-entropy on the logits; ``double_softmax`` reproduces the reference code's bug of a
    softmax layer before CrossEntropyLoss (the loss then sees probabilities as logits)."""
    return F.cross_entropy(
        F.softmax(logits, 1) if double_softmax else logits, y, reduction=reduction
    )


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    grad_clip: float,
    generator: torch.Generator,
    double_softmax: bool = False,
    ranks: Ranks | None = None,
    freeze_logits: bool = False,
    select: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """One pass over shuffled mini-batches.

    ``select`` (bilevel selection, phase 1): held-out rows (x, y). Each weight step then leaves
    the logits alone, and is followed by a logit step on the next batch of the held-out rows
    (reshuffled at each pass over them) that leaves the weights alone: the logits follow the
    straight-through gradient of the held-out loss, the weights that of the training loss.

    ``freeze_logits`` (the --logit-warmup epochs): the selection logits' gradient is measured,
    then dropped before the step (``_weight_step``).

    Returns the training forwards' mean loss and accuracy and, for a selective network,
    ``logit_grad``: the mean over steps and neurons of dL/da_k per candidate k, before clipping
    (negative: gradient descent raises that candidate's logits); the instrument that showed
    plain candidates favour selu (docs/method.md).

    Under torchrun every rank draws the same permutation (same seed) and takes its strided shard
    of each global batch of ``batch_size`` rows; DDP averages the gradients, so every rank makes
    the same update that one process would make on the whole batch (up to shards differing by
    one row). The Gumbel draw is identical on every rank for the same reason; after every step
    the ranks check that their weights and logits are still identical.
    """
    ranks = ranks or Ranks()
    model.train()
    inner = getattr(model, "module", model)  # DDP wraps the network
    logit_params = selection_logits(inner)  # one (n_l, K) parameter per hidden layer
    # accumulated where the logits live: one device-to-host copy per epoch, not per step
    logit_grad = torch.zeros_like(logit_params[0][0]).detach() if logit_params else None
    least = _least_rows(inner, ranks)
    order = torch.randperm(len(y), generator=generator).to(y.device)
    # loss sum, correct, rows: kept where the data lives (no device sync per step; nccl reduces
    # only GPU tensors)
    totals = torch.zeros(3, dtype=torch.float64, device=y.device)
    held_out = _HeldOutBatches(select, batch_size, generator, least, ranks) if select else None
    steps = 0
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < least:  # a tail too short to give every rank a row (two with batchnorm)
            continue
        idx = idx[ranks.rank :: ranks.world]
        logits = model(x[idx])  # (B, C)
        loss = loss_fn(logits, y[idx], double_softmax=double_softmax)
        keep_logits = freeze_logits or held_out is not None
        grad = _weight_step(model, optimizer, loss, logit_params, grad_clip, keep_logits)
        if held_out is not None and not freeze_logits:  # bilevel: the instrument reads these
            batch = held_out.next()
            grads = _logit_step(
                model, optimizer, batch, logit_params, grad_clip, double_softmax=double_softmax
            )
            logit_grad += torch.cat(grads).mean(0)
        elif held_out is None and grad is not None:
            logit_grad += grad
        check_ranks_agree(model, ranks)
        steps += 1
        totals[0] += loss.detach().double() * len(idx)
        totals[1] += (logits.argmax(1) == y[idx]).sum()
        totals[2] += len(idx)
    all_reduce_sum(totals, ranks)
    result: dict[str, Any] = {
        "train_loss": float(totals[0] / totals[2]),
        "train_accuracy": float(totals[1] / totals[2]),
    }
    if logit_grad is not None:
        result["logit_grad"] = dict(
            zip(inner.pool, (logit_grad / max(steps, 1)).cpu().tolist(), strict=True)
        )
    return result


def _least_rows(model: nn.Module, ranks: Ranks) -> int:
    """The fewest rows a batch must hold to train: one per rank, two with a BatchNorm in
    training (it needs two rows per feature); a shorter tail of an epoch is skipped."""
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return ranks.world * (2 if batchnorm else 1)


def _weight_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    logit_params: list[nn.Parameter],
    grad_clip: float,
    keep_logits: bool,
) -> Tensor | None:
    """One step on ``loss``: the weights, and the selection logits unless ``keep_logits`` (their
    gradient is dropped before the step, so Adam leaves them and their moments untouched;
    dropped, not switched off with requires_grad: under DDP every parameter's gradient is
    reduced). Returns the logits' gradient before clipping, averaged over every hidden neuron: (K,), or
    None for a network without logits."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad.detach() for p in logit_params if p.grad is not None]
    mean = torch.cat(grads).mean(0) if grads else None  # (K,), before clipping scales them
    if grads and keep_logits:
        for p in logit_params:
            p.grad = None
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return mean


class _HeldOutBatches:
    """Batches of bilevel selection's held-out rows, endlessly: a fresh permutation (from the
    run's generator, so a resumed run draws the same) at each pass; a tail shorter than a batch
    is skipped (all the rows make one batch when they are fewer than a batch)."""

    def __init__(
        self,
        rows: tuple[Tensor, Tensor],
        batch_size: int,
        generator: torch.Generator,
        least: int,
        ranks: Ranks,
    ) -> None:
        self.x, self.y = rows
        if len(self.y) < least:
            raise TrainError(
                f"bilevel selection holds out {len(self.y)} row(s), fewer than a batch needs "
                f"({least}); raise --selection-holdout or use more data"
            )
        self.batch_size, self.generator, self.ranks = batch_size, generator, ranks
        self.order: Tensor = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> tuple[Tensor, Tensor]:
        if self.pos + min(self.batch_size, len(self.y)) > len(self.order):
            self.order = torch.randperm(len(self.y), generator=self.generator).to(self.y.device)
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        idx = idx[self.ranks.rank :: self.ranks.world]
        return self.x[idx], self.y[idx]


def _logit_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor],
    logit_params: list[nn.Parameter],
    grad_clip: float,
    *,
    double_softmax: bool,
) -> list[Tensor]:
    """One step of the selection logits alone on a held-out batch: every other gradient is
    dropped before the step, so Adam leaves the weights and their moments untouched. Returns the
    logits' gradients (before clipping)."""
    x, y = batch
    loss = loss_fn(model(x), y, double_softmax=double_softmax)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    logit_ids = {id(p) for p in logit_params}
    for p in model.parameters():
        if id(p) not in logit_ids:
            p.grad = None
    grads = [p.grad.detach().clone() for p in logit_params]
    nn.utils.clip_grad_norm_(logit_params, grad_clip)
    optimizer.step()
    return grads


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, *, double_softmax: bool = False
) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode (phase 1: argmax activations, unless eval noise)."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), EVAL_BATCH):
        logits = model(x[start : start + EVAL_BATCH])
        batch_y = y[start : start + EVAL_BATCH]
        total_loss += loss_fn(
            logits, batch_y, double_softmax=double_softmax, reduction="sum"
        ).item()
        correct += int((logits.argmax(1) == batch_y).sum())
    return total_loss / len(y), correct / len(y)


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class _RunState:
    """Everything a checkpoint must restore besides the tensors (its "run" object)."""

    phase_index: int = 0
    phase_epoch: int = 0  # completed epochs of the current phase
    best_val_loss: float = float("inf")
    best_val_accuracy: float = -1.0
    best_epoch: int = -1  # the kept epoch of the current phase (global epoch number)
    assignment: list[list[str]] | None = None  # frozen phase-2 assignment
    phase1: dict[str, Any] | None = None  # phase-1 metrics, once phase 1 is over
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0


@dataclass
class _Phase:
    """The live objects of the current phase."""

    name: str
    epochs: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    kept: dict[str, Tensor]  # state of the epoch the phase's rule keeps so far
    rule: str  # which epoch is kept: val-loss | val-accuracy | last


def _build(
    config: TrainConfig, phase: str, dataset: Dataset, assignment: list[list[str]] | None
) -> nn.Module:
    pre = dataset.preprocessing
    layered = config.layers is not None
    if phase == "selective":
        # the selective network's options are TrainConfig fields of the same names
        names = (
            "logit_init_std",
            "candidate_norm",
            "clamp",
            "eval_noise",
            "logit_grad_norm",
            "granularity",
        )
        options = {name: getattr(config, name) for name in names}
        options |= {"preprocessing": pre, "tau": config.tau_at(0), "afu": config.afu}
        if layered:
            shape = contract.image_shape(dataset.input_shape)
            return SelectiveConvNet(config.layers, shape, config.pool, **options)
        return SelectiveMLP(config.arch, config.pool, **options)
    assert assignment is not None, "mixed and fixed phases need an assignment"
    norm = _phase2_candidate_norm(config, phase, assignment)
    if layered:
        return MixedConvNet(
            config.layers,
            contract.image_shape(dataset.input_shape),
            config.pool,
            assignment,
            preprocessing=pre,
            candidate_norm=norm,
            afu=config.afu,
        )
    return MixedMLP(
        config.arch, config.pool, assignment, preprocessing=pre, candidate_norm=norm, afu=config.afu
    )


def _phase2_candidate_norm(config: TrainConfig, phase: str, assignment: list[list[str]]) -> str:
    """The candidate norm a phase-2 (or fixed) network applies: the configured one, or "none"
    under --phase2-norm fold. (A layered network whose norm cannot fold exactly keeps it when
    phase 2 continues from phase 1's weights: ``MixedConvNet.folded``; a fresh one starts
    plain.)"""
    if phase != "mixed" or config.phase2_norm != "fold":
        return config.candidate_norm
    continues = config.phase2_init == "continue" or config.p2_epochs == 0
    if config.layers is not None and continues:
        folds = norm_folds(
            config.layers, config.pool, assignment, config.candidate_norm, config.afu
        )
        return "none" if folds else config.candidate_norm
    return "none"


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam; the selection logits form their own group at ``logit_lr`` and the learned units
    theirs at ``afu_lr`` (None: ``lr``), each only when the network has them."""
    logits = selection_logits(model)
    unit_ids = {id(p) for m in model.modules() if isinstance(m, AFUnit) for p in m.parameters()}
    special = unit_ids | {id(p) for p in logits}
    # in module order, each parameter once (a network-shared unit too)
    units = [p for p in model.parameters() if id(p) in unit_ids]
    weights = [p for p in model.parameters() if id(p) not in special]
    groups: list[dict[str, Any]] = [{"params": weights, "lr": config.lr}]
    if logits:
        groups.append({"params": logits, "lr": config.logit_lr or config.lr})
    if units:
        groups.append({"params": units, "lr": config.afu_lr or config.lr})
    return torch.optim.Adam(groups)


def _apply_prior(config: TrainConfig, model: nn.Module) -> None:
    """--logit-prior ACTIVATION=GAP: that candidate's logit raised by GAP in every mixed layer,
    so it starts with probability e^GAP / (e^GAP + K - 1) per feature."""
    prior = config.prior()
    if prior is None:
        return
    name, gap = prior
    column = config.pool.index(name)
    with torch.no_grad():
        for logits in selection_logits(model):
            logits[:, column] += gap


def _keep_rule(config: TrainConfig, phase: str) -> str:
    """--select decides phase 1's kept epoch; phase 2 and fixed runs keep the best val loss."""
    return config.select if phase == "selective" else "val-loss"


def _keeps(rule: str, record: dict[str, Any], state: _RunState) -> bool:
    """Whether this epoch's state replaces the kept one (ties keep the earlier epoch)."""
    if rule == "last":
        return True
    if rule == "val-accuracy":
        return record["val_accuracy"] > state.best_val_accuracy
    return record["val_loss"] < state.best_val_loss


def _check_out_dir(out: Path, *, resume: bool, overwrite: bool, clear: bool) -> None:
    has_model = (out / artifacts.MODEL_SPEC).exists()
    has_checkpoint = (out / artifacts.CHECKPOINT).exists()
    if resume:
        if not has_checkpoint:
            state = "holds a finished run" if has_model else "holds no checkpoint"
            raise TrainError(f"--resume: {out} {state}; nothing to resume")
        return
    if (has_model or has_checkpoint) and not overwrite:
        what = "a finished run" if has_model else "an unfinished run (resume it with --resume)"
        raise TrainError(f"{out} already holds {what}; pass --overwrite to replace it")
    if overwrite and clear:
        for name in (
            artifacts.MODEL_SPEC,
            artifacts.MODEL_WEIGHTS,
            artifacts.HISTORY,
            artifacts.CHECKPOINT,
            report.REPORT,
            *report.PLOTS.values(),
        ):
            (out / name).unlink(missing_ok=True)


def _check_fits_data(config: TrainConfig, dataset: Dataset) -> tuple[int, ...]:
    """The shape one sample takes in the network: (D,) for an MLP, (C, H, W) for a layered
    network; TrainError when the architecture does not fit the data (inputs, classes, image)."""
    classes = len(dataset.labels)
    if config.layers is None:
        if config.arch[0] != dataset.n_features or config.arch[-1] != classes:
            raise TrainError(
                f"architecture {config.arch} does not fit the data: expected "
                f"{dataset.n_features} inputs and {classes} classes "
                f"(e.g. --arch {dataset.n_features},256,128,{classes})"
            )
        return (dataset.n_features,)
    try:
        shape = contract.image_shape(dataset.input_shape)
    except contract.SpecError:
        raise TrainError(
            f"a conv net needs image-shaped data ([H, W] or [C, H, W] per sample); "
            f"{dataset.name} holds samples of shape {list(dataset.input_shape)}"
        ) from None
    try:
        arch = contract.layered_arch(config.layers, shape)
    except contract.SpecError as e:
        raise TrainError(f"layers do not fit the data's {shape} images: {e}") from None
    if arch != config.arch or arch[-1] != classes:
        raise TrainError(
            f"architecture {config.arch} does not fit the data: its layers give {arch} on "
            f"{shape} images, and the data has {classes} classes"
        )
    return tuple(shape)


@torch.no_grad()
def remove_activations(model: SelectiveNetwork, x: Tensor, y: Tensor) -> list[dict[str, Any]]:
    """Selection by removal (after Wang et al., ICLR 2021), per (layer, activation): greedily,
    remove the activation whose removal from its layer lowers the loss of ``model``'s argmax
    network on (x, y) the most, while one does; the features that had chosen it fall back to
    their next-best logit. Only activations some feature chose are tried, and every layer keeps
    one. A removal sets that column of the layer's logits to REMOVED. Returns the
    removals in order: layer, activation and the loss after it."""
    layers = [layer for _, layer in mixed_layers(model)]
    best, _ = evaluate(model, x, y)
    removed: list[dict[str, Any]] = []
    while True:
        trials = []
        for index, layer in enumerate(layers):
            if len(_removed(layer)) + 1 >= len(layer.pool):
                continue
            for k in sorted(set(layer.choice().tolist())):
                column = layer.logits[:, k].clone()
                _remove(layer, [k])
                trials.append((evaluate(model, x, y)[0], index, k))
                layer.logits[:, k] = column
        if not trials or min(trials)[0] >= best:
            return removed
        best, index, k = min(trials)
        _remove(layers[index], [k])
        removed.append({"layer": index, "activation": layers[index].pool[k], "loss": best})


@torch.no_grad()
def shrink(model: SelectiveNetwork, count: int) -> list[list[str]]:
    """Progressive shrinking: remove from every layer of ``model`` the ``count`` remaining
    candidates of lowest mean probability softmax(logits) over its features (their logits set
    to REMOVED, so no draw picks them again). Returns the names removed, per layer."""
    out = []
    for _, layer in mixed_layers(model):
        gone = _removed(layer)
        share = torch.softmax(layer.logits, dim=-1).mean(0).tolist()
        # lowest share first; on a tie the later candidate of the pool goes first
        left = sorted((p, -k) for k, p in enumerate(share) if k not in gone)
        drop = [-k for _, k in left[: min(count, len(left) - 1)]]
        _remove(layer, drop)
        out.append([layer.pool[k] for k in drop])
    return out


def _remove(layer: MixedActivation, candidates: list[int]) -> None:
    """Take ``candidates`` out of ``layer``: their logits at REMOVED, so no draw or argmax picks
    them (removal and shrinking alike)."""
    layer.logits[:, candidates] = REMOVED


def _removed(layer: MixedActivation) -> set[int]:
    """The candidates removed from ``layer`` (their logits at REMOVED)."""
    return set((layer.logits.detach().max(0).values <= REMOVED / 2).nonzero().flatten().tolist())


def _phase_rows(
    config: TrainConfig, phase: str, data: dict[str, Tensor]
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """The training rows of a phase's weight steps, and bilevel selection's held-out rows: a
    fixed random ``selection_holdout`` share of the training split (from the seed alone, so a
    resumed run holds out the same rows), in phase 1 only. Phase 2 trains on the whole split."""
    x, y = data["x_train"], data["y_train"]
    if phase != "selective" or config.selection != "bilevel":
        return x, y, None
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed + 2))
    held = round(config.selection_holdout * len(y))
    if held < 1 or held >= len(y):
        raise TrainError(
            f"--selection-holdout {config.selection_holdout} of {len(y)} training rows leaves "
            "no rows on one side"
        )
    kept, out = order[held:].to(y.device), order[:held].to(y.device)
    return x[kept], y[kept], (x[out], y[out])


def train_run(
    *,
    config: TrainConfig,
    dataset: Dataset,
    out: Path | str,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    after_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> ModelSpec:
    """Train per ``config`` on ``dataset`` and write the run's artifacts to ``out``.

    ``after_epoch`` is called with each epoch's history record once its checkpoint is on disk.
    """
    run = _Run(config, dataset, Path(out), resume=resume, overwrite=overwrite, device=device)
    run.train(progress=progress, after_epoch=after_epoch)
    return run.finish()


class _Run:
    """One training run: what its phases share (config, data on the device, output folder,
    ranks, device, the data generator, the options model.json and checkpoints record), the
    bookkeeping a checkpoint restores (``state``) and the current phase's live objects
    (``phase``). Made, the run stands at the start of its first phase (with ``resume``: where
    its checkpoint left it); ``train`` trains the phases, ``finish`` writes the artifacts."""

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        out: Path,
        *,
        resume: bool,
        overwrite: bool,
        device: str,
    ) -> None:
        self.config, self.dataset, self.out = config, dataset, out
        self.shape = _check_fits_data(config, dataset)
        self.ranks, self.dev = init_distributed(device)
        _check_out_dir(out, resume=resume, overwrite=overwrite, clear=self.ranks.main)
        if self.ranks.main:  # only rank 0 writes; the others read its checkpoint when resuming
            out.mkdir(parents=True, exist_ok=True)
        barrier(self.ranks)
        self.data = {  # (N, D) rows -> (N, *shape): (N, C, H, W) for a conv net
            f"{a}_{split}": torch.from_numpy(getattr(dataset, f"{a}_{split}")).to(self.dev)
            for split in ("train", "val", "test")
            for a in ("x", "y")
        }
        for split in ("train", "val", "test"):
            self.data[f"x_{split}"] = self.data[f"x_{split}"].reshape(-1, *self.shape)
        self.record_config = {
            **asdict(config),
            "data": dataset.name,
            "data_summary": dataset.summary(),
            "data_request": dataset.request,
            "world_size": self.ranks.world,
        }
        torch.manual_seed(config.seed)
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.state = _RunState()
        if resume:
            self.phase = self._restore()
            if self.ranks.main:
                print(f"resuming {out} at phase {self.phase.name}, epoch {self.state.phase_epoch}")
        else:
            self.phase = self._start_phase(0, previous=None)

    def train(
        self, *, progress: bool, after_epoch: Callable[[dict[str, Any]], None] | None
    ) -> None:
        """Every phase from the current one on, each to its end; leaving phase 1 freezes the
        argmax of the state its rule kept into phase 2's assignment. ``after_epoch`` gets each
        epoch's history record once its checkpoint is on disk."""
        for index in range(self.state.phase_index, len(self.config.phases())):
            if index > self.state.phase_index:
                self.phase = self._start_phase(index, previous=self._end_selective())
            self._train_phase(progress=progress, after_epoch=after_epoch)

    def _start_phase(self, index: int, *, previous: SelectiveNetwork | None) -> _Phase:
        """Phase ``index``'s model, optimizer and selection rule, its bookkeeping reset.
        Entering phase 2 freezes the assignment of the state phase 1 kept (``previous``)."""
        config, state = self.config, self.state
        name, epochs = config.phases()[index]
        state.phase_index, state.phase_epoch, state.best_epoch = index, 0, -1
        state.best_val_loss, state.best_val_accuracy = float("inf"), -1.0
        if name == "fixed":
            state.assignment = [[config.pool[0]] * width for width in config.arch[1:-1]]
        if name == "mixed" and previous is not None:
            model = self._phase2_model(previous, epochs)
        else:
            model = _build(config, name, self.dataset, state.assignment)
            if name == "selective":
                _apply_prior(config, model)
        model = model.to(self.dev)
        optimizer = _optimizer(config, model)
        return _Phase(name, epochs, model, optimizer, _clone_state(model), _keep_rule(config, name))

    def _phase2_model(self, selective: SelectiveNetwork, epochs: int) -> nn.Module:
        """Phase 2's network: ``selective``'s argmax frozen, its weights carried over unless
        ``fresh`` (with phase-2 epochs to train it)."""
        config = self.config
        self.state.assignment = selective.assignment()
        # no phase-2 epochs: nothing would train a fresh network, so phase 1's ships
        if config.phase2_init == "continue" or epochs == 0:
            model = mixed_from_selective(selective, preprocessing=self.dataset.preprocessing)
            # fold: the same function, trained as a plain network
            return model.folded() if config.phase2_norm == "fold" else model
        torch.manual_seed(config.seed + 1)  # "fresh": re-initialised, as the reference code does
        return _build(config, "mixed", self.dataset, self.state.assignment)

    def _end_selective(self) -> SelectiveNetwork:
        """Phase 1's kept state (its rule's epoch) as a network; its metrics go to
        state.phase1."""
        data, state = self.data, self.state
        selective = _build(self.config, "selective", self.dataset, None).to(self.dev)
        selective.load_state_dict(self.phase.kept)
        selective.eval_noise = False  # the frozen mix is the logits' argmax, whatever the protocol
        removed = None
        if self.config.freeze_rule == "removal":
            held_out = _phase_rows(self.config, "selective", data)[2]
            assert held_out is not None, "TrainConfig refuses removal without bilevel selection"
            removed = remove_activations(selective, *held_out)
        val_loss, val_acc = evaluate(selective, data["x_val"], data["y_val"])
        test_loss, test_acc = evaluate(selective, data["x_test"], data["y_test"])
        state.phase1 = {
            "best_epoch": state.best_epoch,
            "select": self.phase.rule,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "activation_counts": selective.activation_counts(),
        }
        if removed is not None:
            state.phase1["removed"] = removed
        return selective

    def _train_phase(
        self, *, progress: bool, after_epoch: Callable[[dict[str, Any]], None] | None
    ) -> None:
        """Epochs of the current phase until it is complete; a checkpoint after each."""
        phase, state = self.phase, self.state
        if state.phase_epoch >= phase.epochs:
            return
        rows = _phase_rows(self.config, phase.name, self.data)
        net = phase.model
        if self.ranks.distributed:
            devices = [self.dev.index] if self.dev.type == "cuda" else None
            net = DistributedDataParallel(phase.model, device_ids=devices)
        with tqdm(
            total=phase.epochs,
            initial=state.phase_epoch,
            desc=f"{phase.name:>9}",
            unit="epoch",
            disable=not progress or not self.ranks.main,
            leave=True,
            dynamic_ncols=True,
        ) as bar:
            while state.phase_epoch < phase.epochs:
                record = self._epoch(net, *rows)
                bar.set_postfix(
                    loss=f"{record['train_loss']:.4f}",
                    val_loss=f"{record['val_loss']:.4f}",
                    val_acc=f"{record['val_accuracy']:.4f}",
                )
                bar.update(1)
                if after_epoch is not None:
                    after_epoch(record)

    def _epoch(
        self, net: nn.Module, x: Tensor, y: Tensor, held_out: tuple[Tensor, Tensor] | None
    ) -> dict[str, Any]:
        """One epoch of the current phase on rows (x, y): trained, evaluated, its state kept if
        the phase's rule says so, the checkpoint and history written; returns its record."""
        config, phase, state, model = self.config, self.phase, self.state, self.phase.model
        started = time.perf_counter()
        selective = isinstance(model, SelectiveNetwork)
        if selective:  # tau and relaxed of every mixed layer
            model.tau = config.tau_at(state.phase_epoch)
            model.relaxed = state.phase_epoch < config.soft_epochs
        frozen = selective and config.logits_frozen_at(state.phase_epoch)
        result = train_epoch(
            net,
            phase.optimizer,
            x,
            y,
            batch_size=config.batch_size,
            grad_clip=config.grad_clip,
            generator=self.data_gen,
            double_softmax=config.double_softmax,
            ranks=self.ranks,
            freeze_logits=frozen,
            select=held_out,
        )
        removals = config.shrinks_after(state.phase_epoch) if selective else 0
        if removals:
            result["shrunk"] = shrink(model, removals)
        x_val, y_val = self.data["x_val"], self.data["y_val"]
        val_loss, val_acc = evaluate(model, x_val, y_val, double_softmax=config.double_softmax)
        seconds = time.perf_counter() - started
        state.train_seconds += seconds
        record = {
            "epoch": len(state.history),
            "phase": phase.name,
            "phase_epoch": state.phase_epoch,
            **result,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": seconds,
            "activation_counts": model.activation_counts(),
        }
        if selective:
            record |= {"tau": model.tau, "relaxed": model.relaxed, "logits_frozen": frozen}
        if self.ranks.distributed:
            record["ranks"] = self.ranks.world  # a divergence would have stopped the run
        if _keeps(phase.rule, record, state):
            state.best_val_loss, state.best_val_accuracy = val_loss, val_acc
            state.best_epoch = record["epoch"]
            phase.kept = _clone_state(model)
        state.history.append(record)
        state.phase_epoch += 1
        if self.ranks.main:
            self._save_checkpoint()
            artifacts.write_history(self.out, state.history)
        return record

    def _save_checkpoint(self) -> None:
        phase = self.phase
        optim_tensors, optim_meta = artifacts.optimizer_to_tensors(phase.optimizer)
        tensors = {
            **{f"model.{k}": v for k, v in phase.model.state_dict().items()},
            **{f"best.{k}": v for k, v in phase.kept.items()},
            **optim_tensors,
            "rng.torch": torch.get_rng_state(),
            "rng.data": self.data_gen.get_state(),
        }
        if self.dev.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        state = {"config": self.record_config, "optimizer": optim_meta, "run": asdict(self.state)}
        artifacts.save_checkpoint(self.out, tensors, state)

    def _restore(self) -> _Phase:
        """The phase the checkpoint was written in, with its model, optimizer, kept state and
        RNGs; the run's state the checkpoint's.

        The checkpoint is checked field by field before any of it is used (it may have been
        edited, truncated or written by other code): its options against this run's (a former
        protocol name taken for today's); its run state against what this run can hold
        (phase, epoch counts, history, assignment); its tensors' names, dtypes and shapes, from
        the header, against the network and optimizer these options build, before any tensor
        data is read; then NaN or inf in any tensor, by name, and the generator states.
        ArtifactError (or TrainError for other options) names the problem.
        """
        config, dev = self.config, self.dev
        file, saved = artifacts.read_checkpoint(self.out)
        path = file.path
        recorded = recorded_options(saved["config"])
        if recorded != self.record_config:
            keys = sorted(set(self.record_config) | set(recorded))
            changed = [k for k in keys if recorded.get(k) != self.record_config.get(k)]
            raise TrainError(
                f"--resume: options differ from the checkpoint in {_listed(changed)}; "
                f"rerun with the original options"
            )
        restored = _checked_run_state(saved["run"], config, path)
        name, epochs = config.phases()[restored.phase_index]
        model = _build(config, name, self.dataset, restored.assignment).to(dev)
        optimizer = _optimizer(config, model)
        _check_optimizer_record(saved["optimizer"], optimizer, path)
        tensors = _checked_tensors(file, model, optimizer, self.data_gen, dev)
        model.load_state_dict(_prefixed(tensors, "model."))
        groups = {"param_groups": optimizer.state_dict()["param_groups"], "scalars": {}}
        optimizer.load_state_dict(artifacts.optimizer_from_tensors(tensors, groups))
        torch.set_rng_state(tensors["rng.torch"])
        self.data_gen.set_state(tensors["rng.data"])
        if dev.type == "cuda":
            try:
                torch.cuda.set_rng_state(tensors["rng.cuda"], dev)
            except RuntimeError as e:
                raise artifacts.ArtifactError(
                    f"{path}: tensor rng.cuda is not a CUDA generator's state ({e})"
                ) from None
        self.state = restored
        kept = _prefixed(tensors, "best.")
        return _Phase(name, epochs, model, optimizer, kept, _keep_rule(config, name))

    def finish(self) -> ModelSpec:
        """The last phase's kept state as the run's model, written with its spec, plots and
        report; the checkpoint removed. Its candidate norm is folded into the weights, so the
        artifact is an ordinary mixed network (export and serve know nothing of the norm).
        (With --p2-epochs 0 the mixed phase trains nothing and keeps its start: phase 1's
        choice.)"""
        model = self.phase.model
        model.load_state_dict(self.phase.kept)
        model = model.folded()
        config, dataset = self.config, self.dataset
        training = self.record_config
        if config.layers is not None:  # the norm the stored frozen layers still apply, if any
            training = {**training, artifacts.FROZEN_CANDIDATE_NORM: model.candidate_norm}
        spec = ModelSpec(
            arch=config.arch,
            pool=config.pool,
            mode=config.mode,
            assignment=model.assignment,
            preprocessing=dataset.preprocessing,
            input_shape=list(self.shape) if config.layers is not None else dataset.input_shape,
            labels=dataset.labels,
            training=training,
            metrics=self._metrics(model),
            versions=package_versions(),
            afu=config.afu,
            layers=config.layers,
        )
        if self.ranks.main:
            artifacts.save_model(self.out, spec, model.canonical_state_dict())
            report.write_plots_and_report(self.out, spec, self.state.history)
            artifacts.remove_checkpoint(self.out)
        barrier(self.ranks)
        return spec

    def _metrics(self, model: MixedNetwork) -> dict[str, Any]:
        """model.json's metrics of the final model."""
        data, state = self.data, self.state
        val_loss, val_acc = evaluate(model, data["x_val"], data["y_val"])
        test_loss, test_acc = evaluate(model, data["x_test"], data["y_test"])
        metrics: dict[str, Any] = {
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "val_accuracy": val_acc,
            "val_loss": val_loss,
            "best_epoch": state.best_epoch,
            "epochs": len(state.history),
            "train_seconds": state.train_seconds,
        }
        if state.phase1 is not None:
            metrics["phase1"] = state.phase1
        if model.afus is not None:
            metrics["afu"] = afu_summary(model)
        return metrics


def _checked_tensors(
    file: artifacts.TensorFile,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator,
    dev: torch.device,
) -> dict[str, Tensor]:
    """A checkpoint's tensors, once their names, dtypes and shapes (from the header) fit the
    network and optimizer these options build, every value is finite and the generator states
    are states: ArtifactError names the first that is not."""
    required, optional = _checkpoint_layout(file, model, optimizer, data_gen, dev)
    try:
        artifacts.check_tensor_layout(
            file,
            required,
            optional=optional,
            mismatch="tensors do not match the run these options train",
        )
    except contract.SpecError as e:
        raise artifacts.ArtifactError(f"{file.path}: {e}") from None
    tensors, _ = artifacts.read_tensor_data(file)
    if problems := artifacts.nonfinite_tensors(tensors):
        raise artifacts.ArtifactError(f"{file.path}: {_listed(problems, sep='; ', most=4)}")
    for key in ("rng.torch", "rng.data"):
        try:  # a scratch generator: nothing is set until every state is known to be valid
            torch.Generator().set_state(tensors[key])
        except RuntimeError as e:
            raise artifacts.ArtifactError(
                f"{file.path}: tensor {key} is not a random generator's state ({e})"
            ) from None
    return tensors


def _checked_run_state(saved: dict[str, Any], config: TrainConfig, path: Path) -> _RunState:
    """The checkpoint's run state, every field checked against what a run of ``config`` can
    hold at that point; ArtifactError names the first field that cannot be."""
    expected = [f.name for f in fields(_RunState)]
    missing = [k for k in expected if k not in saved]
    unknown = sorted(set(saved) - set(expected))
    if missing or unknown:
        parts = [
            f"missing field(s) {_listed(missing)}" if missing else "",
            f"unknown field(s) {_listed(unknown)}" if unknown else "",
        ]
        raise artifacts.ArtifactError(f"{path}: run state: {'; '.join(p for p in parts if p)}")

    def refuse(field_name: str, wanted: str) -> artifacts.ArtifactError:
        value = _short(repr(saved[field_name])) if field_name in saved else "nothing"
        return artifacts.ArtifactError(
            f"{path}: run state field '{field_name}': expected {wanted}, got {value}"
        )

    phases = config.phases()
    index = saved["phase_index"]
    if not (_is_int(index) and 0 <= index < len(phases)):
        raise refuse("phase_index", f"an integer in 0..{len(phases) - 1} (this run's phases)")
    name, epochs = phases[index]
    phase_epoch = saved["phase_epoch"]
    if not (_is_int(phase_epoch) and 0 <= phase_epoch <= epochs):
        raise refuse("phase_epoch", f"an integer in 0..{epochs} (phase {name}'s epochs)")
    # one history record per completed epoch: the earlier phases' and this one's so far
    done = sum(n for _, n in phases[:index]) + phase_epoch
    history = saved["history"]
    if not (isinstance(history, list) and len(history) == done):
        raise refuse("history", f"a list of {done} epoch records")
    phase_of = [p for p, n in phases for _ in range(n)]
    for epoch, record in enumerate(history):
        if problem := _record_problem(record, epoch, phase_of[epoch], config):
            raise artifacts.ArtifactError(f"{path}: run state field 'history[{epoch}]': {problem}")
    if not (_is_int(saved["best_epoch"]) and -1 <= saved["best_epoch"] < done):
        raise refuse("best_epoch", f"an integer in -1..{done - 1}")
    if not (_is_number(saved["best_val_loss"]) and not math.isnan(saved["best_val_loss"])):
        raise refuse("best_val_loss", "a number, not NaN")
    if not (_is_number(saved["best_val_accuracy"]) and -1 <= saved["best_val_accuracy"] <= 1):
        raise refuse("best_val_accuracy", "a number in -1..1")
    seconds = saved["train_seconds"]
    if not (_is_number(seconds) and math.isfinite(seconds) and seconds >= 0):
        raise refuse("train_seconds", "a number >= 0")
    widths = config.arch[1:-1]
    assignment = saved["assignment"]
    if name == "selective" and assignment is not None:
        raise refuse("assignment", "null (phase 1 has not frozen an assignment)")
    if name == "fixed" and assignment != [[config.pool[0]] * w for w in widths]:
        raise refuse("assignment", f"{config.pool[0]} for every neuron (a fixed run)")
    if name == "mixed" and not (
        isinstance(assignment, list)
        and [len(layer) if isinstance(layer, list) else None for layer in assignment] == widths
        and all(isinstance(a, str) and a in config.pool for layer in assignment for a in layer)
    ):
        raise refuse("assignment", f"a name of the pool per neuron of layers {widths}")
    phase1 = saved["phase1"]
    if name != "mixed" and phase1 is not None:
        raise refuse("phase1", "null (phase 1 is not over)")
    if name == "mixed" and _phase1_problem(phase1, len(widths)):
        raise refuse("phase1", "phase 1's metrics " + _phase1_problem(phase1, len(widths)))
    return _RunState(**saved)


# the numbers every history record holds (train/report.py plots them)
RECORD_NUMBERS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")
PHASE1_NUMBERS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")


def _record_problem(record: Any, epoch: int, phase: str, config: TrainConfig) -> str | None:
    """What is wrong with history record ``epoch`` of a checkpoint, or None."""
    if not isinstance(record, dict):
        return "expected an object"
    if record.get("epoch") != epoch or record.get("phase") != phase:
        return f"expected epoch {epoch} of phase {phase}"
    if missing := [k for k in RECORD_NUMBERS if not _is_number(record.get(k))]:
        return f"expected numbers for {_listed(missing)}"
    if _counts_problem(record.get("activation_counts"), len(config.arch) - 2, config.pool):
        return "expected activation_counts: per hidden layer, a count per pool activation"
    grad = record.get("logit_grad")
    if grad is not None and not (
        isinstance(grad, dict)
        and set(grad) == set(config.pool)
        and all(map(_is_number, grad.values()))
    ):
        return "expected logit_grad: a number per pool activation"
    return None


def _phase1_problem(phase1: Any, layers: int) -> str | None:
    if not isinstance(phase1, dict):
        return "as an object"
    if not _is_int(phase1.get("best_epoch")) or not isinstance(phase1.get("select"), str):
        return "with best_epoch and select"
    if missing := [k for k in PHASE1_NUMBERS if not _is_number(phase1.get(k))]:
        return f"with numbers for {_listed(missing)}"
    if not (
        isinstance(phase1.get("activation_counts"), list)
        and len(phase1["activation_counts"]) == layers
    ):
        return f"with activation_counts for {layers} hidden layers"
    return None


def _counts_problem(counts: Any, layers: int, pool: list[str]) -> bool:
    return not (
        isinstance(counts, list)
        and len(counts) == layers
        and all(
            isinstance(c, dict)
            and set(c) == set(pool)
            and all(_is_int(v) and v >= 0 for v in c.values())
            for c in counts
        )
    )


def _check_optimizer_record(
    saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path
) -> None:
    """The checkpoint's optimizer record must be the one these options' Adam writes: the same
    groups (parameter indices, learning rates, betas, ...: every setting both torch versions
    know) and no state outside tensors. The groups are then loaded from ``optimizer`` itself."""
    expected = json.loads(json.dumps(optimizer.state_dict()["param_groups"]))
    if set(saved) != {"param_groups", "scalars"}:
        raise artifacts.ArtifactError(
            f"{path}: optimizer state: expected the fields param_groups and scalars, got "
            f"{_listed(sorted(map(str, saved)))}"
        )
    groups = saved["param_groups"]
    if not (
        isinstance(groups, list)
        and len(groups) == len(expected)
        and all(
            isinstance(group, dict)
            and group.get("params") == want["params"]
            and all(group[k] == v for k, v in want.items() if k in group)
            for group, want in zip(groups, expected, strict=False)
        )
    ):
        raise artifacts.ArtifactError(
            f"{path}: optimizer state field 'param_groups': not the Adam groups these options "
            "build (parameter indices, learning rates, betas, ...)"
        )
    if saved["scalars"] != {}:
        raise artifacts.ArtifactError(
            f"{path}: optimizer state field 'scalars': expected {{}} (Adam keeps its state in "
            f"tensors), got {_short(repr(saved['scalars']))}"
        )


def _checkpoint_layout(
    file: artifacts.TensorFile,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator,
    dev: torch.device,
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, tuple[str, tuple[int, ...]]]]:
    """(required, optional) tensors of a checkpoint of ``model``: name -> (dtype, shape).

    Adam holds step, exp_avg and exp_avg_sq for a parameter once it has taken a step with a
    gradient (the logits of --logit-warmup epochs have none yet): all three or none.
    """

    def entry(t: Tensor) -> tuple[str, tuple[int, ...]]:
        return artifacts.TORCH_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape)

    state = model.state_dict()
    required = {f"{prefix}.{k}": entry(v) for prefix in ("model", "best") for k, v in state.items()}
    required["rng.torch"] = entry(torch.get_rng_state())
    required["rng.data"] = entry(data_gen.get_state())
    optional = {}
    if dev.type == "cuda":
        required["rng.cuda"] = entry(torch.cuda.get_rng_state(dev))
    elif "rng.cuda" in file.tensors:  # written on a GPU, resumed on the CPU: not used
        optional["rng.cuda"] = file.tensors["rng.cuda"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, param in enumerate(params):
        adam = {
            f"optim.{i}.step": ("F32", ()),
            f"optim.{i}.exp_avg": entry(param),
            f"optim.{i}.exp_avg_sq": entry(param),
        }
        present = [k for k in adam if k in file.tensors]
        if present and len(present) < len(adam):
            required |= adam  # partial: check_tensor_layout names the missing ones
        else:
            optional |= adam
    return required, optional


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _listed(items: list[str], *, sep: str = ", ", most: int = 8) -> str:
    """Items joined, at most ``most`` of them named: a hostile file stays a one-line message."""
    shown = sep.join(_short(item, 80) for item in items[:most])
    return shown if len(items) <= most else f"{shown}{sep}and {len(items) - most} more"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


AFU_GRID = (-6.0, 6.0, 1201)  # z grid of the AFU summaries and plot (paper Fig. 2c's range)


def afu_summary(model: MixedNetwork) -> dict[str, Any]:
    """How far each hidden layer's learned unit is from relu and from its start, on z in
    [-6, 6]: max |G(z) - relu(z)|, max |G(z) - G_0(z)| (G_0: pool.afu_init), per layer."""
    z = torch.linspace(*AFU_GRID, dtype=torch.float64)
    config = model.afu_config
    start = afu_init(config["units"], config["base"])
    g0 = afu_apply(z, *(start[k] for k in ("w0", "b0", "w1", "b1")), config["base"])
    from_relu, from_start = [], []
    with torch.no_grad():
        for unit in model.afus:
            params = (p.detach().cpu() for p in (unit.w0, unit.b0, unit.w1, unit.b1))
            g = afu_apply(z, *params, unit.base)  # on the CPU, where z is (a GPU run too)
            from_relu.append(float((g - F.relu(z)).abs().max()))
            from_start.append(float((g - g0).abs().max()))
    return {
        "grid": list(AFU_GRID),
        "max_abs_diff_from_relu": from_relu,
        "max_abs_diff_from_init": from_start,
    }


def _clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
