"""The asyncio micro-batcher (``service/batching.py``) with a real one-thread executor.

A fake ``run_batch`` records every batch it is given and can be told to raise or to block on a
``threading.Event``. Each test runs its own event loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbridge.service.batching import BatcherClosedError, MicroBatcher

WAIT_S = 2.0  # upper bound for anything that should happen at once


class FakeRunner:
    """``run_batch`` that returns ``job * 10`` per job and records what it saw."""

    def __init__(
        self,
        fail_if: Callable[[Sequence[int]], bool] = lambda jobs: False,
        result_count: Callable[[int], int] = lambda n: n,
    ) -> None:
        self.batches: list[list[int]] = []
        self.fail_if = fail_if
        self.result_count = result_count
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()  # not blocking unless a test clears it

    def __call__(self, jobs: Sequence[int]) -> list[int]:
        self.batches.append(list(jobs))
        self.started.set()
        if not self.release.wait(WAIT_S):
            raise AssertionError("the test never released the batch")
        if self.fail_if(jobs):
            raise KeyError(f"bad batch {list(jobs)}")
        results = [job * 10 for job in jobs]
        return (results * 2)[: self.result_count(len(jobs))]

    @property
    def seen(self) -> list[int]:
        return [job for batch in self.batches for job in batch]


def run_with_batcher(runner, test, cost=lambda job: 1, **options):
    """Run ``await test(batcher)`` in a fresh event loop with a one-thread executor."""

    async def main():
        batcher = MicroBatcher(runner, cost, executor=executor, **options)
        try:
            return await asyncio.wait_for(test(batcher), WAIT_S * 2)
        finally:
            await batcher.close()

    with ThreadPoolExecutor(max_workers=1) as executor:
        try:
            return asyncio.run(main())
        finally:
            runner.release.set()  # never leave the worker thread blocked


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition()`` holds (bounded by the caller's timeout)."""
    while not condition():
        await asyncio.sleep(0.001)


def test_concurrent_submits_are_grouped_and_each_caller_gets_its_own_result():
    runner = FakeRunner()
    jobs = [7, 3, 11, 0, 5, 9, 2, 8]

    async def test(batcher):
        return await asyncio.gather(*(batcher.submit(job) for job in jobs)), batcher.batches_run

    results, batches_run = run_with_batcher(runner, test, max_wait_s=0.05)
    assert results == [job * 10 for job in jobs]
    assert len(runner.batches) < len(jobs)
    assert batches_run == len(runner.batches)
    assert sorted(runner.seen) == sorted(jobs)


def test_a_caller_arriving_within_max_wait_joins_the_batch():
    runner = FakeRunner()

    async def test(batcher):
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.02)  # well inside max_wait_s
        second = asyncio.create_task(batcher.submit(2))
        return await asyncio.gather(first, second)

    assert run_with_batcher(runner, test, max_wait_s=1.0, max_batch_tokens=2) == [10, 20]
    assert runner.batches == [[1, 2]]


def test_max_wait_zero_runs_a_lone_job_at_once():
    runner = FakeRunner()

    async def test(batcher):
        return await batcher.submit(4)

    assert run_with_batcher(runner, test, max_wait_s=0.0) == 40
    assert runner.batches == [[4]]


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(0, 15), min_size=1, max_size=12),
    st.integers(1, 12),
    st.sampled_from([0.0, 0.01]),
)
def test_max_batch_tokens_is_respected_and_results_follow_callers(costs, budget, wait):
    runner = FakeRunner()
    jobs = list(range(len(costs)))

    def cost(job):
        return costs[job]

    async def test(batcher):
        return await asyncio.gather(*(batcher.submit(job) for job in jobs))

    results = run_with_batcher(runner, test, cost=cost, max_wait_s=wait, max_batch_tokens=budget)
    assert results == [job * 10 for job in jobs]
    assert runner.seen == jobs  # first come, first served: nothing overtakes
    for batch in runner.batches:
        total = sum(max(1, costs[job]) for job in batch)
        assert total <= budget or len(batch) == 1, (batch, budget)
    # Greedy: a batch stopped early only because the next job would not fit.
    for batch, following in zip(runner.batches, runner.batches[1:], strict=False):
        total = sum(max(1, costs[job]) for job in batch)
        assert total + max(1, costs[following[0]]) > budget


def test_a_job_bigger_than_the_budget_runs_alone():
    runner = FakeRunner()
    costs = {1: 2, 2: 50, 3: 2, 4: 2}

    async def test(batcher):
        return await asyncio.gather(*(batcher.submit(job) for job in costs))

    results = run_with_batcher(
        runner, test, cost=costs.__getitem__, max_wait_s=0.01, max_batch_tokens=10
    )
    assert results == [10, 20, 30, 40]
    assert runner.batches == [[1], [2], [3, 4]]


def test_a_failing_batch_fails_only_its_own_callers_and_the_loop_goes_on():
    runner = FakeRunner(fail_if=lambda jobs: 13 in jobs)

    async def test(batcher):
        first = await asyncio.gather(
            *(batcher.submit(j) for j in (1, 13, 2)), return_exceptions=True
        )
        second = await asyncio.gather(*(batcher.submit(j) for j in (3, 4)))
        return first, second, batcher.batches_run

    first, second, batches_run = run_with_batcher(runner, test, max_wait_s=0.01)
    assert runner.batches == [[1, 13, 2], [3, 4]]
    assert all(isinstance(error, KeyError) for error in first)
    assert first[0] is first[1] is first[2]  # the batch's own exception, not a stand-in
    assert "bad batch [1, 13, 2]" in str(first[0])
    assert second == [30, 40]
    assert batches_run == 1  # only the good one counts


