from __future__ import annotations

import pytest
import torch

from smartmixed.nn.pool import (
    ACTIVATIONS,
    DEFAULT_POOL,
    EXTRA_ACTIVATIONS,
    PoolError,
    batch_sum_basis,
    parse_pool,
)


def test_default_pool_is_the_papers_in_order() -> None:
    assert DEFAULT_POOL == ("relu", "sigmoid", "tanh", "leaky_relu", "elu", "selu")
    assert EXTRA_ACTIVATIONS == ("gelu", "silu", "softplus", "mish", "softsign", "identity", "afu")
    assert parse_pool(None) == DEFAULT_POOL


def test_parse_pool_rejects_unknown_duplicate_and_empty() -> None:
    assert parse_pool("relu, gelu") == ("relu", "gelu")
    with pytest.raises(PoolError, match="unknown activation 'swish'"):
        parse_pool("relu,swish")
    with pytest.raises(PoolError, match="relu more than once"):
        parse_pool("relu,tanh,relu")
    with pytest.raises(PoolError, match="empty"):
        parse_pool(" , ")


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_vjp_matches_autograd(name: str) -> None:
    act = ACTIVATIONS[name]
    z = torch.cat([torch.randn(500) * 4, torch.tensor([0.0, 25.0, -25.0, 1e-3])]).double()
    z.requires_grad_(True)
    g = torch.randn_like(z)
    (expected,) = torch.autograd.grad(act.fn(z), z, g)
    torch.testing.assert_close(act.vjp(g, z.detach()), expected)


def test_leaky_and_elu_constants() -> None:
    z = torch.tensor([-2.0, 3.0])
    assert torch.allclose(ACTIVATIONS["leaky_relu"].fn(z), torch.tensor([-0.02, 3.0]))
    assert torch.allclose(
        ACTIVATIONS["elu"].fn(z), torch.tensor([torch.expm1(torch.tensor(-2.0)), 3.0])
    )


@pytest.mark.parametrize("pool", [DEFAULT_POOL, tuple(ACTIVATIONS), ("selu", "gelu")])
def test_batch_sum_basis_reproduces_every_activation(pool: tuple[str, ...]) -> None:
    basis, mix = batch_sum_basis(pool)
    z = torch.linspace(-8, 8, 1001).double()
    stacked = torch.stack([b.fn(z) for b in basis])
    mixed = mix.double() @ stacked
    for k, name in enumerate(pool):
        torch.testing.assert_close(mixed[k], ACTIVATIONS[name].fn(z), atol=1e-12, rtol=1e-9)
