"""ONNX Runtime CPU inference latency of a mixed network against fixed-activation networks
(docs/bench.md: what is measured, latency.json).

One run times one mixed network (a trained run's assignment and weights, or a random assignment
with given activation shares; an MLP or a conv net) and a fixed-activation network per activation
(the six defaults and any other the mix uses). An MLP is lowered by ``smartmixed.export.lower``
in every lowering (scatter, permuted, grouped, folded, folded_tanh), its int8 graphs
(``smartmixed-export --quantize int8``) timed too; a conv net as export lowers a layered run
(torch's exporter, the folds of ``smartmixed.export.folds``), without int8 rows (export
quantizes no conv net). Each fixed network is lowered once, as export's auto lowers it; a conv
net's fixed networks hold the mixed network's own weights and candidate norm. ``auto`` is
export's own decision (``smartmixed.export.autotune.choose_lowering``, per thread count); its
records repeat the numbers of the lowering it picked. PyTorch eager latency of the mixed and the
fixed-ReLU network is timed beside.

Method. A cell is one (runtime, model, lowering, batch, threads); an ONNX Runtime cell has its own
session with that many intra-op threads. Every cell first runs a few untimed warm-ups (arena
allocation, first-run caches); then, in each of ``rounds`` rounds, every cell is timed in turn
for ``repeats`` runs after 2 untimed ones (switching cells leaves the previous cell's pool
threads spinning and its weights in cache for a run or two), the order rotating each round, so
that drift and neighbours on a shared machine hit every model alike. Percentiles are over all
timed runs of a cell; every model gets the same seeded raw pixels (integers in [0, 255] as
float32; [B, D] for an MLP, [B, C, H, W] for a conv net).

Ratios. ``ratio_vs_relu`` = p50 / p50 of fixed ReLU (same batch, threads and runtime).
``ratio_vs_ideal`` = p50 / ideal, for the fp32 mixed network on ONNX Runtime, with
ideal = sum_a share_a * p50(fixed_a), what a perfect lowering would cost: it isolates the cost
of the grouping (splits, gathers, concats, smaller GEMMs) from that of the activations. The
shares are over activation elements (H*W for a conv channel, after its conv and batchnorm and
before any pool; 1 for a neuron): every network runs the same convolutions and matrix products
and the activations cost per element, so p50(fixed_a) = common + c_a * E (E the activation
elements) and a perfect lowering costs common + sum_a c_a * E_a = sum_a (E_a / E) p50(fixed_a).
Shares over features would not give it (in lenet5 the 204 linear neurons are 90% of the 226
hidden features but 3% of the 6,508 activation elements); they are recorded beside
(``mix_features``). For an MLP both agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from tqdm.auto import tqdm

from smartmixed.bench import PAPER_ARCH, PRESET_INPUT_SHAPE, BenchError, flag, parse_positive_ints
from smartmixed.contract import (
    AFU,
    CONV_PRESETS,
    activation_after,
    layer_output_shapes,
    layered_arch,
    outputs,
    resolve_conv_preset,
    split_list,
)
from smartmixed.contract.outputs import machine_info, markdown_table, percentiles
from smartmixed.contract.sessions import make_session
from smartmixed.export.autotune import AUTO, Choice, Timing, choose_lowering
from smartmixed.export.folds import MODULE_LOWERINGS, lowered_network, module_lowerings, plan_folds
from smartmixed.export.lower import DEFAULT_OPSET, LOWERINGS, distinct_lowerings, lower
from smartmixed.export.module import to_onnx
from smartmixed.export.quantize import quantize_int8
from smartmixed.export.timing import time_session
from smartmixed.nn.pool import ACTIVATIONS, DEFAULT_POOL
from smartmixed.train.artifacts import load_model
from smartmixed.train.model import MixedConvNet, MixedMLP, ModelSpec, parse_arch
from smartmixed.train.report import describe_layers

DEFAULT_BATCHES = "1,32,256"
DEFAULT_THREADS = "1,2"
# 40 x 30 = 1200 timed runs per cell: enough for a stable p99, and about 2-3 minutes for the
# paper architecture on a 2-core machine. Many short rounds interleave more finely than few long.
DEFAULT_ROUNDS = 40
DEFAULT_REPEATS = 30
WARMUP_FIRST = 5
WARMUP_PER_ROUND = 2
ORDER = (
    "interleaved rounds; in each round, per (batch, threads), every cell in turn, the order "
    "rotated by one cell per round"
)
MIX_TOLERANCE = 0.01  # shares such as 0.333,0.333,0.333 must pass
# Targets, 1 intra-op thread: key -> (batch, threads, max ratio). auto vs the ideal mix (p50),
# for an MLP and a conv net alike; the INT8 mixed network (auto's INT8 pick) vs the fp32
# fixed-ReLU network, for an MLP (export quantizes no conv net).
TARGET_CELLS = {
    f"auto_vs_ideal_batch{b}_threads1": (b, 1, limit)
    for b, limit in ((1, 1.10), (32, 1.05), (256, 1.05))
}
INT8_TARGET_CELLS = {f"int8_mixed_vs_relu_batch{b}_threads1": (b, 1, 0.70) for b in (1, 32, 256)}
TARGETS = {key: limit for key, (_, _, limit) in {**TARGET_CELLS, **INT8_TARGET_CELLS}.items()}
CONV_TARGETS = {key: limit for key, (_, _, limit) in TARGET_CELLS.items()}
IDEAL_WEIGHTS = (
    "activation elements per sample: H*W per conv channel, 1 per neuron (the activations cost "
    "per element; the convolutions and matrix products are the same in every network)"
)
INT8 = "+int8"  # lowering suffix of a dynamically quantized graph (export.quantize.quantize_int8)
PERCENTILES = ("p50_ms", "p95_ms", "p99_ms")  # of a cell's timed runs
RECORD_KEYS = (
    *("model", "runtime", "lowering", "batch", "threads", *PERCENTILES),
    *("samples_per_s", "ratio_vs_relu", "ratio_vs_ideal"),
)
ORT, TORCH = "onnxruntime", "torch"
FIXED, EAGER, MIXED = "fixed", "eager", "mixed"
FIXED_RELU = "relu"


# --------------------------------------------------------------------------------------------
# Options


def parse_mix(mix: str | Mapping[str, float]) -> dict[str, float]:
    """'relu=0.4,selu=0.3,elu=0.3' (or a mapping) -> shares normalised to sum to exactly 1."""
    if isinstance(mix, str):
        shares: dict[str, float] = {}
        for part in split_list(mix):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise BenchError(f"mix entry {part!r} is not NAME=SHARE (e.g. relu=0.5)")
            if name in shares:
                raise BenchError(f"mix lists {name!r} more than once")
            try:
                shares[name] = float(value)
            except ValueError:
                raise BenchError(f"mix entry {part!r}: {value.strip()!r} is not a number") from None
    else:
        shares = {str(k): float(v) for k, v in mix.items()}
    if not shares:
        raise BenchError("the mix is empty; expected e.g. relu=0.4,selu=0.3,elu=0.3")
    unknown = [n for n in shares if n not in ACTIVATIONS]
    if unknown:
        raise BenchError(
            f"mix: unknown activation(s) {', '.join(map(repr, unknown))}; expected names from: "
            f"{', '.join(ACTIVATIONS)}"
        )
    bad = [f"{n}={v}" for n, v in shares.items() if not math.isfinite(v) or v < 0]
    if bad:
        raise BenchError(f"mix: shares must be finite and >= 0 (got {', '.join(bad)})")
    total = sum(shares.values())
    if abs(total - 1) > MIX_TOLERANCE:
        raise BenchError(f"mix: shares sum to {total:.4g}, expected 1 (within {MIX_TOLERANCE})")
    return {n: v / total for n, v in shares.items() if v > 0}


def layer_counts(width: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Neurons per activation in a layer of ``width``: shares rounded so the counts sum to width.

    Largest remainder: floor(share * width) each, then one more neuron for the largest
    remainders (ties in mix order), so every layer holds the requested shares as closely as its
    width allows.
    """
    exact = {n: s * width for n, s in mix.items()}
    counts = {n: math.floor(v) for n, v in exact.items()}
    by_remainder = sorted(exact, key=lambda n: counts[n] - exact[n])  # stable: mix order on ties
    for name in by_remainder[: width - sum(counts.values())]:
        counts[name] += 1
    return counts


