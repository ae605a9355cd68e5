"""smartmixed.contract: what the stages must agree on, written once.

Tensor names, artifact file names, the ONNX metadata keys export writes and serve reads, the
model spec (model.json) with its validation, the architecture presets (MLP widths, and conv nets
described as a list of layers with the shapes they give), the activation pool's names and the
constants that fix each activation's function (nn/pool.py evaluates them with torch,
export/lower.py writes them into ONNX nodes), the package-version record, and how every
stage's cli.py reads its options (comma-separated lists; flags passed to the library function's
keywords of the same name).

Imports only the standard library: serve/ reads it without torch, train/ or export/.
Its submodule smartmixed.contract.sessions (onnxruntime) is the one ONNX Runtime session
factory with the one CUDA rule.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import metadata
from typing import Any, TypeVar

_T = TypeVar("_T")

# --------------------------------------------------------------------------------------------
# Tensors of model.onnx: input "input" float32 raw features, [N, D] for an MLP, [N, C, H, W]
# for a layered (conv) spec; outputs [N, classes]

INPUT, LOGITS, PROBABILITIES = "input", "logits", "probabilities"
OUTPUTS = (LOGITS, PROBABILITIES)

# --------------------------------------------------------------------------------------------
# Files

MODEL_WEIGHTS = "model.safetensors"  # runs/NAME/: the weights
MODEL_SPEC = "model.json"  # runs/NAME/: ModelSpec.to_dict() and WEIGHTS_DIGEST, as JSON
# model.json's hex sha256 of the model.safetensors saved with it: readers check the pair
WEIGHTS_DIGEST = "weights_sha256"
HISTORY = "history.jsonl"  # runs/NAME/: one line per epoch
MODEL_FILE = "model.onnx"  # models/NAME/VERSION/
REPORT_FILE = "export.json"  # models/NAME/VERSION/: the verification report
CONFIG_FILE = "config.pbtxt"  # models/NAME/: Triton's ModelConfig, protobuf text format
PLATFORM = "onnxruntime_onnx"  # config.pbtxt's platform (Triton's name for ONNX Runtime)

# --------------------------------------------------------------------------------------------
# metadata_props of model.onnx: export writes them (strings as they are, the rest as JSON),
# serve reads every key under the prefix

METADATA_PREFIX = "smartmixed."
META_SPEC = METADATA_PREFIX + "spec"  # ModelSpec.to_dict()
META_LOWERING = METADATA_PREFIX + "lowering"
META_PRECISION = METADATA_PREFIX + "precision"  # one of PRECISIONS; absent: DEFAULT_PRECISION
META_VERIFICATION = METADATA_PREFIX + "verification"
META_SELECTION = METADATA_PREFIX + "selection"
META_RUN = METADATA_PREFIX + "run"
META_VERSIONS = METADATA_PREFIX + "versions"
META_QUANTIZATION = METADATA_PREFIX + "quantization"  # int8 entries only
# the figures of export's quantization report (META_QUANTIZATION) that serve's metadata shows
QUANTIZATION_FIGURES = (
    "weight_type",
    "per_channel",
    "thresholds",
    "fp32_accuracy",
    "int8_accuracy",
    "agreement",
    "accuracy_drop_points",
)

PRECISIONS = ("fp32", "int8")
DEFAULT_PRECISION = "fp32"  # entries exported before int8 existed carry no META_PRECISION

# --------------------------------------------------------------------------------------------
# The activation pool: one name per activation, used everywhere (CLI, JSON, ONNX metadata)

# The paper's pool, in the paper's order (the order fixes the logit index of each activation).
DEFAULT_POOL: tuple[str, ...] = ("relu", "sigmoid", "tanh", "leaky_relu", "elu", "selu")
# Extras, selectable with --pool; the last, ``afu``, is learned (below).
AFU = "afu"
EXTRA_ACTIVATIONS: tuple[str, ...] = (
    "gelu",
    "silu",
    "softplus",
    "mish",
    "softsign",
    "identity",
    AFU,
)
ACTIVATION_NAMES: tuple[str, ...] = DEFAULT_POOL + EXTRA_ACTIVATIONS

LEAKY_RELU_SLOPE = 0.01
ELU_ALPHA = 1.0
# SELU constants (Klambauer et al. 2017), the ones torch.nn.functional.selu uses.
SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805
SOFTPLUS_THRESHOLD = 20.0  # torch's default: softplus(z) = z above it


class SpecError(ValueError):
    """A model spec, architecture or checkpoint that does not fit together."""


# The learned activation unit ("Learning Neural Activations"): elementwise
#   G(z) = sum_i w1_i psi(w0_i z + b0_i) + b1,  i = 1..units,
# psi one of AFU_BASES, shared by the neurons of one hidden layer or of the whole network.
# Stored for every hidden layer l (0-based) as afu.{l}.w0|b0|w1 ([units]) and afu.{l}.b1 ([1]),
# equal across layers when shared; model.json carries ModelSpec.afu = {units, base, share}.
AFU_BASES: tuple[str, ...] = ("relu", "sigmoid", "tanh")
AFU_SHARES: tuple[str, ...] = ("layer", "network")
AFU_PARAMS: tuple[str, ...] = ("w0", "b0", "w1", "b1")
AFU_DEFAULTS: dict[str, Any] = {"units": 8, "base": "relu", "share": "layer"}


def afu_tensor_name(layer: int, param: str) -> str:
    """'afu.{layer}.{param}': the safetensors key of one AFU parameter of hidden layer ``layer``."""
    return f"afu.{layer}.{param}"


def afu_param_shape(param: str, units: int) -> tuple[int, ...]:
    return (1,) if param == "b1" else (units,)


def check_afu_config(config: Any) -> dict[str, Any]:
    """{units, base, share} with defaults filled in; SpecError names the bad field."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise SpecError(f"spec field 'afu': expected an object, got {type(config).__name__}")
    unknown = sorted(set(config) - set(AFU_DEFAULTS))
    if unknown:
        raise SpecError(f"spec field 'afu': unknown key(s) {', '.join(unknown)}")
    merged = {**AFU_DEFAULTS, **config}
    units = merged["units"]
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise SpecError(f"spec field 'afu.units': expected an integer >= 1, got {units!r}")
    if merged["base"] not in AFU_BASES:
        raise SpecError(
            f"spec field 'afu.base': {merged['base']!r}, expected one of {', '.join(AFU_BASES)}"
        )
    if merged["share"] not in AFU_SHARES:
        raise SpecError(
            f"spec field 'afu.share': {merged['share']!r}, expected one of {', '.join(AFU_SHARES)}"
        )
    return merged


