"""§4's sparse rows (``docs/mapping.md``): the container a mapping fills, and the ranking of each
row's entries (merged per student id, cut to the top K plus the sampled token)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SparseRows", "merge_rows", "rank_rows"]


@dataclass(frozen=True)
class SparseRows:
    """§4 results for a set of rows (arrays are filled in place, the container is fixed)."""

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    z: np.ndarray
    mapped: np.ndarray
    tail: np.ndarray
    unresolved: np.ndarray
    inconsistent: np.ndarray
    exact: np.ndarray

    @classmethod
    def empty(cls, rows: int, top_k: int) -> SparseRows:
        """Padding ids (-1), -inf log-probs, NaN masses and ``exact`` False."""
        return cls(
            topk_ids=np.full((rows, top_k + 1), -1, dtype=np.int64),
            topk_logprobs=np.full((rows, top_k + 1), -np.inf),
            z=np.full(rows, np.nan),
            mapped=np.full(rows, np.nan),
            tail=np.full(rows, np.nan),
            unresolved=np.full(rows, np.nan),
            inconsistent=np.full(rows, np.nan),
            exact=np.zeros(rows, dtype=bool),
        )


def rank_rows(
    target_NW: np.ndarray,
    mass_NW: np.ndarray,
    logq_NW: np.ndarray,
    log_z_N: np.ndarray,
    sampled_N: np.ndarray,
    *,
    top_k: int,
    found: SparseRows,
    rows: np.ndarray,
    sampled_logq: np.ndarray,
    mapped: np.ndarray,
) -> None:
    """Merge, rank and cut rows to the top K plus the sampled token; write them into ``found``,
    ``sampled_logq`` (the sampled token's log-prob) and ``mapped`` (each row's mapped mass) at
    the positions ``rows``. Several row sets fill one ``found`` in turn, hence in place."""
    head_target_NW, head_mass_NW, head_logq_NW = merge_rows(target_NW, mass_NW, logq_NW, log_z_N)
    mapped[rows] = np.where(head_target_NW >= 0, head_mass_NW, 0.0).sum(axis=1)
    # Most mass first, ties in the teacher's own column order (the heads stand in that order).
    rank_NW = np.argsort(-np.where(head_target_NW >= 0, head_mass_NW, -1.0), axis=1, kind="stable")
    keep = min(top_k, rank_NW.shape[1])
    top_target = np.take_along_axis(head_target_NW, rank_NW[:, :keep], axis=1)
    top_logq = np.take_along_axis(head_logq_NW, rank_NW[:, :keep], axis=1)
    found.topk_ids[rows, :keep] = top_target
    found.topk_logprobs[rows, :keep] = np.where(top_target >= 0, top_logq, -np.inf)
    # The sampled token always appears: in the last column when it is not among the top K.
    is_sampled_NW = head_target_NW == sampled_N[:, None]
    row_logq = np.where(
        is_sampled_NW.any(axis=1),
        head_logq_NW[np.arange(len(rows)), is_sampled_NW.argmax(axis=1)],
        -np.inf,
    )
    sampled_logq[rows] = row_logq
    missing = ~(top_target == sampled_N[:, None]).any(axis=1)
    found.topk_ids[rows[missing], top_k] = sampled_N[missing]
    found.topk_logprobs[rows[missing], top_k] = row_logq[missing]


def merge_rows(
    target_NW: np.ndarray, mass_NW: np.ndarray, logq_NW: np.ndarray, log_z_N: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge the entries of each row that land on one student id.

    Returns, in the rows' original column order, the group heads' ids (-1 elsewhere), their total
    mass and their log-prob: the entry's own log-prob when a group has one entry (bit-exact
    pass-through), else ``log(total) - log z``.
    """
    n_rows, width = target_NW.shape
    # Sort (id, column) pairs packed into one integer: a plain sort, and equal ids keep their
    # column order, so a group's head is its first entry in column order.
    shift = max(int(width - 1).bit_length(), 1)
    packed = np.sort((target_NW << shift) | np.arange(width), axis=1)
    sorted_target = packed >> shift
    sorted_column = packed & ((1 << shift) - 1)
    row_offset = np.arange(n_rows)[:, None] * width
    sorted_mass = mass_NW.ravel()[(sorted_column + row_offset).ravel()]
    starts_group = np.ones(sorted_target.shape, dtype=bool)
    starts_group[:, 1:] = sorted_target[:, 1:] != sorted_target[:, :-1]
    flat_starts = np.flatnonzero(starts_group)
    head_flat = (sorted_column + row_offset).ravel()[flat_starts]
    head_mass = np.zeros(n_rows * width)
    head_size = np.zeros(n_rows * width, dtype=np.int64)
    head_mass[head_flat] = np.add.reduceat(sorted_mass, flat_starts)
    head_size[head_flat] = np.diff(np.append(flat_starts, sorted_target.size))
    head_mass = head_mass.reshape(n_rows, width)
    head_size = head_size.reshape(n_rows, width)
    is_head = (head_size > 0) & (target_NW >= 0)
    merged = head_size > 1
    head_logq = logq_NW.copy()
    with np.errstate(divide="ignore"):
        head_logq[merged] = (
            np.log(head_mass[merged]) - np.broadcast_to(log_z_N[:, None], merged.shape)[merged]
        )
    return np.where(is_head, target_NW, -1), head_mass, head_logq
