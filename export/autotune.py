"""`--lowering auto`: time the candidate lowerings on the target execution provider, keep the fastest."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from smartmixed.contract.sessions import make_session
from smartmixed.export.timing import time_session

# a single request, a dynamic batch, a bulk batch: folded's PRelu wins at 1 and loses from ~32
# on (issue G), so a choice on (1, 256) alone flipped between folded and folded_tanh
AUTO_BATCHES = (1, 32, 256)


def time_lowerings(
    candidates: dict[str, bytes],
    shape: int | Sequence[int],
    *,
    device: str = "cpu",
    threads: int | None = None,
    batches: tuple[int, ...] = AUTO_BATCHES,
    rounds: int = 5,
    repeats: int = 20,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """Median latency (ms) per candidate and batch size; rounds interleave the candidates.

    ``shape``: one sample's, without the batch (D for an MLP, e.g. (C, H, W) for images)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    sessions = {
        name: make_session(model, device=device, threads=threads)
        for name, model in candidates.items()
    }
    rng = np.random.default_rng(seed)
    inputs = {b: rng.uniform(0, 1, (b, *shape)).astype(np.float32) for b in batches}
    samples: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in sessions}
    for _ in range(rounds):
        for batch, x in inputs.items():
            for name, session in sessions.items():
                samples[name][batch] += time_session(session, x, repeats=repeats, warmup=2)
    return {n: {b: statistics.median(t) for b, t in per.items()} for n, per in samples.items()}


def pick_lowering(timings: dict[str, dict[int, float]]) -> tuple[str, dict[str, Any]]:
    """The candidate with the smallest geometric mean latency over the timed batch sizes."""

    def score(name: str) -> float:
        values = list(timings[name].values())
        return float(np.exp(np.mean(np.log(values))))

    best = min(timings, key=score)
    return best, {
        "chosen": best,
        "criterion": "geometric mean of the median latency over batch sizes",
        "median_ms": {n: {str(b): t for b, t in per.items()} for n, per in timings.items()},
        "score_ms": {n: score(n) for n in timings},
    }
