"""MkDocs hook: serve the repository files that the pages link to from outside docs/.

The pages link plots and notes where they live in the repository (``../benchmarks/results/x.png``,
``../examples/...``), so the links work on a code host and in a checkout. MkDocs only knows the
files under ``docs/``; this hook adds every such target that exists, under ``repo/`` in the site,
keeping the link as written. A link to a file that does not exist is left alone, so
``mkdocs build --strict`` still fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def on_files(files: Files, config) -> Files:  # config: MkDocsConfig
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    seen: set[str] = set()
    for page in sorted(docs.rglob("*.md")):
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        here = page.parent.relative_to(docs).as_posix()
        for match in LINK.finditer(text):
            target = (match.group(1) or match.group(2)).split("#", 1)[0]
            if not target or re.match(r"[a-z]+:", target):
                continue
            src_uri = posixpath.normpath(posixpath.join(here, target))
            if not src_uri.startswith("../") or src_uri in seen:
                continue
            path = (docs / src_uri).resolve()
            if root not in path.parents or not path.is_file():
                continue  # outside the repository, or missing: MkDocs reports the link
            seen.add(src_uri)
            rel = path.relative_to(root).as_posix()
            file = File.generated(
                config, src_uri, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV
            )
            file.dest_uri = "repo/" + (rel[:-3] + ".html" if rel.endswith(".md") else rel)
            files.append(file)
    return files
