"""User mistakes are one line and exit 2; anything else is a bug and keeps its traceback (README "Reliability")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, sigint_at_default

import clipn_cli.heads.classes as classes_module
from clipn_cli.errors import (
    ClipnError, FileTooLargeError, JSONLimitError, NotRegularFileError, SafetensorsError, ShardError, UnicodeTextError,
)


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


def _hostile_file(tmp_path: Path, kind: str) -> Path:
    """A file each bounded reader refuses: too large, a FIFO, JSON nested too deeply, not UTF-8,
    a safetensors header that does not fit the file, a shard line that is not JSON."""
    path = tmp_path / f"hostile-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes({
            "large": b"cat\n" * 64, "json": b"[" * 40 + b"]" * 40, "utf8": b"cat\n\xff\xfe\n",
            "safetensors": (10**12).to_bytes(8, "little") + b"{}", "shard": b"not json\n",
        }[kind])
    return path


def _raw_readers() -> dict[str, tuple[type, object]]:
    """Each file-format error as its reader raises it, with no caller wrapping it in another error."""
    from clipn_cli.files import JSONLimits, decode_utf8, read_bounded, read_json
    from clipn_cli.outputs.records import decode_shard
    from clipn_cli.safetensors_file import SafetensorsFile

    return {
        "large": (FileTooLargeError, lambda path: read_bounded(path, 16)),
        "fifo": (NotRegularFileError, lambda path: read_bounded(path, 1 << 20)),
        "json": (JSONLimitError, lambda path: read_json(path, 1 << 20, JSONLimits(depth=8))),
        "utf8": (UnicodeTextError, lambda path: decode_utf8(read_bounded(path, 1 << 20)).splitlines()),
        "safetensors": (SafetensorsError, lambda path: SafetensorsFile(path)),
        "shard": (ShardError, lambda path: list(decode_shard(Path(path).read_bytes(), "jsonl", 1))),
    }


@pytest.mark.parametrize("kind", ["large", "fifo", "json", "utf8", "safetensors", "shard"])
def test_a_file_format_error_no_reader_wraps_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The bounded readers' errors are ClipnErrors (and still ValueErrors): raised through a command
    with nothing wrapping them, they are one line naming the file where the reader knew it, never a traceback."""
    error, reader = _raw_readers()[kind]
    assert issubclass(error, ClipnError) and issubclass(error, ValueError)
    path = _hostile_file(tmp_path, kind)
    monkeypatch.setattr(classes_module, "read_class_file", reader)  # the class file read with no wrapping
    out = cli("detect", "--classes-file", path, str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipn: error: ")
    knows_path = kind in ("large", "fifo", "json", "safetensors")
    assert (str(path) in lines[0]) == knows_path
    assert {"large": "larger than 16 bytes", "fifo": "not a regular file", "json": "nested too deeply",
            "utf8": "not UTF-8 text (byte 4, line 2)", "safetensors": "header length", "shard": "line 1 is not JSON"}[kind] in lines[0]


@pytest.mark.parametrize("header", [(10**12).to_bytes(8, "little") + b"{}", (40).to_bytes(8, "little") + b"[" * 40])
def test_a_garbled_embeddings_header_is_one_line_naming_the_file(tiny_weights: Path, tmp_path: Path, header: bytes) -> None:
    embeddings = tmp_path / "bad.safetensors"
    embeddings.write_bytes(header)
    out = cli("detect", "-w", tiny_weights, "--embeddings", embeddings, str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert f"{embeddings}: not a valid safetensors file" in out.stderr
