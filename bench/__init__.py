"""smartmixed.bench: what the activation mix costs (training steps, ONNX Runtime latency, HTTP)."""

from __future__ import annotations

from collections.abc import Iterable


class BenchError(ValueError):
    """A bench option that cannot be used; the CLI prints it and exits with status 2."""


def parse_positive_ints(text: str | Iterable[int], what: str) -> list[int]:
    """'1,32,256' (or integers) -> sorted unique list of integers >= 1."""
    try:
        values = (
            [int(v) for v in text.split(",") if v.strip()]
            if isinstance(text, str)
            else [int(v) for v in text]
        )
    except ValueError:
        raise BenchError(f"{what} {text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise BenchError(f"{what} must be one or more integers >= 1 (got {text!r})")
    return sorted(set(values))
