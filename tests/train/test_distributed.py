"""torchrun with 2 CPU processes (gloo): ranks agree after every epoch, only rank 0 writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from smartmixed.train import artifacts


def test_torchrun_two_ranks_on_digits(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "smartmixed.train",
           "--data", "digits", "--arch", "64,32,10", "--p1-epochs", "3", "--p2-epochs", "4",
           "--lr", "3e-3", "--out", str(out), "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: test accuracy") == 1  # rank 0 alone reports
    history = artifacts.read_history(out)
    assert len(history) == 7
    assert all(r["ranks"] == 2 and r["ranks_agree"] for r in history)
    spec = json.loads((out / "model.json").read_text())
    assert spec["training"]["world_size"] == 2
    assert spec["metrics"]["test_accuracy"] > 0.7
    assert not (out / "checkpoint.safetensors").exists()
    _, model = artifacts.load_model(out)  # a normal run folder: loads like any other
    assert sum(p.numel() for p in model.parameters()) == 64 * 32 + 32 + 32 * 10 + 10
