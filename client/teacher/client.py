"""``TeacherClient``: the async client of one teacher service behind one or more replicas; its
lifecycle, ``score`` and ``generate``. The pool, the request loop and the handshake are its
bases (``pool.py``, ``handshake.py``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np
from pydantic import ValidationError

from tokenbridge.client.errors import (
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from tokenbridge.client.teacher.bodies import _score_sequence, registration_body
from tokenbridge.client.teacher.config import (
    _ENCODINGS,
    ClientStats,
    Completion,
    GenerateResult,
    ScoreResult,
    TeacherClientConfig,
)
from tokenbridge.client.teacher.handshake import ReplicaHandshake
from tokenbridge.client.teacher.pool import _Replica
from tokenbridge.shared.errors import CodecError
from tokenbridge.shared.protocol import (
    GenerateRequest,
    ScoredSequence,
)
from tokenbridge.shared.responses import GenerateResponse, ScoreResponse

logger = logging.getLogger("tokenbridge.client.teacher")

T = TypeVar("T")


def _sum_into(total: dict[str, float], part: Any) -> None:
    if isinstance(part, Mapping):
        for key, value in part.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value


async def _gather_or_cancel(coros: Sequence[Awaitable[T]]) -> list[T]:
    """All results in order; on the first failure the others are cancelled (and awaited)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# -- the client --------------------------------------------------------------------------------


