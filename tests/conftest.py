from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from smartmixed.export.repository import export_run
from smartmixed.train.data import IDX_FILES, Dataset, load_dataset
from smartmixed.train.loop import TrainConfig, train_run

# The suite's servers, in process (create_app) and started as processes (which inherit this
# environment), run without the gRPC endpoint unless a test asks for it (--grpc-port): its
# default port, 8001, is one for the whole machine, and tests run side by side.
os.environ.setdefault("SMARTMIXED_GRPC_PORT", "0")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits", seed=42)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> Path:
    """runs/tiny: a SmartMixed run on digits, 64 -> 12 -> 10, one epoch per phase (seconds)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = TrainConfig(arch=[64, 12, 10], p1_epochs=1, p2_epochs=1, lr=3e-3)
    train_run(config=config, dataset=digits, out=out, progress=False)
    return out


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


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    codes = {np.dtype("uint8"): 0x08, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist_like(
    folder: Path, *, n_train: int = 200, n_test: int = 50, gz: bool = False
) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(folder / IDX_FILES[f"{split}_images"], images, gz=gz)
        write_idx(folder / IDX_FILES[f"{split}_labels"], labels, gz=gz)


@pytest.fixture
def idx_file():
    """write_idx(path, array, gz=False): one IDX file (MNIST's format)."""
    return write_idx


@pytest.fixture
def mnist_like():
    """write_mnist_like(folder, n_train=200, n_test=50, gz=False): the four MNIST IDX files of
    random 28x28 images, labels 0-9 in turn."""
    return write_mnist_like
