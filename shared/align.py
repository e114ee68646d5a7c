"""Alignment of two tokenisations of the same bytes: chunks between shared boundaries (§2).

Both sequences are laid on one coordinate line, the *virtual byte stream*: a token that spells
bytes is as wide as its bytes; a special token (which spells none) is one virtual byte wide, so an
end-of-turn marker on one side can sit opposite the end-of-turn marker of the other. Where the
teacher cannot represent a stretch of the student's stream (an unmapped special token, bytes its
tokenizer cannot spell), a *gap* of the same width stands in and the chunk holding it is not scored.

Sync points are the offsets where both sides have a boundary (the intersection of the two sets of
token ends); a chunk is the run of tokens between consecutive sync points. Everything is linear in
the number of tokens and vectorised with numpy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenbridge.shared.errors import AlignmentError
from tokenbridge.shared.vocab import Vocab

__all__ = [
    "GAP_ID",
    "Alignment",
    "AlignmentReport",
    "TeacherView",
    "align",
    "encode_continuation",
    "special_token_map",
    "teacher_view",
    "token_widths",
]

#: Teacher-side placeholder id for a stretch of the student's stream the teacher cannot spell.
GAP_ID = -1

# Prepended when a tokenizer adds a dummy-prefix space to every input (SentencePiece): the prefix
# lands on the sentinel, whose ids are then dropped. A newline never merges with what follows in
# any tokenizer we know; the others are fallbacks, each checked byte for byte.
_SENTINELS = ("\n", "\n\n", ".", "a")


_METASPACE = "\u2581"
# Bytes that are not UTF-8, as ``surrogateescape`` decodes them (U+DC80..U+DCFF).
_INVALID_RUNS = re.compile("([\udc80-\udcff]+)")


def _byte_tokens(vocab: Vocab, data: bytes) -> list[int | None]:
    """The single-byte token of each byte (byte-level pieces, ``<0xNN>``), None where missing."""
    return [vocab.id_of_bytes.get(bytes([value])) for value in data]


def encode_continuation(tokenizer: Any, vocab: Vocab, text: str) -> list[int]:
    """Token ids that spell exactly ``text.encode()``, as a continuation of earlier text.

    No special tokens are added or recognised (a literal ``<|im_end|>`` in the text is text), and
    SentencePiece's dummy-prefix space is removed by encoding behind a sentinel. The result is
    checked byte for byte; ``AlignmentError`` when no way of encoding reproduces the bytes.
    """
    if not text:
        return []
    if vocab.scheme == "sentencepiece" and _METASPACE in text:
        # SentencePiece reads a literal ▁ as a space; spell it with byte pieces instead.
        ids: list[int] = []
        for index, piece in enumerate(text.split(_METASPACE)):
            if index:
                pieces = _byte_tokens(vocab, _METASPACE.encode())
                if None in pieces:
                    raise AlignmentError(f"tokenizer {vocab.name!r} cannot spell a literal ▁")
                ids.extend(p for p in pieces if p is not None)
            ids.extend(encode_continuation(tokenizer, vocab, piece))
        return ids
    target = text.encode("utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if vocab.bytes_of(ids) == target:
        return list(ids)
    for sentinel in _SENTINELS:
        ids = tokenizer.encode(sentinel + text, add_special_tokens=False, split_special_tokens=True)
        # Drop the tokens up to the first one that reaches past the sentinel's bytes.
        reach = np.cumsum(vocab.lengths[np.asarray(ids, dtype=np.int64)])
        cut = int(np.searchsorted(reach, len(sentinel.encode()))) + 1
        rest = list(ids[cut:])
        if vocab.bytes_of(rest) == target:
            return rest
    raise AlignmentError(
        f"tokenizer {vocab.name!r} cannot encode {text[:40]!r}... so that its tokens spell the "
        "same bytes (a normaliser changes the text?)"
    )


def special_token_map(student: Vocab, teacher: Vocab) -> dict[int, int]:
    """Student special id → teacher special id, matched by role (end of turn, eos, bos, pad).

    Derived from the two tokenizers' own role tables, never from a table of model families.
    """
    mapping: dict[int, int] = {}
    for role in ("eot", "eos", "bos", "pad"):
        student_id = student.roles.get(role)
        teacher_id = teacher.roles.get(role)
        if student_id is not None and teacher_id is not None:
            mapping.setdefault(student_id, teacher_id)
    return mapping


def token_widths(vocab: Vocab, ids: np.ndarray) -> np.ndarray:
    """Width of each token on the virtual byte stream: its byte length, or 1 if special."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(vocab.special[ids], 1, vocab.lengths[ids])


@dataclass(frozen=True)
class TeacherView:
    """The teacher's tokenisation of a student completion.

    ``ids``: teacher ids, ``GAP_ID`` for gaps; ``widths``: virtual-stream widths (same total as
    the student's); ``untiled_bytes``: total width of the gaps.
    """

    ids: np.ndarray
    widths: np.ndarray
    untiled_bytes: int


def _split_utf8(data: bytes) -> list[tuple[bool, bytes]]:
    """Cut ``data`` into (is_text, run) pieces: valid UTF-8 runs and invalid byte runs.

    ``surrogateescape`` turns each invalid byte into a lone surrogate, which valid UTF-8 never
    decodes to, so one decode and one split find every run.
    """
    decoded = data.decode("utf-8", errors="surrogateescape")
    return [
        (_INVALID_RUNS.fullmatch(run) is None, run.encode("utf-8", errors="surrogateescape"))
        for run in _INVALID_RUNS.split(decoded)
        if run
    ]


