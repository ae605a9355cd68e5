"""Triton's model repository conventions: version folder names and config.pbtxt.

config.pbtxt is Triton's ``inference.ModelConfig`` message in protobuf text format. It is parsed
here into that message and checked against what the ONNX file says (name, platform, inputs and
outputs, max_batch_size, dynamic batching); the result is a small ``ModelConfigInfo``.

The message classes are built at import from a FileDescriptorProto declared below, field for
field from Triton's model_config.proto (github.com/triton-inference-server/common,
protobuf/model_config.proto), so the serving install needs neither tritonclient nor protoc, and
an unknown field is refused as Triton refuses it. Settings smartmixed-serve cannot honour
(sequence batching, ensembles, batch inputs and outputs, custom operations, repository agents,
custom metrics) are left out of the declaration and refused by name. tests/serve/
test_loading.py checks every declared field against tritonclient's generated module.

serve/ never imports train/ or export/; export/ imports this module to check what it writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

from smartmixed.contract import CONFIG_FILE, MODEL_FILE, PLATFORM

BACKEND = "onnxruntime"
# Triton: version folders are named by a positive integer; other folders (and "0", "01") are
# ignored. ASCII only: "²".isdigit() is True, and int("²") raises.
VERSION_NAME = re.compile(r"[1-9][0-9]*")


def is_version_name(name: str) -> bool:
    return VERSION_NAME.fullmatch(name) is not None


class ConfigError(ValueError):
    """A config.pbtxt that does not parse, or does not describe its ONNX model."""


# --------------------------------------------------------------------------------------------
# Triton's ModelConfig, declared field for field (package inference, proto3)

# Values numbered from 0 in the order listed, as every enum of model_config.proto is.
ENUMS: dict[str, tuple[str, ...]] = {
    "DataType": (
        "TYPE_INVALID",
        "TYPE_BOOL",
        "TYPE_UINT8",
        "TYPE_UINT16",
        "TYPE_UINT32",
        "TYPE_UINT64",
        "TYPE_INT8",
        "TYPE_INT16",
        "TYPE_INT32",
        "TYPE_INT64",
        "TYPE_FP16",
        "TYPE_FP32",
        "TYPE_FP64",
        "TYPE_STRING",
        "TYPE_BF16",
    ),
    "ModelInstanceGroup.Kind": ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"),
    "ModelInstanceGroup.SecondaryDevice.SecondaryDeviceKind": ("KIND_NVDLA",),
    "ModelInput.Format": ("FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"),
    "ModelOptimizationPolicy.ModelPriority": ("PRIORITY_DEFAULT", "PRIORITY_MAX", "PRIORITY_MIN"),
    "ModelQueuePolicy.TimeoutAction": ("REJECT", "DELAY"),
}

# Each field as model_config.proto declares it, "[repeated |oneof NAME ]TYPE name = NUMBER" (a
# oneof member names its oneof first). A type that is not a scalar names an enum or a message of
# these tables ("Outer.Inner" is nested); "map<K, V>" is protobuf's map field.
_SHAPE = "ModelOptimizationPolicy.Cuda.GraphSpec.Shape"
_ACCELERATOR = "ModelOptimizationPolicy.ExecutionAccelerators.Accelerator"
MESSAGES: dict[str, tuple[str, ...]] = {
    "ModelRateLimiter": ("repeated ModelRateLimiter.Resource resources = 1", "uint32 priority = 2"),
    "ModelRateLimiter.Resource": ("string name = 1", "bool global = 2", "uint32 count = 3"),
    "ModelInstanceGroup": (
        "string name = 1",
        "ModelInstanceGroup.Kind kind = 4",
        "int32 count = 2",
        "ModelRateLimiter rate_limiter = 6",
        "repeated int32 gpus = 3",
        "repeated ModelInstanceGroup.SecondaryDevice secondary_devices = 8",
        "repeated string profile = 5",
        "bool passive = 7",
        "string host_policy = 9",
    ),
    "ModelInstanceGroup.SecondaryDevice": (
        "ModelInstanceGroup.SecondaryDevice.SecondaryDeviceKind kind = 1",
        "int64 device_id = 2",
    ),
    "ModelTensorReshape": ("repeated int64 shape = 1",),
    "ModelInput": (
        "string name = 1",
        "DataType data_type = 2",
        "ModelInput.Format format = 3",
        "repeated int64 dims = 4",
        "ModelTensorReshape reshape = 5",
        "bool is_shape_tensor = 6",
        "bool allow_ragged_batch = 7",
        "bool optional = 8",
        "bool is_non_linear_format_io = 9",
    ),
    "ModelOutput": (
        "string name = 1",
        "DataType data_type = 2",
        "repeated int64 dims = 3",
        "ModelTensorReshape reshape = 5",
        "string label_filename = 4",
        "bool is_shape_tensor = 6",
        "bool is_non_linear_format_io = 7",
    ),
    "ModelVersionPolicy": (
        "oneof policy_choice ModelVersionPolicy.Latest latest = 1",
        "oneof policy_choice ModelVersionPolicy.All all = 2",
        "oneof policy_choice ModelVersionPolicy.Specific specific = 3",
    ),
    "ModelVersionPolicy.Latest": ("uint32 num_versions = 1",),
    "ModelVersionPolicy.All": (),
    "ModelVersionPolicy.Specific": ("repeated int64 versions = 1",),
    "ModelOptimizationPolicy": (
        "ModelOptimizationPolicy.Graph graph = 1",
        "ModelOptimizationPolicy.ModelPriority priority = 2",
        "ModelOptimizationPolicy.Cuda cuda = 3",
        "ModelOptimizationPolicy.ExecutionAccelerators execution_accelerators = 4",
        "ModelOptimizationPolicy.PinnedMemoryBuffer input_pinned_memory = 5",
        "ModelOptimizationPolicy.PinnedMemoryBuffer output_pinned_memory = 6",
        "uint32 gather_kernel_buffer_threshold = 7",
        "bool eager_batching = 8",
    ),
    "ModelOptimizationPolicy.Graph": ("int32 level = 1",),
    "ModelOptimizationPolicy.Cuda": (
        "bool graphs = 1",
        "bool busy_wait_events = 2",
        "repeated ModelOptimizationPolicy.Cuda.GraphSpec graph_spec = 3",
        "bool output_copy_stream = 4",
    ),
    "ModelOptimizationPolicy.Cuda.GraphSpec": (
        "int32 batch_size = 1",
        f"map<string, {_SHAPE}> input = 2",
        "ModelOptimizationPolicy.Cuda.GraphSpec.LowerBound graph_lower_bound = 3",
    ),
    _SHAPE: ("repeated int64 dim = 1",),
    "ModelOptimizationPolicy.Cuda.GraphSpec.LowerBound": (
        "int32 batch_size = 1",
        f"map<string, {_SHAPE}> input = 2",
    ),
    "ModelOptimizationPolicy.ExecutionAccelerators": (
        f"repeated {_ACCELERATOR} gpu_execution_accelerator = 1",
        f"repeated {_ACCELERATOR} cpu_execution_accelerator = 2",
    ),
    _ACCELERATOR: ("string name = 1", "map<string, string> parameters = 2"),
    "ModelOptimizationPolicy.PinnedMemoryBuffer": ("bool enable = 1",),
    "ModelQueuePolicy": (
        "ModelQueuePolicy.TimeoutAction timeout_action = 1",
        "uint64 default_timeout_microseconds = 2",
        "bool allow_timeout_override = 3",
        "uint32 max_queue_size = 4",
    ),
    "ModelDynamicBatching": (
        "repeated int32 preferred_batch_size = 1",
        "uint64 max_queue_delay_microseconds = 2",
        "bool preserve_ordering = 3",
        "uint64 priority_levels = 4",
        "uint64 default_priority_level = 5",
        "ModelQueuePolicy default_queue_policy = 6",
        "map<uint64, ModelQueuePolicy> priority_queue_policy = 7",
    ),
    "ModelParameter": ("string string_value = 1",),
    "ModelWarmup": (
        "string name = 1",
        "uint32 batch_size = 2",
        "map<string, ModelWarmup.Input> inputs = 3",
        "uint32 count = 4",
    ),
    "ModelWarmup.Input": (
        "DataType data_type = 1",
        "repeated int64 dims = 2",
        "oneof input_data_type bool zero_data = 3",
        "oneof input_data_type bool random_data = 4",
        "oneof input_data_type string input_data_file = 5",
    ),
    "ModelTransactionPolicy": ("bool decoupled = 1",),
    "ModelResponseCache": ("bool enable = 1",),
    "ModelConfig": (
        "string name = 1",
        "string platform = 2",
        "string backend = 17",
        "string runtime = 25",
        "ModelVersionPolicy version_policy = 3",
        "int32 max_batch_size = 4",
        "repeated ModelInput input = 5",
        "repeated ModelOutput output = 6",
        "ModelOptimizationPolicy optimization = 12",
        "oneof scheduling_choice ModelDynamicBatching dynamic_batching = 11",
        "repeated ModelInstanceGroup instance_group = 7",
        "string default_model_filename = 8",
        "map<string, string> cc_model_filenames = 9",
        "map<string, string> metric_tags = 10",
        "map<string, ModelParameter> parameters = 14",
        "repeated ModelWarmup model_warmup = 16",
        "ModelTransactionPolicy model_transaction_policy = 19",
        "ModelResponseCache response_cache = 24",
    ),
}
# ModelConfig fields of model_config.proto left out above: refused by name.
UNSUPPORTED = frozenset(
    {
        "batch_input",
        "batch_output",
        "sequence_batching",
        "ensemble_scheduling",
        "model_operations",
        "model_repository_agents",
        "model_metrics",
    }
)

_FIELD = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _FIELD.TYPE_STRING,
    "bool": _FIELD.TYPE_BOOL,
    "float": _FIELD.TYPE_FLOAT,
    "double": _FIELD.TYPE_DOUBLE,
    "int32": _FIELD.TYPE_INT32,
    "uint32": _FIELD.TYPE_UINT32,
    "int64": _FIELD.TYPE_INT64,
    "uint64": _FIELD.TYPE_UINT64,
}
_MAP = re.compile(r"map<(\w+), ([\w.]+)>")
# "[repeated |oneof NAME ]TYPE name = NUMBER"
_DECLARATION = re.compile(r"(?:(repeated) |oneof (\w+) )?(map<\w+, [\w.]+>|[\w.]+) (\w+) = (\d+)")


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """ENUMS and MESSAGES as one FileDescriptorProto, as protoc would write model_config.proto."""
    file = descriptor_pb2.FileDescriptorProto(
        name="smartmixed/model_config.proto", package="inference", syntax="proto3"
    )
    protos: dict[str, descriptor_pb2.DescriptorProto] = {}

    def parent_list(path: str, kind: str):
        outer, _, _ = path.rpartition(".")
        if kind == "enum":
            return (protos[outer] if outer else file).enum_type
        return protos[outer].nested_type if outer else file.message_type

    def set_type(field: descriptor_pb2.FieldDescriptorProto, type_: str) -> None:
        if type_ in _SCALARS:
            field.type = _SCALARS[type_]
        else:
            field.type = _FIELD.TYPE_ENUM if type_ in ENUMS else _FIELD.TYPE_MESSAGE
            field.type_name = f".inference.{type_}"

    for path in sorted(MESSAGES, key=lambda p: p.count(".")):  # outer messages first
        protos[path] = parent_list(path, "message").add(name=path.rpartition(".")[2])
    for path, values in ENUMS.items():
        enum = parent_list(path, "enum").add(name=path.rpartition(".")[2])
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for path, fields in MESSAGES.items():
        proto = protos[path]
        for declaration in fields:
            repeated, oneof, type_, name, number = _DECLARATION.fullmatch(declaration).groups()
            field = proto.field.add(name=name, number=int(number), label=_FIELD.LABEL_OPTIONAL)
            if repeated:
                field.label = _FIELD.LABEL_REPEATED
            elif oneof:
                names = [o.name for o in proto.oneof_decl]
                if oneof not in names:
                    proto.oneof_decl.add(name=oneof)
                    names.append(oneof)
                field.oneof_index = names.index(oneof)
            if match := _MAP.fullmatch(type_):  # a repeated nested NameEntry {key = 1, value = 2}
                entry = proto.nested_type.add(
                    name="".join(p[:1].upper() + p[1:] for p in name.split("_")) + "Entry"
                )
                entry.options.map_entry = True
                for key_or_value, (entry_name, entry_type) in enumerate(
                    (("key", match[1]), ("value", match[2])), start=1
                ):
                    entry_field = entry.field.add(
                        name=entry_name, number=key_or_value, label=_FIELD.LABEL_OPTIONAL
                    )
                    set_type(entry_field, entry_type)
                field.label = _FIELD.LABEL_REPEATED
                field.type = _FIELD.TYPE_MESSAGE
                field.type_name = f".inference.{path}.{entry.name}"
            else:
                set_type(field, type_)
    return file


def _message_classes() -> dict[str, type[Message]]:
    pool = descriptor_pool.DescriptorPool()  # private: tritonclient may fill the default one
    pool.Add(_file_descriptor())
    return {
        path: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{path}"))
        for path in MESSAGES
    }


_CLASSES = _message_classes()
ModelConfig = _CLASSES["ModelConfig"]

# --------------------------------------------------------------------------------------------
# Parsing and validation


@dataclass(frozen=True)
class ModelConfigInfo:
    """What a model's config.pbtxt says about serving it, once checked against its ONNX file.

    ``source`` is None when the entry has no config.pbtxt (Triton then derives the
    configuration from the model): nothing is stated, so the server's own settings apply
    (max_batch_size 0, no dynamic batching). ``max_queue_delay_s`` is None when the config
    states no delay (proto3 cannot tell a 0 from an absent field: both leave the server's own
    ``max_batch_delay_ms``).
    """

    source: Path | None
    max_batch_size: int  # rows per request and per merged batch; 0: the model does not batch
    dynamic_batching: bool
    max_queue_delay_s: float | None  # max_queue_delay_microseconds / 1e6 when stated (> 0)
    preferred_batch_sizes: tuple[int, ...] = ()


NO_CONFIG = ModelConfigInfo(
    source=None, max_batch_size=0, dynamic_batching=False, max_queue_delay_s=None
)

# ONNX tensor element types -> Triton data types (model_config.proto's DataType).
ONNX_TO_TRITON = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FLOAT16": "TYPE_FP16",
    "FLOAT": "TYPE_FP32",
    "DOUBLE": "TYPE_FP64",
    "STRING": "TYPE_STRING",
    "BFLOAT16": "TYPE_BF16",
}
_PARSER_POSITION = re.compile(r"^\d+:\d+ : ")
_NO_FIELD = re.compile(r'Message type "inference\.ModelConfig" has no field named "(\w+)"')


def one_line(text: str) -> str:
    """Control and non-ASCII characters escaped, so that a message stays on one line."""
    return re.sub(r"[^\x20-\x7e]", lambda m: m[0].encode("unicode_escape").decode(), text)


def parse_model_config(text: str, *, source: Path | str) -> Message:
    """config.pbtxt text -> Triton's ModelConfig; ConfigError "FILE:LINE:COLUMN: problem"."""
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as e:
        message = _PARSER_POSITION.sub("", str(e))
        if (unknown := _NO_FIELD.search(message)) and unknown[1] in UNSUPPORTED:
            message = f"{unknown[1]}: a Triton setting smartmixed does not support"
        raise ConfigError(f"{source}:{e.GetLine()}:{e.GetColumn()}: {one_line(message)}") from None


