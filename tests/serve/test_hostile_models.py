"""Hostile model files: tensors kept in external files, metadata too deep or of the wrong shape.

Every model here is a tiny graph built with onnx.helper (no training): 4 features -> logits =
x @ W + B -> probabilities, 3 classes, carrying the metadata export writes; each case damages one
thing. A refused entry is one LoadError line; with --skip-bad-models the others are served and the
refused one answers 503 (not ready), never 500.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from smartmixed.contract import (
    META_LOWERING,
    META_PRECISION,
    META_RUN,
    META_SELECTION,
    META_SPEC,
    META_VERIFICATION,
    MODEL_FILE,
    ModelSpec,
)
from smartmixed.serve.app import create_app
from smartmixed.serve.cli import main
from smartmixed.serve.models import LoadError, load_repository
from smartmixed.serve.settings import ServeSettings

N_FEATURES, N_CLASSES = 4, 3
SECRET = b"hunter2 key!"  # 12 bytes: read as 3 float32 logits, finite


def exported_metadata() -> dict[str, Any]:
    """The metadata_props export writes (as Python values) for the tiny model."""
    spec = ModelSpec.untrained(
        arch=[N_FEATURES, 2, N_CLASSES], pool=["relu"], assignment=[["relu", "relu"]]
    ).to_dict()
    spec["metrics"] = {"test_accuracy": 0.5, "val_accuracy": 0.5, "phase1": {"epochs": 1}}
    return {
        META_SPEC: spec,
        META_LOWERING: "permuted",
        META_PRECISION: "fp32",
        META_VERIFICATION: {"passed": True, "tolerance": {"atol": 1e-5}, "results": []},
        META_SELECTION: None,
        META_RUN: "runs/tiny",
    }


def tiny_graph(bias: list[onnx.NodeProto] | None = None) -> onnx.GraphProto:
    """input (N, 4) @ W (zeros) + B -> logits (N, 3); softmax -> probabilities. ``bias``: nodes
    computing B (default: B is an initializer of 0, 1, 2)."""
    nodes = [
        *(bias or []),
        helper.make_node("MatMul", ["input", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    initializers = [numpy_helper.from_array(np.zeros((N_FEATURES, N_CLASSES), np.float32), "W")]
    if bias is None:
        initializers.append(numpy_helper.from_array(np.arange(N_CLASSES, dtype=np.float32), "B"))

    def rows(name: str, width: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])

    return helper.make_graph(
        nodes,
        "tiny",
        [rows("input", N_FEATURES)],
        [rows("logits", N_CLASSES), rows("probabilities", N_CLASSES)],
        initializer=initializers,
    )


def tiny_model(graph: onnx.GraphProto | None = None, **raw: str) -> onnx.ModelProto:
    """The tiny model with export's metadata; ``raw``: metadata values replaced by this text
    (keys given as contract.META_* without the prefix, e.g. spec=...)."""
    model = helper.make_model(
        graph or tiny_graph(), opset_imports=[helper.make_opsetid("", 17)], ir_version=9
    )
    entries = {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in exported_metadata().items()
    }
    entries |= {f"smartmixed.{k}": v for k, v in raw.items()}
    for key, value in entries.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return model


def write_entry(root: Path, name: str, model: onnx.ModelProto) -> Path:
    path = root / name / "1" / MODEL_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(model.SerializeToString())
    return path


def _load(root: Path, *, skip_bad_models: bool = False):
    return load_repository(root, device="cpu", threads=1, skip_bad_models=skip_bad_models)


def _refused(root: Path, name: str) -> str:
    """The one-line LoadError of loading ``root``; --skip-bad-models serves "good" without NAME."""
    with pytest.raises(LoadError) as refused:
        _load(root)
    message = str(refused.value)
    assert "\n" not in message
    repo = _load(root, skip_bad_models=True)
    assert list(repo.models) == ["good"] and repo.failed == {name: message}
    return message


def _served_without(root: Path, name: str, message: str) -> None:
    """Over HTTP with --skip-bad-models: NAME answers 503 (why: ``message``) on every route,
    "good" 200."""
    settings = ServeSettings(repository=root, skip_bad_models=True)
    rows = [[0.0] * N_FEATURES]
    infer = {
        "inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": rows}]
    }
    with TestClient(create_app(settings)) as client:
        for route in ("", "/ready", "/config", "/versions/1"):
            assert client.get(f"/v2/models/{name}{route}").status_code == 503, route
            assert client.get(f"/v2/models/good{route}").status_code == 200, route
        for refused in (
            client.post(f"/v1/models/{name}:predict", json={"instances": rows}),
            client.post(f"/v2/models/{name}/infer", json=infer),
        ):
            assert refused.status_code == 503
            assert refused.json() == {"error": f"model {name!r} is not ready: {message}"}
        served = client.post("/v1/models/good:predict", json={"instances": rows}).json()
        assert [p["label"] for p in served["predictions"]] == ["2"]  # B = 0, 1, 2
        assert client.get("/v2/models/good").json()["smartmixed"]["test_metrics"] == {
            "test_accuracy": 0.5
        }


# --------------------------------------------------------------------------------------------
# Tensors kept in an external file: ONNX Runtime would read them from the working directory


def _external(name: str, location: str = "secret.txt") -> onnx.TensorProto:
    """A float tensor NAME of 3 values whose data lies in ``location`` (ONNX's external data)."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[N_CLASSES])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(SECRET)))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _if_bias(tensor: onnx.TensorProto) -> list[onnx.NodeProto]:
    """B = If(true) { Constant(tensor) } else { Constant(0, 0, 0) }."""

    def branch(value: onnx.TensorProto, name: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [N_CLASSES])
        constant = helper.make_node("Constant", [], [f"{name}_out"], value=value)
        return helper.make_graph([constant], name, [], [out])

    zero = numpy_helper.from_array(np.zeros(N_CLASSES, np.float32), "zero")
    return [
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", 9, [], [True])),
        helper.make_node(
            "If",
            ["cond"],
            ["B"],
            name="choose",
            then_branch=branch(tensor, "then"),
            else_branch=branch(zero, "else"),
        ),
    ]


def _initializer_graph() -> onnx.GraphProto:
    graph = tiny_graph()
    graph.initializer[1].CopyFrom(_external("B"))
    return graph


def _sparse_graph() -> onnx.GraphProto:
    graph = tiny_graph()
    del graph.initializer[1]
    indices = numpy_helper.from_array(np.arange(N_CLASSES, dtype=np.int64), "B_indices")
    graph.sparse_initializer.append(helper.make_sparse_tensor(_external("B"), indices, [3]))
    return graph


EXTERNAL_TENSORS = {
    # where the tensor sits: (graph, how the error names it)
    "initializer": (_initializer_graph, "initializer B"),
    "sparse initializer": (_sparse_graph, "sparse initializer B"),
    "Constant node": (
        lambda: tiny_graph(
            [helper.make_node("Constant", [], ["B"], name="bias", value=_external("v"))]
        ),
        "attribute value of node bias",
    ),
    "If subgraph": (
        lambda: tiny_graph(_if_bias(_external("v"))),
        "attribute value of node Constant",
    ),
}


@pytest.mark.parametrize("case", EXTERNAL_TENSORS)
def test_a_tensor_in_an_external_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A bias read from secret.txt in the server's working directory (zero weights: the logits
    would be the file's bytes) is refused before ONNX Runtime sees the model."""
    graph, named = EXTERNAL_TENSORS[case]
    root, cwd = tmp_path / "models", tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(cwd)
    write_entry(root, "good", tiny_model())
    path = write_entry(root, "leak", tiny_model(graph()))
    message = _refused(root, "leak")
    assert message == (
        f"leak/1: {path}: {named} keeps its data in an external file ('secret.txt'); "
        "smartmixed serves self-contained models only"
    )
    _served_without(root, "leak", message)


def test_nonfinite_values_are_refused_wherever_the_model_stores_them(tmp_path: Path) -> None:
    nan = numpy_helper.from_array(np.array([0, np.nan, np.inf], np.float32), "v")
    for graph, named in (
        (tiny_graph([helper.make_node("Constant", [], ["B"], name="bias", value=nan)]), "bias"),
        (tiny_graph(_if_bias(nan)), "Constant"),
    ):
        root = tmp_path / named
        write_entry(root, "good", tiny_model())
        path = write_entry(root, "nan", tiny_model(graph))
        assert _refused(root, "nan") == (
            f"nan/1: {path}: attribute value of node {named} holds 1 NaN and 1 inf values"
        )


# --------------------------------------------------------------------------------------------
# Metadata nested too deep: one error naming the key, not a RecursionError

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("spec", DEEP, "JSON nested deeper than 64 levels"),
        ("verification", DEEP, "JSON nested deeper than 64 levels"),
        ("run", DEEP, "JSON nested deeper than 64 levels"),  # a key serve does not read
        ("selection", "[" * 65 + "]" * 65, "JSON nested 65 levels deep (at most 64)"),
    ],
)
def test_deeply_nested_metadata_is_refused_naming_its_key(
    tmp_path: Path, key: str, value: str, problem: str
) -> None:
    write_entry(tmp_path, "good", tiny_model())
    path = write_entry(tmp_path, "deep", tiny_model(**{key: value}))
    message = _refused(tmp_path, "deep")
    assert message == f"deep/1: {path}: metadata smartmixed.{key}: {problem}"
    _served_without(tmp_path, "deep", message)


