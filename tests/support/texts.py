"""Adversarial text for tokenizer tests: the cases where byte-exactness usually breaks."""

from __future__ import annotations

from hypothesis import strategies as st

PIECES = [
    "Hello",
    " world",
    "the",
    " there",
    "  ",
    "   ",
    "\t",
    "\t\t",
    "\n",
    "\r\n",
    "\n\n",
    " \n",
    "1234567890",
    "3.14159",
    "007",
    " 42",
    "naïve",
    "e\u0301",
    "a\u0308\u0301",
    "\u0301",
    "日本語",
    "中文字符",
    "한국어",
    "😀",
    "🎉",
    "👩\u200d💻",
    "🇫🇷",
    "🏳️\u200d🌈",
    "x²",
    "€",
    "—",
    "<|endoftext|>",
    "<|im_end|>",
    "</s>",
    "[INST]",
    "<0x0A>",
    "▁",
    "Ġ",
    "ĉ",
    "\u00a0",
    "\u200b",
    "'s",
    "'ll",
    "CamelCase",
    "snake_case",
    "http://example.com/a?b=c",
    '{"k": [1, 2]}',
]

CHARS = st.characters(
    codec="utf-8",
    exclude_categories=("Cs",),  # lone surrogates cannot be encoded to UTF-8
)

#: Text built from adversarial pieces and arbitrary characters, often starting with spaces.
adversarial_text = st.lists(
    st.one_of(st.sampled_from(PIECES), st.text(CHARS, min_size=1, max_size=6)),
    min_size=1,
    max_size=12,
).map("".join)

FIXED_SAMPLES = [
    "Hello world",
    " leading space",
    "  two leading spaces\n\tand a tab",
    "digits 12345678901234567890 and 3.14",
    "emoji 😀🎉👩\u200d💻 flags 🇫🇷",
    "CJK 日本語のテキスト 中文",
    "combining e\u0301 a\u0308",
    "windows\r\nline\r\nendings",
    "runs     of      spaces",
    "special-looking <|im_end|> </s> [INST] text",
]
