"""Brute-force proof of the mapping (``mapping.md`` §3 and §4, as refined in ``mapping.py``).

Two real byte-level BPE tokenizers (the Rust ``tokenizers`` library behind
``PreTrainedTokenizerFast``) are trained on different corpora over the alphabet ``a b c`` and the
space: 4 characters + 55 merges + ``<eos>`` = 60 ids each, different merges (no 256-byte initial
alphabet: ``build_vocab`` needs none). The teacher is an explicit distribution over a few dozen
complete strings; it "writes" each string as its canonical teacher tokenisation followed by eos, so
its exact autoregressive conditionals ``p_k(u | t_<k)`` are obtained by enumeration. Every string of
the support is then taken as a student completion and mapped with full K (every token of nonzero
probability) and with K = 2, and the results are compared with ground truth enumerated from the
string distribution (never from the pair table or the mapper):

* §3: ``F(x)``, the teacher's probability along its canonical tokenisation that the completion
  starts with ``B[0:x]``, summed directly over the strings. With full K the telescoped log-probs are
  ``log F(e_j) - log F(a_j)``; with K = 2 the mapper's ``F`` is a lower bound, exact at teacher
  boundaries, short by at most (path product) x (tail mass) inside a teacher token.
* §4: the student's next token for each string that continues the teacher path through the bytes
  already consumed: the special eos for the teacher's eos; the student token ``r`` spells exactly
  (a teacher boundary counts as a student boundary) unless the string goes on along the actual
  path to spell the sampled student token, which then gets it; else the longest student token the
  string's
  remaining bytes begin with (longest match over the *whole* remaining text, found by scanning the
  student vocabulary). Mapped rows must be a sub-measure of this truth, exact where flagged (full
  K), within ``(unresolved + tail) / z`` in total variation everywhere, with mass accounting to 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tokenbridge.shared.align import (
    Alignment,
    align,
    encode_continuation,
    teacher_view,
    token_widths,
)
from tokenbridge.shared.mapping import MappedCompletion, PairMapper, TeacherScores
from tokenbridge.shared.tables import build_pair_table
from tokenbridge.shared.vocab import Vocab, build_vocab

ALPHABET = "abc "
VOCAB_SIZE = 60
SMALL_K = 2
SEEDS = range(16)
TOL = 1e-9


# -- toy tokenizers ----------------------------------------------------------------------------


def _train(seed: int, weights: list[float]) -> PreTrainedTokenizerFast:
    rng = np.random.default_rng(seed)
    letters = np.array(list(ALPHABET))
    corpus = [
        "".join(rng.choice(letters, size=int(rng.integers(3, 12)), p=weights)) for _ in range(400)
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<eos>"], min_frequency=1, show_progress=False
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@dataclass(frozen=True)
class Side:
    """One toy tokenizer: the HF object, its ``Vocab``, and its token bytes found independently."""

    tokenizer: PreTrainedTokenizerFast
    vocab: Vocab
    token_bytes: dict[int, bytes]  # non-special ids only, from the tokenizer's own decoder
    id_of: dict[bytes, int]
    eos: int


def _side(tokenizer: PreTrainedTokenizerFast) -> Side:
    vocab = build_vocab(tokenizer)
    eos = int(tokenizer.eos_token_id)
    token_bytes = {i: tokenizer.decode([i]).encode() for i in range(len(tokenizer)) if i != eos}
    return Side(tokenizer, vocab, token_bytes, {b: i for i, b in token_bytes.items()}, eos)


@cache
def _sides() -> tuple[Side, Side]:
    return (
        _side(_train(11, [0.4, 0.3, 0.2, 0.1])),
        _side(_train(12, [0.15, 0.2, 0.3, 0.35])),
    )


@dataclass(frozen=True)
class Pair:
    teacher: Side
    student: Side
    mapper: PairMapper


@cache
def _pair(direction: int) -> Pair:
    teacher, student = _sides() if direction == 0 else _sides()[::-1]
    table = build_pair_table(teacher.vocab, student.vocab)
    return Pair(teacher, student, PairMapper(teacher.vocab, student.vocab, table))


# -- the teacher: an explicit distribution over strings ------------------------------------------


@dataclass(frozen=True)
class StringTeacher:
    """A distribution over complete strings, written as canonical teacher tokens + eos."""

    texts: list[str]
    probs: np.ndarray
    paths: list[tuple[int, ...]]
    children: dict[tuple[int, ...], dict[int, float]]
    mass: dict[tuple[int, ...], float]

    def conditionals(self, prefix: tuple[int, ...]) -> dict[int, float]:
        """Exact ``p_k(u | prefix)`` for every ``u`` of nonzero probability."""
        total = self.mass[prefix]
        return {u: m / total for u, m in self.children[prefix].items()}


def _support(rng: np.random.Generator) -> list[str]:
    """A few dozen strings sharing many prefixes (so that strings end inside others)."""
    letters = np.array(list(ALPHABET))
    weights = rng.dirichlet(np.ones(len(ALPHABET)))
    roots = [
        "".join(rng.choice(letters, size=int(rng.integers(2, 5)), p=weights)) for _ in range(6)
    ]
    texts: set[str] = set()
    for _ in range(int(rng.integers(20, 45))):
        root = roots[int(rng.integers(len(roots)))]
        tail = "".join(rng.choice(letters, size=int(rng.integers(0, 5)), p=weights))
        text = root + tail
        texts.add(text)
        if rng.random() < 0.3:
            texts.add(text[: int(rng.integers(0, len(text) + 1))])
    return sorted(texts)


def _string_teacher(pair: Pair, seed: int) -> StringTeacher:
    rng = np.random.default_rng(1000 + seed)
    texts = _support(rng)
    probs = rng.dirichlet(np.full(len(texts), 0.7))
    teacher = pair.teacher
    paths = [
        (*encode_continuation(teacher.tokenizer, teacher.vocab, t), teacher.eos) for t in texts
    ]
    assert len(set(paths)) == len(paths)
    children: dict[tuple[int, ...], dict[int, float]] = {}
    mass: Counter[tuple[int, ...]] = Counter()
    for path, p in zip(paths, probs.tolist(), strict=True):
        for k in range(len(path) + 1):
            mass[path[:k]] += p
            if k < len(path):
                row = children.setdefault(path[:k], {})
                row[path[k]] = row.get(path[k], 0.0) + p
    return StringTeacher(texts, probs, paths, children, dict(mass))


def _scores(teacher: StringTeacher, path: tuple[int, ...], top_k: int | None) -> TeacherScores:
    """Exact teacher scores along ``path``: top-K by probability (all when ``top_k`` is None)."""
    rows = []
    for k in range(len(path)):
        dist = teacher.conditionals(path[:k])
        ranked = sorted(dist.items(), key=lambda item: (-item[1], item[0]))
        rows.append(ranked if top_k is None else ranked[:top_k])
    width = max(len(r) for r in rows) if top_k is None else top_k
    ids = np.full((len(path), width), -1, dtype=np.int64)
    lps = np.full((len(path), width), -np.inf)
    for k, ranked in enumerate(rows):
        for c, (u, p) in enumerate(ranked):
            ids[k, c], lps[k, c] = u, math.log(p)
    actual = np.array([math.log(teacher.conditionals(path[:k])[path[k]]) for k in range(len(path))])
    return TeacherScores(ids, lps, actual)


# -- ground truth by enumeration ---------------------------------------------------------------


def _token_of(starts: np.ndarray, x: int) -> tuple[int, int]:
    k = int(np.searchsorted(starts, x, side="right")) - 1
    return k, x - int(starts[k])


def _f_true(teacher: StringTeacher, pair: Pair, path, starts, data: bytes, x: int) -> float:
    """``F(x)`` of §3, summed over the strings of the support."""
    m = len(path)
    if x >= int(starts[-1]) + 1:  # after the final eos
        k, inside = m, False
    else:
        k, offset = _token_of(starts, x)
        inside = offset > 0
    total = 0.0
    for other, p in zip(teacher.paths, teacher.probs.tolist(), strict=True):
        if other[:k] != path[:k]:
            continue
        if inside:
            head = pair.teacher.token_bytes.get(other[k])  # None for eos
            if head is None or not head.startswith(data[int(starts[k]) : x]):
                continue
        total += p
    return total


def _longest_student(student: Side, rest: bytes) -> int:
    best, best_len = student.eos, -1  # nothing left: the text ends, the student says eos
    for token_id, spelled in student.token_bytes.items():
        if rest.startswith(spelled) and len(spelled) > best_len and spelled:
            best, best_len = token_id, len(spelled)
    return best


@dataclass(frozen=True)
class RowTruth:
    """The exact §4 row: masses in units of the teacher's probability at position ``k``."""

    k: int
    offset: int
    mass: dict[int, float]  # student id -> mass
    z: float  # mass consistent with the consumed bytes
    crossing: float  # mass of the strings whose next student token crosses the teacher token's end


