"""Export a trained run into a Triton-compatible model repository entry, verified first.

    models/NAME/config.pbtxt        platform onnxruntime_onnx, dynamic batch, input/output specs
    models/NAME/VERSION/model.onnx  metadata_props: spec, lowering, verification, versions
    models/NAME/VERSION/export.json the verification report (and, for auto, the timings)

With ``quantize="int8"`` the entry (NAME-int8 by default) holds ONNX Runtime's dynamic INT8
quantization of the verified fp32 lowering, judged by its own rule (export/quantize.py).

Writing the entry (export/entry.py) is safe against a concurrent export and a kill at any point.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from smartmixed.contract import (
    CONFIG_FILE,
    DEFAULT_PRECISION,
    INPUT,
    LOGITS,
    META_LOWERING,
    META_PRECISION,
    META_QUANTIZATION,
    META_RUN,
    META_SELECTION,
    META_SPEC,
    META_VERIFICATION,
    META_VERSIONS,
    MODEL_FILE,
    PLATFORM,
    PROBABILITIES,
    JsonError,
    ModelSpec,
    package_versions,
    parse_json,
    parse_positive_ints,
)
from smartmixed.contract.files import UnreadableFile, read_regular_file
from smartmixed.export.autotune import AUTO, AUTO_BATCHES, Choice, Timing, choose_lowering
from smartmixed.export.entry import ExportError, check_fits_entry, write_entry
from smartmixed.export.lower import (
    DEFAULT_OPSET,
    LOWERINGS,
    distinct_lowerings,
    get_metadata,
    lower,
    lowering_summary,
    set_metadata,
)
from smartmixed.export.quantize import (
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MIN_AGREEMENT,
    Int8Rule,
    quantize_int8,
    quantize_verified,
    verify_quantized,
)
from smartmixed.export.verify import input_sets, verify_against_torch
from smartmixed.serve.model_config import (
    ConfigError,
    check_model_config,
    is_version_name,
)
from smartmixed.serve.models import MAX_CONFIG_BYTES, MAX_MODEL_BYTES
from smartmixed.train.artifacts import check_writable_folder, load_model
from smartmixed.train.data import IDX_SOURCES, DataError, load_dataset

if TYPE_CHECKING:
    from torch import nn

MAX_BATCH_SIZE = 1024  # Triton: the largest batch a request (or a dynamic batch) may hold


@dataclass
class ExportResult:
    entry: Path
    version: int
    lowering: str
    report: dict[str, Any]


@dataclass(frozen=True)
class EntryRequest:
    """What an export carries from its options to its entry, whatever it exports (a run, a
    module): where it writes (``entry``, ``version``, ``overwrite``, ``private``), how it
    lowers (``lowering`` as requested, auto or one; ``opset``; ``timing`` for auto), and the
    batching delay its config.pbtxt states (None: none, the server's own applies)."""

    entry: Path
    version: int
    lowering: str
    opset: int
    timing: Timing
    overwrite: bool
    private: bool
    max_queue_delay_us: int | None = None

    def __post_init__(self) -> None:
        delay = self.max_queue_delay_us
        if delay is not None and (
            isinstance(delay, bool) or not isinstance(delay, int) or delay < 1
        ):
            raise ExportError(
                f"--max-queue-delay-us {delay}: expected a positive number of microseconds "
                "(without it, the server's own batching delay applies)"
            )

    def config(
        self,
        spec: ModelSpec,
        *,
        lowering: str | None = None,
        precision: str = "fp32",
        dims: Sequence[int] | None = None,
    ) -> str:
        """The entry's config.pbtxt for a version lowered ``lowering`` (default: as asked)."""
        return triton_config(
            self.entry.name,
            spec,
            lowering=lowering or self.lowering,
            precision=precision,
            dims=dims,
            max_queue_delay_us=self.max_queue_delay_us,
        )


def triton_config(
    name: str,
    spec: ModelSpec,
    *,
    lowering: str,
    precision: str = "fp32",
    dims: Sequence[int] | None = None,
    max_queue_delay_us: int | None = None,
) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig); dims exclude the batch:
    ``dims`` when given (a module's example shape), else the graph input's of the spec
    (``graph_input_shape``). Dynamic batching is on; its delay is stated only when given, so a
    server's own setting applies otherwise."""
    dims = graph_input_shape(spec) if dims is None else list(dims)
    outputs = ",\n".join(
        f'  {{\n    name: "{out}"\n    data_type: TYPE_FP32\n    dims: [ {spec.arch[-1]} ]\n  }}'
        for out in (LOGITS, PROBABILITIES)
    )
    delay = (
        "" if max_queue_delay_us is None else f"max_queue_delay_microseconds: {max_queue_delay_us} "
    )
    return (
        f'name: "{name}"\n'
        f'platform: "{PLATFORM}"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        f'input [\n  {{\n    name: "{INPUT}"\n    data_type: TYPE_FP32\n'
        f"    dims: [ {', '.join(map(str, dims))} ]\n  }}\n]\n"
        f"output [\n{outputs}\n]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
        f"dynamic_batching {{ {delay}}}\n"
        f'parameters {{ key: "smartmixed_lowering" value: {{ string_value: "{lowering}" }} }}\n'
        f'parameters {{ key: "smartmixed_mode" value: {{ string_value: "{spec.mode}" }} }}\n'
        f'parameters {{ key: "smartmixed_precision" value: {{ string_value: "{precision}" }} }}\n'
    )


def graph_input_shape(spec: ModelSpec) -> list[int]:
    """One sample's shape at the graph's input: [D] for an MLP (rows of arch[0] raw values,
    whatever the data's shape), input_shape (e.g. [1, 28, 28]) for a layered spec."""
    return list(spec.input_shape) if spec.layers is not None else [spec.arch[0]]


def _versions() -> dict[str, str]:
    return package_versions(("smartmixed", "torch", "onnx", "onnxruntime", "numpy"))


def _test_inputs(
    spec: ModelSpec, run_dir: Path, data_dir: Path | str | None = None
) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """The run's held-out test samples and their classes, rebuilt from the data request
    recorded at training (``data_dir``: where that data's files are on this machine, when
    not where training read them, e.g. a run trained on another machine)."""
    request = dict(spec.training.get("data_request") or {})
    source = request.pop("source", None)
    if data_dir is not None:
        # the embedded MNIST subset has no folder: another one would be other data
        if source not in IDX_SOURCES or (source == "mnist" and request.get("data_dir") is None):
            raise ExportError(
                f"--data-dir applies to runs trained on IDX files ({' or '.join(IDX_SOURCES)} "
                f"with --data-dir); {run_dir} was trained on "
                f"{source or 'data it does not record'}"
                + (" (the embedded subset)" if source == "mnist" else "")
            )
        request["data_dir"] = str(data_dir)
    if source is None:
        summary = "the run records no data request; verified on random and edge inputs only"
        return None, None, summary
    try:
        dataset = load_dataset(source, **request)
    except DataError as e:
        # the folder hint only where the run read files from a folder this machine may lack
        from_folder = data_dir is None and request.get("data_dir") is not None
        hint = "; --data-dir DIR names its folder on this machine" if from_folder else ""
        raise ExportError(
            f"{run_dir}: cannot reload the run's test data to verify on it ({e}){hint}"
        ) from None
    if dataset.n_features != spec.arch[0]:
        raise ExportError(
            f"{run_dir}: the reloaded data has {dataset.n_features} features, the model "
            f"{spec.arch[0]}"
        )
    return dataset.x_test, dataset.y_test, dataset.summary()


def raw_input_range(spec: ModelSpec, test_x: np.ndarray | None) -> tuple[float, float]:
    if test_x is not None:
        return float(test_x.min()), float(test_x.max())
    # no data: the range that preprocessing maps onto [-1, 1] (or [0, 1] for images)
    offset = np.asarray(spec.preprocessing["offset"], np.float64)
    scale = np.abs(np.asarray(spec.preprocessing["scale"], np.float64))
    return float((offset - 1 / scale).min()), float((offset + 1 / scale).max())


def auto_timing(device: str, threads: int | None, auto_batches: str | Sequence[int]) -> Timing:
    """--device, --threads and --auto-batches ('1,32' or integers: sorted, unique, each >= 1)
    as auto's Timing; ExportError naming a bad one."""
    if threads is not None and threads < 1:
        raise ExportError(f"--threads {threads}: expected a positive number of threads")
    try:
        batches = tuple(parse_positive_ints(auto_batches, "--auto-batches"))
    except ValueError as e:
        raise ExportError(str(e)) from None
    return Timing(device=device, threads=threads, batches=batches)


def export_run(
    *,
    run_dir: Path | str,
    repository: Path | str,
    name: str | None = None,
    lowering: str = AUTO,
    opset: int = DEFAULT_OPSET,
    version: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    auto_batches: str | Sequence[int] = AUTO_BATCHES,
    data_dir: Path | str | None = None,
    overwrite: bool = False,
    private: bool = False,
    quantize: str | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    max_queue_delay_us: int | None = None,
) -> ExportResult:
    """Lower, verify (every candidate), choose, and write one repository entry atomically.

    ``quantize="int8"``: then quantize the chosen (verified) lowering, verify the int8 graph
    against ``min_agreement`` and ``max_accuracy_drop`` (points) and write it instead, as
    NAME-int8 unless ``name`` is given. The entry's folders are 0755 and its files 0644 (0700
    and 0600 when ``private``). ``threads``: the intra-op threads ``auto`` times the candidates
    with (the ones the model will be served with; None: ONNX Runtime's default), at the batch
    sizes ``auto_batches`` (those it will be served at; the geometric mean over them decides).
    ``max_queue_delay_us``: the dynamic batching delay config.pbtxt states (None: none, and a
    server uses its own).
    """
    timing = auto_timing(device, threads, auto_batches)
    run_dir = Path(run_dir)
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize!r}: expected int8")
    name = name or (f"{run_dir.name}-{quantize}" if quantize else run_dir.name)
    if lowering not in (*LOWERINGS, AUTO):
        raise ExportError(f"--lowering {lowering!r}: expected auto, {', '.join(LOWERINGS)}")
    entry = check_destination(repository, name, version=version, overwrite=overwrite)
    request = EntryRequest(
        entry, version, lowering, opset, timing, overwrite, private, max_queue_delay_us
    )
    spec, torch_model = load_model(run_dir)
    if spec.layers is not None:  # a conv net: torch's exporter, as a user's module
        return _export_layered_run(spec, torch_model, run_dir, request, quantize, data_dir)
    int8 = Int8Thresholds(min_agreement, max_accuracy_drop) if quantize else None
    return _export_mlp_run(spec, torch_model, run_dir, request, int8, data_dir)


def _export_mlp_run(
    spec: ModelSpec,
    torch_model: nn.Module,
    run_dir: Path,
    request: EntryRequest,
    int8: Int8Thresholds | None,
    data_dir: Path | str | None,
) -> ExportResult:
    """An MLP run through export/lower.py: every candidate verified, the chosen one written
    (with ``int8``, its verified int8 quantization)."""
    # the entry's other versions, checked again under the lock before anything is written
    check_fits_entry(request.entry, request.config(spec), version=request.version, run_dir=run_dir)
    state = {k: v.numpy() for k, v in torch_model.canonical_state_dict().items()}
    test_x, test_y, test_source = _test_inputs(spec, run_dir, data_dir)
    if int8 and test_x is None:
        raise ExportError(
            f"{run_dir}: --quantize int8 is verified on the run's test set, "
            "and the run records no data request"
        )
    low, high = raw_input_range(spec, test_x)
    inputs = input_sets(spec.arch[0], test_x=test_x, low=low, high=high)

    @functools.cache
    def lowered(lowering: str) -> onnx.ModelProto:
        return lower(spec, state, lowering=lowering, opset=request.opset, name=request.entry.name)

    choice = choose_lowering(
        request.lowering,
        distinct_lowerings(spec),
        lowered,
        shape=spec.arch[0],
        verify=functools.partial(
            verify_against_torch, reference=torch_model, inputs=inputs, n_classes=spec.arch[-1]
        ),
        timing=request.timing,
        int8=(lambda lowering: quantize_int8(lowered(lowering))) if int8 else None,
    )
    model, quantization = choice.model, None
    if int8:  # the int8 graph derives from the fp32 lowering verified above
        rule = _int8_rule(spec, torch_model, inputs, test_y, *int8)
        model, quantization = quantize_verified(model, rule)
    precision = "int8" if int8 else "fp32"
    report = entry_report(
        {"run": str(run_dir)}, choice, request, precision, test_source, (low, high)
    )
    # groups and ONNX nodes per layer of every candidate, chosen or not
    report["structure"] = {
        c: lowering_summary(m, spec, lowering=c) for c, m in choice.models.items()
    }
    if quantization:
        report["quantization"] = quantization
    return write_result(request, spec, model, report, source=run_dir)


def entry_report(
    origin: dict[str, str],
    choice: Choice,
    request: EntryRequest,
    precision: str,
    test_data: str,
    raw_range: tuple[float, float],
) -> dict[str, Any]:
    """export.json's common part: ``origin`` ({"run": folder} or {"module": class}), what was
    chosen and how it verified, the data it was verified on, the package versions."""
    return {
        **origin,
        "lowering": choice.lowering,
        "opset": request.opset,
        "requested_lowering": request.lowering,
        "precision": precision,
        "verification": choice.reports[choice.lowering],
        "test_data": test_data,
        "raw_input_range": list(raw_range),
        "selection": choice.selection,
        "versions": _versions(),
    }


def write_result(
    request: EntryRequest,
    spec: ModelSpec,
    model: onnx.ModelProto,
    report: dict[str, Any],
    *,
    source: Path,
    dims: Sequence[int] | None = None,
) -> ExportResult:
    """Put ``spec`` and ``report`` (``entry_report``'s, and what the export adds) into the
    model's metadata, then write the entry with its config.pbtxt (``dims``: see
    ``triton_config``)."""
    set_metadata(
        model,
        {
            META_SPEC: spec.to_dict(),
            META_LOWERING: report["lowering"],
            META_PRECISION: report["precision"],
            META_VERIFICATION: report["verification"],
            META_SELECTION: report["selection"],
            **({META_RUN: report["run"]} if "run" in report else {}),
            META_VERSIONS: report["versions"],
            **({META_QUANTIZATION: report["quantization"]} if "quantization" in report else {}),
        },
    )
    config = request.config(
        spec, lowering=report["lowering"], precision=report["precision"], dims=dims
    )
    write_checked_entry(request, model, report, config, source=source)
    return ExportResult(request.entry, request.version, report["lowering"], report)


def check_destination(
    repository: Path | str, name: str | None, *, version: int, overwrite: bool
) -> Path:
    """The entry folder REPOSITORY/NAME, refused (ExportError) before the minutes of lowering
    and verification when it cannot be written: a name that is no plain folder name, a
    version < 1, an unusable repository, an entry that is a link or a file, an existing
    version without ``overwrite``."""
    repository = Path(repository)
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"--name {name!r}: expected a plain folder name")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"--version {version}: expected an integer >= 1")
    entry = repository / name
    check_writable_folder(repository, what="--repository")
    if entry.is_symlink():  # the swap would replace the link, not the folder it names
        raise ExportError(
            f"{entry} is a symbolic link (to {os.readlink(entry)}); export replaces an entry "
            "folder as a whole: pass the --repository that holds the folder itself"
        )
    if entry.exists():
        if not entry.is_dir():
            raise ExportError(f"{entry} exists and is not a folder")
        check_writable_folder(entry, what="entry")
    if (entry / str(version)).exists() and not overwrite:
        raise ExportError(f"{entry / str(version)} already exists; pass --overwrite to replace it")
    return entry


def write_checked_entry(
    request: EntryRequest,
    model: onnx.ModelProto,
    report: dict[str, Any],
    config: str,
    *,
    source: Path,
) -> None:
    """Check ``config`` against ``model`` as serve and --verify-only will, then write the entry
    (export/entry.py: staged, swapped into place under the entry's lock). ``source``: the run
    folder, or what the model came from, named in messages."""
    entry = request.entry
    try:
        check_model_config(config, model, name=entry.name, source=Path(CONFIG_FILE))
    except ConfigError as e:
        raise ExportError(f"the generated {e}") from None
    try:
        write_entry(
            entry,
            request.version,
            model,
            report,
            config,
            run_dir=source,
            overwrite=request.overwrite,
            private=request.private,
        )
    except OSError as e:
        raise ExportError(f"cannot write {e.filename or entry}: {e.strerror or e}") from None


def _export_layered_run(
    spec: ModelSpec,
    torch_model: nn.Module,
    run_dir: Path,
    request: EntryRequest,
    quantize: str | None,
    data_dir: Path | str | None,
) -> ExportResult:
    """A run whose spec has ``layers`` (a conv net): its network goes through torch's ONNX
    exporter as a user's module does (export/module.py), with the run's spec as the metadata,
    its test set (reshaped to (N, *input_shape)) among the verification inputs, and config dims
    = input_shape."""
    from smartmixed.export.module import MODULE_LOWERINGS, export_network

    if quantize:
        raise ExportError(
            f"{run_dir}: --quantize {quantize} applies to MLP runs; this run is a layered "
            "(conv) network"
        )
    if request.lowering not in (*MODULE_LOWERINGS, AUTO):
        raise ExportError(
            f"--lowering {request.lowering}: {run_dir} is a layered (conv) network, lowered "
            f"{' or '.join(MODULE_LOWERINGS)} (or auto)"
        )
    test_x, _, test_source = _test_inputs(spec, run_dir, data_dir)
    return export_network(
        torch_model,
        spec=spec,
        test_x=test_x,
        test_source=test_source,
        source=run_dir,
        run=str(run_dir),
        request=request,
    )


def latest_version(entry: Path) -> Path:
    versions = sorted(
        (int(p.name), p) for p in entry.iterdir() if p.is_dir() and is_version_name(p.name)
    )
    if not versions:
        raise ExportError(f"{entry}: no numbered version folder")
    return versions[-1][1]


def verify_entry(
    entry: Path | str,
    *,
    run_dir: Path | str | None = None,
    data_dir: Path | str | None = None,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
) -> dict[str, Any]:
    """Re-verify an existing entry's latest version against its run (or ``run_dir``): its
    config.pbtxt as the server checks it, then its numbers against PyTorch. An int8 entry is
    judged by the int8 rule, with the thresholds recorded at export unless given."""
    entry = Path(entry)
    if not entry.is_dir():
        raise ExportError(f"{entry}: no such repository entry")
    path = latest_version(entry) / MODEL_FILE
    try:  # regular files of bounded size only, as serve reads them: never a hang on a FIFO
        model = onnx.load_model_from_string(read_regular_file(path, limit=MAX_MODEL_BYTES))
        config = entry / CONFIG_FILE
        text = None
        if config.exists() or config.is_symlink():
            text = read_regular_file(config, limit=MAX_CONFIG_BYTES).decode()
        check_model_config(text, model, name=entry.name, source=config)
    except UnreadableFile as e:
        raise ExportError(str(e)) from None
    except DecodeError as e:
        raise ExportError(f"{path}: not a readable ONNX model ({e})") from None
    except UnicodeDecodeError as e:
        raise ExportError(f"{config}: not UTF-8 text (byte {e.start})") from None
    except ConfigError as e:
        raise ExportError(str(e)) from None
    meta = get_metadata(model)
    recorded_spec = _metadata_object(meta, META_SPEC, path)
    if run_dir is None and META_RUN not in meta:
        raise ExportError(
            f"{path}: exported from a module, not a run: nothing to verify it against (it was "
            "verified when exported)"
        )
    run_dir = Path(run_dir) if run_dir is not None else Path(meta[META_RUN])
    spec, torch_model = load_model(run_dir)
    if spec.to_dict()["assignment"] != recorded_spec.get("assignment"):
        raise ExportError(f"{path}: the model's activation assignment differs from {run_dir}")
    test_x, test_y, _ = _test_inputs(spec, run_dir, data_dir)
    low, high = raw_input_range(spec, test_x)
    inputs = input_sets(graph_input_shape(spec), test_x=test_x, low=low, high=high)
    precision = meta.get(
        META_PRECISION, DEFAULT_PRECISION
    )  # entries written before int8 existed: fp32
    if precision == "fp32":
        if min_agreement is not None or max_accuracy_drop is not None:
            raise ExportError(
                f"{path}: an fp32 model; --min-agreement and --max-accuracy-drop "
                "apply to int8 entries"
            )
        return verify_against_torch(model, torch_model, inputs, n_classes=spec.arch[-1])
    if precision != "int8":
        raise ExportError(f"{path}: {META_PRECISION} {precision!r}: expected fp32 or int8")
    if test_x is None:
        raise ExportError(
            f"{path}: an int8 model is verified on the run's test set, and "
            f"{run_dir} records no data request"
        )
    recorded = _metadata_object(meta, META_QUANTIZATION, path).get("thresholds")
    if not isinstance(recorded, dict):  # the thresholds recorded at export
        raise ExportError(f"{path}: {META_QUANTIZATION} records no thresholds")
    if min_agreement is None:
        min_agreement = recorded.get("min_agreement", DEFAULT_MIN_AGREEMENT)
    if max_accuracy_drop is None:
        max_accuracy_drop = recorded.get("max_accuracy_drop_points", DEFAULT_MAX_ACCURACY_DROP)
    rule = _int8_rule(spec, torch_model, inputs, test_y, min_agreement, max_accuracy_drop)
    return verify_quantized(model, rule)


def _metadata_object(meta: dict[str, str], key: str, path: Path) -> dict[str, Any]:
    """The JSON object export wrote under ``key`` in a model's metadata; ExportError naming the
    key when it is missing, not JSON, nested too deep or not an object."""
    if key not in meta:
        raise ExportError(f"{path}: no smartmixed metadata ({key})")
    try:
        value = parse_json(meta[key])
    except JsonError as e:
        raise ExportError(f"{path}: metadata {key}: {e}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: metadata {key}: expected a JSON object")
    return value


class Int8Thresholds(NamedTuple):
    """--min-agreement and --max-accuracy-drop (points)."""

    min_agreement: float
    max_accuracy_drop: float


def _int8_rule(
    spec: ModelSpec,
    torch_model: nn.Module,
    inputs: dict[str, np.ndarray],
    test_y: np.ndarray,
    min_agreement: float,
    max_accuracy_drop: float,
) -> Int8Rule:
    """The int8 rule for a run: its PyTorch model on the input sets, the labels of the test rows
    ``inputs["test"]`` holds (the first ones of the run's test set)."""
    return Int8Rule(
        torch_model,
        inputs,
        test_labels=test_y[: len(inputs["test"])],
        n_classes=spec.arch[-1],
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
    )
