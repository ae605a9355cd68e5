"""smartmixed-bench soak: every scenario once with tiny durations and counts (slow: about 20 s
for the first five, 30 s for the wire attacks at a cap of 16); the wire clients against tiny
socket servers on 127.0.0.1, the parsers, the targets and the report (fast).

The numbers of a real run are checked for being measured, not for meeting the targets: the
suite reports targets, and the service it measures is hardened elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smartmixed.bench.cli import main
from smartmixed.bench.server import free_port
from smartmixed.bench.soak import (
    ALL_SCENARIOS,
    SCENARIOS,
    TARGETS,
    WIRE_SCENARIOS,
    attack_connections,
    classify_sigterm,
    connection_cap,
    evaluate,
    exit_measures,
    parse_caps,
    parse_scenarios,
    parse_server_env,
    plot,
    render_markdown,
    rss_halves,
    send_sigterm,
)
from smartmixed.bench.soak_clients import (
    BODY_CHUNK,
    Attempt,
    CutResponse,
    NoResponse,
    SoakError,
    TcpSocket,
    Upload,
    open_slow_readers,
    parse_proc_net_tcp,
    pipelined_header,
    read_reply,
    server_sockets,
    slow_uploads,
    tcp_state,
    unsent_close,
)

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
    "--scenarios",
    ",".join(SCENARIOS),
    "--quiet",
]
WIRE_TINY = [
    "--arch",
    "64,32,10",
    "--scenarios",
    "wire",
    "--wire-caps",
    "16",
    "--wire-duration",
    "2",
    "--wire-overcommit",
    "1.5",
    "--readers-requests",
    "100",
    "--sigterm-after",
    "1",
    "--sigterm-readers",
    "4",
    "--drain-limit",
    "5",
    "--pipelined-connections",
    "2",
    "--pipelined-requests",
    "3",
    "--pipelined-rows",
    "64",
    "--bodies-clients",
    "2",
    "--bodies-mib",
    "1",
    "--bodies-send",
    "1",
    "--unsent-id-mb",
    "0.5",
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
    # the environment the server ran with, as a shell would set it: the bench's own gRPC off
    env = result["server_command_shell"].partition(" " + result["server_command"][0])[0]
    assert env.split() == ["SMARTMIXED_GRPC_PORT=0", "SMARTMIXED_HEADER_TIMEOUT_S=1"]
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
    entry = result["scenarios"]["overload"]
    m = entry["measured"]
    assert m["requests"] > 0 and m["replies"] == sum(m["statuses"].values())
    assert m["deadline_ms"] == 5000.0
    assert m["health_probes"] > 0 and m["health_p99_ms"] > 0
    # the server's open-file limit puts its cap under the clients; health on both ports
    assert entry["server"]["nofile"] == 1024 and entry["config"]["metrics_port"] > 0
    assert m["metrics_port_health_probes"] > 0 and m["metrics_port_health_p99_ms"] > 0
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
    assert entry["error"].startswith("ServerError: the server exited with status 2")
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
        (["--wire-nofile", "79"], "wire_nofile must be >= 80"),
        (["--wire-caps", "4"], "--wire-caps: expected default and/or integers >= 8 (got '4')"),
        (["--scenarios", "wire,nope"], "expected all, wire or some of"),
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
    ("code", "expected"),
    [
        ("import time; time.sleep(30)", {"exit_code": -15, "exit_signal": "SIGTERM"}),
        # a process that ignores SIGTERM is killed at the drain limit
        (
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print(flush=True); time.sleep(30)",
            {"exit_code": -9, "exit_signal": "SIGKILL", "killed_after_drain_limit": True},
        ),
    ],
)
def test_sigterm_and_the_drain(code: str, expected: dict[str, Any]) -> None:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    if "SIG_IGN" in code:
        process.stdout.readline()  # its handler is set
    t_signal, t_end = send_sigterm(process, 0.5)
    measures = exit_measures(process, t_signal, t_end)
    assert measures | expected == measures
    assert (measures["drain_s"] is None) == measures["killed_after_drain_limit"]
    assert measures["killed_after_drain_limit"] or 0 <= measures["drain_s"] < 0.5


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


def test_read_reply_leaves_the_next_pipelined_answer() -> None:
    async def parse() -> list[int]:
        reader = asyncio.StreamReader()
        reader.feed_data(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            b"HTTP/1.1 201 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            b"HTTP/1.1 431 Too Large\r\ncontent-length: 0\r\n\r\n"
        )
        reader.feed_eof()
        statuses = [(await read_reply(reader)).status for _ in range(3)]
        with pytest.raises(NoResponse):
            await read_reply(reader)
        return statuses

    assert asyncio.run(parse()) == [200, 201, 431]


# ---- the wire attacks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wire_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("soak-wire")
    code, stdout = run_cli(["soak", "--out", str(out), *WIRE_TINY])
    assert code == 0
    assert "## slow-readers@cap16" in stdout
    return json.loads((out / "soak.json").read_text())


@pytest.mark.slow
def test_wire_rows_measured(wire_result: dict[str, Any]) -> None:
    rows = [f"{name}@cap16" for name in WIRE_SCENARIOS]
    assert list(wire_result["scenarios"]) == rows
    assert wire_result["config"]["wire_caps"] == [16]
    for row, entry in wire_result["scenarios"].items():
        assert set(entry) == ENTRY_KEYS
        assert entry["status"] == "ok", (row, entry["error"], entry["server"].get("log_tail"))
        goals = TARGETS[row.split("@")[0]]
        assert set(goals) <= set(entry["measured"]), row
        assert all(v in (True, False) for v in entry["meets_target"].values()), (row, entry)
        assert entry["server"]["nofile"] == 320 and entry["server"]["connection_cap"] == 16
        assert "SMARTMIXED_MAX_CONNECTIONS=16" in entry["server"]["command_shell"]
    m = {row: e["measured"] for row, e in wire_result["scenarios"].items()}
    readers = m["slow-readers@cap16"]
    assert readers["connections"] == 24  # 1.5 x the cap
    assert readers["connected"] == readers["still_open"] + readers["closed_by_server"] == 24
    assert readers["health_probes"] > 0 and readers["rss_before_mib"] > 0
    # the server may close each reader at once (past its pipelining limit): no rise to expect
    assert readers["fd_peak"] > 0 and readers["fd_before"] > 0
    sigterm = m["slow-readers-sigterm@cap16"]
    assert sigterm["connections"] == 4 and isinstance(sigterm["exit_code"], int)
    assert sigterm["killed_after_drain_limit"] or sigterm["drain_s"] >= 0
    header = m["pipelined-header@cap16"]
    assert header["connections"] == 2 and len(header["pad_accepted_mib"]) == 2
    assert header["answers"].get("200", 0) >= 1  # the answers it reads
    unsent = m["unsent-close@cap16"]
    assert unsent["connections"] == 24 and unsent["connection_cap"] == 16
    assert unsent["fd_over_cap"] == unsent["fd_peak"] - unsent["fd_before"] - 16
    bodies = m["slow-bodies@cap16"]
    assert bodies["uploads"] == 6 and len(bodies["statuses"]) == 3
    series = wire_result["scenarios"]["unsent-close@cap16"]["series"]
    assert len(series["server"]) >= 10 and series["health_ms"]


def test_parse_wire_options() -> None:
    assert parse_scenarios("wire") == list(WIRE_SCENARIOS)
    assert parse_scenarios("all") == list(ALL_SCENARIOS)
    assert parse_scenarios("slow-bodies, soak") == ["soak", "slow-bodies"]
    assert parse_caps("default,16") == [None, 16]
    assert parse_caps("32,default,16") == [None, 16, 32]
    assert parse_caps([16]) == [16]
    for bad in ("", "4", "x", "default,-1"):
        with pytest.raises(SoakError, match="--wire-caps: expected default and/or integers >= 8"):
            parse_caps(bad)


def test_attack_connections() -> None:
    assert attack_connections(16, 1.5) == 24
    assert attack_connections(56, 2.0) == 112
    assert attack_connections(10, 1.01) == 11  # rounded up
    with pytest.raises(SoakError, match="connection cap is unknown"):
        attack_connections(None, 2.0)


def test_connection_cap() -> None:
    log = "INFO smartmixed.serve: connection cap 56 (max_connections 2048, open-file limit 120)\n"
    assert connection_cap(log, nofile=120, max_connections=2048) == (56, "server log")
    assert connection_cap("INFO: started\n", nofile=120, max_connections=16) == (16, "computed")
    # 120 - 64 descriptors the server keeps free
    assert connection_cap("", nofile=120, max_connections=2048) == (56, "computed")
    assert connection_cap(None, nofile=None, max_connections=2048) == (None, "unknown")


def test_wire_targets() -> None:
    measured = {
        "health_p99_ms": 100.0,
        "health_failures": 0,
        "rss_growth_mib": 100.0,
        "fd_over_cap": 9,
        "tracebacks": 0,
        "server_alive": True,
    }
    assert evaluate(measured, TARGETS["unsent-close"]) == {
        "health_p99_ms": True,
        "health_failures": True,
        "rss_growth_mib": False,  # < 100 MiB
        "fd_over_cap": False,  # at most the cap + 8
        "tracebacks": True,
        "server_alive": True,
    }
    sigterm = {"exit_code": 0, "exited_within_drain": False, "tracebacks": 2}
    assert evaluate(sigterm, TARGETS["slow-readers-sigterm"]) == {
        "exit_code": True,
        "exited_within_drain": False,
        "tracebacks": False,
    }
    assert evaluate({"pad_accepted_mib_max": 1.0}, TARGETS["pipelined-header"])[
        "pad_accepted_mib_max"
    ]


def test_parse_proc_net_tcp() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000  0 0 111 1\n"
        "   1: 0100007F:1F90 0100007F:C350 01 00000000:00001000 00:00000000 00000000  0 0 222 1\n"
        "   2: 0100007F:C350 0100007F:1F90 01 00000200:00000000 00:00000000 00000000  0 0 333 1\n"
        "   3: 0100007F:1F90 0100007F:C351 06 00000000:00000000 00:00000000 00000000  0 0 0 1\n"
        "   4: 0A000001:1F90 0100007F:C352 01 00000000:00000000 00:00000000 00000000  0 0 444 1\n"
    )
    sockets = parse_proc_net_tcp(text)
    assert sockets[(8080, 50000)] == TcpSocket(state=1, tx_queue=0, rx_queue=4096, inode=222)
    assert sockets[(50000, 8080)] == TcpSocket(state=1, tx_queue=512, rx_queue=0, inode=333)
    assert (8080, 50002) not in sockets  # not on 127.0.0.1
    # the listener and the time-wait socket (no process holds it) are not connections
    assert server_sockets(sockets, 8080) == 1


@contextlib.contextmanager
def tiny_server(handle: Callable[[socket.socket], None]) -> Iterator[tuple[int, list[Any]]]:
    """A listening socket on 127.0.0.1 whose connections ``handle`` serves, one thread each;
    yields the port and a list the handlers may append to."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    seen: list[Any] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            t = threading.Thread(target=lambda c=conn: _serve(handle, c, seen), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        stop.set()
        acceptor.join()
        for t in threads:
            t.join(timeout=10)
        listener.close()


