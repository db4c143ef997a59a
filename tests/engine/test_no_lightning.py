"""The engine is Lightning-free: no module under ``lightning_compress/engine`` imports ``lightning``."""

import ast
from pathlib import Path

import lightning_compress.engine

ENGINE = Path(lightning_compress.engine.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_imports_no_lightning():
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) >= 8
    offenders = {
        str(path.relative_to(ENGINE)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] in ("lightning", "pytorch_lightning")
        )
        for path in files
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}
    # engine modules import each other and torch, never the callbacks
    assert not any("lightning_compress.callbacks" in _imported_modules(path) for path in files)
