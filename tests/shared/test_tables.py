"""The pair table and its on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest

from tokenbridge.shared.cache import TableCache
from tokenbridge.shared.tables import PairTable, StudentLookup, build_pair_table


def _check_entries(bank, teacher_name, student_name, positions):
    teacher, student = bank.vocab(teacher_name), bank.vocab(student_name)
    table = bank.tables.pair_table(teacher, student)
    lookup = StudentLookup(student)
    token_of = np.searchsorted(teacher.starts, positions, side="right") - 1
    wrong = []
    for position, token in zip(positions.tolist(), token_of.tolist(), strict=True):
        offset = position - int(teacher.starts[token])
        expected = lookup.longest(teacher.token_bytes[token][offset:])
        got = (
            int(table.student_id[position]),
            int(table.match_len[position]),
            bool(table.crosses[position]),
        )
        if got != expected:
            wrong.append((token, offset, got, expected))
    assert not wrong[:5]


@pytest.mark.parametrize(
    ("teacher", "student"),
    [("qwen3.6", "llama3"), ("llama3", "mistral-v3"), ("tekken", "gpt2"), ("gpt2", "gpt2")],
)
def test_table_agrees_with_plain_byte_matching_on_a_sample(bank, teacher, student):
    rng = np.random.default_rng(7)
    size = len(bank.vocab(teacher).flat)
    _check_entries(bank, teacher, student, rng.choice(size, size=20_000, replace=False))


@pytest.mark.slow
def test_table_agrees_with_plain_byte_matching_everywhere(bank):
    """Every (teacher token, offset) of GPT-2 × Mistral v1: the hashed trie is exact."""
    size = len(bank.vocab("gpt2").flat)
    _check_entries(bank, "gpt2", "mistral-v1", np.arange(size))


def test_cache_round_trip_and_rebuild_of_a_damaged_entry(bank, tmp_path):
    teacher, student = bank.vocab("gpt2"), bank.vocab("mistral-v1")
    cache = TableCache(tmp_path)
    built = cache.pair_table(teacher, student)
    path = cache.pair_path(teacher, student)
    assert path.is_file()
    loaded = cache.pair_table(teacher, student)
    for name in ("student_id", "match_len", "crosses"):
        assert np.array_equal(getattr(built, name), getattr(loaded, name))
    path.write_bytes(b"not an npz file")
    rebuilt = cache.pair_table(teacher, student)
    assert np.array_equal(rebuilt.student_id, built.student_id)
    assert not list(path.parent.glob(".tmp-*"))


def test_vocab_cache_reads_back_the_same_vocabulary(bank, tmp_path):
    cache = TableCache(tmp_path)
    tokenizer = bank.tokenizer("tekken")
    first = cache.vocab(tokenizer, "tekken")
    second = cache.vocab(tokenizer, "tekken")
    assert first.content_hash == second.content_hash == bank.vocab("tekken").content_hash
    assert second.token_bytes == first.token_bytes


def test_table_refuses_foreign_arrays(bank):
    teacher, student = bank.vocab("gpt2"), bank.vocab("mistral-v1")
    arrays = build_pair_table(teacher, student).to_arrays()
    arrays["meta"] = np.frombuffer(b'{"format": 0}', dtype=np.uint8)
    with pytest.raises(ValueError, match="format"):
        PairTable.from_arrays(arrays)
