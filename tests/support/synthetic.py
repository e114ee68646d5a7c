"""Synthetic teacher scores over real vocabularies, for tests and benchmarks.

Top-K lists are drawn so that many candidates share a prefix with the actual teacher token (the
hard case for the mapping: strict-prefix sums, crossings), the rest at random; probabilities come
from a Dirichlet draw with a tail left outside the top-K.
"""

from __future__ import annotations

import numpy as np

from tokenbridge.shared.mapping import TeacherScores
from tokenbridge.shared.vocab import Vocab


class PrefixNeighbours:
    """Token ids sorted by their bytes, to find ids that share a prefix with a given token."""

    def __init__(self, vocab: Vocab) -> None:
        data = vocab.token_bytes
        usable = [i for i in range(vocab.size) if data[i] and not vocab.special[i]]
        usable.sort(key=lambda i: data[i])
        self.order = np.asarray(usable, dtype=np.int64)
        self.position = np.zeros(vocab.size, dtype=np.int64)
        self.position[self.order] = np.arange(len(self.order))

    def near(self, token_id: int, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` ids around ``token_id`` in byte order (its prefix neighbours)."""
        centre = int(self.position[token_id])
        low = max(0, centre - count)
        high = min(len(self.order), centre + count + 1)
        window = self.order[low:high]
        return rng.choice(window, size=min(count, len(window)), replace=False)


def synthetic_scores(
    vocab: Vocab,
    teacher_ids: np.ndarray,
    top_k: int,
    rng: np.random.Generator,
    neighbours: PrefixNeighbours | None = None,
    actual_in_topk: float = 0.8,
    dtype: type = np.float32,
) -> TeacherScores:
    """Random but well-formed teacher scores for ``teacher_ids`` (gaps, id -1, get filler rows)."""
    neighbours = neighbours or PrefixNeighbours(vocab)
    m = len(teacher_ids)
    ids_TK = np.zeros((m, top_k), dtype=np.int64)
    lps_TK = np.zeros((m, top_k), dtype=np.float64)
    actual_T = np.zeros(m, dtype=np.float64)
    special_ids = np.flatnonzero(vocab.special)
    for k, actual in enumerate(np.asarray(teacher_ids).tolist()):
        pool: list[int] = []
        if actual >= 0 and not vocab.special[actual]:
            pool.extend(neighbours.near(actual, top_k // 2, rng).tolist())
        if len(special_ids) and rng.random() < 0.3:
            pool.append(int(rng.choice(special_ids)))
        while len(set(pool)) < top_k + 1:
            pool.append(int(rng.integers(0, vocab.size)))
        unique = list(dict.fromkeys(pool))
        if actual >= 0 and rng.random() < actual_in_topk:
            unique = [actual] + [u for u in unique if u != actual]
        chosen = unique[:top_k]
        mass = rng.dirichlet(np.full(top_k + 2, 0.5))
        tail = mass[-1] * 0.5
        probs = np.sort(mass[:top_k])[::-1] * (1 - tail) / mass[: top_k + 1].sum()
        ids_TK[k] = chosen
        lps_TK[k] = np.log(np.maximum(probs, 1e-30))
        if actual in chosen:
            actual_T[k] = lps_TK[k, chosen.index(actual)]
        else:
            # Outside the top-K, so no likelier than the K-th and within the mass left over.
            room = min(float(probs[-1]), max(1.0 - float(probs.sum()), 0.0))
            actual_T[k] = np.log(max(room * rng.uniform(0.05, 1.0), 1e-30))
    return TeacherScores(
        topk_ids_TK=ids_TK,
        topk_logprobs_TK=lps_TK.astype(dtype).astype(np.float64),
        actual_logprobs_T=actual_T.astype(dtype).astype(np.float64),
    )
