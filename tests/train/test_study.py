from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from smartmixed.bench.cli import main
from smartmixed.contract import CONV_PRESETS, ModelSpec, layered_arch, resolve_conv_preset
from smartmixed.nn.pool import DEFAULT_POOL
from smartmixed.train import loop
from smartmixed.train import study as study_module
from smartmixed.train.cli import main as train_main
from smartmixed.train.study import (
    choose_setting,
    competition_ranks,
    mean_reciprocal_rank,
    paired_outcomes,
    summarize,
)

# 2 architectures x 2 models x 2 seeds = 8 cells, each a real (two-epoch) smartmixed-train run
GRID = [
    "--data",
    "digits",
    "--archs",
    "64,16,10;64,8,10",
    "--models",
    "relu,smartmixed",
    "--seeds",
    "2",
]
TRAIN = ["--", "--p1-epochs", "1", "--p2-epochs", "1", "--epochs", "2", "--lr", "3e-3"]
CELLS = {
    (arch, model, seed)
    for arch in ("64-16-10", "64-8-10")
    for model in ("relu", "smartmixed")
    for seed in (0, 1)
}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    assert main(["study", "--out", str(out), *GRID, "--jobs", "2", "--quiet", *TRAIN]) == 0
    return out


@pytest.mark.slow
def test_study_trains_every_cell_and_aggregates(study: Path) -> None:
    result = json.loads((study / "study.json").read_text())
    assert list(result) == ["cells", "summary", "ranks", "mrr", "paired", "config"]
    assert (
        "tune_lr" not in result["config"]
        and "Learning rate" not in (study / "study.md").read_text()
    )
    cells = result["cells"]
    assert {(c["archkey"], c["model"], c["seed"]) for c in cells} == CELLS
    for c in cells:
        assert 0 <= c["test_accuracy"] <= 1 and 0 <= c["val_accuracy"] <= 1
        assert (Path(c["run"]) / "model.json").is_file()
        assert c["arch"] == [int(w) for w in c["archkey"].split("-")]
        assert "lr" not in c and "chosen" not in c
        if c["model"] == "smartmixed":  # one share per activation of the pool, per hidden layer
            (layer,) = c["activation_shares"]
            assert math.isclose(sum(layer.values()), 1.0) and len(layer) == 6
        else:
            assert "activation_shares" not in c
    for key, per_model in result["summary"].items():
        for model, s in per_model.items():
            accs = [c["test_accuracy"] for c in cells if (c["archkey"], c["model"]) == (key, model)]
            assert s["n"] == 2 and math.isclose(s["mean"], sum(accs) / 2)
            assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
            assert s["rank"] == result["ranks"][key][model]
    assert set(result["mrr"]) == {"relu", "smartmixed"}
    tally = result["paired"]["smartmixed"]["relu"]
    difference = tally.pop("difference")
    assert sum(tally.values()) == 4  # 2 architectures x 2 seeds, all paired
    assert difference["n"] == 4 and difference["ci95"][0] <= difference["mean"]
    assert result["config"]["train_args"] == TRAIN[1:]
    report = (study / "study.md").read_text()
    assert "## 64-16-10 [64, 16, 10]" in report and "## Mean reciprocal rank" in report
    assert "| smartmixed | " + "{wins} / {ties} / {losses}".format(**tally) + " |" in report
    assert shlex.join(["smartmixed-bench", "study", "--out", str(study)]) in report
    assert (study / "study.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_second_call_trains_nothing(study: Path, capsys) -> None:
    specs = sorted(study.glob("runs/*/*/seed*/model.json"))
    assert len(specs) == 8
    before = [p.stat().st_mtime_ns for p in specs]
    assert main(["study", "--out", str(study), *GRID, "--quiet", *TRAIN]) == 0
    assert "trained 0 cell(s), 8 already complete, 0 failed" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in specs] == before


