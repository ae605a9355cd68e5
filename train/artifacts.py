"""Run artifacts: weights (safetensors), spec (JSON), history and checkpoints; loading a model.

Every file is written to a temporary name in the same folder and renamed into place
(``smartmixed.contract.files``, re-exported here), so a killed process never leaves a
half-written artifact. Nothing here unpickles: loading never runs code. The plots and report.md
drawn from a finished run are train/report.py's.

Reading treats every file as another party's (a run folder is copied, edited, retrained while it
is exported): regular files only, sizes checked before reading, JSON depth bounded, a
safetensors header checked (names, dtypes, shapes, offsets) before any tensor is read or any
network allocated, and model.json's digest of model.safetensors checked, so that a spec is
never paired with weights it was not saved with.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from smartmixed.contract import (
    HISTORY,
    MODEL_SPEC,
    MODEL_WEIGHTS,
    WEIGHTS_DIGEST,
    JsonError,
    json_type_name,
    layered_weight_shapes,
    parse_json,
)
from smartmixed.contract.files import (
    UnreadableFile,
    atomic_write_bytes,
    atomic_write_text,
    open_regular_file,
    read_regular_file,
)
from smartmixed.train.model import (
    CANDIDATE_NORMS,
    MixedConvNet,
    MixedMLP,
    MixedNetwork,
    ModelSpec,
    SpecError,
    afu_expected_shapes,
)

# model.json training field of a layered run: the candidate norm its stored frozen layers still
# apply ("none", or absent, once the norm is folded into the weights: MixedConvNet.folded)
FROZEN_CANDIDATE_NORM = "frozen_candidate_norm"

CHECKPOINT = "checkpoint.safetensors"

# The most bytes each file of a run may hold: checked before a byte is read. The paper's largest
# network (Table 1, row 18) is 5 MB of weights and its model.json 60 kB.
MAX_SPEC_BYTES = 16 * 2**20  # model.json: per-feature preprocessing, per-neuron assignment
MAX_WEIGHTS_BYTES = 2**30  # model.safetensors: 268M float32 parameters
MAX_TENSOR_HEADER_BYTES = 16 * 2**20  # a safetensors JSON header (a checkpoint's holds history)
# checkpoint.safetensors: the network, its kept state and Adam's two moments, and the header
MAX_CHECKPOINT_BYTES = 4 * MAX_WEIGHTS_BYTES + MAX_TENSOR_HEADER_BYTES
MAX_HISTORY_BYTES = 64 * 2**20  # history.jsonl

# safetensors dtype names and their sizes in bytes (the format's specification)
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# the safetensors names of the torch dtypes artifacts hold
TORCH_DTYPES = {torch.float32: "F32", torch.uint8: "U8", torch.int64: "I64"}


class ArtifactError(ValueError):
    """A run folder or file that is missing, corrupt or inconsistent."""


# --------------------------------------------------------------------------------------------
# Folders and files


def check_writable_folder(path: Path | str, *, what: str) -> None:
    """Refuse, in one line, a folder that cannot be written or created: a file in the way, or no
    write permission (or a read-only file system) where it is or would be created. Called before
    any work, so that nothing is half-written."""
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


def save_tensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Write ``tensors`` as one safetensors file; returns the hex sha256 of the bytes written."""
    data, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory: a network-shared AFU appears once per
        # layer in a state_dict, so later copies are cloned
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        data[k] = v
    raw = save_safetensors_bytes(data, metadata=metadata)
    atomic_write_bytes(path, raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class TensorFile:
    """A safetensors file whose header has been read and checked for form, its data not yet:
    what a reader checks (names, dtypes, shapes) before it reads or allocates anything."""

    path: Path
    size: int  # bytes, as fstat gave them; the header's offsets cover exactly the rest
    header: bytes  # the 8-byte length and the JSON header, to recognise the file when read
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)
    metadata: dict[str, str]


