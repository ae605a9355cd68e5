"""Triton's statistics extension over REST, and its nv_* Prometheus families."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from smartmixed.serve.app import create_app
from smartmixed.serve.settings import ServeSettings
from smartmixed.serve.statistics import Statistics

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
NV_FAMILIES = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


def _body(rows: int, features: int = 64) -> dict:
    x = np.random.default_rng(rows).uniform(0, 16, (rows, features))
    return {
        "inputs": [
            {"name": "input", "shape": [rows, features], "datatype": "FP32", "data": x.tolist()}
        ]
    }


@pytest.fixture(scope="module")
def client(repository: Path):
    """Known traffic: relu 3 requests of 2 rows and 1 refused (wrong width); mixed none."""
    settings = ServeSettings(repository=repository)
    with TestClient(create_app(settings)) as c:
        before_ms = time.time_ns() // 1_000_000
        for _ in range(3):
            assert c.post("/v2/models/relu/infer", json=_body(2)).status_code == 200
        assert c.post("/v2/models/relu/infer", json=_body(2, features=63)).status_code == 400
        c.before_ms = before_ms
        yield c


def _nv(client: TestClient) -> dict[tuple[str, str, str], float]:
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name.startswith("nv_"):
                samples[(s.name, s.labels["model"], s.labels["version"])] = s.value
    return samples


def test_statistics_after_known_traffic(client: TestClient) -> None:
    answer = client.get("/v2/models/relu/stats")
    assert answer.status_code == 200
    (stats,) = answer.json()["model_stats"]
    assert (stats["name"], stats["version"]) == ("relu", "1")
    assert client.before_ms <= stats["last_inference"] <= time.time_ns() // 1_000_000
    assert (stats["inference_count"], stats["execution_count"]) == (6, 3)
    inference = stats["inference_stats"]
    counts = {k: inference[k]["count"] for k in DURATIONS}
    assert counts == {
        "success": 3,
        "fail": 1,  # the refused request: decoded in vain, never run
        "queue": 3,
        "compute_input": 3,
        "compute_infer": 3,
        "compute_output": 3,
    }
    assert all(inference[k]["ns"] > 0 for k in DURATIONS), inference
    assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}
    # a request's duration holds its decode, wait, run and encode
    parts = sum(inference[k]["ns"] for k in DURATIONS[2:])
    assert inference["success"]["ns"] >= parts
    assert stats["batch_stats"] == [
        {
            "batch_size": 2,
            "compute_input": {"count": 3, "ns": 0},
            "compute_infer": {"count": 3, "ns": inference["compute_infer"]["ns"]},
            "compute_output": {"count": 3, "ns": 0},
        }
    ]
    assert client.get("/v2/models/relu/versions/1/stats").json() == answer.json()


def test_every_model_and_errors(client: TestClient) -> None:
    every = client.get("/v2/models/stats").json()["model_stats"]
    assert [(s["name"], s["version"]) for s in every] == [("mixed", "1"), ("relu", "1")]
    assert every[0]["inference_count"] == every[0]["execution_count"] == 0
    assert every[0]["inference_stats"]["success"] == {"count": 0, "ns": 0}
    assert every[0]["batch_stats"] == [] and every[0]["last_inference"] == 0
    for path, error in (
        ("/v2/models/nope/stats", "unknown model 'nope'"),
        ("/v2/models/relu/versions/7/stats", "model 'relu' has no version '7' (has 1)"),
    ):
        answer = client.get(path)
        assert (answer.status_code, answer.json()) == (404, {"error": error})


def test_nv_metrics_carry_the_same_numbers(client: TestClient) -> None:
    text = client.get("/metrics").text
    for name in NV_FAMILIES:  # Triton's names exactly: no _total suffix
        assert f"# TYPE {name} untyped\n" in text
    samples = _nv(client)
    relu = {name: samples[(name, "relu", "1")] for name in NV_FAMILIES}
    assert {k: relu[k] for k in NV_FAMILIES[:4]} == {
        "nv_inference_request_success": 3,
        "nv_inference_request_failure": 1,
        "nv_inference_count": 6,
        "nv_inference_exec_count": 3,
    }
    inference = client.get("/v2/models/relu/stats").json()["model_stats"][0]["inference_stats"]
    for name, key in zip(NV_FAMILIES[4:], ("success", *DURATIONS[2:]), strict=True):
        assert relu[name] == inference[key]["ns"] // 1000 > 0, name
    assert samples[("nv_inference_count", "mixed", "1")] == 0


def test_a_merged_batch_is_one_execution(repository: Path) -> None:
    """Concurrent requests merged by the dynamic batcher: every row counted once, each run
    once, and each request's queue wait and compute_infer counted once."""
    settings = ServeSettings(repository=repository, max_batch_delay_ms=20)
    with TestClient(create_app(settings)) as c:
        statuses: list[int] = []

        def send() -> None:
            for _ in range(4):
                statuses.append(c.post("/v2/models/mixed/infer", json=_body(3)).status_code)

        threads = [threading.Thread(target=send) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert statuses == [200] * 24
        stats = c.get("/v2/models/mixed/stats").json()["model_stats"][0]
    inference = stats["inference_stats"]
    assert stats["inference_count"] == 72
    assert inference["success"]["count"] == inference["queue"]["count"] == 24
    assert inference["compute_infer"]["count"] == 24
    runs = stats["batch_stats"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in runs) == 72
    assert sum(b["compute_infer"]["count"] for b in runs) == stats["execution_count"] <= 24
    assert all(b["batch_size"] % 3 == 0 for b in runs)


def test_the_store_sums_runs_per_request() -> None:
    """One run of 5 rows for 2 requests: one execution; each request's compute_infer is the
    run's duration, as Triton counts a batched request."""
    stats, model = Statistics(), SimpleNamespace(name="m", version="1")
    stats.add("m", "1")
    stats.record_execution(model, rows=5, infer_ns=1000, queue_ns=[10, 30])
    stats.record_request(model, success=True, duration_ns=2000)
    stats.record_request(SimpleNamespace(name="m", version="9"), success=True, duration_ns=1)
    (report,) = stats.report([("m", "1")])["model_stats"]
    assert (report["execution_count"], report["inference_count"]) == (1, 5)
    assert report["inference_stats"]["queue"] == {"count": 2, "ns": 40}
    assert report["inference_stats"]["compute_infer"] == {"count": 2, "ns": 2000}
    assert report["inference_stats"]["success"] == {"count": 1, "ns": 2000}
    assert report["batch_stats"][0]["compute_infer"] == {"count": 1, "ns": 1000}
    stats.remove("m", "1")
    assert stats.versions == {}
