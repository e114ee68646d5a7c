"""The teacher-token → longest-student-prefix table of ``docs/mapping.md`` §4.

For every teacher token ``u`` and every byte offset ``o`` inside it, the table answers: which is
the longest student token that is a prefix of the remaining bytes ``r = b(u)[o:]``, how long is it,
and could a longer student token start with all of ``r`` (and so cross into the next teacher
token)? The entries are laid out like the teacher vocabulary's flat byte array: the entry for
``(u, o)`` sits at ``teacher.starts[u] + o``.

The student side is a byte trie flattened into sorted arrays of prefix hashes, so the table is built
level by level in numpy: one vectorised step per byte of depth, over all ``(u, o)`` queries at once.
The hashes are 64-bit polynomial hashes of byte prefixes; with a few million prefixes per pair the
chance of any collision is below 1e-6, and ``StudentLookup`` (plain bytes and sets) is the
reference the tests hold the table to (every entry of GPT-2 × Mistral v1, samples of other pairs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tokenbridge.shared.vocab import _HASH_MULTIPLIER, Vocab, meta_from_arrays, meta_to_array

__all__ = ["PairTable", "StudentLookup", "StudentTrie", "build_pair_table", "walk_trie"]

TABLE_FORMAT = 1


@dataclass(frozen=True, eq=False)
class StudentTrie:
    """A student vocabulary's byte trie, as sorted hash arrays (see ``rolling_prefix_hashes``).

    ``node_hashes``: every non-empty prefix of every student token (sorted, unique);
    ``token_hashes``/``token_ids``: full token byte strings and their canonical ids (sorted);
    ``proper_hashes``: prefixes strictly shorter than some student token (sorted, unique).
    """

    node_hashes: np.ndarray
    token_hashes: np.ndarray
    token_ids: np.ndarray
    proper_hashes: np.ndarray

    @classmethod
    def from_vocab(cls, student: Vocab) -> StudentTrie:
        """Build the trie of every non-special student token."""
        lengths = student.lengths
        hashes = student.prefix_hashes
        nonempty = np.flatnonzero((lengths > 0) & ~student.special)
        ends = student.starts[nonempty] + lengths[nonempty] - 1
        full = hashes[ends]
        canonical = np.array(
            [student.canonical_overrides.get(int(i), int(i)) for i in nonempty], dtype=np.int64
        )
        order = np.lexsort((canonical, full))
        full, canonical = full[order], canonical[order]
        first = np.ones(len(full), dtype=bool)
        first[1:] = full[1:] != full[:-1]
        in_token = np.zeros(len(student.flat), dtype=bool)
        in_token_ids = np.repeat(np.arange(student.size), lengths)
        in_token[:] = ~student.special[in_token_ids]
        is_last = np.zeros(len(student.flat), dtype=bool)
        is_last[ends] = True
        return cls(
            node_hashes=np.unique(hashes[in_token]),
            token_hashes=full[first],
            token_ids=canonical[first],
            proper_hashes=np.unique(hashes[in_token & ~is_last]),
        )


def _member(sorted_values: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(sorted_values) == 0:  # e.g. a pure byte vocabulary: no token extends another
        return np.zeros(len(queries), dtype=bool), np.zeros(len(queries), dtype=np.int64)
    where = np.searchsorted(sorted_values, queries)
    where_clipped = np.minimum(where, len(sorted_values) - 1)
    found = (where < len(sorted_values)) & (sorted_values[where_clipped] == queries)
    return found, where_clipped


@dataclass(frozen=True, eq=False)
class PairTable:
    """Longest student prefix of every teacher-token suffix, for one (teacher, student) pair.

    Arrays are indexed like the teacher's flat bytes (``teacher.starts[u] + o``):
    ``student_id`` (-1 when no student token is a prefix), ``match_len`` (bytes matched) and
    ``crosses`` (a student token longer than the remaining bytes starts with all of them).
    """

    teacher_hash: str
    student_hash: str
    student_id: np.ndarray
    match_len: np.ndarray
    crosses: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``from_arrays`` (caching)."""
        meta = {"teacher": self.teacher_hash, "student": self.student_hash, "format": TABLE_FORMAT}
        return {
            "student_id": self.student_id,
            "match_len": self.match_len,
            "crosses": self.crosses,
            "meta": meta_to_array(meta),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> PairTable:
        """Inverse of ``to_arrays``."""
        meta = meta_from_arrays(arrays, TABLE_FORMAT)
        return cls(
            teacher_hash=meta["teacher"],
            student_hash=meta["student"],
            student_id=np.asarray(arrays["student_id"], dtype=np.int32),
            match_len=np.asarray(arrays["match_len"], dtype=np.int16),
            crosses=np.asarray(arrays["crosses"], dtype=bool),
        )


def walk_trie(
    trie: StudentTrie,
    flat: np.ndarray,
    head_start: np.ndarray,
    head_len: np.ndarray,
    tail_start: np.ndarray | None = None,
    tail_len: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longest student prefix of many byte strings at once, one vectorised step per byte.

    Query ``i`` is ``flat[head_start[i]:][:head_len[i]]`` followed by
    ``flat[tail_start[i]:][:tail_len[i]]`` (the tail is optional). Returns, per query, the
    canonical student id of the longest student token that is a prefix (-1 if none), its length,
    and whether the whole query is a strict prefix of some student token (it could cross on).
    """
    count = len(head_start)
    head_start = np.asarray(head_start, dtype=np.int64)
    head_len = np.asarray(head_len, dtype=np.int64)
    if tail_start is None or tail_len is None:
        tail_start = np.zeros(count, dtype=np.int64)
        tail_len = np.zeros(count, dtype=np.int64)
    total_len = head_len + np.asarray(tail_len, dtype=np.int64)
    tail_start = np.asarray(tail_start, dtype=np.int64)

    best_id = np.full(count, -1, dtype=np.int32)
    best_len = np.zeros(count, dtype=np.int16)
    crosses = np.zeros(count, dtype=bool)
    alive = np.flatnonzero(total_len > 0)
    hashes = np.zeros(len(alive), dtype=np.uint64)
    depth = 0
    with np.errstate(over="ignore"):
        while len(alive):
            in_head = depth < head_len[alive]
            position = np.where(
                in_head, head_start[alive] + depth, tail_start[alive] + depth - head_len[alive]
            )
            hashes = hashes * _HASH_MULTIPLIER + (flat[position].astype(np.uint64) + 1)
            depth += 1
            on_trie, _ = _member(trie.node_hashes, hashes)
            alive, hashes = alive[on_trie], hashes[on_trie]
            is_token, where = _member(trie.token_hashes, hashes)
            best_id[alive[is_token]] = trie.token_ids[where[is_token]]
            best_len[alive[is_token]] = depth
            exhausted = total_len[alive] == depth
            crosses[alive[exhausted]] = _member(trie.proper_hashes, hashes[exhausted])[0]
            alive, hashes = alive[~exhausted], hashes[~exhausted]
    return best_id, best_len, crosses


def build_pair_table(teacher: Vocab, student: Vocab, trie: StudentTrie | None = None) -> PairTable:
    """Build the §4 table for every (teacher token, offset) in one vectorised walk of the trie."""
    trie = trie or StudentTrie.from_vocab(student)
    total = len(teacher.flat)
    token_of_byte = np.repeat(np.arange(teacher.size), teacher.lengths)
    positions = np.arange(total, dtype=np.int64)
    remaining = teacher.starts[1:][token_of_byte] - positions
    best_id, best_len, crosses = walk_trie(trie, teacher.flat, positions, remaining)
    return PairTable(
        teacher_hash=teacher.content_hash,
        student_hash=student.content_hash,
        student_id=best_id,
        match_len=best_len,
        crosses=crosses,
    )


@dataclass(frozen=True, eq=False)
class StudentLookup:
    """Exact longest-match over a student vocabulary with plain byte strings and sets.

    The reference the hashed trie is tested against; too slow for the hot path."""

    student: Vocab

    @cached_property
    def proper_prefixes(self) -> frozenset[bytes]:
        """Every byte string that is a strict prefix of some student token."""
        found: set[bytes] = set()
        for data in self.student.id_of_bytes:
            for cut in range(1, len(data)):
                found.add(data[:cut])
        return frozenset(found)

    def longest(self, data: bytes) -> tuple[int, int, bool]:
        """(id, length, could_extend) of the longest student token that is a prefix of ``data``."""
        ids = self.student.id_of_bytes
        proper = self.proper_prefixes
        best_id, best_len = -1, 0
        for cut in range(1, len(data) + 1):
            head = data[:cut]
            if head in ids:
                best_id, best_len = ids[head], cut
            if head not in proper:
                return best_id, best_len, False
        return best_id, best_len, True
