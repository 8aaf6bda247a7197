"""The README's Python snippets: every block compiles and uses no name that no block defines; the
blocks marked `<!-- runs in tests/test_readme.py -->` run as written (from the repository root's
files, in a scratch folder)."""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MARK = "<!-- runs in tests/test_readme.py -->"
BLOCKS = [(m.group(1) is not None, m.group(2)) for m in re.finditer(r"(" + re.escape(MARK) + r"\n)?```python\n(.*?)```", README, re.S)]


def _bound(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def test_the_readme_has_python_blocks_and_one_runs() -> None:
    assert len(BLOCKS) >= 4 and sum(runs for runs, _ in BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_block_compiles_and_uses_only_defined_names(index: int) -> None:
    trees = [ast.parse(code) for _, code in BLOCKS]
    known = set(dir(builtins)).union(*(_bound(t) for t in trees))
    used = {n.id for n in ast.walk(trees[index]) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert not used - known, f"block {index} uses names no block defines: {sorted(used - known)}"


@pytest.mark.parametrize("index", [i for i, (runs, _) in enumerate(BLOCKS) if runs])
def test_marked_blocks_run_as_written(index: int, tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    previous = Path.cwd()
    os.chdir(tmp_path)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(BLOCKS[index][1], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(previous)
    lines = printed.getvalue().splitlines()
    assert len(lines) == len(list((ROOT / "examples" / "digits" / "images").iterdir()))
    assert all(("'ID'" in line or "'OOD'" in line) for line in lines)
