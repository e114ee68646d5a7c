"""Shared fixtures: the seven offline tokenizers and their vocabularies, loaded once per session.

Tokenizers are materialised into ``<repo>/.cache`` (``TOKENBRIDGE_CACHE`` overrides it), so a
clean clone converts them once and later runs load them in about a second each.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tokenbridge.hub import OFFLINE_TOKENIZERS, load_tokenizer
from tokenbridge.shared.cache import TableCache
from tokenbridge.shared.mapping import PairMapper
from tokenbridge.shared.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
# Test helpers (synthetic, texts) import by name; bench modules as ``bench.<name>``.
for _path in (Path(__file__).resolve().parent, REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
CACHE_DIR = Path(os.environ.get("TOKENBRIDGE_CACHE", REPO / ".cache"))
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


@pytest.fixture(scope="session")
def bank() -> TokenizerBank:
    """The session's tokenizer bank."""
    return TokenizerBank(CACHE_DIR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``make test`` (TOKENBRIDGE_REQUIRE_VLLM=1) a missing vLLM is an error, not a skip."""
    import importlib.util

    wanted = any(item.get_closest_marker("vllm") for item in items)
    if (
        wanted
        and os.environ.get("TOKENBRIDGE_REQUIRE_VLLM")
        and importlib.util.find_spec("vllm") is None
    ):
        raise pytest.UsageError(
            "vLLM tests were selected with TOKENBRIDGE_REQUIRE_VLLM=1 but vllm is not importable: "
            "run them with .venv-vllm/bin/python (`make test-vllm`)"
        )


@pytest.fixture(scope="module")
def teacher_dir() -> Path:
    """A tiny random-init GPT-2 teacher over the real GPT-2 tokenizer (built once, cached)."""
    from service_support import tiny_teacher

    return tiny_teacher("gpt2")


@pytest.fixture(scope="module")
def loop() -> Any:
    """An event loop in a background thread, shared by a module's in-process apps."""
    from service_support import LoopThread

    thread = LoopThread()
    yield thread
    thread.close()
