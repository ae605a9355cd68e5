"""Model management: control modes none / explicit / poll, load, unload, index, swaps, drains."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from smartmixed.serve.app import create_app
from smartmixed.serve.cli import build_parser, main
from smartmixed.serve.models import NotFound
from smartmixed.serve.settings import ServeSettings

POLL_S = 0.2  # repository_poll_secs in these tests
# a tiny model loads in tens of ms; on a busy 2-core machine, allow this beyond 2 poll periods
LOAD_SLACK_S = 1.0
CONTROL_OFF = (
    "explicit model load / unload is not allowed: model_control_mode is {} "
    "(start the server with --model-control-mode explicit)"
)


@pytest.fixture
def models(repository: Path, tmp_path: Path) -> Path:
    """A copy of the session's repository (mixed, relu), to change."""
    return Path(shutil.copytree(repository, tmp_path / "models"))


def _client(models: Path, **settings) -> TestClient:
    return TestClient(create_app(ServeSettings(repository=models, **settings)))


def _infer_body(rows: int = 2) -> dict:
    x = np.random.default_rng(0).uniform(0, 16, (rows, 64))
    return {
        "inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": x.tolist()}]
    }


def _index(client: TestClient, **body) -> list[tuple]:
    rows = client.post("/v2/repository/index", json=body or None).json()
    return [tuple(row.get(k) for k in ("name", "version", "state", "reason")) for row in rows]


