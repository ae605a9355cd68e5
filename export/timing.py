"""Timing ONNX Runtime sessions, shared by lowering selection and the latency bench.

Sessions themselves come from smartmixed.contract.sessions.make_session, the one factory.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort


def time_session(
    session: ort.InferenceSession, x: np.ndarray, *, repeats: int, warmup: int = 5
) -> list[float]:
    """Latency in ms of ``repeats`` runs on input ``x`` after ``warmup`` untimed runs."""
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def percentiles(times_ms: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 in ms (inclusive quantiles)."""
    q = statistics.quantiles(times_ms, n=100, method="inclusive")
    return {"p50_ms": statistics.median(times_ms), "p95_ms": q[94], "p99_ms": q[98]}