def test_the_command_refuses_deep_metadata_in_one_line(tmp_path: Path, capsys) -> None:
    path = write_entry(tmp_path, "deep", tiny_model(spec=DEEP))
    assert main(["--repository", str(tmp_path), "--port", "0"]) == 2
    assert capsys.readouterr().err == (
        f"smartmixed-serve: error: deep/1: {path}: metadata smartmixed.spec: JSON nested deeper "
        "than 64 levels\n"
    )


# --------------------------------------------------------------------------------------------
# Metadata of the wrong shape: refused at load, never a 500 when a route reads it


def _spec(**changes: Any) -> str:
    return json.dumps(exported_metadata()[META_SPEC] | changes)


TAMPERED = {
    # case: (metadata text by key, the problem after "NAME/VERSION: PATH: ")
    "labels a number": (
        {"spec": _spec(labels=5)},
        "metadata smartmixed.spec: spec field 'labels': expected a list of strings, got an integer",
    ),
    "assignment [5]": (
        {"spec": _spec(assignment=[5])},
        "metadata smartmixed.spec: spec field 'assignment[0]': expected a list of activation "
        "names, got an integer",
    ),
    "pool a number": (
        {"spec": _spec(pool=5)},
        "metadata smartmixed.spec: spec field 'pool': expected a list of activation names, got an "
        "integer",
    ),
    "metrics [1]": (
        {"spec": _spec(metrics=[1])},
        "metadata smartmixed.spec field 'metrics': expected an object, got an array",
    ),
    "a test metric not a number": (
        {"spec": _spec(metrics={"test_accuracy": "high"})},
        "metadata smartmixed.spec field 'metrics.test_accuracy': expected a number, got a string",
    ),
    "2 labels for 3 classes": (
        {"spec": _spec(labels=["a", "b"])},
        "metadata smartmixed.spec: spec field 'labels': expected 3 class labels, got 2",
    ),
    "labels not strings": (
        {"spec": _spec(labels=["a", "b", 3])},
        "metadata smartmixed.spec: spec field 'labels': expected a list of strings, item 2 is an "
        "integer",
    ),
    "arch not the graph's": (
        {"spec": _spec(arch=[4, 2, 4], labels=["a", "b", "c", "d"])},  # a spec of its own
        "metadata smartmixed.spec field 'arch': [4, 2, 4] does not go from the model's input "
        "width 4 to its output width 3",
    ),
    "verification a list": (
        {"verification": "[]"},
        "metadata smartmixed.verification: expected an object, got an array",
    ),
    "verification passed a string": (
        {"verification": '{"passed": "yes"}'},
        "metadata smartmixed.verification field 'passed': expected a boolean, got a string",
    ),
    "selection timings a list": (
        {"selection": '{"chosen": "folded", "median_ms": {"folded": [1]}}'},
        "metadata smartmixed.selection field 'median_ms.folded': expected an object, got an array",
    ),
    "selection chosen a list": (
        {"selection": '{"chosen": [1], "median_ms": {}}'},
        "metadata smartmixed.selection field 'chosen': expected a string, got an array",
    ),
    "quantization a number": (
        {"quantization": "5"},
        "metadata smartmixed.quantization: expected an object, got a number",
    ),
    "lowering an object": (
        {"lowering": "{}"},
        "metadata smartmixed.lowering: expected a string, got an object",
    ),
    "precision unknown": (
        {"precision": "fp64"},
        'metadata smartmixed.precision: "fp64", expected one of fp32, int8',
    ),
    "an integer beyond 64 bits": (
        {"verification": f'{{"tolerance": {{"atol": {2**70}}}}}'},
        "metadata smartmixed.verification: cannot be sent as JSON (Integer exceeds 64-bit range)",
    ),
    "an integer of 5000 digits": (  # text json cannot parse: a string, not an object
        {"quantization": "1" * 5000},
        "metadata smartmixed.quantization: expected an object, got a string",
    ),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_metadata_of_the_wrong_shape_is_refused_at_load(tmp_path: Path, case: str) -> None:
    raw, problem = TAMPERED[case]
    write_entry(tmp_path, "good", tiny_model())
    path = write_entry(tmp_path, "bad", tiny_model(**raw))
    message = _refused(tmp_path, "bad")
    assert message == f"bad/1: {path}: {problem}"
    _served_without(tmp_path, "bad", message)


def test_a_spec_that_does_not_hold_together_is_refused_by_its_own_checks(tmp_path: Path) -> None:
    write_entry(tmp_path, "good", tiny_model())
    path = write_entry(tmp_path, "bad", tiny_model(spec=_spec(assignment=[["relu"]])))
    message = _refused(tmp_path, "bad")
    assert message.startswith(f"bad/1: {path}: metadata smartmixed.spec: ")
    assert "assignment[0]" in message


def test_metadata_export_may_leave_out_is_described_without_it(tmp_path: Path) -> None:
    """Reports absent, null or partial (a named lowering times nothing; fp32 has no
    quantization) and plain-text values: served, described with what there is."""
    write_entry(tmp_path, "good", tiny_model(selection='{"chosen": "permuted"}', verification="{}"))
    model = _load(tmp_path).get("good")
    described = model.describe()
    assert described["latency"] is None and described["quantization"] is None
    assert described["verification"] == {"passed": None, "tolerance": None, "results": None}
    assert (described["lowering"], described["precision"]) == ("permuted", "fp32")
    assert described["labels"] == ["0", "1", "2"] and described["activation_mix"] == [{"relu": 2}]
    with TestClient(create_app(ServeSettings(repository=tmp_path))) as client:
        assert client.get("/v2/models/good").json()["smartmixed"] == described
