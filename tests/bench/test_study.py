from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from smartmixed.bench.cli import main
from smartmixed.bench.study import (
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
    cells = result["cells"]
    assert {(c["archkey"], c["model"], c["seed"]) for c in cells} == CELLS
    for c in cells:
        assert 0 <= c["test_accuracy"] <= 1 and 0 <= c["val_accuracy"] <= 1
        assert (Path(c["run"]) / "model.json").is_file()
        assert c["arch"] == [int(w) for w in c["archkey"].split("-")]
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
    assert sum(tally.values()) == 4  # 2 architectures x 2 seeds, all paired
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
    assert sum(result["paired"]["smartmixed"]["relu"].values()) == 3
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
    assert paired_outcomes(cells, challengers=["mixed"], baselines=["relu", "tanh"]) == {
        "mixed": {
            "relu": {"wins": 1, "ties": 1, "losses": 1},
            "tanh": {"wins": 1, "ties": 0, "losses": 1},
        }
    }


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
    ],
)
def test_bad_options_exit_2_with_a_message(tmp_path: Path, capsys, args, message) -> None:
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), "--data", "digits", "--models", "relu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smartmixed-bench: error: ") and message in err, err
    assert not out.exists()


def test_plan_takes_afu_as_a_fixed_model(tmp_path: Path, capsys) -> None:
    """Issue I: --models afu is the fixed:afu baseline."""
    args = ["study", "--out", str(tmp_path), "--archs", "64,8,10", "--models", "relu,afu"]
    assert main([*args, "--seeds", "1", "--plan", "--", "--epochs", "1"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [c[c.index("--mode") + 1] for c in commands] == ["fixed:relu", "fixed:afu"]
