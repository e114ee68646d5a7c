"""Per-key quotas: teacher tokens a minute and requests in flight, for each API key.

Tokens are charged after a request, from the ``usage`` it reports (the count is only known
then); a key whose balance is spent is refused with 429 and a ``Retry-After`` that says when the
balance is positive again. The balance refills continuously at the key's rate and holds at most
one minute's worth, so a quiet key can burst once. Keys are known only by their hashes; logs and
metrics name a key by ``key_id`` (the first 8 hex characters of its hash).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tokenbridge.service.errors import QuotaExceededError

__all__ = ["KeyQuotas", "key_id"]


def key_id(key_hash: str) -> str:
    """The short, non-secret name of a key in logs and metrics."""
    return key_hash[:8]


@dataclass
class _Bucket:
    rate_per_s: float
    capacity: float
    balance: float
    updated: float


class KeyQuotas:
    """Token buckets and in-flight counts per key hash (one event loop: no lock needed)."""

    def __init__(
        self,
        tokens_per_minute: dict[str, int],
        max_requests_in_flight: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        now = clock()
        self._buckets = {
            key_hash: _Bucket(rate / 60.0, float(rate), float(rate), now)
            for key_hash, rate in tokens_per_minute.items()
            if rate > 0
        }
        self.max_requests_in_flight = max_requests_in_flight
        self.in_flight: dict[str, int] = {}

    def _refill(self, bucket: _Bucket) -> None:
        now = self._clock()
        bucket.balance = min(
            bucket.capacity, bucket.balance + (now - bucket.updated) * bucket.rate_per_s
        )
        bucket.updated = now

    def balance(self, key_hash: str) -> float | None:
        """Tokens the key may still use now; ``None`` when it has no token quota."""
        bucket = self._buckets.get(key_hash)
        if bucket is None:
            return None
        self._refill(bucket)
        return bucket.balance

    @contextmanager
    def hold(self, key_hash: str | None) -> Iterator[None]:
        """Admit one request of ``key_hash`` for the block, or raise ``QuotaExceededError``.

        ``None`` (no keys configured) is never limited.
        """
        if key_hash is None:
            yield
            return
        bucket = self._buckets.get(key_hash)
        if bucket is not None:
            self._refill(bucket)
            if bucket.balance <= 0:
                wait = -bucket.balance / bucket.rate_per_s + 1e-3
                raise QuotaExceededError(
                    f"API key {key_id(key_hash)} has used its quota of "
                    f"{round(bucket.capacity)} teacher tokens a minute; retry in {wait:.1f} s",
                    retry_after_s=wait,
                )
        running = self.in_flight.get(key_hash, 0)
        if self.max_requests_in_flight and running >= self.max_requests_in_flight:
            raise QuotaExceededError(
                f"API key {key_id(key_hash)} already has {running} requests in flight, its "
                f"limit (key_max_requests_in_flight); wait for one to finish",
                retry_after_s=1.0,
            )
        self.in_flight[key_hash] = running + 1
        try:
            yield
        finally:
            left = self.in_flight[key_hash] - 1
            if left:
                self.in_flight[key_hash] = left
            else:
                del self.in_flight[key_hash]

    def charge(self, key_hash: str | None, tokens: int) -> None:
        """Take ``tokens`` teacher tokens from the key's balance (it may go below zero)."""
        bucket = self._buckets.get(key_hash) if key_hash is not None else None
        if bucket is None:
            return
        self._refill(bucket)
        bucket.balance -= tokens
