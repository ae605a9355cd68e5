"""contract/outputs.py's percentiles: the one definition the benches and the study share."""

from __future__ import annotations

import random
import statistics

import pytest

from smartmixed.contract.outputs import percentiles


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentiles([4.0, 1.0, 3.0, 2.0], (0, 50, 100)) == [1.0, 2.5, 4.0]
    assert percentiles([1.0, 2.0, 3.0, 4.0, 5.0], (25, 95)) == [2.0, pytest.approx(4.8)]
    assert percentiles([7.0], (5, 50, 99)) == [7.0, 7.0, 7.0]


def test_percentiles_are_statistics_inclusive_quantiles() -> None:
    rng = random.Random(0)
    values = [rng.expovariate(1.0) for _ in range(1001)]
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # cuts[k - 1]: the k-th
    assert percentiles(values, (1, 5, 50, 95, 99)) == pytest.approx(
        [cuts[0], cuts[4], cuts[49], cuts[94], cuts[98]], rel=1e-12
    )


def test_no_values_have_no_percentiles() -> None:
    with pytest.raises(ValueError, match="percentiles of no values"):
        percentiles([], (50,))
