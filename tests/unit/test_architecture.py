"""Imports flow client→shared and service→shared, never between client and service; shared
imports neither, and does no network I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "shared": ("tokenbridge.service", "tokenbridge.client", "httpx", "fastapi", "requests"),
    "service": ("tokenbridge.client",),
    "client": ("tokenbridge.service",),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layers_do_not_import_across(folder):
    offenders = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for name in _imports(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[folder]):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders
