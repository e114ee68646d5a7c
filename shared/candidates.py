"""The teacher's mass of student candidates named by the request, from the teacher's full row
(``docs/mapping.md`` §4b).

§4 maps the teacher's top-K onto the student's vocabulary, so a student token that the teacher
likes less than its K-th token gets nothing there. Here the request names, per student position,
the ids it wants scored (typically the student's own top-k), and the teacher's *whole* row at that
position is used: each candidate ``c`` gets ``Σ p_k(u) / Z`` over the teacher tokens ``u`` that §4
assigns to ``c`` (exactly: their remaining bytes spell ``c``, or ``c`` is their longest student
prefix and no student token can cross their end), plus, separately, the mass of teacher tokens
whose assignment hangs on the next teacher position and that could belong to ``c`` (an upper
bound's slack: the true mass lies in ``[mass, mass + unresolved]``).

Cost per position: at a teacher boundary each candidate sums the row over the teacher ids
assigned to it (an index built once per pair), and its unresolved slack over one range of the
byte-sorted ambiguous ids (binary search) plus one dictionary look-up per byte of the candidate.
Inside a teacher token only the teacher ids that begin with the consumed bytes (one range of the
byte-sorted vocabulary) take part. Pure numpy and ``bisect``; no I/O.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tokenbridge.shared.align import Alignment

if TYPE_CHECKING:  # mapping.py imports this module to build the tables
    from tokenbridge.shared.mapping import PairMapper

__all__ = ["CandidateMasses", "CandidateTables", "candidate_masses"]


@dataclass(frozen=True)
class CandidateMasses:
    """Per student row and candidate column: ``logprobs_SC`` (log of the exact §4b mass, ``-inf``
    for none, NaN on unscored rows, ``-inf`` on padding columns) and ``unresolved_SC`` (mass that
    may belong to the candidate but hangs on the next teacher position; NaN on unscored rows)."""

    logprobs_SC: np.ndarray
    unresolved_SC: np.ndarray


@dataclass(frozen=True)
class CandidateTables:
    """What one (teacher, student) pair needs, built once: the teacher ids assigned to each
    student id at a teacher boundary (CSR), the byte-sorted teacher vocabulary, and the ambiguous
    teacher ids (a student token may cross their end) by their bytes."""

    assigned_order: np.ndarray
    assigned_offsets: np.ndarray
    sorted_bytes: list[bytes]
    sorted_ids: np.ndarray
    ambiguous_sorted_bytes: list[bytes]
    ambiguous_sorted_ids: np.ndarray
    ambiguous_by_bytes: dict[bytes, np.ndarray]

    @classmethod
    def build(cls, boundary_target: np.ndarray, ambiguous: np.ndarray, teacher_bytes: list[bytes],
              student_size: int) -> CandidateTables:  # fmt: skip
        """From §4's boundary assignment (student id per teacher id, -1 where not exact), the
        ambiguous flags, and the teacher's byte strings."""
        exact = boundary_target >= 0
        ids = np.flatnonzero(exact)
        order = ids[np.argsort(boundary_target[ids], kind="stable")]
        counts = np.bincount(boundary_target[ids], minlength=student_size)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        by_bytes = sorted(range(len(teacher_bytes)), key=teacher_bytes.__getitem__)
        sorted_ids = np.asarray(by_bytes, dtype=np.int64)
        ambiguous_ids = [i for i in by_bytes if ambiguous[i]]
        grouped: dict[bytes, list[int]] = {}
        for i in ambiguous_ids:
            grouped.setdefault(teacher_bytes[i], []).append(i)
        return cls(
            assigned_order=order,
            assigned_offsets=offsets,
            sorted_bytes=[teacher_bytes[i] for i in by_bytes],
            sorted_ids=sorted_ids,
            ambiguous_sorted_bytes=[teacher_bytes[i] for i in ambiguous_ids],
            ambiguous_sorted_ids=np.asarray(ambiguous_ids, dtype=np.int64),
            ambiguous_by_bytes={k: np.asarray(v, dtype=np.int64) for k, v in grouped.items()},
        )

    def assigned(self, student_id: int) -> np.ndarray:
        """The teacher ids §4 assigns exactly to ``student_id`` at a teacher boundary."""
        return self.assigned_order[
            self.assigned_offsets[student_id] : self.assigned_offsets[student_id + 1]
        ]


