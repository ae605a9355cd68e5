"""smartmixed-export: a thin command line over ``export_run``, ``export_module`` and
``verify_entry``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smartmixed.contract import SpecError, call_with_options, split_list
from smartmixed.contract.sessions import ProviderError
from smartmixed.export.autotune import AUTO, AUTO_BATCHES
from smartmixed.export.folds import LayerFold
from smartmixed.export.lower import DEFAULT_OPSET, LOWERINGS, LoweringError
from smartmixed.export.module import export_module
from smartmixed.export.quantize import (
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MIN_AGREEMENT,
    summarize_quantization,
)
from smartmixed.export.repository import ExportError, ExportResult, export_run, verify_entry
from smartmixed.export.verify import VerificationError, summarize
from smartmixed.nn import FrozenFileError, load_frozen
from smartmixed.train.artifacts import ArtifactError

EXAMPLE_SEED = 0  # the random example a --module export traces (its values do not matter)
# the options that belong to exporting a run folder, refused beside --module
RUN_OPTIONS = (
    "quantize",
    "min_agreement",
    "max_accuracy_drop",
    "data_dir",
    "verify_only",
    "against",
)


# the options beside the run folder, --repository and --name, in --help's groups: flag -> its
# argparse keywords (the dest is the keyword of export_run / export_module it fills)
OPTION_GROUPS: dict[str, dict[str, dict[str, Any]]] = {
    "your own module instead of a run": {
        "--module": dict(
            metavar="FILE.py:FACTORY",
            help="export your own network instead of a run: FILE.py is imported and FACTORY() "
            "called to build the model (this runs the code in FILE.py: the one place export "
            "executes code from a file, and only the file you name), then --weights fill its "
            "frozen mixed layers and tensors (smartmixed.nn.load_frozen)",
        ),
        "--weights": dict(
            type=Path,
            metavar="FILE.safetensors",
            help="with --module: the weights smartmixed.nn.save_frozen wrote (FILE.json beside it)",
        ),
        "--input-shape": dict(
            metavar="C,H,W",
            help="with --module: one sample's shape without the batch, e.g. 1,28,28 (the batch "
            "is dynamic)",
        ),
        "--labels": dict(
            metavar="A,B,...", help="with --module: one label per class (default 0..C-1)"
        ),
    },
    "lowering": {
        "--lowering": dict(
            default=AUTO,
            choices=[AUTO, *LOWERINGS],
            help="auto (default) times every verified candidate and keeps the fastest; a "
            "module or conv run is lowered scatter, permuted, folded or folded_tanh",
        ),
        "--opset": dict(type=int, default=DEFAULT_OPSET, help=f"default {DEFAULT_OPSET}"),
        "--device": dict(
            default="cpu",
            choices=["cpu", "cuda"],
            help="execution provider that auto times the candidates on",
        ),
        "--threads": dict(
            type=int,
            help="intra-op threads auto times the candidates with: those the model will be "
            "served with (default: ONNX Runtime's, all cores)",
        ),
        "--auto-batches": dict(
            metavar="SIZES",
            help="batch sizes auto times the candidates at: those the model will be served "
            "at; the smallest geometric mean over them wins (default "
            f"{','.join(map(str, AUTO_BATCHES))})",
        ),
    },
    "the entry": {
        "--version": dict(type=int, default=1, help="version folder (default 1)"),
        "--overwrite": dict(action="store_true", help="replace an existing version"),
        "--private": dict(
            action="store_true",
            help="folders 0700 and files 0600 (default 0755 and 0644: readable by a server "
            "running as another user)",
        ),
        "--max-queue-delay-us": dict(
            type=int,
            metavar="US",
            help="the dynamic batching delay config.pbtxt states, in microseconds (default: "
            "none, so the server's own max_batch_delay_ms applies)",
        ),
    },
    "int8": {
        "--quantize": dict(
            choices=["int8"],
            help="write ONNX Runtime's dynamic INT8 quantization of the chosen lowering "
            "instead, as NAME-int8 unless --name is given",
        ),
        "--min-agreement": dict(
            type=float,
            metavar="FRACTION",
            help="int8: least argmax agreement with the fp32 PyTorch model on the test set "
            f"(default {DEFAULT_MIN_AGREEMENT}; --verify-only: the recorded one)",
        ),
        "--max-accuracy-drop": dict(
            type=float,
            metavar="POINTS",
            help="int8: largest test accuracy drop in points (default "
            f"{DEFAULT_MAX_ACCURACY_DROP}; --verify-only: the recorded one)",
        ),
    },
    "verification": {
        "--data-dir": dict(
            type=Path,
            metavar="DIR",
            help="the folder of the run's data files on this machine, for the verification on "
            "its test set (default: where training read them; a run trained on another "
            "machine)",
        ),
        "--verify-only": dict(
            type=Path, metavar="ENTRY", help="re-verify an existing entry (models/NAME) and exit"
        ),
        "--against": dict(
            type=Path,
            metavar="RUN",
            help="with --verify-only: the run to verify against (default: the recorded one)",
        ),
    },
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smartmixed-export",
        description="Lower a trained run (or your own module, --module) to ONNX, verify ONNX "
        "Runtime against PyTorch, and write a Triton-compatible model repository entry "
        "(models/NAME/VERSION/model.onnx).",
    )
    p.add_argument("run", nargs="?", type=Path, help="the run folder, e.g. runs/NAME")
    p.add_argument("--repository", type=Path, default=Path("models"), help="default: models")
    p.add_argument(
        "--name", help="entry name (default: the run folder's name; with --module, FILE's stem)"
    )
    for title, options in OPTION_GROUPS.items():
        group = p.add_argument_group(title)
        for flag, keywords in options.items():
            group.add_argument(flag, **keywords)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # warnings of the library (leftovers of interrupted exports removed, a non-atomic swap) on
    # stderr, unless the caller has configured logging already
    logging.basicConfig(format="smartmixed-export: %(message)s")
    thresholds = {
        key: value
        for key, value in (
            ("min_agreement", args.min_agreement),
            ("max_accuracy_drop", args.max_accuracy_drop),
        )
        if value is not None
    }
    if args.module is not None:
        return _export_module(parser, args)
    try:
        if args.verify_only is not None:
            report = verify_entry(
                args.verify_only, run_dir=args.against, data_dir=args.data_dir, **thresholds
            )
            int8 = "agreement" in report  # the report of quantize.verify_quantized
            print(
                f"{args.verify_only}: verified{' (int8)' if int8 else ''}\n"
                f"{summarize_quantization(report) if int8 else summarize(report)}"
            )
            return 0
        if args.run is None:
            parser.error("the run folder is required (or --verify-only ENTRY, or --module)")
        for option in ("weights", "input_shape", "labels"):
            if getattr(args, option) is not None:
                parser.error(f"--{option.replace('_', '-')} applies to --module")
        if thresholds and not args.quantize:
            parser.error("--min-agreement and --max-accuracy-drop apply to --quantize int8")
        if args.auto_batches is not None and args.lowering != "auto":
            parser.error(f"--auto-batches applies to --lowering auto (got {args.lowering})")
        # every option but the run folder and --verify-only/--against is export_run's keyword
        result = call_with_options(export_run, args, run_dir=args.run)
    except VerificationError as e:
        print(f"smartmixed-export: verification failed: {e}", file=sys.stderr)
        return 1
    except (ExportError, LoweringError, ArtifactError, ProviderError) as e:
        print(f"smartmixed-export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an entry or run file unreadable in a way no check above foresaw
        print(f"smartmixed-export: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    _print_result(args.run, result)
    return 0


def _print_result(source: Path | str, result: ExportResult) -> None:
    print(
        f"exported {source} -> {result.entry}/{result.version}/model.onnx "
        f"(lowering {result.lowering}, {result.report['precision']})"
    )
    if folds := result.report.get("folds"):  # a module's (or conv run's) frozen layers
        layers = [LayerFold(**fold) for fold in folds]
        print(f"frozen layers ({result.lowering} chosen):")
        for layer in layers:
            print(f"  permuted: {layer.describe()}")
        for layer in layers:
            print(f"  folded:   {layer.describe_folded()}")
    selection = result.report["selection"]
    if selection:
        batches = " / ".join(next(iter(selection["median_ms"].values())))
        precision = selection.get("precision", "fp32")
        for name, score in selection["score_ms"].items():
            mark = " <- chosen" if name == selection["chosen"] else ""
            print(
                f"  {name:<11} {score:.3f} ms ({precision}; geometric mean over batch "
                f"{batches}){mark}"
            )
    print(f"verified against PyTorch ({result.report['test_data']}):")
    print(summarize(result.report["verification"]))
    if quantization := result.report.get("quantization"):
        timings = quantization["timings"]
        print(
            f"int8 ({quantization['weight_type']} weights, chosen "
            f"{timings['chosen'].replace('_', '-')}), verified against the fp32 PyTorch model:"
        )
        print(summarize_quantization(quantization))
        for name, per_batch in timings["median_ms"].items():
            figures = ", ".join(f"batch {b} {ms:.3f} ms" for b, ms in per_batch.items())
            print(f"  {name:<11} {figures} ({timings['threads']} thread)")


def _export_module(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--module FILE.py:FACTORY --weights FILE.safetensors --input-shape C,H,W: build the
    user's model, fill it, export it; every bad option refused in one line, exit 2."""
    if args.run is not None:
        parser.error("give a run folder or --module, not both")
    given = [o for o in RUN_OPTIONS if getattr(args, o) is not None]
    if given:
        parser.error(f"--{given[0].replace('_', '-')} applies to a run folder, not --module")
    if args.weights is None or args.input_shape is None:
        parser.error("--module needs --weights FILE.safetensors and --input-shape C,H,W")
    if args.auto_batches is not None and args.lowering != "auto":
        parser.error(f"--auto-batches applies to --lowering auto (got {args.lowering})")
    try:
        shape = _input_shape(args.input_shape)
        file, factory = _module_target(args.module)
        if not args.weights.is_file():
            raise ExportError(f"--weights {args.weights}: no such file")
        model = _build_model(file, factory)
        load_frozen(model, args.weights)
        generator = torch.Generator().manual_seed(EXAMPLE_SEED)
        example = torch.randn(2, *shape, generator=generator)
        labels = split_list(args.labels) if args.labels is not None else None
        result = call_with_options(
            export_module,
            args,
            model=model,
            example_input=example,
            name=args.name or file.stem,
            labels=labels,
        )
    except VerificationError as e:
        print(f"smartmixed-export: verification failed: {e}", file=sys.stderr)
        return 1
    except (ExportError, FrozenFileError, SpecError, LoweringError, ProviderError) as e:
        print(f"smartmixed-export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"smartmixed-export: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    _print_result(args.module, result)
    return 0


def _input_shape(text: str) -> list[int]:
    """'1,28,28' -> [1, 28, 28] (order kept), each an integer >= 1."""
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if not shape or any(v < 1 for v in shape):
        raise ExportError(
            f"--input-shape {text!r}: expected positive integers separated by commas, e.g. 1,28,28"
        )
    return shape


def _module_target(text: str) -> tuple[Path, str]:
    """'path/net.py:build' -> (Path('path/net.py'), 'build'), the file checked."""
    file, colon, factory = text.rpartition(":")
    if not colon or not file or not factory.isidentifier():
        raise ExportError(f"--module {text!r}: expected FILE.py:FACTORY, e.g. net.py:build")
    path = Path(file)
    if path.suffix != ".py":
        raise ExportError(f"--module {text}: {path} is not a Python file (.py)")
    if not path.is_file():
        raise ExportError(f"--module {text}: {path}: no such file")
    return path, factory


def _build_model(path: Path, factory: str) -> nn.Module:
    """Import the user's file (its code runs: the user named it) and call FACTORY()."""
    where = f"--module {path}:{factory}"
    spec = importlib.util.spec_from_file_location(f"smartmixed_user_module_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ExportError(f"{where}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses, pickling look it up
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[spec.name]
        raise ExportError(f"{where}: importing {path} raised {_one_line(e)}") from None
    build: Any = getattr(module, factory, None)
    if build is None:
        raise ExportError(f"{where}: {path} defines no {factory}")
    if not callable(build):
        raise ExportError(
            f"{where}: {factory} is not a function or class (a {type(build).__name__})"
        )
    try:
        model = build()
    except (Exception, SystemExit) as e:
        raise ExportError(f"{where}: {factory}() raised {_one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ExportError(
            f"{where}: {factory}() returned a {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
