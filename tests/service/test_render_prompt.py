"""How the service renders a prompt for the teacher: messages through the teacher's own chat
template, text with the teacher's own BOS, student ids decoded and re-tokenised."""

from __future__ import annotations

import pytest

from tokenbridge.service.errors import UnprocessableError
from tokenbridge.service.scoring import render_prompt
from tokenbridge.shared.protocol import Prompt

MESSAGES = [{"role": "user", "content": "What is 17 × 23?"}]


@pytest.mark.parametrize(
    ("teacher", "opening", "closing"),
    [
        ("llama3", "<|begin_of_text|><|start_header_id|>user", "assistant<|end_header_id|>\n\n"),
        ("qwen2", "<|im_start|>user\n", "<|im_start|>assistant\n"),
        # SentencePiece's dummy prefix puts "▁[" after <s>, as Mistral's own tokenizer does.
        ("mistral-v1", "<s> [INST] What", "[/INST]"),
    ],
)
def test_messages_go_through_the_teachers_chat_template(bank, teacher, opening, closing):
    tokenizer = bank.tokenizer(teacher)
    ids = render_prompt(Prompt(messages=MESSAGES), tokenizer, None)
    text = tokenizer.decode(ids)
    assert text.startswith(opening) and text.endswith(closing)
    assert "17 × 23" in text
    # Special tokens of the template are single special ids, and BOS appears once.
    bos = tokenizer.bos_token_id
    if bos is not None and text.startswith(tokenizer.bos_token):
        assert ids.count(bos) == 1 and ids[0] == bos


def test_text_is_encoded_as_the_teacher_encodes_it_and_empty_text_gets_a_starter(bank):
    mistral = bank.tokenizer("mistral-v1")
    ids = render_prompt(Prompt(text="Hello"), mistral, None)
    assert ids == mistral.encode("Hello", add_special_tokens=True)
    llama = bank.tokenizer("llama3")
    assert render_prompt(Prompt(text=""), llama, None) == [llama.bos_token_id]
    gpt2 = bank.tokenizer("gpt2")
    assert render_prompt(Prompt(text=""), gpt2, None) == [gpt2.bos_token_id]  # <|endoftext|>


def test_teacher_without_chat_template_refuses_messages(bank):
    with pytest.raises(UnprocessableError, match="no chat template"):
        render_prompt(Prompt(messages=MESSAGES), bank.tokenizer("gpt2"), None)
