"""A seeded grid of training runs (architectures x models x seeds) and what it says.

Each cell is an ordinary run folder, DIR/runs/<archkey>/<model>/seed<k> (tuned:
DIR/runs/<archkey>/<model>/<setting>/seed<k>), trained by its own ``python -m smartmixed.train``
process. So a study resumes cell by cell (a folder holding model.json is done; one holding
checkpoint.safetensors, a killed run, continues with --resume), runs on a cluster (``--plan``
prints every cell's command) and is aggregated from the run folders alone (``--collect``).
An architecture is a list of widths (an MLP) or a preset: an MLP preset, or a conv preset
(contract.CONV_PRESETS, trained with ``--preset NAME``).

Tuning: ``--tune-lr R1,R2,...`` and ``--tune NAME=V1,V2,...`` (repeatable; NAME any
smartmixed-train option the study does not set itself, e.g. tau or logit-lr) make a grid of
settings, the product of the tuned options' values (--tune-lr's lr first, then the --tune options
in the order given). Every (architecture, model, seed) trains at each setting, in the folder
<setting> that spells it: each option's name then its value, joined by '_' (lr1e-3,
lr1e-3_tau0.5; '_' is in no option name and no value, which are letters, digits and ._+- only).
Per (architecture, model) the setting with the best mean validation accuracy of the final model
over the seeds finished at that setting is chosen; ties (within TIE_TOLERANCE) go to the smaller
value of the first option, then of the next, and so on, where a value that is not a number counts
by its place in its --tune list (so --tune-lr alone keeps the smaller rate). Everything below
uses the chosen setting's cells only; test accuracy never takes part in the choice.
``--tune-seeds N`` tunes on the first N seeds only; the other seeds train at the chosen setting
alone, once every tuning cell of their (architecture, model) is complete. With --tune-lr alone
study.json keeps its learning-rate form (a cell's ``lr``, the tuning record's ``rates``); with
--tune a cell records its ``setting``, {option: value as written}.

Aggregation (DIR/study.{json,md,png}, rewritten after every finished cell):
- per architecture and model: mean test accuracy over the seeds, sample std (ddof 1) and the
  95% Student-t interval mean +- t(0.975, n - 1) std / sqrt(n);
- per architecture, standard competition ranks of the models by mean (1 = best; ties share the
  better rank: 1, 2, 2, 4);
- the paper's Mean Reciprocal Rank, MRR_f = (1/N) sum_i 1 / rank_i(f), over the N
  architectures where every model has at least one cell;
- wins / ties / losses of every non-fixed model against every fixed one, and the mean of the
  differences in test accuracy with its Student-t 95% interval, over the (architecture, seed)
  pairs where both were trained. Same seed means same data split and same initialisation seed,
  so the comparison is paired.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import itertools
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from smartmixed.contract import (
    CONV_PRESETS,
    PRESETS,
    TABLE1,
    SpecError,
    call_with_options,
    is_conv_preset,
    outputs,
    parse_arch,
    resolve_conv_preset,
    resolve_preset,
    split_list,
)
from smartmixed.nn.pool import ACTIVATIONS, DEFAULT_POOL, PoolError
from smartmixed.train.artifacts import CHECKPOINT, MODEL_SPEC, ArtifactError, load_spec
from smartmixed.train.auto import TIE_TOLERANCE, parse_rates
from smartmixed.train.loop import TrainConfig, TrainError


class StudyError(ValueError):
    """A study request that cannot run (bad --archs, --models, --variant, --seeds, --tune or train
    flags)."""


SMARTMIXED = "smartmixed"
DEFAULT_MODELS: tuple[str, ...] = (*DEFAULT_POOL, SMARTMIXED)
DEFAULT_ARCHS = "paper"
DEFAULT_SEEDS = 3
TABLE1_ARCHS = "table1"  # --archs shorthand for the 18 presets table1-1 .. table1-18
RUNS = "runs"  # DIR/runs/<archkey>/<model>[/<setting>]/seed<k>
# smartmixed-train options the study sets for every cell; variant and pass-through flags may not
# (argparse dests), nor may --tune. --mode is the model's: a variant may set it, the pass-through
# and --tune may not; a tuned option is the study's too (--lr with --tune-lr).
CELL_OPTIONS = (
    "data",
    "data_dir",
    "arch",
    "preset",
    "seed",
    "out",
    "resume",
    "overwrite",
    "quiet",
    "compare",
    "list_presets",
)
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a folder name on any filesystem
VALUE_PATTERN = re.compile(r"[A-Za-z0-9._+-]+")  # a tuned value, part of a folder name
STDERR_TAIL_LINES = 15
# a cell's tuned options and their values as written, in the tuning's order: (("lr", "1e-3"),
# ("tau", "0.5")) is the folder lr1e-3_tau0.5 and the flags --lr 1e-3 --tau 0.5
Setting = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class StudyModel:
    """One column of the grid: a label (its folder name) and the smartmixed-train flags it adds."""

    label: str
    mode: str  # smartmixed | fixed:ACTIVATION
    flags: tuple[str, ...] = ()  # a variant's FLAGS, split
    variant: str | None = None  # a variant's FLAGS text
    mode_in_flags: bool = False  # the variant's FLAGS hold --mode

    @property
    def mode_flags(self) -> list[str]:
        """--mode MODE, unless the variant's own flags set it."""
        return [] if self.mode_in_flags else ["--mode", self.mode]

    @property
    def fixed(self) -> bool:
        return self.mode.startswith("fixed:")


def setting_folder(setting: Setting) -> str:
    """lr1e-3_tau0.5: each option's name then its value, joined by '_' (in no name or value)."""
    return "_".join(f"{name}{value}" for name, value in setting)


def setting_flags(setting: Setting) -> list[str]:
    """--lr 1e-3 --tau 0.5: the smartmixed-train flags of a setting."""
    return [text for name, value in setting for text in (f"--{name}", value)]


def describe_setting(setting: Setting) -> str:
    """'lr 1e-3, tau 0.5', as study.md shows a setting."""
    return ", ".join(f"{name} {value}" for name, value in setting)


@dataclass(frozen=True)
class Cell:
    archkey: str
    arch: tuple[int, ...] | None  # an MLP's widths; None: the conv preset named archkey
    model: StudyModel
    seed: int
    setting: Setting = ()  # the tuned options' values; (): untuned, the flags give them

    @property
    def group(self) -> tuple[str, str]:
        """(archkey, model label): the cells a setting is chosen for."""
        return self.archkey, self.model.label

    def folder(self, out: Path) -> Path:
        folder = out / RUNS / self.archkey / self.model.label
        if self.setting:
            folder /= setting_folder(self.setting)
        return folder / f"seed{self.seed}"


@dataclass(frozen=True)
class TunedOption:
    """One tuned smartmixed-train option: its flag without the dashes (lr, logit-lr), its values
    as written (they name the cells' folders), each value's tie key (a number's value, the
    smaller winning a tie; otherwise its place in the list) and the study flag that tunes it."""

    name: str
    values: tuple[str, ...]
    ties: tuple[float, ...]
    numeric: bool  # every value a number: the smaller wins a tie
    flag: str  # --tune-lr or --tune
    text: str  # its argument: '1e-3,3e-3' or 'tau=0.5,1.0'

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def given(self) -> str:
        """ "--tune 'tau=0.5,1.0'": the study flag, for messages."""
        return f"{self.flag} {self.text!r}"


