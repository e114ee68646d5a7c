"""SFT's student tokens of a teacher-written completion spell exactly the teacher's bytes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tokenbridge.client.step import teacher_rollout
from tokenbridge.shared.vocab import build_vocab


@pytest.mark.parametrize("name", ["mistral-v1", "gpt2", "qwen2"])
def test_teacher_text_becomes_student_tokens_byte_for_byte(bank, name):
    tokenizer = bank.tokenizer(name)
    vocab = build_vocab(tokenizer)
    answer = SimpleNamespace(
        completions=[
            SimpleNamespace(text=" 7+5=12, so 132.", finish_reason="stop"),
            SimpleNamespace(text=" half", finish_reason="length"),
        ]
    )
    rollout = teacher_rollout(tokenizer, vocab, ["47+85=", "go"], answer)
    stopped, cut = rollout.completion_ids
    # A plain encode() of " 7+5..." would give SentencePiece's "▁▁7": two spaces, not one.
    assert vocab.bytes_of(stopped[:-1]) == b" 7+5=12, so 132."
    assert stopped[-1] == tokenizer.eos_token_id
    assert vocab.bytes_of(cut) == b" half"
    assert rollout.prompt_ids[0] == tokenizer.encode("47+85=", add_special_tokens=True)
