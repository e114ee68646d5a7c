"""The async client of the teacher service, for the trainer (and a blocking facade for notebooks).

One ``httpx.AsyncClient`` is shared by every call; at most ``max_concurrency`` requests are in
flight at once, spread over the replicas (least in flight first, round robin among equals).

``start()`` reads ``GET /v1/info`` on every replica, refuses a ``top_k`` above the service's
``max_top_k``, registers the student tokenizer (idempotent: the id is a content hash) and checks
that all replicas serve the same teacher vocabulary and gave the same student id.

Retries follow the transport conventions: only connection failures (refused, timed out while
connecting), 429 and 503 are retried, with full-jitter exponential backoff and never sooner than a
``Retry-After`` the replica sent; a retry goes to another replica when one is free. A replica that
refuses connections is set aside for ``replica_cooldown_s`` and verified again (info and
registration) before it is trusted with work. Other errors are raised at once: a 4xx says the
request itself is wrong, and a connection lost after sending may have left the work running on the
teacher, so resending it would double the load. A 404 saying the student is not registered (the
teacher restarted with a fresh data dir) re-registers it once and resends the request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from pydantic import ValidationError

from tokenbridge.client.errors import (
    TeacherConfigError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
    UnknownTeacherError,
)
from tokenbridge.client.routing import check_teacher_name
from tokenbridge.shared.codec import JSON, MSGPACK, body_encoding, pack, unpack
from tokenbridge.shared.errors import CodecError
from tokenbridge.shared.protocol import (
    API_VERSION,
    GenerateRequest,
    RegisterTokenizerRequest,
    ScoredSequence,
    retry_after_seconds,
)

__all__ = [
    "ClientStats",
    "Completion",
    "GenerateResult",
    "ScoreResult",
    "SyncTeacherClient",
    "TeacherClient",
    "TeacherClientConfig",
    "registration_body",
    "teacher_view",
]

logger = logging.getLogger("tokenbridge.client.teacher")

T = TypeVar("T")

_ENCODINGS = {"msgpack": MSGPACK, "json": JSON}
_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherClientConfig:
    """How the trainer reaches the teacher service. Validated when built; errors say why."""

    urls: tuple[str, ...] = field(
        default=("http://127.0.0.1:8000",),
        metadata={"help": "base URLs of the teacher replicas (one or more)"},
    )
    api_key: str | None = field(
        default=None, repr=False, metadata={"help": "Bearer key for the service (none: no key)"}
    )
    top_k: int = field(
        default=64, metadata={"help": "teacher candidates per position (<= the service's max)"}
    )
    connect_timeout_s: float = field(
        default=5.0, metadata={"help": "seconds to open a connection to a replica"}
    )
    timeout_s: float = field(
        default=300.0,
        metadata={"help": "seconds to send a request and to wait for its answer (read/write)"},
    )
    max_concurrency: int = field(
        default=8, metadata={"help": "most requests in flight at once, over all replicas"}
    )
    max_sequences_per_request: int = field(
        default=64, metadata={"help": "larger score batches are split into requests of this size"}
    )
    max_retries: int = field(
        default=8, metadata={"help": "retries of a request after connect errors, 429 or 503"}
    )
    backoff_base_s: float = field(
        default=0.25, metadata={"help": "first retry waits up to this (full-jitter exponential)"}
    )
    backoff_max_s: float = field(
        default=30.0, metadata={"help": "longest backoff between retries (Retry-After may exceed)"}
    )
    replica_cooldown_s: float = field(
        default=10.0,
        metadata={"help": "a replica refusing connections is avoided this long, then retried"},
    )
    encoding: str = field(default="msgpack", metadata={"help": "body encoding: msgpack | json"})
    teacher: str | None = field(
        default=None,
        metadata={"help": "the service's teacher to use, by name (none: its default teacher)"},
    )
    clamp_top_k: bool = field(
        default=False,
        metadata={
            "help": "lower top_k to a replica's max_top_k at start-up instead of refusing (for "
            "callers to whom a narrower teacher row is only a smaller support)"
        },
    )

    def __post_init__(self) -> None:
        urls = self.urls
        if isinstance(urls, str):
            urls = (urls,)  # one URL given as a string: accept it rather than iterate its letters
        urls = tuple(str(u).rstrip("/") for u in urls)
        object.__setattr__(self, "urls", urls)
        if not urls:
            raise ValueError("urls must name at least one teacher replica")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"url {url!r} must start with http:// or https://")
        if len(set(urls)) != len(urls):
            raise ValueError(f"urls must be distinct; got {list(urls)}")
        if self.api_key is not None and (not self.api_key.strip() or " " in self.api_key):
            raise ValueError("api_key must be a non-empty key without spaces, or None")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1; got {self.top_k}")
        for name in ("connect_timeout_s", "timeout_s", "backoff_base_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be at least backoff_base_s "
                f"({self.backoff_base_s})"
            )
        if self.replica_cooldown_s < 0:
            raise ValueError(f"replica_cooldown_s must be >= 0; got {self.replica_cooldown_s}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1; got {self.max_concurrency}")
        if self.max_sequences_per_request < 1:
            raise ValueError(
                f"max_sequences_per_request must be at least 1; got "
                f"{self.max_sequences_per_request}"
            )
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0; got {self.max_retries}")
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(_ENCODINGS)}; got {self.encoding!r}")
        if self.teacher is not None:
            check_teacher_name(self.teacher, "teacher")

    @property
    def http_timeout(self) -> httpx.Timeout:
        """Every phase explicit: httpx's default is 5 s for all of them, too short to score."""
        return httpx.Timeout(
            connect=self.connect_timeout_s,
            read=self.timeout_s,
            write=self.timeout_s,
            # In-flight requests are bounded by a semaphore sized like the pool, so a wait for a
            # pooled connection is short; the read deadline is a generous bound for it.
            pool=self.timeout_s,
        )

    @property
    def http_limits(self) -> httpx.Limits:
        """Connections matched to ``max_concurrency``: no request ever waits on the pool."""
        return httpx.Limits(
            max_connections=self.max_concurrency,
            max_keepalive_connections=self.max_concurrency,
        )


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    """The teacher's signals for a batch of sequences, in request order.

    ``usage`` sums the service's counters over the requests the batch took (``positions``,
    ``teacher_tokens``...); ``timings`` sums its stage seconds (``prepare_s``, ``engine_s``,
    ``mapping_s``); ``wall_s`` is what the caller waited, retries included.
    """

    sequences: list[ScoredSequence]
    top_k: int
    usage: dict[str, float]
    timings: dict[str, float]
    teacher: dict[str, Any]
    requests: int
    wall_s: float


