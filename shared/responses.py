"""The v1 answers' layout: one typed definition per response body, in their JSON form.

The service builds its answers as these (the type checker holds every dict literal to them), the
client reads them as these, and ``service/openapi.py`` generates the OpenAPI response schemas from
them (pydantic's JSON schema of a ``TypedDict``), so the layout is written down once. They are
``TypedDict``s rather than models so that an answer of a million floats is never copied into
objects on either side.

Forms: a msgpack answer has the same fields as the JSON one, with typed arrays
(``{"dtype", "shape", "data"}``, ``shared.codec``) where JSON has lists; JSON has no NaN or
infinity, so non-finite floats are ``null`` there. Every object is closed (no undeclared keys),
which the schemathesis test checks against the running service.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, WithJsonSchema, with_config
from typing_extensions import TypedDict

__all__ = [
    "RESPONSE_TYPES",
    "Alignment",
    "Completion",
    "CompletionChoice",
    "CompletionExtension",
    "CompletionResponse",
    "CompletionUsage",
    "Deleted",
    "ErrorBody",
    "ErrorDetail",
    "FlopCoefficients",
    "GenerateResponse",
    "GenerateUsage",
    "Health",
    "Info",
    "KeyQuota",
    "LogprobSemantics",
    "ModelCard",
    "ModelList",
    "Pairing",
    "PromptLogprob",
    "Readiness",
    "Registration",
    "ScoreResponse",
    "ScoreTimings",
    "ScoreUsage",
    "ScoredSequenceWire",
    "ServiceLimits",
    "StudentDescription",
    "StudentList",
    "StudentSource",
    "StudentSummary",
    "TeacherFlops",
    "TeacherInfo",
    "TeacherLimits",
    "TeacherReadiness",
    "TeacherStamp",
    "VllmErrorBody",
    "VllmErrorDetail",
]

_CLOSED = ConfigDict(extra="forbid")


def _array(depth: int, items: dict[str, Any], description: str) -> WithJsonSchema:
    """The schema of a per-token array: numpy on the service, a typed array in msgpack, nested
    lists in JSON (what the schema describes)."""
    schema: dict[str, Any] = items
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return WithJsonSchema({**schema, "description": description})


_NUMBER_OR_NULL = {"type": ["number", "null"]}  # JSON has no NaN or infinity: they are null


@with_config(_CLOSED)
class ErrorDetail(TypedDict):
    """What went wrong."""

    code: Annotated[str, Field(description="stable, machine-readable")]
    message: Annotated[str, Field(description="what was wrong and what to do")]


@with_config(_CLOSED)
class ErrorBody(TypedDict):
    """Every refusal, whatever its status."""

    error: ErrorDetail


@with_config(_CLOSED)
class Health(TypedDict):
    """``GET /healthz``."""

    status: Literal["alive", "failed"]
    state: str


@with_config(_CLOSED)
class TeacherReadiness(TypedDict):
    """One teacher's readiness."""

    ready: bool
    state: str


@with_config(_CLOSED)
class Readiness(TypedDict):
    """``GET /readyz``: 200 when ``ready``, 503 otherwise."""

    ready: bool
    state: str
    teachers: dict[str, TeacherReadiness]
    unready: Annotated[list[str], Field(description="the teachers that accept no work now")]


@with_config(_CLOSED)
class FlopCoefficients(TypedDict):
    """The two coefficients of a teacher's FLOP model (``service/engines/flops.py``)."""

    matmul_params: int
    attention_coeff: int


@with_config(_CLOSED)
class TeacherFlops(FlopCoefficients):
    """The teacher's FLOP model and how to use it."""

    per_token: str
    usage: str


@with_config(_CLOSED)
class ServiceLimits(TypedDict):
    """The service-wide limits (``/v1/info``'s ``limits`` when no teacher is the default);
    ``/v1/info`` adds the caller's key limits."""

    max_body_bytes: int
    max_sequences: int
    request_timeout_s: float
    key_tokens_per_minute: NotRequired[int | None]
    key_max_requests_in_flight: NotRequired[int | None]


