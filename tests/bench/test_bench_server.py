"""bench/server.py: the URLs a bench may target, the models it picks from a repository, and the
server process (ready before the block, stopped after it, one error with its log otherwise)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import httpx
import pytest

from smartmixed.bench import BenchError
from smartmixed.bench.server import (
    ServerError,
    build_repository,
    check_url,
    free_port,
    pick_models,
    run_server,
)


def test_loopback_urls_are_normalised() -> None:
    assert check_url("http://localhost:8000/") == "http://localhost:8000"
    assert check_url("http://127.0.0.1") == "http://127.0.0.1:80"
    assert check_url("http://[::1]:9") == "http://[::1]:9"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://127.0.0.1:1", "expected http://127.0.0.1:PORT"),
        ("http://192.0.2.1:1", "only a server on this machine (127.0.0.1) is benched"),
        ("http://example.com:1", "only a server on this machine (127.0.0.1) is benched"),
        ("http://127.0.0.1:x", "bad port"),
        ("http://127.0.0.1:1/v2", "give the server's base URL, without a path"),
    ],
)
def test_other_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ServerError) as e:
        check_url(url)
    assert str(e.value) == f"--url {url!r}: {message}"


def test_models_are_the_folders_with_a_version(tmp_path: Path) -> None:
    for folder in ("b/1", "a/2", ".staging/1"):  # a hidden folder is export's staging area
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "c").mkdir()  # no version folder: not a model
    assert pick_models(tmp_path, None, BenchError) == (tmp_path, ["a", "b"])
    assert pick_models(str(tmp_path), ["b"], BenchError) == (tmp_path, ["b"])
    with pytest.raises(BenchError) as e:
        pick_models(tmp_path, ["a", "c"], BenchError)
    assert str(e.value) == f"--repository {tmp_path}: no model(s) c; it holds a, b"


def test_a_server_that_exits_first_is_one_error_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "print('no models here'); raise SystemExit(3)"]
    log = tmp_path / "server.log"
    with (
        pytest.raises(ServerError) as e,
        run_server(command, url="http://127.0.0.1:1", log_path=log),
    ):
        pytest.fail("the block must not run")
    assert str(e.value) == "the server exited with status 3 before it was ready: no models here"


def test_a_server_is_ready_inside_the_block_and_stopped_after_it(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}"
    with run_server(command, url=url, log_path=tmp_path / "log", ready_path="/", cwd=tmp_path) as s:
        assert httpx.get(url + "/", trust_env=False).status_code == 200
        assert (s.url, s.pid, s.command) == (url, s.process.pid, command)
    assert s.process.returncode == -signal.SIGTERM


def test_the_bench_repository_states_the_published_batching_delay(tmp_path: Path) -> None:
    # export writes no delay unless asked; the benches' figures were measured at 500 us
    build_repository(tmp_path / "models", arch=[64, 8, 10], seed=0, models=["mixed"])
    config = (tmp_path / "models" / "mixed" / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 500" in config
