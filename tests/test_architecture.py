"""The house keeps its shape: imports point down the layers of README's "Layout", no module imports
another in a circle, and no module outgrows 400 lines. Read from the source, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "clipn_cli"
MAX_LINES = 400
# Higher imports lower; a folder never imports a peer of its own rank (README "Layout").
RANKS = {
    "cli": 7,
    "scale": 6, "serve": 6,
    "detection": 5, "evaluation": 5, "training": 5,
    "heads": 4,
    "weights": 3,
    "runtimes": 2.5,  # other image-tower runtimes: above model/, below weights/ (fingerprints come as arguments)
    "model": 2, "outputs": 2,
    "inputs": 1, "scores": 1,
    "errors": 0, "files": 0.2, "jsonsafe": 0.4, "safetensors_file": 0.6, "__init__": 0, "__main__": 8,
}
WORKFLOWS = {"detection", "evaluation"}  # one layer: a workflow may use another


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "data":
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports anywhere (top level, functions, TYPE_CHECKING)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    if name == "__init__":
        here = []
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("clipn_cli"):
                target = node.module.removeprefix("clipn_cli").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if sub in known else (target or "__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("clipn_cli."):
                    out.add(alias.name.removeprefix("clipn_cli."))
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def folder(module: str) -> str:
    return module.split(".")[0]


def test_every_module_has_a_layer() -> None:
    assert sorted({folder(m) for m in modules()} - set(RANKS)) == []


def test_imports_point_down() -> None:
    upward = []
    for module, targets in graph().items():
        for target in targets:
            a, b = folder(module), folder(target)
            if a == b or (a in WORKFLOWS and b in WORKFLOWS) or b == "__init__" and target == "__init__":
                continue
            if RANKS[b] >= RANKS[a]:
                upward.append(f"{module} -> {target}")
    assert sorted(upward) == []


def test_no_import_circles() -> None:
    edges = graph()
    circles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert circles == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_passes_400_lines(module: str) -> None:
    lines = len(modules()[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines"