def _follows_to(path, other, starts, data: bytes, end: int, pair: Pair) -> bool:
    """Whether string ``other`` follows the actual teacher path through the bytes up to ``end``
    (the strings ``F(end)`` of §3 sums over)."""
    k_end, offset_end = _token_of(starts, end) if end <= int(starts[-1]) else (len(path), 0)
    if other[:k_end] != path[:k_end]:
        return False
    if not offset_end:
        return True
    head = pair.teacher.token_bytes.get(other[k_end])
    return head is not None and head.startswith(data[int(starts[k_end]) : end])


def _row_truth(
    teacher: StringTeacher,
    pair: Pair,
    path,
    starts,
    data: bytes,
    a: int,
    sampled: int | None = None,
    end: int | None = None,
) -> RowTruth:
    """The exact §4 row at student position ``a``.

    ``sampled``/``end``: the student's sampled token there and its end. Where the remaining bytes
    of the actual teacher token spell a student token but the sampled token runs past the teacher
    token's end, the strings that go on along the actual path to spell the sampled token are the
    sampled token's (its §3 chain), the rest stay with the token the remaining bytes spell.
    """
    k, offset = _token_of(starts, a)
    teacher_end = int(starts[k + 1]) if k + 1 < len(starts) else None
    chains = (
        sampled is not None and end is not None and teacher_end is not None and end > teacher_end
    )
    consumed = data[int(starts[k]) : a]
    base = teacher.mass[path[:k]]
    mass: dict[int, float] = {}
    z = 0.0
    crossing = 0.0
    for other, text, p in zip(teacher.paths, teacher.texts, teacher.probs.tolist(), strict=True):
        if other[:k] != path[:k]:
            continue
        u = other[k]
        spelled = pair.teacher.token_bytes.get(u)
        if spelled is None:  # the teacher's eos
            if offset:
                continue
            target = pair.student.eos
        else:
            if not spelled.startswith(consumed):
                continue
            remaining = spelled[offset:]
            rest = text.encode()[a:]
            if remaining and remaining in pair.student.id_of:
                target = pair.student.id_of[remaining]
                if chains and u == path[k] and _follows_to(path, other, starts, data, end, pair):
                    target = sampled
            else:
                target = _longest_student(pair.student, rest)
                if target != pair.student.eos and len(pair.student.token_bytes[target]) > len(
                    remaining
                ):
                    crossing += p / base
        z += p / base
        mass[target] = mass.get(target, 0.0) + p / base
    return RowTruth(k, offset, mass, z, crossing)


