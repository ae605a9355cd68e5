"""Training-step cost of SmartMixed against a fixed-ReLU network of the same architecture (an
MLP of ``arch`` widths or a conv preset on raw 28x28 one-channel images).

A step is what ``smartmixed.train.loop.train_epoch`` does per mini-batch: forward,
cross-entropy, backward, gradient-norm clip, Adam step. Models are timed in interleaved rounds
so that drift of this shared machine hits all alike; a ratio is the median over rounds of the
per-round ratio of medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartmixed.bench import PAPER_ARCH, PRESET_INPUT_SHAPE, BenchError, flag
from smartmixed.contract import (
    CONV_PRESETS,
    layered_arch,
    outputs,
    parse_arch,
    resolve_conv_preset,
)
from smartmixed.contract.outputs import machine_info, markdown_table, percentiles
from smartmixed.nn import MixedActivation
from smartmixed.nn.pool import DEFAULT_POOL
from smartmixed.train.distributed import resolve_device
from smartmixed.train.loop import TrainConfig, _phase2_candidate_norm
from smartmixed.train.model import (
    MixedConvNet,
    MixedMLP,
    SelectiveConvNet,
    SelectiveMLP,
)

TARGETS = {"phase1_vs_fixed": 1.3, "phase2_vs_fixed": 1.1}
MODELS = ("fixed_relu", "phase1", "phase2", "phase1_naive")
PREPROCESSING = {"offset": 0.0, "scale": 1 / 255}  # raw pixels in [0, 255] -> [0, 1]
COLUMNS = ("model", "ms/step (median)", "p05", "p95", "samples/s", "vs fixed-ReLU", "target")


def stack_all_candidates(activation: MixedActivation, z: Tensor, *, dim: int) -> Tensor:
    """The textbook phase-1 layer: out = sum_k y_k h_k(z), every candidate computed.

    y (n, K) is F.gumbel_softmax(hard=True) of the layer's logits; h_k is candidate k after the
    layer's candidate norm, (f_k(z) - shift_k) * gain_k. z has its n features at ``dim``
    ((B, n) or (B, C, H, W)); autograd keeps the (*z.shape, K) stack alive for backward, which is
    what the custom function in smartmixed.nn avoids.
    """
    y = F.gumbel_softmax(activation.logits, tau=activation.tau, hard=True)  # (n, K)
    transform = activation.transform
    stacked = torch.stack(
        [transform.apply(k, act.fn(z)) for k, act in enumerate(activation.acts)], dim=-1
    )  # (*z.shape, K)
    shape = [1] * z.dim() + [y.shape[1]]
    shape[dim % z.dim()] = y.shape[0]  # y broadcast along every axis but the features'
    return (stacked * y.reshape(shape)).sum(-1)


class NaiveSelectiveMLP(SelectiveMLP):
    """Reference point only: ``SelectiveMLP`` with every mixed layer the textbook stack
    (``stack_all_candidates``), batch-major (B, n)."""

    def forward(self, x: Tensor) -> Tensor:
        h = (x - self.offset) * self.scale
        for linear, activation in zip(self.layers[:-1], self.activations, strict=True):
            h = stack_all_candidates(activation, linear(h), dim=-1)  # (B, n)
        return self.layers[-1](h)


class NaiveSelectiveConvNet(SelectiveConvNet):
    """Reference point only: ``SelectiveConvNet`` with every mixed layer the textbook stack,
    per channel after a conv ((N, C, H, W, K) kept for backward), per neuron after a linear."""

    def forward(self, x: Tensor) -> Tensor:  # x: (N, C, H, W) raw -> logits (N, classes)
        h = (x - self.offset) * self.scale
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in self.activation_at:
                hidden = self.activation_at[i]
                h = stack_all_candidates(self.activations[hidden], h, dim=self._feature_dim(hidden))
        return h


def _random_assignment(
    widths: list[int], pool: list[str], generator: torch.Generator, *, balanced: bool
) -> list[list[str]]:
    """A phase-2 assignment per hidden layer: each feature uniformly random over the pool, or
    (``balanced``) the pool repeated to the layer's width (shares within one feature) in a
    random feature order, so that every layer of width >= |pool| holds every group."""
    if not balanced:
        return [
            [pool[i] for i in torch.randint(len(pool), (w,), generator=generator).tolist()]
            for w in widths
        ]
    return [
        [pool[i % len(pool)] for i in torch.randperm(w, generator=generator).tolist()]
        for w in widths
    ]


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


@dataclass
class TrainCostOptions:
    """What ``smartmixed-bench train-cost`` times (a flag per field: bench.add_options)."""

    # one option a line: a table
    # fmt: off
    arch: str | Sequence[int] | None = flag("MLP layer widths (default: the paper's)", group="net", default=None)
    preset: str | None = flag("a conv net instead, on 28x28 one-channel images (10 classes)", CONV_PRESETS, "net", default=None)
    batch_size: int = flag("samples per training step", default=128)
    rounds: int = flag("interleaved rounds", default=15)
    steps: int = flag("timed steps per model per round", default=20)
    warmup: int = flag("untimed steps per model first", default=10)
    threads: int | None = flag("torch intra-op threads", default=None)
    device: str = flag("where the steps run", ("cpu", "cuda"), default="cpu")
    # fmt: on

    def __post_init__(self) -> None:
        """Checked before anything is built; an MLP's ``arch`` parsed (SpecError)."""
        if self.arch is not None and self.preset is not None:
            raise BenchError("--arch and --preset are exclusive: an MLP's widths or a conv preset")
        if self.preset is not None and self.preset not in CONV_PRESETS:
            raise BenchError(f"--preset {self.preset!r}: expected one of {', '.join(CONV_PRESETS)}")
        if min(self.batch_size, self.rounds, self.steps) < 1 or self.warmup < 0:
            raise BenchError("--batch-size, --rounds, --steps must be >= 1, --warmup >= 0")
        if self.arch is not None:
            self.arch = parse_arch(self.arch)


