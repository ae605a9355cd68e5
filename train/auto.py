"""``--mode auto``: the better network of SmartMixed and the best fixed activation, for users who
want a model rather than an experiment. Every choice is made on validation accuracy; test accuracy
takes no part in any of them.

1. Screen: each fixed activation of the pool trains ``screen_epochs`` epochs at --lr; the best
   validation accuracy is the best-screened activation (ties: the first in pool order).
2. Finalists: SmartMixed (phase 1 + phase 2) and the best-screened activation (--epochs), tuned
   alike: each trains at every --tune-lr rate and keeps the rate of its best validation accuracy
   (ties: the smaller rate, the study's rule), or trains at --lr alone.
3. Winner: the finalist of the higher validation accuracy (ties: the fixed activation, the simpler
   network). OUT becomes an ordinary run folder of the winner; model.json's ``training.auto``
   records every candidate, the winner and why.

Every sub-run is an ordinary run folder (``OUT/auto/screen/<activation>``,
``OUT/auto/<model>/lr<rate>``) trained by ``train_run``, so a rerun of the same command reads the
complete ones, resumes the killed ones from their checkpoints and trains only the rest.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from smartmixed.contract import split_list
from smartmixed.contract.files import atomic_write_bytes, atomic_write_text
from smartmixed.train import artifacts, report
from smartmixed.train.data import Dataset
from smartmixed.train.loop import TrainConfig, TrainError, recorded_options, train_run
from smartmixed.train.model import ModelSpec

AUTO = "auto"  # OUT/auto/ holds the sub-runs; model.json's training.auto the record
SCREEN = "screen"
SMARTMIXED = "smartmixed"
# a --tune-lr rate: a plain decimal number, written into the folder name lr<rate> as given
RATE_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
# validation accuracies this close are equal: the same correct counts divided (or averaged) in
# another order differ in the last bits, and a choice must not hang on that
TIE_TOLERANCE = 1e-12
SCREEN_FRACTION = 4  # the default screen: a quarter of the fixed model's epochs (at least 1)
# the files of a run folder OUT takes from the winner's (model.json is written, report.md rendered)
WINNER_FILES = (artifacts.MODEL_WEIGHTS, artifacts.HISTORY, *report.PLOTS.values())


# --------------------------------------------------------------------------------------------
# The rules (pure functions of validation accuracies; train/study.py shares the rate rule)


def parse_rates(tune_lr: str | Sequence[str]) -> tuple[str, ...]:
    """--tune-lr '1e-4,1e-3,3e-3' -> ('1e-4', '1e-3', '3e-3'): each rate kept as written (it
    names its runs' folders, lr<rate>); TrainError for anything that is not a positive decimal
    number, for no rate, and for one rate written twice."""
    text = tune_lr if isinstance(tune_lr, str) else ",".join(tune_lr)
    rates = split_list(tune_lr)
    for rate in rates:
        value = float(rate) if RATE_PATTERN.fullmatch(rate) else math.nan
        if not (0 < value < math.inf):
            raise TrainError(
                f"--tune-lr {text!r}: {rate!r} is not a learning rate; expected positive "
                f"decimal numbers separated by commas, e.g. 1e-4,1e-3,3e-3"
            )
    if not rates:
        raise TrainError(f"--tune-lr {text!r}: no rate; expected e.g. 1e-4,1e-3,3e-3")
    values = [float(r) for r in rates]
    for i, rate in enumerate(rates):
        if values[i] in values[:i]:
            same = rates[values.index(values[i])]
            raise TrainError(f"--tune-lr {text!r}: {same} and {rate} are the same rate")
    return tuple(rates)


def choose_rate(means: Mapping[str, float]) -> str:
    """The rate of the best (mean) validation accuracy; of rates whose accuracies are equal to it
    (within TIE_TOLERANCE), the smallest."""
    best = max(means.values())
    return min((r for r, m in means.items() if m >= best - TIE_TOLERANCE), key=float)


def best_screened(val_accuracy: Mapping[str, float]) -> str:
    """The activation of the best validation accuracy; ties go to the first in pool order (the
    mapping's order)."""
    best = max(val_accuracy.values())
    return next(a for a, v in val_accuracy.items() if v >= best - TIE_TOLERANCE)


def choose_winner(smartmixed: float, activation: str, fixed: float) -> tuple[str, str]:
    """(winner, one-line reason) between SmartMixed's validation accuracy and the fixed
    activation's: SmartMixed only when strictly better, since a tie goes to the simpler network.
    The reason shows as many digits as it takes to tell the two apart (4 to 8)."""
    digits = next((d for d in range(4, 9) if f"{smartmixed:.{d}f}" != f"{fixed:.{d}f}"), 4)
    if smartmixed > fixed + TIE_TOLERANCE:
        return SMARTMIXED, (
            f"{SMARTMIXED}: validation accuracy {smartmixed:.{digits}f} against "
            f"{activation}'s {fixed:.{digits}f}"
        )
    if fixed > smartmixed + TIE_TOLERANCE:
        return activation, (
            f"{activation}: validation accuracy {fixed:.{digits}f} against "
            f"{SMARTMIXED}'s {smartmixed:.{digits}f}"
        )
    return activation, (
        f"{activation}: validation accuracy {fixed:.4f}, the same as {SMARTMIXED}'s; a tie goes "
        "to the fixed activation, the simpler network"
    )


# --------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class SubRun:
    """One training of the plan and its run folder under OUT."""

    stage: str  # "screen" or "final"
    model: str  # "smartmixed" or an activation name
    rate: str  # the learning rate as written (its folder lr<rate>)
    config: TrainConfig

    @property
    def folder(self) -> Path:
        """Relative to OUT: auto/screen/<activation> or auto/<model>/lr<rate>."""
        if self.stage == SCREEN:
            return Path(AUTO, SCREEN, self.model)
        return Path(AUTO, self.model, f"lr{self.rate}")


@dataclass(frozen=True)
class AutoPlan:
    """What ``--mode auto`` trains: every sub-run's TrainConfig is the protocol's settings, then
    ``options`` (the user's, arch and layers included), then its own mode, rate and epochs."""

    protocol: str
    options: dict[str, Any]  # TrainConfig keywords shared by every sub-run (None: the default)
    pool: tuple[str, ...]
    screen_epochs: int
    screen_rate: str  # --lr, as a rate
    rates: tuple[str, ...]  # the finalists' rates: --tune-lr's, or (--lr,)
    tuned: bool  # the rates are --tune-lr's

    def config(self, mode: str, *, rate: str, epochs: int | None = None) -> TrainConfig:
        given = {"epochs": epochs} if epochs is not None else {}
        return TrainConfig.from_protocol(
            self.protocol, **{**self.options, "mode": mode, "lr": float(rate), **given}
        )

    def screen_runs(self) -> list[SubRun]:
        return [
            SubRun(
                SCREEN,
                activation,
                self.screen_rate,
                self.config(
                    f"fixed:{activation}", rate=self.screen_rate, epochs=self.screen_epochs
                ),
            )
            for activation in self.pool
        ]

    def final_runs(self, activation: str) -> list[SubRun]:
        """SmartMixed's runs, then the fixed activation's, each at every rate."""
        return [
            SubRun("final", model, rate, self.config(mode, rate=rate))
            for model, mode in ((SMARTMIXED, SMARTMIXED), (activation, f"fixed:{activation}"))
            for rate in self.rates
        ]


def plan_auto(
    *,
    protocol: str,
    options: Mapping[str, Any],
    screen_epochs: int | None = None,
    tune_lr: str | Sequence[str] | None = None,
) -> AutoPlan:
    """Check every option of ``--mode auto`` and return its plan; TrainError (or PoolError) names
    the first that makes no sense, before anything is trained or written.

    ``options``: TrainConfig keywords (arch, layers, pool, epochs, lr, ...; None: the protocol's
    value); their ``mode`` is ignored, since the plan sets each sub-run's own.
    """
    options = {k: v for k, v in options.items() if k != "mode"}
    # the options checked as SmartMixed's here and as a fixed run's below, before any training
    base = TrainConfig.from_protocol(protocol, **options, mode=SMARTMIXED)
    pool = tuple(base.pool)
    if len(pool) < 2:
        raise TrainError(
            f"--pool {','.join(pool)}: --mode auto chooses between fixed activations; expected "
            f"at least 2, got {len(pool)}"
        )
    if options.get("epochs") == 0:  # TrainConfig would only say "no epochs to train"
        raise TrainError(
            "--epochs: --mode auto trains the best-screened activation for --epochs epochs; "
            "expected >= 1, got 0"
        )
    fixed = TrainConfig.from_protocol(protocol, **options, mode=f"fixed:{pool[0]}")
    if screen_epochs is None:
        screen_epochs = max(1, fixed.epochs // SCREEN_FRACTION)
    elif isinstance(screen_epochs, bool) or not isinstance(screen_epochs, int) or screen_epochs < 1:
        raise TrainError(f"--screen-epochs: expected an integer >= 1, got {screen_epochs!r}")
    # repr: the shortest text that reads back as the same float (it names the run's folder)
    screen_rate = repr(base.lr)
    rates = parse_rates(tune_lr) if tune_lr is not None else (screen_rate,)
    return AutoPlan(
        protocol=protocol,
        options=options,
        pool=pool,
        screen_epochs=screen_epochs,
        screen_rate=screen_rate,
        rates=rates,
        tuned=tune_lr is not None,
    )


# --------------------------------------------------------------------------------------------
# The run


def train_auto(
    *,
    plan: AutoPlan,
    dataset: Dataset,
    out: Path | str,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> ModelSpec:
    """Train ``plan`` on ``dataset`` (the same split for every sub-run) and make ``out`` a run
    folder of the winner; returns its spec, whose ``training["auto"]`` is the record.

    Complete sub-runs are read, not retrained (they must hold the run the plan asks for);
    killed ones resume. ``overwrite``: every sub-run is trained again, and ``out`` may hold a
    run that --mode auto did not write.
    """
    out = Path(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError("--mode auto trains its runs one after another; start it without torchrun")
    _check_out(out, overwrite=overwrite)
    screen_runs = plan.screen_runs()
    total = len(screen_runs) + 2 * len(plan.rates)
    with tqdm(total=total, desc=AUTO, unit="run", disable=not progress, dynamic_ncols=True) as bar:

        def val_accuracy(sub: SubRun) -> float:
            bar.set_postfix_str(str(sub.folder))
            spec = _train_or_read(
                sub, dataset=dataset, out=out, overwrite=overwrite, device=device, progress=progress
            )
            bar.update(1)
            return float(spec.metrics["val_accuracy"])

        screen = {sub.model: (sub, val_accuracy(sub)) for sub in screen_runs}
        activation = best_screened({a: v for a, (_, v) in screen.items()})
        finals: dict[str, dict[str, tuple[SubRun, float]]] = {}
        for sub in plan.final_runs(activation):
            finals.setdefault(sub.model, {})[sub.rate] = (sub, val_accuracy(sub))

    record = _auto_record(plan, screen, activation, finals)
    return _write_winner(out, out / record["run"], record)


def _auto_record(
    plan: AutoPlan,
    screen: Mapping[str, tuple[SubRun, float]],
    activation: str,
    finals: Mapping[str, Mapping[str, tuple[SubRun, float]]],
) -> dict[str, Any]:
    """What model.json's training.auto holds: every candidate with its validation accuracy, the
    choices made from them, and the winner's run folder (relative to OUT)."""
    finalists = []
    for model, per_rate in finals.items():
        chosen = choose_rate({rate: v for rate, (_, v) in per_rate.items()})
        sub, val = per_rate[chosen]
        finalists.append(
            {
                "model": model,
                "mode": sub.config.mode,
                "epochs": sum(n for _, n in sub.config.phases()),
                "lr": {rate: v for rate, (_, v) in per_rate.items()},
                "runs": {rate: s.folder.as_posix() for rate, (s, _) in per_rate.items()},
                "chosen_lr": chosen,
                "val_accuracy": val,
                "run": sub.folder.as_posix(),
            }
        )
    by_model = {f["model"]: f for f in finalists}
    winner, reason = choose_winner(
        by_model[SMARTMIXED]["val_accuracy"], activation, by_model[activation]["val_accuracy"]
    )
    return {
        "pool": list(plan.pool),
        "screen_epochs": plan.screen_epochs,
        "tune_lr": list(plan.rates) if plan.tuned else None,
        "screen": [
            {
                "activation": a,
                "epochs": plan.screen_epochs,
                "lr": sub.rate,
                "val_accuracy": v,
                "run": sub.folder.as_posix(),
            }
            for a, (sub, v) in screen.items()
        ],
        "screened": activation,
        "finalists": finalists,
        "winner": winner,
        "reason": reason,
        "run": by_model[winner]["run"],
    }


def _check_out(out: Path, *, overwrite: bool) -> None:
    """OUT may hold nothing, or what an earlier --mode auto wrote (the rerun rewrites it);
    another run only with --overwrite."""
    if overwrite:
        return
    if (out / artifacts.CHECKPOINT).exists():
        raise TrainError(
            f"{out} already holds an unfinished run (resume it without --mode auto); pass "
            "--overwrite to replace it"
        )
    if (out / artifacts.MODEL_SPEC).exists() and not _is_auto_run(out):
        raise TrainError(
            f"{out} already holds a finished run that --mode auto did not write; pass "
            "--overwrite to replace it"
        )


def _is_auto_run(out: Path) -> bool:
    try:
        data = artifacts.read_json(out / artifacts.MODEL_SPEC)
    except artifacts.ArtifactError:
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("training"), dict)
        and AUTO in data["training"]
    )


def _train_or_read(
    sub: SubRun, *, dataset: Dataset, out: Path, overwrite: bool, device: str, progress: bool
) -> ModelSpec:
    """The sub-run's spec: read when its folder holds it complete, else trained (resumed from
    its checkpoint when a killed run left one)."""
    folder = out / sub.folder
    if not overwrite and (folder / artifacts.MODEL_SPEC).exists():
        spec = artifacts.load_spec(folder)
        _check_same_run(spec, sub, dataset, folder)
        return spec
    return train_run(
        config=sub.config,
        dataset=dataset,
        out=folder,
        resume=not overwrite and (folder / artifacts.CHECKPOINT).exists(),
        overwrite=overwrite,
        device=device,
        progress=progress,
    )


def _check_same_run(spec: ModelSpec, sub: SubRun, dataset: Dataset, folder: Path) -> None:
    """A complete sub-run counts only when it was trained with this plan's options on this
    data (a rerun with another --lr, --epochs, ... must not pick up the old runs); a former
    protocol name counts as today's."""
    expected = json.loads(json.dumps({**asdict(sub.config), "data_request": dataset.request}))
    recorded = recorded_options(spec.training)
    changed = [k for k, v in expected.items() if recorded.get(k) != v]
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if changed[8:] else "")
        raise TrainError(
            f"{folder} holds a run with other options ({shown}); rerun with the original "
            "options, pass --overwrite to train again, or use another --out"
        )


def _write_winner(out: Path, winner: Path, record: dict[str, Any]) -> ModelSpec:
    """OUT as a run folder of the winner: its weights, history and plots copied, model.json
    its spec plus ``training.auto``, report.md rendered for OUT. Weights first and model.json
    after them, as save_model writes: a model.json on disk means its weights are complete."""
    spec, digest = artifacts.read_spec(winner)
    spec.training = {**spec.training, AUTO: record}
    out.mkdir(parents=True, exist_ok=True)
    (out / artifacts.MODEL_SPEC).unlink(missing_ok=True)  # no old spec beside new weights
    for name in WINNER_FILES:
        if (winner / name).exists():
            atomic_write_bytes(out / name, (winner / name).read_bytes())
        else:  # a plot an earlier winner had (selection.png of a SmartMixed run)
            (out / name).unlink(missing_ok=True)
    (out / artifacts.CHECKPOINT).unlink(missing_ok=True)  # an --overwrite of a killed run
    spec_record = spec.to_dict() | ({artifacts.WEIGHTS_DIGEST: digest} if digest else {})
    atomic_write_text(out / artifacts.MODEL_SPEC, json.dumps(spec_record, indent=1) + "\n")
    report.write_report(out, spec, artifacts.read_history(out))
    return spec


def summary_table(record: Mapping[str, Any]) -> str:
    """Every sub-run of an auto record in one table, then the winner and why."""
    return "\n".join(report.auto_table(record))
