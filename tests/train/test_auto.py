"""smartmixed-train --mode auto: the choice, the winner's files, reruns and refusals.

One auto run on digits (64 -> 16 -> 10, a pool of two, one or two epochs per run) is shared by
the fast tests; a tuned run and a conv run are marked slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from smartmixed.export.repository import export_run
from smartmixed.train import auto
from smartmixed.train.artifacts import CHECKPOINT, MODEL_SPEC, MODEL_WEIGHTS, load_model
from smartmixed.train.cli import main
from smartmixed.train.data import Dataset
from smartmixed.train.loop import evaluate, train_run

POOL = ("relu", "tanh")
ARGV = [
    "--data",
    "digits",
    "--arch",
    "64,16,10",
    "--pool",
    ",".join(POOL),
    "--epochs",
    "2",
    "--p1-epochs",
    "1",
    "--p2-epochs",
    "1",
    "--lr",
    "3e-3",
    "--quiet",
]


@pytest.fixture(scope="module")
def auto_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of `smartmixed-train --mode auto` (screens of one epoch: a quarter of --epochs 2)."""
    out = tmp_path_factory.mktemp("auto") / "out"
    assert main([*ARGV, "--mode", "auto", "--out", str(out)]) == 0
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def val_accuracy(run: Path) -> float:
    return read_json(run / MODEL_SPEC)["metrics"]["val_accuracy"]


def recompute_choice(out: Path, pool: tuple[str, ...]) -> dict:
    """The choices, made again here from the validation accuracies the sub-run folders hold
    (found on disk, not through the record): the best screen (ties: pool order), per finalist
    the best rate (ties: the smaller), and the winner (ties: the fixed activation)."""
    screen = {a: val_accuracy(out / "auto" / "screen" / a) for a in pool}
    best = max(screen.values())
    screened = next(a for a in pool if screen[a] == best)
    finalists = sorted(p.name for p in (out / "auto").iterdir() if p.name != "screen")
    assert finalists == sorted(["smartmixed", screened])  # no other finalist was trained
    chosen = {}
    for model in finalists:
        rates = {
            p.name.removeprefix("lr"): val_accuracy(p) for p in (out / "auto" / model).iterdir()
        }
        top = max(rates.values())
        rate = min((r for r, v in rates.items() if v == top), key=float)
        chosen[model] = {"lr": rates, "chosen_lr": rate, "val_accuracy": top}
    mixed, fixed = chosen["smartmixed"]["val_accuracy"], chosen[screened]["val_accuracy"]
    return {
        "screen": screen,
        "screened": screened,
        "finalists": chosen,
        "winner": "smartmixed" if mixed > fixed else screened,
    }


def check_record(out: Path, pool: tuple[str, ...]) -> dict:
    record = read_json(out / MODEL_SPEC)["training"]["auto"]
    again = recompute_choice(out, pool)
    assert {s["activation"]: s["val_accuracy"] for s in record["screen"]} == again["screen"]
    assert [s["activation"] for s in record["screen"]] == list(pool)
    assert record["screened"] == again["screened"]
    assert {
        f["model"]: {k: f[k] for k in ("lr", "chosen_lr", "val_accuracy")}
        for f in record["finalists"]
    } == again["finalists"]
    assert record["winner"] == again["winner"]
    winner = next(f for f in record["finalists"] if f["model"] == record["winner"])
    other = next(f for f in record["finalists"] if f["model"] != record["winner"])
    assert record["reason"].startswith(f"{record['winner']}: validation accuracy ")
    assert f"{winner['val_accuracy']:.4f}" in record["reason"]
    assert f"{other['model']}'s" in record["reason"]
    return record


def test_the_choice_recomputed_from_the_sub_runs_equals_the_record(auto_out: Path) -> None:
    record = check_record(auto_out, POOL)
    assert record["screen_epochs"] == 1 and record["tune_lr"] is None
    assert all(s["epochs"] == 1 for s in record["screen"])
    # without --tune-lr both finalists train at --lr alone
    assert [list(f["lr"]) for f in record["finalists"]] == [["0.003"], ["0.003"]]
    for s in record["screen"]:  # the screens really are one-epoch fixed runs of their activation
        spec = read_json(auto_out / s["run"] / MODEL_SPEC)
        assert spec["mode"] == f"fixed:{s['activation']}" and spec["metrics"]["epochs"] == 1


def test_out_holds_the_winners_files(auto_out: Path, digits: Dataset) -> None:
    out_spec = read_json(auto_out / MODEL_SPEC)
    record = out_spec["training"].pop("auto")
    winner = auto_out / record["run"]
    winner_spec = read_json(winner / MODEL_SPEC)
    assert out_spec == winner_spec  # the same spec, weights digest included, plus the record
    for name in (MODEL_WEIGHTS, "history.jsonl", "curves.png", "activations.png"):
        assert (auto_out / name).read_bytes() == (winner / name).read_bytes(), name
    expected_mode = (
        "smartmixed" if record["winner"] == "smartmixed" else f"fixed:{record['winner']}"
    )
    assert out_spec["mode"] == expected_mode
    # the weights are the network the record chose: their validation accuracy is the winner's
    spec, model = load_model(auto_out)
    x_val = torch.from_numpy(digits.x_val)
    _, accuracy = evaluate(model, x_val, torch.from_numpy(digits.y_val))
    assert accuracy == pytest.approx(spec.metrics["val_accuracy"], abs=1e-9)
    report = (auto_out / "report.md").read_text()
    assert "## Why this network (--mode auto)" in report and record["reason"] in report