class PoolError(ValueError):
    """An activation name or pool that is not valid."""


def check_activation_name(name: str) -> str:
    if name not in ACTIVATION_NAMES:
        raise PoolError(
            f"unknown activation {name!r}; expected one of: {', '.join(ACTIVATION_NAMES)}"
        )
    return name


def parse_pool(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Parse a pool given as 'relu,tanh,...' (or a sequence of names); None gives the default."""
    if text is None:
        return DEFAULT_POOL
    names = split_list(text)
    if not names:
        raise PoolError("the activation pool is empty")
    for name in names:
        check_activation_name(name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PoolError(f"activation pool lists {', '.join(duplicates)} more than once")
    return tuple(names)


# --------------------------------------------------------------------------------------------
# Architectures

# Paper Table 1, in its row order. "paper" is row 11, the architecture of the paper's Table 3.
TABLE1: tuple[tuple[int, ...], ...] = (
    (784, 512, 10),
    (784, 512, 256, 128, 10),
    (784, 512, 256, 128, 64, 10),
    (784, 512, 256, 256, 128, 10),
    (784, 256, 128, 10),
    (784, 768, 10),
    (784, 768, 512, 10),
    (784, 768, 512, 512, 10),
    (784, 768, 512, 512, 256, 10),
    (784, 768, 512, 512, 256, 256, 10),
    (784, 768, 512, 512, 256, 256, 128, 10),
    (784, 768, 512, 512, 256, 256, 128, 128, 10),
    (784, 768, 512, 512, 256, 256, 128, 128, 64, 10),
    (784, 768, 512, 512, 256, 256, 128, 128, 64, 64, 10),
    (784, 768, 512, 512, 256, 256, 128, 128, 64, 64, 32, 10),
    (784, 768, 512, 512, 256, 256, 128, 128, 64, 64, 32, 32, 10),
    (784, 768, 512, 512, 256, 256, 128, 128, 64, 64, 32, 32, 16, 10),
    (784, 768, 512, 512, 256, 256, 128, 128, 64, 64, 32, 32, 16, 16, 10),
)
PRESETS: dict[str, tuple[int, ...]] = {f"table1-{i}": arch for i, arch in enumerate(TABLE1, 1)}
PRESETS["paper"] = TABLE1[10]


def parse_arch(text: str | Sequence[int]) -> list[int]:
    """'784,256,10' (or a sequence of integers) -> [784, 256, 10]; at least one hidden layer,
    every width >= 1. A sequence must hold integers: 64.0, True or 1e999 (a float: inf) are
    refused, not rounded."""
    try:
        if isinstance(text, str):
            arch = [int(v) for v in text.split(",")]
        elif isinstance(text, list | tuple):
            arch = [_integer(v) for v in text]
        else:
            raise TypeError
    except (TypeError, ValueError):
        what = "comma-separated list" if isinstance(text, str) else "list"
        raise SpecError(f"architecture {_short(text)} is not a {what} of integers") from None
    if len(arch) < 3:
        raise SpecError(
            f"architecture {_short(arch)} needs an input width, at least one hidden layer and an "
            f"output width (got {len(arch)} numbers, expected >= 3)"
        )
    if any(w < 1 for w in arch):
        raise SpecError(f"architecture {_short(arch)} has a width < 1")
    if arch[-1] < 2:
        raise SpecError(f"architecture {_short(arch)} must end in >= 2 classes")
    return arch


def _integer(value: Any) -> int:
    """``value`` as an int when it is one (numpy integers too), else TypeError: bools and
    floats are not widths or counts."""
    if isinstance(value, bool):
        raise TypeError(value)
    return operator.index(value)


def _short(value: Any, limit: int = 120) -> str:
    """repr(value), cut to ``limit`` characters: a hostile value stays a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def resolve_preset(name: str) -> list[int]:
    try:
        return list(PRESETS[name])
    except KeyError:
        raise SpecError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}") from None


