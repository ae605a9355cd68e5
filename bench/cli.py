"""smartmixed-bench: measure what the activation mix costs, and how the service holds up."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smartmixed.bench import BenchError, add_options, http_bench, latency, soak, train_cost
from smartmixed.contract import SpecError, call_with_options, outputs
from smartmixed.train import study
from smartmixed.train.artifacts import ArtifactError
from smartmixed.train.distributed import DistributedError

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
        "run in DIR/runs/ARCH/MODEL/seedK (with --tune-lr / --tune: DIR/runs/ARCH/MODEL/SETTING/"
        "seedK, e.g. lr1e-3_tau0.5; "
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
    add_options(tc, train_cost.TrainCostOptions)
    add_options(lat, latency.LatencyOptions)
    add_options(web, http_bench.HttpOptions)
    add_options(so, soak.SoakPlan)
    so.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the started servers, e.g. SMARTMIXED_HEADER_TIMEOUT_S=1; repeatable",
    )
    add_options(so, soak.SoakOptions)
    so.add_argument("--seed", type=int, default=0, help="weights and request row")
    study.add_arguments(st)
    for bench in parsers.values():  # last in every --help, as it always was
        bench.add_argument("--quiet", action="store_false", dest="progress", help="no progress bar")
    return p


# command -> its module, its measure function and the options dataclasses made from the flags
# for it (keyword -> class); the function's other keywords come from the flags of their name
BENCHES = {
    "train-cost": (
        train_cost,
        train_cost.measure_train_cost,
        {"options": train_cost.TrainCostOptions},
    ),
    "latency": (latency, latency.measure_latency, {"options": latency.LatencyOptions}),
    "http": (http_bench, http_bench.measure_http, {"options": http_bench.HttpOptions}),
    "soak": (soak, soak.measure_soak, {"plan": soak.SoakPlan, "options": soak.SoakOptions}),
}


def _run(args: argparse.Namespace) -> int:
    """The bench's result, then DIR/COMMAND.json/.md/.png (its module's ``render_markdown``
    and ``plot``) and the table printed. Bad options are one line and exit 2, no traceback,
    nothing written: BenchError (a server or load generator that failed too; a soak's failed
    scenarios are in its result), a bad --arch (SpecError) or run (ArtifactError), no such GPU
    (DistributedError)."""
    module, measure, options = BENCHES[args.command]
    try:
        if args.out.exists() and not args.out.is_dir():
            raise BenchError(f"--out {args.out} exists and is not a folder")
        made = {name: call_with_options(cls, args) for name, cls in options.items()}
        result = call_with_options(measure, args, **made)
    except (BenchError, SpecError, ArtifactError, DistributedError) as e:
        print(f"smartmixed-bench: error: {e}", file=sys.stderr)
        return 2
    render = module.render_markdown
    paths = outputs.write_outputs(result, args.out, args.command, render=render, draw=module.plot)
    print(render(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


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
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
