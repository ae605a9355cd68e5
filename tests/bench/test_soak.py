"""smartmixed-bench soak: every scenario once with tiny durations and counts (about 20 s).

The numbers are checked for being measured, not for meeting the targets: the suite reports
targets, and the service it measures is hardened elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from smartmixed.bench.cli import main
from smartmixed.bench.server import free_port
from smartmixed.bench.soak import parse_scenarios, parse_server_env
from smartmixed.bench.soak_clients import Attempt, CutResponse, NoResponse, read_reply
from smartmixed.bench.soak_scenarios import (
    SCENARIOS,
    TARGETS,
    classify_sigterm,
    evaluate,
    rss_halves,
)
from smartmixed.bench.soak_server import SoakError

HAS_WRK = shutil.which("wrk") is not None
TINY = [
    "--arch",
    "64,32,10",
    "--soak-duration",
    "2",
    "--soak-concurrency",
    "4",
    "--overload-duration",
    "2",
    "--overload-concurrency",
    "64",
    "--client-timeout",
    "5",
    "--slow-clients",
    "20",
    "--slow-duration",
    "3.5",
    "--slow-interval",
    "0.5",
    "--header-mb",
    "2",
    "--header-limit",
    "10",
    "--sigterm-concurrency",
    "4",
    "--sigterm-after",
    "1",
    "--drain-limit",
    "10",
    "--server-env",
    "SMARTMIXED_HEADER_TIMEOUT_S=1",
    "--quiet",
]
ENTRY_KEYS = {
    "status",
    "error",
    "config",
    "server",
    "measured",
    "targets",
    "meets_target",
    "series",
    "elapsed_s",
}


def run_cli(args: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(args)
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("soak")
    code, stdout = run_cli(["soak", "--out", str(out), *TINY])
    assert code == 0
    assert "## soak" in stdout and "## sigterm" in stdout
    for suffix in ("json", "md", "png"):
        assert (out / f"soak.{suffix}").stat().st_size > 0
    return json.loads((out / "soak.json").read_text())


@pytest.mark.slow
def test_structure(result: dict[str, Any]) -> None:
    assert {
        "config",
        "server_command",
        "server_command_shell",
        "machine",
        "scenarios",
        "summary",
        "elapsed_s",
    } <= set(result)
    assert list(result["scenarios"]) == list(SCENARIOS)
    assert result["config"]["server_env"]["SMARTMIXED_HEADER_TIMEOUT_S"] == "1"
    assert result["config"]["server_settings"]["header_timeout_s"] == 1.0
    assert result["server_command"][1:3] == ["-m", "smartmixed.serve"]
    assert result["server_command_shell"].startswith("SMARTMIXED_HEADER_TIMEOUT_S=1 ")
    assert result["machine"]["cpu_count"] >= 1 and "onnxruntime" in result["machine"]
    for name, entry in result["scenarios"].items():
        assert set(entry) == ENTRY_KEYS
        assert entry["status"] == "ok", (name, entry["error"], entry["server"].get("log_tail"))
        assert set(entry["meets_target"]) == set(TARGETS[name])
        assert all(v in (True, False) for v in entry["meets_target"].values()), entry
        assert set(TARGETS[name]) <= set(entry["measured"])
        assert entry["server"]["pid"] > 0
        assert result["summary"][name]["of"] == len(TARGETS[name])
    assert result["scenarios"]["slow"]["server"]["nofile"] == 1024
    assert "ulimit -n 1024 && " in result["scenarios"]["slow"]["server"]["command_shell"]


@pytest.mark.slow
def test_soak_measured(result: dict[str, Any]) -> None:
    entry = result["scenarios"]["soak"]
    m = entry["measured"]
    assert entry["config"]["load_generator"] == ("wrk" if HAS_WRK else "python-asyncio")
    assert m["requests"] > 0 and sum(m["statuses"].values()) > 0
    assert 0 < m["p50_ms"] <= m["p99_ms"] <= m["max_ms"]
    assert m["rss_first_half_mib"] > 0 and m["rss_second_half_mib"] > 0
    assert isinstance(m["rss_growth_pct"], float)
    assert len(entry["series"]["rss_mib"]) >= 2 and entry["series"]["rps"]


@pytest.mark.slow
def test_overload_measured(result: dict[str, Any]) -> None:
    m = result["scenarios"]["overload"]["measured"]
    assert m["requests"] > 0 and m["replies"] == sum(m["statuses"].values())
    assert m["deadline_ms"] == 5000.0
    assert m["health_probes"] > 0 and m["health_p99_ms"] > 0
    assert 0.0 <= m["share_503"] <= 1.0


@pytest.mark.slow
def test_slow_measured(result: dict[str, Any]) -> None:
    entry = result["scenarios"]["slow"]
    m = entry["measured"]
    assert entry["config"]["freed_by_s"] == 3.0  # header timeout 1 s + 2 s
    assert m["connections"] == m["connected"] + sum(m["connect_errors"].values()) >= 20
    assert m["closed_by_server"] + m["open_at_end"] == m["connected"]
    # the first wave (opened at once) is judged: 3.5 s of dribbling covers the 3 s check
    assert m["judged"] >= 1 and m["freed_share"] is not None
    assert m["health_probes"] > 0 and m["infer_probes"] > 0


@pytest.mark.slow
def test_header_measured(result: dict[str, Any]) -> None:
    m = result["scenarios"]["header"]["measured"]
    assert result["scenarios"]["header"]["config"]["header_bytes"] == 2_000_000
    assert m["bytes_sent"] > 0 and m["answer_s"] > 0
    assert m["status"] is not None or m["timed_out"]
    assert m["rss_before_mib"] > 0 and m["rss_peak_mib"] >= m["rss_before_mib"]


@pytest.mark.slow
def test_sigterm_measured(result: dict[str, Any]) -> None:
    m = result["scenarios"]["sigterm"]["measured"]
    assert m["ok_before_signal"] > 0
    assert sum(m["outcomes"].values()) == m["requests"]
    assert isinstance(m["exit_code"], int)
    assert m["killed_after_drain_limit"] or m["drain_s"] >= 0


def test_a_server_that_cannot_start_is_recorded(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _ = run_cli(
        [
            "soak",
            "--out",
            str(out),
            "--arch",
            "64,32,10",
            "--scenarios",
            "header",
            "--server-env",
            "SMARTMIXED_MAX_BATCH_SIZE=-1",
            "--quiet",
        ]
    )
    assert code == 0
    entry = json.loads((out / "soak.json").read_text())["scenarios"]["header"]
    assert entry["status"] == "failed"
    assert entry["error"].startswith("SoakError: the server exited with status 2")
    assert entry["meets_target"] == dict.fromkeys(TARGETS["header"])
    assert "**failed**" in (out / "soak.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scenarios", "soak,nope"], "--scenarios"),
        (["--server-env", "NOEQUALS"], "KEY=VALUE"),
        (["--pid", "1"], "--pid goes with --url"),
        (["--url", "http://192.0.2.1:8000", "--model", "m"], "only a server on this machine"),
        (["--url", "http://127.0.0.1:FREE"], "--model"),
        (["--url", "http://127.0.0.1:FREE", "--model", "m"], "not reachable"),
        (["--url", "http://127.0.0.1:FREE", "--server-env", "A=1"], "--server-env"),
        (["--model", "other"], "builds 'mixed'"),
        (["--soak-duration", "0"], "soak_duration_s must be > 0"),
        (["--slow-nofile", "10"], "slow_nofile"),
        (["--repository", "TMP/none"], "--repository TMP/none is not a folder"),
        (["--repository", "TMP"], "--repository TMP: no model(s) (none); it holds nothing"),
    ],
)
def test_bad_options_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    port = str(free_port())  # nothing listens there
    args = ["soak", "--out", str(tmp_path / "out"), "--quiet"]
    args += [a.replace("FREE", port).replace("TMP", str(tmp_path)) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("smartmixed-bench: error: ")
    assert message.replace("TMP", str(tmp_path)) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_parse_options() -> None:
    assert parse_scenarios("sigterm, soak") == ["soak", "sigterm"]  # the suite's order
    assert parse_server_env(["SMARTMIXED_A=1", "B=x=y"]) == {"SMARTMIXED_A": "1", "B": "x=y"}
    with pytest.raises(SoakError, match="KEY=VALUE"):
        parse_server_env(["=1"])


def test_evaluate() -> None:
    targets = {"a": ("<", 5.0), "b": ("<=", 0), "c": ("==", True), "d": (">=", 1.0), "e": ("<", 1)}
    measured = {"a": 5.0, "b": 0, "c": True, "d": 0.5, "e": None}
    assert evaluate(measured, targets) == {"a": False, "b": True, "c": True, "d": False, "e": None}


def test_rss_halves() -> None:
    samples = [(float(t), 100.0 if t <= 30 else 110.0) for t in range(61)]
    got = rss_halves(samples, 60)
    assert got["rss_window_s"] == 5.0  # a twelfth of the run
    assert got["rss_first_half_mib"] == 100.0 and got["rss_second_half_mib"] == 110.0
    assert got["rss_growth_pct"] == 10.0
    assert rss_halves([], 60)["rss_growth_pct"] is None


def test_classify_sigterm() -> None:
    def at(end: float, outcome: str, status: int | None = None, reused: bool = False) -> Attempt:
        return Attempt(
            start=end - 0.01, seconds=0.01, outcome=outcome, status=status, reused=reused
        )

    attempts = [
        at(1, "reply", 200),
        at(11, "reply", 200),
        at(11, "reply", 503),
        at(1, "reply", 503),  # shed while draining / before the signal
        at(11, "refused"),
        at(1, "refused"),
        at(11, "no_response", reused=True),
        at(11, "no_response"),  # idle race / fresh
        at(11, "cut"),
        at(11, "timeout"),
        at(11, "reply", 500),
    ]
    assert classify_sigterm(attempts, t_signal=10) == {
        "ok": 2,
        "shed_503_draining": 1,
        "failed_status_503": 1,
        "refused_listener_closed": 1,
        "failed_refused": 1,
        "closed_idle_keepalive": 1,
        "failed_no_response": 1,
        "failed_cut": 1,
        "failed_timeout": 1,
        "failed_status_500": 1,
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", (200, False, False)),
        (
            b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nConnection: close\r\ncontent-length: 0\r\n\r\n",
            (503, True, True),
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            (200, False, False),
        ),
        (b"HTTP/1.1 408 Timeout\r\n\r\nbody until close", (408, False, True)),
        (b"", NoResponse),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", CutResponse),
        (b"HTTP/1.1 200 O", CutResponse),
    ],
)
def test_read_reply(raw: bytes, expected: Any) -> None:
    async def parse() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        reply = await read_reply(reader)
        return reply.status, reply.retry_after, reply.close

    if isinstance(expected, type):
        with pytest.raises(expected):
            asyncio.run(parse())
    else:
        assert asyncio.run(parse()) == expected
