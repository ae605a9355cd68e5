"""export/verify.py: a graph that computes what PyTorch computes passes, and one that does not is
refused with a message naming the input set, the output and how far off it is."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from export_checks import assert_verified
from onnx import numpy_helper

from smartmixed.export import verify
from smartmixed.export.lower import lower
from smartmixed.export.verify import (
    MAX_TEST_SAMPLES,
    RANDOM_SAMPLES,
    VerificationError,
    input_sets,
    summarize,
    verify_against_torch,
)
from smartmixed.train.model import MixedMLP, ModelSpec

SPEC = ModelSpec(
    arch=[5, 6, 3],
    pool=["relu", "tanh", "selu"],
    mode="smartmixed",
    assignment=[["relu", "tanh", "selu", "tanh", "relu", "selu"]],
    preprocessing={"offset": 0.0, "scale": 0.5},
    input_shape=[5],
    labels=["a", "b", "c"],
)


@pytest.fixture(scope="module")
def network() -> tuple[MixedMLP, onnx.ModelProto, dict[str, np.ndarray]]:
    torch.manual_seed(3)
    model = MixedMLP.from_spec(SPEC).eval()
    state = {k: v.numpy() for k, v in model.canonical_state_dict().items()}
    test_x = np.random.default_rng(1).uniform(-2, 2, (40, 5)).astype(np.float32)
    inputs = input_sets(5, test_x=test_x, low=-2.0, high=2.0)
    return model, lower(SPEC, state, lowering="permuted"), inputs


def _tampered(model: onnx.ModelProto, name: str, delta: float) -> onnx.ModelProto:
    """A copy of ``model`` with ``delta`` added to every value of initializer ``name``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    (tensor,) = [t for t in copy.graph.initializer if t.name == name]
    tensor.CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(tensor) + np.float32(delta), name)
    )
    return copy


def test_the_lowered_graph_passes_on_every_set_and_level(network) -> None:
    model, graph, inputs = network
    report = verify_against_torch(graph, model, inputs, n_classes=3)
    assert_verified(report, graph, model, inputs)
    assert report["tolerance"]["torch64"] == "float64 copy of the model"


def test_a_tampered_initializer_is_refused_naming_the_output_and_the_error(network) -> None:
    model, graph, inputs = network
    bad = _tampered(graph, "output/b", 1e-3)  # the logits move by exactly 1e-3
    with pytest.raises(VerificationError) as refused:
        verify_against_torch(bad, model, inputs, n_classes=3, lowering="permuted")
    message = str(refused.value)
    assert message.startswith("the permuted lowering: ONNX Runtime does not match PyTorch: test ")
    for name, n in (("test", 40), ("random", RANDOM_SAMPLES), ("edge", 7)):
        for level in ("basic", "all"):  # 1e-3, and float32's rounding on the edge set's 1e3s
            pattern = rf"{name} \({level}, {n} samples\): logits max abs diff 0\.00(1|099|101), max"
            assert re.search(pattern, message), (name, level)
    report = refused.value.report
    assert report["passed"] is False and len(report["results"]) == 6
    assert all(not r["passed"] and r["max_abs_diff"] == pytest.approx(1e-3, rel=0.02)
               for r in report["results"])  # fmt: skip


def test_a_difference_within_the_tolerance_passes(network) -> None:
    model, graph, inputs = network
    report = verify_against_torch(_tampered(graph, "output/b", 2e-6), model, inputs, n_classes=3)
    assert 0 < max(r["tolerance_used"] for r in report["results"]) <= 1


def test_nan_weights_and_a_broken_graph_are_named_before_any_comparison(network) -> None:
    model, graph, inputs = network
    with pytest.raises(VerificationError, match=r"^ONNX model: initializer layer0/W holds"):
        verify_against_torch(_tampered(graph, "layer0/W", np.nan), model, inputs, n_classes=3)
    broken = onnx.ModelProto()
    broken.CopyFrom(graph)
    broken.graph.node[1].input[0] = "nowhere"
    with pytest.raises(VerificationError, match=r"^ONNX checker: .*nowhere"):
        verify_against_torch(broken, model, inputs, n_classes=3)


def test_outputs_of_other_names_or_shapes_are_refused(network) -> None:
    model, graph, inputs = network
    renamed = onnx.ModelProto()
    renamed.CopyFrom(graph)
    renamed.graph.output[1].name = "scores"
    renamed.graph.node[-1].output[0] = "scores"
    with pytest.raises(VerificationError, match=r"outputs are \['logits', 'scores'\]"):
        verify_against_torch(renamed, model, inputs, n_classes=3)
    with pytest.raises(VerificationError, match=r"test \(basic\): output shapes \(40, 3\) and "):
        verify_against_torch(graph, model, inputs, n_classes=4)


def test_the_edge_term_allows_twice_pytorchs_own_float32_error() -> None:
    want, exact = np.array([100.0], np.float32), np.array([100.0 + 1e-2])
    allowed = verify.ATOL + verify.RTOL * 100.0  # 0.01001 without torch64
    assert verify._compare(want + np.float32(0.009), want, None).passed
    assert not verify._compare(want + np.float32(0.011), want, None).passed
    assert verify._compare(want + np.float32(0.011), want, exact).passed  # + 2 x 0.01
    assert verify._compare(want + np.float32(0.011), want, None).used == pytest.approx(
        0.011 / allowed, rel=1e-3
    )
    assert not verify._compare(np.array([np.nan], np.float32), want, exact).passed


def test_input_sets_are_seeded_and_shaped() -> None:
    test_x = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)  # flat rows of a (3, 2, 2) image
    sets = input_sets((3, 2, 2), test_x=test_x, low=0.0, high=255.0, seed=4)
    assert {k: v.shape for k, v in sets.items()} == {
        "test": (2, 3, 2, 2),
        "random": (RANDOM_SAMPLES, 3, 2, 2),
        "edge": (7, 3, 2, 2),
    }
    assert all(v.dtype == np.float32 for v in sets.values())
    assert sets["random"].min() >= 0 and sets["random"].max() <= 255
    edge = sets["edge"].reshape(7, -1)
    assert (edge[0] == 0).all() and (edge[2] == 255).all() and (edge[4] == 25500).all()
    again = input_sets((3, 2, 2), test_x=test_x, low=0.0, high=255.0, seed=4)
    assert all(np.array_equal(sets[k], again[k]) for k in sets)
    many = np.zeros((MAX_TEST_SAMPLES + 5, 4), np.float32)
    assert len(input_sets(4, test_x=many, low=0.0, high=1.0)["test"]) == MAX_TEST_SAMPLES
    assert "test" not in input_sets(4, test_x=None, low=0.0, high=1.0)


def test_summarize_gives_the_worst_figures_per_set(network) -> None:
    model, graph, inputs = network
    lines = summarize(verify_against_torch(graph, model, inputs, n_classes=3)).splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["test", "40"],
        ["random", "512"],
        ["edge", "7"],
    ]
    assert all(line.endswith("argmax agreement 1.0000  (basic, all)") for line in lines)
