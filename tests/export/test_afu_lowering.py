"""Every lowering lowers a learned activation unit (afu) group with standard ops,
verified against PyTorch like every other activation; int8 keeps the unit in float32."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from export_checks import assert_verified

from smartmixed.contract import ModelSpec
from smartmixed.contract.sessions import make_session
from smartmixed.export.lower import LOWERINGS, is_afu_node, lower, lowering_summary
from smartmixed.export.quantize import quantize_int8
from smartmixed.export.verify import input_sets, verify_against_torch
from smartmixed.train.model import MixedMLP

POOL = ["relu", "sigmoid", "tanh", "leaky_relu", "afu"]


def afu_spec(assignment: list[list[str]], pool: list[str], afu: dict) -> ModelSpec:
    arch = [8, *(len(layer) for layer in assignment), 3]
    return ModelSpec(
        arch=arch,
        pool=pool,
        mode="fixed:afu" if pool == ["afu"] else "smartmixed",
        assignment=assignment,
        preprocessing={"offset": 0.5, "scale": 2.0},
        input_shape=[8],
        labels=["a", "b", "c"],
        afu=afu,
    )


def trained_like(spec: ModelSpec, seed: int) -> MixedMLP:
    """Seeded weights, AFU parameters moved far from their init (G != relu)."""
    torch.manual_seed(seed)
    model = MixedMLP.from_spec(spec).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("afus."):
                p.add_(torch.randn_like(p))
    return model


MIXED = [
    ["afu", "relu", "tanh", "afu", "sigmoid", "leaky_relu", "afu"],  # afu beside a fold family
    ["afu", "afu", "afu", "afu"],  # one group: Gemm -> unit
    ["tanh", "afu", "sigmoid", "relu", "leaky_relu"],
]


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize(
    "afu",
    [
        {"units": 8, "base": "relu", "share": "layer"},
        {"units": 3, "base": "tanh", "share": "network"},
        {"units": 1, "base": "sigmoid", "share": "layer"},
    ],
    ids=["relu8-layer", "tanh3-network", "sigmoid1-layer"],
)
def test_every_lowering_verifies_an_afu_group(lowering: str, opset: int, afu: dict) -> None:
    spec = afu_spec(MIXED, POOL, afu)
    model = trained_like(spec, seed=opset)
    state = {k: v.numpy() for k, v in model.canonical_state_dict().items()}
    onnx_model = lower(spec, state, lowering=lowering, opset=opset)
    inputs = input_sets(8, test_x=None, low=-3.0, high=3.0, seed=opset)
    report = verify_against_torch(onnx_model, model, inputs, n_classes=3)
    assert_verified(report, onnx_model, model, inputs)
    ops = {n.op_type for n in onnx_model.graph.node}
    assert {"Reshape", "Gemm", "Shape"} <= ops
    groups = lowering_summary(onnx_model, spec, lowering=lowering)["layers"]
    assert [g["name"] for g in groups[1]["groups"]] == ["afu"]
    # one unit per hidden layer, with that layer's parameters
    w0 = [i for i in onnx_model.graph.initializer if i.name.endswith("afu/w0")]
    assert len(w0) == 3


def test_fixed_afu_lowers_to_gemm_and_the_unit() -> None:
    spec = afu_spec([["afu"] * 6, ["afu"] * 4], ["afu"], {"units": 4})
    model = trained_like(spec, seed=1)
    state = {k: v.numpy() for k, v in model.canonical_state_dict().items()}
    onnx_model = lower(spec, state, lowering="permuted")
    layer0 = [n.op_type for n in onnx_model.graph.node if n.name.startswith("layer0/")]
    assert layer0 == ["Gemm", "Reshape", "Gemm", "Relu", "Gemm", "Shape", "Reshape"]
    inputs = input_sets(8, test_x=None, low=-3.0, high=3.0, seed=1)
    report = verify_against_torch(onnx_model, model, inputs, n_classes=3)
    assert_verified(report, onnx_model, model, inputs)


def test_int8_keeps_the_unit_in_float32() -> None:
    spec = afu_spec(MIXED, POOL, {"units": 8})
    model = trained_like(spec, seed=2)
    state = {k: v.numpy() for k, v in model.canonical_state_dict().items()}
    quantized = quantize_int8(lower(spec, state, lowering="permuted"))
    units = [n for n in quantized.graph.node if is_afu_node(n.name)]
    # ORT's pre-processing splits each Gemm into MatMul + Add; both stay float32
    sums = [n.op_type for n in units if "/afu/sum" in n.name]
    assert sums.count("MatMul") == 3  # one unit per layer
    assert not any("Integer" in n.op_type or "Quant" in n.op_type for n in units)
    assert "MatMulInteger" in {n.op_type for n in quantized.graph.node}  # the layers are int8
    x = np.random.default_rng(0).uniform(-3, 3, (64, 8)).astype(np.float32)
    got = make_session(quantized.SerializeToString()).run(["logits"], {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.isfinite(got).all()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    onnx.checker.check_model(quantized)


def test_exported_entry_carries_the_unit(tmp_path, digits) -> None:
    """A real run with afu in the pool: the entry's metadata spec names afu in the pool, the
    mix and its settings (what the server's model metadata shows), export.json its groups."""
    from smartmixed.contract import META_SPEC, MODEL_FILE, REPORT_FILE
    from smartmixed.export.repository import export_run
    from smartmixed.train.loop import TrainConfig, train_run

    config = TrainConfig(
        arch=[64, 12, 10], pool=["relu", "afu"], p1_epochs=1, p2_epochs=1, lr=3e-3, afu_units=2
    )
    train_run(config=config, dataset=digits, out=tmp_path / "run", progress=False)
    result = export_run(
        run_dir=tmp_path / "run", repository=tmp_path / "models", lowering="grouped"
    )
    meta = {p.key: p.value for p in onnx.load(str(result.entry / "1" / MODEL_FILE)).metadata_props}
    spec = ModelSpec.from_dict(json.loads(meta[META_SPEC]))
    assert spec.afu == {"units": 2, "base": "relu", "share": "layer"}
    assert spec.pool == ["relu", "afu"]
    report = json.loads((result.entry / "1" / REPORT_FILE).read_text())
    groups = report["structure"]["grouped"]["layers"][0]["groups"]
    assert sum(g["rows"] for g in groups) == 12
    assert max(r["tolerance_used"] for r in report["verification"]["results"]) <= 1
