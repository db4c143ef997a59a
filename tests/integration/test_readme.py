"""The README's promises: every ```python block runs as-is, and every relative link and image exists.

The machinery here (block parser, small-run fixture, link checker) also serves the docs pages
(``tests/integration/test_docs.py``). A block that cannot run in a test (e.g. it needs a full training run) is
preceded, on the line above its opening fence, by the comment ``<!-- test: skip (the reason) -->``; it is reported
as skipped with that reason.

Each python block is executed on its own, in a fresh namespace (a reader copies one block, not the file), in a
temporary working directory. To keep this fast the data and the training are made small, not skipped:
``FashionMNISTDataModule`` is limited to a few hundred images, every ``Trainer`` to 2 epochs of 4 batches
(``limit_*_batches``), and the int8 latency measurement of the quantization callbacks runs eagerly instead of
compiling with Inductor (``latency="compiled"`` costs a minute per block on 2 cores); the rest runs unchanged.
"""

from __future__ import annotations

import functools
import inspect
import re
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_compress.demos import FashionMNISTDataModule
from lightning_compress.engine import measure as _int8

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
SKIP = re.compile(r"^\s*<!--\s*test:\s*skip\b\s*(?P<reason>.*?)\s*-->\s*$")
PYTHON = ("python", "py", "python3")

# What the README blocks get instead of the full data and training length.
SMALL_DATA = {"train_subset": 512, "test_subset": 256, "val_size": 256}
SMALL_TRAINER = {"limit_train_batches": 4, "limit_val_batches": 2, "limit_test_batches": 2, "limit_predict_batches": 2}
MAX_EPOCHS = 2


@dataclass(frozen=True)
class Block:
    """A fenced code block of a markdown page."""

    language: str
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    code: str
    skip: str | None = None  # the reason of a `<!-- test: skip ... -->` comment right above the fence

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order (CommonMark fences: ``` or ~~~, closed by a longer-or-equal
    run of the same character)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening["fence"], i
        body = []
        i += 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            body.append(lines[i])
            i += 1
        language = opening["info"].strip().split(" ")[0].lower() if opening["info"].strip() else ""
        marker = SKIP.match(lines[start - 1]) if start > 0 else None
        skip = (marker["reason"].strip("() ") or "marked skip") if marker else None
        blocks.append(Block(language, start + 1, i + 1, textwrap.dedent("\n".join(body)), skip))
        i += 1
    return blocks


def python_blocks(page: Path = README) -> list[Block]:
    return [b for b in code_blocks(page.read_text()) if b.language in PYTHON]


def run_block(block: Block, page: Path) -> None:
    """Execute one python block in a fresh namespace; a failure names the page, the line and the block."""
    if block.skip:
        pytest.skip(f"{page.name}:{block.line}: {block.skip}")
    name = page.relative_to(ROOT).as_posix()
    # Padded with blank lines so that line numbers in tracebacks are the page's own.
    code = compile("\n" * block.line + block.code, str(page), "exec")
    try:
        exec(code, {"__name__": "__docs__"})
    except Exception as error:
        # Name the block and show the failing line of the page, not just this test's frame.
        raise AssertionError(
            f"The ```python block at {name} line {block.line} (starting `{block.first_line}`) failed:\n"
            f"{''.join(traceback.format_exception(error)[-6:])}"
        ) from error


def test_readme_has_python_blocks():
    # Guards the parser: if it found nothing, the block tests below would silently run nothing.
    assert len(python_blocks()) >= 1


@pytest.fixture
def small_runs(monkeypatch, tmp_path):
    """Shrink the data module and every Trainer, in a temporary working directory."""
    monkeypatch.chdir(tmp_path)

    data_init = FashionMNISTDataModule.__init__
    data_signature = inspect.signature(data_init)

    @functools.wraps(data_init)  # `save_hyperparameters` reads the signature of `__init__`
    def small_data(self, *args, **kwargs):
        bound = data_signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, limit in SMALL_DATA.items():
            value = bound.arguments[name]
            bound.arguments[name] = limit if value is None else min(value, limit)
        data_init(*bound.args, **bound.kwargs)

    trainer_init = pl.Trainer.__init__

    @functools.wraps(trainer_init)
    def small_trainer(self, *args, **kwargs):
        kwargs.update(SMALL_TRAINER)
        max_epochs = kwargs.get("max_epochs")
        kwargs["max_epochs"] = MAX_EPOCHS if max_epochs in (None, -1) else min(max_epochs, MAX_EPOCHS)
        kwargs.setdefault("enable_progress_bar", False)
        trainer_init(self, *args, **kwargs)

    latency_report = _int8.latency_report

    def eager_latency(float_model, int8, args, kwargs, batch_sizes, mode):
        return latency_report(float_model, int8, args, kwargs, batch_sizes, "eager")

    monkeypatch.setattr(FashionMNISTDataModule, "__init__", small_data)
    monkeypatch.setattr(pl.Trainer, "__init__", small_trainer)
    monkeypatch.setattr(_int8, "latency_report", eager_latency)


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: f"README.md:{b.line}")
def test_python_block_runs(block, small_runs):
    run_block(block, README)


def test_skip_marker_is_parsed():
    text = "<!-- test: skip (a full training run) -->\n```python\nfit()\n```\n\n```python\nok()\n```\n"
    assert [b.skip for b in code_blocks(text)] == ["a full training run", None]


# --------------------------------------------------------------------------------------------------------------------
# Links and images
# --------------------------------------------------------------------------------------------------------------------
MARKDOWN_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)=[\"'](?P<target>[^\"']+)[\"']", re.IGNORECASE)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _prose(text: str) -> str:
    """A markdown text without its fenced code blocks and inline code (links there are examples, not links)."""
    lines = text.splitlines()
    for block in code_blocks(text):
        for index in range(block.line - 1, min(block.end, len(lines))):
            lines[index] = ""
    return INLINE_CODE.sub("", "\n".join(lines))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _targets(text: str) -> list[str]:
    prose = _prose(text)
    return [m["target"] for pattern in (MARKDOWN_LINK, HTML_LINK) for m in pattern.finditer(prose)]


def test_link_parser_finds_links():
    sample = '[a](docs/x.md) ![b](docs/y.png "t") <img src="docs/z.png" width=600> `[no](nope.md)` [w](https://e.org)'
    assert _targets(sample) == ["docs/x.md", "docs/y.png", "https://e.org", "docs/z.png"]


def headings(text: str) -> list[str]:
    """The ATX headings of a markdown text (outside code)."""
    return [m[1] for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(text), re.MULTILINE)]


def broken_links(page: Path, anchor: Callable[[str], str] = _anchor) -> list[str]:
    """Relative links and images of ``page`` that do not resolve: a missing file, a file outside the repository, or
    a ``#fragment`` that is no heading of the page (or of the markdown page linked), with ``anchor`` giving a
    heading's anchor (GitHub's by default)."""
    text = page.read_text()
    broken = []
    for target in _targets(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if path and not linked.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not linked.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in {anchor(h) for h in headings(linked.read_text())}:
            broken.append(f"{target} (no such heading)")
    return broken


def test_relative_links_and_images_exist():
    broken = broken_links(README)
    assert not broken, f"README.md has broken relative links: {broken}"
