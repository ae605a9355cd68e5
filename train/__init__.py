"""smartmixed.train: SmartMixed two-phase training, fixed baselines, data and run artifacts.

The exports are lazy (PEP 562): ``import smartmixed.train.<module>`` from export/ or bench/ runs
this file, and an eager import here would load torch, scikit-learn and safetensors with it.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it (a train/ module, or a full path)
_EXPORTS: dict[str, str] = {
    "ArtifactError": "artifacts",
    "load_model": "artifacts",
    "load_spec": "artifacts",
    "DataError": "data",
    "Dataset": "data",
    "load_dataset": "data",
    "TrainConfig": "loop",
    "TrainError": "loop",
    "train_run": "loop",
    "PRESETS": "model",
    "MixedConvNet": "model",
    "MixedMLP": "model",
    "ModelSpec": "model",
    "SelectiveConvNet": "model",
    "SelectiveMLP": "model",
    "SpecError": "model",
    "ACTIVATIONS": "smartmixed.nn.pool",
    "DEFAULT_POOL": "smartmixed.nn.pool",
    "EXTRA_ACTIVATIONS": "smartmixed.nn.pool",
    "PoolError": "smartmixed.nn.pool",
}

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_POOL",
    "EXTRA_ACTIVATIONS",
    "PRESETS",
    "ArtifactError",
    "DataError",
    "Dataset",
    "MixedConvNet",
    "MixedMLP",
    "ModelSpec",
    "PoolError",
    "SelectiveConvNet",
    "SelectiveMLP",
    "SpecError",
    "TrainConfig",
    "TrainError",
    "load_dataset",
    "load_model",
    "load_spec",
    "train_run",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    path = module if "." in module else f"{__name__}.{module}"
    value = getattr(importlib.import_module(path), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
