"""Writers for detection records: JSON Lines, JSON, CSV, Parquet (for machines) and a streamed table (for people).

Machine formats stream record by record (Parquet a row group at a time), so memory stays flat for
any number of inputs. Written to a file, JSON, CSV and Parquet appear atomically (complete or absent); JSON Lines is
written a whole line at a time, so a cut run (or a full disk) keeps every finished line and no partial one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import OptionsError, OutputError
from ..files import LineFile, atomic_open
from .records import CSV_COLUMNS, DETAIL_COLUMNS, MAX_RECORD_LINE, json_text, record_problem, to_table

FORMATS = ("table", "json", "jsonl", "csv", "parquet")
FILE_ONLY = ("parquet",)  # binary: written to --output FILE, never to stdout
PARQUET_ROW_GROUP = 1024  # records held before a row group is written (--details at 50,000 classes: ~3 MB each)
RECORD_START = b'{"path": '  # every record's first key, as JsonlWriter writes it
TEXT_ERRORS = "surrogateescape"  # CSV and tables write a non-UTF-8 file name's bytes as they are, as `ls` does


class Writer:
    """Base writer: `write` one record dict; `finish` writes any trailer once all records are in."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Write any trailer (closing bracket, summary)."""

    def stop(self) -> None:
        """The run was cut (Ctrl-C, an error): say so where people read (a table's summary)."""


class JsonlWriter(Writer):
    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json_text(record) + "\n")
        self.stream.flush()


class JsonWriter(Writer):
    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._count = 0
        stream.write("[")

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write((",\n " if self._count else "\n ") + json_text(record))
        self._count += 1

    def finish(self) -> None:
        self.stream.write("\n]\n" if self._count else "]\n")


class CsvRows:
    """csv.DictWriter with "\n" line ends whose rows holding a carriage return are quoted in full.

    With "\n" as the line end, Python 3.11's csv quotes a field holding "\n" but not one holding a
    bare "\r", which csv readers (Python's, pandas', spreadsheets) take for a line end: a file named
    `a\rb.png` split its record in two. Other rows are written as before (minimal quoting).
    """

    def __init__(self, stream: IO[str], fieldnames: tuple[str, ...] | list[str], extrasaction: str = "raise") -> None:
        self._plain = csv.DictWriter(stream, fieldnames=fieldnames, extrasaction=extrasaction, lineterminator="\n")
        self._quoted = csv.DictWriter(stream, fieldnames=fieldnames, extrasaction=extrasaction, lineterminator="\n",
                                      quoting=csv.QUOTE_ALL)

    def writeheader(self) -> None:
        self._plain.writeheader()

    def writerow(self, row: dict[str, Any]) -> None:
        returns = any(isinstance(value, str) and "\r" in value for value in row.values())
        (self._quoted if returns else self._plain).writerow(row)


class CsvWriter(Writer):
    def __init__(self, stream: IO[str], details: bool = False, extra: tuple[str, ...] = ()) -> None:
        super().__init__(stream)
        columns = CSV_COLUMNS + extra + (DETAIL_COLUMNS if details else ("top_k",))
        self._csv = CsvRows(stream, columns, extrasaction="ignore")
        self._csv.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        row = {k: json_text(v) if isinstance(v, (list, dict)) else v for k, v in record.items()}
        self._csv.writerow(row)