@with_config(_CLOSED)
class TeacherLimits(ServiceLimits):
    """The limits a teacher's requests meet: the service-wide ones and its own."""

    max_model_len: int | None
    max_request_tokens: int
    max_tokens_in_flight: int
    admission_wait_s: float
    admission_queue: int
    max_generate_tokens: int


@with_config(_CLOSED)
class TeacherInfo(TypedDict):
    """One hosted teacher, as ``/v1/info`` describes it."""

    name: str
    state: str
    ready: bool
    model: str
    revision: str | None
    backend: str
    dtype: str
    device: str
    devices: list[int]
    versions: dict[str, str]
    vocab_size: int
    tokenizer_size: int | None
    vocab_hash: str | None
    has_chat_template: bool
    flops: TeacherFlops | None
    max_top_k: int
    candidate_scoring: Annotated[
        bool,
        Field(description="whether the teacher scores named student candidates (candidate_ids)"),
    ]
    limits: TeacherLimits
    engine_restarts: int


@with_config(_CLOSED)
class LogprobSemantics(TypedDict):
    """What the log-probs of a score answer mean."""

    temperature: float
    positions: str


@with_config(_CLOSED)
class KeyQuota(TypedDict):
    """The calling key's quota (with keys configured)."""

    key_id: str
    tokens_per_minute: int
    tokens_left: int | None
    max_requests_in_flight: int | None


@with_config(_CLOSED)
class Info(TypedDict):
    """``GET /v1/info``: every teacher; the top-level ``teacher``, ``max_top_k`` and ``limits``
    are the default teacher's (``null`` and the service-wide limits without one)."""

    api_version: str
    state: str
    teacher: Annotated[TeacherInfo | None, Field(description="the default teacher")]
    max_top_k: int | None
    limits: TeacherLimits | ServiceLimits
    default_teacher: str | None
    teachers: list[TeacherInfo]
    logprobs: LogprobSemantics
    encodings: list[str]
    students: int
    quota: NotRequired[KeyQuota]


@with_config(_CLOSED)
class StudentSource(TypedDict):
    """Where a student tokenizer came from."""

    kind: Literal["hub", "path", "tokenizer_json"]
    hub: NotRequired[str]
    path: NotRequired[str]


@with_config(_CLOSED)
class _Student(TypedDict):
    """What every answer about a student tokenizer says of it."""

    id: str
    name: str
    source: StudentSource
    vocab_size: int
    vocab_hash: str
    scheme: str


@with_config(_CLOSED)
class StudentSummary(_Student):
    """One registered student tokenizer (``GET /v1/tokenizers`` lists these)."""

    created: Annotated[float, Field(description="when it was registered (Unix time)")]


@with_config(_CLOSED)
class StudentList(TypedDict):
    """``GET /v1/tokenizers``."""

    tokenizers: list[StudentSummary]


@with_config(_CLOSED)
class Pairing(TypedDict):
    """How a student maps onto one teacher."""

    vocab_overlap: float
    probe_one_to_one_share: float
    special_token_map: dict[str, int]


@with_config(_CLOSED)
class _StudentPaired(_Student):
    """A student, its special roles, and how it maps onto each teacher; the default teacher's
    figures also stand at the top."""

    roles: Annotated[dict[str, int], Field(description="special token ids by role")]
    has_chat_template: bool
    teachers: Annotated[
        dict[str, Pairing],
        Field(description="how the student maps onto each teacher, by teacher name"),
    ]
    vocab_overlap: NotRequired[float]
    probe_one_to_one_share: NotRequired[float]
    special_token_map: NotRequired[dict[str, int]]


@with_config(_CLOSED)
class StudentDescription(_StudentPaired):
    """``GET /v1/tokenizers/{student_id}``."""

    created: Annotated[float, Field(description="when it was registered (Unix time)")]


@with_config(_CLOSED)
class Registration(_StudentPaired):
    """``POST /v1/tokenizers`` (201 when new, 200 when it was registered already)."""

    created: Annotated[bool, Field(description="false: it was registered already")]


