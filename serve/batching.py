"""Dynamic batching: one small class, no FastAPI (MLServer's AdaptiveBatcher)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from smartmixed.serve.models import ServeError


class Overloaded(ServeError):
    """Load shedding: the request was refused or dropped; the client should retry later."""

    status = 503


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float


class AdaptiveBatcher:
    """Merges concurrent predict calls for one model version into one run, then splits it back.

    Two knobs: ``max_batch_size`` rows and ``max_delay`` seconds. The queue and its worker task
    are created inside the running loop on first use. The worker takes every request already
    queued; it waits (up to max_delay) for more only when the previous run held several requests,
    so a lone client never pays the delay. Each caller gets exactly its own rows back.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], dict[str, np.ndarray]],
        *,
        max_batch_size: int,
        max_delay: float,
        executor: Executor,
        observe: Callable[[int, list[float], float], None] | None = None,
    ) -> None:
        self._predict, self._executor, self._observe = predict, executor, observe
        self.max_batch_size, self.max_delay = max_batch_size, max_delay
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Pending | None = None
        self._last_requests = 1

    async def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return await self.submit(x)

    def submit(self, x: np.ndarray) -> asyncio.Future:
        """Queue ``x``; the future gets its rows' outputs. Cancel it to drop the request."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        self._queue.put_nowait(_Pending(x, future, time.perf_counter()))
        return future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, rows = [first], len(first.x)
        deadline = time.perf_counter() + (self.max_delay if self._last_requests > 1 else 0.0)
        while rows < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if rows + len(item.x) > self.max_batch_size:
                self._carry = item  # first of the next batch
                break
            batch.append(item)
            rows += len(item.x)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [p for p in batch if not p.future.done()]  # a caller may have gone
            if not live:
                continue
            self._last_requests = len(live)
            started = time.perf_counter()
            x = live[0].x if len(live) == 1 else np.concatenate([p.x for p in live])
            try:
                result = await loop.run_in_executor(self._executor, self._predict, x)
            except Exception as e:  # the model failed: every caller hears about it
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            if self._observe is not None:  # rows, queue waits, inference seconds
                self._observe(
                    len(x), [started - p.enqueued for p in live], time.perf_counter() - started
                )
            start = 0
            for p in live:
                stop = start + len(p.x)
                if not p.future.done():
                    p.future.set_result({k: v[start:stop] for k, v in result.items()})
                start = stop
