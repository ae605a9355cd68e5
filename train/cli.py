"""smartmixed-train: a thin command line over ``load_dataset`` and ``train_run``."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

import torch

from smartmixed.contract import (
    CONV_PRESETS,
    image_shape,
    is_conv_preset,
    layered_arch,
    resolve_conv_preset,
)
from smartmixed.nn.pool import DEFAULT_POOL, EXTRA_ACTIVATIONS, PoolError
from smartmixed.train.artifacts import ArtifactError, check_writable_folder
from smartmixed.train.auto import AUTO, plan_auto, summary_table, train_auto
from smartmixed.train.data import DataError, Dataset, load_dataset
from smartmixed.train.distributed import DistributedError
from smartmixed.train.loop import (
    CHOICES,
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    TrainConfig,
    TrainError,
    train_run,
)
from smartmixed.train.model import (
    PRESETS,
    ModelSpec,
    SpecError,
    parse_arch,
    resolve_preset,
)
from smartmixed.train.report import compare_runs, describe_layers

EPILOG = f"""\
pool: default {",".join(DEFAULT_POOL)}; extras {",".join(EXTRA_ACTIVATIONS)}
  (afu: a learned activation unit, see --afu-units/--afu-base/--afu-share; --mode fixed:afu)
presets: paper (= table1-11) and table1-1 ... table1-18 (the paper's Table 1 rows), and the
  conv nets lenet5 and convnet for image data (their last layer takes the data's class count;
  one activation per channel of a conv layer); --list-presets prints them.
examples:
  smartmixed-train --data mnist --preset paper --mode smartmixed --out runs/mixed
  smartmixed-train --data mnist --preset lenet5 --mode smartmixed --out runs/lenet5
  smartmixed-train --data digits --arch 64,128,10 --mode fixed:relu --epochs 30 --out runs/relu
  smartmixed-train --data digits --arch 64,128,10 --mode fixed:afu --epochs 30 --out runs/afu
  smartmixed-train --data digits --arch 64,128,10 --mode auto --tune-lr 1e-3,3e-3 --out runs/auto
  smartmixed-train --compare runs/mixed runs/relu
"""


def config_options() -> dict[str, dict[str, Any]]:
    """TrainConfig's options on the command line: flag -> argparse keywords, one flag per field
    declared with ``loop.flag`` (its help from the field's metadata and default, its type from
    the field's, its choices from ``loop.CHOICES``). Every default is None: an option left out
    takes the --protocol's value (or TrainConfig's own default), so the flags' dests are
    exactly TrainConfig's fields; the help names the default protocol's value."""
    hints = typing.get_type_hints(TrainConfig)
    options: dict[str, dict[str, Any]] = {}
    for field in fields(TrainConfig):
        if "help" not in field.metadata:
            continue
        keywords: dict[str, Any] = {"help": field.metadata["help"] + _default_note(field)}
        hint = hints[field.name]  # int, float | None, str, ...: a number's type converts it
        kind = next((k for k in (hint, *typing.get_args(hint)) if k in (int, float)), None)
        if kind is not None:
            keywords["type"] = kind
        if field.name in CHOICES:
            keywords["choices"] = CHOICES[field.name]
        if field.metadata["metavar"] is not None:
            keywords["metavar"] = field.metadata["metavar"]
        options[f"--{field.name.replace('_', '-')}"] = keywords
    return options


def _default_note(field: Field) -> str:
    """' (default X)' from a field's default, ' (default: UNSET)' where the default is None
    (the field's ``unset`` says what None means); nothing for a computed default (the pool's:
    the epilog names it)."""
    if field.default is MISSING:
        return ""
    if field.default is None:
        return f" (default: {field.metadata['unset']})"
    return f" (default {field.default})"


# TrainConfig's fields that the command line sets (argparse's dests of config_options' flags)
CONFIG_DESTS = tuple(f[2:].replace("-", "_") for f in config_options())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smartmixed-train",
        description="Train a SmartMixed network (phase 1 selective -> phase 2 mixed) or a "
        "fixed-activation baseline, and write its artifacts to --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="mnist | digits | fashion-mnist | csv:PATH | npz:PATH")
    p.add_argument("--data-dir", type=Path, help="folder with MNIST / Fashion-MNIST IDX files")
    p.add_argument("--label-column", default="label", help="CSV label column (default: label)")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--arch", help="layer widths of an MLP, e.g. 784,256,128,10")
    arch.add_argument(
        "--preset",
        help="a named architecture: an MLP or a conv net (lenet5, convnet; see --list-presets)",
    )
    p.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=DEFAULT_PROTOCOL,
        help=f"a named set of defaults that the options below override: {DEFAULT_PROTOCOL} "
        "(the default; the study's choice), paper (exactly the paper's protocol), "
        "reference-code (paper plus the reference code's quirks)",
    )
    for flag, options in config_options().items():
        p.add_argument(flag, **options)
    p.add_argument(
        "--screen-epochs",
        type=int,
        help="--mode auto: epochs of each fixed activation's screening run (default: a quarter "
        "of --epochs, at least 1)",
    )
    p.add_argument(
        "--tune-lr",
        metavar="R1,R2,...",
        help="--mode auto: SmartMixed and the best-screened activation each train at every rate "
        "and keep the one of the best validation accuracy (ties: the smaller); default: --lr",
    )
    p.add_argument("--out", type=Path, help="run folder, e.g. runs/NAME")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run in --out (--mode auto: the same command continues)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="print a comparison of finished runs and exit",
    )
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    return p


def _conv_config(args: argparse.Namespace, options: dict) -> tuple[TrainConfig, Dataset]:
    """A conv preset's config and its data: the data first, since the network's last width is
    its class count and its shapes follow from its images; TrainError when the data holds no
    images (a CSV's rows), SpecError when the preset's layers do not fit them."""
    dataset = _load_data(args, seed=args.seed if args.seed is not None else TrainConfig.seed)
    try:
        shape = image_shape(dataset.input_shape)
    except SpecError:
        raise TrainError(
            f"--preset {args.preset} is a conv net and needs image-shaped data ([H, W] or "
            f"[C, H, W] per sample); {args.data} holds samples of shape "
            f"{list(dataset.input_shape)}"
        ) from None
    layers = resolve_conv_preset(args.preset, classes=len(dataset.labels))
    try:
        arch = layered_arch(layers, shape)
    except SpecError as e:
        raise TrainError(f"--preset {args.preset} does not fit {shape} images: {e}") from None
    config = TrainConfig.from_protocol(args.protocol, arch=arch, layers=layers, **options)
    return config, dataset


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list_presets:
            print(_presets_text())
            return 0
        if args.compare:
            print(compare_runs(args.compare))
            return 0
        _check_request(parser, args)
        check_writable_folder(args.out, what="--out")  # before any data is loaded
        spec = _train(args)
        if spec is None:  # a torchrun rank other than 0: rank 0 reports
            return 0
    except (DataError, SpecError, PoolError, TrainError, ArtifactError, DistributedError) as e:
        print(f"smartmixed-train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the run folder became unwritable (disk full, ...) after the check
        print(
            f"smartmixed-train: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print(
            "\nsmartmixed-train: interrupted; continue with the same command plus --resume",
            file=sys.stderr,
        )
        return 130
    return _print_done(spec, args.out)


def _presets_text() -> str:
    lines = [f"{name:<10} {list(widths)}" for name, widths in PRESETS.items()]
    lines += [
        f"{name:<10} {describe_layers(layers)} (last: the data's classes)"
        for name, layers in CONV_PRESETS.items()
    ]
    return "\n".join(lines)


def _check_request(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2 with the usage line) and flags that need --mode auto."""
    for flag in ("data", "out"):
        if getattr(args, flag) is None:
            parser.error(f"--{flag} is required")
    if args.arch is None and args.preset is None:
        parser.error("one of --arch or --preset is required")
    if args.arch is not None and args.arch.strip() in (*PRESETS, *CONV_PRESETS):
        parser.error(f"--arch {args.arch}: that is a preset; use --preset {args.arch.strip()}")
    for flag in ("screen_epochs", "tune_lr"):
        if args.mode != AUTO and getattr(args, flag) is not None:
            mode = args.mode or TrainConfig.mode
            raise TrainError(f"--{flag.replace('_', '-')} needs --mode auto; got --mode {mode}")


def _train(args: argparse.Namespace) -> ModelSpec | None:
    """The run (or --mode auto's runs) the flags ask for; None on a torchrun rank but 0."""
    options = {name: getattr(args, name) for name in CONFIG_DESTS}
    if args.mode == AUTO:  # the options are checked as SmartMixed's; the plan sets each run's mode
        options["mode"] = TrainConfig.mode
    dataset = None
    if args.preset is not None and is_conv_preset(args.preset):
        config, dataset = _conv_config(args, options)
    else:
        arch = parse_arch(args.arch) if args.arch else resolve_preset(args.preset)
        config = TrainConfig.from_protocol(args.protocol, arch=arch, **options)
    if args.mode == AUTO:
        return _train_auto(args, options, config, dataset)
    dataset = dataset or _load_data(args, seed=config.seed)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
    if main_rank:
        pool = ",".join(config.pool)
        _print_setup(dataset, config, f"{config.mode}, architecture {config.arch}, pool {pool}")
    spec = train_run(config=config, resume=args.resume, **_run_options(args, dataset))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return spec if main_rank else None


def _train_auto(
    args: argparse.Namespace, options: dict[str, Any], config: TrainConfig, dataset: Dataset | None
) -> ModelSpec:
    """--mode auto: its plan checked (before an MLP's data is loaded; a conv net's arch comes
    from its data, so its plan is made after loading it), then its runs."""
    plan = plan_auto(
        protocol=args.protocol,
        options={**options, "arch": config.arch, "layers": config.layers},
        screen_epochs=args.screen_epochs,
        tune_lr=args.tune_lr,
    )
    dataset = dataset or _load_data(args, seed=config.seed)
    _print_setup(
        dataset,
        config,
        f"auto, architecture {config.arch}, pool {','.join(plan.pool)}, screen epochs "
        f"{plan.screen_epochs}, rates {','.join(plan.rates)}",
    )
    spec = train_auto(plan=plan, **_run_options(args, dataset))
    print(summary_table(spec.training[AUTO]))
    return spec


def _run_options(args: argparse.Namespace, dataset: Dataset) -> dict[str, Any]:
    """The keywords train_run and train_auto share."""
    return {
        "dataset": dataset,
        "out": args.out,
        "overwrite": args.overwrite,
        "device": args.device,
        "progress": not args.quiet,
    }


def _load_data(args: argparse.Namespace, *, seed: int) -> Dataset:
    return load_dataset(
        args.data, data_dir=args.data_dir, seed=seed, label_column=args.label_column
    )


def _print_setup(dataset: Dataset, config: TrainConfig, model: str) -> None:
    print(f"data: {dataset.summary()}")
    print(f"model: {model}")
    if config.layers is not None:
        print(f"layers: {describe_layers(config.layers)}")


def _print_done(spec: ModelSpec, out: Path) -> int:
    m = spec.metrics
    print(
        f"done: test accuracy {m['test_accuracy']:.4f}, validation {m['val_accuracy']:.4f} "
        f"(best epoch {m['best_epoch']}); artifacts in {out}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
