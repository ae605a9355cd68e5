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
from smartmixed.serve.runtime import load_repository
from smartmixed.train.model import MixedMLP
from smartmixed.train.pool import ACTIVATIONS

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
    assert contract.DEFAULT_POOL + contract.EXTRA_ACTIVATIONS == contract.ACTIVATION_NAMES


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
