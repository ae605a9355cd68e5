"""Transformations of any model that holds mixed-activation layers: freeze, inspect, save, load.

``freeze`` swaps every ``MixedActivation`` for its ``FrozenMixedActivation`` (the argmax of its
logits), in place, and returns the model: what it replaced is ``assignment(model)``.
``save_frozen`` / ``load_frozen`` store a frozen model as safetensors (``model.state_dict()``)
plus a JSON file naming each frozen layer's pool, axis and assignment: no pickle, and loading
executes no code (the user's own code builds the module; these files only fill it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from smartmixed.contract import JsonError, SpecError, check_afu_config, parse_json
from smartmixed.nn.layers import AFUnit, FrozenMixedActivation, MixedActivation

FROZEN_FORMAT = "smartmixed.frozen/1"
MAX_FROZEN_JSON_BYTES = 64 * 2**20
# the keys of one frozen layer's entry in the JSON file, each with what it must be
LAYER_FIELDS = ("pool", "dim", "candidate_norm", "assignment", "afu")


class FrozenFileError(ValueError):
    """Frozen weights or their JSON that do not fit the model; the message names file and field."""


def mixed_layers(model: nn.Module) -> Iterator[tuple[str, MixedActivation]]:
    """(module path, layer) of every phase-1 ``MixedActivation``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MixedActivation):
            yield name, module


def frozen_layers(model: nn.Module) -> Iterator[tuple[str, FrozenMixedActivation]]:
    for name, module in model.named_modules():
        if isinstance(module, FrozenMixedActivation):
            yield name, module


def selection_logits(model: nn.Module) -> list[nn.Parameter]:
    """The selection logits of every ``MixedActivation``: give them their own optimizer group
    (their learning rate is a control of the method, not the weights')."""
    return [layer.logits for _, layer in mixed_layers(model)]


def set_temperature(model: nn.Module, tau: float) -> None:
    """tau of every ``MixedActivation`` (a schedule sets it per epoch)."""
    for _, layer in mixed_layers(model):
        layer.tau = tau


