"""An asyncio micro-batcher: many concurrent callers, one batched call at a time.

Callers ``await submit(job)``. A loop takes the first waiting job, keeps collecting for at most
``max_wait_s`` or until ``max_batch_tokens`` is reached, drops jobs whose caller has left, runs the
batch in a worker thread (so the event loop keeps serving) and hands each caller its own result.
A batch that raises fails its own callers only; the loop goes on. The queue itself is unbounded:
admission control in front of the batcher bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatcherClosedError", "MicroBatcher"]

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")

logger = logging.getLogger("tokenbridge.service.batching")


class BatcherClosedError(RuntimeError):
    """The batcher was closed before the job ran."""


@dataclass
class _Waiting(Generic[JobT, ResultT]):
    job: JobT
    cost: int
    future: asyncio.Future[ResultT]


class MicroBatcher(Generic[JobT, ResultT]):
    """Groups concurrent jobs into batches for ``run_batch`` (called in ``executor``)."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[JobT]], Sequence[ResultT]],
        cost: Callable[[JobT], int],
        *,
        executor: Executor,
        max_wait_s: float = 0.005,
        max_batch_tokens: int = 8192,
    ) -> None:
        if max_wait_s < 0 or max_batch_tokens < 1:
            raise ValueError("max_wait_s must be >= 0 and max_batch_tokens >= 1")
        self._run_batch = run_batch
        self._cost = cost
        self._executor = executor
        self.max_wait_s = max_wait_s
        self.max_batch_tokens = max_batch_tokens
        self._queue: asyncio.Queue[_Waiting[JobT, ResultT]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Jobs taken off the queue into the batch being collected (failed if the loop stops).
        self._collecting: list[_Waiting[JobT, ResultT]] = []
        self.batches_run = 0
        self.jobs_dropped = 0

    def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def close(self) -> None:
        """Stop the loop; jobs still waiting fail with ``BatcherClosedError``."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            waiting = self._queue.get_nowait()
            if not waiting.future.done():
                waiting.future.set_exception(BatcherClosedError("the engine is shutting down"))

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet taken into a batch."""
        return self._queue.qsize()

    async def submit(self, job: JobT) -> ResultT:
        """Queue ``job`` and wait for its result (cancelling the wait drops the job)."""
        if self._closed:
            raise BatcherClosedError("the engine is shutting down")
        if self._task is None:
            self.start()
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(job, max(1, self._cost(job)), future))
        return await future

    async def _collect(self) -> list[_Waiting[JobT, ResultT]]:
        first = await self._queue.get()
        batch = self._collecting = [first]
        tokens = first.cost
        deadline = time.monotonic() + self.max_wait_s
        while tokens < self.max_batch_tokens:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                nxt = self._queue.get_nowait()
            if tokens + nxt.cost > self.max_batch_tokens:
                # Too big to join: it leads the next batch instead of waiting behind others.
                self._requeue_front(nxt)
                break
            batch.append(nxt)
            tokens += nxt.cost
        return batch

    def _requeue_front(self, waiting: _Waiting[JobT, ResultT]) -> None:
        rest = [waiting]
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
        for item in rest:
            self._queue.put_nowait(item)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                batch = await self._collect()
            except asyncio.CancelledError:
                for waiting in self._collecting:
                    if not waiting.future.done():
                        waiting.future.set_exception(BatcherClosedError("the engine stopped"))
                raise
            self._collecting = []
            live = [w for w in batch if not w.future.done()]
            self.jobs_dropped += len(batch) - len(live)
            if not live:
                continue
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, [w.job for w in live]
                )
                if len(results) != len(live):
                    raise RuntimeError(f"batch of {len(live)} jobs gave {len(results)} results")
            except asyncio.CancelledError:
                for waiting in live:
                    if not waiting.future.done():
                        waiting.future.set_exception(BatcherClosedError("the engine stopped"))
                raise
            except Exception as error:  # a bad batch fails its own callers, never the loop
                logger.warning("batch of %d jobs failed: %r", len(live), error)
                for waiting in live:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                continue
            self.batches_run += 1
            for waiting, result in zip(live, results, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(result)
