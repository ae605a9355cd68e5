"""smartmixed-export: a thin command line over ``export_run`` and ``verify_entry``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from smartmixed.contract import call_with_options
from smartmixed.contract.runtime import ProviderError
from smartmixed.export.autotune import AUTO_BATCHES
from smartmixed.export.lower import DEFAULT_OPSET, LOWERINGS, LoweringError
from smartmixed.export.quantize import (
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MIN_AGREEMENT,
    summarize_quantization,
)
from smartmixed.export.repository import ExportError, export_run, verify_entry
from smartmixed.export.verify import VerificationError, summarize
from smartmixed.train.artifacts import ArtifactError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smartmixed-export",
        description="Lower a trained run to ONNX, verify ONNX Runtime against PyTorch, and write "
        "a Triton-compatible model repository entry (models/NAME/VERSION/model.onnx).",
    )
    p.add_argument("run", nargs="?", type=Path, help="the run folder, e.g. runs/NAME")
    p.add_argument("--repository", type=Path, default=Path("models"), help="default: models")
    p.add_argument("--name", help="entry name (default: the run folder's name)")
    p.add_argument(
        "--lowering",
        default="auto",
        choices=["auto", *LOWERINGS],
        help="auto (default) times every verified candidate and keeps the fastest",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"default {DEFAULT_OPSET}")
    p.add_argument("--version", type=int, default=1, help="version folder (default 1)")
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="execution provider that auto times the candidates on",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads auto times the candidates with: those the model will "
        "be served with (default: ONNX Runtime's, all cores)",
    )
    p.add_argument(
        "--auto-batches",
        metavar="SIZES",
        help="batch sizes auto times the candidates at: those the model will be served at; "
        "the smallest geometric mean over them wins (default "
        f"{','.join(map(str, AUTO_BATCHES))})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument(
        "--private",
        action="store_true",
        help="folders 0700 and files 0600 (default 0755 and 0644: readable by a "
        "server running as another user)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="write ONNX Runtime's dynamic INT8 quantization of the chosen lowering "
        "instead, as NAME-int8 unless --name is given",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        metavar="FRACTION",
        help="int8: least argmax agreement with the fp32 PyTorch model on the test "
        f"set (default {DEFAULT_MIN_AGREEMENT}; --verify-only: the recorded one)",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="POINTS",
        help="int8: largest test accuracy drop in points (default "
        f"{DEFAULT_MAX_ACCURACY_DROP}; --verify-only: the recorded one)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the folder of the run's data files on this machine, for the verification on its "
        "test set (default: where training read them; a run trained on another machine)",
    )
    p.add_argument(
        "--verify-only",
        type=Path,
        metavar="ENTRY",
        help="re-verify an existing entry (models/NAME) and exit",
    )
    p.add_argument(
        "--against",
        type=Path,
        metavar="RUN",
        help="with --verify-only: the run to verify against (default: the recorded one)",
    )
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
            parser.error("the run folder is required (or --verify-only ENTRY)")
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
    print(
        f"exported {args.run} -> {result.entry}/{result.version}/model.onnx "
        f"(lowering {result.lowering}, {result.report['precision']})"
    )
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