def random_assignment(
    hidden: Sequence[int], mix: Mapping[str, float], *, seed: int
) -> list[list[str]]:
    """Per hidden layer: exactly ``layer_counts`` neurons of each activation, positions shuffled."""
    rng = np.random.default_rng(seed)
    layers = []
    for width in hidden:
        names = [n for n, c in layer_counts(width, mix).items() for _ in range(c)]
        layers.append([names[i] for i in rng.permutation(width)])
    return layers


def activation_shares(
    assignment: Sequence[Sequence[str]], *, elements: Sequence[int] | None = None
) -> dict[str, float]:
    """Share of each activation over all hidden features (registry order, nonzero only), each
    feature of hidden layer l weighing ``elements[l]`` (default 1: a channel like a neuron)."""
    weights = [1] * len(assignment) if elements is None else list(elements)
    totals = dict.fromkeys(ACTIVATIONS, 0)
    for layer, weight in zip(assignment, weights, strict=True):
        for name in layer:
            totals[name] += weight
    total = sum(totals.values())
    return {n: v / total for n, v in totals.items() if v}


def feature_elements(spec: ModelSpec) -> list[int]:
    """Per hidden layer: the activation elements one feature computes for one sample, H*W for
    a conv channel (its (C, H, W) map where the mixed activation applies, after the conv and
    its batchnorm) and 1 for a neuron (every layer of an MLP)."""
    if spec.layers is None:
        return [1] * (len(spec.arch) - 2)
    shapes = layer_output_shapes(spec.layers, spec.input_shape)  # (C, H, W) or (features,)
    return [math.prod(shapes[i][1:]) for i in activation_after(spec.layers)]


