r"""The teacher client's configuration (``TeacherClientConfig``) and what its calls return:
``ScoreResult``, ``GenerateResult`` (of ``Completion``\s) and ``ClientStats``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenbridge.client.routing import check_teacher_name
from tokenbridge.shared.codec import JSON, MSGPACK
from tokenbridge.shared.protocol import (
    ScoredSequence,
)

_ENCODINGS = {"msgpack": MSGPACK, "json": JSON}


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
