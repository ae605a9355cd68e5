"""Devices and torchrun: where this process stands, and the check that ranks stay identical.

Under torchrun (DDP: gloo on CPU, nccl on CUDA) every rank draws the same data permutation and
the same Gumbel sample, takes its strided shard of each batch, and DDP averages the gradients;
after every step the ranks compare weight fingerprints, so a divergence stops the run at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(RuntimeError):
    """A device that is missing, or ranks that no longer agree."""


def resolve_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda"):
        raise DistributedError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise DistributedError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> tuple[Ranks, torch.device]:
    """Join the torchrun job described by RANK / WORLD_SIZE (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), resolve_device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Ranks(rank, world), dev


def check_ranks_agree(model: nn.Module, ranks: Ranks) -> None:
    """Every rank must hold bit-identical weights and logits (checked after every step).

    One all-reduce (MAX) of [f, -f] for a per-tensor fingerprint f gives both max and min.
    """
    if not ranks.distributed:
        return
    # on the parameters' device: nccl reduces GPU tensors, gloo CPU ones
    fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()])
    extremes = torch.cat([fingerprint, -fingerprint])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    high, low = extremes[: len(fingerprint)], -extremes[len(fingerprint) :]
    if not torch.equal(low, high):
        raise DistributedError(f"rank {ranks.rank}: the ranks' weights or logits diverged")


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ranks: Ranks) -> None:
    if ranks.distributed:
        dist.all_reduce(tensor)
