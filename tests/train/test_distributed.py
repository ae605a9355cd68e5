"""torchrun with 2 CPU processes (gloo): ranks agree after every epoch, only rank 0 writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smartmixed.train import artifacts


@pytest.mark.slow
def test_torchrun_two_ranks_on_digits(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "-m",
        "smartmixed.train",
        "--data",
        "digits",
        "--arch",
        "64,32,10",
        "--p1-epochs",
        "3",
        "--p2-epochs",
        "4",
        "--logit-warmup",  # the frozen-logit epoch's dropped gradient must pass DDP too
        "0.4",
        "--lr",
        "3e-3",
        "--out",
        str(out),
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: test accuracy") == 1  # rank 0 alone reports
    history = artifacts.read_history(out)
    assert len(history) == 7
    assert all(r["ranks"] == 2 for r in history)  # the per-step check would have stopped it
    assert [r.get("logits_frozen") for r in history[:3]] == [True, False, False]
    spec = json.loads((out / "model.json").read_text())
    assert spec["training"]["world_size"] == 2
    assert spec["metrics"]["test_accuracy"] > 0.7
    assert not (out / "checkpoint.safetensors").exists()
    _, model = artifacts.load_model(out)  # a normal run folder: loads like any other
    assert sum(p.numel() for p in model.parameters()) == 64 * 32 + 32 + 32 * 10 + 10


def _agree_worker(rank: int, init_file: str, results, perturb: bool) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from smartmixed.train.distributed import DistributedError, Ranks, check_ranks_agree

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    if perturb and rank == 1:
        with torch.no_grad():
            model.bias[0] += 1e-6
    try:
        check_ranks_agree(model, Ranks(rank, 2))
        results[rank] = "agree"
    except DistributedError as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_rank_check_catches_a_one_ulp_divergence(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    for perturb, expected in ((False, "agree"), (True, "diverged")):
        with mp.Manager() as manager:
            results = manager.dict()
            init_file = str(tmp_path / f"init-{perturb}")
            mp.spawn(_agree_worker, args=(init_file, results, perturb), nprocs=2, join=True)
            assert all(expected in results[r] for r in (0, 1)), dict(results)