@dataclass(frozen=True)
class Tuning:
    """--tune-lr / --tune / --tune-seeds: the options tuned (--tune-lr's lr first, then --tune's
    in the order given), the seeds the choice is made on, and the seeds trained afterwards at
    the chosen setting alone (empty without --tune-seeds)."""

    options: tuple[TunedOption, ...]
    seeds: tuple[int, ...]
    rest: tuple[int, ...]

    @property
    def rates_only(self) -> bool:
        """--tune-lr alone: study.json keeps its learning-rate form (a cell's "lr": rate)."""
        return len(self.options) == 1 and self.options[0].flag == "--tune-lr"

    @property
    def key(self) -> str:
        """The key of a setting in a cell's record and a summary entry: "lr" or "setting"."""
        return "lr" if self.rates_only else "setting"

    def flags_record(self) -> dict[str, Any]:
        """The flags in study.json's config, each when given: "tune_lr" (--tune-lr's rates) and
        "tune" ({option: values}, in --tune's order)."""
        record: dict[str, Any] = {}
        for option in self.options:
            if option.flag == "--tune-lr":
                record["tune_lr"] = list(option.values)
            else:
                record.setdefault("tune", {})[option.name] = list(option.values)
        return record

    def settings(self) -> list[Setting]:
        """The grid: the product of the options' values, the first option's changing slowest."""
        names = [o.name for o in self.options]
        return [
            tuple(zip(names, values, strict=True))
            for values in itertools.product(*(o.values for o in self.options))
        ]

    def tie_rule(self) -> str:
        """'the smaller lr, then the select listed first', as study.md states the rule."""
        return ", then ".join(
            f"the smaller {o.name}" if o.numeric else f"the {o.name} listed first"
            for o in self.options
        )

    def tie_key(self, setting: Setting) -> tuple[float, ...]:
        """The order among settings of equal validation accuracy, the first chosen."""
        return tuple(o.ties[o.values.index(v)] for o, (_, v) in zip(self.options, setting))

    def to_json(self, setting: Setting) -> str | dict[str, str]:
        """A setting in study.json: the rate with --tune-lr alone, else {option: value}."""
        return setting[0][1] if self.rates_only else dict(setting)

    def from_json(self, value: str | Mapping[str, str]) -> Setting:
        """to_json's setting read back."""
        return (("lr", value),) if isinstance(value, str) else tuple(value.items())

    def setting_of(self, record: Mapping[str, Any]) -> Setting:
        """The setting of a cell's (or a summary entry's) study.json record."""
        return self.from_json(record[self.key])

    def choice_json(self, choice: Mapping[str, Any]) -> dict[str, Any]:
        """choose_settings' record of one group as study.json holds it: {"rates": {rate:
        stats}, "chosen": rate, "complete"} with --tune-lr alone, else {"settings": [{"setting":
        {option: value}, "mean_val_accuracy", "n"}], "chosen": {option: value}, "complete"}."""
        stats = choice["settings"]
        if self.rates_only:
            tried: Any = {s[0][1]: v for s, v in stats.items()}
        else:
            tried = [{"setting": dict(s), **v} for s, v in stats.items()]
        key = "rates" if self.rates_only else "settings"
        chosen = self.to_json(choice["chosen"])
        return {key: tried, "chosen": chosen, "complete": choice["complete"]}

    def choice_from_json(self, choice: Mapping[str, Any]) -> dict[Setting, Mapping[str, Any]]:
        """choice_json's stats per setting, read back."""
        if self.rates_only:
            return {(("lr", r),): v for r, v in choice["rates"].items()}
        return {tuple(v["setting"].items()): v for v in choice["settings"]}


# --------------------------------------------------------------------------------------------
# Options


def parse_models(
    models: str | Sequence[str],
    variants: Sequence[str] = (),
    *,
    reserved: Iterable[str] = CELL_OPTIONS,
    tuned: Mapping[str, str] | None = None,
) -> list[StudyModel]:
    """--models names (activations: fixed baselines; smartmixed) then the --variant LABEL=FLAGS
    (which may set neither the ``reserved`` options nor the ``tuned`` ones)."""
    names = split_list(models)
    parsed = []
    for name in names:
        if name == SMARTMIXED:
            parsed.append(StudyModel(name, SMARTMIXED))
        elif name in ACTIVATIONS:
            parsed.append(StudyModel(name, f"fixed:{name}"))
        else:
            raise StudyError(
                f"--models: unknown model {name!r}; expected {SMARTMIXED} or an activation "
                f"({', '.join(ACTIVATIONS)}); other settings go in --variant LABEL='FLAGS'"
            )
    for text in variants:
        label, sep, flags_text = text.partition("=")
        label = label.strip()
        if not sep or not label:
            raise StudyError(f"--variant {text!r}: expected LABEL='FLAGS'")
        if not LABEL_PATTERN.fullmatch(label):
            raise StudyError(
                f"--variant {text!r}: label {label!r} must be a folder name: letters, digits and "
                f"._+- only, starting with a letter or digit"
            )
        try:
            flags = shlex.split(flags_text)
        except ValueError as e:
            raise StudyError(f"--variant {label}: cannot split its flags ({e})") from None
        given = check_train_flags(flags, f"--variant {label}", reserved=reserved, tuned=tuned)
        mode = given.get("mode", SMARTMIXED)
        if mode.startswith("fixed:") and mode.removeprefix("fixed:") not in ACTIVATIONS:
            raise StudyError(
                f"--variant {label}: --mode {mode}: unknown activation; expected one of: "
                f"{', '.join(ACTIVATIONS)}"
            )
        parsed.append(StudyModel(label, mode, tuple(flags), flags_text.strip(), "mode" in given))
    labels = [m.label for m in parsed]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise StudyError(f"--models / --variant: label(s) {', '.join(repeated)} given twice")
    if not parsed:
        raise StudyError("--models: no model to train (give --models or --variant)")
    return parsed