def read_tensor_header(path: Path, *, limit: int) -> TensorFile:
    """The header of safetensors file ``path`` (a regular file of at most ``limit`` bytes),
    refused unless every tensor's dtype, shape and byte range agree and the ranges fill the
    file exactly; ArtifactError otherwise. No tensor data is read."""
    try:
        with open_regular_file(path, limit=limit) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
            if length is not None and length <= min(size - 8, MAX_TENSOR_HEADER_BYTES):
                text = f.read(length)
    except UnreadableFile as e:
        raise ArtifactError(str(e)) from None
    except OSError as e:
        raise ArtifactError(f"{path}: {e.strerror or e}") from None
    bad = f"{path}: not a readable safetensors file"
    if length is None:
        raise ArtifactError(f"{bad} ({size} bytes, fewer than its 8-byte header length)")
    if length > min(size - 8, MAX_TENSOR_HEADER_BYTES):
        raise ArtifactError(
            f"{bad} (header length {length}; the file holds {size - 8} bytes after it, and a "
            f"header may hold at most {MAX_TENSOR_HEADER_BYTES})"
        )
    try:
        header = parse_json(text)
    except JsonError as e:
        raise ArtifactError(f"{bad} (header: {e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{bad} (header: not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ArtifactError(f"{bad} (header: __metadata__ is not an object of strings)")
    tensors, ranges = {}, []
    for name, entry in header.items():
        dtype, shape, offsets = (
            (entry.get("dtype"), entry.get("shape"), entry.get("data_offsets"))
            if isinstance(entry, dict) and len(entry) == 3
            else (None, None, None)
        )
        if not (
            dtype in SAFETENSORS_DTYPES
            and _is_int_list(shape)
            and _is_int_list(offsets)
            and len(offsets) == 2
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ArtifactError(
                f"{bad} (header entry {_short(name)} is not a dtype, a shape and two offsets)"
            )
        if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise ArtifactError(
                f"{bad} (tensor {_short(name)}: {dtype} {shape} takes "
                f"{math.prod(shape) * SAFETENSORS_DTYPES[dtype]} bytes, its offsets "
                f"{offsets[1] - offsets[0]})"
            )
        tensors[name] = (dtype, tuple(shape))
        ranges.append(offsets)
    end = 0
    for begin, stop in sorted(ranges):
        if begin != end:
            break
        end = stop
    if end != size - 8 - length:
        raise ArtifactError(
            f"{bad} (its tensors do not fill the {size - 8 - length} bytes after the header "
            "exactly, one after another)"
        )
    return TensorFile(Path(path), size, prefix + text, tensors, metadata)


def read_tensor_data(file: TensorFile) -> tuple[dict[str, Tensor], str]:
    """The tensors of ``file`` (its header read and checked by the caller) and the hex sha256
    of the file's bytes, both from one read; ArtifactError when the file is no longer the one
    whose header was read."""
    try:
        data = read_regular_file(file.path, limit=file.size)
    except UnreadableFile as e:
        raise ArtifactError(f"{e} (it changed while it was read)") from None
    if len(data) != file.size or not data.startswith(file.header):
        raise ArtifactError(f"{file.path}: changed while it was read")
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{file.path}: not a readable safetensors file ({e})") from None
    return tensors, hashlib.sha256(data).hexdigest()


def check_tensor_layout(
    file: TensorFile,
    expected: dict[str, tuple[str, tuple[int, ...]]],
    *,
    optional: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    mismatch: str = "tensors do not match",
) -> None:
    """SpecError unless ``file`` holds every tensor of ``expected`` (and may hold those of
    ``optional``), no other, each of its (dtype, shape)."""
    allowed = expected | (optional or {})
    missing = sorted(set(expected) - set(file.tensors))
    unexpected = sorted(set(file.tensors) - set(allowed))
    if missing or unexpected:
        parts = [
            f"missing tensor(s) {_names(missing)}" if missing else "",
            f"unexpected tensor(s) {_names(unexpected)}" if unexpected else "",
        ]
        raise SpecError(f"{mismatch}: " + "; ".join(p for p in parts if p))
    for name in (name for name in allowed if name in file.tensors):  # in the expected order
        (dtype, shape), (want_dtype, want_shape) = file.tensors[name], allowed[name]
        if dtype != want_dtype:
            raise SpecError(f"tensor {name}: dtype {dtype}, expected {want_dtype}")
        if shape != want_shape:
            raise SpecError(f"tensor {name}: expected shape {list(want_shape)}, got {list(shape)}")


def load_tensors(path: Path, *, limit: int = MAX_WEIGHTS_BYTES) -> dict[str, Tensor]:
    """Every tensor of safetensors file ``path`` (at most ``limit`` bytes)."""
    return read_tensor_data(read_tensor_header(path, limit=limit))[0]


def read_json(path: Path, *, limit: int = MAX_SPEC_BYTES) -> Any:
    """The JSON value in ``path`` (a regular file of at most ``limit`` bytes, nested at most
    contract.MAX_JSON_DEPTH deep); ArtifactError otherwise."""
    try:
        return parse_json(read_regular_file(path, limit=limit))
    except UnreadableFile as e:
        raise ArtifactError(str(e)) from None
    except JsonError as e:
        raise ArtifactError(f"{path}: {e}") from None


def nonfinite_tensors(tensors: dict[str, Tensor], *, noun: str = "tensor") -> list[str]:
    """'{noun} NAME holds 3 NaN values' for each floating-point tensor with NaN or inf, by name."""
    verb = "hold" if noun.endswith("s") else "holds"
    return [
        f"{noun} {name} {verb} {count}"
        for name, tensor in sorted(tensors.items())
        if tensor.is_floating_point() and (count := nonfinite_count(tensor))
    ]


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _names(names: Sequence[str], most: int = 8) -> str:
    """'a, b, c' naming at most ``most`` of them: a hostile file stays a one-line message."""
    shown = ", ".join(_short(n, 60) for n in names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# --------------------------------------------------------------------------------------------
# The trained model


def save_model(run_dir: Path, spec: ModelSpec, state: dict[str, Tensor]) -> None:
    """Weights first, spec last: a model.json on disk means its weights are complete; it records
    the weights' sha256 (WEIGHTS_DIGEST), so that a reader knows the two belong together."""
    digest = save_tensors(run_dir / MODEL_WEIGHTS, state, metadata={"format": spec.format})
    record = {**spec.to_dict(), WEIGHTS_DIGEST: digest}
    atomic_write_text(run_dir / MODEL_SPEC, json.dumps(record, indent=1) + "\n")


def read_spec(run_dir: Path | str) -> tuple[ModelSpec, str | None]:
    """model.json's spec, validated, and the digest of model.safetensors it records (None for
    a run saved before runs recorded one)."""
    path = Path(run_dir) / MODEL_SPEC
    data = read_json(path, limit=MAX_SPEC_BYTES)
    digest = data.pop(WEIGHTS_DIGEST, None) if isinstance(data, dict) else None
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise ArtifactError(
            f"{path}: field '{WEIGHTS_DIGEST}': expected 64 lowercase hexadecimal digits, "
            f"got {_short(repr(digest))}"
        )
    try:
        return ModelSpec.from_dict(data), digest
    except SpecError as e:
        raise ArtifactError(f"{path}: {e}") from None


_SHA256 = re.compile(r"[0-9a-f]{64}")


def load_spec(run_dir: Path | str) -> ModelSpec:
    return read_spec(run_dir)[0]


def weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The tensors of model.safetensors and their shapes, from the spec alone (nothing is
    allocated): an MLP's layers.{i}.weight (out, in) and layers.{i}.bias (out,), a layered
    spec's per spec layer (contract.layered_weight_shapes), the AFU's per hidden layer."""
    shapes: dict[str, tuple[int, ...]] = {}
    if spec.is_layered:
        shapes = layered_weight_shapes(spec.layers, spec.input_shape)
    else:
        for i, (a, b) in enumerate(itertools.pairwise(spec.arch)):
            shapes[f"layers.{i}.weight"] = (b, a)
            shapes[f"layers.{i}.bias"] = (b,)
    return shapes | afu_expected_shapes(spec.afu, len(spec.hidden_widths))


def nonfinite_count(values: Tensor) -> str | None:
    """'3 NaN values', '1 inf value', '2 NaN and 1 inf values'; None when all are finite."""
    nan, inf = int(values.isnan().sum()), int(values.isinf().sum())
    if not nan and not inf:
        return None
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    return f"{' and '.join(p for p in parts if p)} value{'s' if nan + inf > 1 else ''}"


def load_model(run_dir: Path | str) -> tuple[ModelSpec, MixedNetwork]:
    """Rebuild the trained network (eval mode) from model.json + model.safetensors alone.

    An MLP run gives a ``MixedMLP`` reading (N, D) raw features; a layered run (spec ``layers``,
    a conv net) a ``MixedConvNet`` reading raw (N, C, H, W) = (N, *spec.input_shape), its
    frozen layers applying the candidate norm model.json's training section records under
    ``frozen_candidate_norm`` (absent: none). Both compute logits (N, classes), preprocessing
    included.

    In order: the spec (validated); NaN or inf in its preprocessing, by name (it would
    surface as a PyTorch/ONNX mismatch); the weights' header against the spec (every
    tensor float32, of the architecture's names and shapes) before any byte of data is read or
    any network allocated; NaN or inf in the weights, by name; then the network. Last, the
    weights' sha256, computed on the bytes the network was loaded from, against the one
    model.json records: a mismatch means the folder changed while it was read (a retraining
    in progress) or one of the two files was replaced since. A run saved before the digest was
    recorded loads with a one-line warning on stderr saying its pair is not checked.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: run folder not found")
    spec, recorded = read_spec(run_dir)
    problems = []
    for key in ("offset", "scale"):
        try:
            values = torch.as_tensor(spec.preprocessing[key], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError):  # e.g. a 400-digit integer
            raise ArtifactError(
                f"{run_dir / MODEL_SPEC}: preprocessing {key} is not a number or a list of numbers"
            ) from None
        if count := nonfinite_count(values):
            problems.append(f"preprocessing {key} holds {count}")
    if problems:
        raise ArtifactError(f"{run_dir / MODEL_SPEC}: {'; '.join(problems)}")
    path = run_dir / MODEL_WEIGHTS
    file = read_tensor_header(path, limit=MAX_WEIGHTS_BYTES)
    expected = {name: ("F32", shape) for name, shape in weight_shapes(spec).items()}
    try:
        check_tensor_layout(file, expected, mismatch="weights do not match the architecture")
    except SpecError as e:
        raise ArtifactError(f"{path}: {e}") from None
    state, digest = read_tensor_data(file)
    if problems := nonfinite_tensors(state, noun="weights"):
        raise ArtifactError(f"{path}: {'; '.join(problems)}")
    if spec.is_layered:
        norm = spec.training.get(FROZEN_CANDIDATE_NORM, "none")
        if norm not in CANDIDATE_NORMS:
            raise ArtifactError(
                f"{run_dir / MODEL_SPEC}: spec field 'training.{FROZEN_CANDIDATE_NORM}': "
                f"expected one of {', '.join(CANDIDATE_NORMS)}, got {_short(repr(norm))}"
            )
        model: MixedNetwork = MixedConvNet.from_spec(spec, candidate_norm=norm)
    else:
        model = MixedMLP.from_spec(spec)
    try:
        model.load_canonical_state_dict(state)
    except SpecError as e:
        raise ArtifactError(f"{path}: {e}") from None
    if recorded is None:
        print(
            f"smartmixed: warning: {run_dir / MODEL_SPEC} records no {WEIGHTS_DIGEST} (saved "
            f"before runs recorded one): {MODEL_WEIGHTS} is loaded without checking that the "
            "two belong together",
            file=sys.stderr,
        )
    elif digest != recorded:
        raise ArtifactError(
            f"{run_dir}: {MODEL_WEIGHTS} is not the file {MODEL_SPEC} was saved with (its "
            f"sha256 differs from the recorded {WEIGHTS_DIGEST}): the run folder changed while "
            "it was read (retrained?) or one of the two files was replaced; read it again once "
            "nothing writes to it"
        )
    return spec, model.eval()


# --------------------------------------------------------------------------------------------
# History and checkpoints (for --resume)


def write_history(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / HISTORY, "".join(json.dumps(r) + "\n" for r in history))


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY
    if not path.exists():
        return []
    try:
        text = read_regular_file(path, limit=MAX_HISTORY_BYTES).decode()
        return [parse_json(line) for line in text.splitlines() if line.strip()]
    except UnreadableFile as e:
        raise ArtifactError(str(e)) from None
    except (JsonError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: {e}") from None


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


def read_checkpoint(run_dir: Path) -> tuple[TensorFile, dict[str, Any]]:
    """The checkpoint's header (its tensors' names, dtypes and shapes; no data read) and its
    JSON state, an object of the objects ``config``, ``optimizer`` and ``run``; ArtifactError
    otherwise. What each field must hold is the training loop's to check
    (``loop._Run._restore``)."""
    path = run_dir / CHECKPOINT
    if not (path.exists() or path.is_symlink()):
        raise ArtifactError(f"{path}: no checkpoint to resume from")
    file = read_tensor_header(path, limit=MAX_CHECKPOINT_BYTES)
    if "state" not in file.metadata:
        raise ArtifactError(f"{path}: not a checkpoint (its metadata holds no 'state')")
    try:
        state = parse_json(file.metadata["state"])
    except JsonError as e:
        raise ArtifactError(f"{path}: metadata 'state': {e}") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{path}: metadata 'state': expected a JSON object")
    for key in ("config", "optimizer", "run"):
        if not isinstance(state.get(key), dict):
            got = (
                "missing" if key not in state else f"is {json_type_name(state[key])}, not an object"
            )
            raise ArtifactError(f"{path}: metadata 'state': field '{key}' {got}")
    return file, state


def remove_checkpoint(run_dir: Path) -> None:
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
