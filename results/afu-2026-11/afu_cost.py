"""How the learned activation unit's extra ONNX Runtime cost compares with N elementwise passes.

Reads a `smartmixed-bench latency` result (run with `--mix relu=0.75,afu=0.25 --threads 1`),
then times, in interleaved rounds with 1 intra-op thread, chains of 1 and 9 elementwise Add
nodes over a float32 [batch, H] tensor, H = all hidden neurons of the bench's architecture.
One elementwise pass over the hidden neurons costs (p50(9 Adds) - p50(1 Add)) / 8 (the session
overhead cancels). The unit's extra cost is p50(fixed afu) - p50(fixed relu) from the bench;
divided by one pass it gives the unit's cost in passes, to set against N.

    .venv/bin/python results/afu-2026-11/afu_cost.py BENCH_DIR/latency.json > results/afu-2026-11/afu-cost.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from smartmixed.contract.sessions import make_session
from smartmixed.export.timing import time_session

ROUNDS, REPEATS = 30, 30


def add_chain(width: int, n: int) -> bytes:
    one = numpy_helper.from_array(np.full(width, 1e-3, np.float32), "c")
    nodes, x = [], "input"
    for i in range(n):
        nodes.append(helper.make_node("Add", [x, "c"], [f"a{i}"], name=f"add{i}"))
        x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["out"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", width])],
        initializer=[one],
    )
    opset = [helper.make_opsetid("", 17)]
    model = helper.make_model(graph, opset_imports=opset, ir_version=8)
    return model.SerializeToString()


def main(path: str) -> None:
    result = json.loads(Path(path).read_text())
    arch, batches = result["config"]["arch"], result["config"]["batches"]
    hidden = sum(arch[1:-1])
    sessions = {n: make_session(add_chain(hidden, n), threads=1) for n in (1, 9)}
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, hidden)).astype(np.float32) for b in batches}
    times = {(n, b): [] for n in sessions for b in batches}
    for r in range(ROUNDS):
        for b in batches:
            for n in (1, 9) if r % 2 else (9, 1):
                times[(n, b)] += time_session(sessions[n], inputs[b], repeats=REPEATS, warmup=2)

    def p50(model: str, lowering: str, b: int) -> float:
        (rec,) = [
            r
            for r in result["records"]
            if (r["model"], r["runtime"], r["lowering"], r["batch"], r["threads"])
            == (model, "onnxruntime", lowering, b, 1)
        ]
        return rec["p50_ms"]

    units = 8  # the bench's unit: N = 8 (pool.afu_init's default)
    print(f"Architecture {arch}: {hidden} hidden neurons; N = {units}; 1 intra-op thread.")
    print()
    print(
        "| batch | fixed relu p50 ms | fixed afu p50 ms | afu / relu | extra ms | one pass ms "
        "| extra in passes | 25% afu mix (auto) / ideal | mix / fixed relu |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b in batches:
        one = (statistics.median(times[(9, b)]) - statistics.median(times[(1, b)])) / 8
        relu, afu = p50("relu", "fixed", b), p50("afu", "fixed", b)
        (auto,) = [
            r
            for r in result["records"]
            if (r["model"], r["lowering"], r["batch"], r["threads"]) == ("mixed", "auto", b, 1)
        ]
        print(
            f"| {b} | {relu:.3f} | {afu:.3f} | {afu / relu:.2f}x | {afu - relu:.3f} | {one:.4f} "
            f"| {(afu - relu) / one:.1f} | {auto['ratio_vs_ideal']:.2f}x | "
            f"{auto['ratio_vs_relu']:.2f}x |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
