"""A short queue that runs concurrent queries as one batch.

Requests put their job on the queue and wait; one worker thread takes every job that is
waiting (up to ``max_batch``; optionally after ``max_wait`` seconds for more) and runs them with
one call, so a model embeds eight images in one forward pass instead of eight passes one after
another. Under light load a job runs alone at once; under heavy load batches grow by themselves
while the previous one runs, which is what makes throughput grow with load.

The batch function runs in its own thread (never two batches at once: the model is not shared
between threads), so the event loop keeps serving other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["Batcher", "Busy"]

logger = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The queue is full: the caller should answer 503 and let the client retry."""


class Batcher:
    """Run ``run_batch(jobs) -> results`` (one result per job, in order) over queued jobs.

    ``max_batch=1`` runs the jobs one at a time through the same queue (the unbatched peer in
    ``benchmarks/bench_serve.py``). A result that is an ``Exception`` is raised in that job's
    caller only. If ``run_batch`` itself raises on a batch of several jobs, each job is run
    again alone, so one bad job never fails the others.
    """

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 32,
                 max_wait: float = 0.0, max_pending: int = 1024) -> None:
        if max_batch < 1 or max_pending < 1 or max_wait < 0:
            raise ValueError(f"expected max_batch >= 1, max_pending >= 1, max_wait >= 0; got {max_batch}, "
                             f"{max_pending}, {max_wait}")
        self.run_batch = run_batch
        self.max_batch, self.max_wait, self.max_pending = max_batch, max_wait, max_pending
        self.batches = 0  # counters for /info and the benchmark
        self.jobs = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the worker on the running event loop (the application's lifespan)."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unicom-batch")
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = None

    async def submit(self, job: Any) -> Any:
        """Queue ``job`` and wait for its result."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not awaited")
        if self._queue.qsize() >= self.max_pending:
            raise Busy(f"{self._queue.qsize()} queries are waiting; try again shortly")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, future))
        return await future

    async def _collect(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(job, future) for job, future in await self._collect() if not future.done()]  # cancelled
            if not batch:
                continue
            jobs = [job for job, _ in batch]
            results = await loop.run_in_executor(self._executor, self._run_safely, jobs)
            self.batches += 1
            self.jobs += len(jobs)
            for (_, future), result in zip(batch, results):
                if future.done():  # the client went away meanwhile
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _run_safely(self, jobs: list[Any]) -> list[Any]:
        """``run_batch(jobs)``, or each job alone when the batch fails as a whole."""
        try:
            results = list(self.run_batch(jobs))
            if len(results) != len(jobs):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} jobs")
            return results
        except Exception as error:  # noqa: BLE001 - handed to the callers, never kills the worker
            if len(jobs) == 1:
                return [error]
            logger.warning("a batch of %d queries failed (%s); running them one by one", len(jobs), error)
            return [self._run_safely([job])[0] for job in jobs]
