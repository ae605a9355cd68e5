"""The pool of candidate activations: one name per activation, used everywhere.

Each entry pairs the activation f(z) with its vector-Jacobian product g * f'(z), written with the
fused backward kernels that autograd itself uses. They let the phase-1 layer (model.py) run its
backward pass from the saved pre-activation z alone, without keeping a (batch x neurons x |pool|)
tensor alive.

``afu`` is the one learned entry: G(z) = sum_i w1_i psi(w0_i z + b0_i) + b1, whose
parameters the networks hold (model.AFUnit); here are its formula, derivative and documented
initialisation, and its registry entry is the unit at that initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

# The names, their order and the constants are the stages' contract (export/lower.py writes the
# same constants into ONNX nodes); re-exported here.
from smartmixed.contract import (  # noqa: F401
    ACTIVATION_NAMES,
    AFU,
    AFU_BASES,
    AFU_DEFAULTS,
    DEFAULT_POOL,
    ELU_ALPHA,
    EXTRA_ACTIVATIONS,
    LEAKY_RELU_SLOPE,
    SELU_ALPHA,
    SELU_SCALE,
    SOFTPLUS_THRESHOLD,
    PoolError,
    parse_pool,
)


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[Tensor], Tensor]
    vjp: Callable[[Tensor, Tensor], Tensor]  # (grad_out, z) -> grad_out * f'(z), elementwise
    description: str
    # f as a linear combination of other pool activations, f = sum_b c_b f_b, when one exists:
    # sums of g * f(z) over a batch then follow from those of the basis (model.py, phase-1
    # backward), and the slow f itself need not be evaluated there.
    combination: dict[str, float] | None = None


aten = torch.ops.aten  # fused backward kernels: one op per vjp, as autograd itself uses


def _softsign_vjp(g: Tensor, z: Tensor) -> Tensor:
    d = 1 + z.abs()
    return g / (d * d)


# --------------------------------------------------------------------------------------------
# The learned activation unit: G(z) = sum_i w1_i psi(w0_i z + b0_i) + b1, elementwise
#
# Its parameters belong to the network (model.AFUnit holds them per hidden layer); these are the
# pure functions of (z, parameters) that the networks, the plots and the tests share.

AFU_INIT_SPREAD = 3.0  # spare units' breakpoints -b0/w0 spread over [-3, 3]


def afu_init(units: int, base: str = "relu") -> dict[str, Tensor]:
    """The documented, deterministic initial parameters (float32): G starts as psi exactly.

    Unit 0 carries psi: w0 = 1, b0 = 0, w1 = 1. The other units are spares with w1 = 0 (so
    G(z) = psi(z) exactly, for every base), each with its own breakpoint: w0_i = +1, -1, +1, ...
    and b0_i evenly spread so that -b0_i / w0_i covers [-3, 3]. No two units have the same
    (w0, b0, w1), so their gradients differ from the first step on and they do not stay
    identical (with identical units every unit would get the same update forever). A spare's
    first gradient is dL/dw1_i = sum g psi(w0_i z + b0_i), nonzero; its w0, b0 start learning
    once its w1 has moved. No random numbers: the initial curve can be recomputed from
    model.json's ``afu`` alone (the plots do).
    """
    if base not in AFU_BASES:
        raise PoolError(f"AFU base {base!r}: expected one of {', '.join(AFU_BASES)}")
    w0 = torch.ones(units)
    b0 = torch.zeros(units)
    w1 = torch.zeros(units)
    w1[0] = 1.0
    spares = units - 1
    if spares:
        w0[1:] = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(spares)])
        # breakpoints -b0/w0 at the midpoints of `spares` equal cells of [-3, 3]
        points = -AFU_INIT_SPREAD + (2 * AFU_INIT_SPREAD) * (torch.arange(spares) + 0.5) / spares
        b0[1:] = -points * w0[1:]
    return {"w0": w0, "b0": b0, "w1": w1, "b1": torch.zeros(1)}


def afu_apply(z: Tensor, w0: Tensor, b0: Tensor, w1: Tensor, b1: Tensor, base: str) -> Tensor:
    """G(z) for z of any shape, units on a new leading axis (the ONNX lowering's layout):
    u = w0 (x) z + b0 (N, *z.shape), then w1 . psi(u) + b1 contracted over the units. The
    leading axis keeps every elementwise op over contiguous rows of z (a trailing axis of size
    N made ONNX Runtime's broadcasting ~10x slower, measured); the (N, ...) intermediate is the
    unit's cost."""
    psi = ACTIVATIONS[base].fn
    w0, b0, w1, b1 = (t.to(z.dtype) for t in (w0, b0, w1, b1))
    units = (-1,) + (1,) * z.dim()  # w0, b0 as (N, 1, ..., 1)
    u = z.unsqueeze(0) * w0.view(units) + b0.view(units)
    return torch.tensordot(w1, psi(u), dims=1) + b1


def afu_derivative(z: Tensor, w0: Tensor, b0: Tensor, w1: Tensor, base: str) -> Tensor:
    """dG/dz = sum_i w1_i w0_i psi'(w0_i z + b0_i), elementwise, same shape as z."""
    w0, b0, w1 = (t.to(z.dtype) for t in (w0, b0, w1))
    units = (-1,) + (1,) * z.dim()
    u = z.unsqueeze(0) * w0.view(units) + b0.view(units)
    return torch.tensordot(w1 * w0, ACTIVATIONS[base].vjp(torch.ones_like(u), u), dims=1)


def afu_activation(params: dict[str, Tensor], base: str) -> Activation:
    """The AFU with ``params`` as a pool entry: fn = G, vjp = g * G'(z). Autograd reaches the
    parameters through fn where it runs with grad enabled (relaxed phase 1, phase 2)."""
    w0, b0, w1, b1 = (params[k] for k in ("w0", "b0", "w1", "b1"))
    return Activation(
        AFU,
        lambda z: afu_apply(z, w0, b0, w1, b1, base),
        lambda g, z: g * afu_derivative(z, w0, b0, w1, base),
        f"sum_i w1_i {base}(w0_i z + b0_i) + b1 (learned)",
    )


# One entry per contract.ACTIVATION_NAMES, in that order (tests/test_contract.py).
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", F.relu, lambda g, z: aten.threshold_backward(g, z, 0.0), "max(0, z)"),
        Activation(
            "sigmoid",
            torch.sigmoid,
            lambda g, z: aten.sigmoid_backward(g, torch.sigmoid(z)),
            "1 / (1 + exp(-z))",
        ),
        Activation(
            "tanh", torch.tanh, lambda g, z: aten.tanh_backward(g, torch.tanh(z)), "tanh(z)"
        ),
        Activation(
            "leaky_relu",
            lambda z: F.leaky_relu(z, LEAKY_RELU_SLOPE),
            lambda g, z: aten.leaky_relu_backward(g, z, LEAKY_RELU_SLOPE, False),
            f"z if z > 0 else {LEAKY_RELU_SLOPE} z",
            # leaky_relu(z) = (1 - slope) relu(z) + slope z
            {"relu": 1 - LEAKY_RELU_SLOPE, "identity": LEAKY_RELU_SLOPE},
        ),
        Activation(
            "elu",
            lambda z: F.elu(z, ELU_ALPHA),
            lambda g, z: aten.elu_backward(g, ELU_ALPHA, 1.0, 1.0, False, z),
            f"z if z > 0 else {ELU_ALPHA} (exp(z) - 1)",
        ),
        Activation(
            "selu",
            F.selu,
            lambda g, z: aten.elu_backward(g, SELU_ALPHA, SELU_SCALE, 1.0, False, z),
            "scale * (z if z > 0 else alpha (exp(z) - 1))",
            # selu(z) = scale (alpha elu_1(z) + (1 - alpha) relu(z)), elu_1 = elu with alpha 1
            {"elu": SELU_SCALE * SELU_ALPHA, "relu": SELU_SCALE * (1 - SELU_ALPHA)}
            if ELU_ALPHA == 1.0
            else None,
        ),
        # Extras, selectable with --pool.
        Activation(
            "gelu", F.gelu, lambda g, z: aten.gelu_backward(g, z), "z * Phi(z) (exact, erf)"
        ),
        Activation("silu", F.silu, lambda g, z: aten.silu_backward(g, z), "z * sigmoid(z)"),
        Activation(
            "softplus",
            F.softplus,
            lambda g, z: aten.softplus_backward(g, z, 1.0, SOFTPLUS_THRESHOLD),
            "log(1 + exp(z))",
        ),
        Activation("mish", F.mish, lambda g, z: aten.mish_backward(g, z), "z * tanh(softplus(z))"),
        Activation("softsign", F.softsign, _softsign_vjp, "z / (1 + |z|)"),
        Activation("identity", lambda z: z, lambda g, z: g, "z"),
    )
}
# afu's registry entry is the unit at its initialisation (= relu exactly); networks replace it
# with each layer's learned unit (model.AFUnit.activation()).
ACTIVATIONS[AFU] = afu_activation(
    afu_init(AFU_DEFAULTS["units"], AFU_DEFAULTS["base"]), AFU_DEFAULTS["base"]
)


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise PoolError(
            f"unknown activation {name!r}; expected one of: {', '.join(ACTIVATIONS)}"
        ) from None


