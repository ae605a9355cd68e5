"""Export a user's own ``nn.Module`` holding frozen mixed-activation layers (smartmixed.nn).

    from smartmixed.export import export_module
    export_module(model, torch.zeros(1, 1, 28, 28), repository="models", name="net")

The module goes through torch's ONNX exporter (the TorchScript one, ``dynamo=False``: the
torch.export-based one needs onnxscript, and this one traces each FrozenMixedActivation to the
ops its forward runs), wrapped so that the graph has the contract's tensors: input "input"
float32 [N, *example_input.shape[1:]] (dynamic batch), outputs "logits" [N, C] and
"probabilities" = softmax(logits) [N, C]. Four lowerings of every frozen layer:

- ``scatter``: the layer as it is. Per activation group, a Gather of its features along the
  layer's axis, the group's activation, then one Concat and one Gather with the inverse
  permutation (nn/layers.py ``_apply_groups``; a layer whose assignment is already sorted by
  pool index runs Split instead, a layer with one group one op).
- ``permuted``, ``folded``, ``folded_tanh``: a rewritten copy of the model that computes the
  same function, its frozen layers' groups made contiguous (the permutation folded into the
  neighbouring Linear, Conv2d and BatchNorm), fewer groups by exact algebra in those neighbours,
  a monotone layer run after its max pool (export/folds.py, found with torch.fx).

In ``scatter`` and ``permuted`` the candidate norm's per-group affine map (Sub, Mul after each
activation) stays in the graph. ``auto`` verifies and times scatter and each other lowering
that changes something (``module_lowerings``) and keeps the fastest (export/autotune.py).

A model is exported only when every mixed layer is frozen (``smartmixed.nn.freeze``), and it
must hold at least one: a model with no mixed layer has nothing of SmartMixed to record (its
spec would have no hidden layer); ``torch.onnx.export`` it directly. The model's own
preprocessing is the user's business: ``preprocessing`` only records what the module does to
raw input (None: identity), nothing is added to the graph.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from smartmixed.contract import (
    ACTIVATION_NAMES,
    AFU,
    INPUT,
    LOGITS,
    PROBABILITIES,
    ModelSpec,
    SpecError,
    split_list,
)
from smartmixed.export.autotune import AUTO, AUTO_BATCHES, choose_lowering
from smartmixed.export.entry import ExportError, check_fits_entry
from smartmixed.export.folds import (
    MODULE_LOWERINGS,
    FoldedMixedActivation,
    LayerFold,
    LayerMerge,
    first_line,
    folded_copy,
    lowered_network,
    module_lowerings,
    permuted_copy,
    plan_folds,
    plan_merge,
)
from smartmixed.export.lower import DEFAULT_OPSET, IO_AXES, MIN_OPSET
from smartmixed.export.repository import (
    EntryRequest,
    ExportResult,
    auto_timing,
    check_destination,
    entry_report,
    raw_input_range,
    write_result,
)
from smartmixed.export.verify import input_sets, verify_against_torch
from smartmixed.nn import frozen_layers, mixed_layers

# the newest opset torch's TorchScript exporter writes
MAX_MODULE_OPSET = 20
WRAPPED = "model"  # the wrapper's attribute holding the model: ONNX node scopes "/model.{path}/"
# The exporter's own notices that it is the legacy one (we choose it: see the module docstring),
# silenced by message, nothing else.
EXPORTER_NOTICES = (
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed",
)

# --------------------------------------------------------------------------------------------
# torch -> ONNX


class WithProbabilities(nn.Module):
    """The model's logits (N, C) and softmax(logits) (N, C): the contract's two outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, model)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = getattr(self, WRAPPED)(x)
        return logits, torch.softmax(logits, dim=1)


