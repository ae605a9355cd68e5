"""smartmixed-train: a thin command line over ``load_dataset`` and ``train_run``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from smartmixed.contract import (
    AFU_BASES,
    AFU_SHARES,
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
    DEFAULT_PROTOCOL,
    PHASE2_INITS,
    PHASE2_NORMS,
    PROTOCOLS,
    SELECT_RULES,
    SELECTIONS,
    TrainConfig,
    TrainError,
    train_run,
)
from smartmixed.train.model import (
    CANDIDATE_NORMS,
    LOGIT_GRAD_NORMS,
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


def config_options(d: dict) -> dict[str, dict]:
    """TrainConfig's options on the command line: flag -> argparse keywords, given the default
    protocol's settings ``d`` for the help texts. Every default is None: an option left out
    takes the --protocol's value (or TrainConfig's own default), so the flags' dests are
    exactly TrainConfig's fields."""
    return {
        "--mode": {
            "help": "smartmixed (default), fixed:ACTIVATION, or auto: screen the pool's fixed "
            "activations, then train SmartMixed and the best of them alike and keep the better "
            "on validation accuracy (the sub-runs in OUT/auto/)"
        },
        "--pool": {"help": "comma-separated candidate activations (smartmixed)"},
        "--p1-epochs": {"type": int, "help": f"phase-1 epochs (default {d['p1_epochs']})"},
        "--p2-epochs": {"type": int, "help": f"phase-2 epochs (default {d['p2_epochs']})"},
        "--epochs": {"type": int, "help": f"epochs of a fixed run (default {d['epochs']})"},
        "--lr": {"type": float, "help": f"Adam learning rate (default {d['lr']})"},
        "--logit-lr": {
            "type": float,
            "help": f"learning rate of the activation logits (default {d['logit_lr']}; "
            "paper: the same as --lr)",
        },
        "--batch-size": {"type": int, "help": f"default {d['batch_size']}"},
        "--tau": {"type": float, "help": f"Gumbel-Softmax temperature (default {d['tau']})"},
        "--tau-end": {
            "type": float,
            "help": "phase-1 temperature at the last epoch, annealed exponentially from "
            "--tau (default: constant)",
        },
        "--select": {
            "choices": SELECT_RULES,
            "help": "which phase-1 epoch's argmax is frozen: best validation loss, best "
            f"validation accuracy, or the last (default {d['select']})",
        },
        "--candidate-norm": {
            "choices": CANDIDATE_NORMS,
            "help": "standard: each candidate scaled to zero mean, unit variance under "
            "N(0, 1) inputs, so candidates compete on shape, not scale (default for "
            "smartmixed; none for fixed baselines and the paper protocols)",
        },
        "--logit-grad-norm": {
            "choices": LOGIT_GRAD_NORMS,
            "help": "candidate: each candidate's logit gradient rescaled, layer by layer, to "
            f"the same RMS over neurons (default {d['logit_grad_norm']})",
        },
        "--soft-epochs": {
            "type": int,
            "help": "the first N phase-1 epochs train the relaxed network sum_k s_k h_k(z) "
            "(every candidate, soft Gumbel-Softmax weights) before the hard one "
            f"(default {d['soft_epochs']})",
        },
        "--logit-warmup": {
            "type": float,
            "metavar": "FRACTION",
            "help": "this fraction of phase 1 first keeps the selection logits frozen (uniform "
            "draws: the weights learn under every candidate before the logits learn), e.g. 0.5: "
            f"the first half (default {d['logit_warmup']})",
        },
        "--afu-units": {
            "type": int,
            "help": "hidden units N of the learned activation unit afu, "
            "G(z) = sum_i w1_i psi(w0_i z + b0_i) + b1 (default 8)",
        },
        "--afu-base": {
            "choices": AFU_BASES,
            "help": "the AFU's base activation psi (default relu)",
        },
        "--afu-share": {
            "choices": AFU_SHARES,
            "help": "one AFU per hidden layer (layer, default) or one for the whole network",
        },
        "--afu-lr": {
            "type": float,
            "help": "learning rate of the AFU parameters, their own Adam group (default: --lr)",
        },
        "--seed": {"type": int, "help": "data split and initialisation (default 42)"},
        "--grad-clip": {"type": float, "help": f"gradient-norm clip (default {d['grad_clip']})"},
        "--phase2-init": {
            "choices": PHASE2_INITS,
            "help": "phase 2 keeps the phase-1 weights (continue) or re-initialises them "
            f"(fresh, as the reference code does) (default {d['phase2_init']})",
        },
        "--phase2-norm": {
            "choices": PHASE2_NORMS,
            "help": "keep: phase 2 trains the candidates as phase 1 did (default); fold: the "
            "candidate norm is folded into the weights when phase 2 starts, so phase 2 trains "
            "the plain mixed network (the same function, the fixed baselines' parameterisation; "
            "with a fresh phase 2, plain candidates from the start)",
        },
        "--logit-init-std": {
            "type": float,
            "help": "std of the initial activation logits (default 0: all equal)",
        },
        "--selection": {
            "choices": SELECTIONS,
            "help": "joint: the logits step on the training batches, as the weights do; "
            "bilevel: on a held-out slice of the training split the weights never see "
            f"(--selection-holdout), one logit step after each weight step (default "
            f"{d['selection']})",
        },
        "--selection-holdout": {
            "type": float,
            "metavar": "FRACTION",
            "help": "bilevel: the share of the training split held out for the logit steps "
            f"in phase 1 (phase 2 trains on all of it; default {d['selection_holdout']})",
        },
        "--logit-prior": {
            "metavar": "ACTIVATION=GAP",
            "help": "every phase-1 logit of ACTIVATION starts GAP above the others, a prior "
            "toward it that the mix must overcome, e.g. relu=2 (default: none)",
        },
    }


