"""Load shedding: a bounded number of admitted requests per model, a deadline, health unaffected.

In process, with the model made slow on purpose, so the queue fills in a known way.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from smartmixed.serve.app import create_app
from smartmixed.serve.models import load_repository
from smartmixed.serve.settings import ServeSettings

SLOW_S = 0.3  # one model run


def _slow_app(repository: Path, **settings):
    repo = load_repository(repository, device="cpu", threads=1, skip_bad_models=False)
    model = repo.get("mixed")
    fast = model.predict

    def slow(x, outputs=None):
        time.sleep(SLOW_S)
        return fast(x, outputs)

    model.predict = slow  # the batcher and the unbatched path both call model.predict
    return create_app(ServeSettings(repository=repository, **settings), repository=repo)


async def _fire(app, n: int, x: np.ndarray) -> tuple[list[httpx.Response], float, str]:
    """``n`` concurrent infer requests, then a readiness check while they run."""
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        tasks = [
            asyncio.create_task(client.post("/v2/models/mixed/infer", json=body)) for _ in range(n)
        ]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        health = await client.get("/v2/health/ready")
        health_s = time.perf_counter() - started
        assert health.status_code == 200
        responses = await asyncio.gather(*tasks)
        metrics = (await client.get("/metrics")).text
    return responses, health_s, metrics


@pytest.mark.parametrize("batch", [0, 32], ids=["unbatched", "batched"])
def test_a_full_queue_answers_503_with_retry_after_at_once(repository, digits, batch) -> None:
    app = _slow_app(
        repository, max_batch_size=batch, inference_threads=1, max_queue=2, request_timeout_s=10
    )
    responses, health_s, metrics = asyncio.run(_fire(app, 6, digits.x_test[:1]))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503, 503, 503]
    refused = [r for r in responses if r.status_code == 503]
    assert all(
        r.headers["retry-after"] == "1" and "max_queue" in r.json()["error"] for r in refused
    )
    assert health_s < SLOW_S  # never behind inference
    assert 'smartmixed_shed_total{model="mixed",reason="queue_full"} 4.0' in metrics


def test_work_past_the_deadline_is_dropped_with_503(repository, digits) -> None:
    app = _slow_app(
        repository, max_batch_size=0, inference_threads=1, max_queue=10, request_timeout_s=0.5
    )
    started = time.perf_counter()
    responses, _, metrics = asyncio.run(_fire(app, 5, digits.x_test[:1]))
    elapsed = time.perf_counter() - started
    codes = sorted(r.status_code for r in responses)
    # one thread, 0.3 s a run, 0.5 s deadline: the first one or two finish, the rest are dropped
    assert codes.count(200) in (1, 2) and codes.count(503) == 5 - codes.count(200)
    assert all("request_timeout_s" in r.json()["error"] for r in responses if r.status_code == 503)
    assert 'reason="deadline"' in metrics
    # dropped work was never run: 5 runs in a row would take 1.5 s
    assert elapsed < 5 * SLOW_S


def test_the_deadline_starts_once_the_body_is_in(repository, digits) -> None:
    """An upload slower than request_timeout_s is answered: the deadline bounds the wait for
    the model, not the client's upload (the body timeout bounds that)."""
    app = _slow_app(repository, max_batch_size=0, request_timeout_s=0.5)
    row = digits.x_test[0].tolist()
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": row}]}
    ).encode()
    upload_s = 0.7  # over the deadline; a model run (SLOW_S) fits the deadline after it

    async def slow_upload():
        yield body[: len(body) // 2]
        await asyncio.sleep(upload_s)
        yield body[len(body) // 2 :]

    async def post() -> httpx.Response:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            ) as client,
        ):
            return await client.post(
                "/v2/models/mixed/infer",
                content=slow_upload(),
                headers={"content-type": "application/json", "content-length": str(len(body))},
            )

    started = time.perf_counter()
    response = asyncio.run(post())
    assert time.perf_counter() - started > upload_s
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["logits", "probabilities"]
