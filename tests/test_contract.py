"""The stages' contract (smartmixed.contract): torch stays out of lowering and serving, and the
names it holds are the ones export writes and serve reads."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smartmixed import contract
from smartmixed.export.lower import lower, set_metadata
from smartmixed.export.repository import triton_config
from smartmixed.nn.pool import ACTIVATIONS
from smartmixed.serve.models import load_repository
from smartmixed.train.model import MixedMLP

HEAVY = ("torch", "sklearn", "safetensors")


@pytest.mark.parametrize(
    "modules",
    [
        "smartmixed.contract",
        "smartmixed.export.lower",
        "smartmixed.serve.app",
        "smartmixed.export.lower, smartmixed.serve.app, smartmixed.train",
    ],
)
def test_lowering_and_serving_import_no_torch(modules: str) -> None:
    code = (
        f"import sys, {modules}\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_serve_imports_neither_train_nor_export() -> None:
    code = (
        "import sys, smartmixed.serve.app, smartmixed.serve.cli\n"
        "bad = [m for m in sys.modules if m.startswith(('smartmixed.train', 'smartmixed.export'))]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_lazy_train_exports_resolve() -> None:
    import smartmixed.train as train

    for name in train.__all__:
        assert getattr(train, name) is not None
    assert train.ModelSpec is contract.ModelSpec and train.PRESETS is contract.PRESETS
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = train.nothing


def test_pool_registry_matches_the_contract_names() -> None:
    # one torch activation per contract name, in the contract's order (logit index = position)
    assert tuple(ACTIVATIONS) == contract.ACTIVATION_NAMES


def test_exported_graph_uses_the_contract_names_and_serve_reads_them(tmp_path: Path) -> None:
    spec = contract.ModelSpec(
        arch=[6, 8, 3],
        pool=list(contract.DEFAULT_POOL),
        mode="smartmixed",
        assignment=[[*contract.DEFAULT_POOL, "relu", "selu"]],
        preprocessing={"offset": 0.0, "scale": 1.0},
        input_shape=[6],
        labels=["a", "b", "c"],
    )
    torch.manual_seed(0)
    model = MixedMLP.from_spec(spec).eval()
    state = {k: v.numpy() for k, v in model.canonical_state_dict().items()}
    proto = lower(spec, state, lowering="permuted")
    assert [i.name for i in proto.graph.input] == [contract.INPUT]
    assert tuple(o.name for o in proto.graph.output) == contract.OUTPUTS
    set_metadata(proto, {contract.META_SPEC: spec.to_dict(), contract.META_LOWERING: "permuted"})

    entry = tmp_path / "mixed"
    (entry / "1").mkdir(parents=True)
    (entry / "1" / contract.MODEL_FILE).write_bytes(proto.SerializeToString())
    config = triton_config("mixed", spec, lowering="permuted")
    (entry / contract.CONFIG_FILE).write_text(config)

    repository = load_repository(tmp_path, device="cpu", threads=1, skip_bad_models=False)
    served = repository.get("mixed")
    assert served.outputs == list(contract.OUTPUTS)
    assert served.labels == spec.labels  # read back from contract.META_SPEC
    assert served.describe()["lowering"] == "permuted"  # from contract.META_LOWERING
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    got = served.predict(x)[contract.PROBABILITIES]
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_package_versions() -> None:
    assert contract.package_version("numpy") == np.__version__
    assert contract.package_version("no-such-distribution-smartmixed") == "unknown"
    assert contract.package_versions(["numpy"]) == {"numpy": np.__version__}


def test_split_list() -> None:
    assert contract.split_list(" relu, tanh,,elu ") == ["relu", "tanh", "elu"]
    assert contract.split_list(["relu", " tanh", ""]) == ["relu", "tanh"]
    assert contract.split_list(",") == []


def test_call_with_options_takes_keywords_from_the_parsed_options() -> None:
    def measure(*, arch: str | None = None, seed: int = 0, rows: int = 3) -> tuple:
        return arch, seed, rows

    # an option at None or unknown to the function keeps its default; given keywords win
    args = argparse.Namespace(arch=None, seed=7, out="x", rows=5)
    assert contract.call_with_options(measure, args) == (None, 7, 5)
    assert contract.call_with_options(measure, args, rows=1, arch="64,10") == ("64,10", 7, 1)


def test_regular_file_reader_refuses_what_cannot_be_read_whole(tmp_path: Path) -> None:
    """contract.files.read_regular_file: a FIFO or a device is refused without a read (a FIFO
    open would wait for a writer, /dev/zero never ends), a file over the limit before one."""
    from smartmixed.contract.files import UnreadableFile, read_regular_file

    small = tmp_path / "small"
    small.write_bytes(b"12345")
    assert read_regular_file(small, limit=5) == b"12345"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "zero").symlink_to("/dev/zero")
    cases = {
        small: (4, f"{small}: 5 bytes, more than the limit of 4 bytes"),
        fifo: (5, f"{fifo}: a FIFO, not a regular file"),
        tmp_path / "zero": (5, f"{tmp_path / 'zero'}: a character device, not a regular file"),
        tmp_path: (5, f"{tmp_path}: a directory, not a regular file"),
        tmp_path / "absent": (5, f"{tmp_path / 'absent'}: file not found"),
    }
    for path, (limit, message) in cases.items():
        with pytest.raises(UnreadableFile) as error:
            read_regular_file(path, limit=limit)
        assert str(error.value) == message


def _spec_dict(**changes) -> dict:
    spec = contract.ModelSpec.untrained(arch=[4, 3, 2], pool=["relu"], assignment=[["relu"] * 3])
    return {**spec.to_dict(), **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"arch": [4, 3.0, 2]},
            "spec field 'arch': architecture [4, 3.0, 2] is not a list of integers",
        ),
        (
            {"arch": [4, True, 2]},
            "spec field 'arch': architecture [4, True, 2] is not a list of integers",
        ),
        (
            {"arch": "4,3,2x"},
            "spec field 'arch': architecture '4,3,2x' is not a comma-separated list of integers",
        ),
        (
            {"pool": [["relu"]]},
            "spec field 'pool': expected a list of activation names, item 0 is a list",
        ),
        (
            {"mode": "fixed:tanh"},
            "spec field 'mode': expected 'smartmixed' or 'fixed:' and an activation of the pool, got 'fixed:tanh'",
        ),
        (
            {"assignment": [["relu", 1, "relu"]]},
            "spec field 'assignment[0]': expected a list of activation names, item 1 is an integer",
        ),
        (
            {"assignment": {"0": []}},
            "spec field 'assignment': expected a list of hidden layers, got an object",
        ),
        (
            {"labels": [0, 1]},
            "spec field 'labels': expected a list of strings, item 0 is an integer",
        ),
        (
            {"preprocessing": {"offset": [0, 0, 0, "x"], "scale": 1}},
            "spec field 'preprocessing.offset': expected a list of numbers, item 3 is a string",
        ),
        (
            {"preprocessing": {"offset": True, "scale": 1}},
            "spec field 'preprocessing.offset': expected a number or a list of 4 numbers, got a boolean",
        ),
        (
            {"input_shape": [2, 3]},
            "spec field 'input_shape': expected a list of positive integers whose product is the input width 4, got [2, 3]",
        ),
        ({"metrics": None}, "spec field 'metrics': expected an object, got null"),
        (
            {"training": {"data_request": {"seed": 1}}},
            "spec field 'training.data_request': missing key source",
        ),
        (
            {"training": {"data_request": {"source": "digits", "data_dir": 5}}},
            "spec field 'training.data_request.data_dir': expected a string or null, got an integer",
        ),
    ],
)
def test_spec_fields_of_the_wrong_json_type_are_named(changes: dict, message: str) -> None:
    with pytest.raises(contract.SpecError) as error:
        contract.ModelSpec.from_dict(_spec_dict(**changes))
    assert str(error.value) == message


def test_parse_json_refuses_what_json_loads_would_raise_on(tmp_path: Path) -> None:
    with pytest.raises(contract.JsonTooDeep, match="JSON nested deeper than 64 levels"):
        contract.parse_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(contract.JsonError, match="Exceeds the limit"):
        contract.parse_json("1" * 5000)  # int() refuses more than 4,300 digits
    assert contract.json_depth([1, [2, {"a": [3]}], []]) == 4
    assert contract.parse_json(str([0] * 1000)) == [0] * 1000


# --------------------------------------------------------------------------------------------
# Layered (conv) specs

LENET5_SHAPES = [[6, 28, 28], [6, 14, 14], [16, 10, 10], [16, 5, 5], [400], [120], [84], [10]]


def _layered_dict(layers: list[dict] | None = None, **changes) -> dict:
    """A valid lenet5 spec as model.json holds it, with ``layers`` and ``changes`` replaced."""
    lenet = contract.resolve_conv_preset("lenet5")
    arch = contract.layered_arch(lenet, [1, 28, 28])
    spec = contract.ModelSpec.untrained(
        pool=["relu"],
        assignment=[["relu"] * width for width in arch[1:-1]],
        layers=lenet,
        input_shape=[1, 28, 28],
    )
    return {**spec.to_dict(), **({} if layers is None else {"layers": layers}), **changes}


def _lenet(**changes_by_index: dict) -> list[dict]:
    """lenet5's layers, layer i updated with changes_by_index[f"l{i}"]."""
    layers = contract.resolve_conv_preset("lenet5")
    for key, change in changes_by_index.items():
        layers[int(key[1:])].update(change)
    return layers


