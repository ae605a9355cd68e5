"""Search for a faster lowering of a mixed LeNet-5: one Gemm / Conv per activation group
(no Split) against export's folded_tanh graph, and the cost of one extra ONNX Runtime node.

    smartmixed-export results/convnets-2026-12/runs/lenet5-mixed --repository /tmp/search \
        --lowering folded_tanh --name ft
    python results/convnets-2026-12/lowering-search.py /tmp/search/ft/1/model.onnx

Prints p50 ms per variant (1 thread, interleaved rounds) and its ratio to folded_tanh.
"""
import sys, time, numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper

src = sys.argv[1]
m = onnx.load(src)
g = m.graph
inits = {i.name: i for i in g.initializer}
nodes = list(g.node)
by_out = {o: n for n in nodes for o in n.output}
consts = {n.output[0]: n for n in nodes if n.op_type == "Constant"}

def const_value(name):
    if name in inits: return numpy_helper.to_array(inits[name])
    return numpy_helper.to_array(consts[name].attribute[0].t)

def rewrite(kinds, only=None):
    new_nodes, drop, extra_inits = [], set(), []
    users = {}
    for n in nodes:
        for i in n.input: users.setdefault(i, []).append(n)
    for n in nodes:
        if n.op_type != "Split": continue
        prod = by_out[n.input[0]]
        pool = None
        if prod.op_type == "MaxPool":
            pool, prod = prod, by_out[prod.input[0]]
        if prod.op_type not in kinds: continue
        if only is not None and prod.name not in only: continue
        sizes = const_value(n.input[1]).tolist()
        acts = [users[o][0] for o in n.output]
        concat = users[acts[0].output[0]][0]
        W = numpy_helper.to_array(inits[prod.input[1]]); B = numpy_helper.to_array(inits[prod.input[2]])
        start = 0
        outs = []
        for k, (s, a) in enumerate(zip(sizes, acts)):
            wn, bn = f"{prod.name}_w{k}", f"{prod.name}_b{k}"
            extra_inits += [numpy_helper.from_array(W[start:start+s].copy(), wn), numpy_helper.from_array(B[start:start+s].copy(), bn)]
            o1 = f"{prod.name}_g{k}"
            attrs = {a_.name: helper.get_attribute_value(a_) for a_ in prod.attribute}
            new_nodes.append(helper.make_node(prod.op_type, [prod.input[0], wn, bn], [o1], name=o1, **attrs))
            if pool is not None:
                pattrs = {a_.name: helper.get_attribute_value(a_) for a_ in pool.attribute}
                new_nodes.append(helper.make_node("MaxPool", [o1], [o1 + "_p"], name=o1 + "_p", **pattrs)); o1 = o1 + "_p"
            o2 = f"{o1}_act"
            aattrs = {a_.name: helper.get_attribute_value(a_) for a_ in a.attribute}
            new_nodes.append(helper.make_node(a.op_type, [o1], [o2], name=o2, **aattrs))
            outs.append(o2); start += s
        drop |= {id(prod), id(n), id(concat), *map(id, acts)} | ({id(pool)} if pool is not None else set())
        new_nodes.append(helper.make_node("Concat", outs, list(concat.output), name=concat.name + "_pg", axis=helper.get_attribute_value(concat.attribute[0])))
        # place: we rebuild ordering by topological sort below
    keep = [n for n in nodes if id(n) not in drop] + new_nodes
    # topo sort
    avail = {i.name for i in g.input} | set(inits) | {i.name for i in extra_inits} | {""}
    order, pending = [], keep
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input): order.append(n); avail |= set(n.output)
            else: rest.append(n)
        assert len(rest) < len(pending); pending = rest
    m2 = onnx.ModelProto(); m2.CopyFrom(m)
    del m2.graph.node[:]; m2.graph.node.extend(order); m2.graph.initializer.extend(extra_inits)
    onnx.checker.check_model(m2)
    return m2

convs = [n.name for n in nodes if n.op_type == "Conv"]
variants = {"folded_tanh": m, "pergroup_gemm": rewrite({"Gemm"}), "pergroup_conv2": rewrite({"Conv"}, {convs[1]}), "pergroup_conv_all": rewrite({"Conv"}), "pergroup_all": rewrite({"Conv", "Gemm"})}
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
sess = {k: ort.InferenceSession(v.SerializeToString(), so, providers=["CPUExecutionProvider"]) for k, v in variants.items()}
rng = np.random.default_rng(0)
for b in (1, 32, 256):
    x = rng.random((b, 1, 28, 28), dtype=np.float32)
    ref = sess["folded_tanh"].run(None, {"input": x})[0]
    for k, s in sess.items():
        assert np.allclose(s.run(None, {"input": x})[0], ref, atol=1e-5), k
    times = {k: [] for k in sess}
    reps = {1: 300, 32: 30, 256: 5}[b]
    for r in range(30):
        for k, s in sess.items():
            t = time.perf_counter()
            for _ in range(reps): s.run(None, {"input": x})
            times[k].append((time.perf_counter() - t) / reps * 1e3)
    base = np.median(times["folded_tanh"])
    print(b, {k: f"{np.median(v):.4f} ({np.median(v)/base:.3f}x)" for k, v in times.items()})


def chain(n, op):
    from onnx import TensorProto
    names = ["x"] + [f"y{i}" for i in range(n)]
    body = [helper.make_node(op, [a], [b]) for a, b in zip(names, names[1:])]
    io = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, 120]) for v in (names[0], names[-1])]
    model = helper.make_model(helper.make_graph(body, "chain", io[:1], io[1:]), opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

x = rng.random((1, 120), dtype=np.float32)
for op in ("Relu", "Sigmoid", "Elu"):
    short, long = chain(1, op), chain(41, op)
    times = {1: [], 41: []}
    for r in range(30):
        for k, s in ((1, short), (41, long)):
            t = time.perf_counter()
            for _ in range(500): s.run(None, {"x": x})
            times[k].append((time.perf_counter() - t) / 500 * 1e6)
    print(f"one extra {op} node on [1, 120]: {(np.median(times[41]) - np.median(times[1])) / 40:.2f} us")
