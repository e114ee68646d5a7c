"""The vLLM-compatible face (``docs/vllm-face.md``): trainers that talk to a teacher as a plain
``vllm serve`` (``POST /v1/completions`` with token ids and ``prompt_logprobs``) get the teacher's
answer about the *student's* vocabulary, by asking ``/v1/score`` and rewriting its rows.

A model of this face is one (teacher, registered student) pair, named ``TEACHER@STUDENT_ID``
(just ``TEACHER`` for a student whose vocabulary is the teacher's own); ``/vllm/TEACHER/STUDENT_ID``
is the base URL of a single-model server for that pair. The translation is exact: position ``i``
of a prompt is row ``i`` of ``/v1/score`` for the prompt ``{"text": ""}`` and the prompt's ids as
the completion (row ``i - 1``, the student's BOS left out, when the ids open with it); when the ids
hold a conversation in the student's chat template (``conversation.py``), the reply is scored
after the conversation as ``messages``, in the teacher's own template. The numbers are
``/v1/score``'s.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tokenbridge.service.conversation import template_reader
from tokenbridge.service.core import TeacherService
from tokenbridge.service.errors import (
    BadRequestError,
    NotFoundError,
    UnprocessableError,
)
from tokenbridge.service.registry import StudentEntry
from tokenbridge.service.teacher import Teacher
from tokenbridge.shared import responses
from tokenbridge.shared.protocol import (
    CompletionRequest,
    Message,
    Prompt,
    ScoredSequence,
    ScoreRequest,
    ScoreSequence,
)

__all__ = [
    "FACE_PREFIX",
    "PAIR_PATH",
    "PairModel",
    "PromptPlan",
    "answer",
    "is_face_path",
    "model_card",
    "new_request_id",
    "pair_models",
    "resolve_model",
    "resolve_pair",
    "score_request",
]

#: Where the per-pair base URLs live, and the routes' pattern of one.
FACE_PREFIX = "/vllm"
PAIR_PATH = FACE_PREFIX + "/{teacher}/{student_id}"
_SEPARATOR = "@"
#: vLLM writes a log-prob of minus infinity as this (JSON has no infinity).
_FLOOR = -9999.0


def is_face_path(path: str) -> bool:
    """Whether ``path`` belongs to the vLLM-compatible face (its errors take vLLM's layout)."""
    return path.startswith(FACE_PREFIX + "/") or path in ("/v1/models", "/v1/completions")


@dataclass(frozen=True)
class PairModel:
    """One model of the face: a teacher and a registered student, and the name they go by."""

    teacher: Teacher
    student: StudentEntry
    name: str

    @property
    def base_url(self) -> str:
        """The path under which this pair is a single-model ``vllm serve``."""
        return f"{FACE_PREFIX}/{self.teacher.name}/{self.student.id}"


def _pair(service: TeacherService, teacher: Teacher, student: StudentEntry) -> PairModel:
    own = service.registry.teacher_vocab(teacher.name)
    same = own is not None and own.content_hash == student.vocab.content_hash
    name = teacher.name if same else f"{teacher.name}{_SEPARATOR}{student.id}"
    return PairModel(teacher, student, name)


def pair_models(service: TeacherService) -> list[PairModel]:
    """Every model of the face: each teacher with each registered student, teachers in their
    order, students oldest first."""
    students = service.registry.list()
    return [_pair(service, t, s) for t in service.teachers.values() for s in students]


def resolve_pair(service: TeacherService, teacher: str, student_id: str) -> PairModel:
    """The pair of a base URL (404 for an unknown teacher or student)."""
    return _pair(service, service.teacher(teacher), service.registry.get(student_id))


def resolve_model(
    service: TeacherService, model: str | None, base: PairModel | None = None
) -> PairModel:
    """The pair a request's ``model`` names: under a base URL, that pair (``model`` may be left
    out, and must name it if given); at the top level, ``TEACHER@STUDENT_ID`` or a teacher's own
    name (404 naming the models there are, as vLLM answers)."""
    if base is not None and (model is None or model == base.name):
        return base
    if model is None:
        raise BadRequestError(
            "name the model: 'model' is TEACHER@STUDENT_ID (GET /v1/models lists them)", "model"
        )
    candidates = [base] if base is not None else pair_models(service)
    for pair in candidates:
        if pair.name == model:
            return pair
    known = [pair.name for pair in candidates]
    hint = (
        f"the models here are {known[:10]}"
        if known
        else "none is listed yet: register the student's tokenizer with POST /v1/tokenizers"
    )
    raise NotFoundError(f"The model `{model[:300]}` does not exist; {hint}", "model")


def model_card(pair: PairModel) -> responses.ModelCard:
    """The pair as ``GET /v1/models`` lists it."""
    engine = pair.teacher.engine.info
    return {
        "id": pair.name,
        "object": "model",
        "created": int(pair.student.created),
        "owned_by": "tokenbridge",
        "root": engine.model,
        "parent": None,
        "max_model_len": engine.max_model_len,
        "permission": [],
        "tokenbridge": {
            "teacher": pair.teacher.name,
            "student": pair.student.id,
            "student_name": pair.student.name,
            "base_url": pair.base_url,
        },
    }


def _lead(ids: list[int], student: StudentEntry) -> int:
    """Ids left out of the scored completion: the student's BOS when the ids open with it (the
    teacher's context opens with its own)."""
    bos = student.vocab.roles.get("bos")
    return 1 if bos is not None and ids[0] == bos else 0


#: How a prompt's ids reached the teacher (``tokenbridge.chat_template`` of the answer).
TemplateUse = Literal["re_rendered", "specials_matched_by_role", "no_specials"]


@dataclass(frozen=True)
class Segment:
    """Positions ``start..end-1`` of a prompt answered by rows ``start - first_row..`` of
    scored sequence ``sequence``."""

    sequence: int
    start: int
    end: int
    first_row: int


@dataclass(frozen=True)
class PromptPlan:
    """How one prompt of the request is scored: its segments and how the teacher saw it."""

    segments: tuple[Segment, ...]
    template: TemplateUse

    def locate(self, position: int) -> tuple[int, int]:
        """The scored sequence and row that answer ``position``."""
        for segment in self.segments:
            if segment.start <= position < segment.end:
                return segment.sequence, position - segment.first_row
        raise IndexError(position)  # every position from 1 on lies in a segment


def _conversation(ids: list[int], pair: PairModel) -> tuple[list[dict[str, str]], int] | None:
    """The conversation the ids carry in the student's chat template, if it can be read and the
    teacher can render it in its own; else ``None``."""
    student, teacher_tokenizer = pair.student, pair.teacher.engine.tokenizer
    if not getattr(teacher_tokenizer, "chat_template", None):
        return None
    reader = template_reader(student.id, student.tokenizer, student.vocab)
    read = reader.read(ids) if reader is not None else None
    if read is None or read.reply_start < 1:
        return None
    try:
        teacher_tokenizer.apply_chat_template(
            read.messages, add_generation_prompt=True, tokenize=False
        )
    except Exception:  # the teacher's template refuses the conversation (a system role...)
        return None
    return read.messages, read.reply_start


def score_request(
    body: CompletionRequest, pair: PairModel
) -> tuple[ScoreRequest, list[PromptPlan]]:
    """The ``/v1/score`` request whose rows answer ``body`` (see the module's docstring), and per
    prompt where its positions' rows are."""
    teacher = pair.teacher
    limit = teacher.max_top_k
    if body.prompt_logprobs is not None and body.prompt_logprobs > limit:
        raise BadRequestError(
            f"prompt_logprobs {body.prompt_logprobs} is above the maximum {limit} of teacher "
            f"{teacher.name!r} (its max_top_k in GET /v1/info)",
            "prompt_logprobs",
        )
    rows = body.candidate_rows()
    if any(r is not None for r in rows) and not teacher.engine.info.full_rows:
        raise UnprocessableError(
            f"teacher {teacher.name!r} runs on the {teacher.engine.info.backend} engine, which "
            "returns no full rows: prompt_logprob_token_ids needs the transformers engine",
            "prompt_logprob_token_ids",
        )
    special = pair.student.vocab.special
    sequences: list[ScoreSequence] = []
    plans: list[PromptPlan] = []

    def add(prompt: Prompt, ids: list[int], lo: int, hi: int, named: Any) -> Segment:
        sequences.append(
            ScoreSequence(
                prompt=prompt,
                completion_ids=ids[lo:hi],
                candidate_ids=None if named is None else named[lo:hi],
            )
        )
        return Segment(len(sequences) - 1, max(lo, 1), hi, lo)

    for ids, named in zip(body.prompt, rows, strict=True):
        lead = _lead(ids, pair.student)
        conversation = _conversation(ids, pair)
        if conversation is None:
            segment = add(Prompt(text=""), ids, lead, len(ids), named)
            has_specials = bool(np.any(special[np.asarray(ids[lead:], dtype=np.int64)]))
            template: TemplateUse = "specials_matched_by_role" if has_specials else "no_specials"
            plans.append(PromptPlan((segment,), template))
            continue
        # The turns before the reply are scored as any ids are; the reply as a completion of
        # the conversation rendered in the teacher's own template.
        messages, reply = conversation
        before = add(Prompt(text=""), ids, lead, reply, named)
        after = add(Prompt(messages=[Message(**m) for m in messages]), ids, reply, len(ids), named)
        plans.append(PromptPlan((before, after), "re_rendered"))
    request = ScoreRequest(
        student_tokenizer=pair.student.id,
        top_k=max(1, body.prompt_logprobs or 0),
        sequences=sequences,
        teacher=teacher.name,
    )
    return request, plans


class _Decoder:
    """Each student id's ``decoded_token``, decoded once per answer."""

    def __init__(self, student: StudentEntry, as_ids: bool) -> None:
        self.student = student
        self.as_ids = as_ids
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        found = self.cache.get(token_id)
        if found is None:
            vocab = self.student.vocab
            if vocab.special[token_id]:
                found = str(self.student.tokenizer.convert_ids_to_tokens(token_id))
            else:
                found = vocab.token_bytes[token_id].decode("utf-8", errors="replace")
            self.cache[token_id] = found
        return found


def _logprob(value: float) -> float:
    return max(float(value), _FLOOR)


def _position(
    row: int,
    realised: int,
    scored: ScoredSequence,
    top_k: int,
    candidates: list[int],
    decode: _Decoder,
) -> dict[str, responses.PromptLogprob]:
    """One position's ``prompt_logprobs`` entry: the mapped top-K (ranks 1..K by mass), then
    the realised token and the named candidates that lie outside it, ranked after it."""
    entries: dict[int, responses.PromptLogprob] = {}
    listed = 0
    for token_id, value in zip(
        scored.topk_ids_SK[row, :top_k].tolist(),
        scored.topk_logprobs_SK[row, :top_k].tolist(),
        strict=True,
    ):
        if token_id < 0 or math.isnan(value):
            continue
        listed += 1
        entries[token_id] = {"logprob": _logprob(value), "rank": listed, "decoded_token": ""}
    # The most exact number wins for a token named twice: the realised token's telescoped
    # log-prob (§3), then a candidate's from the full row (§4b), then its top-K mass.
    extra: dict[int, float] = {}
    if scored.candidate_logprobs_SC is not None:
        # The row is the request's candidates in their order, -1 padded to one width.
        for token_id, value in zip(
            candidates, scored.candidate_logprobs_SC[row].tolist(), strict=False
        ):
            if token_id >= 0 and not math.isnan(value):
                extra[token_id] = float(value)
    realised_value = float(scored.logprobs_S[row])
    if not math.isnan(realised_value):
        extra[realised] = realised_value
    outside = sorted((v, t) for t, v in extra.items() if t not in entries)
    for token_id, value in extra.items():
        if token_id in entries:
            entries[token_id]["logprob"] = _logprob(value)
    for place, (value, token_id) in enumerate(reversed(outside)):
        entries[token_id] = {
            "logprob": _logprob(value),
            "rank": listed + 1 + place,
            "decoded_token": "",
        }
    for token_id, entry in entries.items():
        entry["decoded_token"] = decode(token_id)
    return {str(token_id): entry for token_id, entry in entries.items()}


def answer(
    body: CompletionRequest,
    pair: PairModel,
    scored: responses.ScoreResponse,
    plans: list[PromptPlan],
    request_id: str,
) -> responses.CompletionResponse:
    """``body``'s answer in vLLM's layout, from the ``/v1/score`` answer of
    ``score_request(body, pair)`` and its plans."""
    decode = _Decoder(pair.student, bool(body.return_tokens_as_token_ids))
    top_k = body.prompt_logprobs or 0
    sequences = [ScoredSequence.from_wire(wire, scored["top_k"]) for wire in scored["sequences"]]
    choices: list[responses.CompletionChoice] = []
    rows = body.candidate_rows()
    for index, (ids, plan, candidates) in enumerate(zip(body.prompt, plans, rows, strict=True)):
        positions: list[dict[str, responses.PromptLogprob] | None] = [None]
        for i in range(1, len(ids)):
            named = [] if candidates is None else candidates[i]
            sequence, row = plan.locate(i)
            positions.append(_position(row, ids[i], sequences[sequence], top_k, named, decode))
        choices.append(
            {
                "index": index,
                "text": "",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": positions,
                "prompt_token_ids": None,
            }
        )
    tokens = sum(len(ids) for ids in body.prompt)
    return {
        "id": f"cmpl-{body.request_id or request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": pair.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
        "system_fingerprint": None,
        "tokenbridge": {
            "teacher": scored["teacher"],
            "student": pair.student.id,
            "chat_template": [plan.template for plan in plans],
            "usage": scored["usage"],
        },
    }


def new_request_id() -> str:
    """An id for an answer whose request named none."""
    return uuid.uuid4().hex
