"""The terminal table of `clipn detect`: rows streamed as they are scored, a summary, Ctrl-C keeps them."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

from clipn_cli.outputs.writers import open_writer
from clipn_cli.outputs.progress import StatusLine
from conftest import DIGITS_CLASSES, DIGITS_IMAGES, ROOT, cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours, line clearing, cursor hiding


class _Pty:
    """`clipn detect` with stdout and stderr on a pseudo-terminal and paths fed on stdin, one at a time."""

    def __init__(self, *args: str) -> None:
        main, child = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "150", "TERM": "xterm"}
        env.pop("CLIPN_WEIGHTS", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "clipn_cli", "detect", "-", *args], stdin=subprocess.PIPE, stdout=child, stderr=child, env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a shell's `&` ignores SIGINT; this run needs it
        )
        os.close(child)
        self.main, self.seen = main, ""

    def feed(self, path: Path) -> None:
        self.process.stdin.write(f"{path}\n".encode())
        self.process.stdin.flush()

    def read_until_scored(self, count: int) -> str:
        """Everything shown so far, once the progress line on stderr counts `count` inputs scored.

        The records are written before the count moves on, so the rows of these inputs are on
        screen by then, if they are shown as they are scored. (The count is read in clipn's earlier
        progress format too, `images 2/?`, so that a table shown only at the end fails, not hangs.)
        """
        scored = re.compile(r"(\d+)(?:/\d+)? images|images (\d+)/")
        while not any(int(a or b) >= count for a, b in scored.findall(ANSI.sub("", self.seen))):
            chunk = self._read()
            assert chunk, f"the process ended before scoring {count} inputs; it showed:\n{self.seen}"
            self.seen += chunk
        return self.seen

    def read_to_end(self) -> str:
        while chunk := self._read():
            self.seen += chunk
        return self.seen

    def _read(self) -> str:
        try:
            return os.read(self.main, 65536).decode("utf-8", errors="replace")
        except OSError:  # EIO: the child side closed
            return ""


def _lines(screen: str) -> list[str]:
    """The lines a terminal shows: colours taken out, and of a line redrawn after `\\r`, its last drawing."""
    plain = ANSI.sub("", screen.replace("\r\n", "\n"))
    return [line.split("\r")[-1] for line in plain.split("\n")]


def _rows(screen: str) -> list[str]:
    return [line for line in _lines(screen) if line.startswith(str(DIGITS_IMAGES))]


def test_rows_appear_while_the_run_goes_on_and_ctrl_c_keeps_them() -> None:
    images = sorted(DIGITS_IMAGES.iterdir())[:10]  # more than the 8 inputs decoded ahead: some are scored while stdin stays open
    run = _Pty("--weights", "digits", "-c", DIGITS_CLASSES, "--batch-size", "1", "--workers", "1")
    try:
        for image in images:
            run.feed(image)
        screen = run.read_until_scored(2)
        assert run.process.poll() is None  # stdin is still open: the run cannot have ended
        assert [r.split()[0] for r in _rows(screen)][:2] == [str(images[0]), str(images[1])]
        header = [line for line in _lines(screen) if "verdict" in line]
        assert len(header) == 1 and header[0].split() == ["image", "verdict", "class", "CTW", "ATD"]
        assert "images · " in screen  # the progress line; no total: the paths come from stdin
        shown = _rows(screen)
        run.process.send_signal(signal.SIGINT)
        screen = run.read_to_end()
        assert run.process.wait() == 130
    finally:
        run.process.kill()
        run.process.wait()
        os.close(run.main)
    rows = _rows(screen)
    assert rows[: len(shown)] == shown and len(rows) >= 2  # nothing shown is taken back
    assert [r.split()[0] for r in rows] == [str(p) for p in images[: len(rows)]]
    verdicts = [r.split()[1] for r in rows]
    assert f"interrupted: {len(rows)} inputs: {verdicts.count('ID')} ID, {verdicts.count('OOD')} OOD, 0 errors" in screen
    assert re.search(r"clipn: stopped after \d+ inputs", screen)


def test_progress_shows_total_and_time_left_when_known() -> None:
    now = [0.0]
    out = io.StringIO()
    status = StatusLine(out, total=None, clock=lambda: now[0])
    now[0] = 2.0
    status.advance(4)
    assert status.text() == "4 images · 2.0/s"
    status.total = 10
    assert status.text() == "4/10 images · 2.0/s · 0:00:03 left"
    with status.suspended():
        out.write("row\n")
    assert out.getvalue().endswith("\r\x1b[2Krow\n\r\x1b[2K4/10 images · 2.0/s · 0:00:03 left")


def test_table_summary_top_k_and_details_in_process() -> None:
    result = cli("detect", str(DIGITS_IMAGES / "one-0070.png"), str(DIGITS_IMAGES / "nine-0105.png"), "missing.png",
                 "--weights", "digits", "-c", DIGITS_CLASSES, "-f", "table", "--top-k", "2", "--details")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["image", "verdict", "class", "CTW", "ATD", "top", "2"]
    records = [json.loads(line) for line in cli("detect", str(DIGITS_IMAGES / "one-0070.png"), "--weights", "digits", "-c", DIGITS_CLASSES,
                                                  "-f", "jsonl", "--top-k", "2", "--details").stdout.splitlines()]
    one = records[0]
    row = lines[1].split()
    assert row[:5] == [str(DIGITS_IMAGES / "one-0070.png"), "ID", "one", f"{one['ctw_score']:.3f}", f"{one['atd_score']:.3f}"]
    top = one["top_k"]
    assert " ".join(row[5:]) == f"{top[0]['class']} {top[0]['probability']:.3f}, {top[1]['class']} {top[1]['probability']:.3f}"
    assert lines[2].strip() == "p_yes: " + ", ".join(f"{c} {p:.3f}" for c, p in zip(DIGITS_CLASSES.split(","), one["p_yes"]))
    assert lines[3].strip().startswith(f"logits_yes: zero {one['logits_yes'][0]:.3f}, one {one['logits_yes'][1]:.3f}")
    assert lines[4].strip().startswith("logits_no: zero ")
    assert lines[5].split()[1] == "OOD"
    assert lines[9].split()[:3] == ["missing.png", "ERROR", "no"]
    assert lines[-1] == "3 inputs: 1 ID, 1 OOD, 1 error"
    plain = cli("detect", str(DIGITS_IMAGES / "one-0070.png"), "--weights", "digits", "-c", DIGITS_CLASSES, "-f", "table").stdout.splitlines()
    assert plain[0].split() == ["image", "verdict", "class", "CTW", "ATD"] and len(plain) == 3 and plain[-1] == "1 input: 1 ID, 0 OOD, 0 errors"


def test_an_interrupted_table_ends_with_the_summary_and_machine_formats_do_not() -> None:
    record = {"path": "a.png", "verdict": "ID", "rule": "atd", "class": "cat", "class_index": 0, "ctw_score": 0.9, "atd_score": 0.8}
    for fmt in ("table", "jsonl", "csv"):
        out = io.StringIO()
        try:
            with open_writer(fmt, stdout=out, classes=["cat"]) as writer:
                writer.write(record)
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        last = out.getvalue().splitlines()[-1]
        if fmt == "table":
            assert last == "interrupted: 1 input: 1 ID, 0 OOD, 0 errors"
        else:
            assert "interrupted" not in out.getvalue() and "a.png" in last


def test_the_total_counts_folders_and_files_and_leaves_out_resumed_inputs() -> None:
    from clipn_cli.outputs.progress import NoStatus, _count, input_progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    status = StatusLine(Terminal())
    _count(status, [str(DIGITS_IMAGES), "missing.png"], skip={str(DIGITS_IMAGES / "one-0070.png")})
    assert status.total == 20  # 20 images + the missing file's record - the one already done
    with input_progress(Terminal(), ["-"]) as on_stdin:
        assert on_stdin.total is None  # paths on stdin: counted as they come, no total
    with input_progress(io.StringIO(), [str(DIGITS_IMAGES)]) as piped:
        assert isinstance(piped, NoStatus)
