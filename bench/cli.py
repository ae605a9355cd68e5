"""smartmixed-bench: measure what the activation mix costs, and how the service holds up."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smartmixed.bench import BenchError, add_options
from smartmixed.bench.http_bench import HttpOptions
from smartmixed.bench.soak import SoakOptions, SoakPlan
from smartmixed.bench.train_cost import TrainCostOptions
from smartmixed.contract import SpecError, call_with_options, outputs
from smartmixed.train import study

# command -> (help, description): what `smartmixed-bench --help` and `COMMAND --help` say
COMMANDS: dict[str, tuple[str, str]] = {
    "train-cost": (
        "ms per training step: fixed-ReLU vs phase 1 vs phase 2 (CPU or CUDA)",
        "Time training steps (forward, backward, clip, Adam) of a fixed-ReLU network, "
        "SmartMixed phase 1 and phase 2; writes DIR/train-cost.{json,md,png}.",
    ),
    "latency": (
        "ONNX Runtime CPU inference latency: fixed activations vs a mixed network's lowerings",
        "Time ONNX Runtime CPU inference of the six fixed-activation networks and one "
        "mixed network in every lowering (an MLP: scatter, permuted, grouped, folded, "
        "folded_tanh and their int8 graphs; a conv net: scatter, permuted; and the one "
        "--lowering auto picks) across batch sizes and thread counts, with PyTorch eager beside "
        "it; writes DIR/latency.{json,md,png}.",
    ),
    "http": (
        "serving: requests/s and p50/p95/p99 latency of smartmixed-serve under load, over REST "
        "and/or gRPC, optionally beside MLServer",
        "Start smartmixed-serve on 127.0.0.1 (or target --url), drive it with wrk "
        "(one thread; a Python generator when wrk is missing) and/or h2load (or a grpc.aio "
        "closed loop; one CPU) at several concurrency levels for fixed and mixed models, "
        "batching on and off; with --against-mlserver, MLServer 1.7 serves the same model "
        "beside it (.venv-mlserver: make mlserver) and both are measured in interleaved "
        "rounds; writes DIR/http.{json,md,png}.",
    ),
    "soak": (
        "reliability of smartmixed-serve: soak, overload, slow clients, a huge header, "
        "SIGTERM under load, wire attacks",
        "Start smartmixed-serve on 127.0.0.1 (one fresh server per scenario, over a "
        "random-weight model; or target --url) and attack it: a soak at concurrency 64 (errors, "
        "p99, RSS growth), overload at 1024 (503s, longest 200, health p99), 1,000 slowloris "
        "connections with the server's open-file limit at 1024, one 100 MB header line, SIGTERM "
        "under load (failed requests, exit code); then the wire attacks, each at the server's "
        "own connection cap and at a cap of 16: clients that never read their answers (and "
        "SIGTERM meanwhile), an endless header behind pipelined answers, answers left unsent "
        "at a half-close, slow bodies on every route that reads one (health, RSS, descriptors, "
        "tracebacks); writes DIR/soak.{json,md,png}. About 4 to 5 minutes with the defaults. "
        "Targets are reported, never asserted.",
    ),
    "study": (
        "seeded grid of training runs (architectures x models x seeds), ranks and MRR",
        "Train every cell (architecture, model, seed) as its own smartmixed-train "
        "run in DIR/runs/ARCH/MODEL/seedK (with --tune-lr: DIR/runs/ARCH/MODEL/lrRATE/seedK; "
        "complete cells are skipped, killed ones resumed) and "
        "aggregate them: mean, std and 95% interval of the test accuracy, ranks per "
        "architecture, the paper's Mean Reciprocal Rank, paired wins/ties/losses against each "
        "fixed activation; writes DIR/study.{json,md,png} after every finished cell. Flags after "
        "a literal -- go to every cell's smartmixed-train command.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartmixed-bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, (summary, description) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=summary, description=description)
        folder = "study folder" if name == "study" else "output folder"
        parsers[name].add_argument("--out", type=Path, required=True, help=folder)
    tc, lat, web, so, st = parsers.values()
    st.usage = "%(prog)s --out DIR [options] [-- TRAIN FLAGS ...]"
    add_options(tc, TrainCostOptions)
    _latency_arguments(lat)
    add_options(web, HttpOptions)
    _soak_arguments(so)
    study.add_arguments(st)
    for bench in parsers.values():  # last in every --help, as it always was
        bench.add_argument("--quiet", action="store_false", dest="progress", help="no progress bar")
    return p


def _latency_arguments(lat: argparse.ArgumentParser) -> None:
    lat.add_argument("--arch", help="layer widths of an MLP (default: the paper's)")
    lat.add_argument(
        "--preset",
        help="a conv net instead: lenet5 or convnet (input 1x28x28), random weights and assignment",
    )
    source = lat.add_mutually_exclusive_group()
    source.add_argument(
        "--run",
        type=Path,
        help="runs/NAME: time that trained network, MLP or conv (its layers, assignment and "
        "weights)",
    )
    source.add_argument(
        "--mix",
        help="random assignment with these activation shares, e.g. relu=0.4,selu=0.3,elu=0.3 "
        "(default: uniform over the six default activations)",
    )
    lat.add_argument("--batches", default="1,32,256", help="batch sizes (default 1,32,256)")
    lat.add_argument("--threads", default="1,2", help="ORT intra-op / torch threads (default 1,2)")
    lat.add_argument("--rounds", type=int, default=40, help="interleaved rounds (default 40)")
    lat.add_argument(
        "--repeats", type=int, default=30, help="timed runs per model per round (default 30)"
    )
    lat.add_argument("--seed", type=int, default=0, help="assignment, weights and inputs")


def _soak_arguments(so: argparse.ArgumentParser) -> None:
    add_options(so, SoakPlan)
    so.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the started servers, e.g. SMARTMIXED_HEADER_TIMEOUT_S=1; repeatable",
    )
    add_options(so, SoakOptions)
    so.add_argument("--seed", type=int, default=0, help="weights and request row")


def _run(
    args: argparse.Namespace, module, measure, errors: tuple[type[Exception], ...] = ()
) -> int:
    """``measure()`` -> the bench's result, then DIR/COMMAND.json/.md/.png (``module``'s
    ``render_markdown`` and ``plot``) and the table printed. Bad options (BenchError and
    ``errors``) are one line and exit 2, no traceback, nothing written."""
    try:
        if args.out.exists() and not args.out.is_dir():
            raise BenchError(f"--out {args.out} exists and is not a folder")
        result = measure()
    except (BenchError, *errors) as e:
        print(f"smartmixed-bench: error: {e}", file=sys.stderr)
        return 2
    render = module.render_markdown
    paths = outputs.write_outputs(result, args.out, args.command, render=render, draw=module.plot)
    print(render(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _train_cost(args: argparse.Namespace) -> int:
    from smartmixed.bench import train_cost
    from smartmixed.train.distributed import DistributedError

    def measure():  # no such GPU: DistributedError; a bad --arch: SpecError
        options = call_with_options(TrainCostOptions, args)
        return train_cost.measure_train_cost(options, progress=args.progress)

    return _run(args, train_cost, measure, errors=(SpecError, DistributedError))


def _latency(args: argparse.Namespace) -> int:
    from smartmixed.bench import latency
    from smartmixed.train.artifacts import ArtifactError

    return _run(
        args,
        latency,
        lambda: call_with_options(latency.measure_latency, args),
        errors=(SpecError, ArtifactError),
    )


def _http(args: argparse.Namespace) -> int:
    from smartmixed.bench import http_bench

    def measure():  # bad options, or a server / load generator that failed: BenchError
        options = call_with_options(HttpOptions, args)
        return http_bench.measure_http(options, progress=args.progress)

    return _run(args, http_bench, measure)


def _soak(args: argparse.Namespace) -> int:
    from smartmixed.bench import soak

    def measure():  # failed scenarios are in the result; only bad options raise
        plan = call_with_options(SoakPlan, args)
        options = call_with_options(SoakOptions, args)
        return call_with_options(soak.measure_soak, args, plan=plan, options=options)

    return _run(args, soak, measure)


RUNNERS = {"train-cost": _train_cost, "latency": _latency, "http": _http, "soak": _soak}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `study ... -- TRAIN FLAGS`: everything after the first literal -- goes to every cell
    split = argv.index("--") if "--" in argv else len(argv)
    argv, train_args = argv[:split], argv[split + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "study":
        return study.run_command(args, train_args)
    if train_args:
        parser.error(f"{args.command} takes no flags after --")
    return RUNNERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
