"""Shared fixtures: the seven offline tokenizers and their vocabularies, loaded once per session.

Tokenizers are materialised into ``<repo>/.cache`` (``TOKENBRIDGE_CACHE`` overrides it), so a
clean clone converts them once and later runs load them in about a second each. Helpers live in
``tests.support``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.paths import CACHE_DIR
from tests.support.tokenizers import TokenizerBank


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
    from tests.support.service import tiny_teacher

    return tiny_teacher("gpt2")


@pytest.fixture(scope="module")
def loop() -> Any:
    """An event loop in a background thread, shared by a module's in-process apps."""
    from tests.support.service import LoopThread

    thread = LoopThread()
    yield thread
    thread.close()