def _serve(handle: Callable[..., None], conn: socket.socket, seen: list[Any]) -> None:
    with conn, contextlib.suppress(OSError):
        seen.append(handle(conn))


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := conn.recv(min(n - len(data), 65536))):
        data += chunk
    return data


def test_slow_readers_send_and_never_read() -> None:
    payload = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 50

    def handle(conn: socket.socket) -> bytes:
        got = _read_exactly(conn, len(payload))
        conn.sendall(b"x" * 1000)  # an answer the client leaves unread
        with contextlib.suppress(OSError):  # reset: closed with the answer unread
            conn.recv(1)
        return got

    with tiny_server(handle) as (port, seen):
        socks, errors = asyncio.run(
            open_slow_readers("127.0.0.1", port, connections=3, payload=payload, rcvbuf=4096)
        )
        assert errors == {} and len(socks) == 3
        # the kernel doubles SO_RCVBUF; set before connect, the window starts small
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 2 * 4608 for s in socks)
        time.sleep(0.2)
        assert [tcp_state(s) for s in socks] == ["established"] * 3
        for s in socks:
            s.close()
    assert seen == [payload] * 3


def test_tcp_state_sees_the_server_close() -> None:
    with tiny_server(lambda conn: None) as (port, _):  # closes each connection at once
        sock = socket.create_connection(("127.0.0.1", port))
        deadline = time.monotonic() + 5
        while tcp_state(sock) == "established" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tcp_state(sock) == "close_wait"
        sock.close()
    assert tcp_state(sock) == "close"  # closed here: TCP_INFO is gone


