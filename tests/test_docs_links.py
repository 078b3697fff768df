"""The documentation stands on its own: relative links resolve, and nothing points outside the
repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = sorted(
    [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "examples").rglob("*.md"),
        *(ROOT / "benchmarks").rglob("*.md"),
    ]
)
SOURCES = sorted(
    p
    for d in ("torcheggroll", "examples", "benchmarks", "tests", ".ci")
    for p in (ROOT / d).rglob("*")
    if p.suffix in {".py", ".sh", ".md", ""} and p.is_file()
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{doc.name}: link to missing {target}"
        assert ROOT in dest.parents or dest == ROOT, f"{doc.name}: {target} leaves the repository"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{doc.name}: no heading for #{anchor} in {dest.name}"


@pytest.mark.parametrize("path", MARKDOWN + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pointers_outside_the_repository(path):
    if path == Path(__file__).resolve():
        return
    text = path.read_text(errors="replace")
    assert "ALGORITHM.md" not in text
    assert "../shared" not in text and "/work/shared" not in text
    assert not re.search(r"\b[Ii]ssues? #?\d+", text), "cites an issue number"