def test_a_failing_batch_does_not_touch_a_batch_queued_behind_it():
    runner = FakeRunner(fail_if=lambda jobs: 13 in jobs)
    runner.release.clear()

    async def test(batcher):
        bad = asyncio.create_task(batcher.submit(13))
        await until(runner.started.is_set)
        good = asyncio.create_task(batcher.submit(5))
        await until(lambda: batcher.waiting == 1)
        runner.release.set()
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = run_with_batcher(runner, test, max_wait_s=0.0)
    assert isinstance(bad, KeyError)
    assert good == 50
    assert runner.batches == [[13], [5]]


@pytest.mark.parametrize("count", [lambda n: n - 1, lambda n: n + 1, lambda n: 0])
def test_a_result_count_mismatch_fails_those_callers(count):
    runner = FakeRunner(result_count=count)

    async def test(batcher):
        return await asyncio.gather(*(batcher.submit(j) for j in (1, 2, 3)), return_exceptions=True)

    results = run_with_batcher(runner, test, max_wait_s=0.01)
    assert len(runner.batches) == 1
    assert all(isinstance(r, RuntimeError) for r in results)
    assert "batch of 3 jobs gave" in str(results[0])


def test_a_caller_cancelled_in_the_queue_is_dropped():
    runner = FakeRunner()
    runner.release.clear()

    async def test(batcher):
        first = asyncio.create_task(batcher.submit(1))
        await until(runner.started.is_set)
        doomed = asyncio.create_task(batcher.submit(2))
        await until(lambda: batcher.waiting == 1)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.waiting == 0  # its job left the queue at once, before any batch ran
        later = asyncio.create_task(batcher.submit(3))
        await until(lambda: batcher.waiting == 1)
        runner.release.set()
        return await first, await later, batcher.jobs_dropped, batcher.batches_run

    first, later, dropped, batches_run = run_with_batcher(runner, test, max_wait_s=0.0)
    assert (first, later) == (10, 30)
    assert dropped == 1
    assert 2 not in runner.seen
    assert runner.batches == [[1], [3]]
    assert batches_run == 2


def test_a_batch_of_only_cancelled_callers_never_reaches_run_batch():
    runner = FakeRunner()
    runner.release.clear()

    async def test(batcher):
        first = asyncio.create_task(batcher.submit(1))
        await until(runner.started.is_set)
        doomed = [asyncio.create_task(batcher.submit(j)) for j in (2, 3)]
        await until(lambda: batcher.waiting == 2)
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        runner.release.set()
        await first
        after = await batcher.submit(4)
        return after, batcher.jobs_dropped

    after, dropped = run_with_batcher(runner, test, max_wait_s=0.0)
    assert after == 40
    assert dropped == 2
    assert runner.batches == [[1], [4]]


def test_close_fails_running_and_waiting_jobs_and_refuses_new_ones():
    runner = FakeRunner()
    runner.release.clear()

    async def test(batcher):
        running = asyncio.create_task(batcher.submit(1))
        await until(runner.started.is_set)
        waiting = asyncio.create_task(batcher.submit(2))
        await until(lambda: batcher.waiting == 1)
        await batcher.close()
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
        with pytest.raises(BatcherClosedError):
            await batcher.submit(3)
        return outcomes, batcher.waiting

    outcomes, left = run_with_batcher(runner, test, max_wait_s=0.0)
    assert all(isinstance(outcome, BatcherClosedError) for outcome in outcomes)
    assert left == 0
    assert runner.seen == [1]


def test_submit_after_close_raises_even_if_never_started():
    runner = FakeRunner()

    async def test(batcher):
        await batcher.close()
        with pytest.raises(BatcherClosedError):
            await batcher.submit(1)
        return True

    assert run_with_batcher(runner, test)
    assert runner.batches == []


def test_close_fails_a_job_taken_into_a_batch_still_being_collected():
    runner = FakeRunner()

    async def test(batcher):
        job = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.02)
        assert batcher.waiting == 0 and not runner.batches  # the loop holds job 1, waits for more
        await batcher.close()
        try:
            await asyncio.wait_for(job, 0.3)
        except BatcherClosedError:
            return "closed"
        except TimeoutError:
            return "still waiting"
        return "ran"

    assert run_with_batcher(runner, test, max_wait_s=30.0) == "closed"
    assert runner.batches == []


@pytest.mark.parametrize(
    "options", [{"max_wait_s": -0.001}, {"max_batch_tokens": 0}, {"max_batch_tokens": -5}]
)
def test_constructor_refuses_bad_limits(options):
    with ThreadPoolExecutor(max_workers=1) as executor, pytest.raises(ValueError):
        MicroBatcher(FakeRunner(), lambda job: 1, executor=executor, **options)


def test_constructor_accepts_boundary_limits():
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = MicroBatcher(
            FakeRunner(), lambda job: 1, executor=executor, max_wait_s=0, max_batch_tokens=1
        )
    assert (batcher.max_wait_s, batcher.max_batch_tokens) == (0, 1)