@dataclass(frozen=True)
class Completion:
    """One teacher sample: its text, the teacher's token ids and why it stopped."""

    text: str
    ids: list[int]
    finish_reason: str


@dataclass(frozen=True)
class GenerateResult:
    """Teacher samples, one per prompt, in request order."""

    completions: list[Completion]
    usage: dict[str, float]
    teacher: dict[str, Any]
    requests: int
    wall_s: float


@dataclass
class ClientStats:
    """Counters for the trainer's logs (``as_dict``). ``client.stats`` returns a copy.

    ``requests`` counts HTTP requests sent (retries included); ``retries`` the resends after a
    connect error, 429 or 503; ``failovers`` the retries that went to another replica;
    ``reregistrations`` the times a replica had lost the student after start-up (it restarted
    with a fresh data dir, or answered 404 for it) and got it registered again;
    ``splits`` score requests halved after a 413; ``teacher_wait_s`` the seconds callers spent in
    ``score``/``generate`` (overlapping calls each count); ``by_replica`` requests per URL.
    """

    requests: int = 0
    retries: int = 0
    failovers: int = 0
    reregistrations: int = 0
    splits: int = 0
    sequences: int = 0
    teacher_wait_s: float = 0.0
    by_replica: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat numbers, ready for a metrics logger (per-replica counts under ``requests@URL``)."""
        flat: dict[str, float] = {
            name: getattr(self, name)
            for name in (
                "requests", "retries", "failovers", "reregistrations", "splits", "sequences",
                "teacher_wait_s",
            )
        }  # fmt: skip
        flat.update({f"requests@{url}": count for url, count in self.by_replica.items()})
        return flat


# -- student registration ----------------------------------------------------------------------


def registration_body(student: Any, name: str | None = None) -> dict[str, Any]:
    """The ``POST /v1/tokenizers`` body for a student tokenizer given in any supported form.

    - a ``str``: a hub name the *service* loads (``{"name", "hub"}``);
    - a ``pathlib.Path``/``os.PathLike``: a folder on the *service's* file system (``path``);
    - a transformers fast tokenizer: uploaded whole (its ``tokenizer.json``, bos/eos/pad/unk
      token strings and chat template), so the service needs no access to it;
    - a mapping: a ready registration body, sent as it is (``name`` overrides its name).

    ``ValueError`` when the body would be invalid, ``TypeError`` for another kind of object.
    """
    body: dict[str, Any]
    if isinstance(student, Mapping):
        body = dict(student)
        if name is not None:
            body["name"] = name
    elif isinstance(student, str):
        body = {"name": name or student, "hub": student}
    elif isinstance(student, os.PathLike):
        path = Path(student)
        body = {"name": name or path.name or str(path), "path": str(path)}
    elif hasattr(student, "backend_tokenizer"):
        specials = {
            role: value
            for role in _SPECIAL_ROLES
            if isinstance(value := getattr(student, role, None), str)
        }
        body = {
            "name": name or _tokenizer_name(student),
            "tokenizer_json": student.backend_tokenizer.to_str(),
            "special_tokens": specials or None,
        }
        template = getattr(student, "chat_template", None)
        if isinstance(template, str):
            body["chat_template"] = template
    else:
        raise TypeError(
            "student_tokenizer must be a hub name (str), a path on the service (pathlib.Path), "
            f"a transformers fast tokenizer or a registration mapping; got {type(student).__name__}"
        )
    try:
        # The shared protocol model: a body the service would refuse is refused here, earlier.
        RegisterTokenizerRequest.model_validate(body)
    except ValidationError as error:
        raise ValueError(f"invalid student tokenizer registration: {error}") from None
    return {key: value for key, value in body.items() if value is not None}


def _tokenizer_name(tokenizer: Any) -> str:
    raw = str(getattr(tokenizer, "name_or_path", "") or "student")
    # A local folder's last part reads better in the service's listing than the whole path.
    return (Path(raw).name or raw)[:128]


# -- teachers ----------------------------------------------------------------------------------

#: Keys of an entry of ``/v1/info``'s ``teachers`` that describe the service's work for that
#: teacher rather than the teacher itself; the rest of the entry is the teacher's description.
_SERVICE_KEYS = ("state", "ready", "max_top_k", "limits")


def teacher_view(
    info: Mapping[str, Any], name: str | None, url: str | None = None
) -> dict[str, Any]:
    """``GET /v1/info`` as a client of teacher ``name`` sees it (``None``: the default teacher).

    A service hosting several teachers lists them under ``teachers``; the answer is ``info`` with
    its top-level ``teacher`` (gaining ``name``), ``max_top_k``, ``limits`` and ``state`` taken
    from that teacher's entry, so every check reads the teacher it will use. A service without
    ``teachers`` (older versions) hosts one unnamed teacher: ``info`` as it is for ``None``.
    ``UnknownTeacherError`` (naming the teachers there are) when the service has no such teacher,
    or several and no default while ``name`` is ``None``.
    """
    where = f" at {url}" if url else ""
    teachers = info.get("teachers")
    if teachers is None:
        if name is None:
            return dict(info)
        raise UnknownTeacherError(
            f"the service{where} hosts one unnamed teacher (a version without named teachers); "
            f"it cannot serve teacher {name!r}: leave the teacher name unset",
            name=name,
            available=(),
            url=url,
        )
    if not isinstance(teachers, list):
        raise TeacherConfigError(
            f"GET /v1/info{where} has 'teachers' that is not a list: {type(teachers).__name__}",
            url=url,
        )
    entries = {
        entry["name"]: entry
        for entry in teachers
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
    }
    names = tuple(entries)
    wanted = name
    if wanted is None:
        default = info.get("default_teacher")
        # One teacher is the default even if the service did not say so.
        wanted = default if isinstance(default, str) else names[0] if len(names) == 1 else None
        if wanted is None:
            raise UnknownTeacherError(
                f"the service{where} hosts several teachers {list(names)} and none is its "
                "default: name the one to use (TeacherClientConfig.teacher, or --teachers)",
                name=None,
                available=names,
                url=url,
            )
    entry = entries.get(wanted)
    if entry is None and name is None:
        # The default is named but not listed: the top-level keys describe it.
        view = dict(info)
        view["teacher"] = {**(info.get("teacher") or {}), "name": wanted}
        return view
    if entry is None:
        raise UnknownTeacherError(
            f"the service{where} hosts no teacher {wanted!r}; it hosts {list(names)}",
            name=wanted,
            available=names,
            url=url,
        )
    view = dict(info)
    view["teacher"] = {k: v for k, v in entry.items() if k not in _SERVICE_KEYS}
    view["max_top_k"] = entry.get("max_top_k", info.get("max_top_k"))
    view["limits"] = entry.get("limits") or info.get("limits") or {}
    view["state"] = entry.get("state", info.get("state"))
    return view


# -- replicas ----------------------------------------------------------------------------------


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


def _ids_array(value: Any, where: str) -> np.ndarray:
    """Token ids as a 1-D int64 array: the codec then sends them in the narrowest integer type."""
    if isinstance(value, list | tuple) and not value:
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(value)  # lists, numpy arrays and CPU tensors alike
    if array.size == 0 and array.ndim == 1:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{where} must be a 1-D sequence of integer token ids; got {array.dtype}")
    return array.astype(np.int64, copy=False)


def _score_sequence(sequence: Mapping[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(sequence, Mapping) or "prompt" not in sequence:
        raise ValueError(f"sequences[{index}] must be a mapping with 'prompt' and 'completion_ids'")
    if "completion_ids" not in sequence:
        raise ValueError(f"sequences[{index}] has no 'completion_ids'")
    prompt = sequence["prompt"]
    if isinstance(prompt, str):
        prompt = {"text": prompt}
    elif isinstance(prompt, Mapping):
        prompt = dict(prompt)
        if prompt.get("ids") is not None:
            prompt["ids"] = _ids_array(prompt["ids"], f"sequences[{index}].prompt.ids")
    else:
        raise ValueError(f"sequences[{index}].prompt must be a mapping (text, messages or ids)")
    completion = _ids_array(sequence["completion_ids"], f"sequences[{index}].completion_ids")
    out: dict[str, Any] = {"prompt": prompt, "completion_ids": completion}
    if sequence.get("candidate_ids") is not None:
        # Student ids whose teacher mass is wanted per position (docs/mapping.md §4b), -1 pads.
        candidates = np.asarray(sequence["candidate_ids"])
        if candidates.size == 0:
            candidates = candidates.reshape(len(completion), 0)
        if (
            candidates.ndim != 2
            or candidates.dtype.kind not in "iu"
            or len(candidates) != len(completion)
        ):
            raise ValueError(
                f"sequences[{index}].candidate_ids must be an integer array with one row per "
                f"completion token ({len(completion)}); got {candidates.dtype} {candidates.shape}"
            )
        out["candidate_ids"] = candidates.astype(np.int64, copy=False)
    return out


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


class TeacherClient:
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

    async def _handshake_all(self) -> dict[_Replica, Any]:
        """Every replica's handshake outcome (a result or an exception), concurrently.

        Each replica gets the full retry budget while none has answered (a fleet that is still
        loading). Once one has, the others get ``connect_timeout_s`` more: a replica that is down
        must not hold up the start for its whole backoff; it is verified later, when it answers.
        """
        tasks = {
            asyncio.ensure_future(self._handshake(r, self.config.max_retries)): r
            for r in self._replicas
        }
        outcomes: dict[_Replica, Any] = {}
        pending = set(tasks)
        loop = asyncio.get_running_loop()
        grace_until: float | None = None
        try:
            while pending:
                timeout = None if grace_until is None else max(0.0, grace_until - loop.time())
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    break
                for task in done:
                    error = task.exception()
                    outcomes[tasks[task]] = error if error is not None else task.result()
                    if error is None and grace_until is None:
                        grace_until = loop.time() + self.config.connect_timeout_s
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:
            outcomes[tasks[task]] = TeacherUnavailableError(
                f"{tasks[task].url} had not answered when the other replicas were ready",
                url=tasks[task].url,
            )
        return outcomes

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

    async def aclose(self) -> None:
        """Close the connections. The client can be started again afterwards."""
        self._started = False
        await self._close_http()

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _check_agreement(self, answered: list[tuple[_Replica, dict[str, Any], str | None]]) -> None:
        hashes = {r.url: info["teacher"]["vocab_hash"] for r, info, _ in answered}
        if len(set(hashes.values())) > 1:
            raise TeacherConfigError(
                f"the replicas serve different teacher vocabularies (vocab_hash by URL: {hashes}); "
                "point the client at replicas of one teacher"
            )
        ids = {r.url: student for r, _, student in answered}
        if len(set(ids.values())) > 1:
            raise TeacherConfigError(
                f"the replicas gave the student tokenizer different ids ({ids}); they hash "
                "tokenizers differently: run the same tokenbridge version on every replica"
            )

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
    ) -> list[tuple[list[ScoredSequence], dict[str, Any]]]:
        body = {
            "student_tokenizer": self._student_id,
            "top_k": self.config.top_k,
            "sequences": chunk,
        }
        if self.config.teacher is not None:
            # Only when set: a service without named teachers refuses fields it does not know.
            body["teacher"] = self.config.teacher
        try:
            answer = await self._request("POST", "/v1/score", body, student_scoped=True)
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

    def _read_scores(self, answer: Any, expected: int) -> list[ScoredSequence]:
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
            answers = await _gather_or_cancel(
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

    # -- replicas: handshake, verification ------------------------------------------------------

    async def _handshake(
        self, replica: _Replica, retries: int
    ) -> tuple[dict[str, Any], str | None, bool]:
        """Read the replica's info, check ``top_k``, register the student.

        Returns the info as this client's teacher sees it (``teacher_view``), the student's id
        and whether the registration was new on the replica. The registration is the service's,
        shared by all its teachers.
        """
        try:
            info = await self._request("GET", "/v1/info", pin=replica, retries=retries)
        except TeacherRequestError as error:
            raise TeacherConfigError(
                f"GET /v1/info on {replica.url} was refused: {error.message} (HTTP {error.status}; "
                "check api_key)",
                url=replica.url,
            ) from error
        unreadable = f"GET /v1/info on {replica.url} is not readable as a teacher service's info"
        if not isinstance(info, Mapping):
            raise TeacherConfigError(
                f"{unreadable}; is the URL a tokenbridge teacher?", url=replica.url
            )
        version = info.get("api_version", API_VERSION)
        if version != API_VERSION:
            raise TeacherConfigError(
                f"{replica.url} speaks API {version!r}; this client speaks {API_VERSION!r}",
                url=replica.url,
            )
        # The checks below read the teacher this client will use, not the service's default.
        info = teacher_view(info, self.config.teacher, replica.url)
        try:
            max_top_k = int(info["max_top_k"])
            vocab_hash = info["teacher"]["vocab_hash"]
        except (KeyError, TypeError, ValueError) as error:
            raise TeacherConfigError(
                f"{unreadable} ({error!r}); is the URL a tokenbridge teacher?",
                url=replica.url,
            ) from None
        if not vocab_hash:
            raise TeacherConfigError(
                f"{replica.url} reports no teacher vocab_hash", url=replica.url
            )
        if self.config.top_k > max_top_k and self.config.clamp_top_k:
            logger.info("top_k %d lowered to %s's max_top_k %d", self.config.top_k, replica.url,
                     max_top_k)  # fmt: skip
            self.config = replace(self.config, top_k=max_top_k)
        if self.config.top_k > max_top_k:
            which = f"teacher {self.config.teacher!r}" if self.config.teacher else "teacher"
            raise TeacherConfigError(
                f"top_k {self.config.top_k} is above the {which}'s max_top_k {max_top_k} at "
                f"{replica.url}: ask for top_k <= {max_top_k}, or start the service with a "
                f"larger --max-top-k",
                url=replica.url,
            )
        if self._registration is None:
            return info, None, False
        try:
            answer = await self._request(
                "POST", "/v1/tokenizers", self._registration, pin=replica, retries=retries
            )
        except TeacherRequestError as error:
            raise TeacherConfigError(
                f"the teacher at {replica.url} refused the student tokenizer "
                f"{self._registration['name']!r}: {error.message}",
                url=replica.url,
            ) from error
        student_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(student_id, str) or not student_id:
            raise TeacherProtocolError(
                f"the registration answer of {replica.url} has no id", url=replica.url
            )
        logger.info(
            "student %s %s on %s",
            student_id, "registered" if answer.get("created") else "already registered",
            replica.url,
        )  # fmt: skip
        return info, student_id, bool(answer.get("created"))

    async def _verify(self, replica: _Replica) -> _Retryable | None:
        """Re-check a replica that was unreachable or lost the student, before trusting it.

        One attempt per call (the caller's retry loop does the retrying); a replica that is still
        unreachable comes back as ``_Retryable``. Concurrent callers wait for one check.
        """
        async with replica.lock:
            if replica.verified:
                return None
            try:
                info, student_id, created = await self._handshake(replica, retries=0)
            except TeacherUnavailableError as error:
                return _Retryable(str(error))
            expected = self.teacher_info["teacher"]["vocab_hash"]
            if info["teacher"]["vocab_hash"] != expected:
                raise TeacherConfigError(
                    f"{replica.url} came back serving another teacher vocabulary "
                    f"({info['teacher']['vocab_hash']}, expected {expected})",
                    url=replica.url,
                )
            if student_id != self._student_id:
                raise TeacherConfigError(
                    f"{replica.url} came back and gave the student id {student_id}, not "
                    f"{self._student_id}: it hashes tokenizers differently (another version?)",
                    url=replica.url,
                )
            if created:
                # The replica had lost the student (a fresh data dir): worth a line in the logs.
                self._stats.reregistrations += 1
            replica.verified = True
            return None

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


# -- the blocking facade ---------------------------------------------------------------------


class SyncTeacherClient:
    """``TeacherClient`` with blocking methods, for notebooks and scripts without asyncio.

    It runs its own event loop in a daemon thread, so it works where a loop is already running
    (Jupyter). ``with SyncTeacherClient(config, student_tokenizer=...) as client:``; arguments are
    those of ``TeacherClient``.
    """

    def __init__(
        self, config: TeacherClientConfig, student_tokenizer: Any = None, **options: Any
    ) -> None:
        self._client = TeacherClient(config, student_tokenizer, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tokenbridge-teacher-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self._closed:
            coro.close()  # never awaited: close it so Python does not warn about it
            raise RuntimeError("the teacher client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = self._submit(coro)
        try:
            return future.result()
        except KeyboardInterrupt:
            # An interrupted cell should not leave the request running in the background.
            future.cancel()
            raise

    def __enter__(self) -> SyncTeacherClient:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """``TeacherClient.start``, blocking."""
        self._run(self._client.start())

    def close(self) -> None:
        """Close the connections and stop the background loop (idempotent)."""
        if self._closed:
            return
        try:
            self._run(self._shutdown())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    async def _shutdown(self) -> None:
        # Calls submitted and then abandoned must finish unwinding on this loop, not later in
        # garbage collection after the loop is closed.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._client.aclose()

    @property
    def client(self) -> TeacherClient:
        """The async client underneath (its properties are safe to read)."""
        return self._client

    @property
    def student_id(self) -> str | None:
        """See ``TeacherClient.student_id``."""
        return self._client.student_id

    @property
    def teacher_info(self) -> dict[str, Any]:
        """See ``TeacherClient.teacher_info``."""
        return self._client.teacher_info

    @property
    def teacher_name(self) -> str | None:
        """See ``TeacherClient.teacher_name``."""
        return self._client.teacher_name

    @property
    def stats(self) -> ClientStats:
        """See ``TeacherClient.stats``."""
        return self._client.stats

    def replica_status(self) -> list[dict[str, Any]]:
        """See ``TeacherClient.replica_status``."""
        return self._client.replica_status()

    def info(self) -> dict[str, Any]:
        """``TeacherClient.info``, blocking."""
        return self._run(self._client.info())

    def score(self, sequences: Sequence[Mapping[str, Any]]) -> ScoreResult:
        """``TeacherClient.score``, blocking."""
        return self._run(self._client.score(sequences))

    def submit_score(self, sequences: Sequence[Mapping[str, Any]]) -> Future[ScoreResult]:
        """``TeacherClient.score`` started in the background: the caller keeps working (a
        trainer samples and trains meanwhile) and collects the result from the future."""
        return self._submit(self._client.score(sequences))

    def submit_generate(
        self,
        prompts: Sequence[str | Mapping[str, Any]],
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Future[GenerateResult]:
        """``TeacherClient.generate`` started in the background (see ``submit_score``)."""
        return self._submit(self._client.generate(prompts, max_tokens, temperature, top_p, seed))

    def generate(
        self,
        prompts: Sequence[str | Mapping[str, Any]],
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> GenerateResult:
        """``TeacherClient.generate``, blocking."""
        return self._run(self._client.generate(prompts, max_tokens, temperature, top_p, seed))
