"""The offline tokenizers the tests use, the cross-family pairs, and ``TokenizerBank``, which loads
them and their vocabularies and mappers once per session."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenbridge.hub import OFFLINE_TOKENIZERS, load_tokenizer
from tokenbridge.shared.cache import TableCache
from tokenbridge.shared.mapping import PairMapper
from tokenbridge.shared.vocab import Vocab

ALL_TOKENIZERS = tuple(OFFLINE_TOKENIZERS)
#: (teacher, student) pairs across families, SentencePiece and byte-level in both directions.
CROSS_PAIRS = (
    ("qwen3.6", "llama3"),
    ("gpt2", "mistral-v1"),
    ("mistral-v1", "gpt2"),
    ("tekken", "qwen2"),
    ("mistral-v3", "tekken"),
    ("llama3", "mistral-v3"),
    ("qwen2", "gpt2"),
)


@dataclass
class TokenizerBank:
    """Lazily loaded tokenizers, vocabularies and pair mappers, shared by the whole session."""

    cache_dir: Path
    _tokenizers: dict[str, Any] = field(default_factory=dict)
    _vocabs: dict[str, Vocab] = field(default_factory=dict)
    _mappers: dict[tuple[str, str], PairMapper] = field(default_factory=dict)

    @property
    def tables(self) -> TableCache:
        return TableCache(self.cache_dir / "tables")

    def tokenizer(self, name: str) -> Any:
        if name not in self._tokenizers:
            self._tokenizers[name] = load_tokenizer(name, self.cache_dir)
        return self._tokenizers[name]

    def vocab(self, name: str) -> Vocab:
        if name not in self._vocabs:
            self._vocabs[name] = self.tables.vocab(self.tokenizer(name), name)
        return self._vocabs[name]

    def mapper(self, teacher: str, student: str) -> PairMapper:
        key = (teacher, student)
        if key not in self._mappers:
            t, s = self.vocab(teacher), self.vocab(student)
            self._mappers[key] = PairMapper(t, s, self.tables.pair_table(t, s))
        return self._mappers[key]
