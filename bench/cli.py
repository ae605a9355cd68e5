"""smartmixed-bench: measure what the activation mix costs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smartmixed.train.model import SpecError, parse_arch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartmixed-bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    tc = sub.add_parser(
        "train-cost",
        help="ms per training step: fixed-ReLU vs phase 1 vs phase 2 (CPU)",
        description="Time training steps (forward, backward, clip, Adam) of a fixed-ReLU network, "
        "SmartMixed phase 1 and phase 2; writes DIR/train-cost.{json,md,png}.",
    )
    tc.add_argument("--out", type=Path, required=True, help="output folder")
    tc.add_argument("--arch", default=None, help="layer widths (default: the paper's)")
    tc.add_argument("--batch-size", type=int, default=128)
    tc.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    tc.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    tc.add_argument("--warmup", type=int, default=10, help="untimed steps per model first")
    tc.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    tc.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train-cost":
        import torch

        from smartmixed.bench.train_cost import measure_train_cost, render_markdown, write_outputs

        try:
            arch = parse_arch(args.arch) if args.arch else None
        except SpecError as e:
            print(f"smartmixed-bench: error: {e}", file=sys.stderr)
            return 2
        if min(args.batch_size, args.rounds, args.steps) < 1 or args.warmup < 0:
            print("smartmixed-bench: error: --batch-size, --rounds, --steps must be >= 1",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.threads:
            torch.set_num_threads(args.threads)
        result = measure_train_cost(
            arch=arch, batch_size=args.batch_size, rounds=args.rounds,
            steps_per_round=args.steps, warmup_steps=args.warmup, progress=not args.quiet,
        )  # fmt: skip
        paths = write_outputs(result, args.out)
        print(render_markdown(result))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
