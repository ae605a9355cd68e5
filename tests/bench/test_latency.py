from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from smartmixed.bench import BenchError
from smartmixed.bench.cli import main
from smartmixed.bench.latency import (
    RECORD_KEYS,
    LatencyOptions,
    feature_elements,
    fixed_conv_network,
    layer_counts,
    measure_latency,
    parse_mix,
    random_assignment,
)
from smartmixed.contract import layered_arch, resolve_conv_preset
from smartmixed.export import autotune
from smartmixed.export.autotune import AUTO_BATCHES
from smartmixed.export.lower import LOWERINGS
from smartmixed.nn.pool import DEFAULT_POOL
from smartmixed.train.artifacts import load_model, save_model
from smartmixed.train.model import MixedConvNet, MixedMLP, ModelSpec


# auto's timer in the quick tests (the conv bench, slow, times for real): grouped is the fastest
# fp32 graph, permuted the fastest int8 one, so the bench's picks are known
def fixed_timer(candidates, shape, *, batches=AUTO_BATCHES, **_):
    int8 = all(b"DynamicQuantizeLinear" in graph for graph in candidates.values())
    fastest = "permuted" if int8 else "grouped"
    return {n: {b: b * (1.0 if n == fastest else 2.0) for b in batches} for n in candidates}


@pytest.fixture(autouse=True)
def _fixed_auto_timer(request: pytest.FixtureRequest, monkeypatch) -> None:
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setattr(autotune, "time_lowerings", fixed_timer)


ARCH = "64,48,32,10"
# exact on both hidden layers (48 -> 24/12/12, 32 -> 16/8/8), so the shares are known by hand
MIX = {"relu": 0.5, "tanh": 0.25, "selu": 0.25}
BATCHES, THREADS = (1, 8), (1,)


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("latency")
    mix = ",".join(f"{k}={v}" for k, v in MIX.items())
    args = [
        "latency",
        "--out",
        str(out),
        "--arch",
        ARCH,
        "--mix",
        mix,
        "--batches",
        "1,8",
        "--threads",
        "1",
        "--rounds",
        "2",
        "--repeats",
        "4",
        "--quiet",
    ]
    # capsys is per test; the bench runs once per module and its stdout is captured here
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.MonkeyPatch.context() as patch:
        patch.setattr(autotune, "time_lowerings", fixed_timer)
        assert main(args) == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def result(bench_out: tuple[Path, str]) -> dict[str, Any]:
    return json.loads((bench_out[0] / "latency.json").read_text())


def find(result: dict[str, Any], model: str, runtime: str, lowering: str, batch: int) -> dict:
    (record,) = [
        r
        for r in result["records"]
        if (r["model"], r["runtime"], r["lowering"], r["batch"], r["threads"])
        == (model, runtime, lowering, batch, 1)
    ]
    return record


def test_json_has_the_documented_keys(result: dict[str, Any]) -> None:
    assert {"config", "machine", "mix", "auto", "records", "targets", "meets_targets"} <= set(
        result
    )
    assert result["config"]["arch"] == [64, 48, 32, 10]
    assert result["config"]["batches"] == list(BATCHES)
    assert result["config"]["timed_runs_per_cell"] == 8
    assert "onnxruntime" in result["machine"]
    for key in ("auto", "auto_int8"):  # per thread count, as `smartmixed-export --threads t`
        assert set(result[key]) == {str(t) for t in THREADS}
        for info in result[key].values():
            assert info["chosen"] in LOWERINGS and set(info["median_ms"]) == set(LOWERINGS)
    for record in result["records"]:
        assert tuple(record) == RECORD_KEYS


def test_one_record_per_model_lowering_batch_threads(result: dict[str, Any]) -> None:
    keys = [
        (r["model"], r["runtime"], r["lowering"], r["batch"], r["threads"])
        for r in result["records"]
    ]
    assert len(keys) == len(set(keys))
    expected = (
        {(a, "onnxruntime", "fixed") for a in DEFAULT_POOL}
        | {("mixed", "onnxruntime", lw) for lw in (*LOWERINGS, "auto")}
        | {("mixed", "onnxruntime", lw + "+int8") for lw in (*LOWERINGS, "auto")}
        | {("relu", "onnxruntime", "fixed+int8")}
        | {("relu", "torch", "eager"), ("mixed", "torch", "eager")}
    )
    assert {(m, rt, lw, b, t) for m, rt, lw in expected for b in BATCHES for t in THREADS} == set(
        keys
    )