# -- one completion ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    text: str
    student_ids: np.ndarray
    path: tuple[int, ...]
    alignment: Alignment
    starts: np.ndarray  # teacher token starts on the virtual stream


def _completion(pair: Pair, teacher: StringTeacher, text: str) -> Completion:
    student = pair.student
    ids = [*encode_continuation(student.tokenizer, student.vocab, text), student.eos]
    student_ids = np.asarray(ids, dtype=np.int64)
    view = teacher_view(student_ids, student.vocab, pair.teacher.tokenizer, pair.teacher.vocab)
    path = teacher.paths[teacher.texts.index(text)]
    assert tuple(view.ids.tolist()) == path and view.untiled_bytes == 0
    alignment = align(token_widths(student.vocab, student_ids), view.widths)
    return Completion(text, student_ids, path, alignment, alignment.teacher_starts)


def _mapped_row(out: MappedCompletion, j: int) -> dict[int, float]:
    row: dict[int, float] = {}
    for token_id, lp in zip(
        out.topk_ids_SK[j].tolist(), out.topk_logprobs_SK[j].tolist(), strict=True
    ):
        if token_id >= 0:
            assert token_id not in row, f"row {j} lists id {token_id} twice"
            row[token_id] = math.exp(lp)
    return row


def _tail(teacher: StringTeacher, scores: TeacherScores, path, k: int) -> float:
    dist = teacher.conditionals(path[:k])
    known = {u for u in scores.topk_ids_TK[k].tolist() if u >= 0} | {path[k]}
    return max(1.0 - sum(dist[u] for u in known), 0.0)