CONV = {"type": "conv", "channels": 4, "kernel": 3}
HEAD = [{"type": "flatten"}, {"type": "linear", "features": 8}, {"type": "linear", "features": 10}]
LAYER_TYPES = "conv, batchnorm, maxpool, avgpool, flatten, linear"


@pytest.mark.parametrize(
    ("layers", "changes", "message"),
    [
        (
            {"0": CONV},
            {},
            "spec field 'layers': expected a list of layers, got an object",
        ),
        ([], {}, "spec field 'layers': expected a list of layers ending in a linear layer, got []"),
        ([CONV] * 65, {}, "spec field 'layers': at most 64 layers, got 65"),
        (["conv", *HEAD], {}, "spec field 'layers[0]': expected an object, got a string"),
        ([{"channels": 4}, *HEAD], {}, "spec field 'layers[0]': missing key type"),
        (
            [{"type": "dropout"}, *HEAD],
            {},
            f"spec field 'layers[0].type': 'dropout', expected one of {LAYER_TYPES}",
        ),
        (
            [{"type": 5}, *HEAD],
            {},
            f"spec field 'layers[0].type': 5, expected one of {LAYER_TYPES}",
        ),
        (
            [{**CONV, "dilation": 2}, *HEAD],
            {},
            "spec field 'layers[0].dilation': not a key of a conv layer (its keys: channels, "
            "kernel, stride, padding)",
        ),
        (
            [CONV, {"type": "flatten", "start_dim": 1}, *HEAD[1:]],
            {},
            "spec field 'layers[1].start_dim': not a key of a flatten layer (it has no keys but type)",
        ),
        (
            [{"type": "conv", "kernel": 3}, *HEAD],
            {},
            "spec field 'layers[0]': missing key channels (a conv layer needs it)",
        ),
        (
            _lenet(l0={"channels": 6.0}),
            {},
            "spec field 'layers[0].channels': expected an integer in 1..65536, got 6.0",
        ),
        (
            _lenet(l5={"features": "120"}),
            {},
            "spec field 'layers[5].features': expected an integer in 1..65536, got '120'",
        ),
        (
            _lenet(l0={"kernel": True}),
            {},
            "spec field 'layers[0].kernel': expected an integer in 1..65536, got True",
        ),
        (
            _lenet(l0={"padding": False}),
            {},
            "spec field 'layers[0].padding': expected an integer in 0..65536, got False",
        ),
        (
            _lenet(l0={"padding": -1}),
            {},
            "spec field 'layers[0].padding': expected an integer in 0..65536, got -1",
        ),
        (
            _lenet(l1={"stride": 0}),
            {},
            "spec field 'layers[1].stride': expected an integer in 1..65536, got 0",
        ),
        (
            _lenet(l1={"stride": None}),
            {},
            "spec field 'layers[1].stride': expected an integer in 1..65536, got None",
        ),
        (
            _lenet(l0={"channels": 2**16 + 1}),
            {},
            "spec field 'layers[0].channels': expected an integer in 1..65536, got 65537",
        ),
        (
            _lenet(l0={"kernel": 29, "padding": 0}),
            {},
            "spec field 'layers[0].kernel': 29 is larger than its input 28x28",
        ),
        (
            _lenet(l0={"kernel": 33}),
            {},
            "spec field 'layers[0].kernel': 33 is larger than its input 28x28 padded by 2",
        ),
        (
            _lenet(l3={"kernel": 11}),
            {},
            "spec field 'layers[3].kernel': 11 is larger than its input 10x10",
        ),
        (
            [*_lenet()[:4], *_lenet()[5:]],
            {},
            "spec field 'layers[4]': a linear layer needs a flat input, got shape [16, 5, 5] "
            "(put a flatten layer before it)",
        ),
        (
            [{"type": "linear", "features": 8}, {"type": "linear", "features": 10}],
            {},
            "spec field 'layers[0]': a linear layer needs a flat input, got shape [1, 28, 28] "
            "(put a flatten layer before it)",
        ),
        (
            _lenet(),
            {"input_shape": [784]},
            "spec field 'layers[0]': a conv layer needs an image input (C, H, W), got shape [784]",
        ),
        (
            [CONV, {"type": "maxpool", "kernel": 2}, {"type": "batchnorm"}, *HEAD],
            {},
            "spec field 'layers[2]': a batchnorm layer must directly follow a conv or linear "
            "layer, this one follows a maxpool layer",
        ),
        (
            [{"type": "batchnorm"}, CONV, *HEAD],
            {},
            "spec field 'layers[0]': a batchnorm layer must directly follow a conv or linear "
            "layer, this one is the first layer",
        ),
        (
            [CONV, {"type": "batchnorm"}, {"type": "batchnorm"}, *HEAD],
            {},
            "spec field 'layers[2]': a batchnorm layer must directly follow a conv or linear "
            "layer, this one follows a batchnorm layer",
        ),
        (
            _lenet()[:5],
            {},
            "spec field 'layers[4]': the last layer must be linear (the logits), got flatten",
        ),
        (
            _lenet(l7={"features": 1}),
            {},
            "spec field 'layers[7].features': the last layer gives the classes, expected >= 2, "
            "got 1",
        ),
        (
            HEAD[::2],
            {},
            "spec field 'layers': expected at least one conv or linear layer before the last "
            "linear layer (a hidden layer for the mixed activations)",
        ),
        (
            _lenet(l5={"features": 121}),
            {},
            "spec field 'arch': expected [784, 6, 16, 121, 84, 10] (from layers and input_shape), "
            "got [784, 6, 16, 120, 84, 10]",
        ),
        (
            None,
            {"arch": [784, 6, 16, 120, 80, 10]},
            "spec field 'arch': expected [784, 6, 16, 120, 84, 10] (from layers and input_shape), "
            "got [784, 6, 16, 120, 80, 10]",
        ),
        (
            # every arch-based check holds as for an MLP: one name per channel of hidden layer 0
            None,
            {"assignment": [["relu"] * 5, ["relu"] * 16, ["relu"] * 120, ["relu"] * 84]},
            "spec field 'assignment[0]': expected 6 neurons, got 5",
        ),
        (
            None,
            {"input_shape": [1, 28.0, 28]},
            "spec field 'input_shape': expected a list of positive integers holding at most "
            "268435456 values, got [1, 28.0, 28]",
        ),
        (
            # sizes a hostile file may declare: refused before anything is allocated
            [{"type": "conv", "channels": 2**16, "kernel": 1}, *HEAD],
            {"input_shape": [2**16, 1, 1]},
            "spec field 'layers[0]': its weight holds 65536 x 65536 values, more than 268435456",
        ),
        (
            [{"type": "conv", "channels": 128, "kernel": 1}, *HEAD],
            {"input_shape": [1, 2048, 2048]},
            "spec field 'layers[0]': its output [128, 2048, 2048] holds more than 268435456 "
            "values per sample",
        ),
    ],
)
def test_bad_layers_are_named(layers: list | dict | None, changes: dict, message: str) -> None:
    with pytest.raises(contract.SpecError) as error:
        contract.ModelSpec.from_dict(_layered_dict(layers, **changes))
    assert str(error.value) == message


