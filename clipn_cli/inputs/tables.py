"""Tables of image paths given as inputs: .parquet or .csv with a `path` column, and path lists
(.txt or .lst: one path per line, blank lines and `#` comments skipped).

Only the column is read here, streamed and bounded (a CSV or list line at most 1 MiB, a Parquet row group's
path column at most 256 MiB uncompressed as its metadata declares it, each path at most 64 KiB as
its dictionary expands it, the table opened as a regular file only); `inputs.iter_inputs` makes
inputs of its values.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Iterator
from typing import IO, Any

from ..errors import ClipnError
from ..files import NotRegularFileError, UnicodeTextError, decode_utf8, open_regular

LIST_SUFFIXES = (".txt", ".lst")
TABLE_SUFFIXES = (".parquet", ".csv", *LIST_SUFFIXES)
PATH_COLUMN = "path"
MAX_CSV_LINE = 1 << 20  # a CSV line of paths; the csv module refuses a field over 128 KiB in any case
MAX_PARQUET_CHUNK = 256 << 20  # uncompressed bytes of the path column in one row group (read whole at once)
# bytes of one path as the table's dictionary expands it: 64 rows sharing one 8 MiB dictionary value
# declare 8 MiB but expand to 512 MiB (and as many Python strings); Linux refuses paths over 4 KiB
MAX_PATH_BYTES = 64 << 10
DECODE_ROWS = 1024  # rows turned into Python strings at a time: at most 64 MiB


class TableError(ClipnError):
    """A table of paths that cannot be read; the message starts with the table's path."""


def is_table(arg: str) -> bool:
    return arg.lower().endswith(TABLE_SUFFIXES) and os.path.isfile(arg)


def table_paths(path: str, batch_rows: int = 65_536) -> Iterator[str | None]:
    """The `path` column of a Parquet or CSV file, or the lines of a path list, streamed (one row
    group / line at a time); None or "" where a table's row has no name. A file that cannot be read
    as a table raises TableError."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        return _parquet_paths(path, batch_rows)
    return _list_paths(path) if lower.endswith(LIST_SUFFIXES) else _csv_paths(path)


def _parquet_paths(path: str, batch_rows: int) -> Iterator[str | None]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"{path}: reading a Parquet table needs pyarrow: pip install pyarrow (or 'clipn-cli[ray]')") from None
    try:
        with _open_regular(path) as fh:
            # read as dictionary-encoded: each value decoded once, rows as indices, so what rows expand
            # to is measured before a single row is turned into a string
            table = pq.ParquetFile(fh, read_dictionary=[PATH_COLUMN])
            if PATH_COLUMN not in table.schema_arrow.names:
                raise TableError(f"{path}: the table has no '{PATH_COLUMN}' column (columns: {', '.join(table.schema_arrow.names[:8])[:200]})")
            kind = table.schema_arrow.field(PATH_COLUMN).type
            kind = kind.value_type if pa.types.is_dictionary(kind) else kind
            text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
            if not (text or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
                raise TableError(f"{path}: the '{PATH_COLUMN}' column holds {str(kind)[:40]}, not file names (strings)")
            meta = table.metadata
            leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == PATH_COLUMN)
            row = 0  # rows before the current batch
            for group in range(meta.num_row_groups):
                # pyarrow decompresses a row group's column chunk whole: its declared size is checked first
                size = meta.row_group(group).column(leaf).total_uncompressed_size
                if size > MAX_PARQUET_CHUNK:
                    raise TableError(f"{path}: row group {group} holds {size >> 20} MB of path names uncompressed "
                                     f"(limit {MAX_PARQUET_CHUNK >> 20} MB); write smaller row groups, or is it a decompression bomb?")
                for batch in table.iter_batches(batch_size=batch_rows, row_groups=[group], columns=[PATH_COLUMN]):
                    column = batch.column(0)
                    bad = _first_too_long(column)  # measured before any row is expanded
                    for start in range(0, len(column) if bad is None else bad, DECODE_ROWS):
                        for value in column.slice(start, min(DECODE_ROWS, len(column) - start if bad is None else bad - start)).to_pylist():
                            # bytes: a name that is not UTF-8, kept as `find` gives it
                            yield value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
                    if bad is not None:
                        size = _lengths(column)[bad].as_py()
                        raise TableError(f"{path}: row {row + bad + 1} holds a path of {size:,} bytes (limit {MAX_PATH_BYTES >> 10} KiB; "
                                         "no file system has such names)")
                    row += len(column)
    except TableError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged file
        raise TableError(f"{path}: not a readable Parquet table ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None


def _lengths(column: Any) -> Any:
    """Each row's length in bytes (a pyarrow array), from the dictionary's values and the rows'
    indices when the column is dictionary-encoded: nothing is expanded."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        return pc.binary_length(column.dictionary).take(column.indices)
    return pc.binary_length(column)


