"""Deterministic shards from a streaming list of inputs, and tables of paths as inputs.

A shard is the unit of work, output and resume: shard `i` holds inputs `i*size .. (i+1)*size-1`
of the input stream, in order. The same inputs therefore always give the same shards, and a
resumed run can tell a finished shard from an unfinished one by its index alone; its digest
(over the inputs it holds) proves that the inputs did not change in between. Planning holds one
shard in memory at a time, so the driver's memory does not grow with the number of inputs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from ..errors import ClipnError
from ..images import InputItem, iter_inputs

DEFAULT_SHARD_SIZE = 10_000
TABLE_SUFFIXES = (".parquet", ".csv")
PATH_COLUMN = "path"
MAX_CSV_LINE = 1 << 20  # a CSV line of paths; the csv module refuses a field over 128 KiB in any case


@dataclass(frozen=True)
class Shard:
    """Inputs `index*size ..` of the stream; `digest` identifies exactly which inputs those are."""

    index: int
    items: tuple[InputItem, ...]
    digest: str

    @property
    def name(self) -> str:
        return shard_name(self.index)


def shard_name(index: int) -> str:
    """File stem of a shard: zero-padded so that names sort in input order."""
    return f"part-{index:06d}"


def shard_digest(items: Iterable[InputItem]) -> str:
    """A short hash of the inputs (paths and listing errors) of one shard, in order."""
    h = hashlib.blake2b(digest_size=12)
    for item in items:
        h.update(item.path.encode("utf-8", "surrogateescape"))
        h.update(b"\0" + (item.error or "").encode("utf-8") + b"\n")
    return h.hexdigest()


def plan_shards(items: Iterable[InputItem], size: int = DEFAULT_SHARD_SIZE) -> Iterator[Shard]:
    """Cut a stream of inputs into shards of `size` (the last may be smaller), lazily."""
    if size < 1:
        raise ValueError("shard size must be at least 1")
    batch: list[InputItem] = []
    index = 0
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield Shard(index, tuple(batch), shard_digest(batch))
            batch = []
            index += 1
    if batch:
        yield Shard(index, tuple(batch), shard_digest(batch))


def is_table(arg: str) -> bool:
    return arg.lower().endswith(TABLE_SUFFIXES) and os.path.isfile(arg)


def iter_sources(args: Iterable[str], stdin: IO[str] | None = None) -> Iterator[InputItem]:
    """`iter_inputs` plus tables: a .parquet or .csv file given as an input yields its `path` column.

    Relative paths in a table are taken relative to the table's folder (as `eval` path lists are),
    so a table and its images can move together.
    """
    for arg in args:
        if is_table(arg):
            yield from iter_table(arg)
        else:
            yield from iter_inputs([arg], stdin)


def iter_table(path: str, batch_rows: int = 65_536) -> Iterator[InputItem]:
    """The `path` column of a Parquet or CSV file, streamed (one row group / CSV line at a time)."""
    base = os.path.dirname(path)
    column = _parquet_paths(path, batch_rows) if path.lower().endswith(".parquet") else _csv_paths(path)
    for row, value in enumerate(column, 1):
        if value:
            yield InputItem(os.path.join(base, value))
        else:  # a row is an input: an empty or missing name gets its error record, never silently dropped
            yield InputItem(f"{path} row {row}", error=f"empty '{PATH_COLUMN}' value in the table")


def _parquet_paths(path: str, batch_rows: int) -> Iterator[str | None]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ClipnError(f"{path}: reading a Parquet table needs pyarrow: pip install 'clipn-cli[ray]'") from None
    try:
        with _open_regular(path) as fh:
            table = pq.ParquetFile(fh)
            if PATH_COLUMN not in table.schema_arrow.names:
                raise ClipnError(f"{path}: the table has no '{PATH_COLUMN}' column (columns: {', '.join(table.schema_arrow.names[:8])[:200]})")
            kind = table.schema_arrow.field(PATH_COLUMN).type
            text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
            if not (text or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
                raise ClipnError(f"{path}: the '{PATH_COLUMN}' column holds {str(kind)[:40]}, not file names (strings)")
            for batch in table.iter_batches(batch_size=batch_rows, columns=[PATH_COLUMN]):
                for value in batch.column(0).to_pylist():  # bytes: a name that is not UTF-8, kept as `find` gives it
                    yield value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    except ClipnError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged file
        raise ClipnError(f"{path}: not a readable Parquet table ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None


def _csv_paths(path: str) -> Iterator[str | None]:
    reader = None
    try:
        with _open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(_bounded_lines(fh))
            if PATH_COLUMN not in (reader.fieldnames or []):
                raise ClipnError(f"{path}: the CSV table has no '{PATH_COLUMN}' column in its header")
            for row in reader:
                yield row[PATH_COLUMN]
    except UnicodeDecodeError as exc:
        raise ClipnError(f"{path}: not a UTF-8 CSV table (byte {exc.start})") from None
    except (csv.Error, ValueError) as exc:  # NUL bytes, a field or line past the limits
        line = f"line {reader.line_num}: " if reader is not None and reader.line_num else ""
        raise ClipnError(f"{path}: not a readable CSV table ({line}{str(exc)[:160]})") from None
    except OSError as exc:
        raise ClipnError(f"{path}: cannot read the table: {exc.strerror or exc}") from None


def _open_regular(path: str) -> IO[bytes]:
    """`path` opened for reading through a non-blocking descriptor, refused unless a regular file
    (a table swapped for a FIFO after `is_table` looked must not block the driver)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ClipnError(f"{path}: not a regular file (device, socket or pipe)")
    return os.fdopen(fd, "rb")


def _bounded_lines(fh: IO[str]) -> Iterator[str]:
    """Lines of `fh`, each at most MAX_CSV_LINE characters: a file without newlines must not be
    read into memory whole before the csv module's own field limit looks at it."""
    while line := fh.readline(MAX_CSV_LINE + 1):
        if len(line) > MAX_CSV_LINE:
            raise ValueError(f"a line longer than {MAX_CSV_LINE} characters")
        yield line
