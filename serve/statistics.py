"""Triton's statistics extension: per model version counts and durations. No FastAPI here.

One store per app, filled once for both protocols on the shared path:

- ``record_request``: admission, when a request is answered (success) or not (fail: refused
  by load shedding, a bad body, past its deadline, its client gone), with its duration from
  admission to answer;
- ``record_execution``: each ONNX Runtime run (``Service._unbatched``, the batcher's observer):
  ``execution_count``, ``inference_count`` (rows), ``batch_stats``, and for each request the run
  held its ``queue`` wait and the run's duration as its ``compute_infer``;
- ``record_input`` / ``record_output``: the protocol code's decode and encode of a request
  (``compute_input`` / ``compute_output``).

``Statistics.report`` answers with Triton's field names (``GET /v2/models/{m}/stats``, gRPC
ModelStatistics); ``metrics.py`` exports the same numbers as Triton's ``nv_*`` families.

Durations are integer nanoseconds as in Triton. Executions may be recorded from the inference
threads (``_unbatched``), the rest from the event loop: one lock keeps the sums whole.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

# Triton's InferStatistics durations, in its order (cache_hit/cache_miss stay 0: no cache)
REQUEST_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
CACHE_DURATIONS = ("cache_hit", "cache_miss")
BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    """Triton's StatisticDuration: how many, and their nanoseconds summed."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class VersionStatistics:
    """One model version's counts since it was loaded (kept across a reload of the version)."""

    name: str
    version: str
    last_inference: int = 0  # ms since the epoch of the last request answered or refused
    inference_count: int = 0  # rows run
    execution_count: int = 0  # ONNX Runtime runs: a merged batch is one
    durations: dict[str, Duration] = field(
        default_factory=lambda: {k: Duration() for k in REQUEST_DURATIONS}
    )
    # rows of one run -> its compute durations; compute_input/compute_output count the runs
    # with 0 ns: preparing a run's input is ONNX Runtime's, inside compute_infer, and decode
    # and encode are per request (inference_stats)
    batches: dict[int, Duration] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        stats = {k: d.as_dict() for k, d in self.durations.items()}
        stats.update({k: Duration().as_dict() for k in CACHE_DURATIONS})
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": stats,
            "batch_stats": [
                {
                    "batch_size": rows,
                    "compute_input": {"count": run.count, "ns": 0},
                    "compute_infer": run.as_dict(),
                    "compute_output": {"count": run.count, "ns": 0},
                }
                for rows, run in sorted(self.batches.items())
            ],
        }


class Statistics:
    """Per (model, version) statistics of the versions being served."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], VersionStatistics] = {}
        self._lock = threading.Lock()

    # ---- which versions are counted (serve/management.py, Service.start) --------------------

    def add(self, name: str, version: str) -> None:
        """Count NAME/VERSION (kept if already counted: a reloaded version goes on counting)."""
        self.versions.setdefault((name, version), VersionStatistics(name, version))

    def remove(self, name: str, version: str) -> None:
        self.versions.pop((name, version), None)

    # ---- recording: ``model`` is anything with ``name`` and ``version`` (a ModelVersion) ----

    def record_request(self, model, *, success: bool, duration_ns: int) -> None:
        """A request answered (success) or not, ``duration_ns`` after its admission."""
        stats = self.versions.get((model.name, model.version))
        if stats is None:  # unloaded while it ran
            return
        with self._lock:
            stats.durations["success" if success else "fail"].add(duration_ns)
            stats.last_inference = time.time_ns() // 1_000_000

    def record_input(self, model, started_ns: int) -> None:
        """The request's decode, begun at ``started_ns`` (perf_counter_ns), is done."""
        self._add(model, "compute_input", time.perf_counter_ns() - started_ns)

    def record_output(self, model, started_ns: int) -> None:
        """The answer's encode, begun at ``started_ns`` (perf_counter_ns), is done."""
        self._add(model, "compute_output", time.perf_counter_ns() - started_ns)

    def record_execution(self, model, *, rows: int, infer_ns: int, queue_ns: list[int]) -> None:
        """One run of ``rows`` rows that took ``infer_ns``, for requests that waited
        ``queue_ns`` each (one entry per request it held)."""
        stats = self.versions.get((model.name, model.version))
        if stats is None:
            return
        requests = len(queue_ns)
        with self._lock:
            stats.execution_count += 1
            stats.inference_count += rows
            stats.durations["queue"].add(sum(queue_ns), requests)
            stats.durations["compute_infer"].add(infer_ns * requests, requests)
            run = stats.batches.get(rows)
            if run is None:
                run = stats.batches[rows] = Duration()
            run.add(infer_ns)

    def _add(self, model, key: str, ns: int) -> None:
        stats = self.versions.get((model.name, model.version))
        if stats is not None:
            with self._lock:
                stats.durations[key].add(ns)

    # ---- reading ----------------------------------------------------------------------------

    def report(self, keys: list[tuple[str, str]]) -> dict[str, Any]:
        """{"model_stats": [...]} for the versions ``keys`` (Triton's ModelStatisticsResponse)."""
        with self._lock:
            return {
                "model_stats": [
                    self.versions.get(key, VersionStatistics(*key)).report() for key in keys
                ]
            }
