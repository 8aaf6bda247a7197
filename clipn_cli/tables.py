"""Tables of image paths (.parquet, .csv with a `path` column) given as inputs.

Only the column is read here, streamed and bounded (a CSV line at most 1 MiB, a Parquet row group's
path column at most 256 MiB uncompressed as its metadata declares it, the table opened as a regular
file only); `inputs.iter_inputs` makes inputs of its values.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Iterator
from typing import IO

from .errors import ClipnError

TABLE_SUFFIXES = (".parquet", ".csv")
PATH_COLUMN = "path"
MAX_CSV_LINE = 1 << 20  # a CSV line of paths; the csv module refuses a field over 128 KiB in any case
MAX_PARQUET_CHUNK = 256 << 20  # uncompressed bytes of the path column in one row group (read whole at once)


class TableError(ClipnError):
    """A table of paths that cannot be read; the message starts with the table's path."""


def is_table(arg: str) -> bool:
    return arg.lower().endswith(TABLE_SUFFIXES) and os.path.isfile(arg)


def table_paths(path: str, batch_rows: int = 65_536) -> Iterator[str | None]:
    """The `path` column of a Parquet or CSV file, streamed (one row group / CSV line at a time);
    None or "" where a row has no name. A file that cannot be read as a table raises TableError."""
    return _parquet_paths(path, batch_rows) if path.lower().endswith(".parquet") else _csv_paths(path)


def _parquet_paths(path: str, batch_rows: int) -> Iterator[str | None]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"{path}: reading a Parquet table needs pyarrow: pip install pyarrow (or 'clipn-cli[ray]')") from None
    try:
        with _open_regular(path) as fh:
            table = pq.ParquetFile(fh)
            if PATH_COLUMN not in table.schema_arrow.names:
                raise TableError(f"{path}: the table has no '{PATH_COLUMN}' column (columns: {', '.join(table.schema_arrow.names[:8])[:200]})")
            kind = table.schema_arrow.field(PATH_COLUMN).type
            text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
            if not (text or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
                raise TableError(f"{path}: the '{PATH_COLUMN}' column holds {str(kind)[:40]}, not file names (strings)")
            meta = table.metadata
            leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == PATH_COLUMN)
            for group in range(meta.num_row_groups):
                # pyarrow decompresses a row group's column chunk whole: its declared size is checked first
                size = meta.row_group(group).column(leaf).total_uncompressed_size
                if size > MAX_PARQUET_CHUNK:
                    raise TableError(f"{path}: row group {group} holds {size >> 20} MB of path names uncompressed "
                                     f"(limit {MAX_PARQUET_CHUNK >> 20} MB); write smaller row groups, or is it a decompression bomb?")
                for batch in table.iter_batches(batch_size=batch_rows, row_groups=[group], columns=[PATH_COLUMN]):
                    for value in batch.column(0).to_pylist():  # bytes: a name that is not UTF-8, kept as `find` gives it
                        yield value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    except TableError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged file
        raise TableError(f"{path}: not a readable Parquet table ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None


def _csv_paths(path: str) -> Iterator[str | None]:
    reader = None
    try:
        with _open_regular(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(_bounded_lines(fh))
            if PATH_COLUMN not in (reader.fieldnames or []):
                raise TableError(f"{path}: the CSV table has no '{PATH_COLUMN}' column in its header")
            for row in reader:
                yield row[PATH_COLUMN]
    except UnicodeDecodeError as exc:
        raise TableError(f"{path}: not a UTF-8 CSV table (byte {exc.start})") from None
    except (csv.Error, ValueError) as exc:  # NUL bytes, a field or line past the limits
        line = f"line {reader.line_num}: " if reader is not None and reader.line_num else ""
        raise TableError(f"{path}: not a readable CSV table ({line}{str(exc)[:160]})") from None
    except OSError as exc:
        raise TableError(f"{path}: cannot read the table: {exc.strerror or exc}") from None


def _open_regular(path: str) -> IO[bytes]:
    """`path` opened for reading through a non-blocking descriptor, refused unless a regular file
    (a table swapped for a FIFO after `is_table` looked must not block the driver)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TableError(f"{path}: not a regular file (device, socket or pipe)")
    return os.fdopen(fd, "rb")


def _bounded_lines(fh: IO[str]) -> Iterator[str]:
    """Lines of `fh`, each at most MAX_CSV_LINE characters: a file without newlines must not be
    read into memory whole before the csv module's own field limit looks at it."""
    while line := fh.readline(MAX_CSV_LINE + 1):
        if len(line) > MAX_CSV_LINE:
            raise ValueError(f"a line longer than {MAX_CSV_LINE} characters")
        yield line