def batch_sum_basis(pool: Sequence[str]) -> tuple[tuple[Activation, ...], Tensor]:
    """Activations B and a (|pool|, |B|) matrix C with f_k = sum_b C[k, b] f_b for every k.

    Used for the phase-1 logit gradient sum_b g f_k(z): computing it for B only and mixing with C
    evaluates fewer (and cheaper) functions than the pool itself.
    """
    names: list[str] = []
    for name in pool:
        for part in get_activation(name).combination or {name: 1.0}:
            if part not in names:
                names.append(part)
    matrix = torch.zeros(len(pool), len(names), dtype=torch.float64)
    for k, name in enumerate(pool):
        for part, coefficient in (get_activation(name).combination or {name: 1.0}).items():
            matrix[k, names.index(part)] = coefficient
    return tuple(get_activation(n) for n in names), matrix


# --------------------------------------------------------------------------------------------
# Candidate standardisation (docs/method.md, "Why the mix was worse than ReLU")
#
# The straight-through logit gradient of candidate k is sum_b g_b f_k(z_b): it rewards the
# candidate whose output has the largest component along the loss gradient, and that grows with
# the candidate's output scale and offset (selu's lambda and its -1.76 floor) rather than with how
# good the candidate is. Standardised candidates (f_k(z) - mu_k) / sd_k, with mu_k and sd_k the
# mean and standard deviation of f_k(g) for g ~ N(0, 1), compete on shape alone. The map is affine
# after the activation, so a frozen network folds it into the next layer's weights and bias.

STANDARD_GRID = 400_001  # points of the quadrature over [-12, 12]; moments exact to ~1e-9


@cache
def standard_moments(name: str) -> tuple[float, float]:
    """(mu, sd) of f(g) for g ~ N(0, 1): trapezoid quadrature in float64, deterministic."""
    act = get_activation(name)
    z = torch.linspace(-12.0, 12.0, STANDARD_GRID, dtype=torch.float64)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    values = act.fn(z)
    mean = torch.trapezoid(values * density, z)
    var = torch.trapezoid((values - mean) ** 2 * density, z)
    return float(mean), float(var.sqrt())
