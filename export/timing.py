"""Timing an ONNX Runtime session, shared by lowering selection and the latency bench.

Sessions themselves come from smartmixed.contract.sessions.make_session, the one factory.
"""

from __future__ import annotations

import time

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