def test_ratios(result: dict[str, Any]) -> None:
    for r in result["records"]:
        assert r["p50_ms"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["samples_per_s"] == pytest.approx(r["batch"] * 1e3 / r["p50_ms"])
        assert r["ratio_vs_relu"] > 0
        mixed_ort = r["model"] == "mixed" and r["runtime"] == "onnxruntime"
        int8 = r["lowering"].endswith("+int8")
        assert (r["ratio_vs_ideal"] is not None) == (mixed_ort and not int8)
        if int8:  # against the fp32 fixed-ReLU network
            relu = find(result, "relu", "onnxruntime", "fixed", r["batch"])
            assert r["ratio_vs_relu"] == pytest.approx(r["p50_ms"] / relu["p50_ms"])
        if mixed_ort and not int8:
            assert r["ratio_vs_ideal"] > 0
    for b in BATCHES:
        assert find(result, "relu", "onnxruntime", "fixed", b)["ratio_vs_relu"] == 1.0
        assert find(result, "relu", "torch", "eager", b)["ratio_vs_relu"] == 1.0
        torch_mixed = find(result, "mixed", "torch", "eager", b)
        torch_relu = find(result, "relu", "torch", "eager", b)
        assert torch_mixed["ratio_vs_relu"] == pytest.approx(
            torch_mixed["p50_ms"] / torch_relu["p50_ms"]
        )


def test_ideal_mix_is_the_share_weighted_fixed_latency(result: dict[str, Any]) -> None:
    assert result["mix"] == pytest.approx(MIX)
    for b in BATCHES:
        ideal = sum(
            share * find(result, act, "onnxruntime", "fixed", b)["p50_ms"]
            for act, share in MIX.items()
        )
        for lw in (*LOWERINGS, "auto"):
            r = find(result, "mixed", "onnxruntime", lw, b)
            assert r["ratio_vs_ideal"] == pytest.approx(r["p50_ms"] / ideal)


def test_auto_is_exports_choice_on_the_same_timings(result: dict[str, Any]) -> None:
    """The bench asks export's choose_lowering, which decides on fixed_timer's timings."""
    (t,) = THREADS
    auto, auto_int8 = result["auto"][str(t)], result["auto_int8"][str(t)]
    assert (auto["chosen"], auto_int8["chosen"]) == ("grouped", "permuted")
    assert auto["median_ms"]["scatter"] == {"1": 2.0, "32": 64.0, "256": 512.0}
    assert tuple(auto) == ("chosen", "criterion", "median_ms", "score_ms", "threads", "batches")
    assert (auto["threads"], auto["batches"]) == (t, list(AUTO_BATCHES))


def test_auto_records_copy_the_chosen_lowering(result: dict[str, Any]) -> None:
    (t,) = THREADS
    chosen, chosen_int8 = result["auto"][str(t)]["chosen"], result["auto_int8"][str(t)]["chosen"]
    for b in BATCHES:
        auto = find(result, "mixed", "onnxruntime", "auto", b)
        assert {**auto, "lowering": chosen} == find(result, "mixed", "onnxruntime", chosen, b)
        auto = find(result, "mixed", "onnxruntime", "auto+int8", b)
        assert {**auto, "lowering": chosen_int8 + "+int8"} == find(
            result, "mixed", "onnxruntime", chosen_int8 + "+int8", b
        )


def test_targets_are_reported_for_measured_cells_only(result: dict[str, Any]) -> None:
    # batch 32 and 256 were not timed: only the batch-1 targets are evaluated
    assert set(result["meets_targets"]) == {
        "auto_vs_ideal_batch1_threads1",
        "int8_mixed_vs_relu_batch1_threads1",
    }
    assert all(isinstance(v, bool) for v in result["meets_targets"].values())
    assert set(result["targets"]) == {
        f"{kind}_batch{b}_threads1"
        for kind in ("auto_vs_ideal", "int8_mixed_vs_relu")
        for b in (1, 32, 256)
    }


def test_md_png_written_and_table_printed(bench_out: tuple[Path, str]) -> None:
    out, stdout = bench_out
    md = (out / "latency.md").read_text()
    for row in (
        "| mixed scatter |",
        "| mixed permuted |",
        "| mixed grouped |",
        "| ideal mix |",
        "| fixed relu |",
        "| fixed selu |",
        "| torch eager mixed |",
        "| mixed permuted int8 |",
        "| fixed relu int8 |",
    ):
        assert row in md
    assert "| model / lowering | b=1 t=1 | b=8 t=1 |" in md
    assert md in stdout
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_latency_options_are_checked_when_made() -> None:
    with pytest.raises(BenchError, match=r"rounds x repeats >= 2 for percentiles \(got 1 x 1\)"):
        LatencyOptions(rounds=1, repeats=1)
    with pytest.raises(BenchError, match="give either a trained run or a mix, not both"):
        LatencyOptions(run="runs/x", mix="relu=1")
    options = LatencyOptions(
        mix="relu=0.75,tanh=0.25,elu=0", batches="32,1,32", rounds=1, repeats=2
    )
    assert (options.mix, options.batches) == ({"relu": 0.75, "tanh": 0.25}, [1, 32])
    assert options.requested == options.mix
    assert LatencyOptions().requested == {a: 1 / 6 for a in DEFAULT_POOL}
    assert LatencyOptions(run="runs/x").requested is None


def test_random_assignment_holds_the_rounded_shares() -> None:
    mix = parse_mix("relu=0.4,selu=0.3,elu=0.3")
    layers = random_assignment([10, 7, 48], mix, seed=3)
    assert [Counter(layer) for layer in layers] == [
        {"relu": 4, "selu": 3, "elu": 3},
        {"relu": 3, "selu": 2, "elu": 2},  # 2.8, 2.1, 2.1: the largest remainder gets the rest
        {"relu": 19, "selu": 15, "elu": 14},  # 19.2, 14.4, 14.4: tie goes to the first listed
    ]
    assert layers == random_assignment([10, 7, 48], mix, seed=3)
    assert layers != random_assignment([10, 7, 48], mix, seed=4)
    uniform = {a: 1 / 6 for a in DEFAULT_POOL}
    assert sum(layer_counts(7, uniform).values()) == 7
    assert set(layer_counts(48, uniform).values()) == {8}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo=1", "unknown activation"),
        ("relu=0.5,tanh=0.2", "sum to 0.7"),
        ("relu=1.5,tanh=-0.5", ">= 0"),
        ("relu", "NAME=SHARE"),
        ("relu=x", "not a number"),
        ("relu=0.5,relu=0.5", "more than once"),
    ],
)
def test_bad_mix_is_rejected(text: str, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        parse_mix(text)


def test_mix_shares_are_normalised() -> None:
    assert parse_mix("relu=0.333,tanh=0.333,elu=0.333") == pytest.approx(
        {"relu": 1 / 3, "tanh": 1 / 3, "elu": 1 / 3}
    )
    assert parse_mix({"relu": 1.0, "tanh": 0.0}) == {"relu": 1.0}


@pytest.mark.parametrize(
    "args",
    [
        ["--mix", "relu=0.5,bogus=0.5"],
        ["--mix", "relu=0.5,tanh=0.3"],
        ["--arch", "1,2"],
        ["--arch", "64,x,10"],
        ["--run", "runs/definitely-not-here"],
        ["--batches", "1,0"],
        ["--threads", "two"],
    ],
)
def test_bad_options_exit_2_without_traceback(tmp_path: Path, capsys, args: list[str]) -> None:
    assert main(["latency", "--out", str(tmp_path / "out"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smartmixed-bench: error: ")
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # failed before anything was measured or written


def test_run_and_mix_are_exclusive(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["latency", "--out", str(tmp_path), "--run", "runs/x", "--mix", "relu=1"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_trained_run_supplies_arch_assignment_and_weights(tmp_path: Path) -> None:
    arch, hidden = [16, 12, 6, 3], [12, 6]
    assignment = [["relu"] * 9 + ["gelu"] * 3, ["tanh"] * 6]  # gelu: not a default activation
    spec = ModelSpec(
        arch=arch,
        pool=["relu", "tanh", "gelu"],
        mode="smartmixed",
        assignment=assignment,
        preprocessing={"offset": 0.0, "scale": 1 / 255},
        input_shape=[16],
        labels=["a", "b", "c"],
    )
    assert [len(layer) for layer in assignment] == hidden
    save_model(tmp_path / "run", spec, MixedMLP.from_spec(spec).canonical_state_dict())
    state = torch.random.get_rng_state()
    options = LatencyOptions(run=tmp_path / "run", batches=(2,), threads=(1,), rounds=1, repeats=2)
    result = measure_latency(options, progress=False)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone
    assert result["config"]["arch"] == arch
    assert result["mix"] == pytest.approx({"relu": 0.5, "tanh": 1 / 3, "gelu": 1 / 6})
    # a fixed gelu network joins the six, since the ideal mix needs it
    assert result["config"]["fixed_models"] == [*DEFAULT_POOL, "gelu"]
    assert len(result["records"]) == 7 + (len(LOWERINGS) + 1) * 2 + 1 + 2
    assert result["meets_targets"] == {}


def test_afu_in_the_mix_times_fixed_afu() -> None:
    """afu is a mix entry like any other; its fixed network joins the fixed six."""
    options = LatencyOptions(
        arch=[16, 8, 4, 3],
        mix="relu=0.75,afu=0.25",
        batches=(2,),
        threads=(1,),
        rounds=1,
        repeats=2,
    )
    result = measure_latency(options, progress=False)
    assert result["mix"] == pytest.approx({"relu": 0.75, "afu": 0.25})
    assert result["config"]["fixed_models"] == [*DEFAULT_POOL, "afu"]
    assert result["config"]["pool"][-1] == "afu"
    (fixed_afu,) = [r for r in result["records"] if r["model"] == "afu"]
    assert fixed_afu["lowering"] == "fixed" and fixed_afu["p50_ms"] > 0


# --------------------------------------------------------------------------------------------
# Conv nets: a preset with a random assignment, a trained (layered) run

CONV_MIX = {"relu": 0.5, "tanh": 0.25, "selu": 0.25}
CONV_LOWERINGS = ("scatter", "permuted", "folded", "folded_tanh")
# CONV_MIX has no sigmoid and one of relu/leaky_relu/identity: folded merges nothing, auto times
CONV_TIMED = ("scatter", "permuted")
# lenet5's hidden layers: conv 6 channels of 28x28, conv 16 of 10x10, linear 120, linear 84.
# layer_counts of CONV_MIX: 6 -> relu 3, tanh 2, selu 1 (1.5 and 1.5: the tie goes to tanh),
# 16 -> 8/4/4, 120 -> 60/30/30, 84 -> 42/21/21. Activation elements per sample (6,508 in all):
# relu 3*784 + 8*100 + 60 + 42 = 3254, tanh 2*784 + 4*100 + 30 + 21 = 2019,
# selu 784 + 4*100 + 30 + 21 = 1235; features (226): relu 113, tanh 57, selu 56.
LENET5_ELEMENT_SHARES = {"relu": 3254 / 6508, "tanh": 2019 / 6508, "selu": 1235 / 6508}
LENET5_FEATURE_SHARES = {"relu": 113 / 226, "tanh": 57 / 226, "selu": 56 / 226}
# a tiny layered run: (1, 8, 8) -> conv 4 (4, 8, 8) -> bn -> pool (4, 4, 4) -> 64 -> 6 -> 3
# (written with every default, as the spec stores them)
TINY_LAYERS = [
    {"type": "conv", "channels": 4, "kernel": 3, "stride": 1, "padding": 1},
    {"type": "batchnorm"},
    {"type": "maxpool", "kernel": 2, "stride": 2},
    {"type": "flatten"},
    {"type": "linear", "features": 6},
    {"type": "linear", "features": 3},
]
# gelu: not a default activation; the channels interleave, so permuted has work to do
TINY_ASSIGNMENT = [["gelu", "relu", "gelu", "relu"], ["relu"] * 3 + ["tanh"] * 3]


# the whole conv bench (export's auto timed for the mixed net and every fixed one, ~20 s):
# .ci/run's slow part; the quick suite keeps the conv run, weights and refusals below
SLOW_CONV_BENCH = pytest.mark.slow


@pytest.fixture(scope="module")
def conv_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("latency-conv")
    mix = ",".join(f"{k}={v}" for k, v in CONV_MIX.items())
    args = ["latency", "--out", str(out), "--preset", "lenet5", "--mix", mix]
    args += ["--batches", "1,8", "--threads", "1", "--rounds", "2", "--repeats", "2", "--quiet"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def conv_result(conv_bench: tuple[Path, str]) -> dict[str, Any]:
    return json.loads((conv_bench[0] / "latency.json").read_text())


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec.untrained(
        layers=TINY_LAYERS,
        input_shape=[1, 8, 8],
        pool=["relu", "tanh", "gelu"],
        assignment=TINY_ASSIGNMENT,
    )
    run = tmp_path_factory.mktemp("runs") / "conv"
    torch.manual_seed(1)
    save_model(run, spec, MixedConvNet.from_spec(spec).canonical_state_dict())
    return run


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec.untrained(arch=[16, 8, 3], pool=["relu", "tanh"], assignment=[["relu"] * 8])
    run = tmp_path_factory.mktemp("runs") / "mlp"
    save_model(run, spec, MixedMLP.from_spec(spec).canonical_state_dict())
    return run


@SLOW_CONV_BENCH
def test_conv_json_has_the_conv_records(conv_result: dict[str, Any]) -> None:
    c = conv_result["config"]
    assert (c["network"], c["preset"], c["input_shape"]) == ("conv", "lenet5", [1, 28, 28])
    assert c["layers"] == resolve_conv_preset("lenet5")
    assert c["arch"] == [784, 6, 16, 120, 84, 10]
    assert c["lowerings"] == list(CONV_LOWERINGS) and c["int8"] is False
    assert c["fixed_models"] == list(DEFAULT_POOL)
    assert len(c["folds"]) == 4 and all(": permuted (through " in f for f in c["folds"])
    info = conv_result["auto"]["1"]
    assert info["chosen"] in CONV_TIMED and set(info["median_ms"]) == set(CONV_TIMED)
    assert conv_result["auto_int8"] == {}  # export quantizes no conv net
    keys = [
        (r["model"], r["runtime"], r["lowering"], r["batch"], r["threads"])
        for r in conv_result["records"]
    ]
    expected = (
        {(a, "onnxruntime", "fixed") for a in DEFAULT_POOL}
        | {("mixed", "onnxruntime", lw) for lw in (*CONV_LOWERINGS, "auto")}
        | {("relu", "torch", "eager"), ("mixed", "torch", "eager")}
    )
    assert sorted(keys) == sorted((m, rt, lw, b, 1) for m, rt, lw in expected for b in BATCHES)
    for record in conv_result["records"]:
        assert tuple(record) == RECORD_KEYS
        assert record["p50_ms"] > 0 and record["p50_ms"] <= record["p95_ms"] <= record["p99_ms"]
    for b in BATCHES:
        auto = find(conv_result, "mixed", "onnxruntime", "auto", b)
        assert {**auto, "lowering": info["chosen"]} == find(
            conv_result, "mixed", "onnxruntime", info["chosen"], b
        )


@SLOW_CONV_BENCH
def test_conv_ideal_mix_weighs_activation_elements(conv_result: dict[str, Any]) -> None:
    assert conv_result["mix"] == pytest.approx(LENET5_ELEMENT_SHARES)
    assert conv_result["mix_features"] == pytest.approx(LENET5_FEATURE_SHARES)
    for b in BATCHES:
        ideal = sum(
            share * find(conv_result, act, "onnxruntime", "fixed", b)["p50_ms"]
            for act, share in LENET5_ELEMENT_SHARES.items()
        )
        relu = find(conv_result, "relu", "onnxruntime", "fixed", b)["p50_ms"]
        for lw in (*CONV_LOWERINGS, "auto"):
            r = find(conv_result, "mixed", "onnxruntime", lw, b)
            assert r["ratio_vs_ideal"] == pytest.approx(r["p50_ms"] / ideal)
            assert r["ratio_vs_relu"] == pytest.approx(r["p50_ms"] / relu)
        for act in DEFAULT_POOL:
            assert find(conv_result, act, "onnxruntime", "fixed", b)["ratio_vs_ideal"] is None
    ratio_b1 = find(conv_result, "mixed", "onnxruntime", "auto", 1)["ratio_vs_ideal"]
    assert conv_result["target_ratios"] == {"auto_vs_ideal_batch1_threads1": ratio_b1}
    assert conv_result["meets_targets"] == {"auto_vs_ideal_batch1_threads1": ratio_b1 <= 1.10}
    assert conv_result["targets"] == {
        "auto_vs_ideal_batch1_threads1": 1.10,
        "auto_vs_ideal_batch32_threads1": 1.05,
        "auto_vs_ideal_batch256_threads1": 1.05,
    }


@SLOW_CONV_BENCH
def test_conv_md_png_written_and_table_printed(conv_bench: tuple[Path, str]) -> None:
    out, stdout = conv_bench
    md = (out / "latency.md").read_text()
    assert (
        "Conv net lenet5 (conv 6 k5 p2 -> maxpool 2 -> conv 16 k5 -> maxpool 2 -> flatten -> "
        "linear 120 -> linear 84 -> linear 10, input 1x28x28; arch [784, 6, 16, 120, 84, 10])"
    ) in md
    rows = ("| mixed scatter |", "| mixed permuted |", "| mixed folded |", "| mixed folded_tanh |")
    for row in (*rows, "| ideal mix |", "| fixed selu |"):
        assert row in md
    assert "| torch eager mixed |" in md and "int8" not in md and "| mixed grouped |" not in md
    assert md in stdout
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_feature_elements_count_h_times_w_per_channel() -> None:
    def spec(**network: Any) -> ModelSpec:
        arch = network.get("arch") or layered_arch(network["layers"], network["input_shape"])
        return ModelSpec.untrained(
            **network, pool=["relu"], assignment=[["relu"] * w for w in arch[1:-1]]
        )

    lenet5 = spec(layers=resolve_conv_preset("lenet5"), input_shape=[1, 28, 28])
    assert feature_elements(lenet5) == [28 * 28, 10 * 10, 1, 1]  # where each activation applies
    convnet = spec(layers=resolve_conv_preset("convnet"), input_shape=[1, 28, 28])
    assert feature_elements(convnet) == [28 * 28, 28 * 28, 14 * 14, 14 * 14, 1]
    assert feature_elements(spec(arch=[64, 48, 32, 10])) == [1, 1]


def test_conv_run_supplies_layers_assignment_and_weights(conv_run: Path) -> None:
    options = LatencyOptions(run=conv_run, batches=(2,), threads=(1,), rounds=1, repeats=2)
    result = measure_latency(options, progress=False)
    c = result["config"]
    assert (c["network"], c["run"], c["preset"]) == ("conv", str(conv_run), None)
    assert (c["layers"], c["input_shape"], c["arch"]) == (TINY_LAYERS, [1, 8, 8], [64, 4, 6, 3])
    # elements: gelu 2 channels x 8x8 = 128, relu 2 x 64 + 3 = 131, tanh 3 (262 in all)
    assert result["mix"] == pytest.approx({"relu": 131 / 262, "tanh": 3 / 262, "gelu": 128 / 262})
    assert result["mix_features"] == pytest.approx({"relu": 0.5, "tanh": 0.3, "gelu": 0.2})
    assert c["fixed_models"] == [*DEFAULT_POOL, "gelu"]
    assert len(result["records"]) == 7 + len(CONV_LOWERINGS) + 1 + 2
    assert result["meets_targets"] == {}


def test_fixed_conv_networks_hold_the_mixed_weights(conv_run: Path) -> None:
    _, mixed = load_model(conv_run)
    fixed = fixed_conv_network(mixed, "tanh")
    assert [layer.names() for layer in fixed.activations] == [["tanh"] * 4, ["tanh"] * 6]
    state, own = mixed.canonical_state_dict(), fixed.canonical_state_dict()
    assert own.keys() == state.keys()
    assert all(torch.equal(own[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--preset", "lenet5", "--arch", "64,32,10"],
            "give either an architecture (an MLP) or a conv preset, not both",
        ),
        (
            ["--preset", "paper"],
            "preset 'paper': expected a conv preset, one of lenet5, convnet (an MLP's layer "
            "widths go in the architecture)",
        ),
        (
            ["--run", "{conv}", "--arch", "64,4,6,3"],
            "{conv} is a layered (conv) network; an architecture (layer widths) describes an "
            "MLP: leave it out",
        ),
        (
            ["--run", "{conv}", "--preset", "lenet5"],
            "preset 'lenet5' does not match the layers of {conv}; leave the preset out to use "
            "the run's",
        ),
        (
            ["--run", "{mlp}", "--preset", "lenet5"],
            "preset 'lenet5' is a conv net; {mlp} is an MLP",
        ),
    ],
)
def test_bad_conv_combinations_exit_2_in_one_line(
    tmp_path: Path, capsys, conv_run: Path, mlp_run: Path, args: list[str], message: str
) -> None:
    runs = {"conv": conv_run, "mlp": mlp_run}
    args = [a.format(**runs) for a in args]
    assert main(["latency", "--out", str(tmp_path / "out"), "--quiet", *args]) == 2
    assert capsys.readouterr().err == f"smartmixed-bench: error: {message.format(**runs)}\n"
    assert not (tmp_path / "out").exists()
