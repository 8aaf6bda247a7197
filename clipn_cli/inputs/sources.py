"""What the user named as inputs, expanded into one InputItem per image: files, folders (recursive,
image extensions), globs, paths on stdin, path tables and path lists. Nothing here decodes an image
(`decode`). Every command (detect, eval, calibrate, the Ray engine) reads its inputs here, so they all
accept the kinds `INPUT_KINDS_HELP` lists.
"""

from __future__ import annotations

import errno
import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .tables import PATH_COLUMN, TableError, is_table, table_paths

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
GLOB_CHARS = frozenset("*?[")
# The input kinds every command accepts, as its help text names them (one place for all of them).
INPUT_KINDS_HELP = (
    "image files, directories (recursive), glob patterns, .csv/.parquet tables with a path column, "
    ".txt/.lst lists of paths (one per line), or - for paths on stdin"
)


@dataclass(frozen=True)
class InputItem:
    """One input as the user named it; `error` is set when it could not even be found.

    `data` holds the file's bytes when they were read elsewhere (a Ray Dataset's `bytes` column):
    they are then decoded instead of opening `path`.
    """

    path: str
    error: str | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)


def iter_inputs(args: Iterable[str], stdin: IO[str] | IO[bytes] | None = None) -> Iterator[InputItem]:
    """Expand files, directories (recursive, image extensions), globs, `-` (paths on stdin) and
    tables (a .parquet or .csv file's `path` column, a .txt or .lst list's lines, see `iter_table`).

    Lazy: paths from stdin and tables are yielded as they are read, so millions of them stream through.
    Path lines are read as bytes and decoded as the file system does (`os.fsdecode`), so a file
    name that is not valid in the locale's encoding is one input like any other, in every locale.
    """
    for arg in args:
        if arg == "-":
            if stdin is None:
                continue
            for line in _path_lines(stdin):
                if line:
                    yield InputItem(line)
        elif is_table(arg):
            try:
                yield from iter_table(arg)
            except TableError as exc:  # the rows before stay inputs; the table gets its error record
                yield InputItem(arg, error=str(exc).removeprefix(f"{arg}: "))
        elif os.path.isdir(arg):
            found = False
            for item in _walk(arg):
                found = True
                yield item
            if not found:
                yield InputItem(arg, error="directory contains no image files")
        elif os.path.lexists(arg) or not GLOB_CHARS & set(arg):
            yield InputItem(arg)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                yield InputItem(arg, error="no file matches this pattern")
            for match in matches:
                yield from _walk(match) if os.path.isdir(match) else (InputItem(match),)


def iter_table(path: str, batch_rows: int = 65_536) -> Iterator[InputItem]:
    """The inputs a table names, streamed; raises TableError when it cannot be read as a table.

    Relative paths in a table or list are taken relative to its folder, so a table and its images
    can move together.
    """
    base = os.path.dirname(path)
    for row, value in enumerate(table_paths(path, batch_rows), 1):
        if value:
            yield InputItem(os.path.join(base, value))
        else:  # a row is an input: an empty or missing name gets its error record, never silently dropped
            yield InputItem(f"{path} row {row}", error=f"empty '{PATH_COLUMN}' value in the table")


def _path_lines(stdin: IO[str] | IO[bytes]) -> Iterator[str]:
    raw = getattr(stdin, "buffer", stdin)
    for line in raw:
        if isinstance(line, bytes):
            yield os.fsdecode(line.rstrip(b"\r\n"))
        else:
            yield line.rstrip("\r\n")


def _walk(directory: str) -> Iterator[InputItem]:
    """Image files under `directory`, recursively, in a stable (sorted) order.

    A sub-folder that cannot be listed becomes an error record in its place, so that its images
    are not silently missing from the results.
    """
    failed: list[OSError] = []
    for root, dirs, files in os.walk(directory, onerror=failed.append):
        while failed:
            yield _unreadable_dir(failed.pop(0))
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield InputItem(os.path.join(root, name))
    while failed:
        yield _unreadable_dir(failed.pop(0))


def _unreadable_dir(exc: OSError) -> InputItem:
    path = exc.filename if isinstance(exc.filename, str) else str(exc.filename)
    return InputItem(path, error=f"cannot list this folder ({os_reason(exc)}): its images are not scored")


def os_reason(exc: OSError) -> str:
    """What an OSError means for an input, in a few words."""
    reasons = {
        errno.ENOENT: "no such file", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
        errno.ELOOP: "symbolic link loop", errno.ENAMETOOLONG: "file name too long",
        errno.ENOTDIR: "a part of the path is not a folder", errno.EISDIR: "is a directory, not an image",
        errno.EIO: "input/output error reading the file", errno.ENXIO: "no such device",
    }
    return reasons.get(exc.errno or 0) or (exc.strerror or type(exc).__name__).lower()