def test_pipelined_header_counts_what_the_server_took() -> None:
    requests = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" * 3
    taken = 300_000  # of the header, then the server stops reading (the socket stays open)

    def handle(conn: socket.socket) -> int:
        got = len(_read_exactly(conn, len(requests) + taken))
        for _ in range(2):  # two answers the client reads, a third never comes
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        time.sleep(1.0)  # open until the client has measured and closed
        return got

    with tiny_server(handle) as (port, seen):
        records = asyncio.run(
            pipelined_header(
                "127.0.0.1",
                port,
                connections=1,
                requests=requests,
                read_answers=2,
                header_start=b"GET / HTTP/1.1\r\nX-Pad: ",
                duration=0.5,
            )
        )
    (record,) = records
    assert seen == [len(requests) + taken]
    assert record["error"] is None and record["answers"] == {200: 2}
    # written to the kernel, less what both sockets still hold, less the requests: the bytes
    # of the header (its request line included) that the server read
    assert record["pad_accepted"] == taken
    assert record["pad_sent"] > taken  # the rest waits in the socket buffers
    assert record["closed_by_server"] is False


def test_unsent_close_half_closes_without_reading() -> None:
    request = b"POST /v2/models/m/infer HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}"

    def handle(conn: socket.socket) -> tuple[bytes, bytes, int]:
        got = _read_exactly(conn, len(request))
        conn.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while True:  # an answer larger than the buffers: the rest is never taken
                sent += conn.send(b"x" * 65536)
        conn.setblocking(True)
        return got, conn.recv(10), sent  # b"": the client's half-close

    with tiny_server(handle) as (port, seen):
        socks, records = asyncio.run(
            unsent_close("127.0.0.1", port, connections=2, request=request, rcvbuf=4096, ramp=0.1)
        )
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        # half-closed, still open on the server's side (fin_wait1 until it acknowledges)
        assert {tcp_state(s) for s in socks} <= {"fin_wait1", "fin_wait2"}
        for s in socks:
            s.close()
    assert records == [{"error": None, "sent": True, "answered": True}] * 2
    assert [(got, eof) for got, eof, _ in seen] == [(request, b"")] * 2
    assert all(sent > 4096 for _, _, sent in seen)