def check_train_flags(
    flags: Sequence[str],
    where: str,
    *,
    reserved: Iterable[str],
    tuned: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Parse ``flags`` with smartmixed-train's own parser: unknown flags, bad values and options
    the study sets itself (``reserved``, and the ``tuned`` ones: dest -> the study flag tuning
    it) stop here, before any cell runs. Returns {dest: value} of those given."""
    from smartmixed.train.cli import build_parser

    parser = build_parser()
    parser.exit_on_error = False
    unset = object()  # every default becomes this sentinel: what differs was given
    parser.set_defaults(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    try:
        namespace, unknown = parser.parse_known_args(list(flags))
    except (argparse.ArgumentError, SystemExit) as e:
        raise StudyError(f"{where}: smartmixed-train rejects {shlex.join(flags)!r} ({e})") from None
    if unknown:
        raise StudyError(f"{where}: smartmixed-train does not know {shlex.join(unknown)!r}")
    given = {k: v for k, v in vars(namespace).items() if v is not unset}
    tuned = tuned or {}
    clash = [k for k in given if k in set(reserved) or k in tuned]
    if clash:
        flags_text = ", ".join(f"--{k.replace('_', '-')}" for k in clash)
        by = [tuned[k] for k in clash if k in tuned]
        note = f" (tuned by {', '.join(by)})" if by else ""
        raise StudyError(f"{where}: {flags_text} is set by the study for every cell{note}")
    return given


def parse_archs(text: str) -> dict[str, list[int] | None]:
    """'table1' | 'paper;lenet5;64,32,10' -> {archkey: widths} (archkey: preset or 64-32-10);
    a conv preset's widths are None (they follow from its layers and the data's image shape)."""
    archs: dict[str, list[int] | None] = {}
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        try:
            if entry == TABLE1_ARCHS:
                resolved = {f"table1-{i}": list(a) for i, a in enumerate(TABLE1, 1)}
            elif "," in entry:
                widths = parse_arch(entry)
                resolved = {"-".join(map(str, widths)): widths}
            elif is_conv_preset(entry):
                resolved = {entry: None}
            elif entry in PRESETS:
                resolved = {entry: resolve_preset(entry)}
            else:
                names = ", ".join([*PRESETS, *CONV_PRESETS])
                raise SpecError(f"unknown preset {entry!r}; expected one of: {names}")
        except SpecError as e:
            raise StudyError(f"--archs entry {entry!r}: {e}") from None
        for key, widths in resolved.items():
            if key in archs:
                raise StudyError(f"--archs: {key} given twice")
            archs[key] = widths
    if not archs:
        raise StudyError(f"--archs {text!r}: no architecture")
    return archs


def parse_seeds(seeds: int | str | Sequence[int]) -> list[int]:
    """N -> seeds 0 .. N-1; '1,2,7' (or a list) -> those seeds, in order; '5,' is seed 5 alone."""
    count_given = isinstance(seeds, int) or (isinstance(seeds, str) and "," not in seeds)
    items = [seeds] if count_given else seeds.split(",") if isinstance(seeds, str) else seeds
    try:
        values = [int(s) for s in items if str(s).strip()]
    except ValueError:
        raise StudyError(f"--seeds {seeds!r}: expected N or a comma-separated list") from None
    if count_given:
        if not values or values[0] < 1:
            raise StudyError(f"--seeds {seeds!r}: the number of seeds must be >= 1")
        return list(range(values[0]))
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise StudyError(f"--seeds {seeds!r}: expected distinct integers >= 0")
    return values


def parse_tuning(
    tune_lr: str | Sequence[str] | None,
    tune_seeds: int | None,
    seeds: Sequence[int],
    *,
    tune: Sequence[str] = (),
) -> Tuning | None:
    """--tune-lr '1e-4,1e-3,3e-3', --tune 'tau=0.5,1.0' (each) and --tune-seeds N -> Tuning
    (None with neither --tune-lr nor --tune). Each value is kept as written: it names the cells'
    folders (lr1e-3_tau0.5)."""
    options: list[TunedOption] = []
    if tune_lr is not None:
        try:  # the rule smartmixed-train --mode auto --tune-lr shares
            rates = parse_rates(tune_lr)
        except TrainError as e:
            raise StudyError(str(e)) from None
        text = tune_lr if isinstance(tune_lr, str) else ",".join(tune_lr)
        ties = tuple(float(r) for r in rates)
        options.append(TunedOption("lr", rates, ties, True, "--tune-lr", text))
    for text in tune:
        option = parse_tuned_option(text)
        earlier = next((o for o in options if o.name == option.name), None)
        if earlier is not None:
            raise StudyError(
                f"{option.given}: {option.name} is tuned twice; expected each option once, "
                f"got it also in {earlier.given}"
            )
        options.append(option)
    if not options:
        if tune_seeds is not None:
            raise StudyError(
                "--tune-seeds needs --tune-lr (the rates to choose from) or --tune (the "
                "settings to choose from)"
            )
        return None
    if tune_seeds is None:
        return Tuning(tuple(options), tuple(seeds), ())
    if not 1 <= tune_seeds <= len(seeds):
        raise StudyError(
            f"--tune-seeds {tune_seeds}: expected 1..{len(seeds)} (the number of --seeds)"
        )
    return Tuning(tuple(options), tuple(seeds[:tune_seeds]), tuple(seeds[tune_seeds:]))


def parse_tuned_option(text: str) -> TunedOption:
    """--tune 'tau=0.5,1.0' -> TunedOption('tau', ('0.5', '1.0'), ...): an option of
    smartmixed-train that the study does not set itself, each value one its parser accepts,
    folder-safe, finite if a number, and no two values the same (0.5 and .5 are)."""
    from smartmixed.train.cli import build_parser

    given = f"--tune {text!r}"
    name, sep, values_text = (part.strip() for part in text.partition("="))
    values = split_list(values_text)
    if not (sep and name and values):
        raise StudyError(
            f"{given}: expected NAME=V1,V2,... (NAME a smartmixed-train option), e.g. tau=0.5,1.0"
        )
    actions = {
        flag[2:]: action
        for action in build_parser()._actions
        for flag in action.option_strings
        if flag.startswith("--") and action.dest != "help"
    }
    if name not in actions:
        close = difflib.get_close_matches(name, actions, n=1)
        hint = f"; did you mean {close[0]}?" if close else " (smartmixed-train --help lists them)"
        raise StudyError(
            f"{given}: {name!r} is not an option of smartmixed-train; expected one of its "
            f"flags without the dashes, e.g. tau or logit-lr{hint}"
        )
    dest = actions[name].dest
    if dest == "tune_lr":
        raise StudyError(
            f"{given}: --tune-lr is --mode auto's own search; the study tunes the learning "
            "rate with --tune-lr R1,R2 or --tune lr=R1,R2"
        )
    if dest in (*CELL_OPTIONS, "mode"):
        raise StudyError(
            f"{given}: --{name} is set by the study for every cell, so it cannot be tuned; "
            "expected an option the study leaves to smartmixed-train's flags"
        )
    parsed = []
    for value in values:
        if not VALUE_PATTERN.fullmatch(value):
            raise StudyError(
                f"{given}: {value!r} cannot be part of a cell's folder name; expected values of "
                "letters, digits and ._+- only"
            )
        number = check_train_flags([f"--{name}", value], given, reserved=())[dest]
        if isinstance(number, float) and not math.isfinite(number):
            raise StudyError(f"{given}: expected finite numbers, got {value!r}")
        parsed.append(number)
    for i, value in enumerate(parsed):
        if value in parsed[:i]:
            same = values[parsed.index(value)]
            what = (
                f"{same} is given twice"
                if same == values[i]
                else f"{same} and {values[i]} are the same value"
            )
            raise StudyError(f"{given}: {what}; expected distinct values")
    numeric = all(isinstance(v, int | float) for v in parsed)
    ties = tuple(float(v) for v in parsed) if numeric else tuple(map(float, range(len(parsed))))
    return TunedOption(name, tuple(values), ties, numeric, "--tune", text)


def check_settings(tuning: Tuning, models: Sequence[StudyModel], train_args: Sequence[str]) -> None:
    """Every setting through TrainConfig's own checks as each model's cells get it (a small MLP
    standing in for the architecture): a value smartmixed-train would refuse (--tau 0;
    --freeze-rule removal without --selection bilevel) stops the study before any cell runs.
    The error names the value when it fails alone too, else the setting; a model whose flags
    fail without any setting is left to its cells' own errors."""
    from smartmixed.train.cli import CONFIG_DESTS, build_parser

    parser = build_parser()

    def refusal(flags: list[str]) -> str | None:
        args, _ = parser.parse_known_args(flags)  # check_train_flags has parsed each part
        options = {dest: getattr(args, dest) for dest in CONFIG_DESTS}
        try:
            TrainConfig.from_protocol(args.protocol, **{**options, "arch": [4, 4, 2]})
        except (TrainError, PoolError, SpecError) as e:
            return str(e)
        return None

    for model in models:
        base = [*model.mode_flags, *train_args, *model.flags]
        if refusal(base) is not None:
            continue
        for setting in tuning.settings():
            error = refusal([*base, *setting_flags(setting)])
            if error is None:
                continue
            for option, (name, value) in zip(tuning.options, setting, strict=True):
                alone = refusal([*base, f"--{name}", value])
                if alone is not None:
                    raise StudyError(
                        f"{option.given}: smartmixed-train refuses --{name} {value} for model "
                        f"{model.label} ({alone})"
                    )
            raise StudyError(
                f"--tune: smartmixed-train refuses the setting "
                f"{shlex.join(setting_flags(setting))!r} for model {model.label} ({error})"
            )


