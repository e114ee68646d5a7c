"""Byte-exact vocabularies of the seven real tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from tokenbridge.shared.align import encode_continuation
from tokenbridge.shared.errors import TokenizerUnsupportedError
from tokenbridge.shared.vocab import Vocab, build_vocab, rolling_prefix_hashes

from tests.support.texts import FIXED_SAMPLES, adversarial_text
from tests.support.tokenizers import ALL_TOKENIZERS

EXPECTED_SIZES = {
    "gpt2": 50_257,
    "qwen2": 151_646,
    "qwen3.6": 248_077,
    "llama3": 128_256,
    "mistral-v1": 32_000,
    "mistral-v3": 32_768,
    "tekken": 131_072,
}


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_vocabulary_size_matches_the_family(bank, name):
    assert bank.vocab(name).size == EXPECTED_SIZES[name]


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_every_id_round_trips_to_the_tokenizers_own_decoding(bank, name):
    """For every id, our bytes decode to exactly what the tokenizer decodes that id to."""
    tokenizer, vocab = bank.tokenizer(name), bank.vocab(name)
    decoded = tokenizer.batch_decode([[i] for i in range(vocab.size)], skip_special_tokens=False)
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    mismatches = []
    for token_id, (text, data) in enumerate(zip(decoded, vocab.token_bytes, strict=True)):
        if vocab.special[token_id]:
            assert data == b"" and added[token_id].special
            continue
        expected = data.decode("utf-8", errors="replace")
        # SentencePiece's decoder strips the space of a leading ▁ (the dummy prefix).
        if vocab.scheme == "sentencepiece" and expected.startswith(" ") and text == expected[1:]:
            continue
        if text != expected:
            mismatches.append((token_id, text, expected))
    assert not mismatches[:5]
    assert len(vocab.token_bytes) == vocab.size


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_byte_strings_map_back_to_a_canonical_id(bank, name):
    vocab = bank.vocab(name)
    for token_id, data in enumerate(vocab.token_bytes):
        if data:
            canonical = vocab.id_of_bytes[data]
            assert vocab.token_bytes[canonical] == data
            assert vocab.canonical_overrides.get(token_id, token_id) == canonical


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
@pytest.mark.parametrize("text", FIXED_SAMPLES)
def test_continuation_spells_the_text_exactly(bank, name, text):
    ids = encode_continuation(bank.tokenizer(name), bank.vocab(name), text)
    assert bank.vocab(name).bytes_of(ids) == text.encode()


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_adversarial_text_concatenates_to_its_bytes(bank, name):
    tokenizer, vocab = bank.tokenizer(name), bank.vocab(name)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(adversarial_text)
    def check(text):
        ids = encode_continuation(tokenizer, vocab, text)
        assert vocab.bytes_of(ids) == text.encode()
        if vocab.scheme == "sentencepiece" and "▁" in text:
            return  # SentencePiece itself reads a literal ▁ as a space; only ours is exact
        # The tokenizer's plain encoding spells the text too, plus at most the dummy prefix.
        plain = vocab.bytes_of(
            tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        )
        assert plain in (text.encode(), b" " + text.encode())

    check()


def test_sentencepiece_dummy_prefix_is_dropped_for_continuations(bank):
    tokenizer, vocab = bank.tokenizer("mistral-v1"), bank.vocab("mistral-v1")
    plain = tokenizer.encode("Hello", add_special_tokens=False)
    assert vocab.bytes_of(plain) == b" Hello"  # the dummy prefix a continuation must not carry
    assert vocab.bytes_of(encode_continuation(tokenizer, vocab, "Hello")) == b"Hello"


def test_literal_metaspace_character_is_spelled_with_byte_pieces(bank):
    tokenizer, vocab = bank.tokenizer("mistral-v1"), bank.vocab("mistral-v1")
    text = "a▁b ▁"
    ids = encode_continuation(tokenizer, vocab, text)
    assert vocab.bytes_of(ids) == text.encode()
    assert tokenizer.convert_tokens_to_ids("<0xE2>") in ids


def test_byte_fallback_pieces_are_single_bytes(bank):
    vocab = bank.vocab("mistral-v1")
    tokenizer = bank.tokenizer("mistral-v1")
    byte_id = tokenizer.convert_tokens_to_ids("<0x0A>")
    assert vocab.token_bytes[byte_id] == b"\n"
    emoji_ids = encode_continuation(tokenizer, vocab, "🫠")
    assert len(emoji_ids) == 4 and vocab.bytes_of(emoji_ids) == "🫠".encode()


@pytest.mark.parametrize(
    ("name", "role", "content"),
    [
        ("llama3", "eot", "<|eot_id|>"),
        ("llama3", "bos", "<|begin_of_text|>"),
        ("qwen3.6", "eot", "<|im_end|>"),
        ("qwen2", "eos", "<|im_end|>"),
        ("gpt2", "eos", "<|endoftext|>"),
        ("mistral-v1", "eot", "</s>"),
        ("tekken", "bos", "<s>"),
    ],
)
def test_roles_come_from_the_tokenizer(bank, name, role, content):
    tokenizer, vocab = bank.tokenizer(name), bank.vocab(name)
    assert vocab.roles[role] == tokenizer.convert_tokens_to_ids(content)
    assert vocab.special[vocab.roles[role]]


def test_content_hash_is_stable_and_distinguishes_vocabularies(bank):
    again = build_vocab(bank.tokenizer("gpt2"), "gpt2")
    assert again.content_hash == bank.vocab("gpt2").content_hash
    hashes = {bank.vocab(name).content_hash for name in ALL_TOKENIZERS}
    assert len(hashes) == len(ALL_TOKENIZERS)


def test_vocab_survives_array_round_trip(bank):
    vocab = bank.vocab("mistral-v3")
    copy = Vocab.from_arrays(vocab.to_arrays())
    assert copy.content_hash == vocab.content_hash
    assert copy.token_bytes == vocab.token_bytes
    assert dict(copy.roles) == dict(vocab.roles)
    assert dict(copy.canonical_overrides) == dict(vocab.canonical_overrides)


def test_prefix_hashes_agree_exactly_when_prefixes_agree():
    tokens = [b"abc", b"abd", b"ab", b"x", b""]
    starts = np.cumsum([0] + [len(t) for t in tokens])
    hashes = rolling_prefix_hashes(np.frombuffer(b"".join(tokens), dtype=np.uint8), starts)

    def h(i, length):
        return hashes[starts[i] + length - 1]

    assert h(0, 2) == h(1, 2) == h(2, 2)
    assert h(0, 3) != h(1, 3)
    assert h(0, 1) != h(3, 1)


def test_wordpiece_tokenizer_is_refused_with_a_reason():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers import decoders as tk_decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "##lo": 2, "hel": 3}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = tk_decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(TokenizerUnsupportedError, match="WordPiece"):
        build_vocab(tokenizer)