def _http_server(answer_after_head: bytes | None) -> Callable[[socket.socket], Any]:
    """Reads a request; answers 200 after the whole body, or ``answer_after_head`` at once
    (then half-closes, reads what comes until the client closes)."""

    def handle(conn: socket.socket) -> tuple[int, float]:
        t0 = time.monotonic()
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        if answer_after_head is not None:
            conn.sendall(answer_after_head)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
            return 0, time.monotonic() - t0
        body = _read_exactly(conn, length)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        return len(body), time.monotonic() - t0

    return handle


def test_slow_uploads_pace_the_body() -> None:
    body = b"{}" + b" " * (4 * BODY_CHUNK - 2)
    upload = Upload(
        route="/r", head=b"POST /r HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % len(body), body=body
    )
    with tiny_server(_http_server(None)) as (port, seen):
        started = time.monotonic()
        records = asyncio.run(slow_uploads("127.0.0.1", port, uploads=[upload] * 2, seconds=0.4))
        took = time.monotonic() - started
    assert records == [{"route": "/r", "status": 200, "sent": len(body)}] * 2
    assert [n for n, _ in seen] == [len(body)] * 2
    # 4 chunks at 0, 0.1, 0.2, 0.3 s after the connect: the last cannot go sooner (timed by the
    # client: a loaded machine may start the server's handler late, never the client's sleeps)
    assert took >= 0.3


