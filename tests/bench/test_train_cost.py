from __future__ import annotations

import json
from pathlib import Path

from smartmixed.bench.cli import main


def test_train_cost_writes_json_md_png(tmp_path: Path) -> None:
    code = main(
        [
            "train-cost",
            "--out",
            str(tmp_path),
            "--arch",
            "64,48,32,10",
            "--rounds",
            "2",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "train-cost.json").read_text())
    assert set(result["models"]) == {"fixed_relu", "phase1", "phase2", "phase1_naive"}
    for model in result["models"].values():
        assert model["ms_per_step"] > 0 and model["steps"] == 6
    assert set(result["ratios"]) == {"phase1_vs_fixed", "phase2_vs_fixed", "phase1_naive_vs_fixed"}
    assert all(r > 0 for r in result["ratios"].values())
    assert result["targets"] == {"phase1_vs_fixed": 1.3, "phase2_vs_fixed": 1.1}
    assert "| phase1 |" in (tmp_path / "train-cost.md").read_text()
    assert (tmp_path / "train-cost.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arch_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["train-cost", "--out", str(tmp_path), "--arch", "1,2"]) == 2
    assert "smartmixed-bench: error:" in capsys.readouterr().err