def measure_train_cost(
    options: TrainCostOptions | None = None,
    *,
    seed: int = 0,
    models: tuple[str, ...] = MODELS,
    progress: bool = True,
) -> dict[str, Any]:
    """Time training steps of each model on ``options.device`` (DistributedError when torch
    sees no such device); returns the train-cost.json record. The network: an MLP of
    ``options.arch`` (default: the paper's) or the conv preset ``options.preset`` on
    (batch_size, 1, 28, 28) raw pixels."""
    o = options or TrainCostOptions()
    resolve_device(o.device)
    if o.threads:
        torch.set_num_threads(o.threads)
    torch.manual_seed(seed)  # the weights and phase 1's Gumbel draws
    net = _networks(o, torch.Generator().manual_seed(seed))  # the generator: phase 2's mix
    data = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (o.batch_size, *net["input_shape"]), generator=data).float()
    y = torch.randint(0, net["arch"][-1], (o.batch_size,), generator=data)
    x, y = x.to(o.device), y.to(o.device)
    steps = {name: _step_fn(net["models"][name].to(o.device), x, y) for name in models}
    per_round, samples = _time_steps(steps, o, progress=progress)

    def summary(name: str) -> dict[str, Any]:
        median = statistics.median(samples[name])
        p05, p95 = percentiles(samples[name], (5, 95))
        return {
            "ms_per_step": median,
            "p05_ms": p05,
            "p95_ms": p95,
            "steps": len(samples[name]),
            "samples_per_s": o.batch_size * 1e3 / median,
            "round_ms": per_round[name],  # the median of each round, what the ratios use
        }

    fixed = per_round["fixed_relu"]
    ratios = {
        f"{name}_vs_fixed": statistics.median(a / b for a, b in zip(per_round[name], fixed))
        for name in models
        if name != "fixed_relu"
    }
    return {
        "config": {
            "arch": net["arch"],
            "preset": o.preset,
            "layers": net["layers"],
            "input_shape": net["input_shape"],
            "batch_size": o.batch_size,
            "rounds": o.rounds,
            "steps_per_round": o.steps,
            "warmup_steps": o.warmup,
            "seed": seed,
            "torch_threads": torch.get_num_threads(),
            "device": o.device,
            "gpu": torch.cuda.get_device_name() if o.device == "cuda" else None,
            "phase2_assignment": net["phase2"],
            "candidate_norm": {name: net["norms"][name] for name in models},
        },
        "machine": machine_info(),
        "models": {name: summary(name) for name in models},
        "ratios": ratios,
        "targets": TARGETS,
        "meets_targets": {k: ratios[k] <= v for k, v in TARGETS.items() if k in ratios},
    }