def plan_cells(
    archs: Mapping[str, Sequence[int] | None],
    models: Sequence[StudyModel],
    seeds: Sequence[int],
    *,
    settings: Sequence[Setting] = ((),),
) -> list[Cell]:
    """Every cell, architecture-major, then model, then setting, then seed (the order of --plan)."""
    return [
        Cell(key, None if arch is None else tuple(arch), model, seed, setting)
        for key, arch in archs.items()
        for model in models
        for setting in settings
        for seed in seeds
    ]


def rest_cells(
    cells: Sequence[Cell], records: Mapping[Cell, Mapping[str, Any]], tuning: Tuning
) -> tuple[list[Cell], int]:
    """(the cells of the seeds after --tune-seeds, at their (architecture, model)'s chosen
    setting, for every group whose tuning cells are all complete; the number of cells still
    waiting for a choice)."""
    groups: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        groups.setdefault(cell.group, cell)
    choices = choose_settings([records[c] for c in cells if c in records], tuning)
    rest, waiting = [], 0
    for group, first in groups.items():
        choice = choices.get(group)
        if choice is None or not choice["complete"]:
            waiting += len(tuning.rest)
            continue
        rest += [
            Cell(first.archkey, first.arch, first.model, seed, choice["chosen"])
            for seed in tuning.rest
        ]
    return rest, waiting


def cell_command(
    cell: Cell, *, out: Path, data: str, data_dir: Path | None, train_args: Sequence[str]
) -> list[str]:
    """The smartmixed-train command of one cell (--resume when its folder holds a checkpoint).

    The pass-through flags come before the variant's: where both set an option, the variant's
    own setting (the more specific one) is the one smartmixed-train keeps."""
    folder = cell.folder(out)
    command = [sys.executable, "-m", "smartmixed.train", "--data", data]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    if cell.arch is None:
        command += ["--preset", cell.archkey]
    else:
        command += ["--arch", ",".join(map(str, cell.arch))]
    command += cell.model.mode_flags
    command += ["--seed", str(cell.seed), "--out", str(folder), "--quiet"]
    command += setting_flags(cell.setting)
    command += [*train_args, *cell.model.flags]
    if (folder / CHECKPOINT).exists() and not (folder / MODEL_SPEC).exists():
        command.append("--resume")
    return command


# --------------------------------------------------------------------------------------------
# The study