def check_telescoped(
    pair: Pair,
    teacher: StringTeacher,
    c: Completion,
    scores: TeacherScores,
    out: MappedCompletion,
    full: bool,
) -> None:
    """§3 against ``F`` summed over the strings."""
    data = c.text.encode()
    al = c.alignment
    assert out.scored_S.all()
    for j in range(len(c.student_ids)):
        a, e = int(al.student_starts[j]), int(al.student_ends[j])
        f_a = _f_true(teacher, pair, c.path, c.starts, data, a)
        f_e = _f_true(teacher, pair, c.path, c.starts, data, e)
        # Mapper's F(e_j): the telescoped log-probs add up (F(0) = 1).
        f_impl = math.exp(float(np.sum(out.logprobs_S[: j + 1])))
        if full:
            assert out.logprobs_S[j] == pytest.approx(math.log(f_e) - math.log(f_a), abs=TOL), (
                c.text,
                j,
            )
        assert out.logprobs_S[j] <= 0.0
        if e > int(c.starts[-1]) or _token_of(c.starts, e)[1] == 0:
            # A teacher boundary: the path product, nothing lost even with top-K truncation.
            assert f_impl == pytest.approx(f_e, rel=TOL, abs=1e-15), (c.text, j)
        else:
            k, _ = _token_of(c.starts, e)
            path_product = teacher.mass[c.path[:k]]
            deficit_bound = path_product * _tail(teacher, scores, c.path, k)
            assert f_impl <= f_e * (1 + TOL), (c.text, j)
            assert f_e - f_impl <= deficit_bound + TOL, (c.text, j)
            if full:
                assert deficit_bound <= TOL
    # Over a chunk the student log-probs add up to the teacher's path log-prob.
    sums = np.bincount(al.student_chunk, weights=out.logprobs_S, minlength=al.num_chunks)
    np.testing.assert_allclose(sums, out.chunk_teacher_logprobs_C, rtol=0, atol=TOL)


