"""User mistakes are one line and exit 2; anything else is a bug and keeps its traceback (README "Reliability")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, sigint_at_default

import clipn_cli.heads.classes as classes_module


def _bug(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected bug")


def test_a_user_mistake_is_one_line_without_traceback(tiny_weights: Path, tmp_path: Path) -> None:
    out = cli("detect", "-w", str(tiny_weights), "-c", "cat,dog", "--rule", "msp", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "clipn: error: --rule msp has no threshold-free verdict: give --threshold T (e.g. its thr@95%ID from 'clipn eval') or --calibration FILE"
    ]


def test_a_bug_propagates_with_its_traceback(tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classes_module, "parse_class_list", _bug)
    with pytest.raises(RuntimeError, match="injected bug"):  # not turned into a one-line message
        cli("detect", "-w", str(tiny_weights), "-c", "cat,dog", str(tmp_path))


def test_the_process_shows_a_bugs_traceback_and_exits_1(tiny_weights: Path, tmp_path: Path) -> None:
    code = (
        "import sys, clipn_cli.heads.classes as c\n"
        "def bug(*a, **k): raise RuntimeError('injected bug')\n"
        "c.parse_class_list = bug\n"
        "from clipn_cli.cli.app import main\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "detect", "-w", str(tiny_weights), "-c", "cat,dog", str(tmp_path)],
                          capture_output=True, text=True, preexec_fn=sigint_at_default)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and proc.stderr.rstrip().endswith("RuntimeError: injected bug")


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_shows_the_traceback_of_a_user_error(tiny_weights: Path, tmp_path: Path, how: str) -> None:
    (tmp_path / "classes.txt").write_bytes(b"cat\n\xff\xfe\n")
    args = ["detect", "-w", str(tiny_weights), "--classes-file", str(tmp_path / "classes.txt"), str(tmp_path)]
    line = f"clipn: error: {tmp_path / 'classes.txt'}: not UTF-8 (byte 4, line 2); save the class file as UTF-8"
    plain = cli(*args)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [line]
    out = cli("--debug", *args) if how == "option" else cli(*args, env={"CLIPN_DEBUG": "1"})
    assert out.returncode == 2
    assert "Traceback (most recent call last)" in out.stderr and "ClassesError" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in cli(*args).stderr  # only for that invocation
