"""Prove that an ONNX graph computes what the PyTorch model computes, before anything is written.

Checks, in order: NaN or inf in the initializers; the ONNX checker (full check) and strict shape
inference; output names; then for ONNX Runtime (CPU) at ORT_ENABLE_BASIC and ORT_ENABLE_ALL, on
every input set, output shapes and numbers against the PyTorch model in eval mode. An element
passes when

    |onnx - torch| <= atol + rtol * |torch| + 2 |torch - torch64|

(numpy's allclose rule, atol 1e-5, rtol 1e-4 on float32 logits and probabilities, plus twice
PyTorch's own float32 rounding error: torch64 is the same model run in float64). The last term
is zero for well-conditioned outputs and matters only where float32 itself cannot hold 1e-4:
a conv net fed the edge set's inputs of +-1000 sums large terms that cancel, and ONNX Runtime,
accumulating in another order, may then land as far from the exact value as PyTorch does, on
the other side. A model that cannot run in float64 is checked by the first two terms alone, and
the report says so. The held-out test set must also agree on every argmax. All mismatches are
collected and raised as one VerificationError that lists the max differences per input set.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, NoReturn

import numpy as np
import onnx
import torch
from torch import nn

from smartmixed.contract import INPUT, LOGITS, PROBABILITIES
from smartmixed.contract.sessions import OPTIMIZATION_LEVELS, make_session
from smartmixed.serve.models import nonfinite_initializers

ATOL, RTOL = 1e-5, 1e-4
MAX_TEST_SAMPLES = 10_000
RANDOM_SAMPLES = 512


class VerificationError(Exception):
    """ONNX Runtime and PyTorch disagree (or the graph is invalid); carries the full report."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class SetResult:
    input_set: str
    optimization: str
    samples: int
    max_abs_diff: float
    max_rel_diff: float
    tolerance_used: float  # max of |diff| / (atol + rtol |torch|): passes when <= 1
    argmax_agreement: float
    passed: bool


