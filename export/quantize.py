"""INT8: ONNX Runtime's dynamic quantization of a verified fp32 lowering, verified on its own rule.

Quantization (``quantize_int8``). ONNX Runtime's recommended pre-processing first
(``quant_pre_process``: symbolic shape inference and ORT's basic graph optimizations), then
``quantize_dynamic``: every Gemm / MatMul weight matrix W (n_out, n_in) is stored as int8 with a
float scale, per tensor or per output channel,
    W ~ scale * W_q,   W_q = round(W / scale) in [-127, 127],
and every activation entering such a product is quantized to uint8 at run time, per batch
(DynamicQuantizeLinear: scale and zero point from that batch's min and max). The graph's input
and outputs stay float32 and keep their names and shapes, so config.pbtxt and serving are the
fp32 ones. Nothing else is quantized: activations, Split/Concat, the preprocessing Mul and the
softmax run in float32.

Weight type: int8 weights with uint8 activations (U8S8; ``quantize_dynamic``'s default) is the
form MLAS runs fastest on x86-64. Measured on this project's MNIST mix (784-768-512-512-256-256-
128-10, permuted lowering, ORT 1.32, 1 thread, AMD EPYC with AVX-512 VNNI), U8U8 (``quint8``)
weights took 2x the time of U8S8 at batch 32 and 256 (0.75x against 0.38x of the fp32 ReLU
model) and 1.1x at batch 1. On x86-64 without VNNI, U8S8 may saturate (VPMADDUBSW's 16-bit
sums); ORT's remedy is reduce_range or U8U8. The verification below catches such an accuracy
loss, it is not assumed away.

Per channel or per tensor: both are built and verified, timed at batch 1 and 256 on one thread,
and the faster one that passes is kept (``quantize_verified``); both timings are recorded.

Verification (``verify_quantized``). INT8 cannot meet the fp32 rule |onnx - torch| <= 1e-5 +
1e-4 |torch|, so a quantized graph is judged on what a user sees: ONNX Runtime (CPU, at
ORT_ENABLE_BASIC and ORT_ENABLE_ALL, the worst level counting) against the fp32 PyTorch model on
the run's held-out test set,
    agreement     = mean(argmax int8 == argmax torch)                  >= min_agreement (0.99)
    accuracy drop = 100 * (accuracy torch - accuracy int8), in points  <= max_accuracy_drop (0.5)
and every output finite with the right shape on the test, random and edge input sets. The max
|probability difference| on each set is recorded, not thresholded: on the edge set (inputs 100x
and 1000x outside the data range) it measures how far int8 strays where no data lives. The fp32
graph the int8 one is quantized from has passed the fp32 rule first.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from smartmixed.contract import INPUT, LOGITS, PROBABILITIES
from smartmixed.contract.sessions import OPTIMIZATION_LEVELS, make_session
from smartmixed.export.autotune import Timing, fastest
from smartmixed.export.lower import is_afu_node
from smartmixed.export.verify import VerificationError, check_graph, torch_outputs

WEIGHT_TYPES = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
WEIGHT_TYPE = "qint8"  # U8S8: see the module docstring
DEFAULT_MIN_AGREEMENT = 0.99  # argmax agreement with the fp32 PyTorch model
DEFAULT_MAX_ACCURACY_DROP = 0.5  # test accuracy points
GRANULARITIES = {"per_tensor": False, "per_channel": True}  # name -> quantize_dynamic per_channel
TIMING_BATCHES = (1, 256)
TIMING_THREADS = 1


def quantize_int8(
    model: onnx.ModelProto,
    *,
    per_channel: bool = False,
    weight_type: str = WEIGHT_TYPE,
    work_dir: Path | str | None = None,
) -> onnx.ModelProto:
    """ONNX Runtime's pre-processing and dynamic quantization of an fp32 ``model``.

    ``model`` is not modified; the result keeps its metadata_props (export replaces them).
    Intermediate files live in a temporary folder (in ``work_dir``, default the system's) that
    is removed on return; quant_pre_process makes one more of its own in the system's.
    """
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="smartmixed-int8.") as tmp:
        fp32, pre, int8 = (Path(tmp) / f for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32.write_bytes(model.SerializeToString())
        quant_pre_process(fp32, pre)
        # the learned units stay float32: they are activations, their (N, 1) and
        # (1, N) products are too small to gain from int8, and 8-bit w0, w1 would bend G
        afu_nodes = [node.name for node in onnx.load(str(pre)).graph.node if is_afu_node(node.name)]
        quantize_dynamic(
            pre,
            int8,
            per_channel=per_channel,
            weight_type=WEIGHT_TYPES[weight_type],
            nodes_to_exclude=afu_nodes,
        )
        quantized = onnx.load(str(int8))
    _drop_unused_opsets(quantized)
    return quantized


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    """ORT's optimizer saves every domain it knows in opset_import (com.microsoft.nchwc,
    org.pytorch.aten, ...); keep the default domain and those the nodes use."""
    used = {"", *(node.domain for node in model.graph.node)}
    kept = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _run_in_batches(
    session: ort.InferenceSession, x: np.ndarray, *, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of ``x`` (N, D), run ``batch`` rows at a time, each (N, C)."""
    parts = [
        session.run([LOGITS, PROBABILITIES], {INPUT: x[i : i + batch]})
        for i in range(0, len(x), batch)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@dataclass(frozen=True)
class Int8Rule:
    """How an int8 graph is judged (module docstring): against the fp32 PyTorch ``reference``
    on the input sets, ``inputs["test"]`` of classes ``test_labels``, within the thresholds."""

    reference: nn.Module
    inputs: dict[str, np.ndarray]
    test_labels: np.ndarray
    n_classes: int
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP


def _int8_rows(
    model: onnx.ModelProto,
    rule: Int8Rule,
    expected: dict[str, tuple[np.ndarray, np.ndarray]],
    problems: list[str],
) -> list[dict[str, Any]]:
    """One row per ORT optimization level, input set and batching: the int8 ``model``'s
    outputs against the fp32 PyTorch ones (``expected``); wrong shapes and non-finite outputs
    are added to ``problems``."""
    rows = []
    data = model.SerializeToString()
    for level in OPTIMIZATION_LEVELS:
        session = make_session(data, device="cpu", optimization=level)
        for name, x in rule.inputs.items():
            # DynamicQuantizeLinear takes its scale from the whole batch, so a row's output
            # depends on its neighbours: the test set also runs row by row, as a REST client
            # sending one sample sees it
            for batch in (len(x), 1) if name == "test" else (len(x),):
                where = f"{name} ({level}, batch {batch})"
                logits, probs = _run_in_batches(session, x, batch=batch)
                if logits.shape != (len(x), rule.n_classes) or probs.shape != logits.shape:
                    problems.append(
                        f"{where}: output shapes {logits.shape} and {probs.shape}, expected "
                        f"{(len(x), rule.n_classes)}"
                    )
                    continue
                if not (np.isfinite(logits).all() and np.isfinite(probs).all()):
                    problems.append(f"{where}: non-finite outputs")
                want_logits, want_probs = expected[name]
                predicted = logits.argmax(1)
                accuracy = float((predicted == rule.test_labels).mean()) if name == "test" else None
                rows.append(
                    {
                        "input_set": name,
                        "optimization": level,
                        "batch": batch,
                        "samples": len(x),
                        "max_probability_difference": float(np.abs(probs - want_probs).max()),
                        "max_logit_difference": float(np.abs(logits - want_logits).max()),
                        "argmax_agreement": float((predicted == want_logits.argmax(1)).mean()),
                        "accuracy": accuracy,
                    }
                )
    return rows


def verify_quantized(model: onnx.ModelProto, rule: Int8Rule) -> dict[str, Any]:
    """Judge an int8 ``model`` by ``rule``; return the report or raise one VerificationError
    carrying it."""
    inputs, test_labels = rule.inputs, rule.test_labels
    min_agreement, max_accuracy_drop = rule.min_agreement, rule.max_accuracy_drop
    check_graph(model)
    problems: list[str] = []
    expected = torch_outputs(rule.reference, inputs)
    fp32_correct = int((expected["test"][0].argmax(1) == test_labels).sum())
    n_test = len(test_labels)
    rows = _int8_rows(model, rule, expected, problems)
    test_rows = [r for r in rows if r["input_set"] == "test"]
    agreement = min((r["argmax_agreement"] for r in test_rows), default=0.0)
    int8_correct = min((round(r["accuracy"] * n_test) for r in test_rows), default=0)
    drop = 100 * (fp32_correct - int8_correct) / n_test
    report = {
        "passed": False,
        "rule": "argmax agreement with the fp32 PyTorch model on the test set >= min_agreement "
        "and test accuracy drop (points) <= max_accuracy_drop_points, at every ORT "
        "optimization level, the test set run as one batch and row by row; finite outputs "
        "on every input set",
        "thresholds": {
            "min_agreement": min_agreement,
            "max_accuracy_drop_points": max_accuracy_drop,
        },
        "test_samples": n_test,
        "fp32_accuracy": fp32_correct / n_test,
        "int8_accuracy": int8_correct / n_test,
        "agreement": agreement,
        "accuracy_drop_points": drop,
        "max_probability_difference": {
            name: max(r["max_probability_difference"] for r in rows if r["input_set"] == name)
            for name in inputs
            if any(r["input_set"] == name for r in rows)
        },
        "results": rows,
    }
    if not agreement >= min_agreement:  # `not >=`: a NaN threshold fails too
        problems.append(f"argmax agreement {agreement:.4f} < {min_agreement:g} required")
    if not drop <= max_accuracy_drop:
        problems.append(f"test accuracy drop {drop:.2f} points > {max_accuracy_drop:g} allowed")
    report["passed"] = not problems
    if problems:
        figures = (
            f"agreement {agreement:.4f}, min {min_agreement:g}; test accuracy "
            f"{100 * report['int8_accuracy']:.2f}% against fp32 "
            f"{100 * report['fp32_accuracy']:.2f}%, drop {drop:.2f} points, max "
            f"{max_accuracy_drop:g}; {n_test} test samples"
        )
        raise VerificationError(f"{', '.join(problems)} ({figures})", report)
    return report


def quantize_verified(
    model: onnx.ModelProto, rule: Int8Rule, *, weight_type: str = WEIGHT_TYPE
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize the verified fp32 ``model`` per tensor and per channel, verify both by ``rule``,
    time both (and ``model``) at batch 1 and 256 on one thread, and keep the faster one that
    passes.

    Returns (int8 model, the ``quantization`` block of export.json); raises a VerificationError
    listing the figures of both when neither passes.
    """
    candidates, reports, failures = {}, {}, []
    for granularity, per_channel in GRANULARITIES.items():
        candidates[granularity] = quantize_int8(
            model, per_channel=per_channel, weight_type=weight_type
        )
        try:
            reports[granularity] = verify_quantized(candidates[granularity], rule)
        except VerificationError as e:
            reports[granularity] = e.report
            failures.append(f"{granularity.replace('_', '-')}: {e}")
    if len(failures) == len(candidates):
        raise VerificationError("int8 model: " + "; ".join(failures), reports)

    serialized = {name: m.SerializeToString() for name, m in candidates.items()}
    _, selection = fastest(  # the scores of every model timed, fp32 included
        {"fp32": model.SerializeToString(), **serialized},
        rule.inputs["test"].shape[1],
        Timing(threads=TIMING_THREADS, batches=TIMING_BATCHES),
    )
    passing = [name for name in candidates if reports[name]["passed"]]
    chosen = min(passing, key=lambda name: selection["score_ms"][name])
    selection.update(chosen=chosen, device="cpu", threads=TIMING_THREADS)
    block = {
        "method": "onnxruntime.quantization: quant_pre_process, then quantize_dynamic",
        "weight_type": weight_type,
        "activations": "quint8, quantized per batch at run time (DynamicQuantizeLinear)",
        "per_channel": GRANULARITIES[chosen],
        **reports[chosen],
        "candidates": {
            name: {k: r.get(k) for k in ("passed", "agreement", "accuracy_drop_points")}
            for name, r in reports.items()
        },
        "timings": selection,
    }
    return candidates[chosen], block


def summarize_quantization(report: dict[str, Any]) -> str:
    """Two lines: the test-set figures against their thresholds, and the probability gaps."""
    thresholds = report["thresholds"]
    gaps = ", ".join(f"{s} {d:.2e}" for s, d in report["max_probability_difference"].items())
    return (
        f"  argmax agreement {report['agreement']:.4f} (min {thresholds['min_agreement']:g})  "
        f"test accuracy {100 * report['int8_accuracy']:.2f}% against fp32 "
        f"{100 * report['fp32_accuracy']:.2f}% (drop {report['accuracy_drop_points']:.2f} "
        f"points, max {thresholds['max_accuracy_drop_points']:g}) on "
        f"{report['test_samples']} test samples\n"
        f"  max |probability difference|: {gaps}"
    )
