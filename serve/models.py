"""The models of a repository as ONNX Runtime sessions (loading, checks, inference). No FastAPI here.

serve/ needs only onnxruntime and what export wrote into each model.onnx (metadata_props); it
never imports train/ or export/.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import reprlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import orjson
from google.protobuf.message import DecodeError

from smartmixed.contract import (
    CONFIG_FILE,
    DEFAULT_PRECISION,
    INPUT,
    META_LOWERING,
    META_PRECISION,
    META_QUANTIZATION,
    META_SELECTION,
    META_SPEC,
    META_VERIFICATION,
    METADATA_PREFIX,
    MODEL_FILE,
    PRECISIONS,
    QUANTIZATION_FIGURES,
    JsonError,
    JsonTooDeep,
    ModelSpec,
    SpecError,
    hidden_layer_indices,
    parse_json,
)
from smartmixed.contract.files import UnreadableFile, read_regular_file
from smartmixed.contract.sessions import (
    ModelLoadError,
    ProviderError,
    ProviderNotInBuild,
    make_session,
)
from smartmixed.serve.model_config import (
    NO_CONFIG,
    ConfigError,
    ModelConfigInfo,
    check_model_config,
    is_version_name,
    one_line,
    parse_model_config,
)
from smartmixed.serve.settings import ServeSettings

log = logging.getLogger("smartmixed.serve")

MAX_MODEL_BYTES: int = ServeSettings.model_fields["max_model_bytes"].default
MAX_CONFIG_BYTES = 1024 * 1024  # config.pbtxt is text of a few hundred bytes


class ServeError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ServeError):
    status = 400


class NotFound(ServeError):
    status = 404


class NotReady(ServeError):
    status = 503


class LoadError(RuntimeError):
    """A repository entry, or the requested device, that cannot be loaded (a one-line message
    naming model, version and problem)."""


class DeviceError(LoadError):
    """The requested device cannot be used: --skip-bad-models does not skip it."""


@dataclass
class ModelVersion:
    """One loaded model version: its session and what its metadata says."""

    name: str
    version: str
    path: Path
    session: ort.InferenceSession
    # one row of the graph's input, the batch left out: (D,), or (C, H, W) for a model
    # reading images
    input_shape: tuple[int, ...]
    n_features: int  # values per row: the product of input_shape
    n_classes: int
    outputs: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)  # contract.META_* key -> value
    config: ModelConfigInfo = NO_CONFIG  # what NAME/config.pbtxt says (checked at load)
    sha256: str = ""  # of the model.onnx bytes the session was made from
    # requests queued or running on this version (Service.run): a version swapped out is
    # closed once it is 0 (serve/management.py)
    pending: int = 0

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def labels(self) -> list[str]:
        """The spec's class labels (load_version checked one per output column); "0", "1",
        ... for a ModelVersion built without a spec."""
        labels = _object(self.metadata.get(META_SPEC)).get("labels")
        return list(labels) if isinstance(labels, list) else [str(i) for i in range(self.n_classes)]

    def predict(self, x: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """x: (N, *input_shape) float32 raw values, (N, D) or (N, C, H, W) -> {output name:
        (N, classes) float32}."""
        names = outputs or self.outputs
        return dict(zip(names, self.session.run(names, {INPUT: x}), strict=True))

    def export_latency(self) -> dict[str, Any] | None:
        """What export measured of the lowering it wrote (``--lowering auto`` times the
        candidates): {"lowering", "median_ms": {rows: ms}, "device", "threads"}; None when the
        lowering was named (nothing timed)."""
        selection = _object(self.metadata.get(META_SELECTION))
        chosen = selection.get("chosen")
        timings = (
            _object(selection.get("median_ms")).get(chosen) if isinstance(chosen, str) else None
        )
        if not isinstance(timings, dict):
            return None
        fp32 = _object(selection.get("fp32"))
        return {
            "lowering": chosen,
            "median_ms": timings,
            "device": selection.get("device", fp32.get("device")),
            "threads": selection.get("threads", fp32.get("threads")),
        }

    def describe(self) -> dict[str, Any]:
        """The smartmixed part of the model metadata (architecture, mix, lowering, checks).

        Reads metadata of the shapes load_version checked (check_metadata), where each report
        may be absent or null (read as empty)."""
        spec = _object(self.metadata.get(META_SPEC))
        counts = [
            {a: layer.count(a) for a in spec.get("pool", []) if layer.count(a)}
            for layer in spec.get("assignment", [])
        ]
        layers = spec.get("layers")
        verification = _object(self.metadata.get(META_VERIFICATION))
        # int8: its own checks against the fp32 PyTorch model (the verification below is that
        # of the fp32 lowering it was quantized from)
        quantization = self.metadata.get(META_QUANTIZATION)
        int8_checks = None
        if isinstance(quantization, dict):
            int8_checks = {k: quantization.get(k) for k in QUANTIZATION_FIGURES}
        metrics = _object(spec.get("metrics"))
        return {
            "architecture": spec.get("arch"),
            "input_shape": list(self.input_shape),
            "layers": layers,  # None: an MLP (arch's widths), or a user's own module
            "mode": spec.get("mode"),
            "pool": spec.get("pool"),
            "activation_mix": counts,  # per hidden layer: {activation: neurons or channels}
            "hidden_layer_types": hidden_layer_types(spec, self.input_shape),
            "labels": self.labels,
            "preprocessing": spec.get("preprocessing"),
            "lowering": self.metadata.get(META_LOWERING),
            "precision": self.metadata.get(META_PRECISION, DEFAULT_PRECISION),
            "quantization": int8_checks,
            "verification": {
                "passed": verification.get("passed"),
                "tolerance": verification.get("tolerance"),
                "results": verification.get("results"),
            },
            "test_metrics": {k: v for k, v in metrics.items() if k.startswith("test")},
            "execution_providers": self.providers,
            "latency": self.export_latency(),  # the page's model cards show it
        }


def hidden_layer_types(spec: dict[str, Any], input_shape: tuple[int, ...]) -> list[str] | None:
    """The kind of each hidden layer of a (checked) spec, "conv" (its ``assignment`` entry
    names an activation per channel) or "linear" (per neuron); None when the spec does not say.

    A spec with ``layers`` names them; one without describes an MLP when the graph reads rows
    (``input_shape`` (D,)), every hidden layer linear, or else a user's own module (export's
    module path) whose layers it does not describe.
    """
    layers = spec.get("layers")
    if layers is not None:
        return [layers[i]["type"] for i in hidden_layer_indices(layers)]
    return ["linear"] * len(spec.get("assignment", [])) if len(input_shape) == 1 else None


def _object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def read_repository_file(
    path: Path, *, root: Path, limit: int, limit_setting: str | None = None
) -> bytes:
    """The bytes of ``path``, which must resolve (symlinks followed) to a regular file inside the
    repository ``root`` and hold at most ``limit`` bytes (the ``limit_setting`` that sets it is
    named); else LoadError "cannot read PATH: why".

    Never waits or reads without end (a model.onnx symlinked to an endless device, or a FIFO):
    contract.files reads regular files only, their size checked first.
    """
    where = f"cannot read {path}"
    try:
        real, inside = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise LoadError(f"{where}: {getattr(e, 'strerror', None) or e}") from None
    if not real.is_relative_to(inside):
        raise LoadError(f"{where}: it resolves to {real}, outside the repository {root}")
    try:  # the resolved path, and no symlink in its place since: O_NOFOLLOW
        return read_regular_file(real, limit=limit, follow_symlinks=False)
    except UnreadableFile as e:
        setting = f" ({limit_setting})" if limit_setting and "limit" in e.reason else ""
        raise LoadError(f"{where}: {e.reason}{setting}") from None


# --------------------------------------------------------------------------------------------
# What a model file stores: tensors (inline and finite only) and metadata (of the shapes read)


def _attribute_tensors(attribute: onnx.AttributeProto) -> Iterator[onnx.TensorProto]:
    if attribute.HasField("t"):
        yield attribute.t
    yield from attribute.tensors
    sparse = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
    for tensor in (*sparse, *attribute.sparse_tensors):
        yield from (tensor.values, tensor.indices)


def stored_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(where, tensor) for every tensor the model stores: the initializers and sparse
    initializers of its graph and of every subgraph (If, Loop and Scan bodies), and the tensors
    of node attributes (Constant's value among them), in model-local functions too. Walked
    with a stack, so nesting costs no recursion."""
    pending: list[onnx.GraphProto | onnx.FunctionProto] = [model.graph, *model.functions]
    while pending:
        owner = pending.pop()
        if isinstance(owner, onnx.GraphProto):
            yield from ((f"initializer {one_line(t.name)}", t) for t in owner.initializer)
            for sparse in owner.sparse_initializer:
                where = f"sparse initializer {one_line(sparse.values.name)}"
                yield from ((where, sparse.values), (where, sparse.indices))
        for node in owner.node:
            for attribute in node.attribute:
                where = f"attribute {attribute.name} of node {node.name or node.op_type}"
                yield from ((one_line(where), t) for t in _attribute_tensors(attribute))
                if attribute.HasField("g"):
                    pending.append(attribute.g)
                pending.extend(attribute.graphs)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def external_data(model: onnx.ModelProto) -> str | None:
    """'WHERE keeps its data in an external file (LOCATION); ...' for the first tensor stored
    outside the model file, else None.

    ONNX Runtime, given the model as bytes, resolves an external ``location`` against the
    server's working directory: a bias pointing at any file there, beside zero weights, would
    serve the file's bytes as logits. Export writes every tensor inline, so serve refuses any
    external reference rather than resolve one.
    """
    for where, tensor in stored_tensors(model):
        if _is_external(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            return (
                f"{where} keeps its data in an external file ({location!r}); smartmixed serves "
                "self-contained models only"
            )
    return None


def _nonfinite(nan: int, inf: int) -> str:
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    return f"{' and '.join(p for p in parts if p)} value{'s' if nan + inf > 1 else ''}"


FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


def nonfinite_initializers(model: onnx.ModelProto) -> list[str]:
    """'WHERE holds 3 NaN values' for each floating-point tensor the model stores
    (``stored_tensors``: initializers, Constant values, subgraphs) that does not hold only
    finite numbers. External data is not read (serve refuses it: ``external_data``)."""
    problems = []
    for where, tensor in stored_tensors(model):
        if tensor.data_type not in FLOAT_TYPES or _is_external(tensor):
            continue
        try:
            values = onnx.numpy_helper.to_array(tensor).astype(np.float32)
        except ValueError:  # malformed: ONNX Runtime names the problem when it loads the graph
            continue
        nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        if nan or inf:
            problems.append(f"{where} holds {_nonfinite(nan, inf)}")
    return problems


class MetadataError(ValueError):
    """A smartmixed.* metadata value serve cannot read ("metadata KEY[ field F]: problem")."""


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The smartmixed.* metadata_props, JSON parsed; plain text (export writes strings as they
    are) stays a string. A value nested deeper than contract.MAX_JSON_DEPTH (json raised
    RecursionError on a 10^5-deep one) or that cannot be sent back as JSON (an integer beyond
    64 bits) is a MetadataError."""
    metadata: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith(METADATA_PREFIX):
            continue
        where = f"metadata {one_line(prop.key)}"
        try:
            value = parse_json(prop.value)
        except JsonTooDeep as e:
            raise MetadataError(f"{where}: {e}") from None
        except JsonError:
            value = prop.value
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError as e:
            raise MetadataError(f"{where}: cannot be sent as JSON ({e})") from None
        metadata[prop.key] = value
    return metadata


# What serve reads of each metadata key (ModelVersion.labels, describe, export_latency), as
# shapes: a JSON kind of _JSON_KINDS, [SHAPE] an array of SHAPE, {PATTERN: SHAPE} an object whose
# fields matching the (fnmatch) PATTERN have SHAPE. Fields not listed are not read; a report
# absent or null is not read either.
_JSON_KINDS: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "a number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "a boolean": lambda v: isinstance(v, bool),
    "an array": lambda v: isinstance(v, list),
    "an object": lambda v: isinstance(v, dict),
}
METADATA_SHAPES: dict[str, Any] = {
    # the spec's fields are contract.ModelSpec's to check; it leaves metrics open, serve shows
    # the test ones
    META_SPEC: {"metrics": {"test*": "a number"}},
    META_LOWERING: "a string",
    META_PRECISION: "a string",
    META_VERIFICATION: {"passed": "a boolean", "tolerance": "an object", "results": ["an object"]},
    META_SELECTION: {
        "chosen": "a string",
        "median_ms": {"*": {"*": "a number"}},  # lowering -> {rows: ms}
        "fp32": "an object",
    },
    META_QUANTIZATION: "an object",
}


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in the words of _JSON_KINDS."""
    if value is None:
        return "null"
    return next(k for k, test in _JSON_KINDS.items() if test(value))


def _children(value: list | dict, shape: list | dict, field: str) -> list[tuple[Any, Any, str]]:
    """(shape, value, field) of each item of an array, or of each field of an object that
    ``shape`` names."""
    if isinstance(shape, list):
        return [(shape[0], item, f"{field}[{i}]") for i, item in enumerate(value)]
    children = []
    for key, item in value.items():
        named = next((s for pattern, s in shape.items() if fnmatch.fnmatchcase(key, pattern)), None)
        if named is not None:
            children.append((named, item, f"{field}.{key}" if field else key))
    return children


def shape_mismatch(value: Any, shape: Any, field: str = "") -> str | None:
    """Where ``value`` first departs from ``shape`` (METADATA_SHAPES' notation), as
    `` field 'F': expected KIND, got KIND`` (``: expected ...`` at the top); None if it fits."""
    if isinstance(shape, str):
        expected = shape
    else:
        expected = "an array" if isinstance(shape, list) else "an object"
    if not _JSON_KINDS[expected](value):
        named = f" field {field!r}" if field else ""
        return f"{named}: expected {expected}, got {_json_kind(value)}"
    if isinstance(shape, str):
        return None
    children = _children(value, shape, field)
    return next((m for s, item, f in children if (m := shape_mismatch(item, s, f))), None)


def check_metadata(
    metadata: dict[str, Any], *, input_shape: tuple[int, ...], n_classes: int
) -> None:
    """MetadataError for the first value serve would fail to read: each key of the shape of
    METADATA_SHAPES, the spec consistent (contract.ModelSpec's checks: one label per class
    among them), and the spec the graph's: its input [batch, *input_shape] and output
    [batch, n_classes].

    A spec with ``layers`` describes the graph's input exactly (``input_shape``, e.g. [1, 28,
    28]); an MLP's graph reads rows of arch[0] values (whatever input_shape the data had, e.g.
    [28, 28]), or the spec's input_shape itself.
    """
    for key, shape in METADATA_SHAPES.items():
        value = metadata.get(key)
        if value is not None and (mismatch := shape_mismatch(value, shape)):
            raise MetadataError(f"metadata {key}{mismatch}")
    precision = metadata.get(META_PRECISION, DEFAULT_PRECISION)
    if precision not in PRECISIONS:
        raise MetadataError(
            f"metadata {META_PRECISION}: {orjson.dumps(precision).decode()}, expected one of "
            f"{', '.join(PRECISIONS)}"
        )
    spec = metadata[META_SPEC]
    try:  # types of every field, labels one per class of arch[-1], assignment per layer, ...
        checked = ModelSpec.from_dict(spec)  # validated as it is built
    except SpecError as e:
        raise MetadataError(f"metadata {META_SPEC}: {e}") from None
    arch, declared = spec["arch"], list(input_shape)
    if declared != list(checked.input_shape) and (checked.is_layered or len(declared) > 1):
        raise MetadataError(
            f"metadata {META_SPEC} field 'input_shape': {reprlib.repr(spec['input_shape'])} is "
            f"not the shape of the model's input {batch_shape(input_shape)}"
        )
    n_features = math.prod(input_shape)
    if arch[0] != n_features or arch[-1] != n_classes:
        raise MetadataError(
            f"metadata {META_SPEC} field 'arch': {reprlib.repr(arch)} does not go from the "
            f"model's input width {n_features} to its output width {n_classes}"
        )


def batch_shape(input_shape: tuple[int, ...]) -> str:
    """A graph's input shape as a message shows it: "[batch, 1, 28, 28]"."""
    return f"[batch, {', '.join(map(str, input_shape))}]"


def _read_config(entry: Path, *, root: Path, model: onnx.ModelProto) -> ModelConfigInfo:
    """NAME/config.pbtxt checked against ``model``; no file: nothing stated (Triton derives it)."""
    path = entry / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        return check_model_config(None, model, name=entry.name, source=None)
    raw = read_repository_file(path, root=root, limit=MAX_CONFIG_BYTES)
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise LoadError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        return check_model_config(text, model, name=entry.name, source=path)
    except ConfigError as e:
        raise LoadError(str(e)) from None


def versions_to_serve(entry: Path, versions: list[Path], *, root: Path) -> list[Path]:
    """The version folders NAME/config.pbtxt's version_policy serves, as Triton decides them.

    ``latest { num_versions: k }`` (Triton's default, also with no config.pbtxt: k = 1) keeps
    the k highest; ``all`` keeps every one; ``specific { versions: [...] }`` those listed. An
    unreadable or invalid config.pbtxt keeps them all: loading each reports the problem.
    """
    ordered = sorted(versions, key=lambda p: int(p.name))
    path = entry / CONFIG_FILE
    policy = None
    if path.exists() or path.is_symlink():
        try:
            text = read_repository_file(path, root=root, limit=MAX_CONFIG_BYTES).decode()
            policy = parse_model_config(text, source=path).version_policy
        except (LoadError, ConfigError, UnicodeDecodeError):
            return ordered
    kind = policy.WhichOneof("policy_choice") if policy is not None else None
    if kind == "all":
        return ordered
    if kind == "specific":
        wanted = set(policy.specific.versions)
        return [p for p in ordered if int(p.name) in wanted]
    keep = policy.latest.num_versions if kind == "latest" else 1
    return ordered[-keep:] if keep > 0 else ordered


def _read_model(path: Path, *, root: Path, max_model_bytes: int) -> tuple[bytes, onnx.ModelProto]:
    """The bytes of model.onnx and the model they hold; LoadError "cannot read PATH: why"."""
    data = read_repository_file(
        path, root=root, limit=max_model_bytes, limit_setting="SMARTMIXED_MAX_MODEL_BYTES"
    )
    if not data:
        raise LoadError(f"cannot read {path}: empty file")
    try:
        return data, onnx.load_model_from_string(data)
    except DecodeError as e:
        raise LoadError(f"cannot read {path}: not an ONNX model ({e})") from None


def _safe_contents(proto: onnx.ModelProto, *, path: Path) -> dict[str, Any]:
    """The metadata of ``proto`` (read_metadata), once the model is known safe to hand to ONNX
    Runtime: written by smartmixed-export, every tensor inline and finite. LoadError "PATH..."."""
    if problem := external_data(proto):
        raise LoadError(f"{path}: {problem}")
    try:
        metadata = read_metadata(proto)
    except MetadataError as e:
        raise LoadError(f"{path}: {e}") from None
    if not isinstance(metadata.get(META_SPEC), dict):
        raise LoadError(f"{path} has no {META_SPEC} metadata (not written by smartmixed-export)")
    if nonfinite := nonfinite_initializers(proto):
        raise LoadError(f"{path}: {'; '.join(nonfinite)}")
    return metadata


def load_version(
    name: str,
    version_dir: Path,
    *,
    device: str,
    threads: int | None,
    root: Path | None = None,
    max_model_bytes: int = MAX_MODEL_BYTES,
) -> ModelVersion:
    """Load NAME/VERSION/model.onnx, checked against NAME/config.pbtxt when there is one.

    ``root`` (default: two levels up) is the repository that the model file must resolve into.
    Every problem is one LoadError "NAME/VERSION: problem".
    """
    where = f"{name}/{version_dir.name}"
    root = version_dir.parent.parent if root is None else root
    path = version_dir / MODEL_FILE
    try:
        data, proto = _read_model(path, root=root, max_model_bytes=max_model_bytes)
        config = _read_config(version_dir.parent, root=root, model=proto)
        metadata = _safe_contents(proto, path=path)
    except LoadError as e:
        raise LoadError(f"{where}: {e}") from None
    try:
        session = make_session(data, device=device, threads=threads, name=where)
    except ProviderNotInBuild as e:  # the device, not this model: no "NAME/VERSION: " prefix
        raise DeviceError(f"--device {device}: {e}") from None
    except ProviderError as e:
        raise DeviceError(f"{where}: --device {device}: {e}") from None
    except ModelLoadError as e:
        raise LoadError(f"{where}: ONNX Runtime cannot load {path} ({e.reason})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT] or not _is_batch_of(inputs[0].shape):
        raise LoadError(
            f"{where}: expected one input '{INPUT}' [batch, D] or [batch, C, H, W], its dims "
            "after the batch fixed"
        )
    if not outputs or not all(_is_batch_of(o.shape, rank=2) for o in outputs):
        raise LoadError(f"{where}: expected outputs [batch, C]")
    input_shape, n_classes = tuple(inputs[0].shape[1:]), outputs[0].shape[1]
    try:
        check_metadata(metadata, input_shape=input_shape, n_classes=n_classes)
    except MetadataError as e:
        raise LoadError(f"{where}: {path}: {e}") from None
    return ModelVersion(
        name=name,
        version=version_dir.name,
        path=path,
        session=session,
        input_shape=input_shape,
        n_features=math.prod(input_shape),
        n_classes=n_classes,
        outputs=[o.name for o in outputs],
        metadata=metadata,
        config=config,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _is_batch_of(shape: list, *, rank: int | None = None) -> bool:
    """[batch, dims...] (of ``rank`` dims in all, when given) with every dim after the batch
    fixed (ORT gives a dynamic dimension as a str or None)."""
    return (
        len(shape) >= 2
        and (rank is None or len(shape) == rank)
        and all(isinstance(d, int) and d > 0 for d in shape[1:])
    )


@dataclass
class Repository:
    """The model versions being served, by name and version, and why others are not.

    Changed only from the event loop (serve/management.py swaps a model's versions by
    replacing its dict in one assignment), so a request sees either the old versions or the new.
    """

    root: Path
    models: dict[str, dict[str, ModelVersion]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why it is not ready
    # what the model control mode left out (serve/management.py): names being drained, and
    # entries of the repository not loaded (never, or unloaded since)
    unloading: dict[str, dict[str, ModelVersion]] = field(default_factory=dict)
    entries: set[str] = field(default_factory=set)  # model folders seen in ``root``

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            if name in self.failed:
                raise NotReady(f"model {name!r} is not ready: {self.failed[name]}")
            if name in self.unloading:
                raise NotFound(f"model {name!r} is unloading")
            if name in self.entries:
                raise NotFound(f"model {name!r} is not loaded")
            raise NotFound(f"unknown model {name!r}")
        if version is None:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version!r} (has {', '.join(versions)})")
        return versions[version]

    def names(self) -> list[str]:
        return sorted({*self.models, *self.failed, *self.unloading, *self.entries})


def model_folders(root: Path) -> list[Path]:
    """The model entries of a repository: its folders, hidden ones left out; LoadError when
    ``root`` cannot be listed."""
    try:
        return sorted(p for p in Path(root).iterdir() if not p.name.startswith(".") and p.is_dir())
    except FileNotFoundError:
        raise LoadError(f"model repository {root} does not exist") from None
    except NotADirectoryError:
        raise LoadError(f"model repository {root} is not a directory") from None
    except OSError as e:
        raise LoadError(f"model repository {root}: cannot list it ({e.strerror})") from None


def version_folders(entry: Path, *, warn: bool = True) -> list[Path]:
    """NAME's version folders (named by positive integers, in Triton's layout); other folders
    are ignored, with one warning each when ``warn``. LoadError when NAME cannot be listed or
    holds no version folder."""
    try:
        folders = sorted(p for p in entry.iterdir() if p.is_dir())
    except OSError as e:
        raise LoadError(f"{entry.name}: cannot list {entry} ({e.strerror})") from None
    versions = []
    for folder in folders:
        if is_version_name(folder.name):
            versions.append(folder)
        elif warn and not folder.name.startswith("."):
            log.warning(
                "%s: ignoring folder %r: version folders are named 1, 2, 3, ...",
                entry.name,
                folder.name,
            )
    if not versions:
        raise LoadError(f"{entry.name}: no version folder (1, 2, ...) in {entry}")
    return versions


def selected_versions(entry: Path, *, root: Path, warn: bool = True) -> list[Path]:
    """The version folders of NAME that its version_policy serves (``versions_to_serve``);
    LoadError when there is none."""
    versions = version_folders(entry, warn=warn)
    served = versions_to_serve(entry, versions, root=root)
    if warn and len(served) < len(versions):
        log.info(
            "%s: serving version(s) %s of %s (version_policy)",
            entry.name,
            ", ".join(p.name for p in served),
            ", ".join(sorted((p.name for p in versions), key=int)),
        )
    if not served:
        raise LoadError(f"{entry.name}: version_policy selects none of the versions")
    return served


def load_repository(
    root: Path,
    *,
    device: str,
    threads: int | None,
    skip_bad_models: bool,
    max_model_bytes: int = MAX_MODEL_BYTES,
    names: Collection[str] | None = None,
) -> Repository:
    """Load every ROOT/NAME/VERSION/model.onnx (Triton's layout), or only the entries ``names``
    (model control mode explicit: none at all when empty).

    A bad entry (no version folder; a model file that is unreadable, not a regular file, over
    ``max_model_bytes``, outside ``root``, not ONNX, or that its config.pbtxt does not describe)
    stops startup with one LoadError naming model, version and problem; with
    ``skip_bad_models`` it is logged and listed in ``Repository.failed`` instead. Folders not
    named by a positive integer are ignored with one warning each, as Triton does. A missing
    repository, one holding no model when every model is asked for, a name in ``names`` that is
    not one of its entries, or an unusable device always stops startup.
    """
    root = Path(root)
    entries = model_folders(root)
    repo = Repository(root=root, entries={e.name for e in entries})
    if names is not None:
        if missing := sorted(set(names) - repo.entries):
            raise LoadError(
                f"model repository {root} has no model {', '.join(map(repr, missing))} "
                f"(it has {', '.join(sorted(repo.entries)) or 'none'})"
            )
        entries = [e for e in entries if e.name in names]

    def refuse(name: str, problem: str) -> None:
        if not skip_bad_models:
            raise LoadError(problem)
        log.error("not serving %s: %s", name, problem)
        repo.failed[name] = f"{repo.failed[name]}; {problem}" if name in repo.failed else problem

    for entry in entries:
        try:
            served = selected_versions(entry, root=root)
        except LoadError as e:
            refuse(entry.name, str(e))
            continue
        for version_dir in served:
            try:
                loaded = load_version(
                    entry.name,
                    version_dir,
                    device=device,
                    threads=threads,
                    root=root,
                    max_model_bytes=max_model_bytes,
                )
            except DeviceError:
                raise  # the device is unusable for every model: skipping would serve nothing
            except LoadError as e:
                refuse(entry.name, str(e))
                continue
            repo.models.setdefault(entry.name, {})[version_dir.name] = loaded
    if names is None and not repo.models and not repo.failed:
        raise LoadError(
            f"model repository {root} holds no model (expected NAME/VERSION/{MODEL_FILE})"
        )
    return repo
