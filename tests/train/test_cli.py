from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from smartmixed.train.cli import main


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
    assert main(["--data", "digits", "--arch", "64,8,10", "--pool", "relu,swish",
                 "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "unknown activation 'swish'" in capsys.readouterr().err
    assert main(["--compare", str(tmp_path / "nothing")]) == 2
    assert "model.json: file not found" in capsys.readouterr().err


def test_list_presets(capsys) -> None:
    assert main(["--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 19 and lines[0].startswith("table1-1 ")


def test_module_entry_point_help() -> None:
    result = subprocess.run([sys.executable, "-m", "smartmixed.train", "--help"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and "--p1-epochs" in result.stdout