@dataclass
class LatencyOptions:
    """What ``smartmixed-bench latency`` times (a flag per field: bench.add_options); checked
    (BenchError: bad mix, batches, threads, rounds, repeats, preset, or a combination of them)
    before anything is built, the mix parsed."""

    # one option a line: a table
    # fmt: off
    arch: str | Sequence[int] | None = flag("layer widths of an MLP (default: the paper's)", default=None)
    preset: str | None = flag("a conv net instead: lenet5 or convnet (input 1x28x28), random weights and assignment", default=None)
    run: Path | str | None = flag("runs/NAME: time that trained network, MLP or conv (its layers, assignment and weights)", group="source", default=None)  # noqa: RUF009 (flag returns a dataclasses.field)
    mix: str | Mapping[str, float] | None = flag("random assignment with these activation shares, e.g. relu=0.4,selu=0.3,elu=0.3 (default: uniform over the six default activations)", group="source", default=None)
    batches: str | Sequence[int] = flag("batch sizes", default=DEFAULT_BATCHES)
    threads: str | Sequence[int] = flag("ORT intra-op / torch threads", default=DEFAULT_THREADS)
    rounds: int = flag("interleaved rounds", default=DEFAULT_ROUNDS)
    repeats: int = flag("timed runs per model per round", default=DEFAULT_REPEATS)
    seed: int = flag("assignment, weights and inputs", default=0)
    # fmt: on

    def __post_init__(self) -> None:
        self.batches = parse_positive_ints(self.batches, "batch sizes")
        self.threads = parse_positive_ints(self.threads, "thread counts")
        if self.rounds < 1 or self.repeats < 1 or self.rounds * self.repeats < 2:
            raise BenchError(
                f"need rounds >= 1, repeats >= 1 and rounds x repeats >= 2 for "
                f"percentiles (got {self.rounds} x {self.repeats})"
            )
        if self.preset is not None and self.preset not in CONV_PRESETS:
            raise BenchError(
                f"preset {self.preset!r}: expected a conv preset, one of {', '.join(CONV_PRESETS)} "
                "(an MLP's layer widths go in the architecture)"
            )
        if self.run is not None and self.mix is not None:
            raise BenchError("give either a trained run or a mix, not both")
        if self.run is None and self.arch is not None and self.preset is not None:
            raise BenchError("give either an architecture (an MLP) or a conv preset, not both")
        if self.mix is not None:
            self.mix = parse_mix(self.mix)

    @property
    def requested(self) -> dict[str, float] | None:
        """A random assignment's shares (default uniform over the six); None for a run."""
        if self.run is not None:
            return None
        return self.mix or {n: 1 / len(DEFAULT_POOL) for n in DEFAULT_POOL}


# --------------------------------------------------------------------------------------------
# Models


def _mixed_network(o: LatencyOptions) -> tuple[ModelSpec, MixedMLP | MixedConvNet]:
    """The mixed network of ``o``: the run's (checked against ``o``'s architecture or preset),
    or a random assignment of ``o.requested`` on the preset or the architecture."""
    if o.run is None:
        requested, shape = o.requested, list(PRESET_INPUT_SHAPE)
        more = [n for n in ACTIVATIONS if n in requested and n not in DEFAULT_POOL]
        pool = [*DEFAULT_POOL, *more]  # any activation the mix adds, in registry order
        if o.preset is not None:
            network = {"layers": resolve_conv_preset(o.preset), "input_shape": shape}
            hidden = layered_arch(**network)[1:-1]  # channels / neurons
        else:
            network = {"arch": parse_arch(o.arch) if o.arch is not None else list(PAPER_ARCH)}
            hidden = network["arch"][1:-1]
        assignment = random_assignment(hidden, requested, seed=o.seed)
        spec = ModelSpec.untrained(**network, pool=pool, assignment=assignment)
        return spec, (MixedMLP if spec.layers is None else MixedConvNet).from_spec(spec).eval()
    spec, model = load_model(o.run)  # ArtifactError for a missing or broken run folder
    if spec.layers is not None:  # a conv net
        if o.arch is not None:
            raise BenchError(
                f"{o.run} is a layered (conv) network; an architecture (layer widths) describes "
                "an MLP: leave it out"
            )
        if o.preset is not None and resolve_conv_preset(o.preset, classes=spec.arch[-1]) != (
            spec.layers
        ):
            raise BenchError(
                f"preset {o.preset!r} does not match the layers of {o.run}; leave the preset out "
                "to use the run's"
            )
    elif o.preset is not None:
        raise BenchError(f"preset {o.preset!r} is a conv net; {o.run} is an MLP")
    elif o.arch is not None and parse_arch(o.arch) != spec.arch:
        raise BenchError(
            f"architecture {parse_arch(o.arch)} does not match the run's {spec.arch}; leave the "
            "architecture out to use the run's"
        )
    return spec, model