def input_sets(
    shape: int | Sequence[int],
    *,
    test_x: np.ndarray | None,
    low: float,
    high: float,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """(a) held-out test samples, (b) seeded uniform inputs over [low, high], (c) edge inputs.

    ``shape``: one sample's, without the batch: D for an MLP's rows, e.g. (C, H, W) for an
    image model; every set is (N, *shape), ``test_x`` included (reshaped from (N, prod(shape))
    when it comes flat)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n_features = math.prod(shape)
    rng = np.random.default_rng(seed)
    sets = {}
    if test_x is not None and len(test_x):
        test = np.ascontiguousarray(test_x[:MAX_TEST_SAMPLES], np.float32)
        sets["test"] = test.reshape(len(test), *shape)
    sets["random"] = rng.uniform(low, high, (RANDOM_SAMPLES, n_features)).astype(np.float32)
    span = max(abs(low), abs(high), 1.0)
    edge = [
        np.zeros(n_features),
        np.full(n_features, low),
        np.full(n_features, high),
        np.where(np.arange(n_features) % 2, low, high),  # alternating extremes
        np.full(n_features, 100 * span),  # large magnitude
        np.full(n_features, -100 * span),
        rng.normal(0, 1000 * span, n_features),
    ]
    sets["edge"] = np.stack(edge).astype(np.float32)
    return {name: x.reshape(len(x), *shape) for name, x in sets.items()}


class Difference(NamedTuple):
    """One output of one input set against PyTorch: max |onnx - torch|, max relative
    difference |onnx - torch| / (|torch| + atol), the largest share of the allowance used
    (passes when <= 1), and whether it passes (finite outputs included)."""

    max_abs: float
    max_rel: float
    used: float
    passed: bool


def _compare(got: np.ndarray, want: np.ndarray, exact: np.ndarray | None) -> Difference:
    """``got`` against ``want`` by the module docstring's rule (``exact``: torch64, or None)."""
    if not got.size:
        return Difference(0.0, 0.0, 0.0, True)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    allowed = ATOL + RTOL * np.abs(want)
    if exact is not None:
        allowed = allowed + 2 * np.abs(want.astype(np.float64) - exact)
    used = float((diff / allowed).max())
    max_rel = float((diff / (np.abs(want) + ATOL)).max())
    return Difference(
        float(diff.max()), max_rel, used, used <= 1.0 and bool(np.isfinite(got).all())
    )


def _check_set(
    name: str,
    level: str,
    got: tuple[np.ndarray, np.ndarray],
    want: tuple[np.ndarray, np.ndarray],
    exact: tuple[np.ndarray | None, np.ndarray | None],
) -> tuple[SetResult, list[str]]:
    """One input set at one optimization level: its SetResult, and what fails in it, each
    output named with its differences (the test set's argmax must agree as well)."""
    compared = {
        out: _compare(g, w, e)
        for out, g, w, e in zip((LOGITS, PROBABILITIES), got, want, exact, strict=True)
    }
    failing = [
        f"{out} max abs diff {d.max_abs:.3g}, max rel diff {d.max_rel:.3g}, {d.used:.3g}x the "
        "tolerance"
        for out, d in compared.items()
        if not d.passed
    ]
    agreement = float((got[0].argmax(1) == want[0].argmax(1)).mean())
    if name == "test" and agreement < 1.0:
        failing.append(f"argmax agreement {agreement:.4f}")
    worst = [max(getattr(d, f) for d in compared.values()) for f in ("max_abs", "max_rel", "used")]
    result = SetResult(name, level, len(got[0]), *worst, agreement, not failing)
    return result, failing


def check_graph(model: onnx.ModelProto) -> None:
    """Raise on non-finite initializers, the ONNX checker (full check), strict shape inference,
    or outputs other than the contract's (nothing could be compared)."""
    if nonfinite := nonfinite_initializers(model):  # named as such, not as a mismatch
        _refuse("ONNX model: " + "; ".join(nonfinite))
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        _refuse(f"ONNX checker: {e}")
    outputs = [o.name for o in model.graph.output]
    if outputs != [LOGITS, PROBABILITIES]:
        _refuse(f"ONNX model: outputs are {outputs}, expected {[LOGITS, PROBABILITIES]}")


def _refuse(message: str) -> NoReturn:
    raise VerificationError(message, {"passed": False, "checker": message})


def torch_outputs(
    reference: nn.Module, inputs: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{input set: (logits, probabilities)} of the PyTorch model in eval mode, each (N, C)."""
    reference = reference.eval()
    expected = {}
    with torch.no_grad():
        for name, x in inputs.items():
            logits = reference(torch.from_numpy(x))
            expected[name] = (logits.numpy(), torch.softmax(logits, 1).numpy())
    return expected


def exact_outputs(
    reference: nn.Module, inputs: dict[str, np.ndarray]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]] | None, str]:
    """The same outputs from a float64 copy of the model (torch64), and what was done: None and
    the reason when the model does not run in float64 (a float32 constant of its own, say)."""
    try:
        exact = copy.deepcopy(reference).double().eval()
        with torch.no_grad():
            out = {}
            for name, x in inputs.items():
                logits = exact(torch.from_numpy(x.astype(np.float64)))
                out[name] = (logits.numpy(), torch.softmax(logits, 1).numpy())
    except Exception as e:  # any error of a user's forward in float64: reported, rule without it
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, f"the model does not run in float64 ({type(e).__name__}: {line[:200]})"
    return out, "float64 copy of the model"


def verify_against_torch(
    model: onnx.ModelProto,
    reference: nn.Module,
    inputs: dict[str, np.ndarray],
    *,
    n_classes: int,
    lowering: str | None = None,
) -> dict[str, Any]:
    """Verify ``model`` against ``reference`` on ``inputs``; return the report or raise (the
    message names ``lowering``, the candidate being checked, when given)."""
    check_graph(model)
    problems: list[str] = []
    expected = torch_outputs(reference, inputs)
    exact, exact_source = exact_outputs(reference, inputs)
    results: list[SetResult] = []
    data = model.SerializeToString()
    for level in OPTIMIZATION_LEVELS:
        session = make_session(data, device="cpu", optimization=level)
        for name, x in inputs.items():
            got_logits, got_probs = session.run([LOGITS, PROBABILITIES], {INPUT: x})
            if got_logits.shape != (len(x), n_classes) or got_probs.shape != got_logits.shape:
                problems.append(
                    f"{name} ({level}): output shapes {got_logits.shape} and {got_probs.shape}, "
                    f"expected {(len(x), n_classes)}"
                )
                continue
            exact_pair = exact[name] if exact is not None else (None, None)
            result, failing = _check_set(
                name, level, (got_logits, got_probs), expected[name], exact_pair
            )
            results.append(result)
            if failing:
                problems.append(f"{name} ({level}, {len(x)} samples): {'; '.join(failing)}")
    report = {
        "passed": not problems,
        "tolerance": {
            "atol": ATOL,
            "rtol": RTOL,
            "rule": "|onnx - torch| <= atol + rtol * |torch| + 2 |torch - torch64|"
            if exact is not None
            else "|onnx - torch| <= atol + rtol * |torch|",
            "torch64": exact_source,
        },
        "checker": "onnx.checker full_check and strict shape inference passed",
        "results": [asdict(r) for r in results],
    }
    if problems:
        which = f"the {lowering} lowering: " if lowering else ""
        raise VerificationError(
            which + "ONNX Runtime does not match PyTorch: " + "; ".join(problems), report
        )
    return report


def summarize(report: dict[str, Any]) -> str:
    """One line per input set: the worst numbers over the optimization levels."""
    lines = []
    by_set: dict[str, list[dict[str, Any]]] = {}
    for r in report["results"]:
        by_set.setdefault(r["input_set"], []).append(r)
    for name, rows in by_set.items():
        lines.append(
            f"  {name:<7} {rows[0]['samples']:>6} samples  max abs diff "
            f"{max(r['max_abs_diff'] for r in rows):.2e}  max rel diff "
            f"{max(r['max_rel_diff'] for r in rows):.2e}  tolerance used "
            f"{max(r['tolerance_used'] for r in rows):.3f}  argmax agreement "
            f"{min(r['argmax_agreement'] for r in rows):.4f}  "
            f"({', '.join(r['optimization'] for r in rows)})"
        )
    return "\n".join(lines)