# --------------------------------------------------------------------------------------------
# Layered networks (ModelSpec.layers): a network described as data, applied in order to one
# sample of shape input_shape = [C, H, W] (batch excluded). A mixed activation follows every
# conv and linear layer but the last (the logits), after the batchnorm that directly follows
# it when there is one. arch = [prod(input_shape), width of each hidden conv/linear..., classes]
# so that the assignment, labels and preprocessing checks hold as for an MLP.

LAYER_TYPES: tuple[str, ...] = ("conv", "batchnorm", "maxpool", "avgpool", "flatten", "linear")
# Per layer type: its keys and their defaults (None: required; "kernel": the layer's kernel,
# torch's MaxPool2d/AvgPool2d default stride); validation fills every default in.
LAYER_KEYS: dict[str, dict[str, int | str | None]] = {
    "conv": {"channels": None, "kernel": None, "stride": 1, "padding": 0},
    "batchnorm": {},
    "maxpool": {"kernel": None, "stride": "kernel"},
    "avgpool": {"kernel": None, "stride": "kernel"},
    "flatten": {},
    "linear": {"features": None},
}
HIDDEN_LAYER_TYPES = ("conv", "linear")  # the layers a mixed activation may follow
# Bounds that keep a hostile model.json one error, never a huge allocation downstream: layers
# in a spec; any one integer of a layer; the values of one sample's output of one layer and of
# one layer's weight (2**28 float32 values: 1 GiB; VGG-16's largest layer holds 2**26.6).
MAX_LAYERS = 64
MAX_LAYER_VALUE = 2**16
MAX_TENSOR_VALUES = 2**28

CONV_PRESETS: dict[str, list[dict[str, Any]]] = {
    # LeNet-5 for 28x28 input (LeCun et al. 1998, the first conv padded to keep 28x28):
    # (1, 28, 28) -> (6, 28, 28) -> (6, 14, 14) -> (16, 10, 10) -> (16, 5, 5) -> 400 -> 120 -> 84
    "lenet5": [
        {"type": "conv", "channels": 6, "kernel": 5, "stride": 1, "padding": 2},
        {"type": "maxpool", "kernel": 2, "stride": 2},
        {"type": "conv", "channels": 16, "kernel": 5, "stride": 1, "padding": 0},
        {"type": "maxpool", "kernel": 2, "stride": 2},
        {"type": "flatten"},
        {"type": "linear", "features": 120},
        {"type": "linear", "features": 84},
        {"type": "linear", "features": 10},
    ],
    # two VGG-style blocks with batchnorm: (1, 28, 28) -> (32, 28, 28) -> (32, 14, 14)
    # -> (64, 14, 14) -> (64, 7, 7) -> 3136 -> 128
    "convnet": [
        {"type": "conv", "channels": 32, "kernel": 3, "stride": 1, "padding": 1},
        {"type": "batchnorm"},
        {"type": "conv", "channels": 32, "kernel": 3, "stride": 1, "padding": 1},
        {"type": "batchnorm"},
        {"type": "maxpool", "kernel": 2, "stride": 2},
        {"type": "conv", "channels": 64, "kernel": 3, "stride": 1, "padding": 1},
        {"type": "batchnorm"},
        {"type": "conv", "channels": 64, "kernel": 3, "stride": 1, "padding": 1},
        {"type": "batchnorm"},
        {"type": "maxpool", "kernel": 2, "stride": 2},
        {"type": "flatten"},
        {"type": "linear", "features": 128},
        {"type": "linear", "features": 10},
    ],
}


def is_conv_preset(name: str) -> bool:
    return name in CONV_PRESETS


