"""`--lowering auto`: which lowering export writes, decided in one place.

``choose_lowering`` lowers the candidates, verifies every one before it may be chosen, and, when
more than one writes a different graph, times them on the target execution provider (their int8
graphs too, for an int8 export: what is deployed is what is timed) and keeps the fastest. Export
calls it for a run and for a module; the latency bench calls it to report what export picks.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from smartmixed.contract.sessions import make_session
from smartmixed.export.timing import time_session

AUTO = "auto"
# a single request, a dynamic batch, a bulk batch: folded's PRelu wins at 1 and loses from ~32
# on, so a choice on (1, 256) alone flipped between folded and folded_tanh
AUTO_BATCHES = (1, 32, 256)

Timings = dict[str, dict[int, float]]  # candidate -> batch size -> median latency (ms)


@dataclass(frozen=True)
class Timing:
    """Where and at what ``auto`` times the candidates: as the model will be served."""

    device: str = "cpu"
    threads: int | None = None  # intra-op threads; None: ONNX Runtime's default
    batches: tuple[int, ...] = AUTO_BATCHES
    seed: int = 0  # of the random inputs

    def record(self) -> dict[str, Any]:
        """What export.json's ``selection`` says about the timing."""
        return {"device": self.device, "threads": self.threads, "batches": list(self.batches)}


@dataclass(frozen=True)
class Choice:
    """The lowering ``choose_lowering`` keeps, every candidate's fp32 graph and verification
    report (none without a verifier), and export.json's ``selection``: the timings, or None
    when a single candidate was chosen untimed."""

    lowering: str
    models: dict[str, onnx.ModelProto]
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    selection: dict[str, Any] | None = None

    @property
    def model(self) -> onnx.ModelProto:
        return self.models[self.lowering]


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
) -> Timings:
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


def pick_lowering(timings: Timings) -> tuple[str, dict[str, Any]]:
    """The candidate with the smallest geometric mean latency over the timed batch sizes (the
    first listed on a tie)."""

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


def fastest(
    graphs: Mapping[str, bytes], shape: int | Sequence[int], timing: Timing
) -> tuple[str, dict[str, Any]]:
    """``pick_lowering`` of ``time_lowerings`` of ``graphs`` (name -> serialized ONNX model)."""
    timings = time_lowerings(
        dict(graphs),
        shape,
        device=timing.device,
        threads=timing.threads,
        batches=timing.batches,
        seed=timing.seed,
    )
    return pick_lowering(timings)


def choose_lowering(
    requested: str,
    distinct: Sequence[str],
    lower: Callable[[str], onnx.ModelProto],
    *,
    shape: int | Sequence[int],
    verify: Callable[..., dict[str, Any]] | None = None,
    timing: Timing = Timing(),
    int8: Callable[[str], onnx.ModelProto] | None = None,
) -> Choice:
    """The lowering to write: ``requested`` itself, or for ``auto`` the fastest of ``distinct``,
    the lowerings that write different graphs for this model (``lower.distinct_lowerings`` for
    an MLP, ``module.module_lowerings`` for a module).

    Each candidate is lowered (``lower(name)``) and verified (``verify(model, lowering=name)``,
    which raises on a mismatch) before it may be chosen. A single candidate is chosen untimed.
    Several are timed as ``timing`` says and the smallest geometric mean latency wins
    (``pick_lowering``); with ``int8`` (name -> that candidate's int8 graph), the int8 graphs
    are timed too and decide, and the fp32 timings stay in the selection under "fp32".
    """
    names = tuple(distinct) if requested == AUTO else (requested,)
    models = {name: lower(name) for name in names}
    reports = {}
    if verify is not None:
        reports = {name: verify(model, lowering=name) for name, model in models.items()}
    if len(names) == 1:
        return Choice(names[0], models, reports)
    chosen, selection = fastest(
        {name: model.SerializeToString() for name, model in models.items()}, shape, timing
    )
    selection |= timing.record()
    if int8 is not None:
        chosen, quantized = fastest(
            {name: int8(name).SerializeToString() for name in names}, shape, timing
        )
        selection = quantized | timing.record() | {"precision": "int8", "fp32": selection}
    return Choice(chosen, models, reports, selection)
