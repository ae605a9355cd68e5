from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smartmixed.export.repository import export_run
from smartmixed.train.data import Dataset, load_dataset
from smartmixed.train.loop import TrainConfig, train_run


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits", seed=42)


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> Path:
    """A model repository with a mixed and a fixed model trained on digits (64 -> 10)."""
    runs = tmp_path_factory.mktemp("runs")
    models = tmp_path_factory.mktemp("models")
    for name, config in {
        "mixed": TrainConfig(arch=[64, 32, 16, 10], p1_epochs=3, p2_epochs=5, lr=3e-3),
        "relu": TrainConfig(arch=[64, 32, 10], mode="fixed:relu", epochs=6, lr=3e-3),
    }.items():
        train_run(config=config, dataset=digits, out=runs / name, progress=False)
        export_run(run_dir=runs / name, repository=models, lowering="permuted")
    return models
