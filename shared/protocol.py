"""The v1 wire protocol: request models (validated with pydantic) and the score response layout.

Both sides use these definitions: the service validates requests with them and builds responses
in this layout (``tokenbridge.service.scoring.wire_sequence``); the client builds requests with
them and reads responses with ``ScoredSequence.from_wire``. Field names are the same in msgpack
and JSON.

Positions: in a score response, row ``j`` of every per-token array is about completion token ``j``
given the prompt and completion tokens ``0..j-1``. Log-probs are the teacher's at temperature 1.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tokenbridge.shared.responses import ScoredSequenceWire

__all__ = [
    "API_VERSION",
    "COMPLETION_NEUTRAL_FIELDS",
    "DEFAULT_TEACHER",
    "GREEDY_BELOW_TEMPERATURE",
    "MAX_CANDIDATES",
    "SCORE_ARRAY_DTYPES",
    "TEACHER_NAME",
    "CompletionRequest",
    "FieldValueError",
    "GenerateRequest",
    "Message",
    "Prompt",
    "RegisterTokenizerRequest",
    "ScoreRequest",
    "ScoreSequence",
    "ScoredSequence",
    "retry_after_seconds",
]

API_VERSION = "v1"
#: Temperatures below this sample greedily (vLLM's ``_SAMPLING_EPS``).
GREEDY_BELOW_TEMPERATURE = 1e-5
#: What a teacher's name may look like: ``tokenbridge serve --teacher NAME=...`` accepts these, and
#: they appear in query strings, metrics labels and logs. (A request naming anything else gets the
#: service's 404 with the names it hosts, not a validation error.)
TEACHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The most student candidates one position may name (``candidate_ids``, ``docs/mapping.md`` §4b).
MAX_CANDIDATES = 64
#: The name of a teacher given without one (``--teacher PATH``), and what a client calls the
#: teacher of a service that names none.
DEFAULT_TEACHER = "default"


def retry_after_seconds(value: str | None, now_wall: float) -> float | None:
    """A ``Retry-After`` header (on the service's 429 and 503) as seconds from ``now_wall`` (a
    Unix time): a number of seconds or an HTTP date, as RFC 9110 allows; ``None`` if absent or
    unreadable, never negative."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_wall)


def _teacher_field() -> Any:
    """The optional ``teacher`` of the requests that one teacher answers."""
    return Field(
        default=None,
        min_length=1,
        max_length=64,
        strict=True,
        description="the service's teacher to ask, by name (GET /v1/info lists them); omitted: "
        "its default teacher",
    )


# What each per-token array of a score response is sent as. Integer arrays may travel narrower
# (see ``codec``); log-probs of the sampled tokens stay float32, the sparse rows float16.
SCORE_ARRAY_DTYPES: dict[str, str] = {
    "logprobs": "<f4",
    "topk_ids": "<i4",
    "topk_logprobs": "<f2",
    "chunk_ids": "<i4",
    "tail_mass": "<f2",
    "unresolved_mass": "<f2",
    "exact": "|b1",
    "candidate_logprobs": "<f4",
    "candidate_unresolved_mass": "<f4",
}


def _ids_list(value: Any) -> Any:
    """Accept token ids as a list or as a typed 1-D integer array (msgpack)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise ValueError(f"ids must be a 1-D integer array; got {value.dtype} {value.shape}")
        # ``tolist`` keeps every value exact (a uint64 above 2**63 must not wrap to a negative id).
        return value.tolist()
    return value


def _not_an_array(value: Any) -> Any:
    """Refuse a typed array where a plain number belongs (numpy would turn a one-element array
    into its value)."""
    if isinstance(value, np.ndarray):
        raise ValueError(f"expected a number; got an array of shape {value.shape}")
    return value


TokenIds = Annotated[list[Annotated[int, Field(ge=0, strict=True)]], BeforeValidator(_ids_list)]


def _candidate_rows(value: Any) -> Any:
    """Accept candidates as a list of id lists or as a typed 2-D integer array (msgpack)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 2 or value.dtype.kind not in "iu":
            raise ValueError(
                f"candidate_ids must be a 2-D integer array; got {value.dtype} {value.shape}"
            )
        return value.tolist()
    return value


