"""The mapping on real tokenizer pairs: identity, telescoping, mass accounting, sampled token."""

from __future__ import annotations

import numpy as np
import pytest

from tokenbridge.shared.align import align, encode_continuation, teacher_view, token_widths
from tokenbridge.shared.errors import ScoresShapeError
from tokenbridge.shared.mapping import TeacherScores

from tests.support.synthetic import synthetic_scores
from tests.support.texts import FIXED_SAMPLES
from tests.support.tokenizers import CROSS_PAIRS

TEXT = " ".join(FIXED_SAMPLES) + " The quick brown fox: 1234567 😀🫠 naïve café\n\tend"


def _run(bank, teacher, student, text=TEXT, top_k=8, seed=0, eot=True):
    s_tok, s_voc = bank.tokenizer(student), bank.vocab(student)
    t_tok, t_voc = bank.tokenizer(teacher), bank.vocab(teacher)
    ids = encode_continuation(s_tok, s_voc, text)
    if eot and s_voc.roles.get("eot") is not None:
        ids.append(s_voc.roles["eot"])
    student_ids = np.asarray(ids, dtype=np.int64)
    view = teacher_view(student_ids, s_voc, t_tok, t_voc)
    alignment = align(token_widths(s_voc, student_ids), view.widths)
    scores = synthetic_scores(t_voc, view.ids, top_k, np.random.default_rng(seed))
    mapper = bank.mapper(teacher, student)
    out = mapper.map(student_ids, view.ids, alignment, scores, top_k, view.untiled_bytes)
    return student_ids, view, alignment, scores, out


@pytest.mark.parametrize("name", ["gpt2", "llama3", "mistral-v1", "tekken", "qwen3.6"])
def test_identical_tokenizers_give_the_teacher_back_bit_for_bit(bank, name):
    student_ids, view, alignment, scores, out = _run(bank, name, name, top_k=12)
    assert np.array_equal(view.ids, student_ids)
    assert alignment.report().one_to_one_share == 1.0
    # Row j is about token j: its log-prob is the teacher's log-prob of that same token.
    assert np.array_equal(out.logprobs_S, scores.actual_logprobs_T)
    assert np.array_equal(out.topk_ids_SK[:, :12], scores.topk_ids_TK)
    assert np.array_equal(out.topk_logprobs_SK[:, :12], scores.topk_logprobs_TK)
    in_topk = (scores.topk_ids_TK == student_ids[:, None]).any(axis=1)
    assert np.array_equal(out.topk_ids_SK[:, 12], np.where(in_topk, -1, student_ids))
    extra = out.topk_logprobs_SK[~in_topk, 12]
    assert np.array_equal(extra, scores.actual_logprobs_T[~in_topk])
    assert np.all(out.z_S == 1.0) and np.all(out.exact_S)
    assert np.all(out.unresolved_mass_S == 0) and np.all(out.inconsistent_mass_S == 0)


@pytest.mark.parametrize(("teacher", "student"), CROSS_PAIRS)
def test_student_logprobs_telescope_to_the_teacher_path_over_every_chunk(bank, teacher, student):
    _, _, alignment, _, out = _run(bank, teacher, student)
    assert out.scored_S.all()
    chunk_sums = np.bincount(alignment.student_chunk, weights=out.logprobs_S)
    np.testing.assert_allclose(chunk_sums, out.chunk_teacher_logprobs_C, rtol=0, atol=1e-5)
    assert np.all(out.logprobs_S <= 0.0)  # every q <= 1


@pytest.mark.parametrize(("teacher", "student"), CROSS_PAIRS)
@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_rows_account_for_all_teacher_mass(bank, teacher, student, seed):
    _, _, _, _, out = _run(bank, teacher, student, seed=seed)
    total = out.mapped_mass_S + out.tail_mass_S + out.unresolved_mass_S + out.inconsistent_mass_S
    np.testing.assert_allclose(total, 1.0, atol=1e-9)
    row_mass = np.exp(out.topk_logprobs_SK).sum(axis=1)
    assert np.all(row_mass <= 1.0 + 1e-9)
    assert np.all((out.z_S > 0) & (out.z_S <= 1.0 + 1e-12))
    valid = out.topk_ids_SK >= 0
    assert np.all(out.topk_ids_SK[valid] < bank.vocab(student).size)
    # Each listed probability is at most the mapped mass renormalised by z.
    assert np.all(row_mass <= out.mapped_mass_S / out.z_S + 1e-9)


@pytest.mark.parametrize(("teacher", "student"), CROSS_PAIRS)
def test_sampled_token_is_always_in_the_support(bank, teacher, student):
    student_ids, _, _, _, out = _run(bank, teacher, student)
    canonical = bank.mapper(teacher, student).student_canonical[student_ids]
    listed = (out.topk_ids_SK == canonical[:, None]).any(axis=1)
    assert listed.all()
    # Rows whose sampled token got no §4 mass are never flagged exact.
    sampled_lp = np.where(out.topk_ids_SK == canonical[:, None], out.topk_logprobs_SK, -np.inf).max(
        1
    )
    assert not np.any(out.exact_S & ~np.isfinite(sampled_lp))