def test_conv_presets_derive_their_arch_and_shapes() -> None:
    lenet, convnet = (contract.resolve_conv_preset(name) for name in ("lenet5", "convnet"))
    assert contract.layered_arch(lenet, [1, 28, 28]) == [784, 6, 16, 120, 84, 10]
    assert contract.layered_arch(convnet, [1, 28, 28]) == [784, 32, 32, 64, 64, 128, 10]
    assert contract.layer_output_shapes(lenet, [1, 28, 28]) == LENET5_SHAPES
    assert contract.layer_output_shapes(convnet, [1, 28, 28])[-3:] == [[3136], [128], [10]]
    # hidden layers: every conv/linear but the last; the activation after its batchnorm
    assert contract.hidden_layer_indices(lenet) == [0, 2, 5, 6]
    assert contract.activation_after(lenet) == [0, 2, 5, 6]
    assert contract.hidden_layer_indices(convnet) == [0, 2, 5, 7, 11]
    assert contract.activation_after(convnet) == [1, 3, 6, 8, 11]
    # 3 channels of 32x32 (CIFAR-sized): 32 -> 16 -> 12 -> 6, flattened 16 * 6 * 6
    assert contract.layer_output_shapes(lenet, [3, 32, 32])[4] == [576]


def test_layered_weight_shapes_follow_the_spec_layer_indices() -> None:
    lenet = contract.resolve_conv_preset("lenet5")
    assert contract.layered_weight_shapes(lenet, [1, 28, 28]) == {
        "layers.0.weight": (6, 1, 5, 5),
        "layers.0.bias": (6,),
        "layers.2.weight": (16, 6, 5, 5),
        "layers.2.bias": (16,),
        "layers.5.weight": (120, 400),
        "layers.5.bias": (120,),
        "layers.6.weight": (84, 120),
        "layers.6.bias": (84,),
        "layers.7.weight": (10, 84),
        "layers.7.bias": (10,),
    }
    layers = [
        {"type": "flatten"},
        {"type": "linear", "features": 5},
        {"type": "batchnorm"},
        {"type": "linear", "features": 3},
    ]
    assert contract.layered_weight_shapes(layers, [2, 2]) == {
        "layers.1.weight": (5, 4),
        "layers.1.bias": (5,),
        "layers.2.weight": (5,),
        "layers.2.bias": (5,),
        "layers.2.running_mean": (5,),
        "layers.2.running_var": (5,),
        "layers.3.weight": (3, 5),
        "layers.3.bias": (3,),
    }
    assert contract.activation_after(layers) == [2]