#: Per completion position, the student ids whose teacher mass is wanted; -1 pads a short row.
CandidateIds = Annotated[
    list[
        Annotated[
            list[Annotated[int, Field(ge=-1, strict=True)]],
            Field(max_length=MAX_CANDIDATES),
            BeforeValidator(_ids_list),
        ]
    ],
    BeforeValidator(_candidate_rows),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Model):
    """One chat message."""

    role: str = Field(min_length=1, max_length=64)
    content: str


class Prompt(_Model):
    """Exactly one of ``text``, ``messages`` (rendered with the teacher's chat template) or ``ids``
    (student ids: decoded with the student tokenizer, then re-tokenised for the teacher)."""

    text: str | None = None
    messages: list[Message] | None = None
    ids: TokenIds | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Prompt:
        given = [name for name in ("text", "messages", "ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a prompt needs exactly one of 'text', 'messages' or 'ids'; got {given or 'none'}"
            )
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must hold at least one message")
        return self

    @property
    def kind(self) -> Literal["text", "messages", "ids"]:
        """Which form the prompt takes."""
        if self.text is not None:
            return "text"
        return "messages" if self.messages is not None else "ids"


class ScoreSequence(_Model):
    """One sampled completion to score: its prompt and the student's completion token ids."""

    prompt: Prompt
    completion_ids: TokenIds
    candidate_ids: CandidateIds | None = Field(
        default=None,
        description="per completion token, up to 64 student ids (-1 pads) whose teacher mass "
        "the answer gives in candidate_logprobs, from the teacher's full row "
        "(docs/mapping.md §4b); one row per completion token",
    )

    @model_validator(mode="after")
    def _one_row_per_token(self) -> ScoreSequence:
        if self.candidate_ids is not None and len(self.candidate_ids) != len(self.completion_ids):
            raise ValueError(
                f"candidate_ids needs one row per completion token ({len(self.completion_ids)}); "
                f"got {len(self.candidate_ids)}"
            )
        return self


class ScoreRequest(_Model):
    """``POST /v1/score``."""

    student_tokenizer: str = Field(min_length=1, max_length=128)
    top_k: int = Field(ge=1, strict=True)
    sequences: list[ScoreSequence] = Field(min_length=1)
    teacher: str | None = _teacher_field()


class GenerateRequest(_Model):
    """``POST /v1/generate``: teacher samples for prompts given as text or messages."""

    prompts: list[Prompt] = Field(min_length=1)
    teacher: str | None = _teacher_field()
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="tokens to sample per prompt; default 128, or the service's "
        "max_generate_tokens when that is smaller",
    )
    # Strict numbers: no strings, booleans or one-element arrays standing in for them.
    temperature: Annotated[float, BeforeValidator(_not_an_array)] = Field(
        default=1.0,
        ge=0.0,
        allow_inf_nan=False,
        strict=True,
        description=f"0 is greedy; so is anything below {GREEDY_BELOW_TEMPERATURE} (as in vLLM)",
    )
    top_p: Annotated[float, BeforeValidator(_not_an_array)] = Field(
        default=1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True
    )
    seed: int | None = Field(
        default=None,
        ge=-(2**63),
        le=2**63 - 1,
        strict=True,
        description="a 64-bit signed integer; prompt i is sampled with seed + i",
    )

    @field_validator("temperature")
    @classmethod
    def _greedy_when_tiny(cls, value: float) -> float:
        # Logits divided by a temperature of 1e-300 overflow to inf and sampling fails on NaN.
        return 0.0 if value < GREEDY_BELOW_TEMPERATURE else value

    @model_validator(mode="after")
    def _no_ids(self) -> GenerateRequest:
        if any(prompt.ids is not None for prompt in self.prompts):
            raise ValueError("generation prompts are 'text' or 'messages', not student 'ids'")
        return self


class RegisterTokenizerRequest(_Model):
    """``POST /v1/tokenizers``: exactly one of ``path``, ``hub`` or ``tokenizer_json``."""

    name: str = Field(min_length=1, max_length=128)
    path: str | None = None
    hub: str | None = None
    tokenizer_json: str | None = None
    chat_template: str | None = None
    special_tokens: dict[str, str] | None = Field(
        default=None, description="bos_token, eos_token, pad_token... for an uploaded tokenizer"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> RegisterTokenizerRequest:
        given = [n for n in ("path", "hub", "tokenizer_json") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of 'path', 'hub' or 'tokenizer_json'; got {given or 'none'}"
            )
        return self


#: vLLM's other ``/v1/completions`` fields (vLLM 0.32), each with the values that change nothing
#: the vLLM-compatible face answers: they only steer sampling or streaming, and the face samples
#: nothing. Any other value is refused by name rather than silently ignored.
COMPLETION_NEUTRAL_FIELDS: dict[str, tuple[Any, ...]] = {
    "echo": (False, None),
    "stream": (False, None),
    "stream_options": (None,),
    "n": (1,),
    "best_of": (1, None),
    "logprobs": (None,),
    "suffix": (None,),
    "use_beam_search": (False,),
    "frequency_penalty": (None, 0.0),
    "presence_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "length_penalty": (1.0,),
    "logit_bias": (None, {}),
    "stop": (None, [], ""),
    "stop_token_ids": (None, []),
    "include_stop_str_in_output": (False,),
    "ignore_eos": (False,),
    "min_tokens": (0,),
    "top_p": (None, 1.0),
    "top_k": (None, -1, 0),
    "min_p": (None, 0.0),
    "watermarking": (None, False),
    "truncate_prompt_tokens": (None,),
    "truncation_side": (None,),
    "allowed_token_ids": (None,),
    "logprob_token_ids": (None, []),
    "bad_words": (None, []),
    "prompt_embeds": (None,),
    "response_format": (None,),
    "structured_outputs": (None,),
    "priority": (0,),
    "return_token_ids": (None, False),
    "return_token_offsets": (None, False),
    "routed_experts_prompt_start": (0,),
    "mm_payload": ("tensors", "none"),
    "return_mm_kwargs": (None, False),
    "kv_transfer_params": (None,),
    "ec_transfer_params": (None,),
    "vllm_xargs": (None,),
    "repetition_detection": (None,),
    "thinking_token_budget": (None,),
    "stream_interval": (None,),
}


class FieldValueError(ValueError):
    """A request value that is wrong, with the name of its field (vLLM's errors name it as
    ``param``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _neutral(name: str, value: Any) -> bool:
    """Whether ``value`` is one of the values of field ``name`` that change nothing here
    (``True`` is not the ``1`` of ``n``; ``0`` is the ``0.0`` of a penalty)."""
    if isinstance(value, np.ndarray):
        return False
    for ok in COMPLETION_NEUTRAL_FIELDS[name]:
        if isinstance(value, bool) or isinstance(ok, bool):
            if type(value) is type(ok) and value == ok:
                return True
        elif isinstance(value, (int, float)) and isinstance(ok, (int, float)):
            if value == ok:
                return True
        elif type(value) is type(ok) and value == ok:
            return True
    return False


def _id_prompts(value: Any) -> Any:
    """A completion ``prompt`` as a list of id lists: one list of ids is one prompt; text is
    refused (the face scores the student's own ids)."""
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.ndim == 2 else [value]
    if isinstance(value, str) or (
        isinstance(value, list) and any(isinstance(item, str) for item in value)
    ):
        raise ValueError(
            "text prompts are not accepted: send the student's token ids (a list of ids, or a "
            "list of such lists), as vLLM's prompt_logprobs clients do"
        )
    if isinstance(value, list) and value and not isinstance(value[0], (list, np.ndarray)):
        return [value]
    return value


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` of the vLLM-compatible face (``docs/vllm-face.md``): score
    student token ids the way ``vllm serve`` answers ``prompt_logprobs``, over the student's
    vocabulary.

    Honoured: ``model``, ``prompt`` (ids), ``prompt_logprobs``, ``max_tokens`` 0 or 1 (nothing is
    generated), ``temperature`` (prompt log-probs are raw, as vLLM's default ``logprobs_mode``
    gives them), ``seed``, ``user``, ``request_id``, ``session_id``, ``cache_salt``,
    ``add_special_tokens``, ``skip_special_tokens``, ``spaces_between_special_tokens``,
    ``return_tokens_as_token_ids``; the fields of ``COMPLETION_NEUTRAL_FIELDS`` at their neutral
    values; and our extension ``prompt_logprob_token_ids``. Anything else is refused by name.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(default=None, min_length=1, max_length=256)
    prompt: Annotated[list[TokenIds], BeforeValidator(_id_prompts)] = Field(min_length=1)
    prompt_logprobs: int | None = Field(
        default=None,
        strict=True,
        description="how many of the teacher's most likely student tokens to give at every "
        "position (0: only the realised token); required",
    )
    max_tokens: int | None = Field(default=16, strict=True)
    temperature: Annotated[float | None, BeforeValidator(_not_an_array)] = Field(
        default=None, ge=0.0, allow_inf_nan=False
    )
    seed: int | None = Field(default=None, strict=True)
    user: str | None = None
    request_id: str | None = Field(default=None, max_length=128)
    session_id: str | None = None
    cache_salt: str | None = None
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    return_tokens_as_token_ids: bool | None = None
    prompt_logprob_token_ids: list[CandidateIds] | CandidateIds | None = Field(
        default=None,
        description="tokenbridge's extension: per prompt (one list of rows when the prompt is "
        "one list of ids) and position, up to 64 student ids whose teacher log-prob the answer "
        "adds to that position's prompt_logprobs, from the teacher's full row",
    )

    @model_validator(mode="before")
    @classmethod
    def _only_neutral(cls, value: Any) -> Any:
        """Take vLLM's other fields out of the body, refusing any that would change the answer."""
        if not isinstance(value, dict):
            return value
        for name, given in value.items():
            if name in COMPLETION_NEUTRAL_FIELDS and not _neutral(name, given):
                allowed = " or ".join(repr(ok) for ok in COMPLETION_NEUTRAL_FIELDS[name])
                raise FieldValueError(
                    name,
                    f"field {name!r} = {given!r:.60} is not supported: tokenbridge's vLLM face "
                    f"scores the prompt and generates nothing; send {allowed} or leave it out",
                )
        return {k: v for k, v in value.items() if k not in COMPLETION_NEUTRAL_FIELDS}

    @model_validator(mode="after")
    def _scoring_only(self) -> CompletionRequest:
        if self.prompt_logprobs is None:
            raise FieldValueError(
                "prompt_logprobs",
                "prompt_logprobs is required: the face answers prompt log-probs and generates "
                "nothing (send prompt_logprobs K, max_tokens 1 or 0)",
            )
        if self.prompt_logprobs < 0:
            raise FieldValueError(
                "prompt_logprobs",
                "prompt_logprobs must be 0 or more: the full vocabulary (-1) is not given; ask "
                "for the top K",
            )
        if self.max_tokens not in (0, 1):
            raise FieldValueError(
                "max_tokens",
                f"max_tokens must be 0 or 1 (got {self.max_tokens}): the face generates nothing",
            )
        if any(len(ids) == 0 for ids in self.prompt):
            raise FieldValueError("prompt", "every prompt needs at least one token id")
        if self.prompt_logprob_token_ids is not None:
            rows = self.candidate_rows()
            if len(rows) != len(self.prompt) or any(
                r is not None and len(r) != len(p) for r, p in zip(rows, self.prompt, strict=True)
            ):
                raise FieldValueError(
                    "prompt_logprob_token_ids",
                    "prompt_logprob_token_ids needs one list of rows per prompt and one row per "
                    "prompt token (row 0 is ignored)",
                )
        return self

    def candidate_rows(self) -> list[list[list[int]] | None]:
        """``prompt_logprob_token_ids`` as one list of rows per prompt (``None``: none asked)."""
        given = self.prompt_logprob_token_ids
        if given is None:
            return [None] * len(self.prompt)
        if given and given[0] and isinstance(given[0][0], list):
            return cast(list[list[list[int]] | None], list(given))
        # One prompt's rows (a list of id lists); an empty list stands for one empty prompt.
        return [cast(list[list[int]], given)]


@dataclass(frozen=True)
class ScoredSequence:
    """One scored completion as a client reads it (arrays widened to int64 / float32)."""

    logprobs_S: np.ndarray
    topk_ids_SK: np.ndarray
    topk_logprobs_SK: np.ndarray
    chunk_ids_S: np.ndarray
    tail_mass_S: np.ndarray
    unresolved_mass_S: np.ndarray
    exact_S: np.ndarray
    chunk_logprobs_C: np.ndarray
    alignment: dict[str, Any]
    #: With ``candidate_ids`` in the request: the teacher's §4b log-mass of each candidate (``-inf``
    #: for none or padding) and the mass that may belong to it but hangs on the next teacher
    #: position (0: exact); ``None`` otherwise.
    candidate_logprobs_SC: np.ndarray | None = None
    candidate_unresolved_SC: np.ndarray | None = None

    @classmethod
    def from_wire(cls, wire: ScoredSequenceWire, top_k: int = 0) -> ScoredSequence:
        """Read one entry of a score response's ``sequences`` (msgpack or JSON form; its layout
        is ``shared.responses.ScoredSequenceWire``).

        ``top_k`` (the response's own ``top_k``) gives an empty completion read from JSON, which
        carries no shape, its ``(0, K)`` rows.
        """
        # Read by field name: the arrays are typed arrays (msgpack) or nested lists (JSON).
        value = cast(Mapping[str, Any], wire)

        def array(name: str, dtype: Any, null: float = np.nan) -> np.ndarray:
            raw = value[name]
            if isinstance(raw, np.ndarray):
                return raw.astype(dtype)
            if np.dtype(dtype).kind in "iub":
                return np.asarray(raw, dtype=dtype)
            listed = np.asarray(raw, dtype=object)
            return np.where(listed == None, null, listed).astype(dtype)  # noqa: E711

        def candidates(name: str, null: float) -> np.ndarray | None:
            if value.get(name) is None:
                return None
            rows = array(name, np.float32, null=null)
            if rows.ndim == 2:
                return rows
            # JSON of an empty completion carries no width.
            return rows.reshape(len(value["logprobs"]), -1 if rows.size else 0)

        topk_logprobs = array("topk_logprobs", np.float32, null=-np.inf)
        topk_ids = array("topk_ids", np.int64)
        if topk_logprobs.ndim == 1:  # an empty completion read from JSON
            topk_logprobs = topk_logprobs.reshape(0, top_k)
            topk_ids = topk_ids.reshape(0, top_k)
        return cls(
            logprobs_S=array("logprobs", np.float32),
            topk_ids_SK=topk_ids,
            topk_logprobs_SK=topk_logprobs,
            chunk_ids_S=array("chunk_ids", np.int64),
            tail_mass_S=array("tail_mass", np.float32),
            unresolved_mass_S=array("unresolved_mass", np.float32),
            exact_S=array("exact", bool),
            chunk_logprobs_C=array("chunk_logprobs", np.float32),
            alignment=dict(value["alignment"]),
            candidate_logprobs_SC=candidates("candidate_logprobs", -np.inf),
            candidate_unresolved_SC=candidates("candidate_unresolved_mass", np.nan),
        )