def resolve_conv_preset(name: str, *, classes: int = 10) -> list[dict[str, Any]]:
    """A copy of CONV_PRESETS[name] whose last linear layer gives ``classes`` logits (the presets
    store 10; a run replaces it by its data's class count)."""
    if name not in CONV_PRESETS:
        names = [*PRESETS, *CONV_PRESETS]
        raise SpecError(f"unknown preset {name!r}; expected one of: {', '.join(names)}")
    layers = copy.deepcopy(CONV_PRESETS[name])
    layers[-1]["features"] = classes
    return layers


def image_shape(input_shape: Sequence[int]) -> list[int]:
    """The (C, H, W) a conv net reads: [C, H, W] as is, [H, W] as one channel [1, H, W]."""
    shape = list(input_shape)
    if len(shape) == 2:
        return [1, *shape]
    if len(shape) == 3:
        return shape
    raise SpecError(f"conv nets need image-shaped data (H, W) or (C, H, W), got {_short(shape)}")


def layer_output_shapes(
    layers: Sequence[dict[str, Any]], input_shape: Sequence[int]
) -> list[list[int]]:
    """The shape of one sample after each spec layer (batch excluded), every layer checked
    (SpecError names the first one wrong). lenet5 on [1, 28, 28]: [6, 28, 28], [6, 14, 14],
    [16, 10, 10], [16, 5, 5], [400], [120], [84], [10]."""
    return _walk_layers(layers, input_shape)[1]


def layered_arch(layers: Sequence[dict[str, Any]], input_shape: Sequence[int]) -> list[int]:
    """[prod(input_shape), out channels/features of each hidden conv/linear..., classes]."""
    return _arch_of(*_walk_layers(layers, input_shape), input_shape)


def _arch_of(
    layers: Sequence[dict[str, Any]], shapes: list[list[int]], input_shape: Sequence[int]
) -> list[int]:
    widths = [shapes[i][0] for i in hidden_layer_indices(layers)]  # channels or features
    return [math.prod(input_shape), *widths, shapes[-1][0]]


def hidden_layer_indices(layers: Sequence[dict[str, Any]]) -> list[int]:
    """Spec indices of the hidden layers (each conv or linear but the last layer), in order:
    hidden layer l of the assignment is layers[hidden_layer_indices(layers)[l]]."""
    return [i for i, layer in enumerate(layers[:-1]) if layer.get("type") in HIDDEN_LAYER_TYPES]


def activation_after(layers: Sequence[dict[str, Any]]) -> list[int]:
    """Per hidden layer l: the spec index after which its mixed activation applies, the
    batchnorm directly following it when there is one, else the layer itself."""
    return [
        i + 1 if layers[i + 1].get("type") == "batchnorm" else i
        for i in hidden_layer_indices(layers)
    ]


