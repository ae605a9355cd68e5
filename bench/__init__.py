"""smartmixed.bench: what the activation mix costs (training steps, ONNX Runtime latency, HTTP)."""

from __future__ import annotations

from collections.abc import Iterable

from smartmixed import contract


class BenchError(ValueError):
    """A bench option that cannot be used; the CLI prints it and exits with status 2."""


def parse_positive_ints(text: str | Iterable[int], what: str) -> list[int]:
    """contract.parse_positive_ints, its error a BenchError."""
    try:
        return contract.parse_positive_ints(text, what)
    except ValueError as e:
        raise BenchError(str(e)) from None
