"""Every relative link in the README and in ``docs/`` resolves inside the repository: the file
exists, and a ``#fragment`` names a heading of the Markdown file it points to (GitHub's anchors:
lower case, punctuation dropped, spaces to hyphens)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.paths import REPO as ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _anchors(markdown: Path) -> set[str]:
    text = FENCE.sub("", markdown.read_text())
    anchors = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            anchors.add(title.replace(" ", "-"))
    return anchors


def _links(markdown: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", markdown.read_text()))


def test_the_anchor_rule_reads_headings_as_github_does(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## The demo: `make demo`\n\n```\n# not a heading\n```\n")
    assert _anchors(page) == {"top", "the-demo-make-demo"}


def test_the_readme_is_a_landing_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("markdown", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(markdown):
    broken = []
    for target in _links(markdown):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: outside the repository
        path, _, fragment = target.partition("#")
        resolved = (markdown.parent / path).resolve() if path else markdown
        inside = resolved.exists() and ROOT.resolve() in [resolved, *resolved.parents]
        anchored = not fragment or resolved.suffix != ".md" or fragment in _anchors(resolved)
        if not (inside and anchored):
            broken.append(target)
    assert not broken, f"{markdown.name}: links that do not resolve: {broken}"
