"""Phase-1 time of bilevel selection against joint selection, interleaved rounds, one thread.

    python results/verdict-2026-12/phase1-cost.py            # embedded MNIST, paper MLP, 3 rounds

Each round trains phase 1 alone (``--p2-epochs 0``) with each rule on the same seed and reads
``train_seconds`` (the epochs and their validation passes) from the run's model.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from smartmixed.contract import PRESETS
from smartmixed.train.data import load_dataset
from smartmixed.train.loop import TrainConfig, train_run

RULES = ("joint", "bilevel")


def measure(data: str, arch: list[int], *, rounds: int, epochs: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    dataset = load_dataset(data)
    seconds: dict[str, list[float]] = {rule: [] for rule in RULES}
    for seed in range(rounds):
        for rule in RULES:
            config = TrainConfig(
                arch=arch, p1_epochs=epochs, p2_epochs=0, selection=rule, seed=seed
            )
            with tempfile.TemporaryDirectory() as folder:
                train_run(config=config, dataset=dataset, out=Path(folder), progress=False)
                spec = json.loads((Path(folder) / "model.json").read_text())
            seconds[rule].append(spec["metrics"]["train_seconds"])
    return seconds


def ratio(seconds: dict[str, list[float]]) -> float:
    return statistics.median(seconds["bilevel"]) / statistics.median(seconds["joint"])


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    result = measure("mnist", list(PRESETS["paper"]), rounds=rounds, epochs=2)
    print({rule: [round(s, 2) for s in times] for rule, times in result.items()})
    print(f"bilevel / joint phase-1 seconds, medians: {ratio(result):.3f}")