def check_sparse(
    pair: Pair,
    teacher: StringTeacher,
    c: Completion,
    scores: TeacherScores,
    out: MappedCompletion,
    full: bool,
    stats: Counter[str],
) -> None:
    """§4 against the next-token distribution enumerated from the strings."""
    data = c.text.encode()
    canonical = pair.mapper.student_canonical
    for j in range(len(c.student_ids)):
        a = int(c.alignment.student_starts[j])
        truth = _row_truth(
            teacher, pair, c.path, c.starts, data, a,
            int(canonical[c.student_ids[j]]), int(c.alignment.student_ends[j]),
        )  # fmt: skip
        row = _mapped_row(out, j)
        z, tail = float(out.z_S[j]), float(out.tail_mass_S[j])
        unresolved, inconsistent = (
            float(out.unresolved_mass_S[j]),
            float(out.inconsistent_mass_S[j]),
        )
        mapped = float(out.mapped_mass_S[j])
        where = (c.text, j, truth, row)

        # Mass accounting, row sums.
        assert mapped + tail + unresolved + inconsistent == pytest.approx(1.0, abs=TOL), where
        assert min(mapped, tail, unresolved, inconsistent) >= -TOL, where
        assert sum(row.values()) <= 1.0 + TOL, where
        assert sum(row.values()) * z == pytest.approx(mapped, abs=TOL), where
        # z, tail and the reported tail are what the enumeration says.
        assert tail == pytest.approx(_tail(teacher, scores, c.path, truth.k), abs=TOL), where
        assert z <= truth.z + TOL and truth.z - z <= tail + TOL, where
        assert inconsistent <= 1.0 - truth.z + TOL, where
        if truth.offset == 0:
            assert z == 1.0, where
        # Never a silent guess: every mapped entry is covered by the true mass of that token.
        for token_id, q in row.items():
            assert q * z <= truth.mass.get(token_id, 0.0) + TOL, (token_id, where)
        # Total variation within the reported unresolved and tail mass.
        ids = set(row) | set(truth.mass)
        tv = 0.5 * sum(abs(row.get(i, 0.0) - truth.mass.get(i, 0.0) / truth.z) for i in ids)
        assert tv <= (unresolved + tail) / z + TOL, where
        # The sampled token is always listed, with its mapped probability.
        sampled = int(canonical[c.student_ids[j]])
        assert sampled in out.topk_ids_SK[j].tolist(), where
        if full:
            assert tail <= TOL and z == pytest.approx(truth.z, abs=TOL), where
            assert inconsistent == pytest.approx(1.0 - truth.z, abs=TOL), where
            truth_sampled = truth.mass.get(sampled, 0.0)
            assert bool(out.exact_S[j]) == (unresolved == 0.0 and truth_sampled > 0.0), where
            if out.exact_S[j]:
                assert set(row) == set(truth.mass), where
                for token_id, q in row.items():
                    assert q == pytest.approx(truth.mass[token_id] / truth.z, abs=TOL), where
            stats["rows"] += 1
            stats["exact"] += bool(out.exact_S[j])
            stats["inside"] += truth.offset > 0
            stats["crossing"] += truth.crossing > 0
            # Crossing mass can only be mapped by following the actual path into the next token.
            stats["crossing_resolved"] += truth.crossing > unresolved + TOL
            stats["crossing_exact"] += truth.crossing > 0 and bool(out.exact_S[j])
            stats["unresolved"] += unresolved > 0
            stats["sampled_zero"] += truth_sampled == 0.0
            stats["multi_candidate"] += len(truth.mass) > 1


def _check_truncated_output(
    full_out: MappedCompletion, small_out: MappedCompletion, c: Completion, mapper: PairMapper
) -> None:
    """With an output top-K of 2: the two likeliest entries of the full row, plus the sample."""
    for j in range(len(c.student_ids)):
        full_row = _mapped_row(full_out, j)
        small_row = _mapped_row(small_out, j)
        head = small_out.topk_logprobs_SK[j, :SMALL_K]
        expected = sorted((q for q in full_row.values() if q > 0), reverse=True)[:SMALL_K]
        got = sorted(math.exp(v) for v in head if np.isfinite(v))[::-1]
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
        for token_id, q in small_row.items():
            assert q == pytest.approx(full_row.get(token_id, 0.0), abs=TOL)
        sampled = int(mapper.student_canonical[c.student_ids[j]])
        assert sampled in small_out.topk_ids_SK[j].tolist()