def fixed_mlp_spec(spec: ModelSpec, act: str) -> ModelSpec:
    """The MLP of ``spec``'s architecture with every hidden neuron ``act``, reading the same
    inputs (a trained run's preprocessing, input shape and labels)."""
    arch = list(spec.arch)
    fixed = ModelSpec.untrained(arch=arch, pool=[act], assignment=[[act] * w for w in arch[1:-1]])
    inputs = {"preprocessing": spec.preprocessing, "input_shape": spec.input_shape}
    return replace(fixed, **inputs, labels=spec.labels)


def fixed_conv_network(mixed: MixedConvNet, act: str) -> MixedConvNet:
    """The conv net ``mixed`` with every hidden feature ``act``: its layers, weights and
    candidate norm (a trained run's frozen norm), so that it differs in its activations alone."""
    assignment = [[act] * len(names) for names in mixed.assignment]
    options = mixed.network_options()
    fixed = MixedConvNet(mixed.spec_layers, mixed.input_shape, [act], assignment, **options)
    state = mixed.canonical_state_dict()  # layers.{i}.* and, with afu in the mix, afu.{l}.*
    fixed.load_canonical_state_dict(
        {k: v for k, v in state.items() if k.startswith("layers.") or act == AFU}
    )
    return fixed.eval()


@dataclass
class Networks:
    """The torch networks one run times: the mixed one (of ``spec``) and a fixed network per
    activation (``fixed``, the six and any other the mix uses). ``shares``: the activation
    elements' shares, the ideal mix's weights."""

    spec: ModelSpec
    mixed: MixedMLP | MixedConvNet
    fixed: dict[str, MixedMLP | MixedConvNet]
    shares: dict[str, float]

    @property
    def conv(self) -> bool:
        return self.spec.layers is not None

    @property
    def shape(self) -> list[int]:
        """One sample's input shape: [D] for an MLP, (C, H, W) for a conv net."""
        return list(self.spec.input_shape) if self.conv else [self.spec.arch[0]]


def _networks(o: LatencyOptions) -> Networks:
    """The networks of ``o``, with seeded random weights (the caller's torch RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        spec, mixed = _mixed_network(o)
        shares = activation_shares(spec.assignment, elements=feature_elements(spec))
        # The ideal mix needs a fixed network for every activation the mixed one uses.
        fixed = {
            a: fixed_conv_network(mixed, a)
            if spec.layers is not None
            else MixedMLP.from_spec(fixed_mlp_spec(spec, a)).eval()
            for a in [*DEFAULT_POOL, *(n for n in shares if n not in DEFAULT_POOL)]
        }
    return Networks(spec, mixed, fixed, shares)


def _time_torch(
    model: nn.Module, x: torch.Tensor, *, threads: int, repeats: int, warmup: int
) -> list[float]:
    """Eager forward latency in ms; torch's thread count is set for the call and restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return times


# --------------------------------------------------------------------------------------------
# Lowering

Graphs = dict[tuple[str, str], bytes]  # (model, lowering) -> ONNX bytes
Selections = dict[int, dict[str, Any]]  # threads -> auto's choice as export records it
AUTO_KEYS = ("chosen", "criterion", "median_ms", "score_ms", "threads", "batches")


@dataclass
class Lowered:
    """The ONNX graphs a run times, ``auto``'s pick per thread count (fp32, and int8 for an
    MLP), the mixed network's lowerings, what permuted does with each frozen layer of a conv
    net (``folds``), and each fixed network's lowering (one name for an MLP's)."""

    graphs: Graphs
    auto: Selections
    auto_int8: Selections | None
    lowerings: tuple[str, ...]
    folds: list[str] | None
    fixed_lowering: str | dict[str, str]


