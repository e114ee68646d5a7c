"""From a score request to the wire: render for the teacher, align, score, map, encode.

Per sequence: the prompt is re-rendered for the teacher (``render_prompt``); the completion's
bytes are tokenised for the teacher separately and aligned with the student's tokens
(``prepare``); the engine scores the teacher's completion positions; ``PairMapper`` maps the
scores onto the student's tokens; ``wire_sequence`` lays the result out as the protocol says.
Gaps (bytes the teacher cannot spell) are left out of the engine's input and their rows stay
unscored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenbridge.service.engines.base import PositionScores, ScoreJob
from tokenbridge.service.errors import (
    PayloadTooLargeError,
    UnprocessableError,
    tokenizer_failures_are_unprocessable,
)
from tokenbridge.service.registry import Pairing, StudentEntry
from tokenbridge.shared.align import (
    GAP_ID,
    Alignment,
    TeacherView,
    align,
    teacher_view,
    token_widths,
)
from tokenbridge.shared.candidates import CandidateMasses, candidate_masses
from tokenbridge.shared.errors import TokenbridgeError
from tokenbridge.shared.mapping import MappedCompletion, TeacherScores
from tokenbridge.shared.protocol import SCORE_ARRAY_DTYPES, Prompt, ScoreSequence
from tokenbridge.shared.responses import ScoredSequenceWire

__all__ = [
    "PreparedSequence",
    "map_candidates",
    "prepare",
    "render_prompt",
    "teacher_scores",
    "wire_sequence",
]


def render_prompt(
    prompt: Prompt, teacher_tokenizer: Any, student: StudentEntry | None
) -> list[int]:
    """The teacher's token ids for ``prompt``.

    Text is tokenised as the teacher would (its own BOS included); messages go through the
    teacher's chat template with a generation prompt; student ids are decoded with the student's
    tokenizer (special tokens dropped) and then treated as text. An empty rendering gets the
    teacher's BOS, since the first completion token needs a position that predicts it.
    """
    if prompt.messages is not None:
        if not getattr(teacher_tokenizer, "chat_template", None):
            raise UnprocessableError(
                "the teacher's tokenizer has no chat template; send the prompt as 'text'"
            )
        messages = [m.model_dump() for m in prompt.messages]
        try:
            text = teacher_tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as error:
            raise UnprocessableError(f"the teacher's chat template failed: {error}") from None
        ids = teacher_tokenizer.encode(text, add_special_tokens=False)
    else:
        if prompt.ids is not None:
            assert student is not None
            largest = max(prompt.ids, default=0)
            if largest >= student.vocab.size:
                raise UnprocessableError(
                    f"prompt ids must lie in [0, {student.vocab.size}) for student "
                    f"{student.name!r}; got {_short(largest)}"
                )
            text = _tokenizer_call(
                "the student tokenizer cannot decode the prompt ids",
                student.tokenizer.decode,
                prompt.ids,
                skip_special_tokens=True,
            )
        else:
            text = prompt.text or ""
        ids = (
            _tokenizer_call(
                "the teacher tokenizer cannot encode the prompt",
                teacher_tokenizer.encode,
                text,
                add_special_tokens=True,
            )
            if text
            else []
        )
    if not ids:
        starter = teacher_tokenizer.bos_token_id
        if starter is None:
            starter = teacher_tokenizer.eos_token_id
        if starter is None:
            raise UnprocessableError(
                "the prompt renders to no teacher tokens and the teacher has no BOS token; "
                "send a non-empty prompt"
            )
        ids = [int(starter)]
    return list(ids)


def _short(number: int) -> str:
    """``number`` for a message, cut when it is absurdly long."""
    return str(number) if number.bit_length() <= 256 else f"a number of {number.bit_length()} bits"


def _tokenizer_call(what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` on a tokenizer; what it refuses is the request's fault (422)."""
    with tokenizer_failures_are_unprocessable(what):
        return call(*args, **kwargs)


@dataclass(frozen=True)
class PreparedSequence:
    """One sequence ready for the engine: teacher ids, the alignment and the engine job."""

    student_ids: np.ndarray
    prompt_ids: list[int]
    view: TeacherView
    alignment: Alignment
    job: ScoreJob | None
    #: The request's ``candidate_ids`` padded to one width with -1 (``None`` when it named none).
    candidate_ids_SC: np.ndarray | None = None

    @property
    def teacher_tokens(self) -> int:
        """Tokens the engine reads for this sequence (prompt + completion without gaps)."""
        return len(self.job.ids) if self.job is not None else len(self.prompt_ids)


def prepare(
    sequence: ScoreSequence,
    student: StudentEntry,
    pairing: Pairing,
    teacher_tokenizer: Any,
    top_k: int,
    max_model_len: int,
) -> PreparedSequence:
    """Render, re-tokenise and align one sequence for the teacher of ``pairing`` (the student's
    pairing with it); ``UnprocessableError`` for bad ids or text."""
    vocab = student.vocab
    # Checked on the Python ints: an id past int64 (a msgpack uint64, a long JSON number) must be
    # refused with the range, not overflow the conversion to an array.
    largest = max(sequence.completion_ids, default=0)
    if largest >= vocab.size:
        raise UnprocessableError(
            f"completion ids must lie in [0, {vocab.size}) for student {student.name!r}; "
            f"got {_short(largest)}"
        )
    student_ids = np.asarray(sequence.completion_ids, dtype=np.int64)
    candidate_ids_SC = _candidate_array(sequence.candidate_ids, vocab.size, student.name)
    prompt_ids = render_prompt(sequence.prompt, teacher_tokenizer, student)
    try:
        view = teacher_view(
            student_ids,
            vocab,
            teacher_tokenizer,
            pairing.mapper.teacher,
            pairing.mapper.special_map,
        )
        alignment = align(token_widths(vocab, student_ids), view.widths)
    except TokenbridgeError as error:
        raise UnprocessableError(f"the completion cannot be aligned: {error}") from None
    completion = view.ids[view.ids != GAP_ID]
    total = len(prompt_ids) + len(completion)
    if total > max_model_len:
        raise PayloadTooLargeError(
            f"a sequence needs {total} teacher tokens ({len(prompt_ids)} prompt + "
            f"{len(completion)} completion); max_model_len is {max_model_len}"
        )
    job = None
    if len(completion):
        ids = np.concatenate([np.asarray(prompt_ids, dtype=np.int64), completion])
        job = ScoreJob(
            ids=ids, start=len(prompt_ids), top_k=top_k, full_rows=candidate_ids_SC is not None
        )
    return PreparedSequence(student_ids, prompt_ids, view, alignment, job, candidate_ids_SC)


