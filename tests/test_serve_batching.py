"""The query queue of `unicom serve`: jobs that wait together run as one batch, each caller gets its
own result or its own error, and a failing batch never stops the worker."""

from __future__ import annotations

import asyncio

import pytest

from unicom.serve.batching import Batcher, Busy


def run(coroutine):
    return asyncio.run(coroutine)


async def with_batcher(run_batch, body, **options):
    batcher = Batcher(run_batch, **options)
    await batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


def test_waiting_jobs_run_as_one_batch_in_order():
    sizes = []

    def square(jobs):
        sizes.append(len(jobs))
        return [j * j for j in jobs]

    async def body(batcher):
        first = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        second = await batcher.submit(7)
        return first, second, batcher.batches, batcher.jobs

    results, alone, batches, jobs = run(with_batcher(square, body, max_batch=32, max_wait=0))
    assert results == [i * i for i in range(10)] and alone == 49
    assert sizes == [10, 1] and (batches, jobs) == (2, 11)


def test_max_batch_bounds_a_batch():
    sizes = []

    def echo(jobs):
        sizes.append(len(jobs))
        return list(jobs)

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert run(with_batcher(echo, body, max_batch=4, max_wait=0)) == list(range(10))
    assert sizes == [4, 4, 2]
    sizes.clear()
    assert run(with_batcher(echo, body, max_batch=1, max_wait=0)) == list(range(10))
    assert sizes == [1] * 10  # the unbatched peer: one job per call


def test_one_bad_job_fails_alone():
    calls = []

    def invert(jobs):
        calls.append(list(jobs))
        return [1 / j for j in jobs]  # ZeroDivisionError for the whole batch if any job is 0

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit(j) for j in (1, 0, 4)), return_exceptions=True)

    one, zero, four = run(with_batcher(invert, body, max_wait=0))
    assert (one, four) == (1.0, 0.25) and isinstance(zero, ZeroDivisionError)
    assert calls == [[1, 0, 4], [1], [0], [4]]  # the batch, then each job alone


def test_an_exception_as_a_result_goes_to_its_caller_and_the_worker_goes_on():
    def check(jobs):
        return [ValueError(f"bad {j}") if j < 0 else j for j in jobs]

    async def body(batcher):
        got = await asyncio.gather(batcher.submit(-1), batcher.submit(2), return_exceptions=True)
        return got, await batcher.submit(3)

    (bad, good), later = run(with_batcher(check, body, max_wait=0))
    assert isinstance(bad, ValueError) and str(bad) == "bad -1" and good == 2 and later == 3


def test_a_full_queue_is_busy():
    async def body(batcher):
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0)  # the three are queued; the worker has not taken them yet
        with pytest.raises(Busy):
            await batcher.submit(99)
        return await asyncio.gather(*tasks)

    assert run(with_batcher(lambda jobs: list(jobs), body, max_pending=3, max_wait=0)) == [0, 1, 2]


@pytest.mark.parametrize("options", [{"max_batch": 0}, {"max_pending": 0}, {"max_wait": -1}])
def test_bad_options(options):
    with pytest.raises(ValueError, match="expected max_batch >= 1"):
        Batcher(lambda jobs: jobs, **options)
