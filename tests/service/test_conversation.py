"""Reading a conversation back out of a student's ids in its own chat template
(``service/conversation.py``), on the real tokenizers that ship a template."""

from __future__ import annotations

import pytest

from tokenbridge.service.conversation import TemplateReader
from tokenbridge.shared.align import encode_continuation

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5."},
    {"role": "user", "content": "And 4+4?"},
]
TEMPLATED = ["qwen2", "qwen3.6", "llama3", "mistral-v1", "mistral-v3", "tekken"]


def _rendered(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("name", TEMPLATED)
def test_a_rendered_conversation_reads_back_exactly_or_not_at_all(bank, name):
    tokenizer, vocab = bank.tokenizer(name), bank.vocab(name)
    reader = TemplateReader(tokenizer, vocab)
    for messages in (MESSAGES, MESSAGES[1:2], MESSAGES[1:]):
        head = _rendered(tokenizer, messages)
        reply = [*encode_continuation(tokenizer, vocab, "It is 8."), vocab.roles["eot"]]
        read = reader.read(head + reply)
        if read is None:
            # Only a template whose rendering cannot be told apart from its contents may refuse
            # (mistral-v1 today); whatever is read must be exactly right.
            assert name == "mistral-v1", messages
            continue
        assert read.messages == messages
        assert read.reply_start == len(head)


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_what_is_not_a_whole_conversation_is_not_read(bank, name):
    tokenizer, vocab = bank.tokenizer(name), bank.vocab(name)
    reader = TemplateReader(tokenizer, vocab)
    head = _rendered(tokenizer, MESSAGES)
    assert reader.read(head[: len(head) // 2]) is None  # cut inside the template
    assert reader.read(encode_continuation(tokenizer, vocab, "Plain text.")) is None


def test_no_content_holds_a_marker_of_the_template(bank):
    """A shape with fewer turns would match by letting one content swallow later turns' markers;
    the reading keeps the contents free of the student's special tokens."""
    tokenizer, vocab = bank.tokenizer("qwen2"), bank.vocab("qwen2")
    reader = TemplateReader(tokenizer, vocab)
    read = reader.read(_rendered(tokenizer, MESSAGES))
    assert read is not None and len(read.messages) == len(MESSAGES)
    assert all("<|im_" not in message["content"] for message in read.messages)


@pytest.mark.parametrize("name", ["qwen2", "llama3", "tekken"])
def test_a_conversation_longer_than_the_shapes_is_refused_without_backtracking(bank, name):
    """Forty turns: no shape (at most eight turns) can hold them, since a content never spans a
    piece of the template; the match fails at once instead of trying every split of the turns."""
    tokenizer, vocab = bank.tokenizer(name), bank.vocab(name)
    reader = TemplateReader(tokenizer, vocab)
    long = [
        {"role": role, "content": f"Turn {index}: {role} says {index * 7}."}
        for index in range(79)
        for role in (("user",) if index % 2 == 0 else ("assistant",))
    ]
    assert reader.read(_rendered(tokenizer, long)) is None
    assert reader.read(_rendered(tokenizer, long[-3:])) is not None


def test_a_template_that_does_not_read_back_is_switched_off(bank):
    reader = TemplateReader(bank.tokenizer("mistral-v1"), bank.vocab("mistral-v1"))
    assert reader.shapes == []