def assignment(model: nn.Module) -> dict[str, list[str]]:
    """Module path -> activation name per feature, for phase-1 layers (argmax of the logits) and
    frozen ones alike."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MixedActivation):
            out[name] = [module.pool[k] for k in module.choice().tolist()]
        elif isinstance(module, FrozenMixedActivation):
            out[name] = module.names()
    return out


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def freeze(model: nn.Module) -> nn.Module:
    """Replace every ``MixedActivation`` of ``model`` by its frozen form (argmax), in place.

    Returns the model (the frozen layer itself when ``model`` is one ``MixedActivation``). Each
    frozen layer's forward equals the phase-1 layer's eval forward. A learned unit shared by
    several layers stays shared. ValueError when the model holds no mixed layer at all.
    """
    if isinstance(model, MixedActivation):
        return model.frozen()
    layers = list(mixed_layers(model))
    if not layers and not any(True for _ in frozen_layers(model)):
        raise ValueError(
            f"freeze: {type(model).__name__} holds no MixedActivation (nothing to freeze)"
        )
    for path, layer in layers:
        _replace(model, path, layer.frozen())
    return model


# --------------------------------------------------------------------------------------------
# Files


def _describe(layer: FrozenMixedActivation) -> dict[str, Any]:
    afu = None if layer.afu is None else {"units": layer.afu.units, "base": layer.afu.base}
    return {
        "pool": layer.pool,
        "dim": layer.dim,
        "candidate_norm": layer.candidate_norm,
        "assignment": layer.names(),
        "afu": afu,
    }


def frozen_paths(path: Path | str) -> tuple[Path, Path]:
    """(weights, description): FILE.safetensors and FILE.json beside it."""
    path = Path(path)
    return path, path.with_suffix(".json")


def save_frozen(model: nn.Module, path: Path | str) -> tuple[Path, Path]:
    """Write ``model.state_dict()`` to ``path`` (safetensors) and its frozen layers to
    ``path.with_suffix('.json')``, each through a temporary file renamed into place (the JSON
    last: it holds the weights' sha256, so a pair from two saves is refused on load).

    ValueError when a ``MixedActivation`` is left: freeze first."""
    from safetensors.torch import save_file

    left = [name for name, _ in mixed_layers(model)]
    if left:
        raise ValueError(
            f"save_frozen: layer(s) {', '.join(left)} are not frozen; call freeze(model) first"
        )
    weights, spec = frozen_paths(path)
    tensors = _unique_state(model)
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file(tensors, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    description = {
        "format": FROZEN_FORMAT,
        "layers": {name: _describe(layer) for name, layer in frozen_layers(model)},
        "weights_sha256": digest,
    }
    tmp_json = spec.with_name(f".{spec.name}.tmp")
    tmp_json.write_text(json.dumps(description, indent=1))
    os.replace(tmp, weights)
    os.replace(tmp_json, spec)
    return weights, spec


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """state_dict with tensors that share storage (a shared unit, tied weights) cloned, as
    safetensors refuses shared memory; contiguous copies."""
    seen: set[int] = set()
    out = {}
    for key, value in model.state_dict().items():
        tensor = value.detach()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def _read_description(spec: Path) -> dict[str, Any]:
    def refuse(problem: str) -> FrozenFileError:
        return FrozenFileError(f"{spec}: {problem}")

    try:
        size = spec.stat().st_size
        if size > MAX_FROZEN_JSON_BYTES:
            raise refuse(f"{size} bytes, more than the {MAX_FROZEN_JSON_BYTES} a description holds")
        data = parse_json(spec.read_bytes())
    except OSError as e:
        raise refuse(f"cannot read ({e.strerror or e})") from None
    except JsonError as e:
        raise refuse(str(e)) from None
    if not isinstance(data, dict) or data.get("format") != FROZEN_FORMAT:
        raise refuse(f"not a frozen-model description (expected format {FROZEN_FORMAT!r})")
    if not isinstance(data.get("layers"), dict) or not data["layers"]:
        raise refuse("field 'layers': expected an object with one entry per frozen layer")
    for name, entry in data["layers"].items():
        if not isinstance(entry, dict) or sorted(entry) != sorted(LAYER_FIELDS):
            raise refuse(f"layer {name!r}: expected an object with keys {', '.join(LAYER_FIELDS)}")
        if not isinstance(entry["dim"], int) or isinstance(entry["dim"], bool):
            raise refuse(f"layer {name!r} field 'dim': expected an integer")
    if not isinstance(data.get("weights_sha256"), str):
        raise refuse("field 'weights_sha256': expected the hex sha256 of the weights")
    return data


def _frozen_layer(name: str, entry: dict[str, Any], old: nn.Module, spec: Path) -> nn.Module:
    try:
        shared = getattr(old, "afu", None)
        afu = shared if isinstance(shared, AFUnit) else entry["afu"]
        if entry["afu"] is not None:
            check_afu_config(entry["afu"])
        return FrozenMixedActivation(
            entry["pool"],
            entry["assignment"],
            dim=entry["dim"],
            candidate_norm=entry["candidate_norm"],
            afu=afu,
        )
    except (SpecError, ValueError) as e:
        raise FrozenFileError(f"{spec}: layer {name!r}: {e}") from None


def load_frozen(model: nn.Module, path: Path | str) -> nn.Module:
    """Fill ``model`` (built by the user's own code, with ``MixedActivation`` or frozen layers
    where the saved model had them) from ``save_frozen``'s two files: each listed layer becomes
    the saved ``FrozenMixedActivation``, then every tensor is loaded (strict: the same names and
    shapes). FrozenFileError names the file and what does not fit; the model is left untouched
    when anything is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights, spec = frozen_paths(path)
    description = _read_description(spec)
    try:
        raw = weights.read_bytes()
    except OSError as e:
        raise FrozenFileError(f"{weights}: cannot read ({e.strerror or e})") from None
    if hashlib.sha256(raw).hexdigest() != description["weights_sha256"]:
        raise FrozenFileError(
            f"{weights}: its sha256 is not the one {spec.name} records (files from two saves?)"
        )
    try:
        tensors = load(raw)
    except (SafetensorError, ValueError) as e:
        raise FrozenFileError(f"{weights}: not a safetensors file ({e})") from None
    listed = description["layers"]
    replacements = {}
    for name, entry in listed.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FrozenFileError(
                f"{spec}: layer {name!r}: the model has no module there"
            ) from None
        if not isinstance(old, MixedActivation | FrozenMixedActivation):
            raise FrozenFileError(
                f"{spec}: layer {name!r}: the model has a {type(old).__name__} there, expected a "
                "MixedActivation"
            )
        new = _frozen_layer(name, entry, old, spec)
        if new.num_features != old.num_features:
            raise FrozenFileError(
                f"{spec}: layer {name!r}: {new.num_features} features saved, the model's layer "
                f"has {old.num_features}"
            )
        replacements[name] = new
    unlisted = [name for name, _ in mixed_layers(model) if name not in listed]
    if unlisted:
        raise FrozenFileError(
            f"{spec}: does not list the model's mixed layer(s) {', '.join(unlisted)}"
        )
    _check_tensors(model, replacements, tensors, weights)
    for name, new in replacements.items():
        _replace(model, name, new)
    model.load_state_dict(tensors, strict=True)
    return model


def _check_tensors(
    model: nn.Module, replacements: dict[str, nn.Module], tensors: dict[str, Tensor], weights: Path
) -> None:
    """The saved tensors have the names and shapes of the model as it will be (its listed layers
    frozen), or FrozenFileError lists what differs: checked before anything is replaced."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for name, new in replacements.items():
        expected = {k: v for k, v in expected.items() if not k.startswith(f"{name}.")}
        expected |= {f"{name}.{k}": tuple(v.shape) for k, v in new.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k} saved {list(tensors[k].shape)}, model {list(expected[k])}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != expected[k]
    ]
    problems = [
        f"missing tensor(s) {', '.join(missing[:8])}" if missing else "",
        f"unexpected tensor(s) {', '.join(unexpected[:8])}" if unexpected else "",
        f"shape(s) differ: {'; '.join(wrong[:8])}" if wrong else "",
    ]
    if any(problems):
        raise FrozenFileError(
            f"{weights}: does not fit the model: {'; '.join(p for p in problems if p)}"
        )
