"""What the export tests share: an MLP spec for the lowerings, and what a passing verification
must mean, checked here rather than read from its report."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from smartmixed.contract import INPUT, LOGITS, PROBABILITIES, ModelSpec
from smartmixed.contract.sessions import OPTIMIZATION_LEVELS, make_session
from smartmixed.export.verify import ATOL, RTOL


def mlp_spec(arch: list[int], pool: list[str], assignment: list[list[str]], **extra) -> ModelSpec:
    """A SmartMixed MLP spec whose preprocessing does something, (x - 0.5) * 2."""
    return ModelSpec(
        arch=arch,
        pool=pool,
        mode="smartmixed",
        assignment=assignment,
        preprocessing={"offset": 0.5, "scale": 2.0},
        input_shape=[arch[0]],
        labels=[str(i) for i in range(arch[-1])],
        **extra,
    )


def assert_verified(
    report: dict[str, Any],
    model: onnx.ModelProto,
    reference: nn.Module,
    inputs: dict[str, np.ndarray],
) -> None:
    """``report`` covers every input set at every ONNX Runtime optimization level within the
    tolerance, and ONNX Runtime's logits and probabilities of ``model`` are PyTorch's within
    |onnx - torch| <= atol + rtol |torch| + 2 |torch - torch64|, computed here."""
    levels = set(OPTIMIZATION_LEVELS)
    assert {(r["input_set"], r["optimization"]) for r in report["results"]} == {
        (name, level) for name in inputs for level in levels
    }
    assert max(r["tolerance_used"] for r in report["results"]) <= 1.0
    session = make_session(model.SerializeToString())
    exact = copy.deepcopy(reference).double().eval()
    with torch.no_grad():
        for x in inputs.values():
            logits = reference.eval()(torch.from_numpy(x))
            logits64 = exact(torch.from_numpy(x.astype(np.float64)))
            wanted = {LOGITS: logits, PROBABILITIES: torch.softmax(logits, 1)}
            wanted64 = {LOGITS: logits64, PROBABILITIES: torch.softmax(logits64, 1)}
            got = dict(zip((LOGITS, PROBABILITIES), session.run(None, {INPUT: x}), strict=True))
            for out, want in wanted.items():
                want, want64 = want.numpy().astype(np.float64), wanted64[out].numpy()
                allowed = ATOL + RTOL * np.abs(want) + 2 * np.abs(want - want64)
                assert (np.abs(got[out] - want) <= allowed).all(), out
