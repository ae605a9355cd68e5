"""The one ONNX Runtime session factory: export (verification, `--lowering auto`), serve and the
latency bench all create their sessions here.

One CUDA rule for every stage:
- ``cpu``: CPUExecutionProvider only.
- ``cuda``: CUDAExecutionProvider must be in this onnxruntime build and active in the created
  session (ORT falls back to CPU silently when the CUDA libraries or the GPU are unusable), else
  a ProviderError says which of the two failed. Never a silent CPU.
- ``auto``: CUDA when it really works, else CPU with a logged warning.

Imports onnxruntime and the standard library only: serve/ uses it without torch or export/.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import onnxruntime as ort

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
Device = Literal["cpu", "cuda", "auto"]
DEVICES: tuple[Device, ...] = ("cpu", "cuda", "auto")
OPTIMIZATION_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class SessionError(RuntimeError):
    """A session that cannot be created (the base of the two errors below)."""


class ProviderError(SessionError):
    """The execution provider asked for cannot be used; the subclass says why."""


class ProviderNotInBuild(ProviderError):
    """CUDA asked for, but this onnxruntime build has no CUDAExecutionProvider."""


class ProviderNotActive(ProviderError):
    """CUDA asked for and built in, but the created session does not run on it."""

    def __init__(self, message: str, *, active: list[str]) -> None:
        super().__init__(message)
        self.active = active  # the session's providers, highest priority first


class ModelLoadError(SessionError):
    """ONNX Runtime refused the model (not ONNX, an invalid graph, an unknown op, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"ONNX Runtime cannot load the model ({reason})")
        self.reason = reason  # ORT's message on one line


def make_session(
    model: bytes | str | Path,
    *,
    device: Device = "cpu",
    threads: int | None = None,
    optimization: Literal["basic", "all"] = "all",
    optimized_model_path: str | Path | None = None,
    name: str = "session",
) -> ort.InferenceSession:
    """An InferenceSession for ``model`` (serialized bytes or a file path) on ``device`` under
    the module's CUDA rule.

    ``threads``: intra-op threads (default ORT's: all cores); ``optimization``: a key of
    OPTIMIZATION_LEVELS; ``optimized_model_path``: where ORT writes the optimized graph;
    ``name`` names the session in the ``auto`` fallback warning (e.g. "mixed/1").
    Raises ProviderNotInBuild / ProviderNotActive (ProviderError) or ModelLoadError.
    """
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
        # inter-op threads only run independent nodes in ORT_PARALLEL mode: pinned to 1 so that
        # ``threads`` is the session's whole budget
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)

    available = ort.get_available_providers()
    built_in = CUDA in available
    if device == "cuda" and not built_in:
        raise ProviderNotInBuild(
            f"{CUDA} is not in this onnxruntime build (available: {', '.join(available)}); "
            "install the gpu extra (onnxruntime-gpu)"
        )
    wants_cuda = device == "cuda" or (device == "auto" and built_in)
    providers = [CUDA, CPU] if wants_cuda else [CPU]
    source = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as e:  # ORT's errors (InvalidGraph, Fail, ...) share no narrower base
        raise ModelLoadError(" ".join(str(e).split())) from None

    active = session.get_providers()
    on_cuda = active[0] == CUDA
    if device == "cuda" and not on_cuda:
        raise ProviderNotActive(
            f"{CUDA} is in this build but the session runs on {active} "
            "(CUDA libraries or the GPU not usable)",
            active=active,
        )
    if device == "auto" and not on_cuda:
        why = "CUDA libraries or the GPU not usable" if built_in else f"no {CUDA} in this build"
        log.warning("%s: device auto: %s, running on %s", name, why, active)
    return session
