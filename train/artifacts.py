"""Run artifacts: weights (safetensors), spec (JSON), history, checkpoints, plots and report.

Every file is written to a temporary name in the same folder and renamed into place, so a killed
process never leaves a half-written artifact. Nothing here unpickles: loading never runs code.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from smartmixed.contract import HISTORY, MODEL_SPEC, MODEL_WEIGHTS
from smartmixed.train.model import MixedMLP, ModelSpec, SpecError

CHECKPOINT = "checkpoint.safetensors"
REPORT = "report.md"
PLOTS = {
    "curves": "curves.png",
    "activations": "activations.png",
    "selection": "selection.png",
    "logit_gradients": "logit-gradients.png",
}


class ArtifactError(ValueError):
    """A run folder or file that is missing, corrupt or inconsistent."""


# --------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_writable_folder(path: Path | str, *, what: str) -> None:
    """Refuse, in one line, a folder that cannot be written or created: a file in the way, or no
    write permission (or a read-only file system) where it is or would be created. Called before
    any work, so that nothing is half-written (issue F)."""
    path = Path(path)
    existing = path
    try:
        while not (existing.exists() or existing.is_symlink()) and existing.parent != existing:
            existing = existing.parent
        where = "" if existing == path else f"would be created in {existing}, which "
        if not existing.is_dir():
            raise ArtifactError(f"{what} {path}: {where}is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
            why = "is on a read-only file system" if read_only else "is not writable"
            raise ArtifactError(f"{what} {path}: {where}{why}")
    except OSError as e:
        raise ArtifactError(f"{what} {path}: {e.strerror}") from None


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None):
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save_safetensors_bytes(data, metadata=metadata))


def load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_safetensors_bytes(path.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except (SafetensorError, ValueError, OSError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------------------------
# The trained model


def save_model(run_dir: Path, spec: ModelSpec, state: dict[str, Tensor]) -> None:
    """Weights first, spec last: a model.json on disk means its weights are complete."""
    save_tensors(run_dir / MODEL_WEIGHTS, state, metadata={"format": spec.format})
    atomic_write_text(run_dir / MODEL_SPEC, spec.to_json() + "\n")


def load_spec(run_dir: Path | str) -> ModelSpec:
    path = Path(run_dir) / MODEL_SPEC
    try:
        return ModelSpec.from_dict(read_json(path))
    except (SpecError, TypeError) as e:
        raise ArtifactError(f"{path}: {e}") from None


def nonfinite_count(values: Tensor) -> str | None:
    """'3 NaN values', '1 inf value', '2 NaN and 1 inf values'; None when all are finite."""
    nan, inf = int(values.isnan().sum()), int(values.isinf().sum())
    if not nan and not inf:
        return None
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    return f"{' and '.join(p for p in parts if p)} value{'s' if nan + inf > 1 else ''}"


def load_model(run_dir: Path | str) -> tuple[ModelSpec, MixedMLP]:
    """Rebuild the trained network (eval mode) from model.json + model.safetensors alone.

    NaN or inf in the preprocessing or the weights is refused by name here, before anything is
    lowered or compared (issue F: it used to surface as a PyTorch/ONNX mismatch).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: run folder not found")
    spec = load_spec(run_dir)
    problems = []
    for key in ("offset", "scale"):
        try:
            values = torch.as_tensor(spec.preprocessing[key], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ArtifactError(
                f"{run_dir / MODEL_SPEC}: preprocessing {key} is not a number or a list of numbers"
            ) from None
        if count := nonfinite_count(values):
            problems.append(f"preprocessing {key} holds {count}")
    if problems:
        raise ArtifactError(f"{run_dir / MODEL_SPEC}: {'; '.join(problems)}")
    path = run_dir / MODEL_WEIGHTS
    state = load_tensors(path)
    problems = [
        f"weights {name} hold {count}"
        for name, tensor in sorted(state.items())
        if tensor.is_floating_point() and (count := nonfinite_count(tensor))
    ]
    if problems:
        raise ArtifactError(f"{path}: {'; '.join(problems)}")
    model = MixedMLP.from_spec(spec)
    try:
        model.load_canonical_state_dict(state)
    except SpecError as e:
        raise ArtifactError(f"{path}: {e}") from None
    return spec, model.eval()


# --------------------------------------------------------------------------------------------
# History and checkpoints (for --resume)


def write_history(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / HISTORY, "".join(json.dumps(r) + "\n" for r in history))


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and the rest (JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    """One file: the tensors, with the JSON state in the safetensors metadata (one atomic rename)."""
    save_tensors(run_dir / CHECKPOINT, tensors, metadata={"state": json.dumps(state)})


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    path = run_dir / CHECKPOINT
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})["state"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no checkpoint to resume from") from None
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable checkpoint ({e})") from None
    return tensors, state


def remove_checkpoint(run_dir: Path) -> None:
    (run_dir / CHECKPOINT).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Plots and report


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; plots get the usual mode
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


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
    ax.set_xticks(
        range(len(counts)), [f"L{i + 1}\n({w})" for i, w in enumerate(spec.hidden_widths)]
    )
    ax.set_ylabel("share of neurons")
    ax.set_title(f"activation per hidden layer ({spec.mode})")
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left")
    _savefig(fig, path)


def plot_selection(history: Sequence[dict[str, Any]], pool: Sequence[str], path: Path) -> bool:
    """Share of each activation per layer over the phase-1 epochs (paper Fig. 4)."""
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
        ax.set_title(f"hidden layer {layer + 1}", fontsize=9)
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
    """Per phase-1 epoch, each candidate's mean logit push -dL/da_k (issue E's instrument):
    a candidate with a larger push gains logit mass whatever its merit."""
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


def write_plots_and_report(
    run_dir: Path, spec: ModelSpec, history: Sequence[dict[str, Any]]
) -> None:
    plot_curves(history, run_dir / PLOTS["curves"])
    plot_activation_distribution(spec, run_dir / PLOTS["activations"])
    plot_selection(history, spec.pool, run_dir / PLOTS["selection"])
    plot_logit_gradients(history, spec.pool, run_dir / PLOTS["logit_gradients"])
    write_report(run_dir, spec, history)


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
            f"tau {t.get('tau')} -> {t.get('tau_end') or t.get('tau')}"
        )
    lines += [
        f"- training time {m['train_seconds']:.1f} s over {len(history)} epochs",
        "",
        "## Activation mix per hidden layer",
        "",
        "| layer | width | mix |",
        "|---|---|---|",
    ]
    for i, (w, counts) in enumerate(zip(spec.hidden_widths, spec.activation_counts(), strict=True)):
        lines.append(f"| {i + 1} | {w} | {format_counts(counts)} |")
    lines += ["", "## Plots", ""]
    for key, name in PLOTS.items():
        if (run_dir / name).exists():
            lines.append(f"![{key}]({name})")
    atomic_write_text(run_dir / REPORT, "\n".join(lines) + "\n")


def compare_runs(run_dirs: Sequence[Path | str]) -> str:
    """A plain-text table comparing finished runs."""
    specs = [(Path(d), load_spec(d)) for d in run_dirs]
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
            lines.append(f"  layer {i + 1} ({spec.hidden_widths[i]}): {format_counts(counts)}")
        lines.append(f"  artifacts: {path}/ (model.safetensors, model.json, report.md, *.png)")
    return "\n".join(lines)