def test_plan_prints_every_command_and_trains_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    killed = out / "runs" / "64-8-10" / "smartmixed" / "seed1"
    killed.mkdir(parents=True)
    (killed / "checkpoint.safetensors").write_bytes(b"")  # a killed run: continued with --resume
    assert main(["study", "--out", str(out), *GRID, "--plan", *TRAIN]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 8
    for command in commands:
        assert command[:3] == [sys.executable, "-m", "smartmixed.train"]
        for flag in ("--seed", "--out", "--arch", "--mode", "--quiet"):
            assert flag in command
        assert TRAIN[1:] in (command[-8:], command[-9:-1])  # then --resume, if resumed
    first = commands[0]
    assert first[first.index("--out") + 1] == str(out / "runs" / "64-16-10" / "relu" / "seed0")
    assert first[first.index("--arch") + 1] == "64,16,10"
    assert first[first.index("--mode") + 1] == "fixed:relu"
    resumed = [c for c in commands if c[-1] == "--resume"]
    assert resumed == [commands[-1]] and str(killed) in resumed[0]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["checkpoint.safetensors"]


def test_a_variant_flag_wins_over_the_same_pass_through_flag(tmp_path: Path, capsys) -> None:
    from smartmixed.train.cli import build_parser

    argv = ["study", "--out", str(tmp_path / "s"), "--models", "", "--archs", "64,8,10"]
    argv += ["--seeds", "1", "--variant", "long=--p2-epochs 7", "--plan", "--", "--p2-epochs", "2"]
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.splitlines()
    args = build_parser().parse_args(shlex.split(line)[3:])
    assert args.p2_epochs == 7


@pytest.mark.slow
def test_collect_aggregates_the_complete_cells_only(study: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(study, out)
    for name in ("study.json", "study.md", "study.png"):
        (out / name).unlink()
    shutil.rmtree(out / "runs" / "64-8-10" / "relu" / "seed1")
    assert main(["study", "--out", str(out), *GRID, "--collect", "--quiet", *TRAIN]) == 0
    result = json.loads((out / "study.json").read_text())
    assert len(result["cells"]) == 7
    assert result["summary"]["64-8-10"]["relu"]["n"] == 1
    assert result["summary"]["64-8-10"]["relu"]["ci95"] is None  # no interval from one seed
    paired = result["paired"]["smartmixed"]["relu"]
    assert paired["wins"] + paired["ties"] + paired["losses"] == paired["difference"]["n"] == 3
    assert not (out / "runs" / "64-8-10" / "relu" / "seed1").exists()  # nothing trained


def test_failing_cell_is_reported_and_the_study_goes_on(tmp_path: Path, monkeypatch, capsys):
    # A stand-in interpreter that fails every cell, saying which threads it was given.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "no luck: OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    out = tmp_path / "study"
    args = [
        "study",
        "--out",
        str(out),
        "--data",
        "digits",
        "--archs",
        "64,8,10",
        "--models",
        "relu",
        "--seeds",
        "2",
        "--jobs",
        "2",
        "--quiet",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    threads = max(1, (os.cpu_count() or 1) // 2)
    for seed in (0, 1):
        assert f"cell {out}/runs/64-8-10/relu/seed{seed} failed (exit 3)" in err
        assert f"--seed {seed} --out {out}/runs/64-8-10/relu/seed{seed}" in err
    assert err.count(f"no luck: OMP_NUM_THREADS={threads}") == 2
    assert not (out / "study.json").exists()


def test_collect_with_no_complete_cell_exits_1(tmp_path: Path, capsys) -> None:
    assert main(["study", "--out", str(tmp_path), *GRID, "--collect", *TRAIN]) == 1
    assert "no complete cell in" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_competition_ranks_and_mean_reciprocal_rank() -> None:
    assert competition_ranks({"x": 0.9, "y": 0.9, "z": 0.8}) == {"x": 1, "y": 1, "z": 3}
    assert competition_ranks({"x": 0.7, "y": 0.8, "z": 0.8, "w": 0.9}) == {
        "x": 4,
        "y": 2,
        "z": 2,
        "w": 1,
    }
    mrr = mean_reciprocal_rank({"a1": {"x": 1, "y": 2, "z": 3}, "a2": {"x": 2, "y": 1, "z": 3}})
    assert mrr == pytest.approx({"x": 0.75, "y": 0.75, "z": 1 / 3})
    # an architecture missing a model does not count
    partial = {"a1": {"x": 1, "y": 2}, "a2": {"x": 2}}
    assert mean_reciprocal_rank(partial) == {"x": 1.0, "y": 0.5}
    assert mean_reciprocal_rank({"a2": {"x": 1}}, ["x", "y"]) == {}


def test_paired_outcomes_on_hand_made_cells() -> None:
    cells = [
        {"archkey": a, "model": m, "seed": s, "test_accuracy": acc}
        for a, m, s, acc in [
            ("a1", "mixed", 0, 0.9),
            ("a1", "relu", 0, 0.8),
            ("a1", "tanh", 0, 0.95),
            ("a1", "mixed", 1, 0.7),
            ("a1", "relu", 1, 0.7),
            ("a1", "tanh", 1, 0.6),
            ("a2", "mixed", 0, 0.5),
            ("a2", "relu", 0, 0.6),
            ("a2", "relu", 1, 0.9),  # no mixed cell on (a2, 1): not a pair
        ]
    ]
    paired = paired_outcomes(cells, challengers=["mixed"], baselines=["relu", "tanh"])
    tallies = {
        b: {k: v for k, v in t.items() if k != "difference"} for b, t in paired["mixed"].items()
    }
    assert tallies == {
        "relu": {"wins": 1, "ties": 1, "losses": 1},
        "tanh": {"wins": 1, "ties": 0, "losses": 1},
    }
    # the paired differences mixed - baseline: relu +0.1, 0.0, -0.1; tanh -0.05, +0.1
    relu, tanh = paired["mixed"]["relu"]["difference"], paired["mixed"]["tanh"]["difference"]
    assert relu["n"] == 3 and relu["mean"] == pytest.approx(0.0)
    assert relu["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / 3**0.5  # t(0.975, 2) s / sqrt(n)
    assert relu["ci95"] == pytest.approx([-half, half])
    assert tanh["n"] == 2 and tanh["mean"] == pytest.approx(0.025)
    assert paired_outcomes(cells[:3], challengers=["mixed"], baselines=["relu"])["mixed"]["relu"][
        "difference"
    ] == {"n": 1, "mean": pytest.approx(0.1), "std": None, "ci95": None}


def test_summary_interval_is_student_t() -> None:
    s = summarize([0.8, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2)
    assert s["ci95"] == pytest.approx([0.9 - half, 0.9 + half])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--archs", "paper;64,16"], "--archs entry '64,16': architecture [64, 16] needs"),
        (["--archs", "paper;table9"], "--archs entry 'table9': unknown preset 'table9'"),
        (["--archs", "64,8,10;64,8,10"], "--archs: 64-8-10 given twice"),
        (["--models", "relu,swish"], "--models: unknown model 'swish'"),
        (["--variant", "relu=--lr 1e-3"], "label(s) relu given twice"),
        (["--variant", "../up=--lr 1e-3"], "label '../up' must be a folder name"),
        (["--variant", "fast=--lr fast"], "--variant fast: smartmixed-train rejects '--lr fast'"),
        (
            ["--variant", "v=--mode fixed:nope"],
            "--variant v: --mode fixed:nope: unknown activation",
        ),
        (["--variant", "v=--out elsewhere"], "--variant v: --out is set by the study"),
        (["--seeds", "0"], "--seeds '0': the number of seeds must be >= 1"),
        (["--seeds", "1,x"], "--seeds '1,x': expected N or a comma-separated list"),
        (["--jobs", "0"], "--jobs 0: must be >= 1"),
        (["--", "--seed", "3"], "-- (pass-through flags): --seed is set by the study"),
        (["--", "--mode", "fixed:relu"], "--mode is set by the study"),
        (["--", "--epochs", "2", "--bogus"], "smartmixed-train does not know '--bogus'"),
        (
            ["--archs", "lenet6"],
            "--archs entry 'lenet6': unknown preset 'lenet6'; expected one of: "
            + ", ".join(f"table1-{i}" for i in range(1, 19))
            + ", paper, lenet5, convnet\n",
        ),
        (
            ["--tune-lr", "1e-3,fast"],
            "--tune-lr '1e-3,fast': 'fast' is not a learning rate; expected positive decimal "
            "numbers separated by commas, e.g. 1e-4,1e-3,3e-3\n",
        ),
        (["--tune-lr", "1e-3,0"], "--tune-lr '1e-3,0': '0' is not a learning rate"),
        (["--tune-lr", "1e-3,-1e-3"], "--tune-lr '1e-3,-1e-3': '-1e-3' is not a learning rate"),
        (["--tune-lr", "1e-3,1e999"], "--tune-lr '1e-3,1e999': '1e999' is not a learning rate"),
        (["--tune-lr", "1e-3,nan"], "--tune-lr '1e-3,nan': 'nan' is not a learning rate"),
        (["--tune-lr", "1e-3,0.001"], "--tune-lr '1e-3,0.001': 1e-3 and 0.001 are the same rate"),
        (["--tune-lr", ","], "--tune-lr ',': no rate; expected e.g. 1e-4,1e-3,3e-3"),
        (["--tune-seeds", "1"], "--tune-seeds needs --tune-lr (the rates to choose from)"),
        (
            ["--tune-lr", "1e-3", "--tune-seeds", "4"],
            "--tune-seeds 4: expected 1..3 (the number of --seeds)",
        ),
        (
            ["--tune-lr", "1e-3", "--", "--lr", "0.1"],
            "-- (pass-through flags): --lr is set by the study for every cell",
        ),
        (
            ["--tune-lr", "1e-3", "--variant", "v=--lr 0.1"],
            "--variant v: --lr is set by the study for every cell",
        ),
    ],
)
def test_bad_options_exit_2_with_a_message(tmp_path: Path, capsys, args, message) -> None:
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), "--data", "digits", "--models", "relu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smartmixed-bench: error: ") and message in err, err
    assert not out.exists()


def test_plan_takes_afu_as_a_fixed_model(tmp_path: Path, capsys) -> None:
    """--models afu is the fixed:afu baseline."""
    args = ["study", "--out", str(tmp_path), "--archs", "64,8,10", "--models", "relu,afu"]
    assert main([*args, "--seeds", "1", "--plan", "--", "--epochs", "1"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [c[c.index("--mode") + 1] for c in commands] == ["fixed:relu", "fixed:afu"]


# --------------------------------------------------------------------------------------------
# Learning-rate tuning and conv presets. Hand-written run folders (a model.json, no weights:
# the study reads specs alone) give validation and test accuracies that disagree on purpose.


def write_run(
    folder: Path,
    *,
    val: float,
    test: float,
    lr: float = 1e-3,
    mode: str = "fixed:relu",
    arch: list[int] | None = None,
    layers: list[dict] | None = None,
    training: dict | None = None,
) -> None:
    """A finished run's model.json: an MLP (arch, default 64-8-10) or a layered net on 1x28x28;
    ``training``: options recorded besides lr."""
    pool = [mode.removeprefix("fixed:")] if mode.startswith("fixed:") else list(DEFAULT_POOL)
    input_shape = None if layers is None else [1, 28, 28]
    widths = (arch or [64, 8, 10]) if layers is None else layered_arch(layers, input_shape)
    assignment = [[pool[j % len(pool)] for j in range(w)] for w in widths[1:-1]]
    spec = ModelSpec.untrained(
        arch=widths, pool=pool, assignment=assignment, layers=layers, input_shape=input_shape
    )
    spec.training = {"lr": lr, **(training or {})}
    spec.metrics = {"test_accuracy": test, "val_accuracy": val, "train_seconds": 1.0}
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(spec.to_json())


def tuned_args(out: Path, *args: str) -> list[str]:
    return ["study", "--out", str(out), "--data", "digits", "--archs", "64,8,10", *args]


def test_the_rate_is_chosen_by_validation_never_by_test(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs" / "64-8-10"
    # relu: 1e-3 is better on validation (0.85 vs 0.75), 3e-3 on test (0.96 vs 0.55)
    for seed, (val_a, test_a, val_b, test_b) in enumerate(
        [(0.9, 0.5, 0.7, 0.95), (0.8, 0.6, 0.8, 0.97)]
    ):
        write_run(runs / "relu" / "lr1e-3" / f"seed{seed}", val=val_a, test=test_a, lr=1e-3)
        write_run(runs / "relu" / "lr3e-3" / f"seed{seed}", val=val_b, test=test_b, lr=3e-3)
    # smartmixed: one seed finished at 1e-3 (mean 0.6 of 1), two at 3e-3 (mean 0.5 of 2)
    mixed = runs / "smartmixed"
    write_run(mixed / "lr1e-3" / "seed0", val=0.6, test=0.6, lr=1e-3, mode="smartmixed")
    write_run(mixed / "lr3e-3" / "seed0", val=0.5, test=0.99, lr=3e-3, mode="smartmixed")
    write_run(mixed / "lr3e-3" / "seed1", val=0.5, test=0.99, lr=3e-3, mode="smartmixed")
    args = tuned_args(tmp_path, "--models", "relu,smartmixed", "--seeds", "2")
    assert main([*args, "--tune-lr", "1e-3,3e-3", "--collect", "--quiet"]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    assert list(result) == ["cells", "tuning", "summary", "ranks", "mrr", "paired", "config"]
    assert result["tuning"] == {
        "64-8-10": {
            "relu": {
                "rates": {
                    "1e-3": {"mean_val_accuracy": pytest.approx(0.85), "n": 2},
                    "3e-3": {"mean_val_accuracy": pytest.approx(0.75), "n": 2},
                },
                "chosen": "1e-3",
                "complete": True,
            },
            "smartmixed": {
                "rates": {
                    "1e-3": {"mean_val_accuracy": 0.6, "n": 1},
                    "3e-3": {"mean_val_accuracy": 0.5, "n": 2},
                },
                "chosen": "1e-3",
                "complete": False,
            },
        }
    }
    chosen = {(c["model"], c["lr"], c["seed"]) for c in result["cells"] if c["chosen"]}
    assert chosen == {("relu", "1e-3", 0), ("relu", "1e-3", 1), ("smartmixed", "1e-3", 0)}
    assert len(result["cells"]) == 7
    relu = result["summary"]["64-8-10"]["relu"]
    assert relu["n"] == 2 and relu["mean"] == pytest.approx(0.55) and relu["lr"] == "1e-3"
    assert result["summary"]["64-8-10"]["smartmixed"]["mean"] == 0.6  # its 0.99s are not chosen
    assert result["ranks"]["64-8-10"] == {"smartmixed": 1, "relu": 2}
    versus = result["paired"]["smartmixed"]["relu"]
    assert {k: versus[k] for k in ("wins", "ties", "losses")} == {"wins": 1, "ties": 0, "losses": 0}
    assert versus["difference"]["n"] == 1
    assert result["config"]["tune_lr"] == ["1e-3", "3e-3"]
    assert result["config"]["tune_seeds"] is None
    assert "--tune-lr 1e-3,3e-3" in result["config"]["command"]
    report = (tmp_path / "study.md").read_text()
    assert (
        "7 of 8 cells complete (1 architectures x 2 models x 2 learning rates x seeds [0, 1]); "
        in report
    )
    assert (
        "Learning rate tuned: 1e-3, 3e-3 tried; per architecture and model the rate with the "
        "best mean validation accuracy of the final model on seeds [0, 1] is chosen (ties: the "
        "smaller rate)." in report
    )
    assert "| 2 | relu | 1e-3 | 2 | 0.5500 ± 0.0707 | [" in report
    assert "| model | lr 1e-3 | lr 3e-3 | chosen |" in report
    assert "| relu | 0.8500 (2) | 0.7500 (2) | 1e-3 |" in report
    assert "| smartmixed | 0.6000 (1) | 0.5000 (2) | 1e-3 (provisional) |" in report


def test_equal_validation_means_choose_the_smaller_rate(tmp_path: Path) -> None:
    runs = tmp_path / "runs" / "64-8-10" / "relu"
    for seed, (val_big, val_small) in enumerate([(0.8, 0.9), (0.9, 0.8)]):  # both means 0.85
        write_run(runs / "lr3e-3" / f"seed{seed}", val=val_big, test=0.9, lr=3e-3)
        write_run(runs / "lr1e-3" / f"seed{seed}", val=val_small, test=0.1, lr=1e-3)
    args = tuned_args(tmp_path, "--models", "relu", "--seeds", "2", "--tune-lr", "3e-3,1e-3")
    assert main([*args, "--collect", "--quiet"]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    assert result["tuning"]["64-8-10"]["relu"]["chosen"] == "1e-3"
    assert result["summary"]["64-8-10"]["relu"]["mean"] == pytest.approx(0.1)
    rates = study_module.parse_tuning("1e-2,1e-4,1e-3", None, [0])
    lr = {r: (("lr", r),) for r in ("1e-2", "1e-4", "1e-3")}
    assert choose_setting({lr["1e-2"]: 0.5, lr["1e-4"]: 0.5, lr["1e-3"]: 0.4}, rates) == lr["1e-4"]
    # beyond the tolerance
    assert choose_setting({lr["1e-2"]: 0.5, lr["1e-4"]: 0.5 - 1e-9}, rates) == lr["1e-2"]


def test_a_cell_at_another_rate_or_architecture_is_refused(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "runs" / "64-8-10" / "relu" / "lr1e-3" / "seed0"
    write_run(folder, val=0.5, test=0.5, lr=0.01)
    args = tuned_args(tmp_path, "--models", "relu", "--seeds", "1", "--tune-lr", "1e-3")
    assert main([*args, "--collect"]) == 2
    assert capsys.readouterr().err == (
        f"smartmixed-bench: error: cell {folder} holds a run at learning rate 0.01, the study "
        "expects 1e-3; move it away or use another --out\n"
    )
    assert not (tmp_path / "study.json").exists()


def test_plan_lists_the_tuning_cells_then_the_rest_once_the_choice_is_final(
    tmp_path: Path, capsys
) -> None:
    args = tuned_args(tmp_path, "--models", "relu", "--seeds", "3", "--tune-lr", "1e-3,3e-3")
    args += ["--tune-seeds", "1", "--plan"]
    assert main(args) == 0
    captured = capsys.readouterr()
    commands = [shlex.split(line) for line in captured.out.splitlines()]
    runs = tmp_path / "runs" / "64-8-10" / "relu"
    outs = [c[c.index("--out") + 1] for c in commands]
    assert outs == [str(runs / "lr1e-3" / "seed0"), str(runs / "lr3e-3" / "seed0")]
    assert [c[c.index("--lr") + 1] for c in commands] == ["1e-3", "3e-3"]
    assert captured.err == (
        "smartmixed-bench: 2 more cell(s), the seeds after --tune-seeds 1, train at their "
        "architecture and model's chosen rate, which depends on the tuning cells above; --plan "
        "lists them once those are complete\n"
    )
    write_run(runs / "lr1e-3" / "seed0", val=0.7, test=0.9, lr=1e-3)
    write_run(runs / "lr3e-3" / "seed0", val=0.9, test=0.1, lr=3e-3)
    assert main(args) == 0
    captured = capsys.readouterr()
    commands = [shlex.split(line) for line in captured.out.splitlines()]
    assert [c[c.index("--out") + 1] for c in commands[2:]] == [
        str(runs / "lr3e-3" / "seed1"),
        str(runs / "lr3e-3" / "seed2"),
    ]
    assert captured.err == ""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 rates x 1 architecture x 2 models, tuned on seed 0 of 2: 6 real one-epoch runs."""
    out = tmp_path_factory.mktemp("tuned")
    args = tuned_args(out, "--models", "relu,smartmixed", "--seeds", "2", "--tune-lr", "1e-4,3e-3")
    args += ["--tune-seeds", "1", "--jobs", "2", "--quiet"]
    assert main([*args, "--", "--p1-epochs", "1", "--p2-epochs", "0", "--epochs", "1"]) == 0
    return out


@pytest.mark.slow
def test_tune_seeds_trains_the_other_seeds_at_the_chosen_rate_only(tuned: Path) -> None:
    result = json.loads((tuned / "study.json").read_text())
    for model in ("relu", "smartmixed"):
        runs = tuned / "runs" / "64-8-10" / model
        val = {
            rate: json.loads((runs / f"lr{rate}" / "seed0" / "model.json").read_text())["metrics"][
                "val_accuracy"
            ]
            for rate in ("1e-4", "3e-3")
        }
        chosen = "1e-4" if val["1e-4"] >= val["3e-3"] else "3e-3"
        other = "3e-3" if chosen == "1e-4" else "1e-4"
        assert result["tuning"]["64-8-10"][model] == {
            "rates": {r: {"mean_val_accuracy": v, "n": 1} for r, v in val.items()},
            "chosen": chosen,
            "complete": True,
        }
        assert (runs / f"lr{chosen}" / "seed1" / "model.json").is_file()
        assert not (runs / f"lr{other}" / "seed1").exists()
        spec = json.loads((runs / f"lr{chosen}" / "seed1" / "model.json").read_text())
        assert spec["training"]["lr"] == float(chosen)
        summary = result["summary"]["64-8-10"][model]
        tests = [c["test_accuracy"] for c in result["cells"] if c["model"] == model and c["chosen"]]
        assert summary["n"] == 2 and summary["lr"] == chosen
        assert summary["mean"] == pytest.approx(sum(tests) / 2)
    assert len(result["cells"]) == 6
    assert result["config"]["tune_seeds"] == 1
    report = (tuned / "study.md").read_text()
    assert "on seeds [0] (the first 1 of 2; seeds [1] trained at the chosen rate only)" in report
    assert (
        "6 of 6 cells complete (1 architectures x 2 models x 2 learning rates x seeds [0], then "
        "the chosen rate x seeds [1]); " in report
    )


@pytest.mark.slow
def test_a_tuned_study_resumes_with_nothing_to_train(tuned: Path, capsys) -> None:
    args = tuned_args(
        tuned, "--models", "relu,smartmixed", "--seeds", "2", "--tune-lr", "1e-4,3e-3"
    )
    args += ["--tune-seeds", "1", "--quiet"]
    assert main([*args, "--", "--p1-epochs", "1", "--p2-epochs", "0", "--epochs", "1"]) == 0
    assert "trained 0 cell(s), 6 already complete, 0 failed" in capsys.readouterr().out


def test_conv_preset_cells_train_with_preset(tmp_path: Path, capsys) -> None:
    args = ["study", "--out", str(tmp_path), "--data", "mnist", "--archs", "lenet5;64,8,10"]
    assert main([*args, "--models", "relu", "--seeds", "1", "--plan"]) == 0
    conv, mlp = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert conv[conv.index("--preset") + 1] == "lenet5" and "--arch" not in conv
    assert conv[conv.index("--out") + 1] == str(tmp_path / "runs" / "lenet5" / "relu" / "seed0")
    assert mlp[mlp.index("--arch") + 1] == "64,8,10" and "--preset" not in mlp


def test_collect_reads_a_conv_preset_cell_and_refuses_another_net(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "runs" / "lenet5" / "relu" / "seed0"
    write_run(folder, val=0.9, test=0.8, layers=resolve_conv_preset("lenet5", classes=10))
    args = ["study", "--out", str(tmp_path), "--data", "mnist", "--archs", "lenet5"]
    args += ["--models", "relu", "--seeds", "1"]
    assert main([*args, "--collect", "--quiet"]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    (cell,) = result["cells"]
    assert cell["arch"] == [784, 6, 16, 120, 84, 10] and cell["archkey"] == "lenet5"
    assert result["config"]["archs"] == {"lenet5": CONV_PRESETS["lenet5"]}
    assert "--archs lenet5" in result["config"]["command"]
    assert (
        "## lenet5 (conv preset, arch [784, 6, 16, 120, 84, 10])"
        in (tmp_path / "study.md").read_text()
    )
    capsys.readouterr()
    for layers, held in [
        (
            resolve_conv_preset("convnet", classes=10),
            "a conv net of arch [784, 32, 32, 64, 64, 128, 10]",
        ),
        (None, "architecture [784, 8, 10]"),
    ]:
        shutil.rmtree(folder)
        write_run(folder, val=0.9, test=0.8, layers=layers, arch=[784, 8, 10])
        assert main([*args, "--collect"]) == 2
        assert capsys.readouterr().err == (
            f"smartmixed-bench: error: cell {folder} holds a run of {held}, not of the conv "
            "preset lenet5; move it away or use another --out\n"
        )


def test_a_tiny_tuned_study_chooses_and_ranks_as_its_cells_say(
    tmp_path: Path, capsys, monkeypatch, request
) -> None:
    """2 architectures x 2 models x 2 seeds x 2 rates: 16 real runs, trained in this process from
    the study's --plan (a cell is the same smartmixed-train command either way), then the study
    resumes them with nothing to train, and its choice and MRR equal a recomputation from the
    cells' own model.json files. (The runs' plots, which the study never reads, are skipped.)"""
    monkeypatch.setattr(loop.report, "write_plots_and_report", lambda *a, **k: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a study cell's own setting (--jobs splits the cores)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    args = ["study", "--out", str(tmp_path), *GRID, "--tune-lr", "1e-3,3e-3", "--quiet"]
    flags = ["--", "--p1-epochs", "1", "--p2-epochs", "1", "--epochs", "2"]
    assert main([*args, "--plan", *flags]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 16
    for command in commands:
        assert command[1:3] == ["-m", "smartmixed.train"]
        assert train_main(command[3:]) == 0
    capsys.readouterr()
    assert main([*args, *flags]) == 0
    assert "trained 0 cell(s), 16 already complete, 0 failed" in capsys.readouterr().out
    result = json.loads((tmp_path / "study.json").read_text())

    val: dict[tuple[str, str, str], list[float]] = {}
    test: dict[tuple[str, str, str], list[float]] = {}
    for spec_path in tmp_path.glob("runs/*/*/lr*/seed*/model.json"):
        arch, model, rate = spec_path.parts[-5:-2]
        metrics = json.loads(spec_path.read_text())["metrics"]
        val.setdefault((arch, model, rate[2:]), []).append(metrics["val_accuracy"])
        test.setdefault((arch, model, rate[2:]), []).append(metrics["test_accuracy"])
    reciprocal: dict[str, list[float]] = {"relu": [], "smartmixed": []}
    for arch in ("64-16-10", "64-8-10"):
        means = {}
        for model in ("relu", "smartmixed"):
            by_rate = {r: sum(val[arch, model, r]) / 2 for r in ("1e-3", "3e-3")}
            chosen = "1e-3" if by_rate["1e-3"] >= by_rate["3e-3"] - 1e-12 else "3e-3"
            assert result["tuning"][arch][model]["chosen"] == chosen
            means[model] = sum(test[arch, model, chosen]) / 2
            assert result["summary"][arch][model]["mean"] == pytest.approx(means[model])
        for model, mean in means.items():  # competition ranks: 1 + how many are better
            reciprocal[model].append(1 / (1 + sum(other > mean for other in means.values())))
    assert result["mrr"] == pytest.approx({m: sum(r) / 2 for m, r in reciprocal.items()})


# --------------------------------------------------------------------------------------------
# --tune: any smartmixed-train option, alone or with --tune-lr; the grid is the product of the
# tuned options' values, each setting a folder (lr1e-3_tau0.5) and a choice per group.

TUNED_GRID = ["--data", "digits", "--archs", "64,8,10", "--models", "relu,smartmixed"]
TUNED_GRID += ["--seeds", "2", "--tune-lr", "1e-3,3e-3", "--tune", "tau=0.5,2", "--tune-seeds", "1"]
ONE_EPOCH = ["--", "--p1-epochs", "1", "--p2-epochs", "0", "--epochs", "1"]
SETTINGS = [(lr, tau) for lr in ("1e-3", "3e-3") for tau in ("0.5", "2")]


def train_planned(argv: list[str], capsys, *, skip: int = 0) -> list[list[str]]:
    """Every command ``--plan`` lists, each trained in this process but the first ``skip``."""
    assert main([*argv, "--plan", *ONE_EPOCH]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    for command in commands[skip:]:
        assert command[1:3] == ["-m", "smartmixed.train"]
        assert train_main(command[3:]) == 0
    capsys.readouterr()
    return commands


def test_a_tiny_study_tuning_two_options_chooses_as_its_cells_say(
    tmp_path: Path, capsys, monkeypatch, request
) -> None:
    """1 architecture x 2 models x (2 rates x 2 temperatures) on seed 0, then seed 1 at each
    model's chosen setting: 10 real one-epoch runs trained in this process from --plan, then the
    study resumes them with nothing to train, and its choice equals a recomputation from the
    cells' own model.json files. relu ignores tau, so its two temperatures tie at each rate: the
    smaller tau is chosen. (The runs' plots and study.png, which nothing here reads, are
    skipped.)"""
    monkeypatch.setattr(loop.report, "write_plots_and_report", lambda *a, **k: None)
    monkeypatch.setattr(study_module, "plot", lambda study, path: path.write_bytes(b""))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    args = ["study", "--out", str(tmp_path), *TUNED_GRID, "--quiet"]
    commands = train_planned(args, capsys)
    runs = tmp_path / "runs" / "64-8-10"
    assert [c[c.index("--out") + 1] for c in commands] == [
        str(runs / model / f"lr{lr}_tau{tau}" / "seed0")
        for model in ("relu", "smartmixed")
        for lr, tau in SETTINGS
    ]
    assert [c[c.index("--lr") + 1 : c.index("--lr") + 4] for c in commands[:4]] == [
        [lr, "--tau", tau] for lr, tau in SETTINGS
    ]
    rest = train_planned(args, capsys, skip=8)[8:]  # the choice is final: seed 1 at it
    assert main([*args, *ONE_EPOCH]) == 0
    assert "trained 0 cell(s), 10 already complete, 0 failed" in capsys.readouterr().out
    result = json.loads((tmp_path / "study.json").read_text())

    def metrics(model: str, setting: str, seed: int) -> dict:
        return json.loads((runs / model / setting / f"seed{seed}" / "model.json").read_text())[
            "metrics"
        ]

    means = {}
    for model in ("relu", "smartmixed"):
        val = {s: metrics(model, f"lr{s[0]}_tau{s[1]}", 0)["val_accuracy"] for s in SETTINGS}
        best = max(val.values())
        lr, tau = min(
            (s for s in SETTINGS if val[s] >= best - 1e-12), key=lambda s: tuple(map(float, s))
        )
        chosen = {"lr": lr, "tau": tau}
        assert result["tuning"]["64-8-10"][model] == {
            "settings": [
                {"setting": {"lr": s[0], "tau": s[1]}, "mean_val_accuracy": val[s], "n": 1}
                for s in SETTINGS
            ],
            "chosen": chosen,
            "complete": True,
        }
        assert str(runs / model / f"lr{lr}_tau{tau}" / "seed1") in [
            c[c.index("--out") + 1] for c in rest
        ]
        tests = [metrics(model, f"lr{lr}_tau{tau}", seed)["test_accuracy"] for seed in (0, 1)]
        means[model] = sum(tests) / 2
        summary = result["summary"]["64-8-10"][model]
        assert summary["setting"] == chosen and summary["n"] == 2
        assert summary["mean"] == pytest.approx(means[model])
    relu = result["tuning"]["64-8-10"]["relu"]
    assert relu["settings"][0]["mean_val_accuracy"] == relu["settings"][1]["mean_val_accuracy"]
    assert relu["chosen"]["tau"] == "0.5"  # the tie at its rate: the smaller tau
    ranks = competition_ranks(means)
    assert result["ranks"]["64-8-10"] == ranks
    assert result["mrr"] == pytest.approx({m: 1 / r for m, r in ranks.items()})
    cells = result["cells"]
    assert len(cells) == 10 and all(
        "lr" not in c and set(c["setting"]) == {"lr", "tau"} for c in cells
    )
    assert sum(c["chosen"] for c in cells) == 4
    config = result["config"]
    assert (config["tune_lr"], config["tune"], config["tune_seeds"]) == (
        ["1e-3", "3e-3"],
        {"tau": ["0.5", "2"]},
        1,
    )
    assert "--seeds 2 --tune-lr 1e-3,3e-3 --tune tau=0.5,2 --tune-seeds 1 --" in config["command"]
    report = (tmp_path / "study.md").read_text()
    assert (
        "10 of 10 cells complete (1 architectures x 2 models x 4 settings x seeds [0], then the "
        "chosen setting x seeds [1]); " in report
    )
    assert (
        "Tuned: lr 1e-3, 3e-3 x tau 0.5, 2 (4 settings) tried; per architecture and model the "
        "setting with the best mean validation accuracy of the final model on seeds [0] (the "
        "first 1 of 2; seeds [1] trained at the chosen setting only) is chosen (ties: the "
        "smaller lr, then the smaller tau)." in report
    )
    assert "| rank | model | lr | tau | seeds | test accuracy (mean ± std) |" in report
    assert f"| relu | {relu['chosen']['lr']} | 0.5 | 2 | " in report
    assert (
        "| model | lr 1e-3, tau 0.5 | lr 1e-3, tau 2 | lr 3e-3, tau 0.5 | lr 3e-3, tau 2 | chosen |"
        in report
    )


def test_a_tuned_setting_is_chosen_by_validation_with_the_stated_tie_rule(tmp_path: Path) -> None:
    """--tune alone, on hand-written runs: three settings tie on validation, the fourth is
    better on test only. The tie goes to the select listed first (last), then the smaller tau
    (0.5, though 2 is listed first)."""
    runs = tmp_path / "runs" / "64-8-10" / "relu"
    val_test = {
        ("last", "2"): (0.9, 0.5),
        ("last", "0.5"): (0.9, 0.6),
        ("val-loss", "2"): (0.7, 0.99),
        ("val-loss", "0.5"): (0.9, 0.7),
    }
    for (select, tau), (val, test) in val_test.items():
        training = {"select": select, "tau": float(tau)}
        write_run(
            runs / f"select{select}_tau{tau}" / "seed0", val=val, test=test, training=training
        )
    args = tuned_args(tmp_path, "--models", "relu", "--seeds", "1")
    args += ["--tune", "select=last,val-loss", "--tune", "tau=2,0.5"]
    assert main([*args, "--collect", "--quiet"]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    assert result["tuning"]["64-8-10"]["relu"] == {
        "settings": [
            {"setting": {"select": select, "tau": tau}, "mean_val_accuracy": val, "n": 1}
            for (select, tau), (val, _) in val_test.items()
        ],
        "chosen": {"select": "last", "tau": "0.5"},
        "complete": True,
    }
    (chosen,) = [c for c in result["cells"] if c["chosen"]]
    assert chosen["setting"] == {"select": "last", "tau": "0.5"} and chosen["test_accuracy"] == 0.6
    assert result["summary"]["64-8-10"]["relu"]["setting"] == {"select": "last", "tau": "0.5"}
    assert result["config"]["tune"] == {"select": ["last", "val-loss"], "tau": ["2", "0.5"]}
    assert "tune_lr" not in result["config"]
    assert "--tune select=last,val-loss --tune tau=2,0.5" in result["config"]["command"]
    report = (tmp_path / "study.md").read_text()
    assert "(ties: the select listed first, then the smaller tau)" in report
    assert "| 1 | relu | last | 0.5 | 1 | 0.6000 |" in report
    assert (
        "| relu | 0.9000 (1) | 0.9000 (1) | 0.7000 (1) | 0.9000 (1) | select last, tau 0.5 |"
        in report
    )


def test_tune_lr_is_tuning_lr_and_reads_the_same_cells(tmp_path: Path) -> None:
    """--tune lr=R1,R2 is --tune-lr R1,R2: the same folders, so either reads the other's cells
    (its study.json in --tune's form)."""
    runs = tmp_path / "runs" / "64-8-10" / "relu"
    write_run(runs / "lr1e-3" / "seed0", val=0.8, test=0.7, lr=1e-3)
    write_run(runs / "lr3e-3" / "seed0", val=0.9, test=0.6, lr=3e-3)
    args = tuned_args(tmp_path, "--models", "relu", "--seeds", "1", "--collect", "--quiet")
    assert main([*args, "--tune-lr", "1e-3,3e-3"]) == 0
    legacy = json.loads((tmp_path / "study.json").read_text())
    assert main([*args, "--tune", "lr=1e-3,3e-3"]) == 0
    tuned = json.loads((tmp_path / "study.json").read_text())
    assert legacy["tuning"]["64-8-10"]["relu"]["chosen"] == "3e-3"
    assert tuned["tuning"]["64-8-10"]["relu"]["chosen"] == {"lr": "3e-3"}
    assert [c["run"] for c in legacy["cells"]] == [c["run"] for c in tuned["cells"]]
    assert [c["setting"] for c in tuned["cells"]] == [{"lr": "1e-3"}, {"lr": "3e-3"}]


def test_plan_lists_the_tuned_grid_in_the_order_given(tmp_path: Path, capsys) -> None:
    """Options in --tune's order (lr first with --tune-lr); a value valid only with another
    tuned option's (removal needs bilevel) is fine when every setting has it."""
    args = tuned_args(tmp_path, "--models", "smartmixed", "--seeds", "1", "--plan")
    args += ["--tune", "tau=0.5", "--tune", "logit-lr=1e-2,3e-2", "--tune-lr", "1e-3"]
    args += ["--tune", "selection=bilevel", "--tune", "freeze-rule=removal"]
    assert main(args) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    runs = tmp_path / "runs" / "64-8-10" / "smartmixed"
    assert [c[c.index("--out") + 1] for c in commands] == [
        str(runs / f"lr1e-3_tau0.5_logit-lr{r}_selectionbilevel_freeze-ruleremoval" / "seed0")
        for r in ("1e-2", "3e-2")
    ]
    first = commands[0]
    assert first[first.index("--lr") :][:10] == [
        "--lr",
        "1e-3",
        "--tau",
        "0.5",
        "--logit-lr",
        "1e-2",
        "--selection",
        "bilevel",
        "--freeze-rule",
        "removal",
    ]
    assert not tmp_path.joinpath("runs").exists()


def test_a_cell_at_another_tuned_value_is_refused(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "runs" / "64-8-10" / "relu" / "tau0.5" / "seed0"
    write_run(folder, val=0.5, test=0.5, training={"tau": 1.0})
    args = tuned_args(tmp_path, "--models", "relu", "--seeds", "1", "--tune", "tau=0.5")
    assert main([*args, "--collect"]) == 2
    assert capsys.readouterr().err == (
        f"smartmixed-bench: error: cell {folder} holds a run at --tau 1.0, the study expects "
        "0.5; move it away or use another --out\n"
    )
    assert not (tmp_path / "study.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--tune", "temperature=1,2"],
            "--tune 'temperature=1,2': 'temperature' is not an option of smartmixed-train; "
            "expected one of its flags without the dashes, e.g. tau or logit-lr "
            "(smartmixed-train --help lists them)",
        ),
        (
            ["--tune", "logit_lr=1e-2"],
            "--tune 'logit_lr=1e-2': 'logit_lr' is not an option of smartmixed-train; expected "
            "one of its flags without the dashes, e.g. tau or logit-lr; did you mean logit-lr?",
        ),
        (
            ["--tune", "tau"],
            "--tune 'tau': expected NAME=V1,V2,... (NAME a smartmixed-train option), e.g. "
            "tau=0.5,1.0",
        ),
        (
            ["--tune", "tau=,"],
            "--tune 'tau=,': expected NAME=V1,V2,... (NAME a smartmixed-train option), e.g. "
            "tau=0.5,1.0",
        ),
        (
            ["--tune", "tau=0.5,hot"],
            "--tune 'tau=0.5,hot': smartmixed-train rejects '--tau hot' (argument --tau: "
            "invalid float value: 'hot')",
        ),
        (
            ["--tune", "select=last,best"],
            "--tune 'select=last,best': smartmixed-train rejects '--select best' (argument "
            "--select: invalid choice: 'best' (choose from 'val-loss', 'val-accuracy', 'last'))",
        ),
        (
            ["--tune", "tau=0,1"],
            "--tune 'tau=0,1': smartmixed-train refuses --tau 0 for model relu (--tau must be > "
            "0, got 0.0)",
        ),
        (
            ["--tune", "selection=joint,bilevel", "--tune", "freeze-rule=argmax,removal"],
            "--tune: smartmixed-train refuses the setting '--selection joint --freeze-rule "
            "removal' for model relu (--freeze-rule removal measures removals on bilevel "
            "selection's held-out rows: it needs --selection bilevel, got --selection joint)",
        ),
        (["--tune", "tau=1,inf"], "--tune 'tau=1,inf': expected finite numbers, got 'inf'"),
        (
            ["--tune", "logit-prior=relu=2"],
            "--tune 'logit-prior=relu=2': 'relu=2' cannot be part of a cell's folder name; "
            "expected values of letters, digits and ._+- only",
        ),
        (
            ["--tune", "tau=0.5,.5"],
            "--tune 'tau=0.5,.5': 0.5 and .5 are the same value; expected distinct values",
        ),
        (
            ["--tune", "batch-size=32,32"],
            "--tune 'batch-size=32,32': 32 is given twice; expected distinct values",
        ),
        (
            ["--tune", "tau=1,2", "--tune", "tau=3"],
            "--tune 'tau=3': tau is tuned twice; expected each option once, got it also in "
            "--tune 'tau=1,2'",
        ),
        (
            ["--tune-lr", "1e-3", "--tune", "lr=3e-3"],
            "--tune 'lr=3e-3': lr is tuned twice; expected each option once, got it also in "
            "--tune-lr '1e-3'",
        ),
        (
            ["--tune", "tau=1,2", "--", "--tau", "3"],
            "-- (pass-through flags): --tau is set by the study for every cell (tuned by "
            "--tune 'tau=1,2')",
        ),
        (
            ["--tune", "logit-lr=1e-2", "--variant", "v=--logit-lr 0.1"],
            "--variant v: --logit-lr is set by the study for every cell (tuned by --tune "
            "'logit-lr=1e-2')",
        ),
        *[
            (
                ["--tune", f"{name}=a,b"],
                f"--tune '{name}=a,b': --{name} is set by the study for every cell, so it "
                "cannot be tuned; expected an option the study leaves to smartmixed-train's "
                "flags",
            )
            for name in ("seed", "out", "data", "arch", "preset", "mode")
        ],
        (
            ["--tune", "tune-lr=1e-3"],
            "--tune 'tune-lr=1e-3': --tune-lr is --mode auto's own search; the study tunes the "
            "learning rate with --tune-lr R1,R2 or --tune lr=R1,R2",
        ),
        (
            ["--tune", "tau=1,2", "--tune-seeds", "4"],
            "--tune-seeds 4: expected 1..3 (the number of --seeds)",
        ),
    ],
)
def test_bad_tune_options_exit_2_with_a_message(tmp_path: Path, capsys, args, message) -> None:
    out = tmp_path / "study"
    argv = ["study", "--out", str(out), "--data", "digits", "--models", "relu", *args]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"smartmixed-bench: error: {message}\n"
    assert not out.exists()
