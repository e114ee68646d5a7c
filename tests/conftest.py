"""Shared fixtures: the seven offline tokenizers and their vocabularies, loaded once per session.

Tokenizers are materialised into ``<repo>/.cache`` (``TOKENBRIDGE_CACHE`` overrides it), so a
clean clone converts them once and later runs load them in about a second each. Helpers live in
``tests.support``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.paths import CACHE_DIR
from tests.support.tokenizers import TokenizerBank


@pytest.fixture(scope="session")
def bank() -> TokenizerBank:
    """The session's tokenizer bank."""
    return TokenizerBank(CACHE_DIR)


#: The kinds of test (markers); a module marked with none of them is a ``unit`` test.
KINDS = ("unit", "integration", "e2e", "fault", "fuzz", "deploy", "vllm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that names no kind as ``unit``. Under ``make test``
    (TOKENBRIDGE_REQUIRE_VLLM=1) a missing vLLM is an error, not a skip."""
    import importlib.util

    for item in items:
        if not any(item.get_closest_marker(kind) for kind in KINDS):
            item.add_marker(pytest.mark.unit)

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


#: Audit events of a new process (``subprocess`` and ``multiprocessing`` both raise one).
_SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn"})
_spawned: list[str] = []
#: ``make test-fast`` sets it: a test that starts a process without the ``process`` marker fails,
#: so the marker that ``-m "not process"`` selects on stays true.
_CHECK_PROCESS_MARKS = bool(os.environ.get("TOKENBRIDGE_CHECK_PROCESS_MARKS"))
if _CHECK_PROCESS_MARKS:

    def _audit(event: str, args: tuple[Any, ...]) -> None:
        if event in _SPAWN_EVENTS:
            _spawned.append(f"{event} {str(args[:2])[:200]}")

    sys.addaudithook(_audit)  # an audit hook cannot be removed: installed only when asked for


@pytest.fixture(autouse=True)
def _process_marker_is_true(request: pytest.FixtureRequest) -> Any:
    """With TOKENBRIDGE_CHECK_PROCESS_MARKS set, fail a test that started a process (in its own
    set-up, its body, or a wider fixture set up for it) without the ``process`` marker."""
    yield
    if not _CHECK_PROCESS_MARKS or not _spawned:
        return
    started, _spawned[:] = list(_spawned), []
    marked = request.node.get_closest_marker("process") or request.node.get_closest_marker("vllm")
    if not marked:
        pytest.fail(f"started a process without @pytest.mark.process: {started[:3]}")


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