@cache
def run_case(direction: int, seed: int) -> Counter[str]:
    pair = _pair(direction)
    teacher = _string_teacher(pair, seed)
    stats: Counter[str] = Counter()
    for text in teacher.texts:
        c = _completion(pair, teacher, text)
        for top_k in (None, SMALL_K):
            scores = _scores(teacher, c.path, top_k)
            out = pair.mapper.map(
                c.student_ids,
                np.asarray(c.path),
                c.alignment,
                scores,
                top_k=pair.student.vocab.size,
            )
            tele = pair.mapper.telescoped(c.alignment, np.asarray(c.path), scores)
            np.testing.assert_array_equal(tele.logprobs_S, out.logprobs_S)
            check_telescoped(pair, teacher, c, scores, out, full=top_k is None)
            check_sparse(pair, teacher, c, scores, out, full=top_k is None, stats=stats)
            small = pair.mapper.map(
                c.student_ids, np.asarray(c.path), c.alignment, scores, top_k=SMALL_K
            )
            _check_truncated_output(out, small, c, pair.mapper)
    return stats


# -- tests -----------------------------------------------------------------------------------


def test_toy_tokenizers_are_two_different_60_token_bpes() -> None:
    first, second = _sides()
    for side in (first, second):
        assert side.vocab.size == VOCAB_SIZE
        assert side.vocab.scheme == "byte_level"
        assert side.vocab.roles["eos"] == side.eos and side.vocab.special.sum() == 1
        # The byte table agrees with the tokenizer's own decoder for every id.
        for token_id, spelled in side.token_bytes.items():
            assert side.vocab.token_bytes[token_id] == spelled
        assert {bytes([ord(ch)]) for ch in ALPHABET} <= set(side.id_of)
    assert set(first.id_of) != set(second.id_of)
    text = "abc ab cab  cc ba"
    assert encode_continuation(first.tokenizer, first.vocab, text) != encode_continuation(
        second.tokenizer, second.vocab, text
    )


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("seed", SEEDS)
def test_mapping_against_enumeration(direction: int, seed: int) -> None:
    stats = run_case(direction, seed)
    assert stats["rows"] > 0


@pytest.mark.parametrize("direction", [0, 1])
def test_cases_exercise_every_path(direction: int) -> None:
    """The string distributions reach every branch: exact rows, inside-token starts, crossings
    (some resolved exactly along the path), unresolved mass, sampled tokens of §4 probability 0."""
    total: Counter[str] = Counter()
    for seed in SEEDS:
        total += run_case(direction, seed)
    for key in (
        "exact",
        "inside",
        "crossing",
        "crossing_resolved",
        "unresolved",
        "sampled_zero",
        "multi_candidate",
    ):
        assert total[key] > 0, (key, total)
    assert total["exact"] < total["rows"]


def test_checks_catch_a_wrong_mapping() -> None:
    """The checks are not vacuous: a perturbed §4 row or §3 log-prob is rejected."""
    pair = _pair(0)
    teacher = _string_teacher(pair, 0)
    text = max(teacher.texts, key=len)
    c = _completion(pair, teacher, text)
    scores = _scores(teacher, c.path, None)
    out = pair.mapper.map(
        c.student_ids, np.asarray(c.path), c.alignment, scores, top_k=pair.student.vocab.size
    )
    check_telescoped(pair, teacher, c, scores, out, full=True)
    check_sparse(pair, teacher, c, scores, out, full=True, stats=Counter())

    shifted = out.logprobs_S.copy()
    shifted[0] -= 1e-6
    with pytest.raises(AssertionError):
        check_telescoped(
            pair, teacher, c, scores, dataclasses.replace(out, logprobs_S=shifted), full=True
        )

    row = int(np.flatnonzero(out.exact_S)[0])
    ids = out.topk_ids_SK.copy()
    lps = out.topk_logprobs_SK.copy()
    # Move the row's mass onto a student token the truth does not give it to.
    data = c.text.encode()
    truth = _row_truth(teacher, pair, c.path, c.starts, data, int(c.alignment.student_starts[row]))
    wrong = next(i for i in pair.student.token_bytes if i not in truth.mass)
    ids[row, 0] = wrong
    bad = dataclasses.replace(out, topk_ids_SK=ids, topk_logprobs_SK=lps)
    with pytest.raises(AssertionError):
        check_sparse(pair, teacher, c, scores, bad, full=True, stats=Counter())
