"""§4b: the teacher's mass of named student candidates from its full row, against a brute force
over every teacher token (real tokenizers, random rows with a few hundred live ids)."""

from __future__ import annotations

import numpy as np
import pytest

from tokenbridge.shared.align import align, teacher_view, token_widths
from tokenbridge.shared.candidates import candidate_masses

TEXT = "To be, or not to be: in 1601 the Globe sold 31536 seats to the king's men."


def _completion(bank, teacher: str, student: str):
    mapper = bank.mapper(teacher, student)
    student_tok = bank.tokenizer(student)
    from tokenbridge.shared.align import encode_continuation

    ids = np.asarray(encode_continuation(student_tok, mapper.student, TEXT), dtype=np.int64)
    view = teacher_view(
        ids, mapper.student, bank.tokenizer(teacher), mapper.teacher, mapper.special_map
    )
    alignment = align(token_widths(mapper.student, ids), view.widths)
    return mapper, ids, view, alignment


def _rows(rng, vocab_size: int, positions: int, teacher_ids: np.ndarray, live: int = 400):
    """Full log-prob rows with ``live`` ids of real mass (the actual token always among them)."""
    rows = np.full((positions, vocab_size), -np.inf, dtype=np.float32)
    for k in range(positions):
        ids = rng.choice(vocab_size, size=live, replace=False)
        if teacher_ids[k] >= 0:
            ids[0] = teacher_ids[k]
        probs = rng.dirichlet(np.full(live, 0.3))
        rows[k, ids] = np.log(np.maximum(probs, 1e-30))
    return rows


def _naive(mapper, alignment, teacher_ids, rows, candidates_SC):
    """Per row: every teacher id with mass, its remaining bytes, the §4 rule by brute force over
    the student vocabulary."""
    teacher_bytes, student_bytes = mapper.teacher.token_bytes, mapper.student.token_bytes
    student_set: dict[bytes, int] = {}
    for sid, b in enumerate(student_bytes):
        if b and not mapper.student.special[sid]:
            student_set.setdefault(b, int(mapper.student_canonical[sid]))
    longer_starts = set()
    for b in student_set:
        for cut in range(1, len(b)):
            longer_starts.add(b[:cut])
    out = np.zeros(candidates_SC.shape)
    slack = np.zeros(candidates_SC.shape)
    starts_ext = np.concatenate([alignment.teacher_starts, alignment.sync[-1:]])
    for j, start in enumerate(alignment.student_starts.tolist()):
        k = int(np.searchsorted(starts_ext, start, side="right") - 1)
        offset = start - int(starts_ext[k])
        consumed = teacher_bytes[int(teacher_ids[k])][:offset]
        live = np.flatnonzero(np.isfinite(rows[k]))
        mass: dict[int, float] = {}
        loose: list[tuple[bytes, float]] = []
        z = 0.0
        for u in live.tolist():
            p = float(np.exp(np.float64(rows[k, u])))
            b = teacher_bytes[u]
            if mapper.teacher.special[u]:
                if offset == 0:
                    target = int(mapper.teacher_special_to_student[u])
                    z += p
                    if target >= 0:
                        mass[target] = mass.get(target, 0.0) + p
                continue
            if not b.startswith(consumed) or len(b) < offset:
                continue
            z += p
            rest = b[offset:]
            if not rest:  # ends exactly here: the next teacher position decides
                loose.append((rest, p))
                continue
            best = max((cut for cut in range(1, len(rest) + 1) if rest[:cut] in student_set),
                       default=0)  # fmt: skip
            crosses = rest in longer_starts
            if best and (best == len(rest) or not crosses):
                target = student_set[rest[:best]]
                mass[target] = mass.get(target, 0.0) + p
            else:
                loose.append((rest, p))
        for col, c in enumerate(candidates_SC[j].tolist()):
            if c < 0:
                continue
            c = int(mapper.student_canonical[c])
            out[j, col] = mass.get(c, 0.0) / z
            want = student_bytes[c]
            slack[j, col] = (
                sum(p for r, p in loose if (want and r.startswith(want)) or want.startswith(r)) / z
            )
    return out, slack


@pytest.mark.parametrize("teacher,student", [("gpt2", "mistral-v1"), ("qwen2", "gpt2")])
def test_candidate_masses_match_a_brute_force_over_the_teacher_vocabulary(bank, teacher, student):
    mapper, ids, view, alignment = _completion(bank, teacher, student)
    rng = np.random.default_rng(0)
    rows = _rows(rng, mapper.teacher.size, len(view.ids), view.ids)
    # Candidates: the sampled token, tokens the teacher's live ids map to, and random ids.
    candidates = rng.integers(0, mapper.student.size, size=(len(ids), 12))
    candidates[:, 0] = ids
    candidates[:, -1] = -1
    target, _ = mapper._boundary_assignment
    for j in range(len(ids)):
        live = np.flatnonzero(np.isfinite(rows[min(j, len(rows) - 1)]))[:8]
        mapped = target[live]
        candidates[j, 1 : 1 + len(mapped)] = np.where(mapped >= 0, mapped, candidates[j, 1])
    scored = np.ones(len(ids), dtype=bool)
    found = candidate_masses(mapper, alignment, view.ids, rows, candidates, scored)
    want_mass, want_slack = _naive(mapper, alignment, view.ids, rows, candidates)
    real = candidates >= 0
    np.testing.assert_allclose(np.exp(found.logprobs_SC[real]), want_mass[real], atol=1e-9)
    np.testing.assert_allclose(found.unresolved_SC[real], want_slack[real], atol=1e-9)
    assert np.all(found.logprobs_SC[~real] == -np.inf)
    # Something was actually measured: candidates with mass, rows inside teacher tokens.
    assert (want_mass[real] > 0).sum() > len(ids)


def test_identical_tokenizers_give_the_teachers_own_logprobs(bank):
    mapper, ids, view, alignment = _completion(bank, "llama3", "llama3")
    rng = np.random.default_rng(1)
    rows = _rows(rng, mapper.teacher.size, len(view.ids), view.ids)
    candidates = rng.integers(0, mapper.student.size, size=(len(ids), 6))
    candidates[:, 0] = ids
    found = candidate_masses(mapper, alignment, view.ids, rows, candidates, np.ones(len(ids), bool))
    want = np.take_along_axis(rows.astype(np.float64), candidates, axis=1)
    np.testing.assert_array_equal(found.logprobs_SC, want)
    assert np.all(found.unresolved_SC == 0)


def test_unscored_rows_stay_nan(bank):
    mapper, ids, view, alignment = _completion(bank, "gpt2", "mistral-v1")
    rows = _rows(np.random.default_rng(2), mapper.teacher.size, len(view.ids), view.ids)
    scored = np.zeros(len(ids), dtype=bool)
    scored[::2] = True
    candidates = np.tile(ids[:, None], (1, 3))
    found = candidate_masses(mapper, alignment, view.ids, rows, candidates, scored)
    assert np.isnan(found.logprobs_SC[~scored]).all()
    assert np.isfinite(found.unresolved_SC[scored]).all()
