"""Run artifacts: weights (safetensors), spec (JSON), history and checkpoints; loading a model.

Every file is written to a temporary name in the same folder and renamed into place
(``smartmixed.contract.files``, re-exported here), so a killed process never leaves a
half-written artifact. Nothing here unpickles: loading never runs code. The plots and report.md
drawn from a finished run are train/report.py's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from smartmixed.contract import HISTORY, MODEL_SPEC, MODEL_WEIGHTS
from smartmixed.contract.files import atomic_write_bytes, atomic_write_text
from smartmixed.train.model import MixedMLP, ModelSpec, SpecError

CHECKPOINT = "checkpoint.safetensors"


class ArtifactError(ValueError):
    """A run folder or file that is missing, corrupt or inconsistent."""


# --------------------------------------------------------------------------------------------
# Folders and files


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
    data, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory: a network-shared AFU appears once per
        # layer in a state_dict (issue I), so later copies are cloned
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        data[k] = v
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
