"""Teacher predictions → signals on the student's own tokens (``mapping.md`` §3 and §4).

Input: an ``Alignment`` of the student's completion with the teacher's tokenisation of the same
bytes, and ``TeacherScores``: at each teacher position ``k`` the top-K ids and log-probs plus the
log-prob of the actual token ``t_k`` (temperature 1). Output, per student token ``j`` (row ``j`` is
about token ``j`` given everything before it):

* ``logprobs``: the telescoped teacher log-prob ``log F(e_j) − log F(a_j)`` (§3). Over a chunk these
  sum to the teacher's path log-prob; with identical tokenizers they are the teacher's own
  log-probs, bit for bit.
* ``topk_ids``/``topk_logprobs``: the teacher's distribution of the student's next token (§4), as
  the K most likely student ids plus, in the last column, the sampled token when it is not among
  them (padding id -1, log-prob -inf). The mass of each teacher candidate goes to the student token
  its remaining bytes begin with: the token itself when they spell exactly one student token (a
  teacher boundary counts as a student boundary), else the longest student token they begin with
  when no student token can cross into the next teacher token; else it is resolved along the
  actual path with the next teacher position's top-K, or reported as unresolved.
* per row, in units of the teacher's probability at teacher position ``k``: ``z`` (mass of the
  candidates consistent with the bytes already consumed; exactly 1 at a teacher boundary),
  ``mapped_mass``, ``unresolved_mass``, ``inconsistent_mass`` (candidates contradicting the consumed
  bytes) and ``tail_mass`` (outside the top-K); these four add up to 1. ``topk_logprobs`` are
  ``log(mass / z)``.

Everything is vectorised over positions and candidates with numpy; the one loop is over the rare
rows where a student token may cross the actual teacher token's end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenbridge.shared.align import GAP_ID, Alignment, AlignmentReport, special_token_map
from tokenbridge.shared.errors import ScoresShapeError
from tokenbridge.shared.tables import PairTable, StudentLookup
from tokenbridge.shared.vocab import Vocab

__all__ = ["MappedCompletion", "PairMapper", "TeacherScores", "TelescopedLogprobs"]


@dataclass(frozen=True)
class TeacherScores:
    """What the teacher engine returns for the ``m`` teacher completion positions.

    ``topk_ids_TK`` (int, -1 padding) and ``topk_logprobs_TK`` are the top-K at each position;
    ``actual_logprobs_T`` the log-prob of the actual teacher token there. Rows of gap positions are
    ignored.
    """

    topk_ids_TK: np.ndarray
    topk_logprobs_TK: np.ndarray
    actual_logprobs_T: np.ndarray

    def check(self, positions: int) -> None:
        """Raise ``ScoresShapeError`` unless the arrays describe ``positions`` teacher positions."""
        ids, lps, actual = self.topk_ids_TK, self.topk_logprobs_TK, self.actual_logprobs_T
        if ids.ndim != 2 or lps.shape != ids.shape or actual.shape != (ids.shape[0],):
            raise ScoresShapeError(
                f"teacher scores need topk_ids (T, K), topk_logprobs (T, K), actual_logprobs (T,);"
                f" got {ids.shape}, {lps.shape}, {actual.shape}"
            )
        if ids.shape[0] != positions:
            raise ScoresShapeError(
                f"teacher scores cover {ids.shape[0]} positions; the teacher sequence has {positions}"
            )


@dataclass(frozen=True)
class TelescopedLogprobs:
    """§3 output: per student token the telescoped log-prob (NaN where unscored)."""

    logprobs_S: np.ndarray
    scored_S: np.ndarray
    chunk_teacher_logprobs_C: np.ndarray


@dataclass(frozen=True)
class MappedCompletion:
    """Everything the service returns about one student completion (see the module docstring)."""

    logprobs_S: np.ndarray
    topk_ids_SK: np.ndarray
    topk_logprobs_SK: np.ndarray
    chunk_ids_S: np.ndarray
    z_S: np.ndarray
    mapped_mass_S: np.ndarray
    tail_mass_S: np.ndarray
    unresolved_mass_S: np.ndarray
    inconsistent_mass_S: np.ndarray
    exact_S: np.ndarray
    scored_S: np.ndarray
    chunk_teacher_logprobs_C: np.ndarray
    report: AlignmentReport


def _logsumexp_masked(logprobs_NC: np.ndarray, mask_NC: np.ndarray) -> np.ndarray:
    masked = np.where(mask_NC, logprobs_NC, -np.inf)
    peak = masked.max(axis=1)
    safe_peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        total = np.log(np.exp(masked - safe_peak[:, None]).sum(axis=1))
    return total + safe_peak


class PairMapper:
    """Maps teacher scores onto student tokens for one (teacher, student) tokenizer pair."""

    def __init__(self, teacher: Vocab, student: Vocab, table: PairTable) -> None:
        if (table.teacher_hash, table.student_hash) != (teacher.content_hash, student.content_hash):
            raise ValueError("the pair table was built for other vocabularies")
        self.teacher = teacher
        self.student = student
        self.table = table
        self.same_vocab = teacher.content_hash == student.content_hash
        self.special_map = special_token_map(student, teacher)
        teacher_to_student = np.full(teacher.size, -1, dtype=np.int64)
        for student_id, teacher_id in reversed(list(self.special_map.items())):
            teacher_to_student[teacher_id] = student_id
        self.teacher_special_to_student = teacher_to_student
        self.student_canonical = np.arange(student.size, dtype=np.int64)
        if not self.same_vocab:
            # Across tokenizers the table reports one id per byte string; with one tokenizer on
            # both sides every id stands for itself.
            for token_id, canonical in student.canonical_overrides.items():
                self.student_canonical[token_id] = canonical
        self.lookup = StudentLookup(student)

    # -- shared pieces -------------------------------------------------------------------------

    def _candidates(
        self, teacher_ids: np.ndarray, scores: TeacherScores, rows_N: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates at teacher positions ``rows_N``: top-K then the actual token (deduplicated).

        Returns ids (N, K+1), log-probs (N, K+1) and a validity mask.
        """
        actual_N = teacher_ids[rows_N]
        ids_NC = np.concatenate([scores.topk_ids_TK[rows_N], actual_N[:, None]], axis=1)
        ids_NC = ids_NC.astype(np.int64, copy=False)
        logprobs_NC = np.concatenate(
            [scores.topk_logprobs_TK[rows_N], scores.actual_logprobs_T[rows_N][:, None]], axis=1
        ).astype(np.float64, copy=False)
        valid_NC = (ids_NC >= 0) & (ids_NC < self.teacher.size) & np.isfinite(logprobs_NC)
        in_topk_N = (ids_NC[:, :-1] == actual_N[:, None]).any(axis=1)
        valid_NC[:, -1] &= ~in_topk_N
        return ids_NC, logprobs_NC, valid_NC

    def _consistent(
        self, ids_NC: np.ndarray, valid_NC: np.ndarray, actual_N: np.ndarray, offset_N: np.ndarray
    ) -> np.ndarray:
        """Which candidates start with the first ``offset`` bytes of the actual token."""
        teacher = self.teacher
        safe_NC = np.where(valid_NC, ids_NC, 0)
        long_enough_NC = teacher.lengths[safe_NC] >= offset_N[:, None]
        inside_N = offset_N > 0
        probe_NC = teacher.starts[safe_NC] + np.maximum(offset_N[:, None] - 1, 0)
        last = len(teacher.flat) - 1
        probe_NC = np.minimum(probe_NC, last)
        actual_probe_N = np.minimum(teacher.starts[actual_N] + np.maximum(offset_N - 1, 0), last)
        hashes = teacher.prefix_hashes
        same_prefix_NC = hashes[probe_NC] == hashes[actual_probe_N][:, None]
        return valid_NC & (~inside_N[:, None] | (long_enough_NC & same_prefix_NC))

    def _boundaries(self, alignment: Alignment, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For stream offsets ``points``: the teacher token containing each, and the offset in it."""
        starts_ext = np.concatenate([alignment.teacher_starts, alignment.sync[-1:]])
        token = np.searchsorted(starts_ext, points, side="right") - 1
        token = np.minimum(token, len(alignment.teacher_starts))
        return token, points - starts_ext[token]

    # -- §3 ------------------------------------------------------------------------------------

    def telescoped(
        self, alignment: Alignment, teacher_ids: np.ndarray, scores: TeacherScores
    ) -> TelescopedLogprobs:
        """Telescoped teacher log-prob of every student token (§3)."""
        teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
        m = len(teacher_ids)
        scores.check(m)
        n = len(alignment.student_starts)
        gap_T = teacher_ids == GAP_ID
        num_chunks = alignment.num_chunks
        bad_chunk_C = np.bincount(alignment.teacher_chunk[gap_T], minlength=num_chunks) > 0
        scored_S = ~bad_chunk_C[alignment.student_chunk] if n else np.zeros(0, dtype=bool)

        path_T = np.where(gap_T, 0.0, scores.actual_logprobs_T.astype(np.float64, copy=False))
        points = np.concatenate([alignment.student_starts, alignment.student_ends[-1:]])
        token_P, offset_P = self._boundaries(alignment, points)
        inside_P = np.flatnonzero(offset_P > 0)
        partial_P = np.zeros(len(points), dtype=np.float64)
        if len(inside_P):
            rows = token_P[inside_P]
            safe_ids = np.where(gap_T, 0, teacher_ids)
            ids_NC, lps_NC, valid_NC = self._candidates(safe_ids, scores, rows)
            consistent_NC = self._consistent(ids_NC, valid_NC, safe_ids[rows], offset_P[inside_P])
            partial_P[inside_P] = _logsumexp_masked(lps_NC, consistent_NC)

        cumulative = np.concatenate([[0.0], np.cumsum(path_T)])
        k_start, k_end = token_P[:-1], token_P[1:]
        span = k_end - k_start
        whole = cumulative[k_end] - cumulative[k_start]
        # One whole teacher token: its own log-prob, untouched, so identical tokenizers give the
        # teacher's numbers bit for bit.
        whole = np.where(span == 1, path_T[np.minimum(k_start, max(m - 1, 0))], whole)
        whole = np.where(span == 0, 0.0, whole)
        logprobs_S = whole + partial_P[1:] - partial_P[:-1]
        logprobs_S = np.minimum(logprobs_S, 0.0)
        logprobs_S = np.where(scored_S, logprobs_S, np.nan)

        chunk_sums_C = np.bincount(alignment.teacher_chunk, weights=path_T, minlength=num_chunks)
        chunk_sums_C = np.where(bad_chunk_C, np.nan, chunk_sums_C)
        return TelescopedLogprobs(logprobs_S, scored_S, chunk_sums_C)

    # -- §4 ------------------------------------------------------------------------------------

    def map(
        self,
        student_ids: np.ndarray,
        teacher_ids: np.ndarray,
        alignment: Alignment,
        scores: TeacherScores,
        top_k: int,
        untiled_bytes: int = 0,
    ) -> MappedCompletion:
        """§3 and §4 for one completion: everything in ``MappedCompletion``."""
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        student_ids = np.asarray(student_ids, dtype=np.int64)
        teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
        telescoped = self.telescoped(alignment, teacher_ids, scores)
        n = len(student_ids)
        scored_S = telescoped.scored_S
        rows_S = np.flatnonzero(scored_S)

        out_ids = np.full((n, top_k + 1), -1, dtype=np.int64)
        out_lps = np.full((n, top_k + 1), -np.inf, dtype=np.float64)
        z_S = np.full(n, np.nan)
        mapped_S = np.full(n, np.nan)
        tail_S = np.full(n, np.nan)
        unresolved_S = np.full(n, np.nan)
        inconsistent_S = np.full(n, np.nan)
        exact_S = np.zeros(n, dtype=bool)
        if len(rows_S):
            self._sparse(
                student_ids, teacher_ids, alignment, scores, top_k, rows_S,
                out_ids, out_lps, z_S, mapped_S, tail_S, unresolved_S, inconsistent_S, exact_S,
            )  # fmt: skip
        report = alignment.report(untiled_bytes)
        return MappedCompletion(
            logprobs_S=telescoped.logprobs_S,
            topk_ids_SK=out_ids,
            topk_logprobs_SK=out_lps,
            chunk_ids_S=alignment.student_chunk.astype(np.int64),
            z_S=z_S,
            mapped_mass_S=mapped_S,
            tail_mass_S=tail_S,
            unresolved_mass_S=unresolved_S,
            inconsistent_mass_S=inconsistent_S,
            exact_S=exact_S,
            scored_S=scored_S,
            chunk_teacher_logprobs_C=telescoped.chunk_teacher_logprobs_C,
            report=report,
        )

    def _sparse(
        self,
        student_ids: np.ndarray,
        teacher_ids: np.ndarray,
        alignment: Alignment,
        scores: TeacherScores,
        top_k: int,
        rows_N: np.ndarray,
        out_ids: np.ndarray,
        out_lps: np.ndarray,
        z_S: np.ndarray,
        mapped_S: np.ndarray,
        tail_S: np.ndarray,
        unresolved_S: np.ndarray,
        inconsistent_S: np.ndarray,
        exact_S: np.ndarray,
    ) -> None:
        teacher, table = self.teacher, self.table
        m = len(teacher_ids)
        token_N, offset_N = self._boundaries(alignment, alignment.student_starts[rows_N])
        ids_NC, lps_NC, valid_NC = self._candidates(teacher_ids, scores, token_N)
        actual_N = teacher_ids[token_N]
        consistent_NC = self._consistent(ids_NC, valid_NC, actual_N, offset_N)
        width = ids_NC.shape[1]
        probs_NC = np.where(valid_NC, np.exp(np.where(valid_NC, lps_NC, 0.0)), 0.0)

        known_N = probs_NC.sum(axis=1)
        tail_N = np.maximum(1.0 - known_N, 0.0)
        inconsistent_N = np.where(consistent_NC, 0.0, probs_NC).sum(axis=1)
        at_boundary_N = offset_N == 0
        log_z_N = np.where(at_boundary_N, 0.0, _logsumexp_masked(lps_NC, consistent_NC))

        safe_NC = np.where(consistent_NC, ids_NC, 0)
        lengths_NC = teacher.lengths[safe_NC]
        remaining_NC = lengths_NC - offset_N[:, None]
        special_NC = teacher.special[safe_NC]
        has_bytes_NC = consistent_NC & ~special_NC & (remaining_NC > 0)
        flat_NC = np.where(has_bytes_NC, teacher.starts[safe_NC] + offset_N[:, None], 0)
        target_NC = np.where(has_bytes_NC, table.student_id[flat_NC], -1).astype(np.int64)
        match_NC = table.match_len[flat_NC].astype(np.int64)
        crosses_NC = table.crosses[flat_NC]
        special_map_V = self.teacher_special_to_student
        if self.same_vocab:
            # One tokenizer on both sides: a whole teacher token is itself a student token.
            whole_NC = has_bytes_NC & at_boundary_N[:, None]
            target_NC = np.where(whole_NC, ids_NC, target_NC)
            match_NC = np.where(whole_NC, remaining_NC, match_NC)
            special_map_V = np.where(teacher.special, np.arange(teacher.size), special_map_V)
        exact_NC = has_bytes_NC & (target_NC >= 0) & (
            (match_NC == remaining_NC) | ((match_NC > 0) & ~crosses_NC)
        )
        special_target_NC = np.where(consistent_NC & special_NC, special_map_V[safe_NC], -1)
        exact_NC |= special_target_NC >= 0
        target_NC = np.where(special_target_NC >= 0, special_target_NC, target_NC)
        unresolved_NC = consistent_NC & ~exact_NC
        is_actual_NC = ids_NC == actual_N[:, None]
        resolve_NC = unresolved_NC & is_actual_NC & has_bytes_NC & crosses_NC
        resolve_NC &= (token_N + 1 < m)[:, None]

        unresolved_N = np.where(unresolved_NC & ~resolve_NC, probs_NC, 0.0).sum(axis=1)
        unresolved_N = np.where(unresolved_NC & ~resolve_NC, probs_NC, 0.0).sum(axis=1)
        n_rows = len(rows_N)
        target_NW = np.where(exact_NC, target_NC, -1)
        mass_NW = np.where(exact_NC, probs_NC, 0.0)
        logq_NW = lps_NC - log_z_N[:, None]
        extra = self._resolve_crossings(
            np.flatnonzero(resolve_NC.any(axis=1)), resolve_NC, ids_NC, probs_NC, token_N,
            offset_N, teacher_ids, scores, table,
        )  # fmt: skip
        if extra is not None:
            rows_e, ids_e, mass_e, lost_e = extra
            unresolved_N += lost_e
            slot_e = np.arange(len(rows_e)) - np.searchsorted(rows_e, rows_e, side="left")
            extra_width = int(slot_e.max()) + 1 if len(slot_e) else 0
            extra_target = np.full((n_rows, extra_width), -1, dtype=np.int64)
            extra_mass = np.zeros((n_rows, extra_width))
            extra_target[rows_e, slot_e] = ids_e
            extra_mass[rows_e, slot_e] = mass_e
            with np.errstate(divide="ignore"):
                extra_logq = np.log(np.maximum(extra_mass, 0.0)) - log_z_N[:, None]
            target_NW = np.concatenate([target_NW, extra_target], axis=1)
            mass_NW = np.concatenate([mass_NW, extra_mass], axis=1)
            logq_NW = np.concatenate([logq_NW, extra_logq], axis=1)
        merged = _merge_rows(target_NW, mass_NW, logq_NW, log_z_N)
        head_target_NW, head_mass_NW, head_logq_NW = merged
        mapped_N = np.where(head_target_NW >= 0, head_mass_NW, 0.0).sum(axis=1)

        # Rank within each row: most mass first, ties in the teacher's own column order (the
        # heads already stand in that order).
        rank_NW = np.argsort(-np.where(head_target_NW >= 0, head_mass_NW, -1.0), axis=1, kind="stable")
        keep = min(top_k, rank_NW.shape[1])
        top_target = np.take_along_axis(head_target_NW, rank_NW[:, :keep], axis=1)
        top_logq = np.take_along_axis(head_logq_NW, rank_NW[:, :keep], axis=1)
        out_ids[rows_N, :keep] = top_target
        out_lps[rows_N, :keep] = np.where(top_target >= 0, top_logq, -np.inf)

        # The sampled token always appears: in the last column when it is not among the top K.
        sampled_N = self.student_canonical[student_ids[rows_N]]
        in_top_N = (top_target == sampled_N[:, None]).any(axis=1)
        is_sampled_NW = head_target_NW == sampled_N[:, None]
        found_N = is_sampled_NW.any(axis=1)
        sampled_logq_N = np.where(
            found_N, head_logq_NW[np.arange(n_rows), is_sampled_NW.argmax(axis=1)], -np.inf
        )
        missing_N = ~in_top_N
        out_ids[rows_N[missing_N], top_k] = sampled_N[missing_N]
        out_lps[rows_N[missing_N], top_k] = sampled_logq_N[missing_N]

        z_S[rows_N] = np.exp(log_z_N)
        mapped_S[rows_N] = mapped_N
        tail_S[rows_N] = tail_N
        unresolved_S[rows_N] = unresolved_N
        inconsistent_S[rows_N] = inconsistent_N
        exact_S[rows_N] = (unresolved_N == 0.0) & np.isfinite(sampled_logq_N)

    def _resolve_crossings(
        self,
        rows: np.ndarray,
        resolve_NC: np.ndarray,
        ids_NC: np.ndarray,
        probs_NC: np.ndarray,
        token_N: np.ndarray,
        offset_N: np.ndarray,
        teacher_ids: np.ndarray,
        scores: TeacherScores,
        table: PairTable,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Follow the actual teacher token into the next position when a student token may cross.

        Returns (row, student id, mass) entries and, per row, the mass left unresolved.
        """
        if not len(rows):
            return None
        teacher = self.teacher
        token_bytes = teacher.token_bytes
        lost = np.zeros(len(token_N))
        out_rows: list[int] = []
        out_ids: list[int] = []
        out_mass: list[float] = []
        for row in rows.tolist():
            column = int(np.flatnonzero(resolve_NC[row])[0])
            base = float(probs_NC[row, column])
            k = int(token_N[row])
            offset = int(offset_N[row])
            remaining = token_bytes[int(ids_NC[row, column])][offset:]
            inner = table.student_id[teacher.starts[int(ids_NC[row, column])] + offset]
            next_ids, next_lps, next_valid = self._candidates(
                teacher_ids, scores, np.array([k + 1], dtype=np.int64)
            )
            covered = 0.0
            if teacher_ids[k + 1] == GAP_ID:
                lost[row] += base
                continue
            for next_id, next_lp, ok in zip(
                next_ids[0].tolist(), next_lps[0].tolist(), next_valid[0].tolist(), strict=True
            ):
                if not ok:
                    continue
                weight = base * float(np.exp(next_lp))
                covered += weight
                if teacher.special[next_id]:
                    # The text ends with these bytes: the longest student token inside them.
                    target, extendable = int(inner), False
                else:
                    target, _, extendable = self.lookup.longest(remaining + token_bytes[next_id])
                if target < 0 or extendable:
                    lost[row] += weight
                else:
                    out_rows.append(row)
                    out_ids.append(target)
                    out_mass.append(weight)
            lost[row] += max(base - covered, 0.0)
        return (
            np.asarray(out_rows, dtype=np.int64),
            np.asarray(out_ids, dtype=np.int64),
            np.asarray(out_mass, dtype=np.float64),
            lost,
        )


def _merge_rows(
    target_NW: np.ndarray, mass_NW: np.ndarray, logq_NW: np.ndarray, log_z_N: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge the entries of each row that land on one student id.

    Returns, in the rows' original column order, the group heads' ids (-1 elsewhere), their total
    mass and their log-prob: the entry's own log-prob when a group has one entry (bit-exact
    pass-through), else ``log(total) - log z``.
    """
    n_rows, width = target_NW.shape
    by_target = np.argsort(target_NW, axis=1, kind="stable")
    sorted_target = np.take_along_axis(target_NW, by_target, axis=1)
    sorted_mass = np.take_along_axis(mass_NW, by_target, axis=1)
    starts_group = np.ones_like(sorted_target, dtype=bool)
    starts_group[:, 1:] = sorted_target[:, 1:] != sorted_target[:, :-1]
    flat_starts = np.flatnonzero(starts_group)
    group_mass = np.add.reduceat(sorted_mass.ravel(), flat_starts)
    group_size = np.diff(np.append(flat_starts, sorted_target.size))
    head_sorted_mass = np.zeros(sorted_target.size)
    head_sorted_mass[flat_starts] = group_mass
    size_sorted = np.zeros(sorted_target.size, dtype=np.int64)
    size_sorted[flat_starts] = group_size
    # Back to column order: a group's head is its first entry in column order (stable sort).
    head_mass = np.empty(sorted_target.size)
    head_size = np.empty(sorted_target.size, dtype=np.int64)
    flat_columns = (by_target + np.arange(n_rows)[:, None] * width).ravel()
    head_mass[flat_columns] = head_sorted_mass
    head_size[flat_columns] = size_sorted
    head_mass = head_mass.reshape(n_rows, width)
    head_size = head_size.reshape(n_rows, width)
    is_head = (head_size > 0) & (target_NW >= 0)
    with np.errstate(divide="ignore"):
        merged_logq = np.log(head_mass) - log_z_N[:, None]
    head_logq = np.where(head_size == 1, logq_NW, merged_logq)
    return np.where(is_head, target_NW, -1), head_mass, head_logq
