"""The learned activation unit's accuracy table and the learned curves' distance from relu, from run folders.

    .venv/bin/python results/afu-2026-11/collect.py afu-runs
(runs named relu-sK, afu-sK, sm-afu-sK, afu-lr1e-3-sK, afu-lr1e-2-sK, sm-afu-lr1e-2-sK; prints
Markdown; models with no run are left out)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from smartmixed.contract import AFU_PARAMS, afu_tensor_name
from smartmixed.nn.pool import afu_apply

MODELS = {
    "relu": "fixed:relu (80 epochs)",
    "afu": "fixed:afu (80 epochs)",
    "sm-afu": "SmartMixed, pool = paper's six + afu (20 + 60)",
    "afu-lr1e-3": "fixed:afu, --afu-lr 1e-3 (80 epochs)",
    "afu-lr1e-2": "fixed:afu, --afu-lr 1e-2 (80 epochs)",
    "sm-afu-lr1e-2": "SmartMixed, six + afu, --afu-lr 1e-2 (20 + 60)",
}


def main(root: str) -> None:
    runs = {}
    for spec_path in sorted(Path(root).glob("*-s*/model.json")):
        name, seed = spec_path.parent.name.rsplit("-s", 1)
        runs[(name, int(seed))] = json.loads(spec_path.read_text())
    seeds = sorted({s for _, s in runs})
    print(
        "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | vs relu, paired |"
    )
    print("|---" * (len(seeds) + 3) + "|")
    for model, label in MODELS.items():
        if not any(m == model for m, _ in runs):
            continue
        accs = [
            runs[(model, s)]["metrics"]["test_accuracy"] if (model, s) in runs else None
            for s in seeds
        ]
        done = [a for a in accs if a is not None]
        diffs = [
            runs[(model, s)]["metrics"]["test_accuracy"]
            - runs[("relu", s)]["metrics"]["test_accuracy"]
            for s in seeds
            if (model, s) in runs and ("relu", s) in runs
        ]
        cells = " | ".join("-" if a is None else f"{a:.3f}" for a in accs)
        mean = f"{statistics.mean(done):.4f}" if done else "-"
        if len(done) > 1:
            mean += f" ± {statistics.stdev(done):.4f}"
        paired = (
            ""
            if model == "relu" or not diffs
            else f"{statistics.mean(diffs) * 100:+.2f} points ({sum(d > 0 for d in diffs)} of "
            f"{len(diffs)} seeds above)"
        )
        print(f"| {label} | {cells} | {mean} | {paired} |")
    print()
    print("max |G(z) - relu(z)| on [-6, 6] per hidden layer (L1 ... L6); afu share of each layer")
    print("(SmartMixed); max |G(z) - G_0(z)| (distance from the start, = relu) is the same figure.")
    print()
    print("| run | max abs G - relu, per layer | slope left / right, per layer | afu share |")
    print("|---|---|---|---|")
    for (model, seed), spec in sorted(runs.items()):
        if "afu" not in spec["metrics"]:
            continue
        diffs = ", ".join(f"{d:.2f}" for d in spec["metrics"]["afu"]["max_abs_diff_from_relu"])
        share = "-"
        if model.startswith("sm-afu"):
            share = ", ".join(
                f"{layer.count('afu') / len(layer):.0%}" for layer in spec["assignment"]
            )
        print(f"| {model} seed {seed} | {diffs} | {slopes(spec, root, model, seed)} | {share} |")


def slopes(spec: dict, root: str, model: str, seed: int) -> str:
    """G's mean slope over [-6, -3] and over [3, 6], per layer (relu: 0 / 1)."""
    state = load_file(Path(root) / f"{model}-s{seed}" / "model.safetensors")
    z = torch.tensor([-6.0, -3.0, 3.0, 6.0], dtype=torch.float64)
    parts = []
    for layer in range(len(spec["arch"]) - 2):
        params = [state[afu_tensor_name(layer, p)] for p in AFU_PARAMS]
        g = afu_apply(z, *params, spec["afu"]["base"])
        parts.append(f"{float(g[1] - g[0]) / 3:.2f} / {float(g[3] - g[2]) / 3:.2f}")
    return ", ".join(parts)


if __name__ == "__main__":
    main(sys.argv[1])