def run_study(
    *,
    out: Path | str,
    data: str = "mnist",
    data_dir: Path | str | None = None,
    models: str | Sequence[str] = DEFAULT_MODELS,
    variants: Sequence[str] = (),
    archs: str = DEFAULT_ARCHS,
    seeds: int | str | Sequence[int] = DEFAULT_SEEDS,
    tune_lr: str | Sequence[str] | None = None,
    tune: Sequence[str] = (),
    tune_seeds: int | None = None,
    jobs: int = 1,
    train_args: Sequence[str] = (),
    plan: bool = False,
    collect: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the cells not yet complete (``jobs`` at a time), aggregating after each one.

    ``plan``: train nothing, return every cell's command. ``collect``: train nothing, aggregate
    the complete cells. ``tune_lr`` (rates as text, e.g. "1e-4,1e-3") and ``tune`` (each
    "NAME=V1,V2", e.g. "tau=0.5,1.0"): every cell at each setting of the grid they make, the best
    mean validation accuracy's setting per (architecture, model) kept; ``tune_seeds``: the
    choice on the first N seeds, the others trained at the chosen setting once it is final (so
    ``plan`` lists them only for the groups whose tuning cells are all complete). Returns
    {"commands", "trained", "skipped", "failed", "waiting", "study", "paths"}; ``failed`` lists
    {"run", "command", "returncode", "stderr_tail"} per failing cell, ``waiting`` counts the
    cells whose setting is not chosen yet, and ``study`` is what study.json holds (None when no
    cell is complete).
    """
    out = Path(out)
    data_dir = None if data_dir is None else Path(data_dir)
    if plan and collect:
        raise StudyError("--plan and --collect exclude each other")
    if jobs < 1:
        raise StudyError(f"--jobs {jobs}: must be >= 1")
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out} exists and is not a folder")
    seed_list = parse_seeds(seeds)
    tuning = parse_tuning(tune_lr, tune_seeds, seed_list, tune=tune)
    tuned = {} if tuning is None else {o.dest: o.given for o in tuning.options}
    study_models = parse_models(models, variants, tuned=tuned)
    arch_map = parse_archs(archs)
    train_args = list(train_args)
    check_train_flags(
        train_args, "-- (pass-through flags)", reserved=(*CELL_OPTIONS, "mode"), tuned=tuned
    )
    if tuning is None:
        cells = plan_cells(arch_map, study_models, seed_list)
    else:
        check_settings(tuning, study_models, train_args)
        cells = plan_cells(arch_map, study_models, tuning.seeds, settings=tuning.settings())
    config: dict[str, Any] = {
        "data": data,
        "data_dir": None if data_dir is None else str(data_dir),
        "models": [m.label for m in study_models],
        "variants": {m.label: m.variant for m in study_models if m.variant is not None},
        "modes": {m.label: m.mode for m in study_models},
        # widths, or a conv preset's layers as contract.CONV_PRESETS holds them
        "archs": {
            k: copy.deepcopy(CONV_PRESETS[k]) if a is None else a for k, a in arch_map.items()
        },
        "seeds": seed_list,
    }
    if tuning is not None:
        config |= tuning.flags_record() | {"tune_seeds": tune_seeds}
    config |= {"jobs": jobs, "train_args": train_args, "out": str(out)}
    config["command"] = study_command(config)
    study = _Study(cells, models=study_models, tuning=tuning, config=config, progress=progress)
    return study.plan() if plan else study.run(collect=collect)


class _Study:
    """A study under way: its cells (the tuning cells, then, with --tune-seeds, the other
    seeds' once their setting is final), the study.json records of the complete ones, and what
    ``run_study`` returns, filled in as it goes (``outcome``)."""

    def __init__(
        self,
        cells: list[Cell],
        *,
        models: Sequence[StudyModel],
        tuning: Tuning | None,
        config: dict[str, Any],
        progress: bool,
    ) -> None:
        self.cells, self.tuning_cells = cells, list(cells)
        self.models, self.tuning, self.config, self.progress = models, tuning, config, progress
        self.out = Path(config["out"])
        self.records: dict[Cell, dict[str, Any]] = {}
        self.outcome: dict[str, Any] = {
            "commands": [],
            "trained": 0,
            "skipped": 0,
            "failed": [],
            "waiting": 0,
            "study": None,
            "paths": [],
        }

    def plan(self) -> dict[str, Any]:
        """Every cell's command; the rest's once their setting is final (it needs the records)."""
        if self.tuning is not None and self.tuning.rest:
            self.read_complete(self.cells)
            self.add_rest()
        self.outcome["commands"] = [self.command(c) for c in self.cells]
        return self.outcome

    def run(self, *, collect: bool) -> dict[str, Any]:
        """Train the cells not complete (unless ``collect``), then aggregate."""
        self.read_complete(self.cells)
        self.add_rest()
        self.outcome["skipped"] = len(self.records)
        if not collect:
            self.train([c for c in self.cells if c not in self.records], "study")
            # --tune-seeds: the other seeds, at the settings the finished tuning cells chose
            rest = [c for c in self.add_rest() if c not in self.records]
            if rest:
                self.train(rest, "study (chosen setting)")
        if not self.outcome["paths"]:
            self.write()
        return self.outcome

    def command(self, cell: Cell) -> list[str]:
        config = self.config
        data_dir = None if config["data_dir"] is None else Path(config["data_dir"])
        return cell_command(
            cell,
            out=self.out,
            data=config["data"],
            data_dir=data_dir,
            train_args=config["train_args"],
        )

    def read_complete(self, cells: Iterable[Cell]) -> None:
        for cell in cells:
            if (cell.folder(self.out) / MODEL_SPEC).exists():
                self.records[cell] = read_cell(cell, self.out, self.tuning)

    def add_rest(self) -> list[Cell]:
        """The cells of the seeds after --tune-seeds whose setting has just become final."""
        if self.tuning is None or not self.tuning.rest:
            return []
        rest, self.outcome["waiting"] = rest_cells(self.tuning_cells, self.records, self.tuning)
        known = set(self.cells)
        new = [c for c in rest if c not in known]
        self.cells.extend(new)
        self.read_complete(new)
        return new

    def write(self) -> None:
        """study.json, .md and .png from the complete cells (nothing while there are none)."""
        if self.records:
            ordered = [self.records[c] for c in self.cells if c in self.records]
            study = aggregate(ordered, models=self.models, config=self.config)
            self.outcome["study"] = study
            self.outcome["paths"] = outputs.write_outputs(
                study, self.out, "study", render=render_markdown, draw=plot
            )

    def train(self, pending: Sequence[Cell], desc: str) -> None:
        """Train ``pending`` (``jobs`` at a time), aggregating after each finished cell."""
        commands = {c: self.command(c) for c in pending}
        jobs = self.config["jobs"]
        with tqdm(total=len(pending), unit="cell", desc=desc, disable=not self.progress) as bar:
            for cell, done in run_cells(commands, jobs=jobs):
                bar.update(1)
                if done.returncode == 0:
                    self.records[cell] = read_cell(cell, self.out, self.tuning)
                    self.outcome["trained"] += 1
                    self.write()
                else:
                    self.failed(cell, commands[cell], done)

    def failed(
        self, cell: Cell, command: list[str], done: subprocess.CompletedProcess[str]
    ) -> None:
        failure = {
            "run": str(cell.folder(self.out)),
            "command": shlex.join(command),
            "returncode": done.returncode,
            "stderr_tail": "\n".join(done.stderr.strip().splitlines()[-STDERR_TAIL_LINES:]),
        }
        self.outcome["failed"].append(failure)
        tqdm.write(
            f"smartmixed-bench study: cell {failure['run']} failed "
            f"(exit {done.returncode})\n  command: {failure['command']}\n  stderr:\n    "
            + failure["stderr_tail"].replace("\n", "\n    "),
            file=sys.stderr,
        )


def run_cells(
    commands: Mapping[Cell, list[str]], *, jobs: int
) -> Iterator[tuple[Cell, subprocess.CompletedProcess[str]]]:
    """Run the cells' commands, ``jobs`` at a time, yielding each as it finishes.

    Each child gets cpu_count // jobs threads (OMP / MKL, which torch reads at start), so that
    parallel cells do not oversubscribe the cores. On Ctrl-C the children (same process group)
    stop too, and the cells not yet started are cancelled.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            pool.submit(subprocess.run, command, env=env, capture_output=True, text=True): cell
            for cell, command in commands.items()
        }
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:  # interrupted, or the caller stopped early: start nothing more
            for future in futures:
                future.cancel()


def read_cell(cell: Cell, out: Path, tuning: Tuning | None = None) -> dict[str, Any]:
    """One complete cell's record for study.json, from its model.json (which must hold a run at
    the cell's setting)."""
    folder = cell.folder(out)
    try:
        spec = load_spec(folder)
    except (ArtifactError, SpecError) as e:
        raise StudyError(f"cell {folder}: {e}") from None
    held = f"architecture {spec.arch}" if spec.layers is None else f"a conv net of arch {spec.arch}"
    if cell.arch is None:
        # the preset's layers exactly, its last linear giving the data's classes (arch[-1])
        if spec.layers != resolve_conv_preset(cell.archkey, classes=spec.arch[-1]):
            raise StudyError(
                f"cell {folder} holds a run of {held}, not of the conv preset {cell.archkey}; "
                f"move it away or use another --out"
            )
    elif spec.layers is not None or tuple(spec.arch) != cell.arch:
        raise StudyError(
            f"cell {folder} holds a run of {held}, the study expects {list(cell.arch)}; "
            f"move it away or use another --out"
        )
    differs = setting_differs(spec.training, cell.setting)
    if differs is not None:
        name, recorded, value = differs
        what = "learning rate" if name == "lr" else f"--{name}"
        raise StudyError(
            f"cell {folder} holds a run at {what} {recorded}, the study expects {value}; move "
            "it away or use another --out"
        )
    m = spec.metrics
    record = {
        "arch": list(spec.arch),
        "archkey": cell.archkey,
        "model": cell.model.label,
        "seed": cell.seed,
        **({} if tuning is None else {tuning.key: tuning.to_json(cell.setting)}),
        "test_accuracy": m["test_accuracy"],
        "val_accuracy": m["val_accuracy"],
        "run": str(folder),
        "train_seconds": m["train_seconds"],
    }
    if not cell.model.fixed:
        record["activation_shares"] = [
            {name: n / sum(counts.values()) for name, n in counts.items()}
            for counts in spec.activation_counts()
        ]
    return record


def setting_differs(training: Mapping[str, Any], setting: Setting) -> tuple[str, Any, str] | None:
    """(option, recorded value, the setting's value) of the first tuned option that model.json's
    ``training`` records otherwise; None when all agree. Options model.json does not record
    (--device, --label-column) and those it records as lists (--pool: a fixed run keeps its one
    activation) are not compared."""
    from smartmixed.train.cli import CONFIG_DESTS

    for name, value in setting:
        dest = name.replace("-", "_")
        recorded = training.get(dest)
        if dest not in CONFIG_DESTS or isinstance(recorded, list | dict):
            continue
        if isinstance(recorded, int | float) and not isinstance(recorded, bool):
            try:
                same = float(value) == recorded
            except ValueError:
                same = False
        else:
            same = recorded == value
        if not same:
            return name, recorded, value
    return None


def study_command(config: Mapping[str, Any]) -> str:
    """The smartmixed-bench command line that reproduces this study."""
    command = ["smartmixed-bench", "study", "--out", config["out"], "--data", config["data"]]
    if config["data_dir"] is not None:
        command += ["--data-dir", config["data_dir"]]
    base = [m for m in config["models"] if m not in config["variants"]]
    command += ["--models", ",".join(base)] if base else []
    for label, flags in config["variants"].items():
        command += ["--variant", f"{label}={flags}"]
    keys = list(config["archs"])
    if keys == [f"table1-{i}" for i in range(1, len(TABLE1) + 1)]:
        command += ["--archs", TABLE1_ARCHS]
    else:
        presets = {*PRESETS, *CONV_PRESETS}
        specs = [k if k in presets else ",".join(map(str, config["archs"][k])) for k in keys]
        command += ["--archs", ";".join(specs)]
    seeds = config["seeds"]
    if seeds == list(range(len(seeds))):
        command += ["--seeds", str(len(seeds))]
    else:
        command += ["--seeds", ",".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")]
    if "tune_lr" in config:
        command += ["--tune-lr", ",".join(config["tune_lr"])]
    for name, values in config.get("tune", {}).items():
        command += ["--tune", f"{name}={','.join(values)}"]
    if config.get("tune_seeds") is not None:
        command += ["--tune-seeds", str(config["tune_seeds"])]
    if config["jobs"] != 1:
        command += ["--jobs", str(config["jobs"])]
    if config["train_args"]:
        command += ["--", *config["train_args"]]
    return shlex.join(command)


# --------------------------------------------------------------------------------------------
# Aggregation


def competition_ranks(means: Mapping[str, float]) -> dict[str, int]:
    """Standard competition ranking, highest mean first: rank = 1 + number of strictly better."""
    return {
        name: 1 + sum(other > mean + TIE_TOLERANCE for other in means.values())
        for name, mean in means.items()
    }


def mean_reciprocal_rank(
    ranks: Mapping[str, Mapping[str, int]], models: Sequence[str] | None = None
) -> dict[str, float]:
    """MRR_f = (1/N) sum_i 1 / rank_i(f) over the N architectures that rank every model
    (``models``, default: every model ranked anywhere). {} when no architecture ranks them all."""
    if models is None:
        models = list(dict.fromkeys(m for arch_ranks in ranks.values() for m in arch_ranks))
    complete = [r for r in ranks.values() if all(m in r for m in models)]
    if not complete:
        return {}
    return {m: sum(1 / r[m] for r in complete) / len(complete) for m in models}


def paired_outcomes(
    cells: Sequence[Mapping[str, Any]], *, challengers: Sequence[str], baselines: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """{challenger: {baseline: {wins, ties, losses, difference}}} by test accuracy over the
    (archkey, seed) pairs where both models have a cell. ``difference``: ``summarize`` of the
    paired differences challenger - baseline (n, mean, std, Student-t 95% interval), None
    without a pair: same seed means same split and initialisation seed, so the interval of the
    mean difference is the paired one."""
    accuracy = {(c["archkey"], c["model"], c["seed"]): c["test_accuracy"] for c in cells}
    pairs = sorted({(c["archkey"], c["seed"]) for c in cells})
    paired: dict[str, dict[str, dict[str, Any]]] = {}
    for model in challengers:
        paired[model] = {}
        for base in baselines:
            tally: dict[str, Any] = {"wins": 0, "ties": 0, "losses": 0}
            differences = []
            for key, seed in pairs:
                a, b = accuracy.get((key, model, seed)), accuracy.get((key, base, seed))
                if a is not None and b is not None:
                    tally["wins" if a > b else "losses" if a < b else "ties"] += 1
                    differences.append(a - b)
            tally["difference"] = summarize(differences) if differences else None
            paired[model][base] = tally
    return paired


def summarize(accuracies: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std (ddof 1) and the Student-t 95% interval (None below two seeds)."""
    from scipy.stats import t

    n = len(accuracies)
    mean = sum(accuracies) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def choose_setting(means: Mapping[Setting, float], tuning: Tuning) -> Setting:
    """The setting of the best (mean) validation accuracy; of the settings whose accuracies are
    equal to it (within TIE_TOLERANCE), the first by ``tuning.tie_key``: the smaller value of the
    first option, then of the next, a value that is not a number counting by its place in its
    list. With --tune-lr alone this is choose_rate's rule, the smaller rate."""
    best = max(means.values())
    return min((s for s, m in means.items() if m >= best - TIE_TOLERANCE), key=tuning.tie_key)


def choose_settings(
    cells: Sequence[Mapping[str, Any]], tuning: Tuning
) -> dict[tuple[str, str], dict[str, Any]]:
    """{(archkey, model): {"settings": {setting: {"mean_val_accuracy", "n"}}, "chosen",
    "complete"}} for each group with a complete tuning cell (seed in tuning.seeds): per setting
    the mean validation accuracy of the final models over its n finished seeds (None when n is
    0), the chosen setting, and whether every setting has every tuning seed (the choice is
    final). ``tuning.choice_json`` writes a record as study.json holds it."""
    grid = tuning.settings()
    val: dict[tuple[str, str], dict[Setting, list[float]]] = {}
    for c in cells:
        if c["seed"] in tuning.seeds:
            per_setting = val.setdefault((c["archkey"], c["model"]), {s: [] for s in grid})
            per_setting[tuning.setting_of(c)].append(c["val_accuracy"])
    choices = {}
    for group, per_setting in val.items():
        means = {s: sum(v) / len(v) for s, v in per_setting.items() if v}
        choices[group] = {
            "settings": {
                s: {"mean_val_accuracy": means.get(s), "n": len(v)} for s, v in per_setting.items()
            },
            "chosen": choose_setting(means, tuning),
            "complete": all(len(v) == len(tuning.seeds) for v in per_setting.values()),
        }
    return choices


def config_tuning(config: Mapping[str, Any]) -> Tuning | None:
    """The Tuning that study.json's config records (tune_lr, tune, tune_seeds)."""
    tune = [f"{name}={','.join(values)}" for name, values in config.get("tune", {}).items()]
    return parse_tuning(config.get("tune_lr"), config.get("tune_seeds"), config["seeds"], tune=tune)


def aggregate(
    cells: Sequence[dict[str, Any]], *, models: Sequence[StudyModel], config: dict[str, Any]
) -> dict[str, Any]:
    """What study.json holds: cells, summary, ranks, mrr, paired, config. Tuned, also tuning
    ({archkey: {model: choose_settings' record, as Tuning.choice_json writes it}}); every cell
    is listed, "chosen" marking those at their group's chosen setting, and summary, ranks, mrr
    and paired use those alone."""
    labels = [m.label for m in models]
    tuning = config_tuning(config)
    choices: dict[tuple[str, str], dict[str, Any]] = {}
    if tuning is not None:
        choices = choose_settings(cells, tuning)
        chosen = {group: choice["chosen"] for group, choice in choices.items()}
        cells = [
            {**c, "chosen": tuning.setting_of(c) == chosen[c["archkey"], c["model"]]} for c in cells
        ]
    used = [c for c in cells if c.get("chosen", True)]
    summary: dict[str, dict[str, Any]] = {}
    ranks: dict[str, dict[str, int]] = {}
    for key in config["archs"]:
        per_model = {
            label: [c["test_accuracy"] for c in used if c["archkey"] == key and c["model"] == label]
            for label in labels
        }
        stats = {label: summarize(acc) for label, acc in per_model.items() if acc}
        if not stats:
            continue
        ranks[key] = competition_ranks({label: s["mean"] for label, s in stats.items()})
        summary[key] = {label: {**s, "rank": ranks[key][label]} for label, s in stats.items()}
        if tuning is not None:
            for label, s in summary[key].items():
                s[tuning.key] = tuning.to_json(choices[key, label]["chosen"])
    result: dict[str, Any] = {"cells": list(cells)}
    if tuning is not None:
        result["tuning"] = {
            key: {
                label: tuning.choice_json(choices[key, label])
                for label in labels
                if (key, label) in choices
            }
            for key in config["archs"]
            if any(k == key for k, _ in choices)
        }
    return result | {
        "summary": summary,
        "ranks": ranks,
        "mrr": mean_reciprocal_rank(ranks, labels),
        "paired": paired_outcomes(
            used,
            challengers=[m.label for m in models if not m.fixed],
            baselines=[m.label for m in models if m.fixed],
        ),
        "config": config,
    }


# --------------------------------------------------------------------------------------------
# Report


def render_markdown(study: Mapping[str, Any]) -> str:
    """study.md: the grid and its command, then per architecture the models' table (and the
    choice of setting), the mean reciprocal rank and the paired comparison with the baselines."""
    tuning = config_tuning(study["config"])
    lines = _header_lines(study, tuning)
    for key, per_model in study["summary"].items():
        lines += _architecture_lines(study, key, per_model, tuning)
    lines += _mrr_lines(study)
    lines += _paired_lines(study, tuning)
    return "\n".join(lines) + "\n"


def _header_lines(study: Mapping[str, Any], tuning: Tuning | None) -> list[str]:
    config = study["config"]
    if tuning is None:
        per_group = len(config["seeds"])
    else:  # every setting on the tuning seeds, the chosen one on the rest
        per_group = len(tuning.settings()) * len(tuning.seeds) + len(tuning.rest)
    n_cells = len(config["archs"]) * len(config["models"]) * per_group
    grid = f"{len(config['archs'])} architectures x {len(config['models'])} models x "
    if tuning is None:
        grid += f"{len(config['seeds'])} seeds {config['seeds']}"
    else:
        settings, chosen = (
            ("learning rates", "rate") if tuning.rates_only else ("settings", "setting")
        )
        grid += f"{len(tuning.settings())} {settings} x seeds {list(tuning.seeds)}"
        grid += f", then the chosen {chosen} x seeds {list(tuning.rest)}" if tuning.rest else ""
    lines = [
        f"# Study: {config['data']}",
        "",
        f"{len(study['cells'])} of {n_cells} cells complete ({grid}); test accuracy of the "
        "best-validation model of each run.",
        "",
        "```sh",
        config["command"],
        "```",
    ]
    return lines if tuning is None else [*lines, "", _tuning_text(tuning, len(config["seeds"]))]


def _tuning_text(tuning: Tuning, n_seeds: int) -> str:
    """The paragraph that says what was tuned, on which seeds, and the rule of the choice."""
    chosen = "rate" if tuning.rates_only else "setting"
    on = f"seeds {list(tuning.seeds)}"
    if tuning.rest:
        on += (
            f" (the first {len(tuning.seeds)} of {n_seeds}; seeds {list(tuning.rest)} trained "
            f"at the chosen {chosen} only)"
        )
    if tuning.rates_only:
        tried = f"Learning rate tuned: {', '.join(tuning.options[0].values)} tried"
        ties = "the smaller rate"
    else:
        grid = " x ".join(f"{o.name} {', '.join(o.values)}" for o in tuning.options)
        tried = f"Tuned: {grid} ({len(tuning.settings())} settings) tried"
        ties = tuning.tie_rule()
    return (
        f"{tried}; per architecture and model the {chosen} with the best mean validation "
        f"accuracy of the final model on {on} is chosen (ties: {ties}). Test accuracy takes no "
        f"part in the choice; the tables, ranks, MRR and paired comparison use the chosen "
        f"{chosen}'s cells only."
    )


def _architecture_lines(
    study: Mapping[str, Any], key: str, per_model: Mapping[str, Any], tuning: Tuning | None
) -> list[str]:
    """One architecture's table of models by rank (tuned: each model's chosen setting, one
    column per option, then the table of the choice)."""
    arch = study["config"]["archs"][key]
    if arch and isinstance(arch[0], dict):  # a conv preset: its arch follows from the data
        arch = next(c["arch"] for c in study["cells"] if c["archkey"] == key)
        lines = ["", f"## {key} (conv preset, arch {arch})", ""]
    else:
        lines = ["", f"## {key} {arch}", ""]
    names = [] if tuning is None else [o.name for o in tuning.options]
    lines += [
        "| rank | model | "
        + "".join(f"{name} | " for name in names)
        + "seeds | test accuracy (mean ± std) | 95% interval |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for label, s in sorted(per_model.items(), key=lambda item: item[1]["rank"]):
        std = "" if s["std"] is None else f" ± {s['std']:.4f}"
        ci = "" if s["ci95"] is None else f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"
        setting = () if tuning is None else tuning.setting_of(s)
        values = "".join(f"{value} | " for _, value in setting)
        lines.append(f"| {s['rank']} | {label} | {values}{s['n']} | {s['mean']:.4f}{std} | {ci} |")
    if tuning is not None:
        lines += tuning_table(study["tuning"].get(key, {}), tuning)
    return lines


def _mrr_lines(study: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Mean reciprocal rank", ""]
    if not study["mrr"]:
        return [*lines, "No architecture has a cell of every model yet."]
    complete = [k for k, r in study["ranks"].items() if all(m in r for m in study["mrr"])]
    lines += [
        f"Over the {len(complete)} architecture(s) where every model has a cell; "
        "1 = best everywhere.",
        "",
        "| model | MRR |",
        "|---|---|",
    ]
    for label, value in sorted(study["mrr"].items(), key=lambda item: -item[1]):
        lines.append(f"| {label} | {value:.3f} |")
    return lines


def _paired_lines(study: Mapping[str, Any], tuning: Tuning | None) -> list[str]:
    """Wins / ties / losses of every non-fixed model against every fixed one, then the mean
    paired differences (nothing without both kinds of model)."""
    baselines = sorted(
        {b for per in study["paired"].values() for b in per}, key=study["config"]["models"].index
    )
    if not (study["paired"] and baselines):
        return []
    header = [
        "| model | " + " | ".join(f"vs {b}" for b in baselines) + " |",
        "|---|" + "---|" * len(baselines),
    ]
    lines = [
        "",
        "## Paired comparison (wins / ties / losses)",
        "",
        "Test accuracy of each non-fixed model against each fixed baseline on the same "
        "architecture and seed"
        + ("" if tuning is None else f", each at its chosen {_tuned_noun(tuning)}")
        + ".",
        "",
        *header,
    ]
    for label, per in study["paired"].items():
        tallies = [per[b] for b in baselines]
        cells = [f"{t['wins']} / {t['ties']} / {t['losses']}" for t in tallies]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired difference in test accuracy (model - baseline, points): mean [95% interval] "
        "over the pairs (n)",
        "",
        *header,
    ]
    for label, per in study["paired"].items():
        differences = [_difference_cell(per[b].get("difference")) for b in baselines]
        lines.append(f"| {label} | " + " | ".join(differences) + " |")
    return lines


def _difference_cell(difference: Mapping[str, Any] | None) -> str:
    """'-0.42 [-0.90, +0.06] (5)' in accuracy points; no interval below two pairs."""
    if difference is None:
        return ""
    text = f"{100 * difference['mean']:+.2f}"
    if difference["ci95"] is not None:
        low, high = difference["ci95"]
        text += f" [{100 * low:+.2f}, {100 * high:+.2f}]"
    return f"{text} ({difference['n']})"


def _tuned_noun(tuning: Tuning) -> str:
    return "learning rate" if tuning.rates_only else "setting"


def tuning_table(per_model: Mapping[str, Mapping[str, Any]], tuning: Tuning) -> list[str]:
    """One architecture's choice: per model each setting's mean validation accuracy (seeds
    finished) and the chosen setting, marked provisional while a tuning cell is missing."""
    grid = tuning.settings()
    lines = [
        "",
        f"{_tuned_noun(tuning).capitalize()} choice: mean validation accuracy of the final "
        f"models (seeds finished, of {len(tuning.seeds)})",
        "",
        "| model | " + " | ".join(describe_setting(s) for s in grid) + " | chosen |",
        "|---|" + "---|" * (len(grid) + 1),
    ]
    for label, choice in per_model.items():
        stats = tuning.choice_from_json(choice)
        shown = [
            "-"
            if stats[s]["mean_val_accuracy"] is None
            else f"{stats[s]['mean_val_accuracy']:.4f} ({stats[s]['n']})"
            for s in grid
        ]
        setting = tuning.from_json(choice["chosen"])
        chosen = setting[0][1] if tuning.rates_only else describe_setting(setting)
        chosen += "" if choice["complete"] else " (provisional)"
        lines.append(f"| {label} | " + " | ".join(shown) + f" | {chosen} |")
    return lines


def activation_color(name: str) -> Any:
    """One colour per activation name (the registry's order; tab10 as the per-run plots)."""
    import matplotlib

    index = list(ACTIVATIONS).index(name)
    return matplotlib.colormaps["tab10" if index < 10 else "Dark2"](index % 10)


def shares_by_depth(
    cells: Sequence[Mapping[str, Any]], model: str
) -> dict[str, tuple[list[float], list[float]]]:
    """{activation: (relative depths, mean share)}: hidden layer l of L sits at (l + 0.5) / L;
    shares at the same depth are averaged over architectures and seeds."""
    points: dict[str, dict[float, list[float]]] = {}
    for cell in cells:
        layers = cell.get("activation_shares") if cell["model"] == model else None
        for layer, shares in enumerate(layers or []):
            depth = round((layer + 0.5) / len(layers), 6)
            for name, share in shares.items():
                points.setdefault(name, {}).setdefault(depth, []).append(share)
    return {
        name: (sorted(by_depth), [sum(v) / len(v) for _, v in sorted(by_depth.items())])
        for name, by_depth in points.items()
    }


def plot(study: Mapping[str, Any], path: Path) -> None:
    """MRR per model; rank heatmap (architectures x models); activation share by depth."""
    import numpy as np

    plt = outputs.pyplot()

    config = study["config"]
    labels, keys = config["models"], list(study["ranks"])
    fig, (ax_mrr, ax_rank, ax_share) = plt.subplots(
        1, 3, figsize=(18, max(4.5, 0.32 * len(keys) + 2.5))
    )
    if study["mrr"]:
        ax_mrr.bar(labels, [study["mrr"][m] for m in labels], color="C0")
        ax_mrr.set_ylim(0, 1.05)
    else:
        ax_mrr.text(0.5, 0.5, "no architecture has\nevery model yet", ha="center", va="center")
    ax_mrr.set_ylabel("mean reciprocal rank")
    ax_mrr.set_title("MRR (1 = best on every architecture)")
    ax_mrr.tick_params(axis="x", labelrotation=45)

    grid = np.array([[study["ranks"][k].get(m, np.nan) for m in labels] for k in keys], float)
    worst = max(len(labels), 2)
    ax_rank.imshow(grid, cmap="viridis_r", aspect="auto", vmin=1, vmax=worst)
    for (row, col), rank in np.ndenumerate(grid):
        if not np.isnan(rank):  # dark text on the light (good) end of viridis_r
            color = "k" if rank <= (1 + worst) / 2 else "w"
            ax_rank.text(col, row, f"{rank:.0f}", ha="center", va="center", color=color, fontsize=8)
    ax_rank.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax_rank.set_yticks(range(len(keys)), keys)
    ax_rank.set_title("rank by mean test accuracy (1 = best)")

    styles = ["-", "--", ":", "-."]
    mixed = [m for m in labels if not config["modes"][m].startswith("fixed:")]
    drawn = False
    chosen = [c for c in study["cells"] if c.get("chosen", True)]  # tuned: chosen settings
    for i, model in enumerate(mixed):
        for name, (depths, shares) in shares_by_depth(chosen, model).items():
            label = name if len(mixed) == 1 else f"{model}: {name}"
            ax_share.plot(
                depths,
                shares,
                linestyle=styles[i % len(styles)],
                marker="o",
                ms=3,
                color=activation_color(name),
                label=label,
            )
            drawn = True
    if drawn:
        ax_share.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax_share.set_xlim(0, 1)
    else:
        ax_share.text(0.5, 0.5, "no smartmixed cell yet", ha="center", va="center")
    ax_share.set_xlabel("relative depth of the hidden layer, (l + 0.5) / L")
    ax_share.set_ylabel("share of neurons")
    ax_share.set_title("activation share by depth (mean over archs and seeds)")
    fig.suptitle(f"study on {config['data']}: {len(study['cells'])} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The command line (smartmixed-bench study)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's flags (besides --out and --quiet, which every bench command has)."""
    parser.add_argument("--data", default="mnist", help="smartmixed-train --data (default mnist)")
    parser.add_argument("--data-dir", type=Path, help="smartmixed-train --data-dir")
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="activations (fixed baselines) and smartmixed (default: all seven)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL='FLAGS'",
        dest="variants",
        help="an extra model LABEL whose cells get FLAGS, e.g. "
        "'smartmixed-fresh=--phase2-init fresh' (--mode smartmixed unless FLAGS "
        "set it; FLAGS win over the same option after --); repeatable",
    )
    parser.add_argument(
        "--archs",
        default=DEFAULT_ARCHS,
        help="table1 (the 18 Table 1 presets) or PRESET;WIDTHS;... e.g. "
        "'paper;table1-5;64,32,10' or conv presets 'lenet5;convnet' (default paper)",
    )
    parser.add_argument(
        "--seeds",
        default=str(DEFAULT_SEEDS),
        help="N (seeds 0..N-1) or a list 1,2,7 ('5,' is seed 5 alone; default 3)",
    )
    parser.add_argument(
        "--tune-lr",
        metavar="RATES",
        help="learning rates to try, e.g. 1e-4,1e-3,3e-3: every cell trains at each; per "
        "architecture and model the rate with the best mean validation accuracy is kept "
        "(ties: the smaller) and the tables use its cells only",
    )
    parser.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="a smartmixed-train option to tune (its flag without the dashes), e.g. "
        "tau=0.3,1.0 or logit-lr=1e-2,3e-2; repeatable, alone or with --tune-lr (lr first): "
        "every cell trains at each setting of the product of the values, in a folder named "
        "after it (lr1e-3_tau0.3), and per architecture and model the setting with the best "
        "mean validation accuracy is kept (ties: the smaller value of the first option, then "
        "of the next; values that are not numbers by their place in the list)",
    )
    parser.add_argument(
        "--tune-seeds",
        type=int,
        metavar="N",
        help="with --tune-lr or --tune: choose on the first N seeds only; the other seeds "
        "train at the chosen rate or setting alone",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells trained in parallel, CPU threads split between them",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--plan",
        action="store_true",
        help="print every cell's command (for a scheduler) and train nothing",
    )
    mode.add_argument(
        "--collect", action="store_true", help="aggregate the complete cells and train nothing"
    )


def run_command(args: argparse.Namespace, train_args: list[str]) -> int:
    """`smartmixed-bench study`: run (or plan, or collect) the study, print its tables; the exit
    status (0, 1 a cell failed or nothing to aggregate, 2 bad options, 130 interrupted)."""
    try:
        outcome = call_with_options(run_study, args, train_args=train_args)
    except StudyError as e:
        print(f"smartmixed-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nsmartmixed-bench: interrupted; the same command continues the study (complete "
            "cells are skipped, killed ones resumed)",
            file=sys.stderr,
        )
        return 130
    chosen = "setting" if args.tune else "rate"
    if args.plan:
        print("\n".join(shlex.join(command) for command in outcome["commands"]))
        if outcome["waiting"]:
            print(
                f"smartmixed-bench: {outcome['waiting']} more cell(s), the seeds after "
                f"--tune-seeds {args.tune_seeds}, train at their architecture and model's chosen "
                f"{chosen}, which depends on the tuning cells above; --plan lists them once "
                "those are complete",
                file=sys.stderr,
            )
        return 0
    if outcome["study"] is not None:
        print(render_markdown(outcome["study"]))
        print("wrote " + ", ".join(str(p) for p in outcome["paths"]))
    print(
        f"trained {outcome['trained']} cell(s), {outcome['skipped']} already complete, "
        f"{len(outcome['failed'])} failed"
    )
    for failure in outcome["failed"]:
        print(f"failed: {failure['run']} (exit {failure['returncode']})", file=sys.stderr)
    if outcome["waiting"]:
        print(
            f"{outcome['waiting']} cell(s) wait for their architecture and model's {chosen} "
            "choice (a tuning cell is not complete)",
            file=sys.stderr,
        )
    if outcome["study"] is None:
        print(
            f"smartmixed-bench: no complete cell in {args.out}/runs: nothing to aggregate",
            file=sys.stderr,
        )
    return 1 if outcome["failed"] or outcome["study"] is None else 0