def test_auto_is_never_worse_on_validation_than_a_fixed_run_it_trained(auto_out: Path) -> None:
    record = read_json(auto_out / MODEL_SPEC)["training"]["auto"]
    fixed = [f for f in record["finalists"] if f["model"] != "smartmixed"]
    runs = [auto_out / run for f in fixed for run in f["runs"].values()]
    assert runs and all(r.name.startswith("lr") for r in runs)
    assert val_accuracy(auto_out) >= max(val_accuracy(r) for r in runs)


@given(
    smartmixed=st.floats(0, 1),
    fixed=st.floats(0, 1),
    activation=st.sampled_from(["relu", "tanh", "selu"]),
)
def test_the_winner_is_never_worse_than_the_fixed_finalist(
    smartmixed: float, fixed: float, activation: str
) -> None:
    winner, reason = auto.choose_winner(smartmixed, activation, fixed)
    assert (smartmixed if winner == "smartmixed" else fixed) >= fixed
    assert winner == ("smartmixed" if smartmixed > fixed + auto.TIE_TOLERANCE else activation)
    assert reason.startswith(f"{winner}: validation accuracy ")


def test_ties_go_to_the_first_screened_the_smaller_rate_and_the_fixed_network() -> None:
    assert auto.best_screened({"tanh": 0.5, "relu": 0.5, "elu": 0.4}) == "tanh"
    assert auto.best_screened({"tanh": 0.5 - 1e-9, "relu": 0.5}) == "relu"
    assert auto.choose_rate({"3e-3": 0.5, "1e-3": 0.5, "1e-2": 0.4}) == "1e-3"
    assert auto.choose_winner(0.9, "relu", 0.9) == (
        "relu",
        "relu: validation accuracy 0.9000, the same as smartmixed's; a tie goes to the fixed "
        "activation, the simpler network",
    )
    assert auto.choose_winner(0.94123, "relu", 0.94121) == (
        "smartmixed",
        "smartmixed: validation accuracy 0.94123 against relu's 0.94121",
    )


def test_export_of_out_works(auto_out: Path, tmp_path: Path) -> None:
    result = export_run(run_dir=auto_out, repository=tmp_path / "models", lowering="permuted")
    assert result.report["verification"]["passed"] is True
    assert (tmp_path / "models" / "out" / "1" / "model.onnx").is_file()


def test_rerun_trains_nothing(auto_out: Path, monkeypatch, capsys) -> None:
    def snapshot() -> dict[Path, tuple[int, bytes]]:
        return {
            p: (p.stat().st_mtime_ns, p.read_bytes())
            for p in (auto_out / "auto").rglob("*")
            if p.is_file()
        }

    before, spec_before = snapshot(), read_json(auto_out / MODEL_SPEC)

    def no_training(**_: object) -> None:
        raise AssertionError("a complete sub-run was trained again")

    monkeypatch.setattr(auto, "train_run", no_training)
    capsys.readouterr()
    assert main([*ARGV, "--mode", "auto", "--out", str(auto_out)]) == 0
    assert snapshot() == before
    assert read_json(auto_out / MODEL_SPEC) == spec_before
    printed = capsys.readouterr().out
    record = spec_before["training"]["auto"]
    assert f"winner: {record['reason']}" in printed
    assert "| screen | relu | 1 | 0.003 |" in printed and "| screen | tanh | 1 | 0.003 |" in printed


def test_sub_runs_recorded_under_the_former_protocol_name_are_read(
    auto_out: Path, tmp_path: Path, monkeypatch
) -> None:
    """Sub-runs written while the default protocol was called smartmixed count as complete."""
    out = tmp_path / "out"
    shutil.copytree(auto_out, out)
    specs = sorted((out / "auto").rglob(MODEL_SPEC))
    assert len(specs) == 4
    for path in specs:
        spec = read_json(path)
        assert spec["training"]["protocol"] == "default"
        spec["training"]["protocol"] = "smartmixed"
        path.write_text(json.dumps(spec))

    def no_training(**_: object) -> None:
        raise AssertionError("a complete sub-run was trained again")

    monkeypatch.setattr(auto, "train_run", no_training)
    assert main([*ARGV, "--mode", "auto", "--out", str(out)]) == 0
    assert (
        read_json(out / MODEL_SPEC)["training"]["auto"]
        == (read_json(auto_out / MODEL_SPEC)["training"]["auto"])
    )


