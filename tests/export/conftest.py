"""The export tests time nothing: auto's timer (autotune.time_lowerings) is a fixed one, so its
choices are known in advance; modules that set REAL_TIMING = True (the slow set) time for real.
One trained run serves the tests that export a run and leave it as it is."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from smartmixed.export import autotune
from smartmixed.train.data import Dataset
from smartmixed.train.loop import TrainConfig, train_run

# candidate -> its latency (ms) at batch 1; batch b takes (1 + b / 64) times that. The lowerings'
# order is the inverse of LOWERINGS', the int8 granularities' per tensor first.
FIXED_MS = {
    "folded_tanh": 1.0,
    "folded": 1.1,
    "grouped": 1.2,
    "permuted": 1.3,
    "scatter": 2.0,
    "fp32": 1.0,
    "per_tensor": 0.5,
    "per_channel": 0.6,
}


def fixed_timer(
    candidates: dict[str, bytes],
    shape: int | Sequence[int],
    *,
    batches: tuple[int, ...] = autotune.AUTO_BATCHES,
    **_: object,
) -> autotune.Timings:
    """time_lowerings' answer, from FIXED_MS instead of ONNX Runtime."""
    return {name: {b: FIXED_MS[name] * (1 + b / 64) for b in batches} for name in candidates}


@pytest.fixture(autouse=True, scope="module")
def _fixed_timer(request: pytest.FixtureRequest) -> Iterator[None]:
    if getattr(request.module, "REAL_TIMING", False):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autotune, "time_lowerings", fixed_timer)
        yield


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> Path:
    """runs/digits-mixed: SmartMixed on digits, 64 -> 40 -> 24 -> 10, 3 + 4 epochs (read only:
    a test that damages a run copies it first)."""
    out = tmp_path_factory.mktemp("runs") / "digits-mixed"
    config = TrainConfig(arch=[64, 40, 24, 10], p1_epochs=3, p2_epochs=4, lr=3e-3)
    train_run(config=config, dataset=digits, out=out, progress=False)
    return out
