"""The one small protocol every teacher engine implements, and the types it speaks.

An engine owns the teacher model and its tokenizer. It scores token ids (``score``: the teacher's
top-K and the actual token's log-prob at each completion position, temperature 1) and samples
completions (``generate``). Engines are interchangeable behind ``TeacherEngine``; the service
never looks past it.
"""

from __future__ import annotations

import importlib.metadata
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from tokenbridge.service.engines.flops import FlopModel

__all__ = [
    "DEVICES_LOCK",
    "EngineInfo",
    "GenerateParams",
    "Generated",
    "PositionScores",
    "ScoreJob",
    "TeacherEngine",
    "package_versions",
]


#: Held while an engine sets ``CUDA_VISIBLE_DEVICES`` for the workers it builds (vLLM with a
#: teacher's ``devices``) and while an engine may initialise CUDA in this process (transformers on
#: a GPU), which reads the variable once: neither may see another teacher's GPUs.
DEVICES_LOCK = threading.Lock()


def package_versions(*packages: str) -> dict[str, str]:
    """The installed version of each package (``absent`` when it is not installed)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


@dataclass(frozen=True)
class EngineInfo:
    """What the service reports about its teacher (``/v1/info`` and every response)."""

    backend: str
    model: str
    revision: str | None
    dtype: str
    device: str
    vocab_size: int
    max_top_k: int
    max_model_len: int
    versions: dict[str, str] = field(default_factory=dict)
    #: The teacher's forward FLOPs per token (``flop_model`` of its config); ``None`` when the
    #: config gives nothing to estimate from.
    flop_model: FlopModel | None = None
    #: Whether ``score`` can return full rows (``ScoreJob.full_rows``), which scoring named
    #: student candidates (§4b) needs.
    full_rows: bool = False


@dataclass(frozen=True)
class ScoreJob:
    """Score ``ids[start:]`` given what precedes each of them, with the top ``top_k``.

    ``start`` is at least 1: the first scored token needs a position that predicts it.
    """

    ids: np.ndarray
    start: int
    top_k: int
    #: Also return the teacher's full log-prob row at every scored position (§4b candidates).
    full_rows: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.start <= len(self.ids):
            raise ValueError(f"start must lie in [1, {len(self.ids)}]; got {self.start}")
        if self.top_k < 1:
            raise ValueError("top_k must be at least 1")

    @property
    def positions(self) -> int:
        """How many tokens get scored."""
        return len(self.ids) - self.start


@dataclass(frozen=True)
class PositionScores:
    """Row ``t`` is about token ``ids[start + t]`` of its ``ScoreJob``.

    ``topk_ids_TK`` / ``topk_logprobs_TK``: the teacher's top-K there, most likely first;
    ``actual_logprobs_T``: the log-prob of the actual token, whatever its rank.
    """

    topk_ids_TK: np.ndarray
    topk_logprobs_TK: np.ndarray
    actual_logprobs_T: np.ndarray
    #: The full row over the teacher's vocabulary, when the job asked for it.
    full_logprobs_TV: np.ndarray | None = None


@dataclass(frozen=True)
class GenerateParams:
    """Sampling settings for ``generate``."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Generated:
    """One sampled completion: its ids, text and why it stopped (``stop`` or ``length``)."""

    ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]


@runtime_checkable
class TeacherEngine(Protocol):
    """A teacher model that can score token ids and sample completions."""

    info: EngineInfo
    tokenizer: Any

    async def start(self) -> None:
        """Load the model; return when it can serve."""

    async def stop(self) -> None:
        """Finish or abandon outstanding work and release the model."""

    def healthy(self) -> bool:
        """False once the engine can no longer serve (it died or ran out of memory)."""

    async def score(self, job: ScoreJob) -> PositionScores:
        """The teacher's scores of ``job``'s tokens."""

    async def generate(self, prompt_ids: list[int], params: GenerateParams) -> Generated:
        """One completion of ``prompt_ids``."""


def completion_text(tokenizer: Any, ids: list[int]) -> str:
    """The text of generated ``ids`` without the end-of-sequence token that stopped them: the
    stop is reported as ``finish_reason``, and a literal ``<|endoftext|>`` in the text would be
    re-tokenised by a student as ordinary characters."""
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:
        ids = ids[:-1]
    return str(tokenizer.decode(ids))
