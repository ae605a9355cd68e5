"""smartmixed-bench http --protocol grpc / both and --against-mlserver: the grpc.aio generator
against a real smartmixed-serve, how points are summarised and targets evaluated, the options it
refuses, and (slow) whole runs, MLServer's when .venv-mlserver is there."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from smartmixed.bench import load, server
from smartmixed.bench.cli import main
from smartmixed.bench.http_bench import RECORD_KEYS, evaluate_targets, summarize
from smartmixed.bench.load import (
    RESULT_MARKER,
    GrpcTarget,
    LoadGeneratorError,
    check_address,
    grpc_frame,
    h2load_command,
    infer_request,
    marked_result,
    parse_h2load,
    prepare_grpc_target,
    resolve_generator,
    run_grpc,
    run_h2load,
    smartmixed_outcomes,
)
from smartmixed.bench.server import (
    ServerError,
    ServerProcess,
    build_repository,
    free_port,
    start_server,
)

# --------------------------------------------------------------------------------------------
# The generator against a real server (one per module)


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("grpc-bench")
    build_repository(root / "models", arch=[64, 32, 10], seed=0, models=["mixed"])
    args = ["--log-level", "warning"]
    with start_server(root / "models", log_path=root / "server.log", args=args, grpc=True) as s:
        yield s


def test_the_server_command_names_its_grpc_port(grpc_server: ServerProcess) -> None:
    port = grpc_server.grpc_address.rsplit(":", 1)[1]
    flag = grpc_server.command.index("--grpc-port")
    assert grpc_server.command[flag + 1] == port != "0"


def test_closed_loop_against_smartmixed_serve(grpc_server: ServerProcess) -> None:
    target = prepare_grpc_target(grpc_server.grpc_address, "mixed", seed=0)
    # [1, 64] FP32 of the seeded raw pixels the REST bench sends
    assert target.request == infer_request("mixed", "input", [1, 64], seed=0).SerializeToString()
    raw = run_grpc(target, concurrency=4, duration=0.5)
    assert raw["error_kinds"] == {} and raw["failed"] == 0
    assert raw["requests"] > 25
    assert 0.45 < raw["duration_s"] < 1.5
    assert 0 < raw["p50_ms"] <= raw["p95_ms"] <= raw["p99_ms"] <= raw["max_ms"]
    assert raw["cpu"] is not None  # the child pinned itself to one CPU


def test_failed_calls_are_counted_by_grpc_code(grpc_server: ServerProcess) -> None:
    raw = run_grpc(nope_target(grpc_server.grpc_address), concurrency=2, duration=0.3)
    assert set(raw["error_kinds"]) == {"NOT_FOUND"}
    assert raw["error_kinds"]["NOT_FOUND"] == raw["failed"] == raw["requests"] > 0


needs_h2load = pytest.mark.skipif(
    shutil.which("h2load") is None, reason="h2load is missing: make system-deps (nghttp2-client)"
)


def nope_target(address: str) -> GrpcTarget:
    """A request for a model the server does not hold: every call is answered NOT_FOUND."""
    request = infer_request("nope", "input", [1, 64], seed=0)
    return GrpcTarget("nope", address, request.SerializeToString())


@needs_h2load
def test_h2load_against_smartmixed_serve(grpc_server: ServerProcess) -> None:
    target = prepare_grpc_target(grpc_server.grpc_address, "mixed", seed=0)
    outcomes = partial(smartmixed_outcomes, f"{grpc_server.url}/metrics")
    raw = run_h2load(target, concurrency=4, duration=1, outcomes=outcomes)
    assert raw["error_kinds"] == {}
    assert raw["requests"] > 25 and raw["duration_s"] == 1
    # the server counted every call h2load completed, and those it cut at the end
    assert raw["requests"] <= raw["server_counted"]["OK"] <= raw["requests"] + 4
    assert 0 < raw["p50_ms"] <= raw["p95_ms"] <= raw["p99_ms"] <= raw["max_ms"]


@needs_h2load
def test_h2load_failed_calls_are_counted_by_the_server(grpc_server: ServerProcess) -> None:
    # HTTP status 200 every time (grpc-status travels in the trailers): only the server knows
    outcomes = partial(smartmixed_outcomes, f"{grpc_server.url}/metrics")
    raw = run_h2load(
        nope_target(grpc_server.grpc_address), concurrency=2, duration=1, outcomes=outcomes
    )
    assert set(raw["error_kinds"]) == {"NOT_FOUND"}
    assert raw["error_kinds"]["NOT_FOUND"] >= raw["requests"] > 0
    assert set(raw["server_counted"]) == {"NOT_FOUND"}


def test_h2load_missing_says_install_nghttp2_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load.shutil, "which", lambda name: None)
    with pytest.raises(LoadGeneratorError) as e:
        resolve_generator("h2load", grpc=True)
    assert str(e.value) == (
        "--grpc-generator h2load: h2load is not installed; install nghttp2-client "
        "(make system-deps), or use --grpc-generator python"
    )
    assert resolve_generator("python", grpc=True) == "python-grpc-aio"


def test_h2load_frame_command_and_output() -> None:
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    command = h2load_command(
        "127.0.0.1:9", Path("b"), Path("l"), concurrency=64, duration=5, channels=2
    )
    assert command[:9] == ["h2load", "-t", "1", "-c", "2", "-m", "32", "-D", "5"]
    assert command[-1] == "http://127.0.0.1:9/inference.GRPCInferenceService/ModelInfer"
    assert "content-type: application/grpc" in command and "te: trailers" in command
    with pytest.raises(LoadGeneratorError, match="concurrency 5 is not a multiple of 2"):
        h2load_command("127.0.0.1:9", Path("b"), Path("l"), concurrency=5, duration=1, channels=2)
    stdout = (
        "finished in 1.00s, 3.00 req/s, 1KB/s\n"
        "requests: 3 total, 5 started, 3 done, 3 succeeded, 0 failed, 0 errored, 0 timeout\n"
        "status codes: 3 2xx, 0 3xx, 0 4xx, 1 5xx\n"
    )
    log = "1\t200\t1000\n2\t200\t3000\n3\t200\t2000\n"
    raw = parse_h2load(stdout, log, 1)
    assert (raw["requests"], raw["cut"], raw["p50_ms"], raw["max_ms"]) == (3, 2, 2.0, 3.0)
    assert raw["error_kinds"] == {"http_status": 1}
    with pytest.raises(LoadGeneratorError, match="h2load printed no request summary"):
        parse_h2load("connect failed", "", 1)


def test_prepare_names_a_missing_model(grpc_server: ServerProcess) -> None:
    with pytest.raises(ServerError) as e:
        prepare_grpc_target(grpc_server.grpc_address, "nope", seed=0)
    assert str(e.value).startswith("model 'nope': gRPC ModelMetadata at 127.0.0.1:")
    assert "(NOT_FOUND: " in str(e.value)


# --------------------------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize("address", ["192.0.2.1:8001", "example.com:8001", "127.0.0.1", "x"])
def test_only_loopback_addresses_are_loaded(address: str) -> None:
    with pytest.raises(ServerError) as e:
        check_address(address)
    assert str(e.value) == f"gRPC address {address!r}: expected 127.0.0.1:PORT"


def test_the_generator_refuses_another_host_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert load.main(["192.0.2.1:8001", "1", "1", "1"]) == 2
    assert capsys.readouterr().err == (
        "python -m smartmixed.bench.load: gRPC address '192.0.2.1:8001': expected 127.0.0.1:PORT\n"
    )


def test_marked_result() -> None:
    stdout = f"noise\n{RESULT_MARKER}" + '{"requests": 3}\n'
    assert marked_result(stdout, RESULT_MARKER, "it") == {"requests": 3}
    with pytest.raises(LoadGeneratorError) as e:
        marked_result("Traceback ...", RESULT_MARKER, "it")
    assert str(e.value) == "it printed no result line; its output was: 'Traceback ...'"
    with pytest.raises(LoadGeneratorError, match=r"^it printed an unreadable result"):
        marked_result(RESULT_MARKER + "{", RESULT_MARKER, "it")


def rec(server: str, protocol: str, c: int, rps: float, p50: float, **extra: Any) -> dict:
    record = dict.fromkeys(RECORD_KEYS)
    record |= {
        "server": server,
        "model": "mixed",
        "mode": "smartmixed" if server == "smartmixed" else None,
        "batching": "on" if server == "smartmixed" else "off",
        "protocol": protocol,
        "concurrency": c,
        "round": 0,
        "duration_s": 1.0,
        "requests": int(rps),
        "rps": rps,
        "samples_per_s": rps,
        "mean_ms": p50,
        "p50_ms": p50,
        "p95_ms": p50,
        "p99_ms": p50,
        "max_ms": p50,
        "errors": 0,
        "error_kinds": {},
    }
    return record | extra


def test_summary_takes_medians_over_rounds() -> None:
    records = [
        rec("smartmixed", "grpc", 64, rps, p50, round=i, errors=e, error_kinds=k)
        for i, (rps, p50, e, k) in enumerate(
            [(2000, 30.0, 0, {}), (2600, 20.0, 1, {"UNAVAILABLE": 1}), (2400, 25.0, 0, {})]
        )
    ]
    (point,) = summarize(records)
    assert (point["rps"], point["p50_ms"], point["rounds"], point["round"]) == (2400, 25.0, 3, None)
    assert (point["requests"], point["errors"]) == (7000, 1)
    assert point["error_kinds"] == {"UNAVAILABLE": 1}


def test_ratio_targets() -> None:
    records = [
        rec("smartmixed", "rest", 1, 1000, 0.5),
        rec("smartmixed", "grpc", 1, 900, 0.6),
        rec("smartmixed", "grpc", 64, 2400, 25.0),
        rec("mlserver", "grpc", 64, 700, 80.0),
        rec("mlserver", "grpc", 1, 400, 2.0, errors=3),  # MLServer's errors are not ours
    ]
    values, met = evaluate_targets(records)
    assert values["grpc_rps_vs_mlserver_concurrency_64"] == pytest.approx(2400 / 700)
    assert met["grpc_rps_vs_mlserver_concurrency_64"] is True
    assert values["grpc_p50_vs_rest_concurrency_1"] == pytest.approx(0.6 / 0.5)
    assert met["grpc_p50_vs_rest_concurrency_1"] is False
    assert (values["errors"], met["errors"]) == (0, True)
    # REST targets read REST points only: c=64 was measured over gRPC alone
    assert values["p50_ms_concurrency_1"] == 0.5
    assert met["rps_concurrency_64_batching_on"] is None


# --------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--protocol", "grpc", "--url", "http://127.0.0.1:FREE", "--models", "m"],
            "--grpc-address",
        ),
        (["--grpc-address", "127.0.0.1:1"], "--grpc-address goes with --url"),
        (["--rounds", "0"], "rounds must be a whole number >= 1 (got 0)"),
        (["--grpc-channels", "0"], "gRPC channels must be a whole number >= 1 (got 0)"),
        (
            [
                "--protocol",
                "grpc",
                "--url",
                "http://127.0.0.1:FREE",
                "--models",
                "m",
                "--grpc-address",
                "10.0.0.1:1",
            ],
            "gRPC address '10.0.0.1:1': expected 127.0.0.1:PORT",
        ),
    ],
)
def test_bad_options_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    port = str(free_port())
    args = ["http", "--out", str(tmp_path / "out"), "--quiet"]
    args += [a.replace("FREE", port) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("smartmixed-bench: error: ") and message in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_against_mlserver_without_its_venv_says_make_mlserver(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MLSERVER_VENV", tmp_path / ".venv-mlserver")
    args = ["http", "--out", str(tmp_path / "out"), "--protocol", "grpc", "--against-mlserver"]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"smartmixed-bench: error: --against-mlserver: {tmp_path}/.venv-mlserver/bin/mlserver "
        "is missing (run make mlserver to create .venv-mlserver)\n"
    )
    assert not (tmp_path / "out").exists()


def test_mlserver_model_folder(tmp_path: Path) -> None:
    model = tmp_path / "models" / "mixed" / "3" / "model.onnx"
    (tmp_path / "srv").mkdir()
    settings = server.write_model_folder(
        tmp_path / "srv",
        model_path=model,
        name="mixed",
        input_shape=[1, 784],
        outputs=["logits", "probabilities"],
        n_classes=10,
    )
    assert json.loads((tmp_path / "srv" / "settings.json").read_text()) == settings
    assert settings["host"] == "127.0.0.1" and settings["parallel_workers"] == 0
    ports = {settings[k] for k in ("http_port", "grpc_port", "metrics_port")}
    assert len(ports) == 3 and 0 not in ports
    model_settings = json.loads((tmp_path / "srv" / "mixed" / "model-settings.json").read_text())
    assert model_settings == {
        "name": "mixed",
        "implementation": "mlserver_runtime.OnnxRuntimeModel",
        "parameters": {"uri": str(model.resolve()), "version": "3"},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        ],
    }
    runtime = tmp_path / "srv" / "mixed" / "mlserver_runtime.py"
    assert runtime.read_text() == server.RUNTIME_FILE.read_text()


# --------------------------------------------------------------------------------------------
# Whole runs (slow)


# h2load when installed (the default), else the Python generator (h2load is never a fallback)
GRPC_GENERATOR = "h2load" if shutil.which("h2load") else "python"


def run_bench(out: Path, *extra: str) -> dict[str, Any]:
    args = ["http", "--out", str(out), "--arch", "64,32,10", "--duration", "1", "--quiet"]
    args += ["--grpc-generator", GRPC_GENERATOR]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*args, *extra]) == 0
    return json.loads((out / "http.json").read_text())


@pytest.mark.slow
def test_both_protocols_side_by_side(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path, "--protocol", "both", "--concurrency", "1,4", "--batching", "on", "--warmup", "0"
    )
    points = [(r["protocol"], r["concurrency"]) for r in result["records"]]
    # each concurrency runs REST, then gRPC, for each model
    assert points == [("rest", 1), ("grpc", 1), ("rest", 4), ("grpc", 4)] * 2
    assert all(r["errors"] == 0 and r["rps"] > 0 for r in result["records"])
    assert result["config"]["grpc_channels"] == 1
    assert (
        result["grpc_generator"]
        == {"h2load": "h2load", "python": "python-grpc-aio"}[GRPC_GENERATOR]
    )
    assert result["meets_targets"]["grpc_p50_vs_rest_concurrency_1"] is not None
    assert "| 1 | smartmixed | grpc |" in (tmp_path / "http.md").read_text()


@pytest.mark.slow
def test_against_mlserver(tmp_path: Path) -> None:
    if not (server.MLSERVER_VENV / "bin" / "mlserver").is_file():
        pytest.skip(".venv-mlserver is missing: make mlserver")
    result = run_bench(
        tmp_path, "--protocol", "grpc", "--against-mlserver", "--rounds", "2", "--warmup", "0"
    )
    points = [(r["round"], r["concurrency"], r["server"]) for r in result["records"]]
    assert points == [
        (k, c, s) for k in (0, 1) for c in (1, 64) for s in ("smartmixed", "mlserver")
    ]
    assert all(r["errors"] == 0 and r["rps"] > 0 for r in result["records"])
    assert result["config"]["mlserver"]["version"] == "1.7.1"
    assert "--intra-op-threads" in result["config"]["server_commands"][0]
    assert result["target_values"]["grpc_rps_vs_mlserver_concurrency_64"] > 0
    assert "## smartmixed-serve against MLServer" in (tmp_path / "http.md").read_text()
