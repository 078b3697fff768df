"""Griffe extension for the API reference: Sphinx markup in the docstrings, rendered as Markdown.

The docstrings use Google sections with Sphinx roles and math (what IDEs and Sphinx show). For
the MkDocs site, ``:class:`~torcheggroll.X``` becomes a link when ``X`` has an entry in
docs/api.md, and inline code otherwise; ``:math:`...``` and ``.. math::`` blocks become
arithmatex math. The docstrings themselves are not changed.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import griffe

API = Path(__file__).resolve().parent / "api.md"
DOCUMENTED = set(
    re.findall(r"^::: (torcheggroll\.\S+)", API.read_text(encoding="utf-8"), flags=re.M)
)
ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|exc|data|obj):`(~?)([^`<]+)`")
MATH_ROLE = re.compile(r":math:`([^`]+)`")
MATH_BLOCK = re.compile(r"^([ \t]*)\.\. math::[ \t]*\n((?:\1[ \t]+\S.*\n?|[ \t]*\n)+)", flags=re.M)


def _role(match: re.Match[str]) -> str:
    kind, tilde, target = match.groups()
    target = target.strip()
    shown = target.rsplit(".", 1)[-1] if tilde else target
    code = f"`{shown}{'()' if kind in ('func', 'meth') else ''}`"
    return f"[{code}][{target}]" if target in DOCUMENTED else code


def _math_block(match: re.Match[str]) -> str:
    indent, body = match.group(1), textwrap.dedent(match.group(2)).strip("\n")
    lines = [indent + "$$", *(indent + line for line in body.splitlines()), indent + "$$", ""]
    return "\n".join(lines) + "\n"


def sphinx_to_markdown(text: str) -> str:
    text = MATH_BLOCK.sub(_math_block, text)
    text = MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return ROLE.sub(_role, text)


class SphinxMarkup(griffe.Extension):
    """Rewrite every loaded object's docstring for Markdown rendering."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = sphinx_to_markdown(obj.docstring.value)
