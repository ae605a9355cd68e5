"""The scripts kept under results/ still run: each on tiny input (its timing loops cut to one
round), and the study commands recorded as shell scripts still parse (``--plan``: nothing
trains). A script that cannot run any more is removed, its command kept in its folder's README.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import shlex
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"
PILOT = RESULTS / "selection-2026-11" / "pilot-phase2"
AFU = RESULTS / "afu-2026-11"


def load_script(path: Path) -> ModuleType:
    """``path`` imported as a module (its ``if __name__ == "__main__"`` block not run), so a test
    can shrink its constants before calling its functions."""
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# selection-2026-11/pilot-phase2: the pilot's figure and tables from its study files


def test_pilot_plot_draws_its_figure_from_the_study_files(tmp_path: Path) -> None:
    # plot.py writes beside itself: a copy with the pilot's study files (s1-s5.json)
    for name in ("plot.py", *(f"s{i}.json" for i in range(1, 6))):
        shutil.copy(PILOT / name, tmp_path / name)
    runpy.run_path(str(tmp_path / "plot.py"))
    assert (tmp_path / "pilot-phase2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cell(arch: str, model: str, seed: int, val: float, test: float, run: Path) -> dict:
    return {
        "archkey": arch,
        "model": model,
        "seed": seed,
        "val_accuracy": val,
        "test_accuracy": test,
        "run": str(run),
    }


def test_pilot_summarise_prints_paired_differences_and_the_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "sm-101"  # the smartmixed run of seed 101 is at hand: its layer-1 mix shows
    run.mkdir()
    spec = {"mode": "smartmixed", "assignment": [["tanh", "tanh", "relu", "elu"], ["relu"]]}
    (run / "model.json").write_text(json.dumps(spec))
    cells = [
        _cell("a", "relu", 101, 0.90, 0.80, tmp_path / "gone"),
        _cell("a", "relu", 102, 0.92, 0.84, tmp_path / "gone"),
        _cell("a", "sm", 101, 0.93, 0.81, run),
        _cell("a", "sm", 102, 0.91, 0.85, tmp_path / "gone"),
    ]
    study = tmp_path / "s.json"
    study.write_text(json.dumps({"cells": cells}))
    monkeypatch.setattr(sys, "argv", ["summarise.py", str(study)])
    runpy.run_path(str(PILOT / "summarise.py"))
    assert capsys.readouterr().out.splitlines() == [
        "## a",
        "          relu n=2 val 0.9100 test 0.8200  d_val +0.0000 d_test +0.0000  ",
        "            sm n=2 val 0.9200 test 0.8300  d_val +0.0100 d_test +0.0100  "
        "tanh 50%, relu 25%, elu 25%",
    ]


# --------------------------------------------------------------------------------------------
# afu-2026-11: the learned unit's cost in elementwise passes, and its tables from run folders


def _record(model: str, lowering: str, p50: float, **extra) -> dict:
    return {
        "model": model,
        "runtime": "onnxruntime",
        "lowering": lowering,
        "batch": 2,
        "threads": 1,
        "p50_ms": p50,
        **extra,
    }


def test_afu_cost_sets_the_unit_against_elementwise_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    latency = {
        "config": {"arch": [4, 6, 5, 3], "batches": [2]},
        "records": [
            _record("relu", "fixed", 0.5),
            _record("afu", "fixed", 0.6),
            _record("mixed", "auto", 0.7, ratio_vs_ideal=1.25, ratio_vs_relu=1.4),
        ],
    }
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(latency))
    script = load_script(AFU / "afu_cost.py")
    script.ROUNDS, script.REPEATS = 2, 1
    script.main(str(path))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Architecture [4, 6, 5, 3]: 11 hidden neurons; N = 8; 1 intra-op thread."
    assert len(out) == 5 and out[3] == "|---|---|---|---|---|---|---|---|---|"
    cells = [cell.strip() for cell in out[4].strip("|").split("|")]
    # batch, relu, afu, afu / relu, extra ms; one pass and passes are timed; the mix's ratios
    assert cells[:5] + cells[7:] == ["2", "0.500", "0.600", "1.20x", "0.100", "1.25x", "1.40x"]


def _afu_run(root: Path, name: str, *, accuracy: float, smartmixed: bool) -> None:
    import torch
    from safetensors.torch import save_file

    from smartmixed.contract import afu_tensor_name

    run = root / name
    run.mkdir()
    metrics: dict = {"test_accuracy": accuracy}
    state = {}
    if "afu" in name:
        metrics["afu"] = {"max_abs_diff_from_relu": [0.0]}
        # G(z) = 1 * relu(1 * z + 0) + 0 with one live unit: relu itself (slopes 0 / 1)
        values = {"w0": [1.0, 0.5], "b0": [0.0, 0.0], "w1": [1.0, 0.0], "b1": [0.0]}
        state = {afu_tensor_name(0, k): torch.tensor(v) for k, v in values.items()}
    spec = {
        "arch": [2, 4, 2],
        "metrics": metrics,
        "afu": {"base": "relu"},
        "assignment": [["afu", "relu", "afu", "afu"] if smartmixed else ["relu"] * 4],
    }
    (run / "model.json").write_text(json.dumps(spec))
    save_file(state or {"unused": torch.zeros(1)}, run / "model.safetensors")


def test_afu_collect_tabulates_accuracy_and_the_learned_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _afu_run(tmp_path, "relu-s0", accuracy=0.5, smartmixed=False)
    _afu_run(tmp_path, "afu-s0", accuracy=0.75, smartmixed=False)
    _afu_run(tmp_path, "sm-afu-s0", accuracy=0.625, smartmixed=True)
    load_script(AFU / "collect.py").main(str(tmp_path))
    assert capsys.readouterr().out.splitlines() == [
        "| model | seed 0 | mean ± std | vs relu, paired |",
        "|---|---|---|---|",
        "| fixed:relu (80 epochs) | 0.500 | 0.5000 |  |",
        "| fixed:afu (80 epochs) | 0.750 | 0.7500 | +25.00 points (1 of 1 seeds above) |",
        "| SmartMixed, pool = paper's six + afu (20 + 60) | 0.625 | 0.6250 | +12.50 points (1 of 1 "
        "seeds above) |",
        "",
        "max |G(z) - relu(z)| on [-6, 6] per hidden layer (L1 ... L6); afu share of each layer",
        "(SmartMixed); max |G(z) - G_0(z)| (distance from the start, = relu) is the same figure.",
        "",
        "| run | max abs G - relu, per layer | slope left / right, per layer | afu share |",
        "|---|---|---|---|",
        "| afu seed 0 | 0.00 | 0.00 / 1.00 | - |",
        "| sm-afu seed 0 | 0.00 | 0.00 / 1.00 | 75% |",
    ]


# --------------------------------------------------------------------------------------------
# latency-2026-11/floor.py and convnets-2026-12/lowering-search.py: timing scripts, one round


@pytest.mark.slow  # 18 graphs of the paper architecture built and checked: 1.5-3 s
def test_floor_checks_every_form_against_numpy_and_writes_its_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    script = RESULTS / "latency-2026-11" / "floor.py"
    out = tmp_path / "floor"
    argv = [str(script), "--out", str(out), "--rounds", "1", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    floor = load_script(script)
    floor.main()  # asserts every form against its numpy reference before timing it
    written = json.loads((out / "floor.json").read_text())
    assert [row["form"] for row in written["rows"]] == floor.FORMS
    assert written["rows"][0] == {**written["rows"][0], "form": "relu only", "ratio": 1.0}
    assert (written["batch"], written["rounds"], written["repeats"]) == (1, 1, 1)
    table = (out / "floor.md").read_text()
    assert table.startswith("# Mixed layers in standard ONNX ops, batch 1, 1 intra-op thread\n")
    assert table.count("\n| ") == len(floor.FORMS) + 1  # the header and one row per form
    assert capsys.readouterr().out == table + "\n"


@pytest.mark.slow
def test_lowering_search_rewrites_the_folded_graph_per_group(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smartmixed.export.cli import main as export
    from smartmixed.train.cli import main as train

    folder = RESULTS / "convnets-2026-12"
    run = tmp_path / "lenet5-mixed"  # a mixed LeNet-5 run, as the search's own (runs/ is not kept)
    flags = ["--data", "mnist", "--preset", "lenet5", "--p1-epochs", "1", "--p2-epochs", "1"]
    assert train([*flags, "--out", str(run), "--quiet"]) == 0
    argv = [str(run), "--repository", str(tmp_path / "models"), "--lowering", "folded_tanh"]
    assert export([*argv, "--name", "ft"]) == 0
    search = load_script(folder / "lowering-search.py")
    search.ROUNDS, search.REPEATS = 1, {1: 1, 32: 1}
    capsys.readouterr()
    search.main(
        str(tmp_path / "models" / "ft" / "1" / "model.onnx")
    )  # asserts every variant's outputs
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "batch 1",
        "batch 32",
        "one extra Relu node on [1, 120]",
        "one extra Sigmoid node on [1, 120]",
        "one extra Elu node on [1, 120]",
    ]
    for variant in ("folded_tanh", "per-group Gemm", "per-group Conv (2nd)", "per-group Conv"):
        assert f"{variant} " in lines[0]


# --------------------------------------------------------------------------------------------
# Study commands kept as shell scripts: their flags still parse, smartmixed-train's included


def _study_scripts() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*.sh") if "smartmixed-bench study" in p.read_text())


def _study_argv(script: Path) -> list[str]:
    """The arguments after `smartmixed-bench` in ``script`` (line continuations joined)."""
    text = script.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if "smartmixed-bench study" in line]
    words = shlex.split(line, comments=True)
    return words[next(i for i, w in enumerate(words) if w.endswith("smartmixed-bench")) + 1 :]


@pytest.mark.parametrize(
    "script", _study_scripts(), ids=lambda p: p.relative_to(RESULTS).as_posix()
)
def test_recorded_study_commands_still_parse(
    script: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smartmixed.bench.cli import main as bench

    argv = _study_argv(script)
    out = argv.index("--out") + 1
    assert (RESULTS.parent / argv[out]).parent.is_dir()  # it writes beside the script's results
    argv[out] = str(tmp_path / "study")  # an empty study: --plan lists the first cells
    split = argv.index("--") if "--" in argv else len(argv)
    assert bench([*argv[:split], "--plan", *argv[split:]]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert commands and all(" -m smartmixed.train " in c for c in commands)
    assert not (tmp_path / "study").exists()


# --------------------------------------------------------------------------------------------
# verdict-2026-12/verdict.py: SmartMixed against the best fixed activation, per architecture


def test_verdict_pairs_the_mix_with_each_architectures_best_fixed_activation() -> None:
    verdict = load_script(RESULTS / "verdict-2026-12" / "verdict.py")
    tests = {  # (arch, model): test accuracy per seed
        ("a", "relu"): [0.90, 0.92, 0.94],
        ("a", "tanh"): [0.95, 0.95, 0.95],  # a's best fixed: the mix loses to it every seed
        ("a", "smartmixed"): [0.91, 0.92, 0.93],
        ("b", "relu"): [0.80, 0.80, 0.80],
        ("b", "smartmixed"): [0.81, 0.79, 0.80],  # level with b's only fixed one
    }
    cells = [
        {"archkey": a, "model": m, "seed": s, "test_accuracy": acc, "chosen": True}
        for (a, m), accs in tests.items()
        for s, acc in enumerate(accs)
    ]
    cells.append(
        {"archkey": "a", "model": "tanh", "seed": 0, "test_accuracy": 0.1, "chosen": False}
    )
    summary = {a: {} for a, _ in tests}
    for (a, m), accs in tests.items():
        summary[a][m] = {"mean": sum(accs) / 3}
    rows = verdict.verdicts({"cells": cells, "summary": summary})
    assert [(r["arch"], r["best"], r["n"], r["verdict"]) for r in rows] == [
        ("a", "tanh", 3, "loss"),
        ("b", "relu", 3, "tie"),
    ]
    assert rows[0]["difference"][0] == pytest.approx(-0.03)
    assert rows[1]["difference"][0] == pytest.approx(0.0)
    table = verdict.render(rows)
    assert "| a | 0.9200 | tanh 0.9500 | -3.00 [" in table and "| loss |" in table
    # a variant in the mix's place: paired with the same best fixed activation
    for c in [c for c in cells if c["model"] == "smartmixed" and c["archkey"] == "a"]:
        cells.append({**c, "model": "sm-v", "test_accuracy": c["test_accuracy"] + 0.06})
    summary["a"]["sm-v"] = {"mean": 0.97}
    (row,) = verdict.verdicts({"cells": cells, "summary": summary}, mix="sm-v")
    assert (row["arch"], row["best"], row["verdict"]) == ("a", "tanh", "win")
    assert row["difference"][0] == pytest.approx(0.03)


def test_search_pairs_each_variant_with_the_baselines_on_validation_only() -> None:
    search = load_script(RESULTS / "verdict-2026-12" / "search.py")

    def cell(arch, model, seed, val, chosen=True):
        return {"archkey": arch, "model": model, "seed": seed, "val_accuracy": val,
                "test_accuracy": 0.0, "chosen": chosen}  # fmt: skip

    cells = [
        cell("a", "relu", 0, 0.90), cell("a", "relu", 1, 0.92),
        cell("a", "leaky_relu", 0, 0.91), cell("a", "leaky_relu", 1, 0.91),
        cell("a", "sm-x", 0, 0.93), cell("a", "sm-x", 1, 0.91), cell("a", "sm-x", 2, 0.99),
        cell("a", "sm-y", 0, 0.80), cell("a", "sm-y", 1, 0.99, chosen=False),
        cell("b", "relu", 0, 0.50), cell("b", "sm-x", 0, 0.56),
    ]  # fmt: skip
    rows = search.search_rows({"cells": cells})
    assert [r["model"] for r in rows] == ["sm-x", "sm-y", "relu", "leaky_relu"]
    x = rows[0]
    assert x["paired"]["relu"][0] == pytest.approx((0.03 - 0.01 + 0.06) / 3)
    assert x["paired"]["relu"][1] == 3  # seed 2 has no relu cell to pair with
    assert x["paired"]["leaky_relu"] == (pytest.approx(0.01), 2)
    assert x["mean"] == {"a": pytest.approx(0.9433333), "b": pytest.approx(0.56)}
    assert rows[1]["paired"]["relu"] == (pytest.approx(-0.10), 1)  # the unchosen cell is out
    table = search.render(rows)
    assert "| sm-x | 0.9433 | 0.5600 | +2.67 (3) | +1.00 (2) |" in table


@pytest.mark.slow  # four tiny training runs: over 2 s
def test_phase1_cost_times_both_rules_on_the_same_seeds() -> None:
    cost = load_script(RESULTS / "verdict-2026-12" / "phase1-cost.py")
    seconds = cost.measure("digits", [64, 8, 10], rounds=1, epochs=1)
    assert set(seconds) == {"joint", "bilevel"} and all(
        len(t) == 1 and t[0] > 0 for t in seconds.values()
    )
    assert cost.ratio({"joint": [1.0, 2.0, 3.0], "bilevel": [3.0, 3.0, 9.0]}) == 1.5
