"""The text-continuation task: passages from whole plays, held-out plays kept apart, and examples
that spell exactly the passage's bytes."""

from __future__ import annotations

import pytest

from tokenbridge.hub import load_tokenizer
from tokenbridge.research.textcont import (
    HELD_OUT_PLAYS,
    VALIDATION_PLAYS,
    examples,
    passages,
    plays,
)
from tokenbridge.shared.vocab import build_vocab


@pytest.mark.parametrize(("split", "names"), [("held_out", HELD_OUT_PLAYS),
                                              ("validation", VALIDATION_PLAYS)])  # fmt: skip
def test_the_set_aside_plays_exist_and_are_kept_apart_from_the_training_passages(split, names):
    corpus = plays()
    assert set(names) <= set(corpus)
    kept = "\n".join(corpus[name] for name in names)
    train = passages("train", count=200, seed=3)
    # A 220-character window of another play is (all but) never word for word in these.
    assert sum(p.prompt + p.continuation in kept for p in train) == 0
    for p in passages(split, count=50, seed=3):
        assert p.prompt + p.continuation in kept


def test_an_unknown_split_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="held_out"):
        passages("test", count=1)


def test_passages_are_seeded_cut_at_spaces_and_of_about_the_asked_length():
    first = passages("held_out", count=30, seed=7)
    assert first == passages("held_out", count=30, seed=7)
    assert first != passages("held_out", count=30, seed=8)
    for p in first:
        assert p.continuation.startswith(" ") and not p.prompt.startswith(" ")
        assert 48 <= len(p.prompt) <= 96 and 64 <= len(p.continuation) <= 129
        assert "  " not in p.prompt + p.continuation  # whitespace is collapsed


@pytest.mark.parametrize("name", ["gpt2", "mistral-v1"])
def test_examples_spell_the_continuation_exactly_after_the_prompt(name):
    tokenizer = load_tokenizer(name)
    vocab = build_vocab(tokenizer)
    chosen = passages("train", count=20, seed=1)
    for passage, (prompt_ids, completion_ids, loss_from) in zip(
        chosen, examples(tokenizer, chosen), strict=True
    ):
        assert loss_from == 0
        assert vocab.bytes_of(completion_ids) == passage.continuation.encode("utf-8")
        assert passage.prompt in tokenizer.decode(prompt_ids)
