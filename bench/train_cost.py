"""Training-step cost of SmartMixed against a fixed-ReLU network of the same architecture.

One training step is exactly what ``smartmixed.train.loop.train_epoch`` does per mini-batch:
forward, cross-entropy, backward, gradient-norm clip, Adam step. Models are timed in interleaved
rounds (every round times each model in turn) so that drift of this shared machine hits all of
them alike; ratios are the median over rounds of the per-round ratio of medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartmixed.bench import common
from smartmixed.bench.common import machine_info
from smartmixed.nn.pool import DEFAULT_POOL
from smartmixed.train.distributed import resolve_device
from smartmixed.train.model import PRESETS, MixedMLP, SelectiveMLP

PAPER_ARCH = list(PRESETS["paper"])
TARGETS = {"phase1_vs_fixed": 1.3, "phase2_vs_fixed": 1.1}
MODELS = ("fixed_relu", "phase1", "phase2", "phase1_naive")


class NaiveSelectiveMLP(SelectiveMLP):
    """Reference point only: the textbook phase-1 layer that stacks every candidate.

    out = sum_k y_k f_k(z) with y from F.gumbel_softmax(hard=True); autograd keeps the
    (B, n, |P|) stack alive for backward. This is what the custom function in smartmixed.nn
    avoids.
    """

    def forward(self, x: Tensor) -> Tensor:
        h = (x - self.offset) * self.scale
        for linear, activation in zip(self.layers[:-1], self.activations, strict=True):
            z = linear(h)  # (B, n)
            y = F.gumbel_softmax(activation.logits, tau=self.tau, hard=True)  # (n, K)
            stacked = torch.stack([act.fn(z) for act in activation.acts], dim=-1)  # (B, n, K)
            h = (stacked * y).sum(-1)
        return self.layers[-1](h)


def _build_models(arch: list[int], seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    hidden = arch[1:-1]
    pool = list(DEFAULT_POOL)
    generator = torch.Generator().manual_seed(seed)
    # Phase 2 gets a uniformly random assignment: every layer holds all six groups, the most
    # fragmented (slowest) case a trained mix can produce.
    mixed = [
        [pool[i] for i in torch.randint(len(pool), (w,), generator=generator).tolist()]
        for w in hidden
    ]
    pre = {"offset": 0.0, "scale": 1 / 255}
    return {
        "fixed_relu": MixedMLP(arch, ["relu"], [["relu"] * w for w in hidden], preprocessing=pre),
        "phase1": SelectiveMLP(arch, pool, preprocessing=pre),
        "phase2": MixedMLP(arch, pool, mixed, preprocessing=pre),
        "phase1_naive": NaiveSelectiveMLP(arch, pool, preprocessing=pre),
    }


def _step_fn(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    # on a GPU a step is queued work: wait for it, or the clock times the launch alone
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sync()

    return step


def measure_train_cost(
    *,
    arch: list[int] | None = None,
    batch_size: int = 128,
    rounds: int = 15,
    steps_per_round: int = 20,
    warmup_steps: int = 10,
    seed: int = 0,
    models: tuple[str, ...] = MODELS,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Time training steps of each model on ``device`` (cpu or cuda; DistributedError when
    torch sees no such device); returns the train-cost.json record."""
    resolve_device(device)
    arch = list(arch or PAPER_ARCH)
    built = {name: model.to(device) for name, model in _build_models(arch, seed).items()}
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch_size, arch[0]), generator=generator).float()  # raw pixels
    y = torch.randint(0, arch[-1], (batch_size,), generator=generator)
    x, y = x.to(device), y.to(device)
    steps = {name: _step_fn(built[name], x, y) for name in models}
    for step in steps.values():
        for _ in range(warmup_steps):
            step()
    per_round: dict[str, list[float]] = {name: [] for name in models}  # median ms per round
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in tqdm(range(rounds), desc="train-cost rounds", disable=not progress):
        for name, step in steps.items():
            times = []
            for _ in range(steps_per_round):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            per_round[name].append(statistics.median(times))
            samples[name].extend(times)

    def summary(name: str) -> dict[str, float]:
        q = statistics.quantiles(samples[name], n=20)
        return {
            "ms_per_step": statistics.median(samples[name]),
            "p05_ms": q[0],
            "p95_ms": q[-1],
            "steps": len(samples[name]),
            "samples_per_s": batch_size * 1e3 / statistics.median(samples[name]),
        }

    def ratio(name: str) -> float:
        return statistics.median(
            a / b for a, b in zip(per_round[name], per_round["fixed_relu"], strict=True)
        )

    ratios = {f"{name}_vs_fixed": ratio(name) for name in models if name != "fixed_relu"}
    return {
        "config": {
            "arch": arch,
            "batch_size": batch_size,
            "rounds": rounds,
            "steps_per_round": steps_per_round,
            "warmup_steps": warmup_steps,
            "seed": seed,
            "torch_threads": torch.get_num_threads(),
            "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "phase2_assignment": "uniformly random over the default pool (all six groups per layer)",
        },
        "machine": machine_info(),
        "models": {name: summary(name) for name in models},
        "ratios": ratios,
        "targets": TARGETS,
        "meets_targets": {k: ratios[k] <= v for k, v in TARGETS.items() if k in ratios},
    }


def render_markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        "# Training-step cost",
        "",
        f"Architecture {c['arch']}, batch {c['batch_size']}, "
        + (f"GPU {c['gpu']}" if c.get("device") == "cuda" else "CPU")
        + f", {c['torch_threads']} torch threads; {c['rounds']} interleaved rounds x "
        f"{c['steps_per_round']} steps per model.",
        f"Machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, "
        f"torch {result['machine']['torch']}.",
        "",
        "| model | ms/step (median) | p05 | p95 | samples/s | vs fixed-ReLU | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        key = f"{name}_vs_fixed"
        ratio = result["ratios"].get(key)
        target = result["targets"].get(key)
        lines.append(
            f"| {name} | {m['ms_per_step']:.2f} | {m['p05_ms']:.2f} | {m['p95_ms']:.2f} | "
            f"{m['samples_per_s']:.0f} | {'1.00' if ratio is None else f'{ratio:.2f}'}x | "
            f"{'' if target is None else f'<= {target}x'} |"
        )
    lines += [
        "",
        "phase1 = SmartMixed phase 1 (custom straight-through function); phase2 = frozen mix, "
        "random assignment; phase1_naive = stack-all-activations reference (not used in training).",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()

    names = list(result["models"])
    med = [result["models"][n]["ms_per_step"] for n in names]
    lo = [m - result["models"][n]["p05_ms"] for n, m in zip(names, med, strict=True)]
    hi = [result["models"][n]["p95_ms"] - m for n, m in zip(names, med, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(names, med, yerr=[lo, hi], capsize=4, color=["grey", "C0", "C1", "C3"][: len(names)])
    for i, n in enumerate(names):
        r = result["ratios"].get(f"{n}_vs_fixed", 1.0)
        ax.text(i, med[i], f"{r:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("ms per training step (median, p05-p95)")
    ax.set_title(
        f"training step, batch {result['config']['batch_size']}, {result['config']['arch']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """DIR/train-cost.{json,md,png}, each written atomically."""
    return common.write_outputs(result, out, "train-cost", render=render_markdown, draw=plot)