def _auto_records(choice: Choice, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``choice``'s selection as latency.json records auto (fp32, int8): AUTO_KEYS, or when
    one distinct lowering was chosen untimed, that one with no timings."""
    if choice.selection is None:
        criterion = "one distinct lowering: every lowering writes its graph, nothing to time"
        untimed = dict(zip(AUTO_KEYS, (choice.lowering, criterion, {}, {}, threads, [])))
        return untimed, untimed
    selection = choice.selection
    fp32 = selection.get("fp32", selection)
    return {k: fp32[k] for k in AUTO_KEYS}, {k: selection[k] for k in AUTO_KEYS}


def _candidates(
    net: Networks, name: str, seed: int
) -> tuple[tuple[str, ...], Callable[[str], onnx.ModelProto], list[str] | None]:
    """How export lowers network ``name`` (MIXED or a fixed one's activation): the lowerings
    that write different graphs for it, its graph in a lowering, and for a conv net what
    permuted does with each frozen layer. An MLP through export.lower; a conv net as export
    lowers a layered run (torch's exporter, export/module.py, the folds of export/folds.py)."""
    model = net.mixed if name == MIXED else net.fixed[name]
    if not net.conv:
        spec = net.spec if name == MIXED else fixed_mlp_spec(net.spec, name)
        state = {k: v.numpy() for k, v in model.canonical_state_dict().items()}
        return distinct_lowerings(spec), lambda lw: lower(spec, state, lowering=lw), None
    # the exporter traces a batch of 2 (the batch axis stays dynamic); the values do not matter
    rng = np.random.default_rng(seed)
    example = torch.from_numpy(rng.integers(0, 256, (2, *net.shape)).astype(np.float32))
    folds = plan_folds(model, example)

    def exported(lw: str) -> onnx.ModelProto:
        return to_onnx(lowered_network(model, folds, lw), example, opset=DEFAULT_OPSET)

    return module_lowerings(model, folds), exported, [f.describe() for f in folds]


def _lower(net: Networks, *, threads: Sequence[int], seed: int) -> Lowered:
    """Every fixed network as export's auto lowers it (an MLP's: its one distinct lowering,
    untimed; a conv net's: timed at the first thread count, permuted where it moves an
    activation after a max pool, folded where it folds a candidate norm, when faster); the
    mixed one in every lowering, with an MLP's int8 graphs and fixed ReLU's (as `--quantize
    int8` writes them); auto's picks per thread count (export's choose_lowering)."""
    graphs: Graphs = {}
    picks: dict[str, str] = {}
    for a in net.fixed:
        distinct, lowered, _ = _candidates(net, a, seed)
        timing = Timing(threads=threads[0], seed=seed)
        choice = choose_lowering(AUTO, distinct, lowered, shape=net.shape, timing=timing)
        picks[a], graphs[(a, FIXED)] = choice.lowering, choice.model.SerializeToString()
    distinct, lowered, folds = _candidates(net, MIXED, seed)
    lowerings = MODULE_LOWERINGS if net.conv else LOWERINGS
    fp32 = {lw: lowered(lw) for lw in lowerings}
    int8 = None if net.conv else {lw: quantize_int8(model) for lw, model in fp32.items()}
    for lw, model in fp32.items():
        graphs[(MIXED, lw)] = model.SerializeToString()
        if int8 is not None:
            graphs[(MIXED, lw + INT8)] = int8[lw].SerializeToString()
    if int8 is not None:
        relu_int8 = quantize_int8(onnx.load_from_string(graphs[(FIXED_RELU, FIXED)]))
        graphs[(FIXED_RELU, FIXED + INT8)] = relu_int8.SerializeToString()
    auto, auto_int8 = {}, {}
    for t in threads:
        choice = choose_lowering(
            AUTO,
            distinct,
            fp32.__getitem__,
            shape=net.shape,
            timing=Timing(threads=t, seed=seed),
            int8=None if int8 is None else int8.__getitem__,
        )
        auto[t], auto_int8[t] = _auto_records(choice, t)
    if net.conv:
        return Lowered(graphs, auto, None, lowerings, folds, picks)
    # an MLP's fixed networks all write one graph (a layer with one group): one name
    (fixed_lowering,) = set(picks.values())
    return Lowered(graphs, auto, auto_int8, lowerings, None, fixed_lowering)


# --------------------------------------------------------------------------------------------
# Measurement

Cell = tuple[str, str, str, int, int]  # runtime, model, lowering, batch, threads


def measure_latency(options: LatencyOptions | None = None, *, progress: bool = True) -> dict:
    """Time every model x lowering x batch x threads; returns the latency.json record.

    The mixed network: ``options.run`` (a trained run folder, MLP or layered), else a random
    assignment with the ``mix`` shares (default uniform over the six) on the MLP ``arch``
    (default the paper's) or the conv ``preset`` (lenet5, convnet; input 1x28x28), seeded
    random weights. Checked before anything is timed: BenchError (options that contradict
    each other or the run), SpecError (bad arch) or ArtifactError (missing or broken run folder).
    """
    o = options or LatencyOptions()
    net = _networks(o)
    lowered = _lower(net, threads=o.threads, seed=o.seed)
    records = _records(_time_cells(net, lowered, o, progress=progress), o, net, lowered)
    measured = _target_ratios(records, o, int8=lowered.auto_int8 is not None)
    targets = dict(CONV_TARGETS if net.conv else TARGETS)
    return {
        "config": _config(o, net, lowered),
        "machine": {**machine_info(), "onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "mix": net.shares,
        "mix_features": activation_shares(net.spec.assignment),
        "auto": {str(t): info for t, info in lowered.auto.items()},
        "auto_int8": {str(t): info for t, info in (lowered.auto_int8 or {}).items()},
        "records": records,
        "targets": targets,
        "target_ratios": measured,
        "meets_targets": {k: v <= targets[k] for k, v in measured.items()},
    }


def _time_cells(
    net: Networks, lowered: Lowered, o: LatencyOptions, *, progress: bool
) -> dict[Cell, dict[str, float]]:
    """p50 / p95 / p99 (ms) of every cell: ``o.rounds`` interleaved rounds (module docstring)."""
    rng = np.random.default_rng(o.seed)
    inputs = {b: rng.integers(0, 256, (b, *net.shape)).astype(np.float32) for b in o.batches}
    torch_inputs = {b: torch.from_numpy(x) for b, x in inputs.items()}
    torch_models = {FIXED_RELU: net.fixed[FIXED_RELU], MIXED: net.mixed}
    sessions = {
        (model, lowering, t): make_session(data, threads=t)
        for (model, lowering), data in lowered.graphs.items()
        for t in o.threads
    }
    # Cells grouped by (batch, threads): a group's cells are timed within seconds of each other.
    groups: list[list[Cell]] = [
        [(ORT, model, lowering, b, t) for model, lowering in lowered.graphs]
        + [(TORCH, model, EAGER, b, t) for model in (FIXED_RELU, MIXED)]
        for b in o.batches
        for t in o.threads
    ]

    def time_cell(cell: Cell, n: int, warmup: int) -> list[float]:
        runtime, model, lowering, b, t = cell
        if runtime == ORT:
            return time_session(sessions[(model, lowering, t)], inputs[b], repeats=n, warmup=warmup)
        return _time_torch(
            torch_models[model], torch_inputs[b], threads=t, repeats=n, warmup=warmup
        )

    samples: dict[Cell, list[float]] = {cell: [] for group in groups for cell in group}
    for cell in samples:
        time_cell(cell, 0, WARMUP_FIRST)
    total = o.rounds * len(samples)
    with tqdm(total=total, desc="latency", unit="cell", disable=not progress) as bar:
        for r in range(o.rounds):
            for group in groups:
                # rotate the order so that no model is always timed right after the same other one
                k = r % len(group)
                for cell in group[k:] + group[:k]:
                    samples[cell] += time_cell(cell, o.repeats, WARMUP_PER_ROUND)
                    bar.update()
    return {
        cell: dict(zip(PERCENTILES, percentiles(times, (50, 95, 99)), strict=True))
        for cell, times in samples.items()
    }


def _target_ratios(
    records: Sequence[dict[str, Any]], o: LatencyOptions, *, int8: bool
) -> dict[str, float]:
    """The targets' ratios, for the cells that were timed."""
    cells = [(AUTO, "ratio_vs_ideal", TARGET_CELLS)]
    if int8:
        cells.append((AUTO + INT8, "ratio_vs_relu", INT8_TARGET_CELLS))
    return {
        key: _find(records, MIXED, ORT, lowering, b, t)[ratio]
        for lowering, ratio, targets in cells
        for key, (b, t, _) in targets.items()
        if b in o.batches and t in o.threads
    }


def _config(o: LatencyOptions, net: Networks, lowered: Lowered) -> dict[str, Any]:
    """latency.json's ``config``: what was timed, and how."""
    return {
        "network": "conv" if net.conv else "mlp",
        "arch": list(net.spec.arch),
        "layers": net.spec.layers,
        "input_shape": net.shape,
        "preset": o.preset,
        "mixed": "trained run" if o.run is not None else "random assignment",
        "run": None if o.run is None else str(o.run),
        "mix_requested": o.requested,
        "pool": net.spec.pool,
        "fixed_models": list(net.fixed),
        "lowerings": list(lowered.lowerings),
        "int8": not net.conv,
        "exporter": "torch.onnx (TorchScript), as export lowers a layered run"
        if net.conv
        else "smartmixed.export.lower",
        "folds": lowered.folds,
        "ideal_weights": IDEAL_WEIGHTS,
        "batches": o.batches,
        "threads": o.threads,
        "rounds": o.rounds,
        "repeats": o.repeats,
        "warmup_first": WARMUP_FIRST,
        "warmup_per_round": WARMUP_PER_ROUND,
        "timed_runs_per_cell": o.rounds * o.repeats,
        "seed": o.seed,
        "device": "cpu",
        "opset": DEFAULT_OPSET,
        # MLP: one name; conv: per fixed network, what export's auto picked
        "fixed_lowering": lowered.fixed_lowering,
        "input": "seeded random raw pixels, integers in [0, 255] as float32",
        "order": ORDER,
    }


def _find(records: Sequence[dict[str, Any]], *key: Any) -> dict[str, Any]:
    """The record of ``key``: (model, runtime, lowering, batch, threads)."""
    found = [r for r in records if tuple(r[k] for k in RECORD_KEYS[:5]) == key]
    if not found:
        raise KeyError(key)
    return found[0]


def _records(
    stats: Mapping[Cell, dict[str, float]], o: LatencyOptions, net: Networks, lowered: Lowered
) -> list[dict[str, Any]]:
    """One record (RECORD_KEYS) per model x lowering x batch x threads: the fixed networks,
    the mixed one in every lowering and auto (its pick's numbers), an MLP's int8 rows, then
    torch eager; ratio_vs_relu against fp32 fixed ReLU of the same runtime."""
    # (model, runtime, lowering recorded, lowering timed) at thread count t
    picks = [("", lowered.auto)] + [(INT8, lowered.auto_int8)] * (lowered.auto_int8 is not None)

    def rows(t: int) -> list[tuple[str, str, str, str]]:
        out = [(a, ORT, FIXED, FIXED) for a in net.fixed]
        for suffix, auto in picks:
            out += [(MIXED, ORT, lw + suffix, lw + suffix) for lw in lowered.lowerings]
            out.append((MIXED, ORT, AUTO + suffix, auto[t]["chosen"] + suffix))
        if lowered.auto_int8 is not None:
            out.append((FIXED_RELU, ORT, FIXED + INT8, FIXED + INT8))
        return out + [(m, TORCH, EAGER, EAGER) for m in (FIXED_RELU, MIXED)]

    records = []
    for b in o.batches:
        for t in o.threads:
            ideal = sum(s * stats[(ORT, a, FIXED, b, t)]["p50_ms"] for a, s in net.shares.items())
            for model, runtime, lowering, timed in rows(t):
                s = stats[(runtime, model, timed, b, t)]
                relu = stats[(runtime, FIXED_RELU, FIXED if runtime == ORT else EAGER, b, t)]
                fp32_mixed = model == MIXED and runtime == ORT and not lowering.endswith(INT8)
                values = (model, runtime, lowering, b, t, *(s[p] for p in PERCENTILES))
                values += (b * 1e3 / s["p50_ms"], s["p50_ms"] / relu["p50_ms"])
                values += (s["p50_ms"] / ideal if fp32_mixed else None,)
                records.append(dict(zip(RECORD_KEYS, values, strict=True)))
    return records


def ideal_p50(result: Mapping[str, Any], batch: int, threads: int) -> float:
    """The ideal mix's latency: fixed networks' ORT p50 weighted by the mixed activation shares."""
    return sum(
        share * _find(result["records"], act, ORT, FIXED, batch, threads)["p50_ms"]
        for act, share in result["mix"].items()
    )


# --------------------------------------------------------------------------------------------
# Reports


def _lowerings(result: Mapping[str, Any]) -> tuple[str, ...]:
    """The mixed network's lowerings a result holds (results written before conv nets: the
    MLP's)."""
    return tuple(result["config"].get("lowerings", LOWERINGS))


def _cell(records: Sequence[dict[str, Any]], key: tuple[str, str, str, int, int]) -> str:
    """'p50 (x relu[, x ideal])' of one record."""
    r = _find(records, *key)
    text = f"{r['p50_ms']:.3f} ({r['ratio_vs_relu']:.2f}x"
    return text + (")" if r["ratio_vs_ideal"] is None else f", {r['ratio_vs_ideal']:.2f}x)")


def _shares(mix: Mapping[str, float]) -> str:
    return ", ".join(f"{a} {s:.1%}" for a, s in mix.items())


def _picks(autos: Mapping[str, Any]) -> str:
    """auto's pick per thread count, with every candidate's score."""
    return "; ".join(
        f"{t} thread{'s' if t != '1' else ''}: **{a['chosen']}** ("
        + (", ".join(f"{lw} {v:.3f}" for lw, v in a["score_ms"].items()) or a["criterion"])
        + ")"
        for t, a in autos.items()
    )


def _picked(autos: Mapping[str, Any]) -> str:
    return "/".join(dict.fromkeys(a["chosen"] for a in autos.values()))


def _header(result: Mapping[str, Any]) -> list[str]:
    """The title and what was timed: network, mix, method, auto's picks."""
    c, m, auto = result["config"], result["machine"], result["auto"]
    source = f"run {c['run']}" if c["run"] else f"random assignment (seed {c['seed']})"
    if c.get("layers") is not None:
        name = f"{c['preset']} " if c["preset"] else ""
        network = (
            f"Conv net {name}({describe_layers(c['layers'])}, input "
            f"{'x'.join(map(str, c['input_shape']))}; arch {c['arch']})"
        )
        mix = (
            f"shares of activation elements (H x W per channel, 1 per neuron; the ideal mix's "
            f"weights): {_shares(result['mix'])}; per hidden channel/neuron: "
            f"{_shares(result['mix_features'])}"
        )
    else:
        network = f"Architecture {c['arch']}"
        mix = f"hidden-neuron shares: {_shares(result['mix'])}"
    int8 = (
        f"; with `--quantize int8`: {_picks(result['auto_int8'])}"
        if result.get("auto_int8")
        else ""
    )
    lines = [
        "# Inference latency: mixed vs fixed activations (ONNX Runtime, CPU)",
        "",
        f"{network}; mixed network: {source}; {mix}.",
        f"{c['rounds']} interleaved rounds x {c['repeats']} timed runs per cell (warm-up "
        f"excluded); onnxruntime {m['onnxruntime']}, torch {m['torch']}; {m['processor']}, "
        f"{m['cpu_count']} cores.",
        f"`auto` (`smartmixed-export --threads t`) picks, by the geometric mean over batch "
        f"{', '.join(map(str, next(iter(auto.values()))['batches']))} of the median ms: "
        f"{_picks(auto)}{int8}.",
    ]
    if isinstance(c.get("fixed_lowering"), dict):
        lines.append(
            "Fixed networks, each lowered as export's `auto` picks for it: "
            + ", ".join(f"{a} {lw}" for a, lw in c["fixed_lowering"].items())
            + " (permuted moves a monotone activation after its max pool)."
        )
    return lines


def _table(result: Mapping[str, Any]) -> list[str]:
    """One row per mixed lowering, the ideal mix, each fixed network, the int8 graphs, torch
    eager, and the fastest lowering; one column per (batch, threads)."""
    c, recs, lowerings = result["config"], result["records"], _lowerings(result)
    cols = [(b, t) for b in c["batches"] for t in c["threads"]]

    def row(label: str, model: str, runtime: str, lowering: str) -> list[str]:
        return [label, *(_cell(recs, (model, runtime, lowering, b, t)) for b, t in cols)]

    def ideal(b: int, t: int) -> str:
        relu = _find(recs, FIXED_RELU, ORT, FIXED, b, t)["p50_ms"]
        return f"{ideal_p50(result, b, t):.3f} ({ideal_p50(result, b, t) / relu:.2f}x)"

    def fastest(b: int, t: int) -> str:
        return min(lowerings, key=lambda lw: _find(recs, MIXED, ORT, lw, b, t)["p50_ms"])

    rows = [row(f"mixed {lw}", MIXED, ORT, lw) for lw in lowerings]
    rows.append(row(f"mixed auto (= {_picked(result['auto'])})", MIXED, ORT, AUTO))
    rows.append(["ideal mix", *(ideal(b, t) for b, t in cols)])
    rows += [row(f"fixed {act}", act, ORT, FIXED) for act in c["fixed_models"]]
    if result.get("auto_int8"):
        rows += [row(f"mixed {lw} int8", MIXED, ORT, lw + INT8) for lw in lowerings]
        picked = _picked(result["auto_int8"])
        rows.append(row(f"mixed auto int8 (= {picked})", MIXED, ORT, AUTO + INT8))
        rows.append(row("fixed relu int8", FIXED_RELU, ORT, FIXED + INT8))
    rows.append(row("torch eager mixed", MIXED, TORCH, EAGER))
    rows.append(row("torch eager fixed relu", FIXED_RELU, TORCH, EAGER))
    rows.append(["fastest lowering", *(fastest(b, t) for b, t in cols)])
    return markdown_table(["model / lowering", *(f"b={b} t={t}" for b, t in cols)], rows)


def render_markdown(result: Mapping[str, Any]) -> str:
    int8 = bool(result.get("auto_int8"))
    quantized = (
        "int8 rows: ONNX Runtime's dynamic quantization of that graph, as "
        "`smartmixed-export --quantize int8` writes it. "
    )
    lines = [
        *_header(result),
        "",
        "Cells: p50 ms (x fp32 fixed-ReLU of the same runtime, x ideal mix). "
        + (quantized if int8 else "")
        + "Ideal mix = fixed networks' p50 weighted by the shares above.",
        "",
        *_table(result),
    ]
    kinds = "auto vs ideal mix; auto int8 vs fp32 fixed ReLU" if int8 else "auto vs ideal mix"
    lines += ["", f"Targets ({kinds}; p50; reported, not enforced):"]
    for key, limit in result["targets"].items():
        if key in result["target_ratios"]:
            ratio = result["target_ratios"][key]
            verdict = "met" if result["meets_targets"][key] else "NOT met"
            lines.append(f"- {key}: {ratio:.2f}x (<= {limit}x) {verdict}")
        else:
            lines.append(f"- {key}: <= {limit}x, not measured (batch or threads not timed)")
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: Path) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    c, recs = result["config"], result["records"]
    batches, threads = c["batches"], c["threads"]
    fig, axes = outputs.pyplot().subplots(
        1, len(threads), figsize=(5 * len(threads), 4), squeeze=False, sharey=True
    )
    for ax, t in zip(axes[0], threads, strict=True):
        chosen = result["auto"][str(t)]["chosen"]
        lines = [
            (lw + (" (auto)" if lw == chosen else ""), MIXED, lw, {"color": f"C{i}"})
            for i, lw in enumerate(_lowerings(result))
        ]
        lines.append(("fixed relu", FIXED_RELU, FIXED, {"color": "grey", "linestyle": "--"}))
        for label, model, lowering, style in lines:
            values = [_find(recs, model, ORT, lowering, b, t)["p50_ms"] for b in batches]
            ax.plot(batches, values, marker="o", label=label, **style)
        ideal = [ideal_p50(result, b, t) for b in batches]
        ax.plot(batches, ideal, marker="o", label="ideal mix", color="black", linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # plain numbers: ticks at the measured batch sizes, 1-2-5 steps for the latency
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch size")
        ax.set_title(f"{t} intra-op thread{'s' if t > 1 else ''}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("p50 latency (ms), ONNX Runtime CPU")
    axes[0][0].legend(fontsize=8)
    network = c.get("preset") or ("conv net" if c.get("layers") is not None else "")
    fig.suptitle(f"mixed vs fixed inference latency, {network} {c['arch']}", fontsize=9)
    outputs.save_figure(fig, path)
