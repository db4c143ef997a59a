"""A griffe extension for the docs build: the package's docstrings use two bits of reST markup inside Google style.

* Sphinx roles (``:func:`prepare_qat```, ``:mod:`~lightning_compress.engine.convert```) become inline code
  (`prepare_qat`, `convert`), as Sphinx would display them;
* ``Example::`` followed by an indented block becomes a bold title and a fenced ``python`` block;
* a Google ``Example:`` section becomes ``Examples:``, which griffe parses as doctest code (it takes the singular
  title for an admonition of markdown text, where doctest output such as ``[(True, False)]`` reads as a link).

Only the rendered text changes; the package source is left as it is. Loaded by ``mkdocs.yml``
(``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|data|exc|obj|const|ref|term):`(?P<tilde>~?)(?P<target>[^`]+)`")
LITERAL_BLOCK = re.compile(
    r"^(?P<indent>[ ]*)(?P<title>[A-Z]\w*(?: \w+)*)::[ ]*\n(?P<body>(?:[ ]*\n|(?P=indent)[ ]+\S.*(?:\n|$))+)",
    re.MULTILINE,
)
EXAMPLE_SECTION = re.compile(r"^(?P<indent>[ ]*)Example:[ ]*$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    target = match["target"]
    if match["tilde"]:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _literal_block(match: re.Match[str]) -> str:
    indent, title = match["indent"], match["title"]
    body = textwrap.dedent(match["body"]).strip("\n")
    code = "\n".join(f"{indent}{line}" if line else "" for line in body.splitlines())
    return f"{indent}**{title}**\n\n{indent}```python\n{code}\n{indent}```\n\n"


def rewrite(text: str) -> str:
    """The docstring ``text`` with Sphinx roles as inline code, ``Title::`` literal blocks as fenced code and
    ``Example:`` sections as ``Examples:``."""
    text = LITERAL_BLOCK.sub(_literal_block, ROLE.sub(_role, text))
    return EXAMPLE_SECTION.sub(r"\g<indent>Examples:", text)


class RstMarkup(griffe.Extension):
    """Rewrite reST roles and literal blocks of every docstring before mkdocstrings parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