@dataclass(frozen=True)
class _Tensor:
    data_type: str  # a Triton DataType name (or "ONNX <type>" when Triton has none)
    dims: list[int] | None  # -1 for a dynamic dimension; None: unknown rank


def _onnx_tensors(values, skip: set[str] | None = None) -> dict[str, _Tensor]:
    tensors = {}
    for value in values:
        if skip and value.name in skip:
            continue
        tensor_type = value.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        dims = None
        if tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        tensors[value.name] = _Tensor(ONNX_TO_TRITON.get(elem, f"ONNX {elem}"), dims)
    return tensors


def _tensor_problems(kind: str, listed, model: dict[str, _Tensor], batch: int) -> list[str]:
    """Config inputs (or outputs) against the ONNX graph's: names, data types, dims."""
    problems, seen = [], set()
    for tensor in listed:
        where = f"{kind} {tensor.name!r}"
        if tensor.name in seen:
            problems.append(f"{where} is listed twice")
            continue
        seen.add(tensor.name)
        if tensor.name not in model:
            problems.append(
                f"{where} is not an {kind} of the ONNX model (it has "
                f"{', '.join(map(repr, model)) or 'none'})"
            )
            continue
        onnx_tensor = model[tensor.name]
        types = ENUMS["DataType"]  # proto3 enums are open: text format takes any number
        data_type = types[tensor.data_type] if tensor.data_type < len(types) else tensor.data_type
        if data_type != onnx_tensor.data_type:
            problems.append(
                f"{where}: data_type {data_type}, the ONNX model's is {onnx_tensor.data_type}"
            )
        dims = list(tensor.dims)
        if any(d < 1 and d != -1 for d in dims):
            problems.append(f"{where}: dims {dims} must each be >= 1, or -1 (variable)")
            continue
        unsupported = [
            f for f in ("is_shape_tensor", "allow_ragged_batch") if getattr(tensor, f, 0)
        ]
        if tensor.HasField("reshape"):
            unsupported.insert(0, "reshape")
        if unsupported:
            problems.append(f"{where}: {', '.join(unsupported)} not supported by smartmixed")
        if onnx_tensor.dims is None:
            continue
        expected = onnx_tensor.dims
        if batch > 0:
            if not expected or expected[0] != -1:
                problems.append(
                    f"{where}: max_batch_size {batch} needs a variable first (batch) dimension, "
                    f"the ONNX model's shape is {expected}"
                )
                continue
            expected = expected[1:]
        matches = len(dims) == len(expected) and all(
            e == -1 or d == e for d, e in zip(dims, expected, strict=True)
        )
        if not matches:
            without = f", without the batch dimension (max_batch_size {batch})" if batch > 0 else ""
            problems.append(
                f"{where}: dims {dims} do not match the ONNX model's {expected}{without}"
            )
    if kind == "input" and seen:  # Triton: every model input must be configured
        missing = [name for name in model if name not in seen]
        if missing:
            problems.append(
                f"input(s) {', '.join(map(repr, missing))} of the ONNX model are "
                "missing from the config"
            )
    return problems


