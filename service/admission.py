"""Admission control: a bound on teacher tokens in flight, with a short, bounded, fair wait.

A request states how many teacher tokens it needs. It is admitted at once when that fits under
the bound and nobody is waiting. Otherwise it joins a first-in, first-out line of at most
``max_waiting`` requests for at most ``max_wait_s`` seconds; when the line is full or the wait
runs out it is refused with 429 and a ``Retry-After`` estimated from the recent throughput.

The line is what keeps refused students from starving: without it a student answered a moment
ago sends again at once and takes the freed capacity, while a refused one sleeps its
``Retry-After``, again and again. Arrivals never overtake requests already waiting.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from tokenbridge.service.errors import OverloadedError

__all__ = ["Admission"]

_RATE_WINDOW_S = 30.0


@dataclass
class _Waiter:
    tokens: int
    granted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Admission:
    """Tokens in flight against ``limit``, and the line of requests waiting for room.

    Single event loop: no lock needed.
    """

    def __init__(
        self,
        limit: int,
        max_wait_s: float = 0.0,
        max_waiting: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self.in_flight = 0
        self._clock = clock
        self._line: collections.deque[_Waiter] = collections.deque()
        # (finish time, tokens) of recent requests: the service's throughput, batching included.
        self._finished: collections.deque[tuple[float, int]] = collections.deque()
        self._started_at = clock()

    @property
    def waiting(self) -> int:
        """Requests waiting in line now."""
        return len(self._line)

    def _fits(self, tokens: int) -> bool:
        # An idle service admits any single request (max_request_tokens bounds its size).
        return self.in_flight == 0 or self.in_flight + tokens <= self.limit

    def throughput(self) -> float:
        """Teacher tokens finished per second over the last half minute (a cautious guess before
        anything finished)."""
        now = self._clock()
        while self._finished and self._finished[0][0] < now - _RATE_WINDOW_S:
            self._finished.popleft()
        if not self._finished:
            return 2000.0
        span = max(1.0, min(_RATE_WINDOW_S, now - self._started_at))
        return max(1.0, sum(tokens for _, tokens in self._finished) / span)

    def _refusal(self, tokens: int, why: str) -> OverloadedError:
        ahead = self.in_flight + sum(w.tokens for w in self._line)
        retry = max(0.0, ahead + tokens - self.limit) / self.throughput()
        return OverloadedError(
            f"{self.in_flight} teacher tokens are in flight and this request needs {tokens}; "
            f"the limit is {self.limit} (max_tokens_in_flight) and {why}. Retry later.",
            retry_after_s=retry,
        )

    def _grant_waiting(self) -> None:
        while self._line and self._fits(self._line[0].tokens):
            waiter = self._line.popleft()
            if waiter.granted.done():  # it gave up (timed out or cancelled) meanwhile
                continue
            self.in_flight += waiter.tokens
            waiter.granted.set_result(None)

    async def _enter(self, tokens: int) -> None:
        if not self._line and self._fits(tokens):
            self.in_flight += tokens
            return
        if self.max_wait_s <= 0 or len(self._line) >= self.max_waiting:
            why = (
                "nothing waits for room here (admission_wait_s is 0)"
                if self.max_wait_s <= 0
                else f"{len(self._line)} requests already wait for room (admission_queue)"
            )
            raise self._refusal(tokens, why)
        waiter = _Waiter(tokens)
        self._line.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), self.max_wait_s)
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                # Granted just as the wait ended: give the room back to the line.
                self.in_flight -= tokens
                self._grant_waiting()
            else:
                waiter.granted.cancel()
                if waiter in self._line:
                    self._line.remove(waiter)
                self._grant_waiting()  # a large request leaving the head may unblock others
            raise

    @asynccontextmanager
    async def admit(self, tokens: int) -> AsyncIterator[None]:
        """Hold ``tokens`` for the duration of the block; ``OverloadedError`` (429) when there is
        no room within the wait allowed."""
        try:
            await self._enter(tokens)
        except TimeoutError:
            raise self._refusal(
                tokens, f"no room came within admission_wait_s ({self.max_wait_s} s)"
            ) from None
        try:
            yield
        finally:
            self.in_flight -= tokens
            self._finished.append((self._clock(), tokens))
            self._grant_waiting()
