"""The house keeps its shape: imports point down the layers of README's "Layout", no module imports
another in a circle, no module outgrows 400 lines, and the Layout section names every module there
is (and none that is not). Read from the source, nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "clipn_cli"
README = PACKAGE.parent / "README.md"
MAX_LINES = 400
# Higher imports lower; a folder never imports a peer of its own rank (README "Layout").
RANKS = {
    "cli": 7,
    "scale": 6, "serve": 6,
    "detection": 5, "evaluation": 5, "training": 5, "verdicts": 5, "fastdetect": 5,
    "heads": 4,
    "weights": 3,
    "runtimes": 2.5,  # other image-tower runtimes: above model/, below weights/ (fingerprints come as arguments)
    "model": 2, "outputs": 2,
    "inputs": 1, "scores": 1,
    "errors": 0, "files": 0.2, "jsonsafe": 0.4, "safetensors_file": 0.6, "__init__": 0, "__main__": 8,
}
WORKFLOWS = {"detection", "evaluation"}  # one layer: a workflow may use another


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
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


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(package)
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def folder(module: str) -> str:
    return module.split(".")[0]


def test_every_module_has_a_layer() -> None:
    assert sorted({folder(m) for m in modules()} - set(RANKS)) == []


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """Every import of a folder of the same rank or above (a folder with no rank counts as the top)."""
    upward = []
    for module, targets in graph(package).items():
        for target in targets:
            a, b = folder(module), folder(target)
            if a == b or (a in WORKFLOWS and b in WORKFLOWS) or b == "__init__" and target == "__init__":
                continue
            if RANKS.get(b, float("inf")) >= RANKS.get(a, float("-inf")):
                upward.append(f"{module} -> {target}")
    return sorted(upward)


def test_imports_point_down() -> None:
    assert upward_imports() == []


def test_a_new_folder_importing_upward_is_caught(tmp_path: Path) -> None:
    """The rule holds for folders that do not exist yet: a ranked new folder (serve/) importing the
    CLI above it, and an unranked one importing anything, are both reported."""
    for name, text in {
        "cli/app.py": "", "serve/http.py": "from ..cli import app\nfrom ..inputs import sources\n",
        "inputs/sources.py": "", "plugins/extra.py": "from clipn_cli.inputs import sources\n",
    }.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert upward_imports(tmp_path) == ["plugins.extra -> inputs.sources", "serve.http -> cli.app"]


def layout_rows() -> list[tuple[str, list[str]]]:
    """(rank, modules) of each row of README's "Layout" table."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Layout"))
    rows = []
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) >= 3 and cells[1] not in ("module", "---"):
            rows.append((cells[0], re.findall(r"`([\w/]+\.py)`", cells[1])))
    return rows


def package_files() -> set[str]:
    """Every module file, a sub-folder's `__init__.py` only where it holds more than a docstring."""
    return {
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] != "data"
        and not (path.name == "__init__.py" and path.parent != PACKAGE and len(path.read_text(encoding="utf-8").splitlines()) <= 1)
    }


def test_readme_layout_names_every_module_and_only_those() -> None:
    named = [module for _, row in layout_rows() for module in row]
    assert sorted(package_files() - set(named)) == [], "modules missing from README's Layout"
    assert sorted(set(named) - package_files()) == [], "README's Layout names modules that do not exist"
    assert len(named) == len(set(named)), "a module named twice in README's Layout"


def test_readme_layout_ranks_are_the_tests_ranks() -> None:
    wrong = [f"{module}: README {rank}, RANKS {RANKS[folder(module.removesuffix('.py').replace('/', '.'))]}"
             for rank, row in layout_rows() if rank.isdigit() for module in row
             if int(RANKS[folder(module.removesuffix(".py").replace("/", "."))]) != int(rank)]
    assert wrong == []


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


MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS_ALLOWED: set[str] = set()  # none: a function that must be long is named here, with why


def long_functions(package: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (methods and nested ones too) whose body passes `limit` lines. The body runs from
    its first statement (the docstring, if any) to its last line: the signature and decorators do not
    count, so a typer command's option list is free while what the command does is not."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.body[0].lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(package).as_posix()}:{node.name} ({lines} lines)")
    return found


def test_no_function_passes_60_lines() -> None:
    long = [entry for entry in long_functions() if entry.split(" (")[0] not in LONG_FUNCTIONS_ALLOWED]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines (split them along their seams)"


def test_a_long_body_is_caught_and_a_long_signature_is_not(tmp_path: Path) -> None:
    """61 body lines fail; 100 lines of parameters with a 2-line body pass (typer option lists)."""
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    params = "".join(f"    p{i}: int = {i},\n" for i in range(100))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\n@decorate\ndef options(\n{params}) -> None:\n    '''Doc.'''\n    pass\n",
                                   encoding="utf-8")
    assert long_functions(tmp_path) == ["m.py:long (61 lines)"]
