"""smartmixed-bench http: a tiny architecture, 1 s points, both load generators."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from smartmixed.bench import load
from smartmixed.bench.cli import main
from smartmixed.bench.http_bench import RECORD_KEYS, evaluate_targets
from smartmixed.bench.load import (
    WRK_MARKER,
    LoadGeneratorError,
    lua_long_string,
    parse_wrk_output,
    write_wrk_script,
)
from smartmixed.bench.server import free_port

ARCH = "64,32,10"
CONCURRENCY = [1, 4]
HAS_WRK = shutil.which("wrk") is not None


def run_bench(out: Path, *extra: str) -> str:
    args = [
        "http",
        "--out",
        str(out),
        "--arch",
        ARCH,
        "--duration",
        "1",
        "--concurrency",
        "1,4",
        "--quiet",
        *extra,
    ]
    # capsys is per test; the bench runs once per module fixture and its stdout is kept here
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def wrk_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not HAS_WRK:
        pytest.skip("wrk is not installed")
    out = tmp_path_factory.mktemp("http-wrk")
    stdout = run_bench(out, "--load-generator", "wrk")
    assert "## mixed" in stdout and "## Targets" in stdout
    for suffix in ("json", "md", "png"):
        assert (out / f"http.{suffix}").stat().st_size > 0
    return json.loads((out / "http.json").read_text())


@pytest.fixture(scope="module")
def python_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("http-python")
    # one server and one model keep this point cheap; the wrk run covers the full matrix
    run_bench(
        out, "--load-generator", "python", "--batching", "off", "--models", "mixed", "--warmup", "0"
    )
    return json.loads((out / "http.json").read_text())


def check_records(result: dict[str, Any], models: list[str], batching: list[str]) -> None:
    assert {"config", "machine", "load_generator", "records", "targets", "meets_targets"} <= set(
        result
    )
    assert result["config"]["arch"] == [64, 32, 10]
    assert result["config"]["concurrency"] == CONCURRENCY
    points = [(r["model"], r["batching"], r["concurrency"]) for r in result["records"]]
    assert sorted(points) == sorted(
        (m, b, c) for m in models for b in batching for c in CONCURRENCY
    )
    for record in result["records"]:
        assert tuple(record) == RECORD_KEYS
        assert record["errors"] == 0, record
        assert record["rps"] > 0 and record["requests"] > 0
        assert record["samples_per_s"] == record["rps"]  # one sample per request
        assert 0 < record["p50_ms"] <= record["p95_ms"] <= record["p99_ms"] <= record["max_ms"]
        assert record["mode"] == ("smartmixed" if record["model"] == "mixed" else "fixed:relu")
    # c=1 is measured, c=64 is not: the c=1 target is evaluated, the c=64 ones are not
    assert result["meets_targets"]["errors"] is True
    assert result["meets_targets"]["rps_concurrency_64_batching_on"] is None


@pytest.mark.slow
def test_wrk_records(wrk_result: dict[str, Any]) -> None:
    assert wrk_result["load_generator"] == "wrk"
    assert wrk_result["config"]["load_generator_threads"] == 1
    assert wrk_result["config"]["wrk_version"].startswith("wrk")
    check_records(wrk_result, ["mixed", "fixed-relu"], ["on", "off"])
    # batching on merges the 4 concurrent requests; batching off runs one row at a time
    off = [r for r in wrk_result["records"] if r["batching"] == "off"]
    assert all(r["mean_batch_rows"] == 1.0 for r in off)
    assert any("--max-batch-size" in cmd for cmd in wrk_result["config"]["server_commands"])


@pytest.mark.slow
def test_python_records(python_result: dict[str, Any]) -> None:
    assert python_result["load_generator"] == "python-httpx"
    check_records(python_result, ["mixed"], ["off"])
    assert python_result["meets_targets"]["p50_ms_concurrency_1"] is None  # needs batching on


def test_parse_wrk_output() -> None:
    stdout = (
        "Running 1s test @ http://127.0.0.1:1/v2/models/mixed/infer\n"
        "  1 threads and 4 connections\n"
        f'{WRK_MARKER}{{"requests":1500,"duration_us":1002000,"bytes":300000,"connect":0,'
        '"read":1,"write":0,"status":2,"timeout":0,"p50_us":650.0,"p95_us":900.0,'
        '"p99_us":1500.5,"mean_us":700.0,"max_us":9000.0}\n'
        "Requests/sec:   1497.00\n"
    )
    raw = parse_wrk_output(stdout)
    assert raw["requests"] == 1500
    assert raw["duration_s"] == pytest.approx(1.002)
    assert raw["p50_ms"] == pytest.approx(0.65)
    assert raw["p99_ms"] == pytest.approx(1.5005)
    assert raw["error_kinds"] == {"connect": 0, "read": 1, "write": 0, "status": 2, "timeout": 0}
    with pytest.raises(LoadGeneratorError, match="wrk printed no result line"):
        parse_wrk_output("Running 1s test\nunable to connect\n")


def test_wrk_script_holds_the_body_verbatim(tmp_path: Path) -> None:
    body = b'{"inputs":[{"name":"input","data":[[1]],"odd":"]]"}]}'
    script = write_wrk_script(tmp_path / "post.lua", body).read_text()
    assert 'wrk.method = "POST"' in script and "function done(summary, latency, requests)" in script
    assert f"wrk.body = {lua_long_string(body.decode())}" in script
    assert lua_long_string("a]]b]=]c") == "[==[a]]b]=]c]==]"


def test_targets_are_evaluated_on_the_mixed_model() -> None:
    def rec(model: str, mode: str, batching: str, c: int, rps: float, p50: float, p99: float):
        record = dict.fromkeys(RECORD_KEYS)
        return record | {
            "server": "smartmixed",
            "model": model,
            "mode": mode,
            "batching": batching,
            "protocol": "rest",
            "concurrency": c,
            "round": 0,
            "duration_s": 1.0,
            "requests": int(rps),
            "rps": rps,
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": p99,
            "errors": 0,
            "error_kinds": {},
        }

    records = [
        rec("mixed", "smartmixed", "on", 1, 900, 1.2, 2.0),
        rec("mixed", "smartmixed", "on", 64, 1400, 30.0, 90.0),
        rec("fixed-relu", "fixed:relu", "on", 64, 9000, 1.0, 500.0),  # not a target model
    ]
    values, met = evaluate_targets(records)
    assert met == {
        "p50_ms_concurrency_1": True,
        "rps_concurrency_64_batching_on": False,
        "p99_ms_concurrency_64_batching_on": True,
        "errors": True,
        # REST only: the gRPC and MLServer ratios were not measured
        "grpc_rps_vs_mlserver_concurrency_64": None,
        "grpc_p50_vs_rest_concurrency_1": None,
    }
    assert values["rps_concurrency_64_batching_on"] == 1400


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--concurrency", "1,x"], "concurrency"),
        (["--concurrency", "0"], "concurrency"),
        (["--duration", "0"], "duration"),
        (["--batching", "maybe"], "batching"),
        (["--models", "nope"], "nope"),
        (["--arch", "64"], "--arch"),
        (["--url", "http://192.0.2.1:8000"], "only a server on this machine"),
        (["--url", "http://127.0.0.1:FREE", "--models", "mixed"], "not reachable"),
        (["--url", "http://127.0.0.1:FREE"], "--models"),
        (["--repository", "TMP/none"], "--repository TMP/none is not a folder"),
        (["--repository", "TMP"], "--repository TMP: no model(s) (none); it holds nothing"),
    ],
)
def test_bad_options_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    port = str(free_port())  # nothing listens there
    args = ["http", "--out", str(tmp_path / "out"), "--quiet"]
    args += [a.replace("FREE", port).replace("TMP", str(tmp_path)) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("smartmixed-bench: error: ")
    assert message.replace("TMP", str(tmp_path)) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_wrk_requested_but_missing_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(load.shutil, "which", lambda name: None)
    assert main(["http", "--out", str(tmp_path), "--load-generator", "wrk", "--quiet"]) == 2
    assert "wrk is not installed" in capsys.readouterr().err


def test_auto_load_generator_is_python_without_wrk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load.shutil, "which", lambda name: None)
    assert load.resolve_generator("auto") == "python-httpx"
    with pytest.raises(LoadGeneratorError, match="'nope': expected one of auto, wrk, python"):
        load.resolve_generator("nope")