class ParquetWriter(Writer):
    """Parquet with the Arrow schema of a Ray run's shards (`records.to_table`): one column per
    field, null where a record lacks it, the same columns for the whole file."""

    def __init__(self, stream: IO[bytes], details: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.stream = stream  # type: ignore[assignment]
        self._details, self._extra = details, extra
        self._rows: list[dict[str, Any]] = []
        self._file: Any = None

    def write(self, record: dict[str, Any]) -> None:
        self._rows.append(record)
        if len(self._rows) >= PARQUET_ROW_GROUP:
            self._flush()

    def finish(self) -> None:
        if self._rows or self._file is None:  # a run without records still gets a file with the schema
            self._flush()
        self._file.close()

    def stop(self) -> None:
        """Close the Parquet file now, while its stream is open: the file itself is discarded."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        if self._file is None:
            table = to_table(self._rows, self._details, self._extra)
            self._file = pq.ParquetWriter(self.stream, table.schema, compression="zstd")
        else:
            table = to_table(self._rows, self._details, self._extra, columns=self._file.schema.names).cast(self._file.schema)
        self._file.write_table(table)
        self._rows = []


class TableWriter(Writer):
    """Rows for people, printed as each record arrives, in aligned columns; a summary line at the end.

    The columns are laid out before the first row (from the class names and the terminal width), so
    each row is printed alone: a long run shows its rows as they are scored, and Ctrl-C leaves them
    on screen followed by the summary. On a terminal a long path keeps its end (`…/name.png`) and a
    long class name or error its start; in a file nothing is cut. `--top-k` adds a column of the K
    most probable classes, `--details` a line per row with p_yes, logits_yes and logits_no per class.
    """

    def __init__(self, stream: IO[str], details: bool = False, top_k: int = 0, extra: tuple[str, ...] = (),
                 classes: list[str] | tuple[str, ...] = (), status: Any = None) -> None:
        from rich.console import Console

        super().__init__(stream)
        terminal = stream.isatty()
        self._console = Console(file=stream, highlight=False, width=None if terminal else 10_000, soft_wrap=not terminal)
        self._terminal, self._details, self._extra, self._status = terminal, details, extra, status
        self._classes = list(classes)
        self._top_k = min(top_k, len(classes)) if classes else top_k
        class_width = min(max([len(c) for c in classes] + [5]), 24)
        fixed = [("verdict", 7, "^"), ("class", class_width, "<"), ("CTW", 6, ">"), ("ATD", 6, ">"), *((k, 9, ">") for k in extra)]
        rest = self._console.width - sum(w + 1 for _, w, _ in fixed) - (min(self._top_k * (class_width + 7), 40) if self._top_k else 0)
        self._columns = [("image", max(12, min(rest - 1, 64)), "<"), *fixed]
        self._counts = {"ID": 0, "OOD": 0, "ERROR": 0}
        self._header = False

    def write(self, record: dict[str, Any]) -> None:
        from rich.text import Text

        line = Text()
        if "error" in record:
            self._cells(line, [(record["path"], None), ("ERROR", "bold yellow")])
            line.append(" " + record["error"], style="yellow")
            verdict = "ERROR"
        else:
            verdict = record["verdict"]
            cells = [(record["path"], None), (verdict, "bold red" if verdict == "OOD" else "bold green"), (record["class"], None),
                     (_score(record.get("ctw_score")), None), (_score(record.get("atd_score")), None),
                     *((f"{record[k]:.4g}" if record.get(k) is not None else "", None) for k in self._extra)]
            self._cells(line, cells)
            if self._top_k:
                line.append(" " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in record.get("top_k", [])))
        lines = [line]
        if self._details and "error" not in record:
            lines += [Text(f"    {name}: " + _per_class(record.get(name), self._classes), style="dim") for name in ("p_yes", "logits_yes", "logits_no")]
        self._print(*lines, counted=verdict)

    def finish(self) -> None:
        self._summary("")

    def stop(self) -> None:
        self._summary("interrupted: ")

    def _summary(self, prefix: str) -> None:
        from rich.text import Text

        total = sum(self._counts.values())
        if total:
            counts = f"{self._counts['ID']} ID, {self._counts['OOD']} OOD, {self._counts['ERROR']} error{'s' * (self._counts['ERROR'] != 1)}"
            self._print(Text(f"{prefix}{total} input{'s' * (total != 1)}: {counts}", style="bold"))

    def _cells(self, line: Any, cells: list[tuple[str, str | None]]) -> None:
        from rich.cells import cell_len

        for i, ((text, style), (_, width, align)) in enumerate(zip(cells, self._columns)):
            if self._terminal and len(text) > width:
                text = "…" + text[-(width - 1):] if i == 0 else text[: width - 1] + "…"
            pad = max(width - cell_len(text), 0)  # a wide character (CJK) takes two columns
            left = {"<": 0, ">": pad, "^": pad // 2}[align]
            line.append(" " * left)
            line.append(text, style=style)
            line.append(" " * (pad - left + 1))

    def _print(self, *lines: Any, counted: str | None = None) -> None:
        """Print lines (the header first, once) with the progress line hidden; `counted`: the verdict a row adds to the summary."""
        from contextlib import nullcontext

        from rich.text import Text

        with self._status.suspended() if self._status is not None and self._terminal else nullcontext():
            if not self._header:
                head = Text()
                self._cells(head, [(name, None) for name, _, _ in self._columns])
                if self._top_k:
                    head.append(f"top {self._top_k}")
                self._console.print(Text(head.plain.rstrip(), style="bold"), overflow="ellipsis", no_wrap=self._terminal)
                self._header = True
            for line in lines:
                line.rstrip()
                self._console.print(line, overflow="ellipsis", no_wrap=self._terminal)
            if counted is not None:  # right after the row: the summary counts the rows on screen
                self._counts[counted] = self._counts.get(counted, 0) + 1
            self.stream.flush()


def _per_class(values: list[float] | None, names: list[str]) -> str:
    if values is None:
        return "–"  # a plain CLIP has no "no" tower
    return ", ".join(f"{name} {v:.3f}" for name, v in zip(names or [f"#{i}" for i in range(len(values))], values))


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"  # None: a plain CLIP has no CTW/ATD


def check_writer(fmt: str, output: str | Path | None) -> None:
    """Refuse a format that cannot be written as asked, before any work: Parquet (binary) needs a
    file and pyarrow."""
    if fmt not in FORMATS:
        raise OptionsError(f"unknown format '{fmt}' (expected one of {', '.join(FORMATS)})")
    if fmt in FILE_ONLY and output is None:
        raise OutputError(f"--format {fmt} is binary: give --output FILE")
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise OutputError("--format parquet needs pyarrow: pip install pyarrow (or 'clipn-cli[ray]')") from None


@contextlib.contextmanager
def open_writer(
    fmt: str,
    output: str | Path | None = None,
    details: bool = False,
    append: bool = False,
    stdout: IO[str] | None = None,
    columns: tuple[str, ...] = (),
    top_k: int = 0,
    classes: list[str] | tuple[str, ...] = (),
    status: Any = None,
) -> Iterator[Writer]:
    """A writer for `fmt` to `output` (a file) or stdout, finished when the block ends normally.

    `columns`: extra CSV and table columns after the standard ones (`p_value` of calibrated runs).
    `top_k`, `classes` and `status` (a progress line to hide while a row is printed) lay out a table.

    If the block raises (an error, Ctrl-C), an atomic JSON/CSV/Parquet/table file is discarded and a
    JSON Lines file keeps the complete lines written so far.
    """
    check_writer(fmt, output)
    with contextlib.ExitStack() as stack:
        if fmt == "parquet":
            stream = stack.enter_context(atomic_open(output, "wb"))
        elif output is None:
            stream: IO[str] = stdout or sys.stdout
            if stream is None:  # started with stdout closed (`>&-`)
                raise OutputError("stdout is closed: results would be lost; write them to a file instead")
        elif fmt == "jsonl":
            stream = stack.enter_context(LineFile(output, append, TEXT_ERRORS))  # type: ignore[arg-type]
        else:
            stream = stack.enter_context(atomic_open(output, "w", encoding="utf-8", errors=TEXT_ERRORS, newline=""))
        writer: Writer
        if fmt == "jsonl":
            writer = JsonlWriter(stream)
        elif fmt == "json":
            writer = JsonWriter(stream)
        elif fmt == "csv":
            writer = CsvWriter(stream, details, columns)
        elif fmt == "parquet":
            writer = ParquetWriter(stream, details, columns)
        else:
            writer = TableWriter(stream, details, top_k, columns, classes, status)
        try:
            yield writer
        except BaseException:
            with contextlib.suppress(OSError):  # the reader of stdout may be gone: the first error is the one to report
                writer.stop()
            raise
        writer.finish()
        stream.flush()


def resume_jsonl(path: str | Path, on_record: Callable[[dict[str, Any]], None] | None = None) -> set[str]:
    """Prepare a JSON Lines file for `--resume`: cut a partial last line, return the paths it holds
    (and hand each record to `on_record`: a report covers the whole file, not only this run).

    A run killed mid-write can leave a line without its newline; it is removed so that
    appending starts on a clean line and that input is done again. The file is read a line at a
    time (a resumed run of 10^7 records must not hold the whole file), each at most MAX_RECORD_LINE.
    """
    path = Path(path)
    if not path.exists():
        return set()

    def refuse(number: int, why: str = "is not a clipn JSON Lines record", detail: str = "") -> OutputError:
        return OutputError(f"{path}: line {number} {why}: refusing to append to this file" + (f" (it {detail})" if detail else ""))

    done: set[str] = set()
    with open(path, "rb+") as fh:
        end = number = 0
        while line := fh.readline(MAX_RECORD_LINE + 1):
            number += 1
            if not line.endswith(b"\n"):
                if len(line) > MAX_RECORD_LINE:
                    raise refuse(number, f"is longer than {MAX_RECORD_LINE >> 20} MiB")
                # only a record cut mid-write is dropped; anything else is not ours to cut
                if not (line.startswith(RECORD_START) or RECORD_START.startswith(line)):
                    raise refuse(number)
                fh.truncate(end)
                break
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if (problem := record_problem(record)) is not None:
                raise refuse(number, detail=problem)
            done.add(record["path"])
            if on_record is not None:
                on_record(record)
            end += len(line)
    return done