def _batching_problems(config: Message) -> list[str]:
    problems = []
    batching, batch = config.dynamic_batching, config.max_batch_size
    if batch == 0:
        problems.append("dynamic_batching needs max_batch_size > 0")
    for size in batching.preferred_batch_size:
        if size < 1 or (batch > 0 and size > batch):
            problems.append(
                f"dynamic_batching: preferred_batch_size {size} is not in "
                f"[1, max_batch_size {batch}]"
            )
    levels = batching.priority_levels
    if levels == 0 and (batching.default_priority_level or batching.priority_queue_policy):
        problems.append("dynamic_batching: priority settings need priority_levels > 0")
    if levels and not 1 <= batching.default_priority_level <= levels:
        problems.append(
            f"dynamic_batching: default_priority_level "
            f"{batching.default_priority_level} is not in [1, {levels}]"
        )
    for level in batching.priority_queue_policy:
        if levels and not 1 <= level <= levels:
            problems.append(
                f"dynamic_batching: priority_queue_policy level {level} is not in [1, {levels}]"
            )
    return problems


def config_problems(config: Message, model: onnx.ModelProto, *, name: str) -> list[str]:
    """Every way ``config`` fails to describe ``model`` (the entry folder named ``name``)."""
    problems = []
    if config.name and config.name != name:
        problems.append(f"name {config.name!r} is not the model folder's name {name!r}")
    if config.platform not in ("", PLATFORM):
        problems.append(f"platform {config.platform!r}: smartmixed serves {PLATFORM!r} only")
    if config.backend not in ("", BACKEND):
        problems.append(f"backend {config.backend!r}: smartmixed serves {BACKEND!r} only")
    if config.default_model_filename not in ("", MODEL_FILE):
        problems.append(
            f"default_model_filename {config.default_model_filename!r}: "
            f"smartmixed reads {MODEL_FILE}"
        )
    batch = config.max_batch_size
    if batch < 0:
        problems.append(f"max_batch_size {batch} must be >= 0")
    initializers = {t.name for t in model.graph.initializer}
    problems += _tensor_problems(
        "input", config.input, _onnx_tensors(model.graph.input, initializers), batch
    )
    problems += _tensor_problems("output", config.output, _onnx_tensors(model.graph.output), batch)
    if config.HasField("dynamic_batching"):
        problems += _batching_problems(config)
    policy = config.version_policy
    if policy.HasField("latest") and policy.latest.num_versions < 1:
        problems.append("version_policy latest: num_versions must be >= 1")
    if policy.HasField("specific") and not all(v >= 1 for v in policy.specific.versions):
        problems.append("version_policy specific: versions must be >= 1")
    for group in config.instance_group:
        if group.count < 0:
            problems.append(f"instance_group count {group.count} must be >= 0")
    if config.model_transaction_policy.decoupled:
        problems.append("model_transaction_policy decoupled: not supported by smartmixed")
    return problems


def check_model_config(
    text: str | None, model: onnx.ModelProto, *, name: str, source: Path | None
) -> ModelConfigInfo:
    """Parse config.pbtxt ``text`` (None: the entry has none) and check it against ``model``;
    raise one ConfigError naming ``source`` and listing every problem."""
    if text is None:
        return NO_CONFIG
    config = parse_model_config(text, source=source or CONFIG_FILE)
    problems = config_problems(config, model, name=name)
    if problems:
        raise ConfigError(f"{source}: {one_line('; '.join(problems))}")
    batching = config.HasField("dynamic_batching")
    delay_us = config.dynamic_batching.max_queue_delay_microseconds  # 0: not stated
    return ModelConfigInfo(
        source=source,
        max_batch_size=config.max_batch_size,
        dynamic_batching=batching,
        max_queue_delay_s=delay_us / 1e6 if delay_us else None,
        preferred_batch_sizes=tuple(config.dynamic_batching.preferred_batch_size),
    )
