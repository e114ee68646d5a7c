"""Admission control: a bound on teacher tokens in flight. Refuse, never queue without bound.

A request states how many teacher tokens it needs; if admitting it would pass the bound it is
refused at once with 429 and a ``Retry-After`` estimated from the recent service rate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from tokenbridge.service.errors import OverloadedError

__all__ = ["Admission"]


class Admission:
    """Counts tokens in flight against ``limit`` (single event loop: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._rate_tokens_per_s = 2000.0  # a cautious start; learnt from finished requests

    @contextmanager
    def admit(self, tokens: int) -> Iterator[None]:
        """Hold ``tokens`` for the duration of the block; ``OverloadedError`` if over the limit."""
        if self.in_flight and self.in_flight + tokens > self.limit:
            retry = self.in_flight / self._rate_tokens_per_s
            raise OverloadedError(
                f"{self.in_flight} teacher tokens are in flight and this request needs {tokens}; "
                f"the limit is {self.limit} (max_tokens_in_flight). Retry later.",
                retry_after_s=retry,
            )
        self.in_flight += tokens
        started = time.monotonic()
        try:
            yield
        finally:
            self.in_flight -= tokens
            elapsed = time.monotonic() - started
            if elapsed > 0:
                rate = tokens / elapsed
                self._rate_tokens_per_s = 0.8 * self._rate_tokens_per_s + 0.2 * rate
