"""The training protocol: phase 1 (selective) -> phase 2 (mixed), or one fixed-activation phase.

Protocol defaults follow the paper's reference code (PAPER.md): Adam, lr 1e-4, batch 128,
50 + 350 epochs, gradient-norm clip 1.0, seed 42; the best-validation-loss checkpoint of each
phase is kept, and the phase-2 assignment is the argmax of the logits at phase 1's best epoch.
A checkpoint (model, optimizer, best-so-far, RNG states, history) is written after every epoch,
so ``resume=True`` continues a killed run from its last completed epoch with identical results.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from smartmixed.train import artifacts
from smartmixed.train.data import Dataset
from smartmixed.train.model import MixedMLP, ModelSpec, SelectiveMLP, parse_arch
from smartmixed.train.pool import get_activation, parse_pool

EVAL_BATCH = 4096
PHASE2_INITS = ("continue", "fresh")


class TrainError(ValueError):
    """A training request that cannot run (bad options, clobbering a run, device missing)."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one run; stored in model.json under 'training'."""

    arch: list[int]
    mode: str = "smartmixed"  # "smartmixed" or "fixed:<activation>"
    pool: list[str] = field(default_factory=lambda: list(parse_pool(None)))
    p1_epochs: int = 50
    p2_epochs: int = 350
    epochs: int = 400  # fixed mode
    lr: float = 1e-4
    batch_size: int = 128
    tau: float = 0.3
    seed: int = 42
    grad_clip: float = 1.0
    phase2_init: str = "continue"
    logit_init_std: float = 0.0

    def __post_init__(self) -> None:
        self.arch = parse_arch(self.arch)
        if self.mode.startswith("fixed:"):
            self.pool = [get_activation(self.mode.removeprefix("fixed:")).name]
        elif self.mode == "smartmixed":
            self.pool = list(parse_pool(self.pool))
        else:
            raise TrainError(f"--mode {self.mode!r}: expected smartmixed or fixed:ACTIVATION")
        if self.phase2_init not in PHASE2_INITS:
            raise TrainError(f"--phase2-init {self.phase2_init!r}: expected one of {PHASE2_INITS}")
        for name in ("p1_epochs", "p2_epochs", "epochs"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 0")
        if self.phases() and all(n == 0 for _, n in self.phases()):
            raise TrainError("the run has no epochs to train")
        if self.batch_size < 1 or self.lr <= 0 or self.tau <= 0 or self.grad_clip <= 0:
            raise TrainError("--batch-size, --lr, --tau and the gradient clip must be > 0")

    def phases(self) -> list[tuple[str, int]]:
        if self.mode == "smartmixed":
            return [("selective", self.p1_epochs), ("mixed", self.p2_epochs)]
        return [("fixed", self.epochs)]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("smartmixed", "torch", "numpy", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise TrainError(f"--device {device!r}: expected cpu or cuda")
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
    fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    extremes = torch.cat([fingerprint, -fingerprint])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    high, low = extremes[: len(fingerprint)], -extremes[len(fingerprint) :]
    if not torch.equal(low, high):
        raise TrainError(f"rank {ranks.rank}: the ranks' weights or logits diverged")


# --------------------------------------------------------------------------------------------
# One epoch


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    grad_clip: float,
    generator: torch.Generator,
    ranks: Ranks = Ranks(),
) -> tuple[float, float]:
    """One pass over shuffled mini-batches; returns (mean loss, accuracy) of the training forwards.

    Under torchrun every rank draws the same permutation (same seed) and takes its strided shard
    of each global batch of ``batch_size`` rows; DDP averages the gradients, so every rank makes
    the same update that one process would make on the whole batch (up to shards differing by
    one row). The Gumbel draw is identical on every rank for the same reason; after every step
    the ranks check that their weights and logits are still identical.
    """
    model.train()
    order = torch.randperm(len(y), generator=generator).to(y.device)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, rows
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < ranks.world:  # a tail too short to give every rank a row
            continue
        idx = idx[ranks.rank :: ranks.world]
        logits = model(x[idx])  # (B, C)
        loss = F.cross_entropy(logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        check_ranks_agree(model, ranks)
        totals += torch.tensor(
            [loss.item() * len(idx), int((logits.argmax(1) == y[idx]).sum()), len(idx)],
            dtype=torch.float64,
        )
    if ranks.distributed:
        dist.all_reduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode (phase 1: argmax activations)."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), EVAL_BATCH):
        logits = model(x[start : start + EVAL_BATCH])
        total_loss += F.cross_entropy(logits, y[start : start + EVAL_BATCH], reduction="sum").item()
        correct += int((logits.argmax(1) == y[start : start + EVAL_BATCH]).sum())
    return total_loss / len(y), correct / len(y)


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class _RunState:
    """Everything a checkpoint must restore besides the tensors."""

    phase_index: int = 0
    phase_epoch: int = 0  # completed epochs of the current phase
    best_val_loss: float = float("inf")
    best_epoch: int = -1
    assignment: list[list[str]] | None = None  # frozen phase-2 assignment
    phase1: dict[str, Any] | None = None  # phase-1 metrics, once phase 1 is over
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0


def _build(
    config: TrainConfig, phase: str, dataset: Dataset, assignment: list[list[str]] | None
) -> nn.Module:
    pre = dataset.preprocessing
    if phase == "selective":
        return SelectiveMLP(
            config.arch, config.pool, preprocessing=pre, tau=config.tau,
            logit_init_std=config.logit_init_std,
        )  # fmt: skip
    assert assignment is not None, "mixed and fixed phases need an assignment"
    return MixedMLP(config.arch, config.pool, assignment, preprocessing=pre)


def _check_out_dir(out: Path, *, resume: bool, overwrite: bool, clear: bool) -> None:
    has_model = (out / artifacts.MODEL_SPEC).exists()
    has_checkpoint = (out / artifacts.CHECKPOINT).exists()
    if resume:
        if not has_checkpoint:
            state = "holds a finished run" if has_model else "holds no checkpoint"
            raise TrainError(f"--resume: {out} {state}; nothing to resume")
        return
    if (has_model or has_checkpoint) and not overwrite:
        what = "a finished run" if has_model else "an unfinished run (resume it with --resume)"
        raise TrainError(f"{out} already holds {what}; pass --overwrite to replace it")
    if overwrite and clear:
        for name in (
            artifacts.MODEL_SPEC, artifacts.MODEL_WEIGHTS, artifacts.HISTORY,
            artifacts.CHECKPOINT, artifacts.REPORT, *artifacts.PLOTS.values(),
        ):  # fmt: skip
            (out / name).unlink(missing_ok=True)


def train_run(
    *,
    config: TrainConfig,
    dataset: Dataset,
    out: Path | str,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    after_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> ModelSpec:
    """Train per ``config`` on ``dataset`` and write the run's artifacts to ``out``.

    ``after_epoch`` is called with each epoch's history record once its checkpoint is on disk.
    """
    out = Path(out)
    ranks, dev = init_distributed(device)
    if config.arch[0] != dataset.n_features or config.arch[-1] != len(dataset.labels):
        raise TrainError(
            f"architecture {config.arch} does not fit the data: expected "
            f"{dataset.n_features} inputs and {len(dataset.labels)} classes "
            f"(e.g. --arch {dataset.n_features},256,128,{len(dataset.labels)})"
        )
    _check_out_dir(out, resume=resume, overwrite=overwrite, clear=ranks.main)
    if ranks.main:  # only rank 0 writes; the others read its checkpoint when resuming
        out.mkdir(parents=True, exist_ok=True)
    if ranks.distributed:
        dist.barrier()

    x_train, y_train = (torch.from_numpy(a).to(dev) for a in (dataset.x_train, dataset.y_train))
    x_val, y_val = (torch.from_numpy(a).to(dev) for a in (dataset.x_val, dataset.y_val))
    x_test, y_test = (torch.from_numpy(a).to(dev) for a in (dataset.x_test, dataset.y_test))
    record_config = {
        **asdict(config), "data": dataset.name, "data_summary": dataset.summary(),
        "data_request": dataset.request, "world_size": ranks.world,
    }  # fmt: skip

    torch.manual_seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed)
    phases = config.phases()
    run = _RunState()
    if phases[0][0] == "fixed":
        run.assignment = [[config.pool[0]] * width for width in config.arch[1:-1]]
    model = _build(config, phases[0][0], dataset, run.assignment).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    best_state = _clone_state(model)

    if resume:
        tensors, saved = artifacts.load_checkpoint(out)
        if saved["config"] != record_config:
            changed = sorted(k for k in record_config if saved["config"].get(k) != record_config[k])
            raise TrainError(
                f"--resume: options differ from the checkpoint in {', '.join(changed)}; "
                f"rerun with the original options"
            )
        run = _RunState(**saved["run"])
        model = _build(config, phases[run.phase_index][0], dataset, run.assignment).to(dev)
        model.load_state_dict(_prefixed(tensors, "model."))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        optimizer.load_state_dict(artifacts.optimizer_from_tensors(tensors, saved["optimizer"]))
        best_state = _prefixed(tensors, "best.")
        torch.set_rng_state(tensors["rng.torch"])
        data_gen.set_state(tensors["rng.data"])
        if dev.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        if ranks.main:
            print(f"resuming {out} at phase {phases[run.phase_index][0]}, epoch {run.phase_epoch}")

    while True:
        phase, n_epochs = phases[run.phase_index]
        if run.phase_epoch >= n_epochs and run.phase_index + 1 < len(phases):
            # Phase 1 -> phase 2: freeze argmax of the best-validation logits (paper protocol).
            selective = _build(config, "selective", dataset, None).to(dev)
            selective.load_state_dict(best_state)
            val_loss, val_acc = evaluate(selective, x_val, y_val)
            test_loss, test_acc = evaluate(selective, x_test, y_test)
            run.phase1 = {
                "best_epoch": run.best_epoch, "val_loss": val_loss, "val_accuracy": val_acc,
                "test_loss": test_loss, "test_accuracy": test_acc,
                "activation_counts": selective.activation_counts(),
            }  # fmt: skip
            run.assignment = selective.assignment()
            if config.phase2_init == "continue":
                model = MixedMLP.from_selective(selective, preprocessing=dataset.preprocessing)
            else:  # "fresh": re-initialise the weights, as the reference code does
                torch.manual_seed(config.seed + 1)
                model = _build(config, "mixed", dataset, run.assignment).to(dev)
            optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
            run.phase_index += 1
            run.phase_epoch, run.best_val_loss, run.best_epoch = 0, float("inf"), -1
            best_state = _clone_state(model)
            continue
        if run.phase_epoch >= n_epochs:
            break

        bar = tqdm(
            total=n_epochs, initial=run.phase_epoch, desc=f"{phase:>9}", unit="epoch",
            disable=not progress or not ranks.main, leave=True, dynamic_ncols=True,
        )  # fmt: skip
        net = model
        if ranks.distributed:
            net = DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        with bar:
            while run.phase_epoch < n_epochs:
                started = time.perf_counter()
                train_loss, train_acc = train_epoch(
                    net, optimizer, x_train, y_train, batch_size=config.batch_size,
                    grad_clip=config.grad_clip, generator=data_gen, ranks=ranks,
                )  # fmt: skip
                val_loss, val_acc = evaluate(model, x_val, y_val)
                seconds = time.perf_counter() - started
                run.train_seconds += seconds
                epoch = len(run.history)
                if val_loss < run.best_val_loss:
                    run.best_val_loss, run.best_epoch = val_loss, epoch
                    best_state = _clone_state(model)
                counts = (
                    model.activation_counts()
                    if isinstance(model, SelectiveMLP)
                    else [{n: layer.count(n) for n in config.pool} for layer in run.assignment]
                )
                record = {
                    "epoch": epoch, "phase": phase, "phase_epoch": run.phase_epoch,
                    "train_loss": train_loss, "train_accuracy": train_acc,
                    "val_loss": val_loss, "val_accuracy": val_acc, "seconds": seconds,
                    "activation_counts": counts,
                }  # fmt: skip
                if ranks.distributed:
                    record["ranks"], record["ranks_agree"] = ranks.world, True
                run.history.append(record)
                run.phase_epoch += 1
                if ranks.main:
                    _save_checkpoint(
                        out, model, optimizer, best_state, data_gen, dev, run, record_config
                    )
                    artifacts.write_history(out, run.history)
                bar.set_postfix(loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}",
                                val_acc=f"{val_acc:.4f}")  # fmt: skip
                bar.update(1)
                if after_epoch is not None:
                    after_epoch(record)

    # Final model: the best-validation checkpoint of the last phase.
    model.load_state_dict(best_state)
    if not isinstance(model, MixedMLP):  # smartmixed with --p2-epochs 0: freeze phase 1's argmax
        model = MixedMLP.from_selective(model, preprocessing=dataset.preprocessing)
    val_loss, val_acc = evaluate(model, x_val, y_val)
    test_loss, test_acc = evaluate(model, x_test, y_test)
    metrics: dict[str, Any] = {
        "test_accuracy": test_acc, "test_loss": test_loss, "val_accuracy": val_acc,
        "val_loss": val_loss, "best_epoch": run.best_epoch, "epochs": len(run.history),
        "train_seconds": run.train_seconds,
    }  # fmt: skip
    if run.phase1 is not None:
        metrics["phase1"] = run.phase1
    spec = ModelSpec(
        arch=config.arch, pool=config.pool, mode=config.mode, assignment=model.assignment,
        preprocessing=dataset.preprocessing, input_shape=dataset.input_shape,
        labels=dataset.labels, training=record_config, metrics=metrics,
        versions=package_versions(),
    )  # fmt: skip
    if ranks.main:
        artifacts.save_model(out, spec, model.canonical_state_dict())
        artifacts.plot_curves(run.history, out / artifacts.PLOTS["curves"])
        artifacts.plot_activation_distribution(spec, out / artifacts.PLOTS["activations"])
        artifacts.plot_selection(run.history, config.pool, out / artifacts.PLOTS["selection"])
        artifacts.write_report(out, spec, run.history)
        artifacts.remove_checkpoint(out)
    if ranks.distributed:
        dist.barrier()
    return spec


def _clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _save_checkpoint(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    best_state: dict[str, Tensor],
    data_gen: torch.Generator,
    dev: torch.device,
    run: _RunState,
    record_config: dict[str, Any],
) -> None:
    optim_tensors, optim_meta = artifacts.optimizer_to_tensors(optimizer)
    tensors = {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **{f"best.{k}": v for k, v in best_state.items()},
        **optim_tensors,
        "rng.torch": torch.get_rng_state(),
        "rng.data": data_gen.get_state(),
    }
    if dev.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    state = {"config": record_config, "optimizer": optim_meta, "run": asdict(run)}
    artifacts.save_checkpoint(out, tensors, state)