def _candidate_array(
    rows: list[list[int]] | None, vocab_size: int, student: str
) -> np.ndarray | None:
    """The candidates as one ``S×C`` array, short rows padded with -1; ids checked."""
    if rows is None:
        return None
    width = max((len(row) for row in rows), default=0)
    out = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    largest = max((max(row, default=-1) for row in rows), default=-1)
    if largest >= vocab_size:
        raise UnprocessableError(
            f"candidate ids must lie in [0, {vocab_size}) for student {student!r}; "
            f"got {_short(largest)}"
        )
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return out


def map_candidates(
    mapper: Any, prepared: PreparedSequence, scored: PositionScores | None, scored_S: np.ndarray
) -> CandidateMasses | None:
    """§4b for one prepared sequence (``None`` when it named no candidates)."""
    if prepared.candidate_ids_SC is None:
        return None
    m = len(prepared.view.ids)
    if scored is None:  # nothing reached the engine: no row is scored either
        full_NV = np.zeros((0, mapper.teacher.size), dtype=np.float32)
        row_of_M = np.full(m, -1)
    else:
        if scored.full_logprobs_TV is None:
            raise RuntimeError("the engine returned no full rows for a job that asked for them")
        # The engine's rows skip the gaps; ids its output layer has beyond the tokenizer's carry
        # no text and are left out where the rows are read.
        full_NV = scored.full_logprobs_TV
        missing = mapper.teacher.size - full_NV.shape[1]
        if missing > 0:  # tokenizer ids the model has no output for: probability 0
            full_NV = np.pad(full_NV, ((0, 0), (0, missing)), constant_values=-np.inf)
        row_of_M = np.cumsum(prepared.view.ids != GAP_ID) - 1
    return candidate_masses(
        mapper, prepared.alignment, prepared.view.ids, full_NV, prepared.candidate_ids_SC,
        scored_S, row_of_M,
    )  # fmt: skip


def teacher_scores(
    prepared: PreparedSequence, scored: PositionScores | None, top_k: int
) -> TeacherScores:
    """Engine rows spread back over the teacher completion, gap rows left as padding."""
    m = len(prepared.view.ids)
    topk_ids = np.full((m, top_k), -1, dtype=np.int64)
    topk_lps = np.full((m, top_k), -np.inf, dtype=np.float64)
    actual = np.zeros(m, dtype=np.float64)
    if scored is not None:
        rows = np.flatnonzero(prepared.view.ids != GAP_ID)
        width = scored.topk_ids_TK.shape[1]
        topk_ids[rows, :width] = scored.topk_ids_TK
        topk_lps[rows, :width] = scored.topk_logprobs_TK
        actual[rows] = scored.actual_logprobs_T
    return TeacherScores(topk_ids, topk_lps, actual)


def wire_sequence(
    mapped: MappedCompletion,
    prepared: PreparedSequence,
    top_k: int,
    candidates: CandidateMasses | None = None,
) -> ScoredSequenceWire:
    """One entry of the response's ``sequences``, field names and dtypes as the protocol says."""

    def typed(name: str, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=SCORE_ARRAY_DTYPES[name])

    report = mapped.report
    wire: ScoredSequenceWire = {
        "logprobs": typed("logprobs", mapped.logprobs_S),
        # The mapper's extra last column (the sampled token when outside the top K) stays home:
        # ``logprobs`` already carries the sampled token's log-prob.
        "topk_ids": typed("topk_ids", mapped.topk_ids_SK[:, :top_k]),
        "topk_logprobs": typed("topk_logprobs", mapped.topk_logprobs_SK[:, :top_k]),
        "chunk_ids": typed("chunk_ids", mapped.chunk_ids_S),
        "tail_mass": typed("tail_mass", mapped.tail_mass_S),
        "unresolved_mass": typed("unresolved_mass", mapped.unresolved_mass_S),
        "exact": typed("exact", mapped.exact_S),
        "chunk_logprobs": np.asarray(mapped.chunk_teacher_logprobs_C, dtype="<f4"),
        "alignment": {
            "chunks": report.chunks,
            "one_to_one_share": report.one_to_one_share,
            "longest_chunk_tokens": report.longest_chunk_tokens,
            "untiled_bytes": report.untiled_bytes,
            "total_bytes": report.total_bytes,
            "teacher_prompt_tokens": len(prepared.prompt_ids),
            "teacher_completion_tokens": len(prepared.view.ids),
        },
    }
    if candidates is not None:
        wire["candidate_logprobs"] = typed("candidate_logprobs", candidates.logprobs_SC)
        wire["candidate_unresolved_mass"] = typed(
            "candidate_unresolved_mass", candidates.unresolved_SC
        )
    return wire
