"""An asyncio micro-batcher: many concurrent callers, one batched call at a time.

Callers ``await submit(job)``. A loop takes the first waiting job, keeps collecting for at most
``max_wait_s`` or until ``max_batch_tokens`` is reached, runs the batch in a worker thread (so the
event loop keeps serving) and hands each caller its own result. A caller that leaves (its
``submit`` is cancelled) takes its job out at once: out of the queue, or out of the batch being
collected, so it never runs and never counts against a batch's token budget; only a job already
in a running batch cannot be recalled (its result is dropped). A batch that raises fails its own
callers only; the loop goes on. The queue itself is unbounded: admission control in front of the
batcher bounds it (a caller that left has given its admission back, and its job is gone too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
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


@dataclass(eq=False)  # compared by identity: jobs may hold arrays
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
        self._pending: deque[_Waiting[JobT, ResultT]] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Jobs taken off the queue into the batch being collected (failed if the loop stops).
        self._collecting: list[_Waiting[JobT, ResultT]] = []
        self.batches_run = 0
        #: Jobs whose caller left before they ran (they never reached ``run_batch``).
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
        while self._pending:
            waiting = self._pending.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(BatcherClosedError("the engine is shutting down"))

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet taken into a batch."""
        return len(self._pending)

    @property
    def collecting(self) -> int:
        """Jobs taken into the batch being collected, not yet running."""
        return len(self._collecting)

    async def submit(self, job: JobT) -> ResultT:
        """Queue ``job`` and wait for its result (cancelling the wait takes the job out)."""
        if self._closed:
            raise BatcherClosedError("the engine is shutting down")
        if self._task is None:
            self.start()
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        waiting = _Waiting(job, max(1, self._cost(job)), future)
        self._pending.append(waiting)
        self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(waiting)
            raise

    def _withdraw(self, waiting: _Waiting[JobT, ResultT]) -> None:
        """Take a job whose caller left out of the queue or the batch being collected."""
        for place in (self._pending, self._collecting):
            try:
                place.remove(waiting)
            except ValueError:
                continue
            self.jobs_dropped += 1
            return
        # Already in a running batch (or finished): its result will be dropped.

    async def _take(self, deadline: float | None) -> _Waiting[JobT, ResultT] | None:
        """The next queued job, waiting until ``deadline`` (``None``: for ever) for one."""
        while not self._pending:
            self._arrived.clear()
            if deadline is None:
                await self._arrived.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return None
        return self._pending.popleft()

    async def _collect(self) -> list[_Waiting[JobT, ResultT]]:
        first = await self._take(None)
        assert first is not None
        batch = self._collecting = [first]
        deadline = time.monotonic() + self.max_wait_s
        # Costs are summed afresh each time: a caller that leaves takes its job (and cost) out.
        while sum(w.cost for w in batch) < self.max_batch_tokens:
            nxt = self._pending.popleft() if self._pending else await self._take(deadline)
            if nxt is None:
                break
            if batch and sum(w.cost for w in batch) + nxt.cost > self.max_batch_tokens:
                # Too big to join: it leads the next batch instead of waiting behind others.
                self._pending.appendleft(nxt)
                break
            batch.append(nxt)
        return batch

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