def _first_too_long(column: Any) -> int | None:
    """The index of the first row whose path is over MAX_PATH_BYTES, or None."""
    import pyarrow.compute as pc

    index = pc.index(pc.greater(_lengths(column), MAX_PATH_BYTES), True).as_py()
    return None if index is None or index < 0 else index


def _csv_paths(path: str) -> Iterator[str | None]:
    reader = None
    try:
        with _open_regular(path) as raw:
            reader = csv.DictReader(_bounded_lines(raw))
            if PATH_COLUMN not in (reader.fieldnames or []):
                raise TableError(f"{path}: the CSV table has no '{PATH_COLUMN}' column in its header")
            for row in reader:
                yield row[PATH_COLUMN]
    except UnicodeTextError as exc:  # the offset and line in the file, not in a decoder's buffer
        raise TableError(f"{path}: not a UTF-8 CSV table (byte {exc.offset}, line {exc.line})") from None
    except (csv.Error, ValueError) as exc:  # NUL bytes, a field or line past the limits
        line = f"line {reader.line_num}: " if reader is not None and reader.line_num else ""
        raise TableError(f"{path}: not a readable CSV table ({line}{str(exc)[:160]})") from None
    except OSError as exc:
        raise TableError(f"{path}: cannot read the table: {exc.strerror or exc}") from None


def _list_paths(path: str) -> Iterator[str]:
    """The paths of a UTF-8 list, one per line, stripped; blank lines and `#` comments are not inputs."""
    try:
        with _open_regular(path) as raw:
            for line in _bounded_lines(raw):
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line
    except UnicodeTextError as exc:
        raise TableError(f"{path}: not a UTF-8 list of image paths (byte {exc.offset}, line {exc.line}); "
                         "is it an image with an unknown extension?") from None
    except ValueError as exc:  # a line past the limit
        raise TableError(f"{path}: not a readable list of image paths ({str(exc)[:160]})") from None
    except OSError as exc:
        raise TableError(f"{path}: cannot read the path list: {exc.strerror or exc}") from None


def _open_regular(path: str) -> IO[bytes]:
    """`path` opened for reading, refused unless a regular file (a table swapped for a FIFO after
    `is_table` looked must not block the driver)."""
    try:
        return open_regular(path)
    except NotRegularFileError:
        raise TableError(f"{path}: not a regular file (device, socket or pipe)") from None


def _bounded_lines(raw: IO[bytes]) -> Iterator[str]:
    """Lines of `raw`, each at most MAX_CSV_LINE bytes, decoded one at a time: a file without
    newlines must not be read into memory whole before the csv module's own field limit looks at
    it, and a byte that is not UTF-8 is named by its offset in the file and its line."""
    offset = 0
    for number in itertools.count(1):
        line = raw.readline(MAX_CSV_LINE + 1)
        if not line:
            return
        if len(line) > MAX_CSV_LINE:
            raise ValueError(f"a line longer than {MAX_CSV_LINE} bytes")
        yield decode_utf8(line, offset, number)
        offset += len(line)