def to_onnx(model: nn.Module, example: Tensor, *, opset: int) -> onnx.ModelProto:
    """``model`` (eval mode) through torch's TorchScript ONNX exporter: input "input" with a
    dynamic batch, outputs "logits" and "probabilities" (IO_AXES)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        for notice in EXPORTER_NOTICES:
            warnings.filterwarnings("ignore", message=notice, category=DeprecationWarning)
        # _apply_groups splits by len() of each group's index tensor: constants of the layer,
        # not shapes of the input, so the traced sizes hold for every input
        warnings.filterwarnings(
            "ignore",
            message="Using len to get tensor shape",
            category=torch.jit.TracerWarning,
            module=r"smartmixed\.nn\.layers",
        )
        try:
            torch.onnx.export(
                WithProbabilities(model).eval(),
                (example,),
                buffer,
                input_names=[INPUT],
                output_names=[LOGITS, PROBABILITIES],
                dynamic_axes=IO_AXES,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as e:  # an op the exporter cannot write, at this opset or any
            raise ExportError(
                f"torch's ONNX exporter cannot export {type(model).__name__} at opset {opset} "
                f"({first_line(e)})"
            ) from None
    return onnx.load_model_from_string(buffer.getvalue())


def _scope_name(qualified: str) -> str:
    """The scope name torch's TorchScript exporter gives the module at ``qualified`` (its
    ``_unqualified_variable_name``): from the last non-numeric atom on, "model.mlp.1" -> "mlp.1",
    "model.2" -> "model.2"."""
    atoms = qualified.split(".")
    for i in reversed(range(len(atoms))):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return qualified


def layer_nodes(model: onnx.ModelProto, path: str) -> list[onnx.NodeProto]:
    """The nodes torch's exporter wrote for the module at ``path`` of the exported model: a
    node is named "/" + the scope names of the modules from the wrapper down + "/" + its op,
    where a container that is never called (nn.ModuleList, nn.ModuleDict: "activations" of
    "activations.0") writes no scope of its own, so a node's scopes run through a subsequence
    of the path's, from the wrapper's to the module's."""
    atoms = [WRAPPED, *path.split(".")] if path else [WRAPPED]
    scopes = [_scope_name(".".join(atoms[: i + 1])) for i in range(len(atoms))]

    def inside(parts: list[str]) -> bool:
        if not parts or parts[0] != scopes[0]:
            return False
        at = 0  # scopes[at] matched parts[i]; the next part matches a later scope
        for part in parts[1:]:
            if at == len(scopes) - 1:
                return True  # the module's own scope is reached: the rest are its children
            later = [j for j in range(at + 1, len(scopes)) if scopes[j] == part]
            if not later:
                return False
            at = later[0]
        return at == len(scopes) - 1

    return [n for n in model.graph.node if inside(n.name.split("/")[1:-1])]


