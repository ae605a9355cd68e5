"""Reports of a finished run: the PNG plots, report.md, and the table comparing runs.

Kept apart from train/artifacts.py (the files a run needs to resume or be exported): everything
here only draws or renders what artifacts wrote (``model.json``'s spec and metrics, the history),
and no stage reads back what it writes. matplotlib is imported inside the functions that draw, so importing
train/loop.py does not load it.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smartmixed.contract import MODEL_SPEC, ModelSpec, hidden_layer_indices, json_type_name
from smartmixed.contract.files import atomic_write_bytes, atomic_write_text
from smartmixed.train.artifacts import ArtifactError, load_spec

REPORT = "report.md"
PLOTS = {
    "curves": "curves.png",
    "activations": "activations.png",
    "selection": "selection.png",
    "logit_gradients": "logit-gradients.png",
    "afu": "afu.png",
}
AFU_PLOT_RANGE = (-6.0, 6.0)  # the paper's Fig. 2c


# --------------------------------------------------------------------------------------------
# Naming a run's layers


def describe_layers(layers: Sequence[dict[str, Any]]) -> str:
    """A layered spec in one line: 'conv 6 k5 p2 -> maxpool 2 -> flatten -> linear 10'."""

    def one(layer: dict[str, Any]) -> str:
        kind = layer["type"]
        if kind == "conv":
            stride, pad = layer.get("stride", 1), layer.get("padding", 0)
            extra = (f" s{stride}" if stride != 1 else "") + (f" p{pad}" if pad else "")
            return f"conv {layer['channels']} k{layer['kernel']}{extra}"
        if kind in ("maxpool", "avgpool"):
            stride = layer.get("stride", layer["kernel"])
            return f"{kind} {layer['kernel']}" + (
                f" s{stride}" if stride != layer["kernel"] else ""
            )
        if kind == "linear":
            return f"linear {layer['features']}"
        return kind

    return " -> ".join(one(layer) for layer in layers)


def hidden_kinds(spec: ModelSpec) -> list[str]:
    """What each hidden layer is: 'conv' (its width counts channels) or 'linear' (neurons)."""
    if spec.layers is None:
        return ["linear"] * len(spec.hidden_widths)
    return [spec.layers[i]["type"] for i in hidden_layer_indices(spec.layers)]


def layer_label(spec: ModelSpec, layer: int) -> str:
    """Hidden layer ``layer`` (0-based) with its width: '32' for an MLP, 'conv, 6 channels' or
    'linear, 120' for a layered network."""
    width = spec.hidden_widths[layer]
    if spec.layers is None:
        return str(width)
    kind = hidden_kinds(spec)[layer]
    return f"conv, {width} channels" if kind == "conv" else f"linear, {width}"


def _feature_noun(spec: ModelSpec) -> str:
    return "channels / neurons" if "conv" in hidden_kinds(spec) else "neurons"


# --------------------------------------------------------------------------------------------
# Plots (matplotlib is imported inside each function: importing this module stays cheap)


def _savefig(fig, path: Path) -> None:
    """Render ``fig`` as PNG in memory, then write it atomically; the figure is closed either way."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def _activation_colors(pool: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(pool) <= 10 else "tab20"]
    return {name: cmap(i) for i, name in enumerate(pool)}


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, phases shaded apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [r["epoch"] for r in history]
    for key, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(epochs, [r[f"{key}_loss"] for r in history], style, label=key)
        ax_acc.plot(epochs, [r[f"{key}_accuracy"] for r in history], style, label=key)
    boundaries = [r["epoch"] for a, r in itertools.pairwise(history) if a["phase"] != r["phase"]]
    for ax in (ax_loss, ax_acc):
        for b in boundaries:
            ax.axvline(b - 0.5, color="grey", lw=0.8)
            ax.text(b, ax.get_ylim()[1], " phase 2", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_yscale("log")
    ax_acc.set_ylabel("accuracy")
    fig.suptitle("training curves")
    _savefig(fig, path)


def plot_activation_distribution(spec: ModelSpec, path: Path) -> None:
    """Per hidden layer, the share of neurons using each activation (paper Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts, colors = spec.activation_counts(), _activation_colors(spec.pool)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(counts) + 3), 4))
    bottoms = [0.0] * len(counts)
    for name in spec.pool:
        shares = [c[name] / sum(c.values()) for c in counts]
        ax.bar(range(len(counts)), shares, bottom=bottoms, label=name, color=colors[name])
        bottoms = [b + s for b, s in zip(bottoms, shares, strict=True)]
    kinds = hidden_kinds(spec)
    ticks = [
        f"L{i + 1}\n({w})"
        if spec.layers is None
        else f"L{i + 1} {kinds[i]}\n({w}{' ch' if kinds[i] == 'conv' else ''})"
        for i, w in enumerate(spec.hidden_widths)
    ]
    ax.set_xticks(range(len(counts)), ticks)
    ax.set_ylabel(f"share of {_feature_noun(spec)}")
    ax.set_title(f"activation per hidden layer ({spec.mode})")
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left")
    _savefig(fig, path)


def plot_selection(
    history: Sequence[dict[str, Any]],
    pool: Sequence[str],
    path: Path,
    *,
    labels: Sequence[str] | None = None,
) -> bool:
    """Share of each activation per layer over the phase-1 epochs (paper Fig. 4); ``labels``
    name the hidden layers in the titles (e.g. 'conv, 6 channels')."""
    rows = [r for r in history if r["phase"] == "selective"]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, colors = len(rows[0]["activation_counts"]), _activation_colors(pool)
    cols = min(n_layers, 4)
    nrows = -(-n_layers // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for layer in range(n_layers):
        ax = axes[layer // cols][layer % cols]
        for name in pool:
            shares = [
                r["activation_counts"][layer][name] / sum(r["activation_counts"][layer].values())
                for r in rows
            ]
            ax.plot(epochs, shares, label=name, color=colors[name])
        named = f" ({labels[layer]})" if labels else ""
        ax.set_title(f"hidden layer {layer + 1}{named}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for extra in range(n_layers, nrows * cols):
        axes[extra // cols][extra % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("phase-1 epoch")
    fig.supylabel("share of neurons (argmax)")
    _savefig(fig, path)
    return True


def plot_logit_gradients(
    history: Sequence[dict[str, Any]], pool: Sequence[str], path: Path
) -> bool:
    """Per phase-1 epoch, each candidate's mean logit push -dL/da_k (the selection study's
    instrument): a candidate with a larger push gains logit mass whatever its merit."""
    rows = [r for r in history if r["phase"] == "selective" and "logit_grad" in r]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _activation_colors(pool)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    epochs = [r["epoch"] for r in rows]
    for name in pool:
        ax.plot(epochs, [-r["logit_grad"][name] for r in rows], label=name, color=colors[name])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("phase-1 epoch")
    ax.set_ylabel("mean logit push  -dL/da_k")
    ax.set_title("what the straight-through gradient rewards, per candidate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    _savefig(fig, path)
    return True


def plot_afu(run_dir: Path, spec: ModelSpec, path: Path) -> bool:
    """Each hidden layer's learned unit G(z) on [-6, 6] against relu (the AFU paper's Fig. 2c)
    and against the unit before training (pool.afu_init, deterministic: recomputed from
    model.json's ``afu``). Reads the weights the run wrote."""
    if spec.afu is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from smartmixed.contract import AFU_PARAMS, MODEL_WEIGHTS, afu_tensor_name
    from smartmixed.nn.pool import afu_apply, afu_init
    from smartmixed.train.artifacts import load_tensors

    state = load_tensors(run_dir / MODEL_WEIGHTS)
    base, n_layers = spec.afu["base"], len(spec.hidden_widths)
    z = torch.linspace(*AFU_PLOT_RANGE, 601, dtype=torch.float64)
    start = afu_init(spec.afu["units"], base)
    g0 = afu_apply(z, *(start[p] for p in AFU_PARAMS), base)
    relu = torch.relu(z)
    cols = min(n_layers, 4)
    nrows = -(-n_layers // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False, sharex=True
    )
    for layer in range(n_layers):
        ax = axes[layer // cols][layer % cols]
        g = afu_apply(z, *(state[afu_tensor_name(layer, p)] for p in AFU_PARAMS), base)
        ax.plot(z, relu, color="grey", lw=3, alpha=0.35, label="relu")
        ax.plot(z, g0, color="C1", lw=1, ls="--", label="before training")
        ax.plot(z, g, color="C0", lw=1.6, label="learned G(z)")
        distance = float((g - relu).abs().max())
        named = "" if spec.layers is None else f" ({layer_label(spec, layer)})"
        ax.set_title(f"hidden layer {layer + 1}{named}: max|G - relu| {distance:.2f}", fontsize=8)
        ax.grid(alpha=0.3)
    for extra in range(n_layers, nrows * cols):
        axes[extra // cols][extra % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("z")
    fig.suptitle(
        f"learned activation units ({spec.afu['units']} x {base}, one per "
        f"{spec.afu['share']}; {spec.mode})",
        fontsize=9,
    )
    _savefig(fig, path)
    return True


def write_plots_and_report(
    run_dir: Path, spec: ModelSpec, history: Sequence[dict[str, Any]]
) -> None:
    """Every plot the run has data for (the phase-1 ones need a selective phase), then report.md
    linking the plots that exist."""
    plot_curves(history, run_dir / PLOTS["curves"])
    plot_activation_distribution(spec, run_dir / PLOTS["activations"])
    labels = [layer_label(spec, i) for i in range(len(spec.hidden_widths))]
    plot_selection(history, spec.pool, run_dir / PLOTS["selection"], labels=labels)
    plot_logit_gradients(history, spec.pool, run_dir / PLOTS["logit_gradients"])
    plot_afu(run_dir, spec, run_dir / PLOTS["afu"])
    write_report(run_dir, spec, history)


# --------------------------------------------------------------------------------------------
# Text: report.md and the comparison table


def format_counts(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(
        f"{n} {100 * c / total:.0f}%" for n, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c
    )


def write_report(run_dir: Path, spec: ModelSpec, history: Sequence[dict[str, Any]]) -> None:
    m = spec.metrics
    lines = [
        f"# Run {run_dir.name}",
        "",
        f"- mode: `{spec.mode}`, architecture {spec.arch}, pool {', '.join(spec.pool)}",
    ]
    if spec.layers is not None:
        lines.append(
            f"- layers on {spec.input_shape} input: {describe_layers(spec.layers)} (one "
            "activation per channel of a conv layer, per neuron of a linear one)"
        )
    lines += [
        f"- data: {spec.training.get('data_summary', spec.training.get('data'))}",
        f"- test accuracy **{m['test_accuracy']:.4f}** (loss {m['test_loss']:.4f}); "
        f"validation accuracy {m['val_accuracy']:.4f} at epoch {m['best_epoch']}",
    ]
    if "phase1" in m:
        p1 = m["phase1"]
        t = spec.training
        lines.append(
            f"- after phase 1 (selective, kept epoch {p1['best_epoch']} by "
            f"{p1.get('select', 'val-loss')}): validation {p1['val_accuracy']:.4f}, "
            f"test {p1['test_accuracy']:.4f}"
        )
        lines.append(
            f"- selection: protocol `{t.get('protocol')}`, candidates "
            f"`{t.get('candidate_norm')}`, logit lr {t.get('logit_lr') or t.get('lr')}, "
            f"tau {t.get('tau')} -> {t.get('tau_end') or t.get('tau')}, selection "
            f"{t.get('selection', 'joint')}, choice per {t.get('granularity', 'feature')}"
        )
        for r in p1.get("removed", []):
            lines.append(
                f"  - removed {r['activation']} from hidden layer {r['layer'] + 1} (held-out "
                f"loss {r['loss']:.4f})"
            )
        shrunk = [r for r in history if r.get("shrunk")]
        if shrunk:
            steps = "; ".join(
                f"epoch {r['epoch']}: " + ", ".join("/".join(names) for names in r["shrunk"])
                for r in shrunk
            )
            lines.append(f"  - pools shrunk (per hidden layer): {steps}")
    if spec.afu is not None:
        a = spec.afu
        lines.append(
            f"- learned activation unit (afu): {a['units']} x {a['base']}, one per {a['share']}"
        )
        if "afu" in m:
            diffs = ", ".join(f"{d:.3f}" for d in m["afu"]["max_abs_diff_from_relu"])
            lines.append(f"  - max |G(z) - relu(z)| on [-6, 6], per hidden layer: {diffs}")
    lines += [
        f"- training time {m['train_seconds']:.1f} s over {len(history)} epochs",
        "",
        "## Activation mix per hidden layer",
        "",
    ]
    rows = enumerate(zip(spec.hidden_widths, spec.activation_counts(), strict=True))
    if spec.layers is None:
        lines += ["| layer | width | mix |", "|---|---|---|"]
        lines += [f"| {i + 1} | {w} | {format_counts(counts)} |" for i, (w, counts) in rows]
    else:  # a conv layer's width counts channels, each with one activation
        lines += ["| layer | kind | width | mix |", "|---|---|---|---|"]
        kinds = hidden_kinds(spec)
        lines += [
            f"| {i + 1} | {kinds[i]} | {w} | {format_counts(counts)} |" for i, (w, counts) in rows
        ]
    if "auto" in spec.training:  # --mode auto: the candidates this run was chosen among
        lines += ["", "## Why this network (--mode auto)", "", *auto_table(spec.training["auto"])]
    lines += ["", "## Plots", ""]
    for key, name in PLOTS.items():
        if (run_dir / name).exists():
            lines.append(f"![{key}]({name})")
    atomic_write_text(run_dir / REPORT, "\n".join(lines) + "\n")


def auto_table(record: dict[str, Any]) -> list[str]:
    """An auto record (model.json's training.auto) as a Markdown table of every sub-run, in
    training order, with the choices marked, then the winner and why."""
    lines = [
        "| stage | model | epochs | lr | validation accuracy | chosen | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in record["screen"]:
        mark = "best screened" if s["activation"] == record["screened"] else ""
        lines.append(
            f"| screen | {s['activation']} | {s['epochs']} | {s['lr']} | "
            f"{s['val_accuracy']:.4f} | {mark} | {s['run']} |"
        )
    for f in record["finalists"]:
        for rate, val in f["lr"].items():
            marks = ["lr"] if rate == f["chosen_lr"] and len(f["lr"]) > 1 else []
            if rate == f["chosen_lr"] and f["model"] == record["winner"]:
                marks.append("**winner**")
            lines.append(
                f"| final | {f['model']} | {f['epochs']} | {rate} | {val:.4f} | "
                f"{', '.join(marks)} | {f['runs'][rate]} |"
            )
    return [*lines, "", f"winner: {record['reason']}"]


# the metrics of model.json the comparison prints
COMPARED_METRICS = ("test_accuracy", "val_accuracy", "train_seconds")


def compare_runs(run_dirs: Sequence[Path | str]) -> str:
    """A plain-text table comparing finished runs (ArtifactError names a run whose model.json
    lacks a number the table prints)."""
    specs = [(Path(d), load_spec(d)) for d in run_dirs]
    for path, spec in specs:
        for key in COMPARED_METRICS:
            value = spec.metrics.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ArtifactError(
                    f"{path / MODEL_SPEC}: spec field 'metrics.{key}': expected a number, got "
                    f"{json_type_name(value)}"
                )
    header = f"{'run':<28} {'mode':<14} {'test acc':>8} {'val acc':>8} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for path, spec in specs:
        m = spec.metrics
        lines.append(
            f"{path.name:<28} {spec.mode:<14} {m['test_accuracy']:>8.4f} "
            f"{m['val_accuracy']:>8.4f} {m['train_seconds']:>8.1f}"
        )
    for path, spec in specs:
        lines.append(f"\n{path.name}: activation mix per hidden layer")
        for i, counts in enumerate(spec.activation_counts()):
            lines.append(f"  layer {i + 1} ({layer_label(spec, i)}): {format_counts(counts)}")
        lines.append(f"  artifacts: {path}/ (model.safetensors, model.json, report.md, *.png)")
    return "\n".join(lines)