@pytest.mark.slow  # a sub-run trained again in two halves: 2.5 s
def test_a_killed_sub_run_resumes(auto_out: Path, digits: Dataset, tmp_path: Path) -> None:
    """The SmartMixed finalist killed after its first epoch (a checkpoint, no model.json) is
    resumed by the rerun, the other sub-runs are read, and the outcome is the uninterrupted one."""
    out = tmp_path / "out"
    shutil.copytree(auto_out / "auto", out / "auto")
    killed = out / "auto" / "smartmixed" / "lr0.003"
    shutil.rmtree(killed)
    plan = auto.plan_auto(
        protocol="default",
        options={
            "arch": [64, 16, 10],
            "pool": list(POOL),
            "epochs": 2,
            "p1_epochs": 1,
            "p2_epochs": 1,
            "lr": 3e-3,
        },
    )
    config = next(s.config for s in plan.final_runs("relu") if s.model == "smartmixed")

    def stop(record: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(config=config, dataset=digits, out=killed, progress=False, after_epoch=stop)
    assert (killed / CHECKPOINT).exists() and not (killed / MODEL_SPEC).exists()
    assert main([*ARGV, "--mode", "auto", "--out", str(out)]) == 0
    assert not (killed / CHECKPOINT).exists()
    resumed = read_json(out / MODEL_SPEC)["training"]["auto"]
    assert resumed == read_json(auto_out / MODEL_SPEC)["training"]["auto"]


REFUSALS = [
    (
        ["--mode", "auto", "--tune-lr", "1e-3,fast"],
        "--tune-lr '1e-3,fast': 'fast' is not a learning rate; expected positive decimal numbers "
        "separated by commas, e.g. 1e-4,1e-3,3e-3",
    ),
    (
        ["--mode", "auto", "--tune-lr", "1e-3,0.001"],
        "--tune-lr '1e-3,0.001': 1e-3 and 0.001 are the same rate",
    ),
    (
        ["--mode", "auto", "--pool", "relu"],
        "--pool relu: --mode auto chooses between fixed activations; expected at least 2, got 1",
    ),
    (
        ["--mode", "auto", "--screen-epochs", "0"],
        "--screen-epochs: expected an integer >= 1, got 0",
    ),
    (
        ["--mode", "auto", "--epochs", "0"],
        "--epochs: --mode auto trains the best-screened activation for --epochs epochs; "
        "expected >= 1, got 0",
    ),
    (["--screen-epochs", "2"], "--screen-epochs needs --mode auto; got --mode smartmixed"),
    (
        ["--mode", "fixed:relu", "--tune-lr", "1e-3"],
        "--tune-lr needs --mode auto; got --mode fixed:relu",
    ),
]


@pytest.mark.parametrize(("argv", "message"), REFUSALS)
def test_refusals_are_one_line_exit_2_and_write_nothing(
    argv: list[str], message: str, tmp_path: Path, capsys
) -> None:
    common = ["--data", "digits", "--arch", "64,16,10", "--pool", "relu,tanh", "--quiet"]
    assert main([*common, *argv, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"smartmixed-train: error: {message}\n"
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_out_holding_another_run_is_refused(auto_out: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(auto_out / "auto" / "screen" / "relu", out)  # an ordinary finished run
    before = sorted(p.name for p in out.iterdir())
    assert main([*ARGV, "--mode", "auto", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"smartmixed-train: error: {out} already holds a finished run that --mode auto did not "
        "write; pass --overwrite to replace it\n"
    )
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow  # eight sub-runs: over 8 s on 2 cores
def test_tuned_auto_chooses_each_finalists_rate_on_validation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [*ARGV, "--mode", "auto", "--tune-lr", "1e-3,1e-2,3e-3", "--out", str(out)]
    assert main(argv) == 0
    record = check_record(out, POOL)
    assert record["tune_lr"] == ["1e-3", "1e-2", "3e-3"]
    assert all(list(f["lr"]) == ["1e-3", "1e-2", "3e-3"] for f in record["finalists"])
    for f in record["finalists"]:  # each run trained at its folder's rate
        for rate, run in f["runs"].items():
            assert read_json(out / run / MODEL_SPEC)["training"]["lr"] == float(rate)


@pytest.mark.slow  # lenet5 on 28x28 images, four sub-runs
def test_auto_on_a_conv_preset(tmp_path: Path, mnist_like) -> None:
    mnist_like(tmp_path / "mnist", n_train=120, n_test=30)
    out = tmp_path / "out"
    argv = ["--data", "mnist", "--data-dir", str(tmp_path / "mnist"), "--preset", "lenet5"]
    argv += ["--mode", "auto", "--pool", "relu,tanh", "--epochs", "1", "--p1-epochs", "1"]
    assert main([*argv, "--p2-epochs", "1", "--quiet", "--out", str(out)]) == 0
    check_record(out, POOL)
    spec, model = load_model(out)
    assert spec.layers is not None and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    result = export_run(run_dir=out, repository=tmp_path / "models", lowering="permuted")
    assert result.report["verification"]["passed"] is True
