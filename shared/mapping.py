"""Teacher predictions → signals on the student's own tokens (``docs/mapping.md`` §3 and §4).

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
  actual path with the next teacher position's top-K, or reported as unresolved. One refinement
  on the actual path: when the sampled student token runs past the end of the actual teacher token
  (Llama 3's "202" over Qwen's "2", "0", "2"), the part of the actual token's mass that goes on
  to spell the sampled token is its §3 chain, and it is the sampled token's; so at a teacher
  boundary the sampled token's §4 probability equals its §3 probability. A truncated top-K makes
  that chain a lower bound; the most it can hide is reported as unresolved.
* per row, in units of the teacher's probability at teacher position ``k``: ``z`` (mass of the
  candidates consistent with the bytes already consumed; exactly 1 at a teacher boundary),
  ``mapped_mass``, ``unresolved_mass``, ``inconsistent_mass`` (candidates contradicting the consumed
  bytes) and ``tail_mass`` (outside the top-K); these four add up to 1. ``topk_logprobs`` are
  ``log(mass / z)``.

Everything is vectorised over positions and candidates with numpy, the crossings included (they
walk the student trie like the table build does).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tokenbridge.shared.align import GAP_ID, Alignment, AlignmentReport, special_token_map
from tokenbridge.shared.candidates import CandidateTables
from tokenbridge.shared.errors import ScoresShapeError
from tokenbridge.shared.sparse_rows import SparseRows, rank_rows
from tokenbridge.shared.tables import PairTable, StudentTrie, walk_trie
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
                f"teacher scores cover {ids.shape[0]} positions; the teacher sequence has "
                f"{positions}"
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


def _probs(logprobs: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Probabilities of the valid entries, 0 elsewhere."""
    return np.exp(np.where(valid, logprobs, -np.inf))