def test_conv_presets_resolve_to_copies_with_the_data_classes() -> None:
    layers = contract.resolve_conv_preset("convnet", classes=3)
    assert layers[-1] == {"type": "linear", "features": 3}
    assert contract.CONV_PRESETS["convnet"][-1] == {"type": "linear", "features": 10}
    layers[0]["channels"] = 1  # a copy: the preset stays as it is
    assert contract.CONV_PRESETS["convnet"][0]["channels"] == 32
    assert contract.is_conv_preset("lenet5") and not contract.is_conv_preset("paper")
    with pytest.raises(contract.SpecError) as error:
        contract.resolve_conv_preset("resnet")
    names = ", ".join([*contract.PRESETS, "lenet5", "convnet"])
    assert str(error.value) == f"unknown preset 'resnet'; expected one of: {names}"
    assert contract.resolve_preset("paper") == list(contract.TABLE1[10])  # MLPs as before


def test_image_shape() -> None:
    assert contract.image_shape([28, 28]) == [1, 28, 28]
    assert contract.image_shape((3, 32, 32)) == [3, 32, 32]
    for shape in ([64], [2, 3, 4, 5]):
        with pytest.raises(contract.SpecError) as error:
            contract.image_shape(shape)
        assert str(error.value) == (
            f"conv nets need image-shaped data (H, W) or (C, H, W), got {shape}"
        )


