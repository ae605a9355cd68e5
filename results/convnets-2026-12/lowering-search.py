"""Search for a faster lowering of a mixed LeNet-5: one Gemm / Conv per activation group
(no Split) against export's folded_tanh graph, and the cost of one extra ONNX Runtime node.

    smartmixed-export results/convnets-2026-12/runs/lenet5-mixed --repository /tmp/search \\
        --lowering folded_tanh --name ft
    python results/convnets-2026-12/lowering-search.py /tmp/search/ft/1/model.onnx

Prints p50 ms per variant (1 thread, interleaved rounds) and its ratio to folded_tanh.
"""

import itertools
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROUNDS = 30
REPEATS = {1: 300, 32: 30, 256: 5}


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def per_group(
    model: onnx.ModelProto, kinds: set[str], only: set[str] | None = None
) -> onnx.ModelProto:
    """Replace producer (-> MaxPool) -> Split -> activations -> Concat by one producer per group."""
    graph = model.graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant"
    }
    producer_of = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    added, dropped, tensors = [], set(), []
    for split in (n for n in graph.node if n.op_type == "Split"):
        pool, producer = None, producer_of[split.input[0]]
        if producer.op_type == "MaxPool":
            pool, producer = producer, producer_of[producer.input[0]]
        if producer.op_type not in kinds or (only is not None and producer.name not in only):
            continue
        sizes = constants.get(split.input[1], weights.get(split.input[1])).tolist()
        activations = [users[o][0] for o in split.output]
        concat = users[activations[0].output[0]][0]
        w, b = weights[producer.input[1]], weights[producer.input[2]]
        starts = np.cumsum([0, *sizes])
        outputs = []
        for k, activation in enumerate(activations):
            stem = f"{producer.name}_group{k}"
            tensors += [
                numpy_helper.from_array(w[starts[k] : starts[k + 1]].copy(), stem + "_w"),
                numpy_helper.from_array(b[starts[k] : starts[k + 1]].copy(), stem + "_b"),
            ]
            added.append(
                helper.make_node(
                    producer.op_type,
                    [producer.input[0], stem + "_w", stem + "_b"],
                    [stem],
                    name=stem,
                    **attributes(producer),
                )
            )
            if pool is not None:
                added.append(
                    helper.make_node(
                        "MaxPool", [stem], [stem + "_pool"], name=stem + "_pool", **attributes(pool)
                    )
                )
                stem += "_pool"
            added.append(
                helper.make_node(
                    activation.op_type,
                    [stem],
                    [stem + "_act"],
                    name=stem + "_act",
                    **attributes(activation),
                )
            )
            outputs.append(stem + "_act")
        added.append(
            helper.make_node(
                "Concat",
                outputs,
                list(concat.output),
                name=concat.name + "_groups",
                **attributes(concat),
            )
        )
        dropped |= {id(producer), id(split), id(concat), *map(id, activations)} | (
            {id(pool)} if pool else set()
        )

    pending = [n for n in graph.node if id(n) not in dropped] + added
    ready = {i.name for i in graph.input} | set(weights) | {t.name for t in tensors} | {""}
    ordered = []
    while pending:
        waiting = [n for n in pending if not all(i in ready for i in n.input)]
        for n in pending:
            if n not in waiting:
                ordered.append(n)
                ready |= set(n.output)
        assert len(waiting) < len(pending), "cycle"
        pending = waiting
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(ordered)
    result.graph.initializer.extend(tensors)
    onnx.checker.check_model(result)
    return result


def session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def p50_ms(sessions: dict[str, ort.InferenceSession], feed: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(ROUNDS):
        for name, s in sessions.items():
            start = time.perf_counter()
            for _ in range(repeats):
                s.run(None, feed)
            times[name].append((time.perf_counter() - start) / repeats * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def chain(length: int, op: str) -> onnx.ModelProto:
    names = ["x"] + [f"y{i}" for i in range(length)]
    body = [helper.make_node(op, [a], [b]) for a, b in itertools.pairwise(names)]
    x, y = (
        helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, 120]) for v in (names[0], names[-1])
    )
    return helper.make_model(
        helper.make_graph(body, "chain", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )


def main(path: str) -> None:
    model = onnx.load(path)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    variants = {
        "folded_tanh": model,
        "per-group Gemm": per_group(model, {"Gemm"}),
        "per-group Conv (2nd)": per_group(model, {"Conv"}, {convs[1]}),
        "per-group Conv (both)": per_group(model, {"Conv"}),
    }
    sessions = {k: session(v) for k, v in variants.items()}
    rng = np.random.default_rng(0)
    for batch, repeats in REPEATS.items():
        feed = {"input": rng.random((batch, 1, 28, 28), dtype=np.float32)}
        reference = sessions["folded_tanh"].run(None, feed)[0]
        for name, s in sessions.items():
            assert np.allclose(s.run(None, feed)[0], reference, atol=1e-5), name
        ms = p50_ms(sessions, feed, repeats)
        base = ms["folded_tanh"]
        print(
            f"batch {batch}: "
            + ", ".join(f"{k} {v:.4f} ms ({v / base:.3f}x)" for k, v in ms.items())
        )

    feed = {"x": rng.random((1, 120), dtype=np.float32)}
    for op in ("Relu", "Sigmoid", "Elu"):
        ms = p50_ms(
            {"1": session(chain(1, op), False), "41": session(chain(41, op), False)}, feed, 500
        )
        print(f"one extra {op} node on [1, 120]: {(ms['41'] - ms['1']) / 40 * 1e3:.2f} us")


if __name__ == "__main__":
    main(sys.argv[1])