def test_rows_sorted_by_probability(bank):
    _, _, _, _, out = _run(bank, "qwen3.6", "llama3", top_k=10)
    head = out.topk_logprobs_SK[:, :10]
    finite = np.where(np.isfinite(head), head, -1e300)
    assert np.all(np.diff(finite, axis=1) <= 0)
    # Padding only after the real entries.
    padded = out.topk_ids_SK[:, :10] < 0
    assert np.all(np.diff(padded.astype(int), axis=1) >= 0)


def test_student_token_spanning_teacher_tokens_gets_the_chain_rule_product(bank):
    """Llama 3 writes "123" as one token, Qwen3.6 digit by digit: log q is the sum of three."""
    student_ids, view, alignment, scores, out = _run(
        bank, "qwen3.6", "llama3", text="123", eot=False
    )
    assert len(student_ids) == 1 and len(view.ids) == 3
    assert alignment.num_chunks == 1
    np.testing.assert_allclose(out.logprobs_S[0], scores.actual_logprobs_T.sum(), atol=1e-12)


def test_strict_prefix_student_token_gets_the_summed_probability(bank):
    """Student token strictly inside a teacher token: q is the mass of candidates sharing it."""
    teacher, student = bank.vocab("gpt2"), bank.vocab("mistral-v1")
    t_tok = bank.tokenizer("gpt2")
    the, there = (encode_continuation(t_tok, teacher, w)[0] for w in (" the", " there"))
    other = encode_continuation(t_tok, teacher, " cat")[0]
    # Student spells " there" as "▁the" + "re" (not its canonical tokenisation).
    s_tok = bank.tokenizer("mistral-v1")
    student_ids = np.array(
        [s_tok.convert_tokens_to_ids("▁the"), s_tok.convert_tokens_to_ids("re")], dtype=np.int64
    )
    assert student.bytes_of(student_ids) == b" there"
    view = teacher_view(student_ids, student, t_tok, teacher)
    assert view.ids.tolist() == [there]
    scores = TeacherScores(
        topk_ids_TK=np.array([[the, there, other]]),
        topk_logprobs_TK=np.log(np.array([[0.5, 0.3, 0.1]])),
        actual_logprobs_T=np.log(np.array([0.3])),
    )
    alignment = align(token_widths(student, student_ids), view.widths)
    out = bank.mapper("gpt2", "mistral-v1").map(student_ids, view.ids, alignment, scores, 4)
    # F(" the") = p(" the") + p(" there") = 0.8; F(" there") = 0.3.
    np.testing.assert_allclose(np.exp(out.logprobs_S), [0.8, 0.3 / 0.8])
    # Second position, inside teacher token " there" after " the": " the" and " there" are
    # consistent (z = 0.8); " the" has no bytes left, so what follows it is unknown (unresolved);
    # " cat" contradicts the consumed bytes; 0.1 is outside the top-K.
    assert out.z_S[1] == pytest.approx(0.8)
    assert out.inconsistent_mass_S[1] == pytest.approx(0.1)
    assert out.unresolved_mass_S[1] == pytest.approx(0.5)
    assert out.tail_mass_S[1] == pytest.approx(0.1)
    assert out.topk_ids_SK[1, 0] == s_tok.convert_tokens_to_ids("re")
    assert out.topk_logprobs_SK[1, 0] == pytest.approx(np.log(0.3 / 0.8))
    assert not out.exact_S[1]


def test_scores_of_the_wrong_shape_are_refused(bank):
    student_ids, view, alignment, scores, _ = _run(bank, "gpt2", "llama3", text="Hello")
    bad = TeacherScores(
        scores.topk_ids_TK[:-1], scores.topk_logprobs_TK[:-1], scores.actual_logprobs_T[:-1]
    )
    with pytest.raises(ScoresShapeError, match="positions"):
        bank.mapper("gpt2", "llama3").map(student_ids, view.ids, alignment, bad, 4)


def test_unmapped_special_masks_its_chunk_only(bank):
    s_tok, student = bank.tokenizer("qwen3.6"), bank.vocab("qwen3.6")
    teacher = bank.vocab("gpt2")
    im_start = s_tok.convert_tokens_to_ids("<|im_start|>")
    ids = np.array([*encode_continuation(s_tok, student, "Hi there"), im_start], dtype=np.int64)
    view = teacher_view(ids, student, bank.tokenizer("gpt2"), teacher)
    alignment = align(token_widths(student, ids), view.widths)
    scores = synthetic_scores(teacher, view.ids, 4, np.random.default_rng(0))
    out = bank.mapper("gpt2", "qwen3.6").map(
        ids, view.ids, alignment, scores, 4, view.untiled_bytes
    )
    assert out.scored_S.tolist() == [True] * (len(ids) - 1) + [False]
    assert np.isnan(out.logprobs_S[-1]) and np.isfinite(out.logprobs_S[:-1]).all()
    assert out.report.untiled_bytes == 1