def teacher_view(
    student_ids: Sequence[int] | np.ndarray,
    student: Vocab,
    teacher_tokenizer: Any,
    teacher: Vocab,
    specials: dict[int, int] | None = None,
) -> TeacherView:
    """Tokenise a student completion for the teacher, tiling the same virtual byte stream.

    Runs of ordinary student tokens are concatenated to bytes and encoded for the teacher as a
    continuation; bytes that are not valid UTF-8 (a character cut by the end of sampling) are
    spelled with the teacher's single-byte tokens where it has them; student special tokens become
    the teacher's special of the same role. Whatever the teacher cannot spell becomes a gap.
    """
    ids_array = np.asarray(student_ids, dtype=np.int64)
    if len(ids_array) and (ids_array.min() < 0 or ids_array.max() >= student.size):
        raise AlignmentError(
            f"student ids must lie in [0, {student.size}); got {int(ids_array.min())}.."
            f"{int(ids_array.max())}"
        )
    specials = special_token_map(student, teacher) if specials is None else specials
    out_ids: list[int] = []
    token_bytes = student.token_bytes
    pending: list[bytes] = []

    def flush() -> None:
        if not pending:
            return
        data = b"".join(pending)
        pending.clear()
        for is_text, run in _split_utf8(data):
            if is_text:
                out_ids.extend(encode_continuation(teacher_tokenizer, teacher, run.decode()))
            else:
                out_ids.extend(GAP_ID if t is None else t for t in _byte_tokens(teacher, run))

    for student_id in ids_array.tolist():
        if student.special[student_id]:
            flush()
            out_ids.append(specials.get(student_id, GAP_ID))
        else:
            pending.append(token_bytes[student_id])
    flush()
    ids = np.asarray(out_ids, dtype=np.int64)
    gaps = ids == GAP_ID
    # Every gap stands for one byte or one special token: one virtual byte wide.
    widths = np.where(gaps, 1, token_widths(teacher, np.where(gaps, 0, ids)))
    return TeacherView(ids=ids, widths=widths, untiled_bytes=int(gaps.sum()))


@dataclass(frozen=True)
class AlignmentReport:
    """Per-sequence alignment statistics."""

    chunks: int
    one_to_one_share: float
    longest_chunk_tokens: int
    untiled_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Alignment:
    """Two tokenisations of one virtual byte stream, cut into chunks at shared boundaries.

    ``*_starts``/``*_ends`` are token spans; ``*_chunk`` the chunk of each token;
    ``sync`` the chunk boundaries (``sync[0] == 0``, ``sync[-1] ==`` total width).
    """

    student_starts: np.ndarray
    student_ends: np.ndarray
    teacher_starts: np.ndarray
    teacher_ends: np.ndarray
    student_chunk: np.ndarray
    teacher_chunk: np.ndarray
    sync: np.ndarray
    chunk_student_tokens: np.ndarray
    chunk_teacher_tokens: np.ndarray

    @property
    def num_chunks(self) -> int:
        """Number of chunks."""
        return len(self.sync) - 1

    def report(self, untiled_bytes: int = 0) -> AlignmentReport:
        """Statistics: chunk count, share of 1:1 chunks, longest chunk, untiled bytes."""
        chunks = self.num_chunks
        one_to_one = int(
            np.count_nonzero((self.chunk_student_tokens == 1) & (self.chunk_teacher_tokens == 1))
        )
        longest = (
            int((self.chunk_student_tokens + self.chunk_teacher_tokens).max()) if chunks else 0
        )
        return AlignmentReport(
            chunks=chunks,
            one_to_one_share=one_to_one / chunks if chunks else 1.0,
            longest_chunk_tokens=longest,
            untiled_bytes=untiled_bytes,
            total_bytes=int(self.sync[-1]) if len(self.sync) else 0,
        )


def align(student_widths: np.ndarray, teacher_widths: np.ndarray) -> Alignment:
    """Cut two tilings of one stream into chunks at their shared boundaries (linear time).

    Widths must be positive and sum to the same total; ``AlignmentError`` otherwise.
    """
    student_widths = np.asarray(student_widths, dtype=np.int64)
    teacher_widths = np.asarray(teacher_widths, dtype=np.int64)
    if (len(student_widths) and student_widths.min() <= 0) or (
        len(teacher_widths) and teacher_widths.min() <= 0
    ):
        raise AlignmentError("every token must be at least one (virtual) byte wide")
    student_ends = np.cumsum(student_widths)
    teacher_ends = np.cumsum(teacher_widths)
    student_total = int(student_ends[-1]) if len(student_ends) else 0
    teacher_total = int(teacher_ends[-1]) if len(teacher_ends) else 0
    if student_total != teacher_total:
        raise AlignmentError(
            f"the two tokenisations spell {student_total} and {teacher_total} bytes; they must "
            "tile the same bytes"
        )
    shared = np.intersect1d(student_ends, teacher_ends, assume_unique=True)
    sync = np.concatenate(([0], shared)).astype(np.int64)
    student_chunk = np.searchsorted(shared, student_ends, side="left")
    teacher_chunk = np.searchsorted(shared, teacher_ends, side="left")
    chunks = len(shared)
    return Alignment(
        student_starts=student_ends - student_widths,
        student_ends=student_ends,
        teacher_starts=teacher_ends - teacher_widths,
        teacher_ends=teacher_ends,
        student_chunk=student_chunk,
        teacher_chunk=teacher_chunk,
        sync=sync,
        chunk_student_tokens=np.bincount(student_chunk, minlength=chunks),
        chunk_teacher_tokens=np.bincount(teacher_chunk, minlength=chunks),
    )
