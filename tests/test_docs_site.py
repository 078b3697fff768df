"""The documentation site: every public name in the API reference, every page in the navigation,
the docstring examples and the getting-started code run.

These checks read the sources and need no MkDocs; CI also builds the site with
``mkdocs build --strict`` (``.ci/run``), which fails on a broken link, a missing page or a
docstring the reference cannot render.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import torcheggroll

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api.md"
MKDOCS = ROOT / "mkdocs.yml"


def _documented() -> list[str]:
    return re.findall(r"^::: torcheggroll\.(\S+)\s*$", API.read_text(), flags=re.M)


def _nav_pages() -> list[str]:
    text = MKDOCS.read_text()
    nav = text.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]  # up to the next top-level key
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", nav, flags=re.M)


def test_api_page_documents_every_public_name() -> None:
    documented = _documented()
    missing = sorted(set(torcheggroll.__all__) - set(documented))
    assert not missing, f"docs/api.md has no '::: torcheggroll.NAME' entry for {missing}"
    unknown = sorted(set(documented) - set(torcheggroll.__all__))
    assert not unknown, f"docs/api.md documents names that torcheggroll does not export: {unknown}"
    assert len(documented) == len(set(documented)), "a name appears twice in docs/api.md"


@pytest.mark.parametrize("name", [n for n in torcheggroll.__all__ if n != "__version__"])
def test_public_names_have_their_own_docstring(name: str) -> None:
    obj = getattr(torcheggroll, name)
    # A class's own docstring, not one inherited from a base class (RuntimeWarning, say).
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc and doc.strip(), f"torcheggroll.{name} has no docstring for the API reference"


def test_nav_lists_every_page() -> None:
    nav = _nav_pages()
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    missing = sorted(set(pages) - set(nav))
    assert not missing, f"mkdocs.yml's nav does not list {missing}"
    assert len(nav) == len(set(nav)), "a page appears twice in mkdocs.yml's nav"


def test_ci_builds_the_site_strictly() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip install .*\.\[[^\]]*\bdocs\b", ci), (
        ".ci/run does not install the docs extra"
    )
    assert "mkdocs build --strict" in ci


MODULES = sorted(m.name for m in pkgutil.walk_packages(torcheggroll.__path__, "torcheggroll."))


@pytest.mark.parametrize("name", ["torcheggroll", *MODULES])
def test_docstring_examples(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional dependency (Triton) of a kernel module
        pytest.skip(f"{name} does not import here: {exc}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    for test in finder.find(module, name):
        if test.examples:
            torch.manual_seed(0)
            runner.run(test, out=out.write)
    assert runner.failures == 0, out.getvalue()


def test_docstring_examples_exist() -> None:
    # The parametrized test above would pass vacuously if the finder stopped finding examples.
    count = sum(
        len(t.examples)
        for m in ("torcheggroll.optimizer", "torcheggroll.compat")
        for t in doctest.DocTestFinder().find(importlib.import_module(m))
    )
    assert count > 0


def test_getting_started_code_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(
        r"```python\n(.*?)```", (DOCS / "getting-started.md").read_text(), flags=re.S
    )
    assert blocks
    monkeypatch.chdir(tmp_path)  # the checkpoint block writes ckpt.pt
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/getting-started.md", "exec"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    with torch.no_grad():
        final = float((model(x) - y).pow(2).mean())
    assert final < 0.3 * float(y.var()), final  # the first loop learns
