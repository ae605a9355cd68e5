"""export/autotune.py: which lowering auto keeps, on timings fixed in each test."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from smartmixed.export import autotune
from smartmixed.export.autotune import AUTO, Timing, choose_lowering, pick_lowering
from smartmixed.export.lower import LOWERINGS, lower
from smartmixed.export.verify import VerificationError
from smartmixed.train.model import ModelSpec

# bound at import, before conftest's fixed timer replaces the module's: the real ONNX Runtime one
from smartmixed.export.autotune import time_lowerings as real_time_lowerings  # isort: skip

SPEC = ModelSpec.untrained(
    arch=[6, 8, 3],
    pool=["relu", "sigmoid", "tanh", "leaky_relu"],
    assignment=[["relu", "tanh", "sigmoid", "leaky_relu"] * 2],
)
STATE = {
    "layers.0.weight": np.linspace(-1, 1, 48, dtype=np.float32).reshape(8, 6),
    "layers.0.bias": np.zeros(8, np.float32),
    "layers.1.weight": np.linspace(1, -1, 24, dtype=np.float32).reshape(3, 8),
    "layers.1.bias": np.zeros(3, np.float32),
}


def lowered(lowering: str) -> onnx.ModelProto:
    return lower(SPEC, STATE, lowering=lowering)


class Timer:
    """A timer that answers each call with the next of ``answers`` (candidate -> batch -> ms)
    and remembers what it was asked."""

    def __init__(self, *answers: dict[str, dict[int, float]]) -> None:
        self.answers, self.calls = list(answers), []

    def __call__(self, candidates, shape, **options):
        self.calls.append((dict(candidates), shape, options))
        answer = self.answers.pop(0)
        assert set(answer) == set(candidates)
        return answer


# the geometric mean picks folded (sqrt(1 x 100) = 10); the arithmetic mean would pick grouped (40)
FP32 = {
    "scatter": {1: 5.0, 256: 200.0},
    "permuted": {1: 3.0, 256: 90.0},
    "grouped": {1: 4.0, 256: 76.0},
    "folded": {1: 1.0, 256: 100.0},
    "folded_tanh": {1: 3.0, 256: 80.0},
}
INT8 = {"scatter": {1: 9.0, 256: 9.0}, "permuted": {1: 2.0, 256: 2.0}} | {
    lw: {1: 4.0, 256: 4.0} for lw in ("grouped", "folded", "folded_tanh")
}


def test_pick_lowering_takes_the_smallest_geometric_mean_and_the_first_on_a_tie() -> None:
    chosen, selection = pick_lowering(FP32)
    assert chosen == selection["chosen"] == "folded"
    assert selection["score_ms"]["folded"] == pytest.approx(10.0)
    assert selection["median_ms"]["grouped"] == {"1": 4.0, "256": 76.0}
    assert pick_lowering({"b": {1: 2.0, 8: 8.0}, "a": {1: 4.0, 8: 4.0}})[0] == "b"


def test_auto_verifies_every_candidate_then_keeps_the_fastest(monkeypatch) -> None:
    timer = Timer(FP32)
    monkeypatch.setattr(autotune, "time_lowerings", timer)
    verified = []

    def verify(model: onnx.ModelProto, *, lowering: str) -> dict:
        assert not timer.calls  # nothing is timed before every candidate passed
        verified.append(lowering)
        return {"lowering": lowering}

    timing = Timing(device="cpu", threads=2, batches=(1, 256), seed=7)
    choice = choose_lowering(AUTO, LOWERINGS, lowered, shape=6, verify=verify, timing=timing)
    assert verified == list(LOWERINGS) and choice.reports["folded"] == {"lowering": "folded"}
    assert choice.lowering == "folded" and choice.model is choice.models["folded"]
    assert choice.selection == pick_lowering(FP32)[1] | {
        "device": "cpu",
        "threads": 2,
        "batches": [1, 256],
    }
    ((candidates, shape, options),) = timer.calls
    assert candidates == {lw: m.SerializeToString() for lw, m in choice.models.items()}
    assert (shape, options) == (6, {"device": "cpu", "threads": 2, "batches": (1, 256), "seed": 7})


def test_an_int8_export_keeps_the_lowering_whose_int8_graph_is_fastest(monkeypatch) -> None:
    timer = Timer(FP32, INT8)
    monkeypatch.setattr(autotune, "time_lowerings", timer)
    quantized = []

    def int8(lowering: str) -> onnx.ModelProto:
        quantized.append(lowering)
        model = lowered(lowering)
        model.doc_string = "int8"  # what the timer is given: the int8 graphs
        return model

    choice = choose_lowering(AUTO, LOWERINGS, lowered, shape=6, int8=int8)
    assert quantized == list(LOWERINGS)
    assert choice.lowering == "permuted" and choice.selection["chosen"] == "permuted"
    assert choice.selection["precision"] == "int8"
    assert choice.selection["fp32"]["chosen"] == "folded"  # the fp32 timings stay recorded
    assert all(b"int8" in graph for graph in timer.calls[1][0].values())


def test_a_requested_lowering_or_a_single_distinct_one_is_not_timed(monkeypatch) -> None:
    monkeypatch.setattr(autotune, "time_lowerings", Timer())  # fails when called
    asked = []

    def lower_once(lowering: str) -> onnx.ModelProto:
        asked.append(lowering)
        return lowered(lowering)

    choice = choose_lowering("grouped", LOWERINGS, lower_once, shape=6)
    assert (choice.lowering, choice.selection, asked) == ("grouped", None, ["grouped"])
    choice = choose_lowering(AUTO, ("permuted",), lower_once, shape=6, int8=lowered)
    assert (choice.lowering, choice.selection, list(choice.models)) == (
        "permuted",
        None,
        ["permuted"],
    )


def test_a_candidate_that_fails_verification_stops_the_choice(monkeypatch) -> None:
    timer = Timer(FP32)
    monkeypatch.setattr(autotune, "time_lowerings", timer)

    def verify(model: onnx.ModelProto, *, lowering: str) -> dict:
        if lowering == "grouped":
            raise VerificationError(f"the {lowering} lowering: ONNX Runtime does not match", {})
        return {}

    with pytest.raises(VerificationError, match="the grouped lowering"):
        choose_lowering(AUTO, LOWERINGS, lowered, shape=6, verify=verify)
    assert not timer.calls


def test_time_lowerings_times_every_candidate_at_every_batch() -> None:
    graphs = {lw: lowered(lw).SerializeToString() for lw in ("scatter", "permuted")}
    timings = real_time_lowerings(graphs, 6, threads=1, batches=(1, 3), rounds=1, repeats=2)
    assert set(timings) == set(graphs) and all(set(per) == {1, 3} for per in timings.values())
    assert all(ms > 0 for per in timings.values() for ms in per.values())
