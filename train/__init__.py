"""smartmixed.train: SmartMixed two-phase training, fixed baselines, data and run artifacts."""

from smartmixed.train.artifacts import ArtifactError, load_model, load_spec
from smartmixed.train.data import DataError, Dataset, load_dataset
from smartmixed.train.loop import TrainConfig, TrainError, train_run
from smartmixed.train.model import PRESETS, MixedMLP, ModelSpec, SelectiveMLP, SpecError
from smartmixed.train.pool import ACTIVATIONS, DEFAULT_POOL, EXTRA_ACTIVATIONS, PoolError

__all__ = [
    "ACTIVATIONS", "DEFAULT_POOL", "EXTRA_ACTIVATIONS", "PRESETS", "ArtifactError", "DataError",
    "Dataset", "MixedMLP", "ModelSpec", "PoolError", "SelectiveMLP", "SpecError", "TrainConfig",
    "TrainError", "load_dataset", "load_model", "load_spec", "train_run",
]  # fmt: skip
