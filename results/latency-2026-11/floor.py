"""What a standard-ONNX lowering of a mixed layer costs at batch 1, by families per layer.

The paper architecture with random weights; every hidden layer's neurons are cut into k equal
blocks, block i applying the i-th of relu, sigmoid, elu, leaky_relu, selu (after export's
folds a trained layer keeps up to five such families: relu, leaky_relu, sigmoid + tanh, elu,
selu). Each form below writes that per-column choice with standard ONNX ops; every form is
checked against numpy before timing, and the one-family network (Gemm + Relu, which ONNX
Runtime fuses into one node) is the baseline. The latency target is 1.10x at batch 1.

    python results/latency-2026-11/floor.py --out results/latency-2026-11/floor   # ~3 min, 1 intra-op thread

Forms (per hidden layer; z = the layer's Gemm output; /k = k families):
  relu only       Gemm -> Relu (the baseline)
  prelu           Gemm -> PRelu(z, k): the one standard op with a per-column parameter that is
                  an activation (relu / leaky_relu / identity only; none computes a sigmoid)
  split+concat/k  Gemm -> Split -> Concat: the combiner alone, identity blocks (what the
                  permuted and folded lowerings pay before any activation)
  slice+concat/k  the same with k Slices for the Split
  split/k         Gemm -> Split -> one op per block -> Concat (the permuted / folded lowerings)
  grouped/k       one Gemm per block -> its op -> Concat (the grouped lowering)
  mask/k          every op on every column, each times its 0/1 column mask, one Sum: no Split,
                  no Concat
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ARCH = [784, 768, 512, 512, 256, 256, 128, 10]
FAMILIES = ["Relu", "Sigmoid", "Elu", "LeakyRelu", "Selu"]  # ONNX defaults: alpha 1, 0.01
FORMS = [
    "relu only",
    "prelu",
    *(f"{form}/{k}" for k in (2, 3, 5) for form in ("split+concat", "split", "grouped", "mask")),
    "slice+concat/2",
]
SELU_ALPHA, SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875


def numpy_op(op: str, z: np.ndarray) -> np.ndarray:
    if op == "Identity":
        return z
    if op == "Relu":
        return np.maximum(z, 0)
    if op == "Sigmoid":
        return 1 / (1 + np.exp(-z))
    if op == "Elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))
    if op == "LeakyRelu":
        return np.where(z >= 0, z, 0.01 * z)
    if op == "Selu":
        return SELU_GAMMA * np.where(z > 0, z, SELU_ALPHA * np.expm1(np.minimum(z, 0)))
    raise AssertionError(op)


def families(form: str) -> tuple[str, list[str]]:
    """'split/3' -> ('split', ['Relu', 'Sigmoid', 'Elu']); identity blocks for the combiners."""
    name, _, k = form.partition("/")
    if not k:
        return name, []
    ops = ["Identity"] * int(k) if name.endswith("+concat") else FAMILIES[: int(k)]
    return name, ops


def blocks(n: int, k: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def reference(form: str, weights, x: np.ndarray, slopes) -> np.ndarray:
    name, ops = families(form)
    h = x.astype(np.float64)
    for layer, (w, b) in enumerate(weights):
        z = h @ w + b
        if layer == len(weights) - 1:
            return z
        if name == "relu only":
            h = np.maximum(z, 0)
        elif name == "prelu":
            h = np.where(z >= 0, z, slopes[layer] * z)
        else:
            parts = [
                numpy_op(op, z[:, lo:hi]) for op, (lo, hi) in zip(ops, blocks(z.shape[1], len(ops)))
            ]
            h = np.concatenate(parts, 1)
    raise AssertionError


def build(form: str, weights, slopes) -> bytes:
    name, ops = families(form)
    nodes, inits = [], []

    def const(key: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, key))
        return key

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        if op == "Identity":
            return inputs[0]
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    x = "x"
    for layer, (w, b) in enumerate(weights):
        n = w.shape[1]
        if layer == len(weights) - 1:
            x = node("Gemm", [x, const(f"w{layer}", w), const(f"b{layer}", b)], "logits")
            break
        spans = blocks(n, len(ops))
        if name == "grouped":
            parts = [
                node(
                    op,
                    [
                        node(
                            "Gemm",
                            [
                                x,
                                const(f"w{layer}.{i}", w[:, lo:hi]),
                                const(f"b{layer}.{i}", b[lo:hi]),
                            ],
                            f"z{layer}.{i}",
                        )
                    ],
                    f"a{layer}.{i}",
                )
                for i, (op, (lo, hi)) in enumerate(zip(ops, spans))
            ]
            x = node("Concat", parts, f"h{layer}", axis=1)
            continue
        z = node("Gemm", [x, const(f"w{layer}", w), const(f"b{layer}", b)], f"z{layer}")
        if name == "relu only":
            x = node("Relu", [z], f"h{layer}")
        elif name == "prelu":
            x = node("PRelu", [z, const(f"k{layer}", slopes[layer])], f"h{layer}")
        elif name in ("split+concat", "split"):
            sizes = const(f"sizes{layer}", np.array([hi - lo for lo, hi in spans], np.int64))
            outs = [f"z{layer}.{i}" for i in range(len(ops))]
            nodes.append(helper.make_node("Split", [z, sizes], outs, axis=1))
            parts = [node(op, [o], f"a{layer}.{i}") for i, (op, o) in enumerate(zip(ops, outs))]
            x = node("Concat", parts, f"h{layer}", axis=1)
        elif name == "slice+concat":
            axis = const(f"axis{layer}", np.array([1], np.int64))
            parts = [
                node(
                    "Slice",
                    [
                        z,
                        const(f"s{layer}.{i}", np.array([lo], np.int64)),
                        const(f"e{layer}.{i}", np.array([hi], np.int64)),
                        axis,
                    ],
                    f"p{layer}.{i}",
                )
                for i, (lo, hi) in enumerate(spans)
            ]
            x = node("Concat", parts, f"h{layer}", axis=1)
        elif name == "mask":
            parts = []
            for i, (op, (lo, hi)) in enumerate(zip(ops, spans)):
                mask = np.zeros((1, n), np.float32)
                mask[0, lo:hi] = 1
                parts.append(
                    node(
                        "Mul",
                        [node(op, [z], f"a{layer}.{i}"), const(f"m{layer}.{i}", mask)],
                        f"am{layer}.{i}",
                    )
                )
            x = node("Sum", parts, f"h{layer}")
        else:
            raise SystemExit(f"unknown form {form!r}")
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", ARCH[0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", ARCH[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="writes floor.json and floor.md here")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    weights = [
        (
            (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32),
            (0.1 * rng.standard_normal(o)).astype(np.float32),
        )
        for i, o in itertools.pairwise(ARCH)
    ]
    slopes = [rng.choice(np.float32([0.0, 0.01, 1.0]), w.shape[1]) for w, _ in weights[:-1]]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    x = rng.uniform(-1, 1, (args.batch, ARCH[0])).astype(np.float32)
    sessions, nodes = {}, {}
    for form in FORMS:
        data = build(form, weights, slopes)
        sessions[form] = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        want = reference(form, weights, x, slopes)
        excess = np.abs(sessions[form].run(None, {"x": x})[0] - want) - (1e-5 + 1e-4 * np.abs(want))
        assert excess.max() <= 0, f"{form}: differs from its reference by {excess.max():.2e}"
        nodes[form] = len(onnx.load_from_string(data).graph.node)
    samples: dict[str, list[float]] = {f: [] for f in FORMS}
    for _ in range(args.rounds):  # interleaved: drift on a shared machine hits every form alike
        for form, session in sessions.items():
            session.run(None, {"x": x})
            start = time.perf_counter_ns()
            for _ in range(args.repeats):
                session.run(None, {"x": x})
            samples[form].append((time.perf_counter_ns() - start) / args.repeats / 1e3)
    median = {f: statistics.median(v) for f, v in samples.items()}
    rows = [
        {
            "form": f,
            "nodes": nodes[f],
            "p50_us": median[f],
            "ratio": median[f] / median["relu only"],
        }
        for f in FORMS
    ]
    meta = {
        "batch": args.batch,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "onnxruntime": ort.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "arch": ARCH,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floor.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# Mixed layers in standard ONNX ops, batch {args.batch}, 1 intra-op thread",
        "",
        f"`python results/latency-2026-11/floor.py --out {args.out}`; architecture {ARCH}, random "
        f"weights; onnxruntime {ort.__version__}; {meta['machine']}; {args.rounds} interleaved "
        f"rounds x {args.repeats} runs, median of the round means. Every form is checked "
        "against numpy (|d| <= 1e-5 + 1e-4 |ref|) before timing. /k: k activation families "
        "per hidden layer (relu, sigmoid, elu, leaky_relu, selu, in that order).",
        "",
        "| form | graph nodes | p50 us | x relu only |",
        "|---|---|---|---|",
        *(f"| {r['form']} | {r['nodes']} | {r['p50_us']:.1f} | {r['ratio']:.3f}x |" for r in rows),
        "",
    ]
    (args.out / "floor.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