def _prefix_range(sorted_bytes: list[bytes], prefix: bytes) -> tuple[int, int]:
    """The slice of ``sorted_bytes`` holding the strings that begin with ``prefix``."""
    low = bisect.bisect_left(sorted_bytes, prefix)
    high = low
    # Strings beginning with ``prefix`` sort right after it; the first one that does not ends them.
    step = 1
    while high + step <= len(sorted_bytes) and sorted_bytes[high + step - 1].startswith(prefix):
        high += step
        step *= 2
    while step > 1:
        step //= 2
        if high + step <= len(sorted_bytes) and sorted_bytes[high + step - 1].startswith(prefix):
            high += step
    return low, high


def candidate_masses(
    mapper: PairMapper,
    alignment: Alignment,
    teacher_ids: np.ndarray,
    full_logprobs_NV: np.ndarray,
    candidate_ids_SC: np.ndarray,
    scored_S: np.ndarray,
    row_of_M: np.ndarray | None = None,
) -> CandidateMasses:
    """§4b for one completion: the teacher's mass of every named candidate at every scored row.

    ``mapper`` is the pair's ``PairMapper``; ``teacher_ids`` the teacher's tokens of the completion
    (gaps included, as in ``PairMapper.map``); ``full_logprobs_NV`` the teacher's full log-prob
    rows, row ``row_of_M[k]`` for teacher position ``k`` (``None``: row ``k``; scored rows never
    sit on a gap, so gaps need no row); ``candidate_ids_SC`` student ids, -1 for padding;
    ``scored_S`` the rows §3 scored (others stay NaN).
    """
    tables = mapper.candidate_tables
    teacher, student = mapper.teacher, mapper.student
    n, width = candidate_ids_SC.shape
    logprobs = np.full((n, width), np.nan)
    unresolved = np.full((n, width), np.nan)
    rows = np.flatnonzero(scored_S)
    if not len(rows):
        return CandidateMasses(logprobs, unresolved)
    token_N, offset_N = mapper._boundaries(alignment, alignment.student_starts[rows])
    student_bytes = student.token_bytes
    teacher_bytes = teacher.token_bytes
    for row, token, offset in zip(rows.tolist(), token_N.tolist(), offset_N.tolist(), strict=True):
        engine_row = token if row_of_M is None else int(row_of_M[token])
        probs_V = np.exp(full_logprobs_NV[engine_row, : teacher.size].astype(np.float64))
        ids = candidate_ids_SC[row]
        # A byte string several student ids share is reported under one of them (§4).
        canonical = np.where(ids >= 0, mapper.student_canonical[np.maximum(ids, 0)], -1)
        mass = np.zeros(width)
        slack = np.zeros(width)
        if offset == 0:
            for col, c in enumerate(canonical.tolist()):
                if c < 0:
                    continue
                mass[col] = probs_V[tables.assigned(c)].sum()
                wanted = student_bytes[c]
                if not wanted or not len(tables.ambiguous_sorted_ids):
                    continue
                # Ambiguous teacher tokens that begin with the candidate, or that the candidate
                # begins with (it would cross their end).
                low, high = _prefix_range(tables.ambiguous_sorted_bytes, wanted)
                total = probs_V[tables.ambiguous_sorted_ids[low:high]].sum()
                for cut in range(1, len(wanted)):
                    shorter = tables.ambiguous_by_bytes.get(wanted[:cut])
                    if shorter is not None:
                        total += probs_V[shorter].sum()
                slack[col] = total
        else:
            consumed = teacher_bytes[int(teacher_ids[token])][:offset]
            low, high = _prefix_range(tables.sorted_bytes, consumed)
            inside = tables.sorted_ids[low:high]
            z = probs_V[inside].sum()
            target, _ = mapper._assign(
                inside[None, :], np.ones((1, len(inside)), dtype=bool), np.array([offset])
            )
            target = target[0]
            # Tokens that end exactly here leave the student's next token to the next teacher
            # position (empty rest: it may begin any candidate); the others are ambiguous when
            # a student token may cross their end.
            loose = [
                (teacher_bytes[u][offset:], probs_V[u])
                for u, t in zip(inside.tolist(), target.tolist(), strict=True)
                if t < 0
            ]
            for col, c in enumerate(canonical.tolist()):
                if c < 0:
                    continue
                mass[col] = probs_V[inside[target == c]].sum()
                wanted = student_bytes[c]
                slack[col] = sum(
                    p
                    for rest, p in loose
                    if (wanted and rest.startswith(wanted)) or wanted.startswith(rest)
                )
            if z > 0:
                mass /= z
                slack /= z
        with np.errstate(divide="ignore"):
            logprobs[row] = np.where(ids >= 0, np.log(np.minimum(mass, 1.0)), -np.inf)
        unresolved[row] = np.where(ids >= 0, slack, 0.0)
    return CandidateMasses(logprobs, unresolved)
