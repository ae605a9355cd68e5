from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from smartmixed.serve.batching import AdaptiveBatcher
from smartmixed.serve.models import load_repository


def test_batched_results_equal_unbatched_row_for_row(repository: Path) -> None:
    repo = load_repository(repository, device="cpu", threads=1, skip_bad_models=False)
    model = repo.get("mixed")
    batches: list[int] = []
    rng = np.random.default_rng(0)
    requests = [
        rng.uniform(0, 16, (int(rng.integers(1, 6)), 64)).astype(np.float32) for _ in range(80)
    ]

    async def main() -> list[dict[str, np.ndarray]]:
        with ThreadPoolExecutor(2) as pool:
            batcher = AdaptiveBatcher(
                model.predict,
                max_batch_size=16,
                max_delay=0.005,
                executor=pool,
                observe=lambda rows, waits, seconds: batches.append(rows),
            )
            results = await asyncio.gather(*(batcher.predict(x) for x in requests))
            await batcher.close()
            return results

    results = asyncio.run(main())
    for x, result in zip(requests, results, strict=True):
        alone = model.predict(x)
        for name in ("logits", "probabilities"):
            assert result[name].shape == (len(x), 10)
            np.testing.assert_allclose(result[name], alone[name], rtol=1e-5, atol=1e-6)
    assert sum(batches) == sum(len(x) for x in requests)
    assert max(batches) > 5 and max(batches) <= 16  # requests were merged, within the limit
    assert len(batches) < len(requests)


def test_a_failing_model_fails_every_caller_of_its_batch() -> None:
    def broken(x: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("model exploded")

    async def main() -> list:
        with ThreadPoolExecutor(1) as pool:
            batcher = AdaptiveBatcher(broken, max_batch_size=8, max_delay=0.001, executor=pool)
            out = await asyncio.gather(
                *(batcher.predict(np.zeros((1, 3), np.float32)) for _ in range(4)),
                return_exceptions=True,
            )
            await batcher.close()
            return out

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))