def _networks(o: TrainCostOptions, generator: torch.Generator) -> dict[str, Any]:
    """The models (MODELS) of ``o``'s network, with its arch, layers, input shape, each model's
    candidate norm and how phase 2's assignment was drawn (``generator``)."""
    pool = list(DEFAULT_POOL)
    if o.preset is None:
        arch = list(o.arch or PAPER_ARCH)
        layers, shape, lead = None, [arch[0]], (arch,)
        mixed_net, selective, naive = MixedMLP, SelectiveMLP, NaiveSelectiveMLP
        # uniformly random per neuron: every layer holds all six groups, the most fragmented
        # (slowest) case a trained mix can produce
        mixed = _random_assignment(arch[1:-1], pool, generator, balanced=False)
        norms = dict.fromkeys(MODELS, "none")
        phase2 = "uniformly random over the default pool (all six groups per layer)"
    else:
        layers = resolve_conv_preset(o.preset)  # the last linear gives 10 classes
        shape = list(PRESET_INPUT_SHAPE)
        arch, lead = layered_arch(layers, shape), (layers, shape)
        mixed_net, selective, naive = MixedConvNet, SelectiveConvNet, NaiveSelectiveConvNet
        # channels of each hidden conv, neurons of each hidden linear
        mixed = _random_assignment(arch[1:-1], pool, generator, balanced=True)
        # under the default protocol: a fixed baseline none, phase 1 the protocol's, phase 2
        # what the loop gives its frozen layers
        protocol = TrainConfig(arch=arch, layers=layers)
        norms = {
            "fixed_relu": TrainConfig(arch=arch, layers=layers, mode="fixed:relu").candidate_norm,
            "phase1": protocol.candidate_norm,
            "phase2": _phase2_candidate_norm(protocol, "mixed", mixed),
            "phase1_naive": protocol.candidate_norm,
        }
        phase2 = (
            "random balanced over the default pool (each activation on an equal share of "
            "every layer's channels or neurons, in random order)"
        )
    relu = [["relu"] * w for w in arch[1:-1]]
    kw = {"preprocessing": PREPROCESSING}
    models = {
        "fixed_relu": mixed_net(*lead, ["relu"], relu, **kw, candidate_norm=norms["fixed_relu"]),
        "phase1": selective(*lead, pool, **kw, candidate_norm=norms["phase1"]),
        "phase2": mixed_net(*lead, pool, mixed, **kw, candidate_norm=norms["phase2"]),
        "phase1_naive": naive(*lead, pool, **kw, candidate_norm=norms["phase1_naive"]),
    }
    return {
        "models": models,
        "arch": arch,
        "layers": layers,
        "input_shape": shape,
        "norms": norms,
        "phase2": phase2,
    }


def _time_steps(
    steps: dict[str, Callable[[], None]], o: TrainCostOptions, *, progress: bool
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm every model up, then time ``o.rounds`` interleaved rounds of ``o.steps`` steps
    each: (the median ms of each round, every step's ms) per model."""
    for step in steps.values():
        for _ in range(o.warmup):
            step()
    per_round: dict[str, list[float]] = {name: [] for name in steps}
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in tqdm(range(o.rounds), desc="train-cost rounds", disable=not progress):
        for name, step in steps.items():
            times = []
            for _ in range(o.steps):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            per_round[name].append(statistics.median(times))
            samples[name].extend(times)
    return per_round, samples


def _network(config: dict[str, Any]) -> str:
    """'conv preset lenet5 (arch [...])' or 'architecture [...]', for titles."""
    if config.get("preset"):
        return f"conv preset {config['preset']} (arch {config['arch']})"
    return f"architecture {config['arch']}"


def render_markdown(result: dict[str, Any]) -> str:
    c, m = result["config"], result["machine"]
    rows = []
    for name, model in result["models"].items():
        ratio, target = (result[key].get(f"{name}_vs_fixed") for key in ("ratios", "targets"))
        times = (f"{model[key]:.2f}" for key in ("ms_per_step", "p05_ms", "p95_ms"))
        vs_fixed = f"{1.0 if ratio is None else ratio:.2f}x", f"<= {target}x" if target else ""
        rows.append((name, *times, f"{model['samples_per_s']:.0f}", *vs_fixed))
    norms = ", ".join(f"{name} {norm}" for name, norm in (c.get("candidate_norm") or {}).items())
    network, device = _network(c), f"GPU {c['gpu']}" if c.get("device") == "cuda" else "CPU"
    lines = [
        f"# Training-step cost: {c['preset']}" if c.get("preset") else "# Training-step cost",
        "",
        f"{network[0].upper()}{network[1:]}, batch {c['batch_size']}, {device}, "
        f"{c['torch_threads']} torch threads; {c['rounds']} interleaved rounds x "
        f"{c['steps_per_round']} steps per model.",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}.",
        "",
        *markdown_table(COLUMNS, rows),
        "",
        "phase1 = SmartMixed phase 1 (custom straight-through function); phase2 = frozen mix, "
        f"{c['phase2_assignment']}; phase1_naive = stack-all-activations reference (not used "
        f"in training). Candidate norm: {norms}.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    plt = outputs.pyplot()

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
        f"training step, batch {result['config']['batch_size']}, {_network(result['config'])}",
        fontsize=9,
    )
    outputs.save_figure(fig, path)
