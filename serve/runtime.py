"""ONNX Runtime sessions over a model repository, and dynamic batching. No FastAPI here.

serve/ needs only onnxruntime and what export wrote into each model.onnx (metadata_props); it
never imports train/ or export/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

log = logging.getLogger("smartmixed.serve")

MODEL_FILE = "model.onnx"
INPUT = "input"


class ServeError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ServeError):
    status = 400


class NotFound(ServeError):
    status = 404


class NotReady(ServeError):
    status = 503


class LoadError(RuntimeError):
    """A repository entry, or the requested device, that cannot be loaded."""


@dataclass
class ModelVersion:
    """One loaded model version: its session and what its metadata says."""

    name: str
    version: str
    path: Path
    session: ort.InferenceSession
    n_features: int
    n_classes: int
    outputs: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def labels(self) -> list[str]:
        spec = self.metadata.get("spec") or {}
        return list(spec.get("labels") or [str(i) for i in range(self.n_classes)])

    def predict(self, x: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """x: (N, D) float32 raw features -> {output name: (N, C) float32}."""
        names = outputs or self.outputs
        return dict(zip(names, self.session.run(names, {INPUT: x}), strict=True))

    def describe(self) -> dict[str, Any]:
        """The smartmixed part of the model metadata (architecture, mix, lowering, checks)."""
        spec = self.metadata.get("spec") or {}
        counts = [
            {a: layer.count(a) for a in spec.get("pool", []) if layer.count(a)}
            for layer in spec.get("assignment", [])
        ]
        verification = self.metadata.get("verification") or {}
        return {
            "architecture": spec.get("arch"),
            "mode": spec.get("mode"),
            "pool": spec.get("pool"),
            "activation_mix": counts,
            "labels": self.labels,
            "preprocessing": spec.get("preprocessing"),
            "lowering": self.metadata.get("lowering"),
            "verification": {
                "passed": verification.get("passed"),
                "tolerance": verification.get("tolerance"),
                "results": verification.get("results"),
            },
            "test_metrics": {
                k: v for k, v in (spec.get("metrics") or {}).items() if k.startswith("test")
            },
            "execution_providers": self.providers,
        }


def _providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise LoadError(
            "--device cuda: CUDAExecutionProvider is not in this onnxruntime build "
            f"(available: {', '.join(available)}); install the gpu extra (onnxruntime-gpu)"
        )
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_version(name: str, version_dir: Path, *, device: str, threads: int | None) -> ModelVersion:
    path = version_dir / MODEL_FILE
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as e:
        raise LoadError(f"{name}/{version_dir.name}: cannot read {path} ({e})") from None
    metadata = {}
    for prop in proto.metadata_props:
        if prop.key.startswith("smartmixed."):
            try:
                metadata[prop.key.removeprefix("smartmixed.")] = json.loads(prop.value)
            except json.JSONDecodeError:
                metadata[prop.key.removeprefix("smartmixed.")] = prop.value
    if "spec" not in metadata:
        raise LoadError(f"{name}/{version_dir.name}: {path} has no smartmixed.spec metadata")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), sess_options=options, providers=_providers_for(device)
        )
    except (RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail) as e:
        raise LoadError(
            f"{name}/{version_dir.name}: ONNX Runtime cannot load {path} ({e})"
        ) from None
    active = session.get_providers()
    if device == "cuda" and active[0] != "CUDAExecutionProvider":
        raise LoadError(
            f"{name}/{version_dir.name}: --device cuda, but the session runs on {active} "
            "(CUDA libraries or the GPU not usable)"
        )
    if device == "auto" and active[0] != "CUDAExecutionProvider":
        log.warning(
            "%s/%s: device auto: CUDA not usable, serving on %s", name, version_dir.name, active
        )
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT] or len(inputs[0].shape) != 2:
        raise LoadError(f"{name}/{version_dir.name}: expected one input 'input' [batch, D]")
    outputs = [o.name for o in session.get_outputs()]
    return ModelVersion(
        name=name, version=version_dir.name, path=path, session=session,
        n_features=int(inputs[0].shape[1]), n_classes=int(session.get_outputs()[0].shape[1]),
        outputs=outputs, metadata=metadata,
    )  # fmt: skip


@dataclass
class Repository:
    root: Path
    models: dict[str, dict[str, ModelVersion]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why it is not ready

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        if name in self.failed and name not in self.models:
            raise NotReady(f"model {name!r} is not ready: {self.failed[name]}")
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"unknown model {name!r}")
        if version is None:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version!r} (has {', '.join(versions)})")
        return versions[version]

    def names(self) -> list[str]:
        return sorted({*self.models, *self.failed})


def load_repository(
    root: Path, *, device: str, threads: int | None, skip_bad_models: bool
) -> Repository:
    """Load every models/NAME/VERSION/model.onnx; a bad entry stops startup unless skipped."""
    if not root.is_dir():
        raise LoadError(f"model repository {root} is not a directory")
    repo = Repository(root=root)
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = sorted(
            (p for p in entry.iterdir() if p.is_dir() and p.name.isdigit()),
            key=lambda p: int(p.name),
        )
        if not versions:
            problem = f"{entry}: no numbered version folder with {MODEL_FILE}"
            if not skip_bad_models:
                raise LoadError(problem)
            repo.failed[entry.name] = problem
            continue
        for version_dir in versions:
            try:
                loaded = load_version(entry.name, version_dir, device=device, threads=threads)
            except LoadError as e:
                if not skip_bad_models or (device == "cuda" and "CUDA" in str(e)):
                    raise
                log.error("not serving %s: %s", entry.name, e)
                repo.failed[entry.name] = str(e)
                continue
            repo.models.setdefault(entry.name, {})[version_dir.name] = loaded
    if not repo.models and not repo.failed:
        raise LoadError(
            f"model repository {root} holds no model (expected NAME/VERSION/{MODEL_FILE})"
        )
    return repo


# --------------------------------------------------------------------------------------------
# Dynamic batching


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float


class AdaptiveBatcher:
    """Merges concurrent predict calls for one model version into one run, then splits it back.

    Two knobs: ``max_batch_size`` rows and ``max_delay`` seconds. The queue and its worker task
    are created inside the running loop on first use. The worker takes every request already
    queued; it waits (up to max_delay) for more only when the previous run held several requests,
    so a lone client never pays the delay. Each caller gets exactly its own rows back.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], dict[str, np.ndarray]],
        *,
        max_batch_size: int,
        max_delay: float,
        executor: Executor,
        observe: Callable[[int, list[float], float], None] | None = None,
    ) -> None:
        self._predict, self._executor, self._observe = predict, executor, observe
        self.max_batch_size, self.max_delay = max_batch_size, max_delay
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Pending | None = None
        self._last_requests = 1

    async def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(x, future, time.perf_counter()))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, rows = [first], len(first.x)
        deadline = time.perf_counter() + (self.max_delay if self._last_requests > 1 else 0.0)
        while rows < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if rows + len(item.x) > self.max_batch_size:
                self._carry = item  # first of the next batch
                break
            batch.append(item)
            rows += len(item.x)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [p for p in batch if not p.future.done()]  # a caller may have gone
            if not live:
                continue
            self._last_requests = len(live)
            started = time.perf_counter()
            x = live[0].x if len(live) == 1 else np.concatenate([p.x for p in live])
            try:
                result = await loop.run_in_executor(self._executor, self._predict, x)
            except Exception as e:  # the model failed: every caller hears about it
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            if self._observe is not None:  # rows, queue waits, inference seconds
                self._observe(
                    len(x), [started - p.enqueued for p in live], time.perf_counter() - started
                )
            start = 0
            for p in live:
                stop = start + len(p.x)
                if not p.future.done():
                    p.future.set_result({k: v[start:stop] for k, v in result.items()})
                start = stop
