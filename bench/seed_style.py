"""A re-implementation of the founding paper's token alignment, for benchmarks only.

Written from the description in ``docs/mapping.md`` §5 (it is our own code, not the paper's): two
pointers walk the student's and the teacher's token ids; at each step windows of tokens are
decoded to text on both sides with each tokenizer's own ``decode()`` and grown one token at a time
until the two strings are equal, which closes a chunk. Each student token of a chunk then gets the
"semantic prior" target ``log q_i = (L_T / L_S) · log p_i``.

Faithful to the method, and so deliberately *not* byte-exact:

* a window is decoded on its own, as the paper's code does, so a SentencePiece tokenizer drops the
  leading space of the window (``▁the`` alone decodes to ``"the"``) while a byte-level BPE keeps it
  (``Ġthe`` decodes to ``" the"``): most word chunks between the two families never match;
* a token holding part of a multi-byte character decodes to U+FFFD; text containing U+FFFD is
  treated as incomplete and the window keeps growing (so a literal U+FFFD in the text never
  matches);
* the cost is quadratic in the chunk length (every step re-decodes the whole window), and a chunk
  is given up when either side would need more than ``MAX_WINDOW`` (6) tokens.

Resynchronisation after giving up (our choice; the description does not fix it): the student
token at the student pointer gets no signal, and both pointers advance by one token. This keeps
the two sides in step wherever the tokenisations are roughly one token per word (the common case
between families), but it is a heuristic: after a long mismatched stretch the pointers can sit at
different places of the text until the two decodings happen to coincide again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "MAX_WINDOW",
    "REPLACEMENT_CHAR",
    "SeedChunk",
    "SeedTargets",
    "seed_align",
    "seed_align_and_targets",
    "semantic_prior_targets",
]

#: The longest window (in tokens, on either side) the aligner tries before giving up on a chunk.
MAX_WINDOW = 6

#: What ``decode()`` yields for bytes that are not (yet) a complete UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"


class SeedChunk(NamedTuple):
    """One aligned chunk: student tokens ``[student_start, student_end)`` decode to the same text
    as teacher tokens ``[teacher_start, teacher_end)``."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int


class SeedTargets(NamedTuple):
    """Result of ``seed_align_and_targets``.

    ``targets``: the semantic-prior log-prob target of every student token (NaN where the token
    is in no chunk); ``aligned``: which student tokens are in a chunk; ``chunks``: the chunks found.
    """

    targets: np.ndarray
    aligned: np.ndarray
    chunks: list[SeedChunk]

    @property
    def num_chunks(self) -> int:
        """Number of chunks found."""
        return len(self.chunks)