@with_config(_CLOSED)
class Deleted(TypedDict):
    """``DELETE /v1/tokenizers/{student_id}``."""

    id: str
    deleted: bool


@with_config(_CLOSED)
class Alignment(TypedDict):
    """How the student's completion tiled against the teacher's tokens."""

    chunks: int
    one_to_one_share: float
    longest_chunk_tokens: int
    untiled_bytes: int
    total_bytes: int
    teacher_prompt_tokens: int
    teacher_completion_tokens: int


@with_config(_CLOSED)
class ScoredSequenceWire(TypedDict):
    """One entry of a score answer's ``sequences``: row ``j`` of every per-token array is about
    completion token ``j`` (``docs/mapping.md`` §3, §4, §4b); ``ScoredSequence.from_wire``
    reads it."""

    logprobs: Annotated[
        Any,
        _array(
            1,
            _NUMBER_OR_NULL,
            "the telescoped teacher log-prob of completion token j (§3; null/NaN where unscored)",
        ),
    ]
    topk_ids: Annotated[
        Any,
        _array(
            2,
            {"type": "integer"},
            "the teacher's next-token distribution over the student's vocabulary: K student "
            "ids, most likely first, -1 pads (§4)",
        ),
    ]
    topk_logprobs: Annotated[Any, _array(2, _NUMBER_OR_NULL, "their log-masses; null/-inf pads")]
    chunk_ids: Annotated[
        Any,
        _array(
            1,
            {"type": "integer"},
            "the chunk of each token (chunks end where both tokenisations have a boundary)",
        ),
    ]
    tail_mass: Annotated[Any, _array(1, _NUMBER_OR_NULL, "teacher mass outside its top-K")]
    unresolved_mass: Annotated[
        Any,
        _array(1, _NUMBER_OR_NULL, "mass the mapping could not place"),
    ]
    exact: Annotated[
        Any,
        _array(1, {"type": "boolean"}, "the row's distribution is exact given the teacher's top-K"),
    ]
    chunk_logprobs: Annotated[
        Any, _array(1, _NUMBER_OR_NULL, "per chunk, the teacher's log-prob of the chunk's bytes")
    ]
    alignment: Alignment
    candidate_logprobs: NotRequired[
        Annotated[
            Any,
            _array(
                2,
                _NUMBER_OR_NULL,
                "with candidate_ids in the request: per completion token and named candidate, the "
                "log of the teacher's mass of that student token from its full row "
                "(docs/mapping.md §4b); null/-inf for none or padding",
            ),
        ]
    ]
    candidate_unresolved_mass: NotRequired[
        Annotated[
            Any,
            _array(
                2,
                _NUMBER_OR_NULL,
                "mass of teacher tokens that may belong to the candidate but hang on the next "
                "teacher position: the true mass lies in [exp(logprob), exp(logprob) + this]; "
                "0: exact",
            ),
        ]
    ]


_ENGINE_SECONDS = (
    "seconds the teacher's engine spent on this request (measured, wall clock): generation "
    "and scoring cost the same FLOPs per token but not the same time on a real server"
)


@with_config(_CLOSED)
class TeacherStamp(TypedDict):
    """Which teacher answered."""

    name: str
    model: str
    backend: str
    dtype: str
    versions: dict[str, str]


@with_config(_CLOSED)
class GenerateUsage(TypedDict):
    """What a generate request cost the teacher."""

    teacher_prompt_tokens: int
    teacher_completion_tokens: int
    teacher_tokens: int
    teacher_flops: Annotated[int | None, Field(description="null: the engine has no FLOP model")]
    teacher_engine_s: Annotated[float, Field(description=_ENGINE_SECONDS)]


@with_config(_CLOSED)
class ScoreUsage(GenerateUsage):
    """What a score request cost the teacher: as a generate request's, and the positions scored."""

    positions: int


@with_config(_CLOSED)
class ScoreTimings(TypedDict):
    """Where a score request's time went."""

    prepare_s: float
    engine_s: float
    mapping_s: float


@with_config(_CLOSED)
class ScoreResponse(TypedDict):
    """``POST /v1/score``."""

    top_k: int
    sequences: list[ScoredSequenceWire]
    usage: ScoreUsage
    timings: ScoreTimings
    teacher: TeacherStamp


