"""The pool of candidate activations: one name per activation, used everywhere.

Each entry pairs the activation f(z) with its vector-Jacobian product g * f'(z), written with the
fused backward kernels that autograd itself uses. They let the phase-1 layer (model.py) run its
backward pass from the saved pre-activation z alone, without keeping a (batch x neurons x |pool|)
tensor alive (issue A).
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
# Candidate standardisation (issue E)
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
