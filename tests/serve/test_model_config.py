"""serve/model_config.py as a module: config.pbtxt parsed and checked against a tiny ONNX graph
built here (no training, no export), every refusal with its exact message.

Reading config.pbtxt from a repository (its size limit) is serve/models.py's; the last test
covers it on the same tiny graph.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from smartmixed.serve import model_config
from smartmixed.serve.model_config import ConfigError, ModelConfigInfo, check_model_config
from smartmixed.serve.models import MAX_CONFIG_BYTES, LoadError, _read_config

SOURCE = Path("tiny/config.pbtxt")
FEATURES, CLASSES = 4, 3


def tiny_model(
    *, batch: int | str = "N", extra_input: bool = False, shaped: bool = True
) -> onnx.ModelProto:
    """input [batch, 4] -> Gemm -> logits [batch, 3] -> Softmax -> probabilities; W and B are
    initializers also listed as graph inputs (as older exporters write them). ``extra_input``:
    a second input "mask" [batch, 4] added to the first; ``shaped`` False: no shape on input."""
    inputs = [
        helper.make_tensor_value_info(
            "input", TensorProto.FLOAT, [batch, FEATURES] if shaped else None
        )
    ]
    nodes, first = [], "input"
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, FEATURES]))
        nodes.append(helper.make_node("Add", ["input", "mask"], ["masked"]))
        first = "masked"
    weights = [
        helper.make_tensor("W", TensorProto.FLOAT, [CLASSES, FEATURES], [0.1] * 12),
        helper.make_tensor("B", TensorProto.FLOAT, [CLASSES], [0.0] * 3),
    ]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in weights]
    nodes += [
        helper.make_node("Gemm", [first, "W", "B"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, CLASSES])
        for name in ("logits", "probabilities")
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=weights)
    return helper.make_model(graph)


MODEL = tiny_model()

# The shape export writes (export/repository.py's config text), for the graph above.
CONFIG = """name: "tiny"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [
  { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] },
  { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] }
]
version_policy: { latest: { num_versions: 1 } }
instance_group [ { kind: KIND_CPU, count: 1 } ]
dynamic_batching { preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 500 }
parameters { key: "smartmixed_mode" value: { string_value: "smartmixed" } }
"""
LAST_LINE = CONFIG.count("\n")


def check(text: str | None, model: onnx.ModelProto = MODEL) -> ModelConfigInfo:
    return check_model_config(text, model, name="tiny", source=SOURCE)


def refusal(text: str, model: onnx.ModelProto = MODEL) -> str:
    with pytest.raises(ConfigError) as refused:
        check(text, model)
    return str(refused.value)


def test_the_exported_form_is_read() -> None:
    assert check(CONFIG) == ModelConfigInfo(
        source=SOURCE,
        max_batch_size=8,
        dynamic_batching=True,
        max_queue_delay_s=0.0005,
        preferred_batch_sizes=(2, 4),
    )


def test_no_config_states_nothing_and_a_partial_one_is_completed() -> None:
    nothing = model_config.NO_CONFIG  # the server's own settings apply
    assert check(None) is nothing
    assert (nothing.source, nothing.max_batch_size, nothing.dynamic_batching) == (None, 0, False)
    assert check("") == ModelConfigInfo(SOURCE, 0, False, None)
    # Triton fills in what is left out: inputs and outputs from the model (what an unstated
    # delay reads as belongs with the server's batching delay, tested there)
    info = check("max_batch_size: 16 dynamic_batching { }")
    assert (info.source, info.max_batch_size, info.dynamic_batching) == (SOURCE, 16, True)


def test_dims_agree_with_the_onnx_model_when_it_does_not_batch() -> None:
    # max_batch_size 0: the dims are the whole shape, the batch dimension -1 included
    text = 'input [ { name: "input" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]'
    assert check(text).max_batch_size == 0
    # a model input of unknown rank: any dims
    unshaped = tiny_model(shaped=False)
    assert check('input [ { name: "input" data_type: TYPE_FP32 dims: [ 7 ] } ]', unshaped)


# config text: (the start of the message, then what it says). Ours are whole; the parser's own
# wording (protobuf's, "Expected ...", "out of range") varies between versions: a part of it.
PARSE_ERRORS = {
    "unsupported field": (
        CONFIG + "sequence_batching { }\n",
        f"{SOURCE}:{LAST_LINE + 1}:1: sequence_batching: a Triton setting smartmixed does not "
        "support",
    ),
    "ensemble": (
        "ensemble_scheduling { }",
        f"{SOURCE}:1:1: ensemble_scheduling: a Triton setting smartmixed does not support",
    ),
    "garbage": ("\x00\xff garbage {{", f"{SOURCE}:1:1: '\\x00\\xff garbage {{{{': Expected"),
    "unknown field": (
        CONFIG + "foo: 3\n",
        f"{SOURCE}:{LAST_LINE + 1}:1: " + 'Message type "inference.ModelConfig" has no field named '
        '"foo".',
    ),
    "negative delay": (
        "dynamic_batching { max_queue_delay_microseconds: -5 }",
        f"{SOURCE}:1:",
        "out of range: -5",
    ),
    "two version policies": (
        "version_policy { latest {} all {} }",
        f"{SOURCE}:1:",
        'another member of oneof "policy_choice"',
    ),
    "two schedulers": (
        "dynamic_batching { } dynamic_batching { }",
        f"{SOURCE}:1:",
        'should not have multiple "dynamic_batching" fields',
    ),
}


@pytest.mark.parametrize("case", PARSE_ERRORS)
def test_text_that_does_not_parse_is_refused_with_its_position(case: str) -> None:
    text, start, *part = PARSE_ERRORS[case]
    got = refusal(text)
    assert "\n" not in got
    if part:
        assert got.startswith(start) and part[0] in got, got
    elif case in ("unsupported field", "ensemble"):
        assert got == start
    else:  # the parser's wording after the position
        assert got.startswith(start), got


def _edit(old: str, new: str) -> str:
    assert old in CONFIG
    return CONFIG.replace(old, new, 1)


_INPUT = 'input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]'


def _input(body: str) -> str:
    return _edit(_INPUT, f"input [ {{ {body} }} ]")


REFUSALS = {
    # config text: the problem after "tiny/config.pbtxt: "
    "wrong name": (
        _edit('"tiny"', '"other"'),
        "name 'other' is not the model folder's name 'tiny'",
    ),
    "wrong platform": (
        _edit("onnxruntime_onnx", "tensorrt_plan"),
        "platform 'tensorrt_plan': smartmixed serves 'onnxruntime_onnx' only",
    ),
    "wrong backend": (
        'backend: "python"',
        "backend 'python': smartmixed serves 'onnxruntime' only",
    ),
    "another model file": (
        'default_model_filename: "model.plan"',
        "default_model_filename 'model.plan': smartmixed reads model.onnx",
    ),
    "negative max_batch_size": ("max_batch_size: -1", "max_batch_size -1 must be >= 0"),
    "negative max_batch_size and dims without the batch": (
        _edit("max_batch_size: 8", "max_batch_size: -1"),
        "max_batch_size -1 must be >= 0; input 'input': dims [4] do not match the ONNX model's "
        "[-1, 4]; output 'logits': dims [3] do not match the ONNX model's [-1, 3]; output "
        "'probabilities': dims [3] do not match the ONNX model's [-1, 3]",
    ),
    "unknown input": (
        _input('name: "pixels" data_type: TYPE_FP32 dims: [ 4 ]'),
        "input 'pixels' is not an input of the ONNX model (it has 'input'); input(s) 'input' of "
        "the ONNX model are missing from the config",
    ),
    "input listed twice": (
        _edit(_INPUT, f"{_INPUT}\n{_INPUT}"),
        "input 'input' is listed twice",
    ),
    "unknown output": (
        _edit('"logits"', '"scores"'),
        "output 'scores' is not an output of the ONNX model (it has 'logits', 'probabilities')",
    ),
    "wrong data type": (
        _input('name: "input" data_type: TYPE_FP64 dims: [ 4 ]'),
        "input 'input': data_type TYPE_FP64, the ONNX model's is TYPE_FP32",
    ),
    "data type beyond the enum": (
        _input('name: "input" data_type: 99 dims: [ 4 ]'),
        "input 'input': data_type 99, the ONNX model's is TYPE_FP32",
    ),
    "wrong dims": (
        _input('name: "input" data_type: TYPE_FP32 dims: [ 5 ]'),
        "input 'input': dims [5] do not match the ONNX model's [4], without the batch dimension "
        "(max_batch_size 8)",
    ),
    "batch dim included": (
        _input('name: "input" data_type: TYPE_FP32 dims: [ -1, 4 ]'),
        "input 'input': dims [-1, 4] do not match the ONNX model's [4], without the batch "
        "dimension (max_batch_size 8)",
    ),
    "dims neither positive nor -1": (
        _input('name: "input" data_type: TYPE_FP32 dims: [ 0 ]'),
        "input 'input': dims [0] must each be >= 1, or -1 (variable)",
    ),
    "reshape and shape tensors": (
        _input(
            'name: "input" data_type: TYPE_FP32 dims: [ 4 ] reshape { shape: [ 2, 2 ] } '
            "is_shape_tensor: true allow_ragged_batch: true"
        ),
        "input 'input': reshape, is_shape_tensor, allow_ragged_batch not supported by smartmixed",
    ),
    "batching without a dynamic batch dimension": (
        CONFIG,
        "input 'input': max_batch_size 8 needs a variable first (batch) dimension, the ONNX "
        "model's shape is [2, 4]; output 'logits': max_batch_size 8 needs a variable first "
        "(batch) dimension, the ONNX model's shape is [2, 3]; output 'probabilities': "
        "max_batch_size 8 needs a variable first (batch) dimension, the ONNX model's shape is "
        "[2, 3]",
    ),
    "dynamic batching without max_batch_size": (
        "dynamic_batching { }",
        "dynamic_batching needs max_batch_size > 0",
    ),
    "preferred batch size out of range": (
        _edit("[ 2, 4 ]", "[ 0, 8, 9 ]"),
        "dynamic_batching: preferred_batch_size 0 is not in [1, max_batch_size 8]; "
        "dynamic_batching: preferred_batch_size 9 is not in [1, max_batch_size 8]",
    ),
    "priority without levels": (
        _edit("max_queue_delay", "default_priority_level: 1 max_queue_delay"),
        "dynamic_batching: priority settings need priority_levels > 0",
    ),
    "default priority level out of range": (
        _edit("max_queue_delay", "priority_levels: 2 default_priority_level: 3 max_queue_delay"),
        "dynamic_batching: default_priority_level 3 is not in [1, 2]",
    ),
    "queue policy level out of range": (
        _edit(
            "max_queue_delay",
            "priority_levels: 2 default_priority_level: 1 "
            "priority_queue_policy { key: 5 value: { } } max_queue_delay",
        ),
        "dynamic_batching: priority_queue_policy level 5 is not in [1, 2]",
    ),
    "latest zero versions": (
        _edit("num_versions: 1", "num_versions: 0"),
        "version_policy latest: num_versions must be >= 1",
    ),
    "specific version zero": (
        _edit("latest: { num_versions: 1 }", "specific: { versions: [ 1, 0 ] }"),
        "version_policy specific: versions must be >= 1",
    ),
    "negative instance count": (
        _edit("count: 1", "count: -1"),
        "instance_group count -1 must be >= 0",
    ),
    "decoupled": (
        "model_transaction_policy { decoupled: true }",
        "model_transaction_policy decoupled: not supported by smartmixed",
    ),
    "control characters stay on one line": (
        'name: "a\\nb"',
        "name 'a\\nb' is not the model folder's name 'tiny'",
    ),
}
MODELS = {
    "batching without a dynamic batch dimension": tiny_model(batch=2),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_config_that_does_not_describe_the_model_is_refused(case: str) -> None:
    text, problem = REFUSALS[case]
    assert refusal(text, MODELS.get(case, MODEL)) == f"{SOURCE}: {problem}"


def test_every_model_input_must_be_configured_once_one_is() -> None:
    model = tiny_model(extra_input=True)
    assert check("", model).max_batch_size == 0  # none listed: Triton takes them all
    assert refusal(CONFIG, model) == (
        f"{SOURCE}: input(s) 'mask' of the ONNX model are missing from the config"
    )


def test_one_line_escapes_control_and_non_ascii_characters() -> None:
    assert model_config.one_line("a\nb\tc\x7fé") == "a\\nb\\tc\\x7f\\xe9"
    assert model_config.one_line("plain text: [1, 2]") == "plain text: [1, 2]"


@pytest.mark.parametrize(
    ("name", "is_version"),
    [("1", True), ("42", True), ("0", False), ("01", False), ("²", False), ("1a", False)],
)
def test_version_folders_are_positive_ascii_integers(name: str, is_version: bool) -> None:
    assert model_config.is_version_name(name) is is_version


def _entry(tmp_path: Path, config: bytes) -> Path:
    entry = tmp_path / "tiny"
    entry.mkdir()
    (entry / "config.pbtxt").write_bytes(config)
    return entry


def test_an_oversized_or_undecodable_config_file_is_refused(tmp_path: Path) -> None:
    entry = _entry(tmp_path, CONFIG.encode().ljust(MAX_CONFIG_BYTES + 1, b" "))
    path = entry / "config.pbtxt"
    with pytest.raises(LoadError) as refused:
        _read_config(entry, root=tmp_path, model=MODEL)
    assert str(refused.value) == (
        f"cannot read {path}: {MAX_CONFIG_BYTES + 1} bytes, more than the limit of "
        f"{MAX_CONFIG_BYTES} bytes"
    )
    path.write_bytes(CONFIG.encode().ljust(MAX_CONFIG_BYTES, b" "))  # at the limit: read
    assert _read_config(entry, root=tmp_path, model=MODEL).max_batch_size == 8
    path.write_bytes(b'name: "\xff"')
    with pytest.raises(LoadError) as refused:
        _read_config(entry, root=tmp_path, model=MODEL)
    assert str(refused.value) == f"{path}: not UTF-8 text (byte 7)"