def test_slow_uploads_stop_at_an_early_answer() -> None:
    body = b" " * (64 * BODY_CHUNK)
    upload = Upload(
        route="/r", head=b"POST /r HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % len(body), body=body
    )
    shed = b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    with tiny_server(_http_server(shed)) as (port, _):
        (record,) = asyncio.run(slow_uploads("127.0.0.1", port, uploads=[upload], seconds=2.0))
    assert record["status"] == 503
    assert record["sent"] < len(body) // 4  # stopped sending once answered


def _wire_result() -> dict[str, Any]:
    series = {
        "health_ms": [[0.1, 1.5, 200], [0.2, 5000.0, 503]],
        "server": [[0.0, 100.0, 17, 1], [0.5, 180.0, 40, 24]],
    }
    measured = {"health_p99_ms": 5000.0, "fd_before": 17, "fd_over_cap": 7, "server_alive": True}
    targets = {k: {"op": op, "limit": v} for k, (op, v) in TARGETS["unsent-close"].items()}
    met = evaluate(measured, TARGETS["unsent-close"])
    row = {
        "status": "ok",
        "error": None,
        "config": {"connection_cap": 16, "connections": 24},
        "server": {"pid": 1},
        "measured": measured,
        "targets": targets,
        "meets_target": met,
        "series": series,
        "elapsed_s": 3.0,
    }
    failed = {**row, "status": "failed", "error": "SoakError: boom", "server": {"log_tail": "x"}}
    failed.update(measured={}, series={}, config={})
    return {
        "config": {
            "model": "mixed",
            "url": None,
            "server_settings": {"request_timeout_s": 5.0, "header_timeout_s": 10.0},
        },
        "server_command_shell": "smartmixed-serve",
        "machine": {
            "processor": "x86_64",
            "cpu_count": 2,
            "python": "3.11",
            "onnxruntime": "1",
            "uvicorn": "1",
            "load_avg_start_end": [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
        },
        "scenarios": {"unsent-close@cap16": row, "slow-bodies": failed},
        "summary": {
            "unsent-close@cap16": {"status": "ok", "met": 2, "missed": 1, "of": 6},
            "slow-bodies": {"status": "failed", "met": 0, "missed": 0, "of": 6},
        },
        "elapsed_s": 9.0,
    }


def test_report_renders_wire_rows(tmp_path: Path) -> None:
    result = _wire_result()
    text = render_markdown(result)
    assert "| unsent-close@cap16 | ok | 2 of 6 | 1 |" in text
    assert "## unsent-close@cap16" in text
    assert "Ran with: connection_cap 16, connections 24." in text
    assert "| health_p99_ms | 5,000.0 | <= 100.0 | NO |" in text
    assert "| fd_over_cap | 7 | <= 8 | yes |" in text
    assert "**failed**: SoakError: boom" in text
    plot(result, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes().startswith(b"\x89PNG")