class TeacherClient(ReplicaHandshake):
    """Async client of one teacher service behind one or more replica URLs.

    Use as ``async with TeacherClient(config, student_tokenizer=...) as client:``. ``transports``
    replaces the network for tests: one transport for every URL, or a mapping URL → transport
    (URLs it does not name use the network). ``sleep``, ``clock`` and ``rng`` replace
    ``asyncio.sleep``, ``time.monotonic`` and the backoff's random source, so tests can observe
    backoff and ``Retry-After`` without waiting. ``student_tokenizer`` may be ``None`` for a
    client that only generates.
    """

    def __init__(
        self,
        config: TeacherClientConfig,
        student_tokenizer: Any = None,
        *,
        student_name: str | None = None,
        transports: httpx.AsyncBaseTransport | Mapping[str, httpx.AsyncBaseTransport] | None = None,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._registration = (
            None
            if student_tokenizer is None
            else registration_body(student_tokenizer, student_name)
        )
        if isinstance(transports, Mapping):
            unknown = sorted(set(u.rstrip("/") for u in transports) - set(config.urls))
            if unknown:
                raise ValueError(f"transports name URLs that are not in config.urls: {unknown}")
        self._transports = transports
        self._sleep = sleep or asyncio.sleep
        self._clock = clock or time.monotonic
        self._rng = rng or random.Random()
        self._replicas = [_Replica(url, index) for index, url in enumerate(config.urls)]
        self._turn = 0
        self._stats = ClientStats(by_replica={url: 0 for url in config.urls})
        self._http: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._started = False
        self._student_id: str | None = None
        self._teacher_info: dict[str, Any] | None = None
        self._max_sequences = config.max_sequences_per_request
        mime = _ENCODINGS[config.encoding]
        self._mime = mime
        self._headers = {"accept": mime, "user-agent": "tokenbridge-client/1"}
        if config.api_key:
            self._headers["authorization"] = f"Bearer {config.api_key}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> TeacherClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Check every replica and register the student; raise if the setup cannot work.

        A replica that does not answer (after the retries) is skipped and verified later, when it
        answers; ``TeacherUnavailableError`` when none answers. ``TeacherConfigError`` when
        ``top_k`` is above a replica's ``max_top_k``, the student is refused, or replicas serve
        different teachers or gave different student ids; ``UnknownTeacherError`` (one of those)
        when a replica does not host the configured ``teacher``.
        """
        if self._started:
            return
        self._http = self._build_http()
        self._slots = asyncio.Semaphore(self.config.max_concurrency)
        try:
            outcomes = await self._handshake_all()
            answered: list[tuple[_Replica, dict[str, Any], str | None]] = []
            unavailable: list[TeacherUnavailableError] = []
            for replica in self._replicas:
                outcome = outcomes[replica]
                if isinstance(outcome, TeacherUnavailableError):
                    unavailable.append(outcome)
                    replica.down_until = self._clock() + self.config.replica_cooldown_s
                    logger.warning("teacher replica %s is not answering: %s", replica.url, outcome)
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    info, student_id, _ = outcome
                    answered.append((replica, info, student_id))
            if not answered:
                raise TeacherUnavailableError(
                    "no teacher replica answered: " + "; ".join(str(e) for e in unavailable),
                    attempts=sum(e.attempts for e in unavailable),
                    failures=tuple(f for e in unavailable for f in e.failures),
                )
            self._check_agreement(answered)
        except BaseException:
            await self._close_http()
            raise
        first_info = answered[0][1]
        self._teacher_info = first_info
        self._student_id = answered[0][2]
        for replica, _, _ in answered:
            replica.verified = True
        limits = [(info.get("limits") or {}).get("max_sequences") for _, info, _ in answered]
        known = [n for n in limits if isinstance(n, int) and n > 0]
        self._max_sequences = min([self.config.max_sequences_per_request, *known])
        deadline = (first_info.get("limits") or {}).get("request_timeout_s")
        if isinstance(deadline, int | float) and self.config.timeout_s < deadline:
            logger.warning(
                "timeout_s %.0f s is below the service's request_timeout_s %.0f s: long score "
                "requests will time out here while the teacher is still working on them",
                self.config.timeout_s, deadline,
            )  # fmt: skip
        self._started = True
        logger.info(
            "teacher client ready: %d/%d replicas, teacher %s, student %s, top_k %d",
            len(answered), len(self._replicas), self.teacher_name or "(unnamed)",
            self._student_id, self.config.top_k,
        )  # fmt: skip

    async def aclose(self) -> None:
        """Close the connections. The client can be started again afterwards."""
        self._started = False
        await self._close_http()

    # -- properties ----------------------------------------------------------------------------

    @property
    def student_id(self) -> str | None:
        """The student tokenizer's id on the service (``None`` for a generation-only client)."""
        return self._student_id

    @property
    def teacher_info(self) -> dict[str, Any]:
        """``GET /v1/info`` as read at start-up, for this client's teacher: ``teacher`` (model,
        vocab hash, name...), ``max_top_k``, ``limits`` and ``state`` are that teacher's, even on
        a service hosting several (see ``teacher_view``)."""
        if self._teacher_info is None:
            raise RuntimeError("the teacher client is not started: call start() or use async with")
        return self._teacher_info

    @property
    def teacher_name(self) -> str | None:
        """The name of the teacher this client uses: the configured one, or the service's name
        for its default (``None`` before start, or for a service without named teachers)."""
        if self.config.teacher is not None:
            return self.config.teacher
        if self._teacher_info is None:
            return None
        name = (self._teacher_info.get("teacher") or {}).get("name")
        return name if isinstance(name, str) else None

    @property
    def max_sequences_per_request(self) -> int:
        """The chunk size score batches are split into (the config's, capped by the service's)."""
        return self._max_sequences

    @property
    def stats(self) -> ClientStats:
        """A copy of the counters (safe to read from another thread)."""
        return dataclasses.replace(self._stats, by_replica=dict(self._stats.by_replica))

    def replica_status(self) -> list[dict[str, Any]]:
        """Per replica: URL, whether it is up now, requests in flight, sent, failed."""
        now = self._clock()
        return [
            {
                "url": r.url,
                "up": not r.blocked(now),
                "verified": r.verified,
                "in_flight": r.in_flight,
                "requests": r.requests,
                "failures": r.failures,
            }
            for r in self._replicas
        ]

    # -- public calls --------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """``GET /v1/info`` from a replica, now (with retries)."""
        value = await self._request("GET", "/v1/info")
        if not isinstance(value, dict):
            raise TeacherProtocolError("GET /v1/info did not answer a map")
        return value

    async def score(self, sequences: Sequence[Mapping[str, Any]]) -> ScoreResult:
        """Teacher signals for each ``{"prompt": ..., "completion_ids": [...]}``, in order.

        A prompt is ``{"text"}``, ``{"messages"}`` or ``{"ids"}`` (student ids), or a plain string
        for text; ids may be lists, numpy arrays or CPU tensors. Batches above
        ``max_sequences_per_request`` go as several requests, concurrently within
        ``max_concurrency``; a request the service finds too large (413) is halved and resent.
        """
        self._require_started()
        if self._student_id is None:
            raise RuntimeError("this client has no student tokenizer: give one to score")
        started = self._clock()
        try:
            prepared = [_score_sequence(s, i) for i, s in enumerate(sequences)]
            if not prepared:
                return ScoreResult([], self.config.top_k, {}, {}, {}, 0, 0.0)
            size = self._max_sequences
            chunks = [(o, prepared[o : o + size]) for o in range(0, len(prepared), size)]
            parts = await _gather_or_cancel([self._score_chunk(o, c) for o, c in chunks])
        finally:
            self._stats.teacher_wait_s += self._clock() - started
        out: list[ScoredSequence] = []
        usage: dict[str, float] = {}
        timings: dict[str, float] = {}
        teacher: dict[str, Any] = {}
        requests = 0
        for part in parts:
            for rows, answer in part:
                out.extend(rows)
                _sum_into(usage, answer.get("usage"))
                _sum_into(timings, answer.get("timings"))
                teacher = teacher or dict(answer.get("teacher") or {})
                requests += 1
        self._stats.sequences += len(out)
        return ScoreResult(
            out, self.config.top_k, usage, timings, teacher, requests, self._clock() - started
        )

    async def _score_chunk(
        self, offset: int, chunk: list[dict[str, Any]]
    ) -> list[tuple[list[ScoredSequence], ScoreResponse]]:
        body = {
            "student_tokenizer": self._student_id,
            "top_k": self.config.top_k,
            "sequences": chunk,
        }
        if self.config.teacher is not None:
            # Only when set: a service without named teachers refuses fields it does not know.
            body["teacher"] = self.config.teacher
        try:
            answer: ScoreResponse = await self._request(
                "POST", "/v1/score", body, student_scoped=True
            )
        except TeacherRequestError as error:
            if error.status == 413 and len(chunk) > 1:
                # Too many teacher tokens or bytes for one request: the same work in two halves.
                self._stats.splits += 1
                half = len(chunk) // 2
                left, right = await _gather_or_cancel(
                    [
                        self._score_chunk(offset, chunk[:half]),
                        self._score_chunk(offset + half, chunk[half:]),
                    ]
                )
                return left + right
            if error.status in (413, 422):
                last = offset + len(chunk) - 1
                error.add_note(f"the request held sequences[{offset}..{last}] of the batch")
            raise
        return [(self._read_scores(answer, len(chunk)), answer)]

    def _read_scores(self, answer: ScoreResponse, expected: int) -> list[ScoredSequence]:
        try:
            top_k = int(answer["top_k"])
            entries = answer["sequences"]
            if top_k != self.config.top_k or len(entries) != expected:
                raise ValueError(
                    f"asked top_k {self.config.top_k} for {expected} sequences; got top_k {top_k} "
                    f"for {len(entries)}"
                )
            return [ScoredSequence.from_wire(entry, top_k) for entry in entries]
        except (KeyError, TypeError, ValueError, CodecError) as error:
            raise TeacherProtocolError(
                f"the score response does not fit the request: {error!r}"
            ) from None

    async def generate(
        self,
        prompts: Sequence[str | Mapping[str, Any]],
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> GenerateResult:
        """One teacher sample per prompt (a string, ``{"text"}`` or ``{"messages"}``), in order.

        Prompt ``i`` is sampled with seed ``seed + i`` whatever the chunking, as if the batch had
        gone in one request.
        """
        self._require_started()
        started = self._clock()
        try:
            items = [{"text": p} if isinstance(p, str) else dict(p) for p in prompts]
            if not items:
                return GenerateResult([], {}, {}, 0, 0.0)
            size = self._max_sequences
            bodies: list[dict[str, Any]] = []
            for offset in range(0, len(items), size):
                body: dict[str, Any] = {
                    "prompts": items[offset : offset + size],
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "top_p": top_p,
                    "seed": None if seed is None else seed + offset,
                }
                if self.config.teacher is not None:
                    # Only when set: a service without named teachers refuses fields it does not
                    # know.
                    body["teacher"] = self.config.teacher
                try:
                    GenerateRequest.model_validate(body)  # refuse bad arguments before sending
                except ValidationError as error:
                    raise ValueError(f"invalid generate arguments: {error}") from None
                bodies.append(body)
            answers: list[GenerateResponse] = await _gather_or_cancel(
                [self._request("POST", "/v1/generate", b) for b in bodies]
            )
        finally:
            self._stats.teacher_wait_s += self._clock() - started
        completions: list[Completion] = []
        usage: dict[str, float] = {}
        teacher: dict[str, Any] = {}
        try:
            for sent, answer in zip(bodies, answers, strict=True):
                entries = answer["completions"]
                asked = len(sent["prompts"])
                if len(entries) != asked:
                    raise ValueError(f"{len(entries)} completions for {asked} prompts")
                for entry in entries:
                    ids = [int(i) for i in np.asarray(entry["ids"]).reshape(-1)]
                    completions.append(
                        Completion(str(entry["text"]), ids, str(entry["finish_reason"]))
                    )
                _sum_into(usage, answer.get("usage"))
                teacher = teacher or dict(answer.get("teacher") or {})
        except (KeyError, TypeError, ValueError) as error:
            raise TeacherProtocolError(
                f"the generate response does not fit the request: {error!r}"
            ) from None
        return GenerateResult(completions, usage, teacher, len(bodies), self._clock() - started)

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("the teacher client is not started: call start() or use async with")
