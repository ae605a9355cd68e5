from __future__ import annotations

import pytest
import torch

from smartmixed.train.data import Dataset, load_dataset


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits", seed=42)
