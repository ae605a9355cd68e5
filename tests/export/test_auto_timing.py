"""`--lowering auto` with ONNX Runtime's real timings (the other export tests use a fixed timer):
what is recorded is what was measured, and the choice follows from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smartmixed.export.autotune import AUTO_BATCHES, pick_lowering
from smartmixed.export.cli import main
from smartmixed.export.lower import LOWERINGS
from smartmixed.export.module import export_module
from smartmixed.nn import FrozenMixedActivation

REAL_TIMING = True  # conftest: no fixed timer in this module
pytestmark = pytest.mark.slow


def _picked_from_its_timings(selection: dict) -> None:
    """The selection's choice is pick_lowering's on the timings it records."""
    timings = {
        name: {int(b): ms for b, ms in per.items()} for name, per in selection["median_ms"].items()
    }
    assert all(ms > 0 for per in timings.values() for ms in per.values())
    chosen, recorded = pick_lowering(timings)
    assert chosen == selection["chosen"]
    assert recorded["score_ms"] == pytest.approx(selection["score_ms"])


def test_auto_times_every_lowering_and_its_int8_graph(tiny_run: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert main([str(tiny_run), "--repository", str(models), "--threads", "1"]) == 0
    selection = json.loads((models / "tiny" / "1" / "export.json").read_text())["selection"]
    assert set(selection["median_ms"]) == set(LOWERINGS)
    assert selection["batches"] == list(AUTO_BATCHES) and selection["threads"] == 1
    _picked_from_its_timings(selection)

    argv = [str(tiny_run), "--repository", str(models), "--quantize", "int8"]
    assert main([*argv, "--min-agreement", "0.5", "--max-accuracy-drop", "50"]) == 0
    report = json.loads((models / "tiny-int8" / "1" / "export.json").read_text())
    assert report["selection"]["precision"] == "int8"
    _picked_from_its_timings(report["selection"])
    _picked_from_its_timings(report["selection"]["fp32"])
    granularity = report["quantization"]["timings"]
    assert set(granularity["median_ms"]) == {"fp32", "per_tensor", "per_channel"}


def test_auto_times_a_modules_lowerings_that_change_something(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pool = ["relu", "sigmoid", "tanh", "leaky_relu"]
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        FrozenMixedActivation(pool, ["tanh", "relu", "sigmoid", "leaky_relu"] * 2),
        torch.nn.Linear(8, 3),
    ).eval()
    result = export_module(model, torch.randn(2, 6), repository=tmp_path, name="m")
    selection = result.report["selection"]
    assert set(selection["median_ms"]) == {"scatter", "permuted", "folded", "folded_tanh"}
    _picked_from_its_timings(selection)