# TrainConfig's fields that the command line sets (argparse's dests of config_options' flags)
CONFIG_DESTS = tuple(f[2:].replace("-", "_") for f in config_options(PROTOCOLS[DEFAULT_PROTOCOL]))


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
        help="a named set of defaults that the options below override: smartmixed "
        "(default; the study's choice), paper (exactly the paper's protocol), "
        "reference-code (paper plus the reference code's quirks)",
    )
    for flag, options in config_options(PROTOCOLS[DEFAULT_PROTOCOL]).items():
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
    seed = args.seed if args.seed is not None else TrainConfig.seed
    dataset = load_dataset(
        args.data, data_dir=args.data_dir, seed=seed, label_column=args.label_column
    )
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
            for name, widths in PRESETS.items():
                print(f"{name:<10} {list(widths)}")
            for name, layers in CONV_PRESETS.items():
                print(f"{name:<10} {describe_layers(layers)} (last: the data's classes)")
            return 0
        if args.compare:
            print(compare_runs(args.compare))
            return 0
        for flag in ("data", "out"):
            if getattr(args, flag) is None:
                parser.error(f"--{flag} is required")
        if args.arch is None and args.preset is None:
            parser.error("one of --arch or --preset is required")
        if args.arch is not None and args.arch.strip() in (*PRESETS, *CONV_PRESETS):
            parser.error(f"--arch {args.arch}: that is a preset; use --preset {args.arch.strip()}")
        auto = args.mode == AUTO
        for flag in ("screen_epochs", "tune_lr"):
            if not auto and getattr(args, flag) is not None:
                mode = args.mode or "smartmixed"
                raise TrainError(f"--{flag.replace('_', '-')} needs --mode auto; got --mode {mode}")
        check_writable_folder(args.out, what="--out")  # before any data is loaded
        options = {name: getattr(args, name) for name in CONFIG_DESTS}
        if auto:  # the options are checked as SmartMixed's; the plan sets each run's mode
            options["mode"] = "smartmixed"
        dataset = None
        if args.preset is not None and is_conv_preset(args.preset):
            config, dataset = _conv_config(args, options)
        else:
            arch = parse_arch(args.arch) if args.arch else resolve_preset(args.preset)
            config = TrainConfig.from_protocol(args.protocol, arch=arch, **options)
        if auto:  # a conv net's arch comes from its data, so its plan is made after loading it
            plan = plan_auto(
                protocol=args.protocol,
                options={**options, "arch": config.arch, "layers": config.layers},
                screen_epochs=args.screen_epochs,
                tune_lr=args.tune_lr,
            )
        if dataset is None:
            dataset = load_dataset(
                args.data, data_dir=args.data_dir, seed=config.seed, label_column=args.label_column
            )
        if auto:
            print(f"data: {dataset.summary()}")
            print(
                f"model: auto, architecture {config.arch}, pool {','.join(plan.pool)}, screen "
                f"epochs {plan.screen_epochs}, rates {','.join(plan.rates)}"
            )
            if config.layers is not None:
                print(f"layers: {describe_layers(config.layers)}")
            spec = train_auto(
                plan=plan,
                dataset=dataset,
                out=args.out,
                overwrite=args.overwrite,
                device=args.device,
                progress=not args.quiet,
            )
            print(summary_table(spec.training[AUTO]))
            return _print_done(spec, args.out)
        main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
        if main_rank:
            print(f"data: {dataset.summary()}")
            print(f"model: {config.mode}, architecture {config.arch}, pool {','.join(config.pool)}")
            if config.layers is not None:
                print(f"layers: {describe_layers(config.layers)}")
        spec = train_run(
            config=config,
            dataset=dataset,
            out=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            device=args.device,
            progress=not args.quiet,
        )
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not main_rank:
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


def _print_done(spec: ModelSpec, out: Path) -> int:
    m = spec.metrics
    print(
        f"done: test accuracy {m['test_accuracy']:.4f}, validation {m['val_accuracy']:.4f} "
        f"(best epoch {m['best_epoch']}); artifacts in {out}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