def test_layered_spec_round_trips_through_json() -> None:
    spec = contract.ModelSpec.from_dict(_layered_dict())
    assert spec.is_layered and spec.arch == [784, 6, 16, 120, 84, 10]
    again = contract.ModelSpec.from_dict(contract.parse_json(spec.to_json()))
    assert again == spec and again.layers == contract.CONV_PRESETS["lenet5"]
    # defaults are written out: a pool's stride is its kernel, a conv's stride 1, padding 0
    short = [{"type": "conv", "channels": 4, "kernel": 3}, {"type": "avgpool", "kernel": 2}]
    spec = contract.ModelSpec.from_dict(
        _layered_dict(
            [*short, *HEAD], arch=[784, 4, 8, 10], assignment=[["relu"] * 4, ["relu"] * 8]
        )
    )
    assert spec.layers[:2] == [
        {"type": "conv", "channels": 4, "kernel": 3, "stride": 1, "padding": 0},
        {"type": "avgpool", "kernel": 2, "stride": 2},
    ]
    assert contract.layer_output_shapes(spec.layers, [1, 28, 28])[:2] == [[4, 26, 26], [4, 13, 13]]


def test_mlp_spec_without_a_layers_key_still_loads() -> None:
    old = _spec_dict()
    del old["layers"]  # model.json files written before layered specs
    spec = contract.ModelSpec.from_dict(old)
    assert spec.layers is None and not spec.is_layered and spec.arch == [4, 3, 2]
    assert spec.to_dict()["layers"] is None


def test_untrained_layered_spec() -> None:
    lenet = contract.resolve_conv_preset("lenet5")
    assignment = [["relu"] * width for width in (6, 16, 120, 84)]
    spec = contract.ModelSpec.untrained(
        pool=["relu"], assignment=assignment, layers=lenet, input_shape=[1, 28, 28]
    )
    assert (spec.arch, spec.input_shape, spec.mode) == (
        [784, 6, 16, 120, 84, 10],
        [1, 28, 28],
        "fixed:relu",
    )
    with pytest.raises(contract.SpecError) as error:
        contract.ModelSpec.untrained(pool=["relu"], assignment=assignment, layers=lenet)
    assert str(error.value) == "an untrained layered spec needs its input_shape, e.g. [1, 28, 28]"