def _ids(values: Sequence[int] | np.ndarray, what: str) -> list[int]:
    ids = np.asarray(values, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional")
    if len(ids) and ids.min() < 0:
        raise ValueError(f"{what} holds negative ids (gaps cannot be decoded)")
    return [int(i) for i in ids.tolist()]


def seed_align(
    student_ids: Sequence[int] | np.ndarray,
    teacher_ids: Sequence[int] | np.ndarray,
    student_tok: Any,
    teacher_tok: Any,
    max_window: int = MAX_WINDOW,
) -> list[SeedChunk]:
    """Align two tokenisations by decoding growing windows until the texts match (paper style).

    ``student_tok``/``teacher_tok`` are Hugging Face tokenizers (anything with ``decode(ids)``).
    At each step both windows start at the two pointers with one token each; while the decoded
    strings differ, the side whose text is incomplete (holds U+FFFD) grows by one token, else the
    side whose text is shorter, else both. A match closes a chunk and moves both pointers past it.
    When a window would exceed ``max_window`` tokens or run past the end of its sequence, the
    chunk is given up: both pointers advance by one token (see the module docstring), and the
    student token passed over belongs to no chunk. Returns the chunks in order.
    """
    if max_window < 1:
        raise ValueError("max_window must be at least 1")
    student = _ids(student_ids, "student_ids")
    teacher = _ids(teacher_ids, "teacher_ids")
    n, m = len(student), len(teacher)
    chunks: list[SeedChunk] = []
    i = j = 0
    while i < n and j < m:
        width_s = width_t = 1
        while True:
            student_text = student_tok.decode(student[i : i + width_s])
            teacher_text = teacher_tok.decode(teacher[j : j + width_t])
            student_incomplete = REPLACEMENT_CHAR in student_text
            teacher_incomplete = REPLACEMENT_CHAR in teacher_text
            if not (student_incomplete or teacher_incomplete) and student_text == teacher_text:
                chunks.append(SeedChunk(i, i + width_s, j, j + width_t))
                i, j = i + width_s, j + width_t
                break
            if student_incomplete != teacher_incomplete:
                grow_s, grow_t = student_incomplete, teacher_incomplete
            elif len(student_text) != len(teacher_text):
                grow_s = len(student_text) < len(teacher_text)
                grow_t = not grow_s
            else:
                grow_s = grow_t = True
            width_s += grow_s
            width_t += grow_t
            if width_s > max_window or width_t > max_window or i + width_s > n or j + width_t > m:
                i, j = i + 1, j + 1
                break
    return chunks


def semantic_prior_targets(
    chunks: Sequence[SeedChunk],
    teacher_logprobs: Sequence[float] | np.ndarray,
    student_logprobs: Sequence[float] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's per-token target over each chunk: ``log q_i = (L_T / L_S) · log p_i``.

    ``L_T`` and ``L_S`` are the sums of the teacher's log-probs (of its actual tokens) and of the
    student's log-probs over the chunk; ``p_i`` is the student's own probability of token ``i``.
    So the targets of a chunk sum to ``L_T`` and keep the student's proportions. When ``L_S`` is
    exactly 0 (every student token certain) the ratio is undefined and ``L_T`` is split evenly
    over the chunk's tokens (our choice). Returns (targets with NaN outside chunks, aligned mask).
    """
    teacher_lp = np.asarray(teacher_logprobs, dtype=np.float64)
    student_lp = np.asarray(student_logprobs, dtype=np.float64)
    targets = np.full(len(student_lp), np.nan)
    aligned = np.zeros(len(student_lp), dtype=bool)
    for s0, s1, t0, t1 in chunks:
        if s1 > len(student_lp) or t1 > len(teacher_lp):
            raise ValueError("a chunk lies outside the given log-prob arrays")
        l_teacher = float(teacher_lp[t0:t1].sum())
        l_student = float(student_lp[s0:s1].sum())
        if l_student != 0.0:
            targets[s0:s1] = (l_teacher / l_student) * student_lp[s0:s1]
        else:
            targets[s0:s1] = l_teacher / (s1 - s0)
        aligned[s0:s1] = True
    return targets, aligned


def seed_align_and_targets(
    student_ids: Sequence[int] | np.ndarray,
    teacher_ids: Sequence[int] | np.ndarray,
    student_tok: Any,
    teacher_tok: Any,
    teacher_logprobs: Sequence[float] | np.ndarray,
    student_logprobs: Sequence[float] | np.ndarray,
    max_window: int = MAX_WINDOW,
) -> SeedTargets:
    """Seed-style alignment (``seed_align``) followed by the semantic-prior targets.

    ``teacher_logprobs[k]`` is the teacher's log-prob of its token ``teacher_ids[k]``;
    ``student_logprobs[i]`` the student's log-prob of ``student_ids[i]``. Returns
    ``SeedTargets(targets, aligned, chunks)``: targets are NaN for student tokens that got no
    signal.
    """
    if len(teacher_logprobs) != len(teacher_ids):
        raise ValueError("need one teacher log-prob per teacher token")
    if len(student_logprobs) != len(student_ids):
        raise ValueError("need one student log-prob per student token")
    chunks = seed_align(student_ids, teacher_ids, student_tok, teacher_tok, max_window)
    targets, aligned = semantic_prior_targets(chunks, teacher_logprobs, student_logprobs)
    return SeedTargets(targets=targets, aligned=aligned, chunks=chunks)
