"""Imports flow client→shared and service→shared, never between client and service; shared
imports neither, and does no network I/O; none of the three imports the application layer
(``tokenbridge.cli``, the research code, the demos)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: The application layer above the three packages: the command line, the research code
#: (``tokenbridge.research``: tasks, fitted models, experiment, exact reverse KL), the mapping demo,
#: the offline data and the process helpers. Only it
#: composes them; none of them may lean on it.
APPLICATION = (
    "tokenbridge.cli", "tokenbridge.configargs", "tokenbridge.corpus", "tokenbridge.hub",
    "tokenbridge.mapping_demo", "tokenbridge.process", "tokenbridge.research",
    "tokenbridge.tinymodels",
)  # fmt: skip
FORBIDDEN = {
    "shared": (
        "tokenbridge.service",
        "tokenbridge.client",
        "httpx",
        "fastapi",
        "requests",
        *APPLICATION,
    ),
    "service": ("tokenbridge.client", *APPLICATION),
    "client": ("tokenbridge.service", *APPLICATION),
}


def _imports(source: str, filename: str = "<source>") -> set[str]:
    """Every module ``source`` imports; ``from a import b`` counts as ``a`` and ``a.b``, since
    ``b`` may be a module (``from tokenbridge import cli``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _offenders(folder: str, name: str, source: str) -> list[str]:
    return [
        f"{name} imports {module}"
        for module in sorted(_imports(source, name))
        if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[folder])
    ]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layers_do_not_import_across(folder):
    offenders = []
    for path in sorted((REPO / folder).rglob("*.py")):
        offenders += _offenders(folder, str(path.relative_to(REPO)), path.read_text())
    assert not offenders


@pytest.mark.parametrize(
    "line",
    [
        "from tokenbridge.configargs import load_toml",
        "from tokenbridge import cli",
        "import tokenbridge.research.experiment",
        "from tokenbridge.client.teacher import TeacherClient",
    ],
)
def test_the_check_catches_an_import_of_the_layer_above(line):
    """The service's config importing the application layer again (as it once imported
    ``tokenbridge.configargs``) is caught, however the import is spelt."""
    source = (REPO / "service" / "config.py").read_text() + "\n" + line + "\n"
    assert _offenders("service", "service/config.py", source)


def test_the_real_service_config_passes():
    source = (REPO / "service" / "config.py").read_text()
    assert not _offenders("service", "service/config.py", source)