@with_config(_CLOSED)
class Completion(TypedDict):
    """One teacher sample."""

    text: str
    ids: list[int]
    finish_reason: Literal["stop", "length"]


@with_config(_CLOSED)
class GenerateResponse(TypedDict):
    """``POST /v1/generate``."""

    completions: list[Completion]
    usage: GenerateUsage
    teacher: TeacherStamp


# -- the vLLM-compatible face (docs/vllm-face.md): vLLM 0.32's layouts, plus ``tokenbridge`` --


@with_config(_CLOSED)
class ModelCard(TypedDict):
    """One (teacher, student) pair as ``GET /v1/models`` lists it, in vLLM's fields."""

    id: Annotated[str, Field(description="TEACHER@STUDENT_ID, or TEACHER for its own tokenizer")]
    object: Literal["model"]
    created: int
    owned_by: str
    root: Annotated[str, Field(description="the teacher's model")]
    parent: None
    max_model_len: Annotated[int, Field(description="the teacher's, in teacher tokens")]
    permission: list[Any]
    tokenbridge: Annotated[
        dict[str, str], Field(description="teacher, student and base_url of the pair")
    ]


@with_config(_CLOSED)
class ModelList(TypedDict):
    """``GET /v1/models``."""

    object: Literal["list"]
    data: list[ModelCard]


@with_config(_CLOSED)
class PromptLogprob(TypedDict):
    """One student token's entry at one position of ``prompt_logprobs``."""

    logprob: Annotated[float, Field(description="the teacher's log-prob of the student token")]
    rank: Annotated[
        int,
        Field(
            description="1..K: its place in the mapped top-K; a token outside it (the realised "
            "one, a named candidate) ranks after every listed one: a lower bound"
        ),
    ]
    decoded_token: str


@with_config(_CLOSED)
class CompletionChoice(TypedDict):
    """One scored prompt; position 0 of ``prompt_logprobs`` is null, as in vLLM."""

    index: int
    text: Annotated[str, Field(description="always empty: the face generates nothing")]
    logprobs: None
    finish_reason: Literal["length"]
    stop_reason: None
    token_ids: None
    prompt_logprobs: list[dict[str, PromptLogprob] | None]
    prompt_token_ids: None


@with_config(_CLOSED)
class CompletionUsage(TypedDict):
    """vLLM's usage, in student tokens."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: None


@with_config(_CLOSED)
class CompletionExtension(TypedDict):
    """What only tokenbridge says about a completion answer."""

    teacher: TeacherStamp
    student: str
    chat_template: Annotated[
        list[Literal["re_rendered", "specials_matched_by_role", "no_specials"]],
        Field(
            description="per prompt: the conversation its ids carry in the student's chat "
            "template was read and the reply scored after the teacher's own rendering of it; "
            "or its specials were matched to the teacher's by role; or it holds none"
        ),
    ]
    usage: ScoreUsage


@with_config(_CLOSED)
class CompletionResponse(TypedDict):
    """``POST /v1/completions`` on the vLLM-compatible face."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    system_fingerprint: None
    tokenbridge: CompletionExtension


@with_config(_CLOSED)
class VllmErrorDetail(TypedDict):
    """A refusal on the vLLM face, in vLLM's fields."""

    message: str
    type: Annotated[str, Field(description="the status phrase, as vLLM writes it")]
    param: Annotated[str | None, Field(description="the request field at fault")]
    code: Annotated[int, Field(description="the HTTP status")]


@with_config(_CLOSED)
class VllmErrorBody(TypedDict):
    """Every refusal on the vLLM face."""

    error: VllmErrorDetail


#: The answers the OpenAPI description names (their nested types come along).
RESPONSE_TYPES: tuple[type, ...] = (
    ErrorBody,
    Health,
    Readiness,
    Info,
    StudentList,
    StudentDescription,
    Registration,
    Deleted,
    ScoreResponse,
    GenerateResponse,
    ModelList,
    CompletionResponse,
    VllmErrorBody,
)