def layered_weight_shapes(
    layers: Sequence[dict[str, Any]], input_shape: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """The tensors of a layered network's model.safetensors (the AFU's aside) by spec index i:
    conv layers.{i}.weight (out, in, k, k) and .bias (out,); linear .weight (out, in) and
    .bias (out,); batchnorm .weight, .bias, .running_mean, .running_var (C,) over the channels
    (or features) of the layer before."""
    checked, shapes = _walk_layers(layers, input_shape)
    tensors: dict[str, tuple[int, ...]] = {}
    before = [list(input_shape), *shapes]  # before[i]: the input shape of layer i
    for i, layer in enumerate(checked):
        kind, into = layer["type"], before[i][0]
        if kind == "conv":
            out, k = layer["channels"], layer["kernel"]
            tensors |= {f"layers.{i}.weight": (out, into, k, k), f"layers.{i}.bias": (out,)}
        elif kind == "linear":
            out = layer["features"]
            tensors |= {f"layers.{i}.weight": (out, into), f"layers.{i}.bias": (out,)}
        elif kind == "batchnorm":
            for name in ("weight", "bias", "running_mean", "running_var"):
                tensors[f"layers.{i}.{name}"] = (into,)
    return tensors


def _walk_layers(layers: Any, input_shape: Any) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """(the layers with their defaults filled in, the shape after each): every layer checked
    for its JSON form and its fit with the shape it receives."""
    _check_layers_form(layers, input_shape)
    checked = [_check_layer(i, layer) for i, layer in enumerate(layers)]
    shape, shapes = list(input_shape), []
    for i, layer in enumerate(checked):
        follows = checked[i - 1]["type"] if i else None
        shape = _layer_output_shape(i, layer, follows, shape)
        if math.prod(shape) > MAX_TENSOR_VALUES:
            raise SpecError(
                f"spec field 'layers[{i}]': its output {shape} holds more than "
                f"{MAX_TENSOR_VALUES} values per sample"
            )
        shapes.append(shape)
    last = len(checked) - 1
    if checked[last]["type"] != "linear":
        raise SpecError(
            f"spec field 'layers[{last}]': the last layer must be linear (the logits), got "
            f"{checked[last]['type']}"
        )
    if checked[last]["features"] < 2:
        raise SpecError(
            f"spec field 'layers[{last}].features': the last layer gives the classes, expected "
            f">= 2, got {checked[last]['features']}"
        )
    if not hidden_layer_indices(checked):
        raise SpecError(
            "spec field 'layers': expected at least one conv or linear layer before the last "
            "linear layer (a hidden layer for the mixed activations)"
        )
    return checked, shapes


def _check_layers_form(layers: Any, input_shape: Any) -> None:
    """SpecError unless ``layers`` is a non-empty list of at most MAX_LAYERS entries and
    ``input_shape`` a list of positive integers holding at most MAX_TENSOR_VALUES values."""
    if not isinstance(layers, list | tuple):
        raise SpecError(
            f"spec field 'layers': expected a list of layers, got {json_type_name(layers)}"
        )
    if len(layers) > MAX_LAYERS:
        raise SpecError(f"spec field 'layers': at most {MAX_LAYERS} layers, got {len(layers)}")
    if (
        not (
            isinstance(input_shape, list | tuple)
            and input_shape
            and all(map(_is_count, input_shape))
        )
        or math.prod(input_shape) > MAX_TENSOR_VALUES
    ):
        raise SpecError(
            f"spec field 'input_shape': expected a list of positive integers holding at most "
            f"{MAX_TENSOR_VALUES} values, got {_short(input_shape)}"
        )
    if not layers:
        raise SpecError(
            "spec field 'layers': expected a list of layers ending in a linear layer, got []"
        )


def _layer_output_shape(
    i: int, layer: dict[str, Any], follows: str | None, shape: list[int]
) -> list[int]:
    """The shape one sample has after checked layer ``i`` (``follows``: the type of the layer
    before it, None for the first), given the ``shape`` it receives; SpecError when they do not
    fit."""
    kind, where = layer["type"], f"spec field 'layers[{i}]'"
    if kind == "batchnorm":
        if follows not in HIDDEN_LAYER_TYPES:
            after = f"follows a {follows} layer" if follows else "is the first layer"
            raise SpecError(
                f"{where}: a batchnorm layer must directly follow a conv or linear layer, "
                f"this one {after}"
            )
        return shape
    if kind == "flatten":
        return [math.prod(shape)]
    if kind == "linear":
        if len(shape) != 1:
            raise SpecError(
                f"{where}: a linear layer needs a flat input, got shape {shape} (put a "
                f"flatten layer before it)"
            )
        _check_weight(where, layer["features"], shape[0])
        return [layer["features"]]
    # conv, maxpool, avgpool: (C, H, W) -> (C', H', W')
    if len(shape) != 3:
        raise SpecError(
            f"{where}: a {kind} layer needs an image input (C, H, W), got shape {shape}"
        )
    k, stride = layer["kernel"], layer["stride"]
    pad = layer.get("padding", 0)
    height, width = shape[1] + 2 * pad, shape[2] + 2 * pad
    if k > min(height, width):
        padded = f" padded by {pad}" if pad else ""
        raise SpecError(
            f"spec field 'layers[{i}].kernel': {k} is larger than its input "
            f"{shape[1]}x{shape[2]}{padded}"
        )
    # out = floor((size + 2 * padding - kernel) / stride) + 1 (torch's, ceil_mode off)
    channels = layer["channels"] if kind == "conv" else shape[0]
    if kind == "conv":
        _check_weight(where, channels, shape[0] * k * k)
    return [channels, (height - k) // stride + 1, (width - k) // stride + 1]


def _check_layer(i: int, layer: Any) -> dict[str, Any]:
    """Layer ``i`` with its defaults filled in, or SpecError naming its bad key."""
    where = f"spec field 'layers[{i}]"
    if not isinstance(layer, dict):
        raise SpecError(f"{where}': expected an object, got {json_type_name(layer)}")
    if "type" not in layer:
        raise SpecError(f"{where}': missing key type")
    kind = layer["type"]
    if not isinstance(kind, str) or kind not in LAYER_KEYS:
        raise SpecError(f"{where}.type': {_short(kind)}, expected one of {', '.join(LAYER_TYPES)}")
    keys = LAYER_KEYS[kind]
    unknown = sorted(map(str, set(layer) - {"type", *keys}))
    if unknown:
        known = f"its keys: {', '.join(keys)}" if keys else "it has no keys but type"
        raise SpecError(
            f"{where}.{_short(unknown[0])[1:-1]}': not a key of a {kind} layer ({known})"
        )
    checked: dict[str, Any] = {"type": kind}
    for key, default in keys.items():
        if key in layer:
            value = layer[key]
        elif default is None:
            raise SpecError(f"{where}': missing key {key} (a {kind} layer needs it)")
        else:
            value = checked[default] if isinstance(default, str) else default
        least = 0 if key == "padding" else 1
        if not (
            isinstance(value, int)
            and not isinstance(value, bool)
            and least <= value <= MAX_LAYER_VALUE
        ):
            raise SpecError(
                f"{where}.{key}': expected an integer in {least}..{MAX_LAYER_VALUE}, "
                f"got {_short(value)}"
            )
        checked[key] = value
    return checked


def _check_weight(where: str, out: int, into: int) -> None:
    if out * into > MAX_TENSOR_VALUES:
        raise SpecError(
            f"{where}: its weight holds {out} x {into} values, more than {MAX_TENSOR_VALUES}"
        )


# --------------------------------------------------------------------------------------------
# The model spec (model.json; inside model.onnx as META_SPEC)

SPEC_FORMAT = "smartmixed.model/1"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained network from its weights (model.json).

    ``assignment[l][j]`` is the activation name of neuron j (in neuron order) of hidden layer l;
    for a layered spec (``layers``), of channel j of a hidden conv or neuron j of a hidden linear.
    Preprocessing maps raw features x to (x - offset) * scale; offset and scale are scalars or
    one value per feature.
    """

    arch: list[int]
    pool: list[str]
    mode: str
    assignment: list[list[str]]
    preprocessing: dict[str, Any]
    input_shape: list[int]
    labels: list[str]
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    format: str = SPEC_FORMAT
    # {units, base, share} of the learned activation unit when the pool holds AFU, else None
    afu: dict[str, Any] | None = None
    # None: an MLP (arch alone). A list: the layers of a network applied in order to an input of
    # shape input_shape (see LAYER_KEYS); arch is then derived from them (layered_arch). Last
    # field: older model.json files have no "layers" key and read as MLPs.
    layers: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def hidden_widths(self) -> list[int]:
        return self.arch[1:-1]

    @property
    def is_layered(self) -> bool:
        """Whether the network is described by ``layers`` (a conv net) rather than by arch."""
        return self.layers is not None

    def activation_counts(self) -> list[dict[str, int]]:
        """Per hidden layer: {activation: neuron count} for every pool entry (zeros included)."""
        return [{name: layer.count(name) for name in self.pool} for layer in self.assignment]

    def validate(self) -> None:
        """Every field checked for its JSON type and its fit with the others; SpecError names
        the first field that is wrong (model.json and metadata come from files another party
        may have written: no field is trusted to have the type its default has)."""
        if self.format != SPEC_FORMAT:
            raise SpecError(
                f"spec field 'format': expected {SPEC_FORMAT!r}, got {_short(self.format)}"
            )
        # arch first (with the layers it derives from): the checks after it go by arch
        self._validate_arch()
        self._validate_pool_and_mode()
        self._validate_assignment()
        # the unit's settings, defaults filled in, when the pool holds it; None otherwise
        self.afu = check_afu_config(self.afu) if AFU in self.pool else None
        _check_list("labels", self.labels, "strings", _is_str)
        if len(self.labels) != self.arch[-1]:
            raise SpecError(
                f"spec field 'labels': expected {self.arch[-1]} class labels, got {len(self.labels)}"
            )
        self._validate_preprocessing()
        if not (
            isinstance(self.input_shape, list | tuple) and all(map(_is_count, self.input_shape))
        ) or (math.prod(self.input_shape) != self.arch[0]):
            raise SpecError(
                f"spec field 'input_shape': expected a list of positive integers whose product "
                f"is the input width {self.arch[0]}, got {_short(self.input_shape)}"
            )
        for name in ("training", "metrics", "versions"):
            if not isinstance(getattr(self, name), dict):
                raise SpecError(
                    f"spec field '{name}': expected an object, got "
                    f"{json_type_name(getattr(self, name))}"
                )
        check_data_request(self.training.get("data_request"))

    def _validate_arch(self) -> None:
        """arch parsed; for a layered spec, the layers with their defaults filled in and arch
        checked against the one they give."""
        try:
            self.arch = parse_arch(self.arch)
        except SpecError as e:
            raise SpecError(f"spec field 'arch': {e}") from None
        if self.layers is None:
            return
        self.layers, shapes = _walk_layers(self.layers, self.input_shape)
        derived = _arch_of(self.layers, shapes, self.input_shape)
        if derived != self.arch:
            raise SpecError(
                f"spec field 'arch': expected {_short(derived)} (from layers and "
                f"input_shape), got {_short(self.arch)}"
            )

    def _validate_pool_and_mode(self) -> None:
        if not isinstance(self.pool, str):  # a comma-separated pool is accepted too
            _check_list("pool", self.pool, "activation names", _is_str)
        try:
            self.pool = list(parse_pool(self.pool))
        except PoolError as e:
            raise SpecError(f"spec field 'pool': {e}") from None
        fixed = self.mode.removeprefix("fixed:") if isinstance(self.mode, str) else None
        if self.mode != "smartmixed" and (fixed == self.mode or fixed not in self.pool):
            raise SpecError(
                f"spec field 'mode': expected 'smartmixed' or 'fixed:' and an activation of the "
                f"pool, got {_short(self.mode)}"
            )

    def _validate_assignment(self) -> None:
        """One list of pool names per hidden layer, one name per neuron."""
        hidden = self.hidden_widths
        if not isinstance(self.assignment, list):
            raise SpecError(
                f"spec field 'assignment': expected a list of hidden layers, got "
                f"{json_type_name(self.assignment)}"
            )
        if len(self.assignment) != len(hidden):
            raise SpecError(
                f"spec field 'assignment': expected {len(hidden)} hidden layers, "
                f"got {len(self.assignment)}"
            )
        for layer, (names, width) in enumerate(zip(self.assignment, hidden, strict=True)):
            _check_list(f"assignment[{layer}]", names, "activation names", _is_str)
            if len(names) != width:
                raise SpecError(
                    f"spec field 'assignment[{layer}]': expected {width} neurons, got {len(names)}"
                )
            unknown = sorted(set(names) - set(self.pool))
            if unknown:
                raise SpecError(
                    f"spec field 'assignment[{layer}]': activation(s) "
                    f"{_short(', '.join(unknown))[1:-1]} not in the pool {self.pool}"
                )

    def _validate_preprocessing(self) -> None:
        """offset and scale: each a number or one number per input feature."""
        if not isinstance(self.preprocessing, dict):
            raise SpecError(
                f"spec field 'preprocessing': expected an object with offset and scale, got "
                f"{json_type_name(self.preprocessing)}"
            )
        for key in ("offset", "scale"):
            value = self.preprocessing.get(key)
            if _is_number(value):
                continue
            if not isinstance(value, list) or len(value) != self.arch[0]:
                got = (
                    f"a list of {len(value)}" if isinstance(value, list) else json_type_name(value)
                )
                raise SpecError(
                    f"spec field 'preprocessing.{key}': expected a number or a list of "
                    f"{self.arch[0]} numbers, got {got}"
                )
            _check_list(f"preprocessing.{key}", value, "numbers", _is_number)

    @classmethod
    def untrained(
        cls,
        *,
        arch: list[int] | None = None,
        pool: list[str],
        assignment: list[list[str]],
        layers: list[dict[str, Any]] | None = None,
        input_shape: list[int] | None = None,
    ) -> ModelSpec:
        """The spec of a network no data has trained (the benches' random-weight models): raw
        0..255 pixels scaled to [0, 1], labels "0".."C-1"; mode fixed:NAME for a one-activation
        pool, else smartmixed. An MLP reads one input axis unless ``input_shape`` says more; a
        layered network (``layers``, e.g. resolve_conv_preset("lenet5")) reads ``input_shape``
        (e.g. [1, 28, 28]) and its arch, when not given, is derived from the two."""
        if layers is not None:
            if input_shape is None:
                raise SpecError("an untrained layered spec needs its input_shape, e.g. [1, 28, 28]")
            arch = layered_arch(layers, input_shape) if arch is None else arch
        elif arch is None:
            raise SpecError("an untrained spec needs arch (an MLP) or layers and input_shape")
        input_shape = [arch[0]] if input_shape is None else input_shape
        return cls(
            arch=arch,
            pool=pool,
            mode=f"fixed:{pool[0]}" if len(pool) == 1 else "smartmixed",
            assignment=assignment,
            preprocessing={"offset": 0.0, "scale": 1 / 255},
            input_shape=input_shape,
            labels=[str(i) for i in range(arch[-1])],
            layers=layers,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict):
            raise SpecError(f"model spec: expected a JSON object, got {type(data).__name__}")
        required = [f.name for f in fields(cls) if f.default is f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise SpecError(f"model spec: missing field(s) {', '.join(missing)}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# The load_dataset keywords a run records (training.data_request in model.json) so that export
# rebuilds its held-out test set, each with the JSON type it must have
DATA_REQUEST_FIELDS: dict[str, str] = {
    "source": "a string",
    "data_dir": "a string or null",
    "seed": "an integer",
    "val_fraction": "a number",
    "test_fraction": "a number",
    "label_column": "a string",
}


def check_data_request(request: Any) -> None:
    """None (the run records no data), or an object of DATA_REQUEST_FIELDS, each of its JSON
    type, with a source; SpecError names the field. The values' ranges are load_dataset's to
    check."""
    if request is None:
        return
    where = "spec field 'training.data_request"
    if not isinstance(request, dict):
        raise SpecError(f"{where}': expected an object, got {json_type_name(request)}")
    unknown = sorted(set(request) - set(DATA_REQUEST_FIELDS))
    if unknown:
        raise SpecError(f"{where}': unknown key(s) {_short(', '.join(unknown))[1:-1]}")
    if "source" not in request:
        raise SpecError(f"{where}': missing key source")
    for key, value in request.items():
        expected = DATA_REQUEST_FIELDS[key]
        if not _JSON_CHECKS[expected](value):
            raise SpecError(f"{where}.{key}': expected {expected}, got {json_type_name(value)}")


_JSON_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    dict: "an object",
    list: "a list",
    bool: "a boolean",
    type(None): "null",
}


def json_type_name(value: Any) -> str:
    """The JSON name of ``value``'s type, as messages about JSON files say it."""
    return next(
        (name for kind, name in _JSON_TYPES.items() if type(value) is kind),
        type(value).__name__,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _check_list(name: str, value: Any, items: str, check: Callable[[Any], bool]) -> None:
    """SpecError naming spec field ``name`` unless ``value`` is a list (or tuple) whose every
    item passes ``check`` (``items``: what they are, plural)."""
    if not isinstance(value, list | tuple):
        raise SpecError(
            f"spec field '{name}': expected a list of {items}, got {json_type_name(value)}"
        )
    bad = next((i for i, item in enumerate(value) if not check(item)), None)
    if bad is not None:
        raise SpecError(
            f"spec field '{name}': expected a list of {items}, item {bad} is "
            f"{json_type_name(value[bad])}"
        )


_JSON_CHECKS: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "a string or null": lambda v: v is None or isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": _is_number,
}


# --------------------------------------------------------------------------------------------
# JSON from files and metadata another party may have written (model.json, checkpoints' JSON,
# metadata_props): depth bounded, so a hostile file is one error, never a RecursionError

MAX_JSON_DEPTH = 64  # model.json nests 4 deep; metadata reports 6


class JsonError(ValueError):
    """Text that is not JSON, or JSON nested deeper than MAX_JSON_DEPTH (JsonTooDeep)."""


class JsonTooDeep(JsonError):
    """JSON nested deeper than the limit: refused even where plain text would be accepted."""


def json_depth(value: Any) -> int:
    """How deep ``value`` nests (a scalar: 0, [] or {}: 1), computed without recursion (and
    without a stack entry per scalar: a list of a million numbers costs no more than itself)."""
    if not isinstance(value, dict | list):
        return 0
    deepest, stack = 1, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def parse_json(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)``, refused with JsonError when it is not JSON or nests deeper than
    ``max_depth`` (json's C parser raises RecursionError near 1,000 levels; any caller walking
    the value recursively fails far sooner)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than
        # 4,300 digits (sys.get_int_max_str_digits)
        raise JsonError(f"not valid JSON ({e})") from None
    if (depth := json_depth(value)) > max_depth:
        raise JsonTooDeep(f"JSON nested {depth} levels deep (at most {max_depth})")
    return value


# --------------------------------------------------------------------------------------------
# Command lines: how every stage's cli.py reads its options


def split_list(text: str | Iterable[str]) -> list[str]:
    """'a, b,,c' (or a sequence of names) -> ['a', 'b', 'c']: items stripped, empty ones dropped."""
    items = text.split(",") if isinstance(text, str) else text
    return [item.strip() for item in items if item.strip()]


def parse_positive_ints(text: str | Iterable[int], what: str) -> list[int]:
    """'1,32,256' (or integers) -> sorted unique list of integers >= 1; ValueError naming
    ``what`` (an option: "--auto-batches", "batch sizes") otherwise."""
    try:
        values = [int(v) for v in (split_list(text) if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        raise ValueError(f"{what} {text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be one or more integers >= 1 (got {text!r})")
    return sorted(set(values))


def call_with_options(function: Callable[..., _T], args: Any, /, **given: Any) -> _T:
    """``function(**keywords)`` for a thin CLI: each keyword from ``given``, else the parsed
    option of the same name (``args``: an argparse Namespace); an option left at None, or one
    the command line lacks, keeps the function's default.

    The keywords are written once, in the function's signature; the flags' dests match them
    (``--load-generator`` -> ``load_generator``, ``--quiet`` -> ``progress=False``).
    """
    parameters = inspect.signature(function).parameters.values()
    names = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    parsed = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return function(**(parsed | given))


# --------------------------------------------------------------------------------------------
# Package versions (recorded in model.json, export.json, and shown by the server)


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or "unknown"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def package_versions(names: Iterable[str]) -> dict[str, str]:
    return {name: package_version(name) for name in names}