def layer_structure(model: onnx.ModelProto, paths: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per frozen layer: its ONNX op types and their counts (Constant nodes left out)."""
    return {
        path: dict(
            sorted(
                Counter(
                    n.op_type for n in layer_nodes(model, path) if n.op_type != "Constant"
                ).items()
            )
        )
        for path in paths
    }


# --------------------------------------------------------------------------------------------
# The entry


def module_spec(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    classes: int,
    labels: Sequence[str] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> ModelSpec:
    """The ModelSpec (META_SPEC) of a user's module: arch = [prod(input_shape), each frozen
    layer's num_features in module order, classes], pool = the union of the layers' pools in
    the contract's order, an assignment per frozen layer, ``layers`` None; the layers' module
    paths in ``training["frozen_layers"]``. SpecError names a bad field."""
    layers = list(frozen_layers(model))
    pools = {name for _, layer in layers for name in layer.pool}
    units = [layer.afu for _, layer in layers if layer.afu is not None]
    afu = None
    if units:
        share = "network" if all(u is units[0] for u in units) else "layer"
        afu = {"units": units[0].units, "base": units[0].base, "share": share}
    cls = type(model)
    return ModelSpec(
        arch=[math.prod(input_shape), *(layer.num_features for _, layer in layers), classes],
        pool=[name for name in ACTIVATION_NAMES if name in pools],
        mode="smartmixed",
        assignment=[layer.names() for _, layer in layers],
        preprocessing=dict(preprocessing) if preprocessing else {"offset": 0.0, "scale": 1.0},
        input_shape=list(input_shape),
        labels=list(labels) if labels is not None else [str(i) for i in range(classes)],
        training={
            "exported_from": "module",
            "module": f"{cls.__module__}.{cls.__qualname__}",
            "frozen_layers": [path for path, _ in layers],
            "preprocessing": "inside the module" if preprocessing else "none",
        },
        afu=afu if AFU in pools else None,
    )


def _checked_model(model: Any) -> nn.Module:
    """An eval-mode CPU copy of ``model``, or ExportError (one line) saying what is wrong."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_module: expected a torch.nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    left = [path or name for path, _ in mixed_layers(model)]
    if left:
        raise ExportError(
            f"{name}: {', '.join(left)} still a MixedActivation; freeze it first "
            "(smartmixed.nn.freeze(model))"
        )
    if not any(True for _ in frozen_layers(model)):
        raise ExportError(
            f"{name} holds no FrozenMixedActivation: nothing SmartMixed to export "
            "(torch.onnx.export it directly)"
        )
    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ExportError(
                f"{name}: {key} is {str(tensor.dtype).removeprefix('torch.')}; the exported graph "
                "reads float32 (model.float())"
            )
    return copy.deepcopy(model).cpu().eval()


def _checked_example(reference: nn.Module, example: Any) -> tuple[Tensor, int]:
    """(the example as a CPU float32 tensor, the number of classes of the model's logits)."""
    if not isinstance(example, Tensor):
        raise ExportError(f"example_input: expected a torch.Tensor, got {type(example).__name__}")
    if example.dim() < 2 or example.shape[0] < 1 or example.numel() == 0:
        raise ExportError(
            f"example_input: expected a batch (N, ...) of N >= 1 samples, got shape "
            f"{list(example.shape)}"
        )
    if example.dtype != torch.float32:
        raise ExportError(f"example_input: expected float32, got {example.dtype}")
    example = example.detach().cpu()
    try:
        with torch.no_grad():
            logits = reference(example)
    except Exception as e:
        raise ExportError(
            f"the model fails on an input of shape {list(example.shape)} ({first_line(e)})"
        ) from None
    if not (isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[0] == len(example)):
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ExportError(
            f"the model's output on shape {list(example.shape)} is {got}; expected logits "
            f"({len(example)}, classes)"
        )
    if logits.shape[1] < 2 or logits.dtype != torch.float32:
        raise ExportError(
            f"the model's logits are {logits.dtype} of shape {list(logits.shape)}; expected "
            "float32 with >= 2 classes"
        )
    return example, int(logits.shape[1])


def _checked_test_inputs(test_inputs: Any, shape: Sequence[int]) -> np.ndarray | None:
    if test_inputs is None:
        return None
    if isinstance(test_inputs, Tensor):
        test_inputs = test_inputs.detach().cpu().numpy()
    x = np.asarray(test_inputs, dtype=np.float32)
    if x.ndim < 1 or tuple(x.shape[1:]) != tuple(shape) or not len(x):
        raise ExportError(
            f"test_inputs: expected shape (N, {', '.join(map(str, shape))}) with N >= 1, got "
            f"{list(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise ExportError("test_inputs: holds NaN or inf")
    return x


def export_module(
    model: nn.Module,
    example_input: Tensor,
    *,
    repository: Path | str,
    name: str,
    lowering: str = AUTO,
    opset: int = DEFAULT_OPSET,
    labels: Sequence[str] | str | None = None,
    preprocessing: dict[str, Any] | None = None,
    test_inputs: np.ndarray | Tensor | None = None,
    version: int = 1,
    overwrite: bool = False,
    private: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    auto_batches: str | Sequence[int] = AUTO_BATCHES,
    max_queue_delay_us: int | None = None,
) -> ExportResult:
    """Lower a user's module holding ``FrozenMixedActivation`` layers to ONNX, verify every
    candidate lowering against the module (the original one), choose, and write one
    repository entry REPOSITORY/NAME atomically (nothing is written when anything fails).

    ``example_input`` (N, ...) float32 fixes the input's shape (the batch is dynamic) and is
    traced. ``lowering``: scatter, permuted, folded, folded_tanh (each layer reported:
    ``report["folds"]``) or auto (those that change something verified, timed on ``device``
    with ``threads`` at ``auto_batches``, the fastest kept: ``module_lowerings``).
    ``labels``: one per class (default "0".."C-1"); ``preprocessing``: {"offset", "scale"} the
    module applies itself, recorded only (default: none). ``test_inputs`` (M, *shape): verified
    on as the test set, beside random and edge inputs of the example's shape. The ModelSpec is
    ``module_spec``'s. ``max_queue_delay_us``: the batching delay config.pbtxt states (None:
    none, a server's own). ExportError (one line) for a request that cannot be carried out,
    VerificationError when ONNX Runtime and PyTorch disagree.
    """
    timing = auto_timing(device, threads, auto_batches)
    if lowering not in (*MODULE_LOWERINGS, AUTO):
        raise ExportError(
            f"--lowering {lowering!r}: a module is lowered auto, {', '.join(MODULE_LOWERINGS)}"
        )
    entry = check_destination(repository, name, version=version, overwrite=overwrite)
    request = EntryRequest(
        entry, version, lowering, opset, timing, overwrite, private, max_queue_delay_us
    )
    reference = _checked_model(model)
    example, classes = _checked_example(reference, example_input)
    shape = list(example.shape[1:])
    if isinstance(labels, str):
        labels = split_list(labels)
    try:
        spec = module_spec(
            reference,
            input_shape=shape,
            classes=classes,
            labels=labels,
            preprocessing=preprocessing,
        )
    except SpecError as e:
        raise ExportError(str(e)) from None
    test_x = _checked_test_inputs(test_inputs, shape)
    given = "no test inputs given; random and edge inputs only"
    if test_x is not None:
        given = f"{len(test_x)} test inputs given"
    source = Path(f"module {type(model).__name__}")
    return export_network(
        reference, spec=spec, test_x=test_x, test_source=given, source=source, run=None,
        request=request, example=example,
    )  # fmt: skip


def export_network(
    reference: nn.Module,
    *,
    spec: ModelSpec,
    test_x: np.ndarray | None,
    test_source: str,
    source: Path,
    run: str | None,
    request: EntryRequest,
    example: Tensor | None = None,
) -> ExportResult:
    """The common part of a module's and a layered run's export: lower each candidate
    (``request.lowering``, or ``module_lowerings`` for auto), verify it against ``reference``
    on the input sets (``test_x`` (N, *input_shape) when given, random and edge inputs over its
    range), time the candidates for auto, write the entry with ``spec`` as its META_SPEC (and
    ``run`` as META_RUN when the network comes from a run folder)."""
    if not MIN_OPSET <= request.opset <= MAX_MODULE_OPSET:
        raise ExportError(
            f"--opset {request.opset}: torch's exporter writes opset {MIN_OPSET} to "
            f"{MAX_MODULE_OPSET} for these layers"
        )
    reference = reference.eval()
    shape = list(spec.input_shape)
    raw_range = raw_input_range(spec, test_x)
    inputs = input_sets(shape, test_x=test_x, low=raw_range[0], high=raw_range[1])
    if example is None:
        example = torch.from_numpy(inputs["random"][:2])
    # the entry's other versions, checked again under the lock before anything is written
    check_fits_entry(
        request.entry, request.config(spec, dims=shape), version=request.version, run_dir=source
    )
    folds = plan_folds(reference, example)
    choice = choose_lowering(
        request.lowering,
        module_lowerings(reference, folds),
        lambda lowering: to_onnx(
            lowered_network(reference, folds, lowering), example, opset=request.opset
        ),
        shape=shape,
        verify=functools.partial(
            verify_against_torch, reference=reference, inputs=inputs, n_classes=spec.arch[-1]
        ),
        timing=request.timing,
    )
    origin = {"run": run} if run is not None else {"module": spec.training.get("module")}
    report = entry_report(origin, choice, request, "fp32", test_source, raw_range)
    paths = [path for path, _ in frozen_layers(reference)]
    report |= {
        "input_shape": shape,
        # what permuted and folded do with each frozen layer, whichever lowering is chosen
        "folds": [asdict(f) for f in folds],
        "affine_fold": (
            "scatter, permuted: each group's candidate-norm Sub/Mul stays in the graph; folded, "
            "folded_tanh: moved into the consumer where exact (folds[].folded)"
        ),
        "structure": {c: layer_structure(m, paths) for c, m in choice.models.items()},
    }
    return write_result(request, spec, choice.model, report, source=source, dims=shape)


__all__ = [
    "MODULE_LOWERINGS",
    "FoldedMixedActivation",
    "LayerFold",
    "LayerMerge",
    "WithProbabilities",
    "export_module",
    "export_network",
    "folded_copy",
    "layer_nodes",
    "layer_structure",
    "lowered_network",
    "module_lowerings",
    "module_spec",
    "permuted_copy",
    "plan_folds",
    "plan_merge",
    "to_onnx",
]
