from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smartmixed.train.cli import CONFIG_DESTS, build_parser, main
from smartmixed.train.loop import TrainConfig


def test_cli_trains_and_compares(tmp_path: Path, capsys) -> None:
    common = ["--data", "digits", "--arch", "64,32,10", "--lr", "3e-3", "--quiet"]
    assert (
        main([*common, "--p1-epochs", "2", "--p2-epochs", "3", "--out", str(tmp_path / "m")]) == 0
    )
    assert (
        main([*common, "--mode", "fixed:relu", "--epochs", "5", "--out", str(tmp_path / "r")]) == 0
    )
    capsys.readouterr()
    assert main(["--compare", str(tmp_path / "m"), str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "smartmixed" in out and "fixed:relu" in out and "layer 1 (32)" in out


def test_cli_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["--data", "digits", "--arch", "64,x", "--out", str(tmp_path)]) == 2
    assert "not a comma-separated list" in capsys.readouterr().err
    assert main(["--data", "digits", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "digits", "--arch", "paper", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--arch paper: that is a preset; use --preset paper" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", "digits", "--arch", "lenet5", "--out", str(tmp_path)])
    assert "--arch lenet5: that is a preset; use --preset lenet5" in capsys.readouterr().err
    assert main(["--data", "digits", "--preset", "lenet5", "--out", str(tmp_path / "l")]) == 2
    assert capsys.readouterr().err == (
        "smartmixed-train: error: --preset lenet5 does not fit [1, 8, 8] images: spec field "
        "'layers[2].kernel': 5 is larger than its input 4x4\n"
    )
    assert not (tmp_path / "l").exists()
    assert (
        main(
            [
                "--data",
                "digits",
                "--arch",
                "64,8,10",
                "--pool",
                "relu,swish",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "unknown activation 'swish'" in capsys.readouterr().err
    assert main(["--compare", str(tmp_path / "nothing")]) == 2
    assert "model.json: file not found" in capsys.readouterr().err


def test_list_presets(capsys) -> None:
    assert main(["--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 21 and lines[0].startswith("table1-1 ")
    assert lines[19].startswith("lenet5     conv 6 k5 p2 -> maxpool 2 -> conv 16 k5 -> ")
    assert lines[20].endswith("-> linear 128 -> linear 10 (last: the data's classes)")


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
def test_module_entry_point_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "smartmixed.train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--p1-epochs" in result.stdout


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
def test_cli_protocol_sets_defaults_and_flags_override(tmp_path: Path) -> None:
    import json

    common = ["--data", "digits", "--arch", "64,16,10", "--lr", "3e-3", "--quiet"]
    assert (
        main(
            [
                *common,
                "--protocol",
                "paper",
                "--p1-epochs",
                "2",
                "--p2-epochs",
                "1",
                "--tau",
                "1.0",
                "--tau-end",
                "0.5",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    training = json.loads((tmp_path / "p" / "model.json").read_text())["training"]
    assert training["protocol"] == "paper" and training["lr"] == 3e-3  # flag over protocol
    assert (training["p1_epochs"], training["p2_epochs"], training["epochs"]) == (2, 1, 400)
    assert training["select"] == "val-loss" and training["candidate_norm"] == "none"
    assert (training["tau"], training["tau_end"], training["logit_lr"]) == (1.0, 0.5, None)
    assert (
        main(
            [
                *common,
                "--p1-epochs",
                "1",
                "--p2-epochs",
                "1",
                "--logit-lr",
                "0.05",
                "--select",
                "last",
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    training = json.loads((tmp_path / "d" / "model.json").read_text())["training"]
    assert training["protocol"] == "default" and training["candidate_norm"] == "standard"
    assert (training["logit_lr"], training["select"]) == (0.05, "last")


def test_every_config_flag_defaults_to_its_protocol_and_shows_the_default(capsys) -> None:
    """A flag left out takes the --protocol's value, so argparse's default is None; its help
    ends with the default protocol's value, as TrainConfig() holds it."""
    parser = build_parser()
    config = dataclasses.asdict(TrainConfig(arch=[4, 3, 2]))
    config["candidate_norm"] = None  # TrainConfig resolves the default protocol's None
    flags = {a.dest: a for a in parser._actions if a.dest in CONFIG_DESTS}
    assert set(flags) == set(CONFIG_DESTS) and "mode" in flags and "afu_lr" in flags
    for dest, action in flags.items():
        assert action.default is None, dest
        value = config[dest]
        if isinstance(value, list):  # the pool: the epilog names the default
            assert "(default" not in action.help
        elif value is None:
            assert re.search(r"\(default: [^()]+\)$", action.help), dest
        else:
            assert action.help.endswith(f"(default {value})"), dest
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "digits", "--arch", "64,8,10", "--protocol", "smartmixed"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # the former name is refused; the message names today's
    assert "invalid choice: 'smartmixed'" in err and "'default'" in err


def test_cli_refuses_bad_selection_values(tmp_path: Path, capsys) -> None:
    common = ["--data", "digits", "--arch", "64,16,10", "--out", str(tmp_path / "x")]
    assert main([*common, "--tau-end", "-1"]) == 2
    assert "--tau-end must be > 0, got -1.0" in capsys.readouterr().err
    assert main([*common, "--logit-lr", "0"]) == 2
    assert "--logit-lr must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_an_unusable_out_folder_before_training(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    common = ["--data", "digits", "--arch", "64,16,10", "--epochs", "1", "--quiet"]
    expected = {
        a_file: f"--out {a_file}: is not a folder",
        a_file / "run": f"--out {a_file / 'run'}: would be created in {a_file}, which is not a "
        "folder",
    }
    if not os.access("/proc/sys", os.W_OK):  # refused to everyone, root included
        expected[Path("/proc/sys/run")] = (
            "--out /proc/sys/run: would be created in /proc/sys, which is not writable"
        )
    for out, message in expected.items():
        assert main([*common, "--mode", "fixed:relu", "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"smartmixed-train: error: {message}\n" and not captured.out
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