@dataclass(frozen=True)
class _Path:
    """The teacher's actual path through a completion, worked out once per call.

    ``safe_ids``: teacher ids with gaps replaced by 0 (safe to index with); ``logprobs_T``: the
    actual tokens' log-probs, 0 at gaps; ``cumulative_T``: their running sum, with a leading 0.
    """

    ids: np.ndarray
    gap_T: np.ndarray
    safe_ids: np.ndarray
    logprobs_T: np.ndarray
    cumulative_T: np.ndarray

    @classmethod
    def of(cls, teacher_ids: np.ndarray, scores: TeacherScores) -> _Path:
        """The path of ``teacher_ids`` under ``scores`` (shapes checked)."""
        ids = np.asarray(teacher_ids, dtype=np.int64)
        scores.check(len(ids))
        gap_T = ids == GAP_ID
        logprobs_T = np.where(gap_T, 0.0, scores.actual_logprobs_T.astype(np.float64, copy=False))
        return cls(
            ids=ids,
            gap_T=gap_T,
            safe_ids=np.where(gap_T, 0, ids),
            logprobs_T=logprobs_T,
            cumulative_T=np.concatenate([[0.0], np.cumsum(logprobs_T)]),
        )


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

    def _assign(
        self, ids_NC: np.ndarray, consistent_NC: np.ndarray, offset_N: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Student token each consistent candidate's remaining bytes go to, by the §4 rule.

        Returns the student id (-1 where the assignment is not exact) and whether the candidate
        could be settled by following it into the next teacher position (a student token may
        cross its end).
        """
        teacher, table = self.teacher, self.table
        safe_NC = np.where(consistent_NC, ids_NC, 0)
        starts_NC = teacher.starts[safe_NC]
        lengths_NC = teacher.starts[safe_NC + 1] - starts_NC
        remaining_NC = lengths_NC - offset_N[:, None]
        has_bytes_NC = consistent_NC & (remaining_NC > 0)
        flat_NC = np.where(has_bytes_NC, starts_NC + offset_N[:, None], 0)
        target_NC = table.student_id[flat_NC].astype(np.int64)
        match_NC = table.match_len[flat_NC]
        crosses_NC = table.crosses[flat_NC]
        exact_NC = (
            has_bytes_NC
            & (target_NC >= 0)
            & ((match_NC == remaining_NC) | ((match_NC > 0) & ~crosses_NC))
        )
        target_NC = np.where(exact_NC, target_NC, -1)
        # Special tokens spell no bytes; they map by role (rare, so only where they occur).
        special_rows, special_cols = np.nonzero(consistent_NC & (lengths_NC == 0))
        target_NC[special_rows, special_cols] = self.teacher_special_to_student[
            ids_NC[special_rows, special_cols]
        ]
        return target_NC, has_bytes_NC & crosses_NC & ~exact_NC

    def prepare(self) -> PairMapper:
        """Build the per-pair structures now (boundary assignment, student trie) instead of on
        the first call that needs them, so a service's first request pays nothing extra."""
        _ = self._boundary_assignment, self.trie
        return self

    @cached_property
    def _boundary_assignment(self) -> tuple[np.ndarray, np.ndarray]:
        """``_assign`` of every teacher id at offset 0, computed once per pair."""
        teacher = self.teacher
        ids = np.arange(teacher.size, dtype=np.int64)[:, None]
        target, resolvable = self._assign(
            ids, np.ones_like(ids, dtype=bool), np.zeros(len(ids), dtype=np.int64)
        )
        target, resolvable = target[:, 0], resolvable[:, 0]
        if self.same_vocab:
            # One tokenizer on both sides: a whole teacher token is itself a student token.
            target = ids[:, 0].copy()
            resolvable = np.zeros_like(resolvable)
        return target, resolvable

    @cached_property
    def candidate_tables(self) -> CandidateTables:
        """The per-pair index §4b (``shared/candidates.py``) scores named candidates with."""
        target, ambiguous = self._boundary_assignment
        return CandidateTables.build(target, ambiguous, self.teacher.token_bytes, self.student.size)

    @cached_property
    def trie(self) -> StudentTrie:
        """The student trie, built on the first crossing that needs it."""
        return StudentTrie.from_vocab(self.student)

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

    def _boundaries(
        self, alignment: Alignment, points: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """For stream offsets ``points``: the teacher token holding each, and the offset in it."""
        starts_ext = np.concatenate([alignment.teacher_starts, alignment.sync[-1:]])
        token = np.searchsorted(starts_ext, points, side="right") - 1
        token = np.minimum(token, len(alignment.teacher_starts))
        return token, points - starts_ext[token]

    # -- §3 ------------------------------------------------------------------------------------

    def telescoped(
        self, alignment: Alignment, teacher_ids: np.ndarray, scores: TeacherScores
    ) -> TelescopedLogprobs:
        """Telescoped teacher log-prob of every student token (§3)."""
        return self._telescoped(alignment, _Path.of(teacher_ids, scores), scores)

    def _telescoped(
        self, alignment: Alignment, path: _Path, scores: TeacherScores
    ) -> TelescopedLogprobs:
        m = len(path.ids)
        n = len(alignment.student_starts)
        num_chunks = alignment.num_chunks
        bad_chunk_C = np.bincount(alignment.teacher_chunk[path.gap_T], minlength=num_chunks) > 0
        scored_S = ~bad_chunk_C[alignment.student_chunk] if n else np.zeros(0, dtype=bool)

        path_T = path.logprobs_T
        points = np.concatenate([alignment.student_starts, alignment.student_ends[-1:]])
        token_P, offset_P = self._boundaries(alignment, points)
        inside_P = np.flatnonzero(offset_P > 0)
        partial_P = np.zeros(len(points), dtype=np.float64)
        if len(inside_P):
            rows = token_P[inside_P]
            ids_NC, lps_NC, valid_NC = self._candidates(path.safe_ids, scores, rows)
            consistent_NC = self._consistent(
                ids_NC, valid_NC, path.safe_ids[rows], offset_P[inside_P]
            )
            partial_P[inside_P] = _logsumexp_masked(lps_NC, consistent_NC)

        cumulative = path.cumulative_T
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
        path = _Path.of(teacher_ids, scores)
        telescoped = self._telescoped(alignment, path, scores)
        n = len(student_ids)
        scored_S = telescoped.scored_S
        rows_S = np.flatnonzero(scored_S)

        # Unscored rows (chunks holding a gap) keep padding, NaN masses and exact = False.
        rows = SparseRows.empty(n, top_k)
        if len(rows_S):
            found = self._sparse(
                student_ids, path, alignment, scores, top_k, rows_S,
                telescoped.logprobs_S[rows_S],
            )  # fmt: skip
            for name in SparseRows.__dataclass_fields__:
                getattr(rows, name)[rows_S] = getattr(found, name)
        return MappedCompletion(
            logprobs_S=telescoped.logprobs_S,
            topk_ids_SK=rows.topk_ids,
            topk_logprobs_SK=rows.topk_logprobs,
            chunk_ids_S=alignment.student_chunk.astype(np.int64),
            z_S=rows.z,
            mapped_mass_S=rows.mapped,
            tail_mass_S=rows.tail,
            unresolved_mass_S=rows.unresolved,
            inconsistent_mass_S=rows.inconsistent,
            exact_S=rows.exact,
            scored_S=scored_S,
            chunk_teacher_logprobs_C=telescoped.chunk_teacher_logprobs_C,
            report=alignment.report(untiled_bytes),
        )

    def _sparse(
        self,
        student_ids: np.ndarray,
        path: _Path,
        alignment: Alignment,
        scores: TeacherScores,
        top_k: int,
        rows_N: np.ndarray,
        chain_logq_N: np.ndarray,
    ) -> SparseRows:
        """The §4 rows of student positions ``rows_N`` (see the module docstring)."""
        teacher_ids = path.ids
        m = len(teacher_ids)
        token_N, offset_N = self._boundaries(alignment, alignment.student_starts[rows_N])
        ids_NC, lps_NC, valid_NC = self._candidates(teacher_ids, scores, token_N)
        actual_N = teacher_ids[token_N]
        # Only rows that start inside a teacher token filter candidates by the consumed bytes.
        inside_I = np.flatnonzero(offset_N > 0)
        consistent_NC = valid_NC.copy()
        consistent_NC[inside_I] = self._consistent(
            ids_NC[inside_I], valid_NC[inside_I], actual_N[inside_I], offset_N[inside_I]
        )
        probs_NC = _probs(lps_NC, valid_NC)

        known_N = probs_NC.sum(axis=1)
        tail_N = np.maximum(1.0 - known_N, 0.0)
        inconsistent_N = np.where(consistent_NC, 0.0, probs_NC).sum(axis=1)
        log_z_N = np.zeros(len(rows_N))
        log_z_N[inside_I] = _logsumexp_masked(lps_NC[inside_I], consistent_NC[inside_I])

        # Where each candidate's mass goes. At a teacher boundary that depends on the candidate
        # alone (precomputed per teacher id); inside a teacher token on the offset too.
        boundary_target, boundary_resolvable = self._boundary_assignment
        safe_NC = np.where(consistent_NC, ids_NC, 0)
        target_NC = np.where(consistent_NC, boundary_target[safe_NC], -1)
        resolvable_NC = consistent_NC & boundary_resolvable[safe_NC]
        if len(inside_I):
            inside = self._assign(ids_NC[inside_I], consistent_NC[inside_I], offset_N[inside_I])
            target_NC[inside_I], resolvable_NC[inside_I] = inside
        exact_NC = target_NC >= 0
        unresolved_NC = consistent_NC & ~exact_NC
        is_actual_NC = ids_NC == actual_N[:, None]
        resolve_NC = resolvable_NC & is_actual_NC & (token_N + 1 < m)[:, None]

        unresolved_N = np.where(unresolved_NC & ~resolve_NC, probs_NC, 0.0).sum(axis=1)
        n_rows = len(rows_N)
        target_NW = np.where(exact_NC, target_NC, -1)
        mass_NW = np.where(exact_NC, probs_NC, 0.0)
        logq_NW = lps_NC - log_z_N[:, None]
        sampled_N = self.student_canonical[student_ids[rows_N]]
        extra_rows: list[np.ndarray] = []
        extra_ids: list[np.ndarray] = []
        extra_mass: list[np.ndarray] = []

        # The sampled student token may run past the end of the actual teacher token (Llama 3's
        # "202" over Qwen's "2", "0", "2"). The part of the actual token's mass that goes on
        # along the actual path to spell it is exactly its §3 chain, z · q(s_j): it moves from
        # the actual token's target to the sampled token.
        actual_col_NC = is_actual_NC & valid_NC
        chain_N = (exact_NC & actual_col_NC).any(axis=1)
        chain_N &= alignment.student_ends[rows_N] > alignment.teacher_ends[token_N]
        chain_N &= np.isfinite(chain_logq_N)
        chain_rows = np.flatnonzero(chain_N)
        if len(chain_rows):
            col = actual_col_NC[chain_rows].argmax(axis=1)
            available = mass_NW[chain_rows, col]
            moved = np.minimum(np.exp(log_z_N[chain_rows] + chain_logq_N[chain_rows]), available)
            # With a truncated top-K the chain's last factor is a lower bound: up to the path
            # product times that position's tail may continue too. That much is unresolved.
            uncertain = np.minimum(
                self._chain_tail(alignment, path, scores, rows_N[chain_rows], token_N[chain_rows]),
                available - moved,
            )
            unresolved_N[chain_rows] += uncertain
            left = available - moved - uncertain
            # The whole actual token continues (up to rounding): keep no dust behind.
            dust = left <= 1e-12 * available
            moved = np.where(dust, moved + left, moved)
            left = np.where(dust, 0.0, left)
            mass_NW[chain_rows, col] = left
            with np.errstate(divide="ignore"):
                logq_NW[chain_rows, col] = np.log(left) - log_z_N[chain_rows]
            target_NW[chain_rows, col] = np.where(left > 0, target_NW[chain_rows, col], -1)
            extra_rows.append(chain_rows)
            extra_ids.append(sampled_N[chain_rows])
            extra_mass.append(moved)

        resolved = self._resolve_crossings(
            np.flatnonzero(resolve_NC.any(axis=1)), resolve_NC, ids_NC, probs_NC, token_N,
            offset_N, path, scores,
        )  # fmt: skip
        if resolved is not None:
            rows_e, ids_e, mass_e, lost_e = resolved
            unresolved_N += lost_e
            extra_rows.append(rows_e)
            extra_ids.append(ids_e)
            extra_mass.append(mass_e)
        found = SparseRows.empty(len(rows_N), top_k)
        sampled_logq_N = np.full(n_rows, -np.inf)
        mapped_N = np.zeros(n_rows)
        widened = np.zeros(0, dtype=np.int64)
        if any(len(rows) for rows in extra_rows):
            # Rows with extra entries are ranked on their own, wider, so that the few of them do
            # not widen every row.
            rows_e = np.concatenate(extra_rows)
            order = np.argsort(rows_e, kind="stable")
            rows_e = rows_e[order]
            widened, local_e = np.unique(rows_e, return_inverse=True)
            slot_e = np.arange(len(rows_e)) - np.searchsorted(rows_e, rows_e, side="left")
            more_target = np.full((len(widened), int(slot_e.max()) + 1), -1, dtype=np.int64)
            more_mass = np.zeros(more_target.shape)
            more_target[local_e, slot_e] = np.concatenate(extra_ids)[order]
            more_mass[local_e, slot_e] = np.concatenate(extra_mass)[order]
            with np.errstate(divide="ignore"):
                more_logq = np.log(more_mass) - log_z_N[widened][:, None]
            rank_rows(
                np.concatenate([target_NW[widened], more_target], axis=1),
                np.concatenate([mass_NW[widened], more_mass], axis=1),
                np.concatenate([logq_NW[widened], more_logq], axis=1),
                log_z_N[widened], sampled_N[widened], top_k=top_k, found=found, rows=widened,
                sampled_logq=sampled_logq_N, mapped=mapped_N,
            )  # fmt: skip
        plain = np.ones(n_rows, dtype=bool)
        plain[widened] = False
        plain_rows = np.flatnonzero(plain)
        rank_rows(
            target_NW[plain_rows], mass_NW[plain_rows], logq_NW[plain_rows], log_z_N[plain_rows],
            sampled_N[plain_rows], top_k=top_k, found=found, rows=plain_rows,
            sampled_logq=sampled_logq_N, mapped=mapped_N,
        )  # fmt: skip
        found.z[:] = np.exp(log_z_N)
        found.mapped[:] = mapped_N
        found.tail[:] = tail_N
        found.unresolved[:] = unresolved_N
        found.inconsistent[:] = inconsistent_N
        found.exact[:] = (unresolved_N == 0.0) & np.isfinite(sampled_logq_N)
        return found

    def _chain_tail(
        self,
        alignment: Alignment,
        path: _Path,
        scores: TeacherScores,
        rows: np.ndarray,
        token_R: np.ndarray,
    ) -> np.ndarray:
        """Bound on the chain mass a truncated top-K hides, for sampled tokens that run past
        teacher token ``token_R``: the path product up to the teacher token holding the sampled
        token's end, times that position's tail (zero when the end is a teacher boundary)."""
        end_token, end_offset = self._boundaries(alignment, alignment.student_ends[rows])
        inside = end_offset > 0
        if not inside.any():
            return np.zeros(len(rows))
        product = np.exp(path.cumulative_T[end_token] - path.cumulative_T[token_R])
        holder = np.minimum(end_token, len(path.ids) - 1)
        _, lps, valid = self._candidates(path.safe_ids, scores, holder)
        known = _probs(lps, valid).sum(axis=1)
        return np.where(inside, product * np.maximum(1.0 - known, 0.0), 0.0)

    def _resolve_crossings(
        self,
        rows: np.ndarray,
        resolve_NC: np.ndarray,
        ids_NC: np.ndarray,
        probs_NC: np.ndarray,
        token_N: np.ndarray,
        offset_N: np.ndarray,
        path: _Path,
        scores: TeacherScores,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Follow the actual teacher token into the next position when a student token may cross.

        For each such row, the actual token's mass is split over the next position's candidates;
        each continuation (remaining bytes + the next token's bytes) goes to its longest student
        prefix unless a student token could run on past it as well. Returns (row, student id,
        mass) entries and, per row, the mass left unresolved (including the next position's tail).
        """
        if not len(rows):
            return None
        teacher = self.teacher
        column_R = resolve_NC[rows].argmax(axis=1)
        base_R = probs_NC[rows, column_R]
        actual_R = ids_NC[rows, column_R]
        next_R = token_N[rows] + 1
        offset_R = offset_N[rows]
        next_ids, next_lps, next_valid = self._candidates(path.safe_ids, scores, next_R)
        next_valid &= ~path.gap_T[next_R][:, None]
        weight_RC = base_R[:, None] * _probs(next_lps, next_valid)

        head_start_R = teacher.starts[actual_R] + offset_R
        head_len_R = teacher.lengths[actual_R] - offset_R
        safe_next = np.where(next_valid, next_ids, 0)
        next_special = teacher.special[safe_next]
        target_RC = np.full(next_ids.shape, -1, dtype=np.int64)
        # The text goes on with a special token: the student token ends inside these bytes.
        inner_R = self.table.student_id[head_start_R].astype(np.int64)
        ends_here = next_valid & next_special
        target_RC[ends_here] = np.broadcast_to(inner_R[:, None], next_ids.shape)[ends_here]
        query = next_valid & ~next_special
        row_q, col_q = np.nonzero(query)
        found, _, runs_on = walk_trie(
            self.trie,
            teacher.flat,
            head_start_R[row_q],
            head_len_R[row_q],
            teacher.starts[safe_next[row_q, col_q]],
            teacher.lengths[safe_next[row_q, col_q]],
        )
        target_RC[row_q, col_q] = np.where(runs_on, -1, found)
        assigned = target_RC >= 0
        lost = np.zeros(len(token_N))
        lost[rows] = np.maximum(base_R - np.where(assigned, weight_RC, 0.0).sum(axis=1), 0.0)
        entry_row, entry_col = np.nonzero(assigned)
        return (
            rows[entry_row],
            target_RC[entry_row, entry_col],
            weight_RC[entry_row, entry_col],
            lost,
        )
