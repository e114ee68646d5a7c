"""The replica pool: each service URL's state, the choice of replica for an attempt, the request
loop with its retries, backoff, ``Retry-After`` and failover, and the codec of bodies."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenbridge.client.errors import (
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from tokenbridge.client.teacher.config import ClientStats, TeacherClientConfig
from tokenbridge.shared.codec import MSGPACK, body_encoding, pack, unpack
from tokenbridge.shared.errors import CodecError
from tokenbridge.shared.protocol import (
    retry_after_seconds,
)

logger = logging.getLogger("tokenbridge.client.teacher")


@dataclass(eq=False)
class _Replica:
    """One service URL and what the client knows about it."""

    url: str
    index: int
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    #: Avoided until then (it refused connections); still used when every replica is avoided.
    down_until: float = 0.0
    #: Never sent anything before then: the replica's own ``Retry-After``.
    not_before: float = 0.0
    #: Its info and the student's registration were checked since it last became unreachable.
    verified: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def blocked(self, now: float) -> bool:
        return self.down_until > now or self.not_before > now


@dataclass(frozen=True)
class _Retryable:
    """An attempt that failed in a way worth retrying; ``reason`` is for the final error."""

    reason: str


class ReplicaPool:
    """The replicas and the request loop: which replica takes the next attempt, one HTTP exchange,
    retries with full-jitter backoff that honour ``Retry-After``, failover, and the codec.

    A base of ``TeacherClient``, which sets every attribute declared here in its ``__init__``;
    ``_verify`` (the handshake's re-check of a replica that came back) is ``ReplicaHandshake``'s.
    """

    config: TeacherClientConfig
    _replicas: list[_Replica]
    _turn: int
    _stats: ClientStats
    _http: httpx.AsyncClient | None
    _slots: asyncio.Semaphore | None
    _transports: httpx.AsyncBaseTransport | Mapping[str, httpx.AsyncBaseTransport] | None
    _sleep: Callable[[float], Awaitable[Any]]
    _clock: Callable[[], float]
    _rng: random.Random
    _headers: dict[str, str]
    _mime: str

    async def _verify(self, replica: _Replica) -> _Retryable | None:
        """Re-check ``replica`` before trusting it again (``ReplicaHandshake._verify``)."""
        raise NotImplementedError

    def _build_http(self) -> httpx.AsyncClient:
        options: dict[str, Any] = {
            "timeout": self.config.http_timeout,
            "limits": self.config.http_limits,
            "headers": self._headers,
        }
        if isinstance(self._transports, Mapping):
            options["mounts"] = {url.rstrip("/"): t for url, t in self._transports.items()}
        elif self._transports is not None:
            options["transport"] = self._transports
        return httpx.AsyncClient(**options)

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- replicas: choice -------------------------------------------------------------------------

    def _pick(self, avoid: _Replica | None) -> _Replica:
        """The replica for the next attempt; its ``in_flight`` counts this request from now.

        Free replicas first (not cooling down, no ``Retry-After`` pending), then not the one that
        just failed, then the shortest ``Retry-After`` wait, then the fewest requests in flight;
        ties rotate (round robin), so sequential calls alternate.
        """
        now = self._clock()
        self._turn += 1
        count = len(self._replicas)

        def rank(r: _Replica) -> tuple[bool, bool, float, int, int]:
            return (
                r.blocked(now),
                r is avoid,
                max(0.0, r.not_before - now),
                r.in_flight,
                (r.index - self._turn) % count,
            )

        replica = min(self._replicas, key=rank)
        replica.in_flight += 1
        return replica

    # -- the request loop ---------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        pin: _Replica | None = None,
        retries: int | None = None,
        student_scoped: bool = False,
    ) -> Any:
        """Send one logical request, retrying and failing over; return the decoded answer.

        ``pin`` keeps every attempt on one replica (start-up checks); ``student_scoped`` marks
        requests that need the student registered (re-registered once when a replica answers 404
        for it). Unpinned requests verify a replica that is not verified before using it.
        """
        if self._http is None:
            raise RuntimeError("the teacher client is not started: call start() or use async with")
        limit = self.config.max_retries if retries is None else retries
        content = None if body is None else self._encode(body)
        failures: list[str] = []
        attempt = 0
        failed: _Replica | None = None
        lost_student = False
        while True:
            replica = pin or self._pick(failed)
            if pin is not None:
                pin.in_flight += 1
            try:
                now = self._clock()
                wait = max(0.0, replica.not_before - now)
                if failed is not None and (replica is failed or replica.blocked(now)):
                    # No free replica to fail over to: back off before trying again. A replica
                    # that is free is tried at once; its load is what failover is for.
                    wait = max(wait, self._backoff(attempt))
                if wait > 0:
                    await self._sleep(wait)
                if failed is not None and replica is not failed:
                    self._stats.failovers += 1
                outcome: Any = None
                if pin is None and not replica.verified:
                    # Back from unreachable, or it lost the student: check it before use.
                    outcome = await self._verify(replica)
                if outcome is None:
                    outcome = await self._attempt(replica, method, path, content)
            except TeacherRequestError as error:
                if not (student_scoped and error.student_not_registered) or lost_student:
                    raise
                # The replica lost the registration (restarted on a fresh data dir): register
                # again (verification does it) and resend, once per request.
                lost_student = True
                replica.verified = False
                logger.warning("%s lost the student tokenizer; registering it again", replica.url)
                failed = None
                continue
            finally:
                replica.in_flight -= 1
            if not isinstance(outcome, _Retryable):
                return outcome
            replica.failures += 1
            failures.append(f"{replica.url}: {outcome.reason}")
            attempt += 1
            if attempt > limit:
                raise TeacherUnavailableError(
                    f"{method} {path} failed {attempt} times; last: {failures[-1]}",
                    url=replica.url,
                    attempts=attempt,
                    failures=tuple(failures[-5:]),
                )
            self._stats.retries += 1
            logger.info("retrying %s %s (%d/%d): %s", method, path, attempt, limit, failures[-1])
            failed = replica

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base·2^(attempt-1))]."""
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return self._rng.uniform(0.0, ceiling)

    async def _attempt(
        self, replica: _Replica, method: str, path: str, content: bytes | None
    ) -> Any:
        """One HTTP exchange with ``replica``: the decoded answer, ``_Retryable``, or an error."""
        assert self._http is not None and self._slots is not None
        headers = {"content-type": self._mime} if content is not None else None
        async with self._slots:
            self._stats.requests += 1
            self._stats.by_replica[replica.url] += 1
            replica.requests += 1
            try:
                response = await self._http.request(
                    method, replica.url + path, content=content, headers=headers
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                # Nothing reached the replica: safe to resend anywhere. Set it aside, and check
                # it again when it answers (it may have restarted with another data dir).
                now = self._clock()
                if replica.down_until <= now:  # once per outage, not once per retry
                    logger.warning("cannot connect to teacher replica %s: %r", replica.url, error)
                replica.down_until = now + self.config.replica_cooldown_s
                replica.verified = False
                return _Retryable(f"cannot connect ({type(error).__name__}: {error})")
            except httpx.PoolTimeout as error:
                return _Retryable(f"no free connection ({error})")
            except httpx.TimeoutException as error:
                raise TeacherUnavailableError(
                    f"{replica.url} did not finish {method} {path} within timeout_s "
                    f"({self.config.timeout_s} s); not resent: the teacher may still be working "
                    "on it. Send smaller batches or raise timeout_s",
                    url=replica.url,
                    attempts=1,
                ) from error
            except httpx.TransportError as error:
                raise TeacherUnavailableError(
                    f"the connection to {replica.url} broke during {method} {path} "
                    f"({type(error).__name__}: {error}); not resent: the request may have "
                    "reached the teacher",
                    url=replica.url,
                    attempts=1,
                ) from error
        status = response.status_code
        if status < 400:
            replica.down_until = 0.0
            return self._decode(response, replica, path)
        code, message = self._error_of(response)
        if status in (429, 503):
            retry_after = retry_after_seconds(response.headers.get("retry-after"), time.time())
            if retry_after is not None:
                replica.not_before = max(replica.not_before, self._clock() + retry_after)
            after = f"; Retry-After {retry_after:g} s" if retry_after is not None else ""
            return _Retryable(f"HTTP {status} ({code}): {message}{after}")
        raise TeacherRequestError(status, code, message, url=replica.url)

    # -- bodies ----------------------------------------------------------------------------------

    def _encode(self, body: Any) -> bytes:
        try:
            return pack(body, self._mime)
        except CodecError as error:
            raise ValueError(f"the request cannot be encoded: {error}") from None

    def _decode(self, response: httpx.Response, replica: _Replica, path: str) -> Any:
        kind = response.headers.get("content-type", "")
        try:
            return unpack(response.content, body_encoding(kind) or MSGPACK)
        except CodecError as error:
            raise TeacherProtocolError(
                f"the answer of {replica.url}{path} cannot be decoded ({kind or 'no type'}): "
                f"{error}",
                url=replica.url,
            ) from None

    @staticmethod
    def _error_of(response: httpx.Response) -> tuple[str, str]:
        """The service's ``{"error": {"code", "message"}}``, or the raw text of another server."""
        encoding = body_encoding(response.headers.get("content-type")) or MSGPACK
        try:
            value = unpack(response.content, encoding)
            error = value["error"]
            return str(error["code"]), str(error["message"])
        except (CodecError, KeyError, TypeError):
            text = response.text.strip().replace("\n", " ")[:300]
            return "http_error", text or response.reason_phrase
