"""The tests keep one way to run the command line in-process: conftest's `cli(...)`, which goes
through `main()` as the console script does and keeps stdout and stderr apart; and shared setup
lives in conftest (or a helper module that is not a test file), never borrowed from another test
module. Read from the source (comments and strings do not count), nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def own_runners(path: Path) -> list[str]:
    """Where a test file runs the CLI past `cli`: click's or typer's test runner, or an `.invoke(...)` call."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module in ("click.testing", "typer.testing"):
            found.append((node.lineno, f"{path.name}:{node.lineno}: imports {node.module}"))
        elif isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", None)) == "CliRunner":
            found.append((node.lineno, f"{path.name}:{node.lineno}: uses CliRunner"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "invoke":
            found.append((node.lineno, f"{path.name}:{node.lineno}: calls .invoke(...)"))
    return [hit for _, hit in sorted(found)]


def test_tests_run_the_cli_in_process_only_through_conftest_cli() -> None:
    files = sorted(p for p in TESTS.rglob("*.py") if p.name != "conftest.py")
    assert len(files) > 30
    assert [hit for path in files for hit in own_runners(path)] == []


def test_the_check_sees_each_way_around_cli(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text("from typer.testing import CliRunner\nimport click.testing\n"
                      "def test_x():\n    click.testing.CliRunner().invoke(app, [])\n    runner.invoke(app, ['detect'])\n"
                      "    '''CliRunner in a docstring does not count'''\n", encoding="utf-8")
    assert own_runners(sample) == [
        "test_sample.py:1: imports typer.testing", "test_sample.py:4: calls .invoke(...)", "test_sample.py:4: uses CliRunner",
        "test_sample.py:5: calls .invoke(...)",
    ]


def imported_test_modules(path: Path) -> list[str]:
    """Where a file imports a test module (`test_*`, anywhere in the file): shared setup belongs in conftest."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        found += [(node.lineno, f"{path.name}:{node.lineno}: imports {name}") for name in names if name.split(".")[0].startswith("test_")]
    return [hit for _, hit in sorted(found)]


def test_no_test_module_imports_another() -> None:
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 30
    assert [hit for path in files for hit in imported_test_modules(path)] == []


def test_the_import_check_sees_each_form(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text("import conftest\nfrom conftest import cli\nimport json, test_report\nimport test_cli as other\n"
                      "def test_x():\n    from test_training import dataset\n    from test_serve.sub import x\n"
                      "    '''import test_docs in a docstring does not count'''\n", encoding="utf-8")
    assert imported_test_modules(sample) == [
        "test_sample.py:3: imports test_report", "test_sample.py:4: imports test_cli",
        "test_sample.py:6: imports test_training", "test_sample.py:7: imports test_serve.sub",
    ]
