"""The seed-style (paper) aligner of ``bench/seed_style.py`` on small cases with real tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from tokenbridge.shared.align import encode_continuation, teacher_view

from bench.seed_style import SeedChunk, seed_align, seed_align_and_targets, semantic_prior_targets

TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune."
)


def logprobs(count: int, seed: int) -> np.ndarray:
    """Random negative log-probs, as a model would give."""
    return np.log(np.random.default_rng(seed).uniform(0.02, 1.0, size=count))


def test_identical_tokenizers_align_one_to_one_with_the_semantic_prior(bank) -> None:
    tok = bank.tokenizer("gpt2")
    ids = tok.encode(TEXT, add_special_tokens=False)
    teacher_lp, student_lp = logprobs(len(ids), 1), logprobs(len(ids), 2)

    result = seed_align_and_targets(ids, ids, tok, tok, teacher_lp, student_lp)

    assert result.num_chunks == len(ids)
    assert result.aligned.all()
    # One token per chunk: L_T = teacher_lp[i], L_S = student_lp[i].
    expected = (teacher_lp / student_lp) * student_lp
    np.testing.assert_array_equal(result.targets, expected)
    np.testing.assert_allclose(result.targets, teacher_lp, rtol=1e-12)


def test_partial_utf8_is_treated_as_incomplete(bank) -> None:
    tok = bank.tokenizer("gpt2")
    ids = tok.encode("ok 😀 done", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the emoji is split across tokens

    chunks = seed_align(ids, ids, tok, tok)

    assert len(chunks) < len(ids)
    assert all(c.student_end - c.student_start == c.teacher_end - c.teacher_start for c in chunks)
    assert sum(c.student_end - c.student_start for c in chunks) == len(ids)
    for chunk in chunks:
        assert "\ufffd" not in tok.decode(ids[chunk.student_start : chunk.student_end])


def test_semantic_prior_over_a_many_to_one_chunk() -> None:
    student_lp = np.array([-1.0, -3.0, -0.5])
    teacher_lp = np.array([-2.0, -0.25])
    chunks = [SeedChunk(0, 2, 0, 1), SeedChunk(2, 3, 1, 2)]

    targets, aligned = semantic_prior_targets(chunks, teacher_lp, student_lp)

    np.testing.assert_allclose(targets, [-0.5, -1.5, -0.25])
    assert aligned.all()
    assert targets[:2].sum() == pytest.approx(teacher_lp[0])


def test_gpt2_to_mistral_v1_loses_most_tokens_to_the_leading_space_hole(bank) -> None:
    teacher_tok, student_tok = bank.tokenizer("gpt2"), bank.tokenizer("mistral-v1")
    teacher, student = bank.vocab("gpt2"), bank.vocab("mistral-v1")
    student_ids = encode_continuation(student_tok, student, TEXT)
    view = teacher_view(student_ids, student, teacher_tok, teacher)
    assert view.untiled_bytes == 0
    # A lone "▁the" decodes to "the", a lone "Ġthe" to " the": word chunks never match.
    assert student_tok.decode(student_tok.encode(" the", add_special_tokens=False)[-1:]) == "the"

    result = seed_align_and_targets(
        student_ids,
        view.ids,
        student_tok,
        teacher_tok,
        logprobs(len(view.ids), 3),
        logprobs(len(student_ids), 4),
    )

    assert float(result.aligned.mean()) < 0.5
    # Only chunks not preceded by a space can match (punctuation, newlines, word pieces).
    for chunk in result.chunks:
        assert not student.bytes_of(
            student_ids[chunk.student_start : chunk.student_end]
        ).startswith(b" ")
    assert np.isnan(result.targets[~result.aligned]).all()
    assert np.isfinite(result.targets[result.aligned]).all()
