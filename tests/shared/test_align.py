"""Alignment: chunks tile both sides with equal bytes; sync points are the shared boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenbridge.shared.align import (
    GAP_ID,
    align,
    encode_continuation,
    special_token_map,
    teacher_view,
    token_widths,
)
from tokenbridge.shared.errors import AlignmentError

from tests.support.texts import FIXED_SAMPLES, adversarial_text
from tests.support.tokenizers import CROSS_PAIRS


def _check_alignment(bank, teacher, student, text):
    t_tok, t_voc = bank.tokenizer(teacher), bank.vocab(teacher)
    s_tok, s_voc = bank.tokenizer(student), bank.vocab(student)
    student_ids = np.asarray(encode_continuation(s_tok, s_voc, text), dtype=np.int64)
    view = teacher_view(student_ids, s_voc, t_tok, t_voc)
    assert view.untiled_bytes == 0
    assert t_voc.bytes_of(view.ids) == s_voc.bytes_of(student_ids) == text.encode()
    alignment = align(token_widths(s_voc, student_ids), view.widths)

    # Both sides tile [0, total) with no hole and no overlap.
    total = len(text.encode())
    for starts, ends in (
        (alignment.student_starts, alignment.student_ends),
        (alignment.teacher_starts, alignment.teacher_ends),
    ):
        if total:
            assert starts[0] == 0 and ends[-1] == total
            assert np.array_equal(starts[1:], ends[:-1])

    # Sync points are exactly the intersection of the two boundary sets.
    student_bounds = {0, *alignment.student_ends.tolist()}
    teacher_bounds = {0, *alignment.teacher_ends.tolist()}
    assert set(alignment.sync.tolist()) == (student_bounds & teacher_bounds if total else {0})

    # Every chunk holds the same bytes on both sides.
    s_bytes = [s_voc.token_bytes[i] for i in student_ids.tolist()]
    t_bytes = [t_voc.token_bytes[i] for i in view.ids.tolist()]
    for chunk in range(alignment.num_chunks):
        left = b"".join(
            b for b, c in zip(s_bytes, alignment.student_chunk, strict=True) if c == chunk
        )
        right = b"".join(
            b for b, c in zip(t_bytes, alignment.teacher_chunk, strict=True) if c == chunk
        )
        assert left == right
        assert left  # no empty chunk
    report = alignment.report()
    assert report.chunks == alignment.num_chunks
    assert 0.0 <= report.one_to_one_share <= 1.0


@pytest.mark.parametrize(("teacher", "student"), CROSS_PAIRS)
@pytest.mark.parametrize("text", FIXED_SAMPLES)
def test_chunks_tile_both_sides_on_fixed_text(bank, teacher, student, text):
    _check_alignment(bank, teacher, student, text)


@pytest.mark.parametrize(("teacher", "student"), CROSS_PAIRS)
def test_chunks_tile_both_sides_on_adversarial_text(bank, teacher, student):
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(adversarial_text)
    def check(text):
        _check_alignment(bank, teacher, student, text)

    check()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=40),
    st.lists(st.integers(1, 5), min_size=1, max_size=40),
)
def test_sync_points_are_the_boundary_intersection(left, right):
    total = min(sum(left), sum(right))

    # Trim both to the same total, keeping widths positive.
    def trim(widths):
        out, acc = [], 0
        for w in widths:
            if acc + w >= total:
                out.append(total - acc)
                break
            out.append(w)
            acc += w
        return [w for w in out if w > 0]

    left, right = trim(left), trim(right)
    alignment = align(np.array(left), np.array(right))
    expected = {0} | (set(np.cumsum(left).tolist()) & set(np.cumsum(right).tolist()))
    assert set(alignment.sync.tolist()) == expected
    assert alignment.chunk_student_tokens.sum() == len(left)
    assert alignment.chunk_teacher_tokens.sum() == len(right)


def test_align_refuses_sequences_of_different_length():
    with pytest.raises(AlignmentError, match="same bytes"):
        align(np.array([1, 2]), np.array([4]))
    with pytest.raises(AlignmentError, match="at least one"):
        align(np.array([0, 3]), np.array([3]))


def test_cut_utf8_character_is_spelled_with_teacher_byte_tokens(bank):
    """A completion that stops inside a character (sampling cut it) still tiles exactly."""
    student, teacher = bank.vocab("gpt2"), bank.vocab("mistral-v1")
    ids = encode_continuation(bank.tokenizer("gpt2"), student, "ok 🫠")
    cut = ids[:-1]  # GPT-2 spells the emoji over two tokens; drop the second
    data = student.bytes_of(cut)
    with pytest.raises(UnicodeDecodeError):
        data.decode()
    view = teacher_view(cut, student, bank.tokenizer("mistral-v1"), teacher)
    assert view.untiled_bytes == 0
    assert teacher.bytes_of(view.ids) == data
    align(token_widths(student, np.array(cut)), view.widths)


def test_text_after_invalid_bytes_is_encoded_as_text(bank):
    """Only the invalid bytes take single-byte tokens; valid text on either side is encoded."""
    teacher = bank.vocab("llama3")
    t_tok = bank.tokenizer("llama3")
    emoji = "🫠".encode()
    data = b"ok " + emoji[:2] + "🎉 done é".encode()
    student = bank.vocab("gpt2")
    # Spell the bytes with GPT-2's single-byte tokens, so the student ids hold the cut character.
    ids = [student.id_of_bytes[bytes([b])] for b in data]
    view = teacher_view(ids, student, t_tok, teacher)
    expected = [
        *encode_continuation(t_tok, teacher, "ok "),
        *(teacher.id_of_bytes[bytes([b])] for b in emoji[:2]),
        *encode_continuation(t_tok, teacher, "🎉 done é"),
    ]
    assert view.ids.tolist() == expected
    assert view.untiled_bytes == 0


def test_special_tokens_are_matched_by_role(bank):
    student, teacher = bank.vocab("qwen3.6"), bank.vocab("llama3")
    mapping = special_token_map(student, teacher)
    assert mapping[student.roles["eot"]] == teacher.roles["eot"]
    ids = [*encode_continuation(bank.tokenizer("qwen3.6"), student, "Done."), student.roles["eot"]]
    view = teacher_view(ids, student, bank.tokenizer("llama3"), teacher)
    assert view.ids[-1] == teacher.roles["eot"]
    assert view.widths[-1] == 1
    alignment = align(token_widths(student, np.array(ids)), view.widths)
    assert alignment.chunk_student_tokens[-1] == alignment.chunk_teacher_tokens[-1] == 1


def test_special_without_a_counterpart_becomes_a_gap(bank):
    student, teacher = bank.vocab("qwen3.6"), bank.vocab("gpt2")
    im_start = bank.tokenizer("qwen3.6").convert_tokens_to_ids("<|im_start|>")
    ids = [im_start, *encode_continuation(bank.tokenizer("qwen3.6"), student, "Hi")]
    view = teacher_view(ids, student, bank.tokenizer("gpt2"), teacher)
    assert view.ids[0] == GAP_ID and view.untiled_bytes == 1


def test_student_ids_out_of_range_are_refused(bank):
    student = bank.vocab("gpt2")
    with pytest.raises(AlignmentError, match="student ids"):
        teacher_view([student.size], student, bank.tokenizer("llama3"), bank.vocab("llama3"))