def _wait_for(condition, timeout: float, what: str) -> float:
    """Seconds until ``condition()``; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------
# explicit mode over REST


def test_explicit_mode_loads_unloads_and_indexes(models: Path) -> None:
    body = _infer_body()
    with _client(models, model_control_mode="explicit", load_model=["relu"]) as client:
        assert _index(client) == [
            ("mixed", None, "UNAVAILABLE", "unloaded"),
            ("relu", "1", "READY", None),
        ]
        assert _index(client, ready=True) == [("relu", "1", "READY", None)]
        refused = client.post("/v2/models/mixed/infer", json=body)
        assert (refused.status_code, refused.json()) == (
            404,
            {"error": "model 'mixed' is not loaded"},
        )

        loaded = client.post("/v2/repository/models/mixed/load")
        assert (loaded.status_code, loaded.content) == (200, b"")
        assert _index(client) == [("mixed", "1", "READY", None), ("relu", "1", "READY", None)]
        assert client.post("/v2/models/mixed/infer", json=body).json()["model_version"] == "1"

        unloaded = client.post(
            "/v2/repository/models/relu/unload", json={"parameters": {"unload_dependents": False}}
        )
        assert (unloaded.status_code, unloaded.content) == (200, b"")
        assert _index(client) == [
            ("mixed", "1", "READY", None),
            ("relu", None, "UNAVAILABLE", "unloaded"),
        ]
        gone = client.post("/v2/models/relu/infer", json=body)
        assert (gone.status_code, gone.json()) == (404, {"error": "model 'relu' is not loaded"})
        # unloading what is not loaded does nothing, as in Triton
        assert client.post("/v2/repository/models/relu/unload").status_code == 200
        # loaded again: a new session, answering
        assert client.post("/v2/repository/models/relu/load", json={}).status_code == 200
        assert client.post("/v2/models/relu/infer", json=body).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        (
            "models/nope/load",
            None,
            404,
            "unknown model 'nope': the repository {root} has no such folder",
        ),
        ("models/nope/unload", None, 404, "unknown model 'nope'"),
        (
            "models/relu/load",
            {"parameters": {"config": "{}", "file:1/model.onnx": "AAAA"}},
            400,
            "unsupported load parameter(s) 'config', 'file:1/model.onnx': this server loads "
            "models from its repository as they are (supported: none)",
        ),
        (
            "models/relu/unload",
            {"parameters": {"unload_dependents": "yes"}},
            400,
            "parameter 'unload_dependents' must be true or false, got 'yes'",
        ),
        ("models/relu/load", {"parameters": []}, 400, "'parameters' must be a JSON object, got []"),
        (
            "models/relu/load",
            [1],
            400,
            'expected a JSON object {"parameters": {...}} or no body',
        ),
        ("index", {"ready": "yes"}, 400, 'expected a JSON object {"ready": true|false} or no body'),
    ],
)
def test_bad_repository_requests(
    models: Path, path: str, body, status: int, error: str | None
) -> None:
    with _client(models, model_control_mode="explicit") as client:
        answer = client.post(f"/v2/repository/{path}", json=body)
        assert answer.status_code == status
        if error is not None:
            assert answer.json() == {"error": error.replace("{root}", str(models))}
        assert _index(client, ready=True) == []  # nothing was loaded


def test_a_name_is_a_folder_of_the_repository(models: Path) -> None:
    """What gRPC may send as a name (REST routes never see a "/" in one)."""
    with _client(models, model_control_mode="explicit") as client:
        service = client.app.state.service
        for name in ("..", ".", "../models/relu", "relu/1", ""):
            with pytest.raises(NotFound) as refused:
                client.portal.call(service.load_model, name)
            assert str(refused.value) == (
                f"unknown model {name!r}: the repository {models} has no such folder"
            )
        assert _index(client, ready=True) == []


def test_explicit_mode_loads_nothing_at_start_unless_asked(models: Path) -> None:
    with _client(models, model_control_mode="explicit") as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert [(n, s) for n, _, s, _ in _index(client)] == [
            ("mixed", "UNAVAILABLE"),
            ("relu", "UNAVAILABLE"),
        ]
    with _client(models, model_control_mode="explicit", load_model=["*"]) as client:
        assert _index(client) == [("mixed", "1", "READY", None), ("relu", "1", "READY", None)]


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_and_unload_are_refused_unless_explicit(models: Path, mode: str) -> None:
    with _client(models, model_control_mode=mode) as client:
        for action in ("load", "unload"):
            answer = client.post(f"/v2/repository/models/relu/{action}")
            assert (answer.status_code, answer.json()) == (503, {"error": CONTROL_OFF.format(mode)})
            assert "retry-after" not in answer.headers  # not overload: retrying will not help
        assert _index(client) == [("mixed", "1", "READY", None), ("relu", "1", "READY", None)]


def test_a_broken_reload_is_refused_and_the_old_version_keeps_serving(models: Path, caplog) -> None:
    with _client(models, model_control_mode="explicit", load_model=["relu"]) as client:
        (models / "relu" / "2").mkdir()
        (models / "relu" / "2" / "model.onnx").write_bytes(b"not an ONNX model")
        with caplog.at_level(logging.INFO, logger="smartmixed.serve"):
            refused = client.post("/v2/repository/models/relu/load")
        path = models / "relu" / "2" / "model.onnx"
        assert refused.status_code == 400
        assert refused.json()["error"].startswith(
            f"failed to load 'relu': relu/2: cannot read {path}: not an ONNX model ("
        )
        assert refused.json()["error"].endswith("; still serving version(s) 1")
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert errors == [refused.json()["error"]]  # one log line
        assert _index(client) == [
            ("mixed", None, "UNAVAILABLE", "unloaded"),
            ("relu", "1", "READY", None),
        ]
        assert client.post("/v2/models/relu/infer", json=_infer_body()).json()["model_version"] == (
            "1"
        )
        # a model that never loaded is UNAVAILABLE with the reason
        (models / "mixed" / "1" / "model.onnx").write_bytes(b"")
        failed = client.post("/v2/repository/models/mixed/load")
        assert failed.status_code == 400
        reason = f"mixed/1: cannot read {models / 'mixed' / '1' / 'model.onnx'}: empty file"
        assert failed.json() == {"error": f"failed to load 'mixed': {reason}"}
        assert _index(client)[0] == ("mixed", None, "UNAVAILABLE", reason)


def test_unload_waits_for_the_request_in_flight(models: Path) -> None:
    """max_batch_size 0: each request runs ``ModelVersion.predict`` itself, held here."""
    with _client(
        models, model_control_mode="explicit", load_model=["relu"], max_batch_size=0
    ) as client:
        service = client.app.state.service
        model = service.repo.get("relu")
        release, running = threading.Event(), threading.Event()
        predict = model.predict

        def held_predict(x, outputs=None):
            running.set()
            assert release.wait(10)
            return predict(x, outputs)

        model.predict = held_predict
        answers: dict[str, object] = {}
        infer = threading.Thread(
            target=lambda: answers.update(
                infer=client.post("/v2/models/relu/infer", json=_infer_body())
            )
        )
        infer.start()
        assert running.wait(10)
        unload = threading.Thread(
            target=lambda: answers.update(unload=client.post("/v2/repository/models/relu/unload"))
        )
        unload.start()
        _wait_for(lambda: "relu" in service.repo.unloading, 5, "unloading")
        assert _index(client) == [
            ("mixed", None, "UNAVAILABLE", "unloaded"),
            ("relu", "1", "UNLOADING", None),
        ]
        refused = client.post("/v2/models/relu/infer", json=_infer_body())
        assert (refused.status_code, refused.json()) == (
            404,
            {"error": "model 'relu' is unloading"},
        )
        time.sleep(0.1)
        assert unload.is_alive() and "unload" not in answers  # still waiting for the request
        release.set()
        infer.join(10)
        unload.join(10)
        assert answers["infer"].status_code == 200
        assert answers["infer"].json()["model_version"] == "1"
        assert answers["unload"].status_code == 200
        assert _index(client)[1] == ("relu", None, "UNAVAILABLE", "unloaded")
        assert ("relu", "1") not in service.batching and service.in_flight["relu"] == 0


# --------------------------------------------------------------------------------------------
# poll mode


class Load:
    """Clients (threads) sending infer to a model in a loop until stopped; answers counted by
    (status, version)."""

    def __init__(self, client: TestClient, model: str, clients: int = 3) -> None:
        self.answers: Counter = Counter()
        self._stop = threading.Event()
        body = _infer_body()

        def loop() -> None:
            while not self._stop.is_set():
                answer = client.post(f"/v2/models/{model}/infer", json=body)
                version = answer.json().get("model_version") if answer.status_code == 200 else None
                self.answers[(answer.status_code, version)] += 1

        self._threads = [threading.Thread(target=loop) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> Counter:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        return self.answers


@pytest.fixture
def poll_client(models: Path) -> Iterator[TestClient]:
    with _client(models, model_control_mode="poll", repository_poll_secs=POLL_S) as client:
        yield client


def _ready_versions(client: TestClient, name: str) -> list[str]:
    return [v for n, v, s, _ in _index(client, ready=True) if n == name]


def test_poll_mode_swaps_in_a_new_version_with_no_failed_request(
    models: Path, poll_client: TestClient
) -> None:
    load = Load(poll_client, "relu")
    _wait_for(lambda: sum(load.answers.values()) >= 10, 10, "answers from version 1")
    shutil.copytree(models / "relu" / "1", models / "relu" / "2")
    took = _wait_for(lambda: _ready_versions(poll_client, "relu") == ["2"], 10, "version 2")
    assert took < 2 * POLL_S + LOAD_SLACK_S
    # version 1 drains, then goes
    _wait_for(lambda: ("relu", "1") not in poll_client.app.state.service.batching, 5, "drain")
    before = load.answers[(200, "2")]
    _wait_for(lambda: load.answers[(200, "2")] >= before + 10, 10, "answers from version 2")
    answers = load.stop()
    assert set(answers) == {(200, "1"), (200, "2")}, answers  # no failure, both versions
    assert _index(poll_client) == [("mixed", "1", "READY", None), ("relu", "2", "READY", None)]


def test_poll_mode_refuses_a_broken_version_once_and_keeps_serving(
    models: Path, poll_client: TestClient, caplog
) -> None:
    load = Load(poll_client, "relu", clients=2)
    broken = models / "relu" / "2"
    broken.mkdir()
    with caplog.at_level(logging.WARNING, logger="smartmixed.serve"):
        (broken / "model.onnx").write_bytes(b"not an ONNX model")
        time.sleep(4 * POLL_S)  # several polls: refused once, not again while it is unchanged
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        f"failed to load 'relu': relu/2: cannot read {broken / 'model.onnx'}: not an ONNX model"
    )
    assert errors[0].endswith("; still serving version(s) 1")
    assert _ready_versions(poll_client, "relu") == ["1"]
    # fixed: loaded at the next poll
    shutil.copy(models / "relu" / "1" / "model.onnx", broken / "model.onnx")
    _wait_for(
        lambda: _ready_versions(poll_client, "relu") == ["2"], 2 * POLL_S + LOAD_SLACK_S, "v2"
    )
    answers = load.stop()
    assert {status for status, _ in answers} == {200}, answers


def test_poll_mode_follows_changed_touched_and_removed_files(
    models: Path, poll_client: TestClient, caplog
) -> None:
    service = poll_client.app.state.service
    relu = service.repo.get("relu")
    # touched, not changed (same bytes): the same session goes on serving
    (models / "relu" / "1" / "model.onnx").touch()
    time.sleep(3 * POLL_S)
    assert service.repo.get("relu") is relu
    # changed in place (the mixed network, same input and output shapes): a new session
    shutil.copy(models / "mixed" / "1" / "model.onnx", models / "relu" / "1" / "model.onnx")
    _wait_for(lambda: service.repo.get("relu") is not relu, 2 * POLL_S + LOAD_SLACK_S, "reload")
    assert service.repo.get("relu").sha256 == service.repo.get("mixed").sha256
    meta = poll_client.get("/v2/models/relu").json()["smartmixed"]
    assert meta["architecture"] == [64, 32, 16, 10]
    # config.pbtxt changed: every version reloads with it
    config = models / "relu" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 1024", "max_batch_size: 8"))
    _wait_for(
        lambda: poll_client.get("/v2/models/relu/config").json()["max_batch_size"] == 8,
        2 * POLL_S + LOAD_SLACK_S,
        "config reload",
    )
    # a model folder removed: unloaded; a new one: loaded
    shutil.move(models / "mixed", models / "mixed2")
    config = models / "mixed2" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "mixed"', 'name: "mixed2"', 1))
    _wait_for(
        lambda: [n for n, *_ in _index(poll_client, ready=True)] == ["mixed2", "relu"],
        2 * POLL_S + LOAD_SLACK_S,
        "mixed2 loaded, mixed unloaded",
    )
    assert _index(poll_client) == [("mixed2", "1", "READY", None), ("relu", "1", "READY", None)]
    assert poll_client.post("/v2/models/mixed/infer", json=_infer_body()).status_code == 404


# --------------------------------------------------------------------------------------------
# settings and command line


def test_load_model_is_a_repeated_flag_for_explicit_mode(models: Path, capsys) -> None:
    args = build_parser().parse_args(["--load-model", "relu", "--load-model", "mixed"])
    assert args.load_model == ["relu", "mixed"]
    assert main(["--repository", str(models), "--load-model", "relu"]) == 2
    assert capsys.readouterr().err == (
        "smartmixed-serve: error: load_model (relu) needs model_control_mode explicit "
        "(it is none, which loads every model)\n"
    )
    argv = ["--repository", str(models), "--model-control-mode", "explicit"]
    assert main([*argv, "--load-model", "relu", "--load-model", "nope", "--port", "0"]) == 2
    assert capsys.readouterr().err == (
        f"smartmixed-serve: error: model repository {models} has no model 'nope' "
        "(it has mixed, relu)\n"
    )
    with pytest.raises(ValueError, match="repository_poll_secs"):
        ServeSettings(repository=models, repository_poll_secs=0)


@pytest.mark.parametrize(
    ("variable", "names"),
    [("relu", ["relu"]), ("relu, mixed", ["relu", "mixed"]), ('["a,b", "c"]', ["a,b", "c"])],
)
def test_load_model_from_the_environment(monkeypatch, variable: str, names: list[str]) -> None:
    monkeypatch.setenv("SMARTMIXED_LOAD_MODEL", variable)
    assert ServeSettings(model_control_mode="explicit").load_model == names


# --------------------------------------------------------------------------------------------
# a real server process


@pytest.mark.slow
def test_a_swap_under_load_in_a_server_process_fails_no_request(models: Path, server_starter):
    """Poll mode in a real ``smartmixed-serve``: model.onnx replaced in place (renamed over, as
    a deploy would) while 8 clients send requests: every one is answered 200, the new network
    answers within 2 poll periods (and the slack for a load)."""
    import httpx

    server = server_starter(models, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    try:
        answers: Counter = Counter()
        stop = threading.Event()
        body = _infer_body()

        def loop() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                while not stop.is_set():
                    answers[http.post("/v2/models/relu/infer", json=body).status_code] += 1

        threads = [threading.Thread(target=loop) for _ in range(8)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: answers[200] >= 50, 20, "answers before the swap")
        staged = models / "relu" / "1" / ".model.onnx.new"
        shutil.copy(models / "mixed" / "1" / "model.onnx", staged)
        staged.replace(models / "relu" / "1" / "model.onnx")

        def swapped() -> bool:
            meta = httpx.get(f"{server.url}/v2/models/relu", timeout=5).json()
            return meta["smartmixed"]["architecture"] == [64, 32, 16, 10]

        _wait_for(swapped, 2 * 0.2 + LOAD_SLACK_S + 1, "the new network")
        before = answers[200]
        _wait_for(lambda: answers[200] >= before + 50, 20, "answers after the swap")
        stop.set()
        for thread in threads:
            thread.join(15)
        assert set(answers) == {200}, answers
    finally:
        server.proc.terminate()
        output = server.proc.communicate(timeout=30)[0]
    assert "relu: serving version(s) 1 (" in output and "relu/1 (" in output, output
