"""The docs site's promises: every ```python block of every page under docs/ runs, its links resolve, and
``mkdocs build --strict`` succeeds.

The blocks run exactly as the README's do (``test_readme.py``: a fresh namespace, a temporary working directory,
small data and short Trainers); a block preceded by ``<!-- test: skip (reason) -->`` is skipped. Links are checked
the way MkDocs resolves them: relative to the page, inside the repository, with ``#fragments`` that are headings of
the linked page (MkDocs' ``toc`` anchors).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme import (
    ROOT,
    Block,
    broken_links,
    python_blocks,
    run_block,
    small_runs,  # noqa: F401 (a fixture, used through usefixtures)
)

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def _docs_anchor(heading: str) -> str:
    """MkDocs' anchor of a heading (Python-Markdown's ``toc`` slugify on the heading's text)."""
    from markdown.extensions.toc import slugify

    return slugify(re.sub(r"`|\*\*|__", "", heading.strip()), "-")


def _blocks() -> list[tuple[Path, Block]]:
    return [(page, block) for page in PAGES for block in python_blocks(page)]


def test_docs_pages_have_python_blocks():
    # Guards the parser and the glob: if they found nothing, the block tests below would silently run nothing.
    assert len(PAGES) >= 8
    assert len(_blocks()) >= 4


@pytest.mark.parametrize(
    ("page", "block"), _blocks(), ids=[f"{p.relative_to(DOCS).as_posix()}:{b.line}" for p, b in _blocks()]
)
@pytest.mark.usefixtures("small_runs")
def test_python_block_runs(page, block):
    run_block(block, page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_relative_links_resolve(page):
    broken = broken_links(page, anchor=_docs_anchor)
    assert not broken, f"{page.relative_to(ROOT)} has broken relative links: {broken}"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.relative_to(DOCS).as_posix() for p in PAGES if f": {p.relative_to(DOCS).as_posix()}" not in nav]
    assert not missing, f"docs pages missing from the nav of mkdocs.yml: {missing}"


def test_mkdocs_build_strict(tmp_path):
    # About 2-3 s: the API reference is generated from the docstrings, so a docstring that griffe cannot parse, a
    # broken link or an anchor that no longer exists fails here.
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: `pip install -e '.[docs]'` (`bash tests/run.sh` installs it)")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "index.html").exists()
