"""ONNX Runtime sessions and timing, shared by verification, lowering selection and the bench."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

OPTIMIZATION_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ProviderError(RuntimeError):
    """An execution provider that was asked for but is not active."""


def make_session(
    model: bytes,
    *,
    device: str = "cpu",
    optimization: str = "all",
    threads: int | None = None,
    optimized_model_path: str | None = None,
) -> ort.InferenceSession:
    """One session on ``device`` (cpu | cuda); CUDA must really be active, never a silent CPU."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    provider = PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise ProviderError(
            f"{provider} is not available in this onnxruntime build "
            f"(available: {', '.join(ort.get_available_providers())}); "
            "for CUDA install the gpu extra (onnxruntime-gpu)"
        )
    providers = [provider] if device == "cpu" else [provider, "CPUExecutionProvider"]
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    if session.get_providers()[0] != provider:
        raise ProviderError(
            f"{provider} was asked for but the session runs on {session.get_providers()}"
        )
    return session


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
