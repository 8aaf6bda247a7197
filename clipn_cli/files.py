"""File helpers: atomic writes and hashing for every file clipn writes, and the bounded reads
(regular files only, size, JSON cost, UTF-8 offsets) of every file it reads."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import (  # noqa: F401  (the bounded readers' errors, importable from here as before)
    ClipnError, FileTooLargeError, JSONLimitError, NotRegularFileError, OutputError, UnicodeTextError,
)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(OutputError, OSError):
    """A write ran out of space (or quota): the message names the file; nothing partial is left.

    An OSError too, so that code handling a failed write still handles it."""

    def __str__(self) -> str:
        return str(self.strerror)  # the line itself, without "[Errno 28]"


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota, or a Rust writer's (safetensors) "(os error 28)" text."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    return any(f"(os error {n})" in str(exc) for n in DISK_FULL_ERRNOS)


def disk_full(target: object, kept: str = "nothing was written") -> DiskFullError:
    """The one line a full disk gives: which file, that the disk is full, and what is left of it."""
    return DiskFullError(errno.ENOSPC, f"{target}: the disk is full (no space left on the device); {kept}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds.

    Readers never see a half-written file and an interrupted write leaves nothing behind,
    because rename is atomic within one directory. A symlink is written through (the file it
    points to is replaced, the link stays); a device, pipe or directory is refused, since
    renaming over it would replace it.
    """
    target = _real_target(Path(target))
    if _is_special(target) or _is_stream_alias(target):
        raise IsADirectoryError(f"{target}: is a directory") if target.is_dir() else OSError(f"{target}: not a regular file")
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = target.stat().st_mode & 0o777 if target.is_file() else 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:  # no inode left
        raise (disk_full(target) if is_disk_full(exc) else exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # after the block: writers such as safetensors replace tmp with their own 0600 file
        os.replace(tmp_path, target)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full(target) from None
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "w", **kwargs: object) -> Iterator[IO]:
    """Open a file for writing that appears at `target` atomically when the block succeeds.

    A stream (`>(cmd)`, /dev/stdout) cannot be replaced atomically: it is written in place (`open_in_place`).
    """
    if is_stream(Path(target)):
        try:
            with open_in_place(target, mode, **kwargs) as fh:
                yield fh
        except OSError as exc:
            raise (disk_full(target, "what was written before is kept") if is_disk_full(exc) else exc) from None
        return
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as fh:  # type: ignore[call-overload]
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def open_in_place(target: str | os.PathLike[str], mode: str = "w", **kwargs: object) -> IO:
    """Open `target` itself for writing (no temporary file), creating its folder.

    A stream is appended to, never truncated: /dev/stdout may be a file the shell opened with `>>`.
    """
    path = Path(target)
    if is_stream(path):
        mode = mode.replace("w", "a")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, mode, **kwargs)  # type: ignore[call-overload]


class LineFile:
    """A text file written a whole line at a time, straight to the descriptor (no buffer).

    For JSON Lines, which keeps every finished record of a cut run: a write the disk cannot hold
    is cut back to the last whole line (so `--resume` continues cleanly) and raised as one
    DiskFullError naming the file. On a stream (pipe, /dev/stdout) nothing can be cut back.
    """

    def __init__(self, target: str | os.PathLike[str], append: bool = False, errors: str = "strict") -> None:
        self.path = Path(target)
        self._errors = errors
        self._fh = open_in_place(self.path, "ab" if append else "wb", buffering=0)
        st = os.fstat(self._fh.fileno())
        self._end = st.st_size
        self._regular = stat.S_ISREG(st.st_mode)

    def write(self, text: str) -> int:
        data = text.encode("utf-8", self._errors)
        view = memoryview(data)
        try:
            while view:
                view = view[self._fh.write(view) or 0:]
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            if self._regular:
                os.ftruncate(self._fh.fileno(), self._end)
            raise disk_full(self.path, "the records written before are kept, no partial line") from None
        self._end += len(data)
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered: every `write` reached the file."""

    def isatty(self) -> bool:
        return self._fh.isatty()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> LineFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_stream(path: Path) -> bool:
    """A write to `path` goes to a stream, not into a file that could be replaced: a pipe or device,
    or another name for one of this process's open streams (see `_is_stream_alias`)."""
    return _is_stream_alias(path) or (_is_special(path) and not path.is_dir())


def _is_stream_alias(path: Path) -> bool:
    """/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N: another name for an open stream of
    this process, whatever it is connected to (following the link would find the shell's file)."""
    text = os.path.abspath(path)
    return text in ("/dev/stdout", "/dev/stderr") or text.startswith(("/dev/fd/", "/proc/self/fd/"))


def _real_target(path: Path) -> Path:
    """Where a write to `path` lands: the end of its symlink chain, if it is a link to a plain path."""
    if not path.is_symlink() or _is_special(path):
        return path
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{path}: symbolic link loop") from None
    return Path(os.path.realpath(path))


def _is_special(path: Path) -> bool:
    """Exists (following links) and is not a regular file: a directory, pipe, socket or device."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


def open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """`path` opened for reading, refused at once unless it is a regular file.

    The one open of every file clipn reads whole (weights headers, configs, calibration files, word
    lists, tables): a FIFO opened without O_NONBLOCK waits for a writer for ever, and a path swapped
    for one after a check must be caught on the opened descriptor. Devices are refused before they
    are opened (opening some has side effects). Raises IsADirectoryError, NotRegularFileError or OSError.
    """
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path)
    fd = os.open(path, OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path)
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb", closefd=True)


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (`open_regular`, then one bounded read).

    For inputs a user names (class lists, templates, configs): /dev/zero would fill memory and a FIFO
    with no writer would block forever; a sparse file declaring 8 GiB is refused by its size before
    anything is read, and a file growing meanwhile by the read itself. Raises OSError (file
    problems) or ValueError (what it is not), each with a message fit to follow the file's name.
    """
    with open_regular(path) as fh:
        st = os.fstat(fh.fileno())
        data = fh.read(limit + 1) if st.st_size <= limit else None  # read one byte more: the file may grow
    if data is None or len(data) > limit:
        raise FileTooLargeError(f"larger than {size_text(limit)} (the limit for this kind of file)", path)
    return data


def size_text(count: int) -> str:
    """A byte limit as people read it (64 KiB, 256 MiB)."""
    return f"{count >> 20} MiB" if count >= 1 << 20 else f"{count >> 10} KiB" if count >= 1 << 10 else f"{count} bytes"


@dataclass(frozen=True)
class JSONLimits:
    """What one JSON document may hold, checked on its text before any object is built.

    Parsed JSON costs up to about 60 bytes of memory per value (a float, a short string and its
    slot in a list) and more per list or object, so a few MB of `[[],[],...]` or `[0,0,...]` cost
    GBs: `values` bounds the values and keys, `containers` the lists and objects, `depth` the nesting.
    """

    values: int = 1_000_000
    containers: int = 100_000
    depth: int = 32


_STRING = re.compile(rb'"[^"]*"')  # after escaped quotes are removed: one scan, no backtracking state
_BRACKET = re.compile(rb"[][{}]")


def check_json(data: bytes, limits: JSONLimits) -> None:
    """Refuse `data` if parsing it could build more than `limits` allow (JSONLimitError).

    A pre-scan in C-speed passes over the text (string contents removed, so brackets and commas in
    names do not count): values <= 1 + commas + colons + brackets, containers = opening brackets,
    and the depth from the brackets, the scan stopping at the first bracket past a limit.
    """
    if b"\\" in data:  # escaped backslashes first, so that the quote after "\\" is seen as the end
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    if b'"' in data:
        data = _STRING.sub(b"0", data)
    depth = deepest = containers = 0
    for match in _BRACKET.finditer(data):  # stops within 2 x limits.containers brackets, or at the first too deep
        if match.group() in (b"[", b"{"):
            containers += 1
            depth += 1
            if containers > limits.containers:
                raise JSONLimitError(f"holds more than {limits.containers:,} lists or objects (the limit)")
            if depth > deepest:
                deepest = depth
                if deepest > limits.depth:
                    raise JSONLimitError(f"is nested too deeply (limit {limits.depth} levels)")
        else:
            depth -= 1
    values = 1 + data.count(b",") + data.count(b":") + containers
    if values > limits.values:
        raise JSONLimitError(f"holds about {values:,} values (limit {limits.values:,})")


def parse_json(data: bytes | str, limits: JSONLimits = JSONLimits()) -> Any:
    """`json.loads` of untrusted text whose cost is bounded by `limits` (checked first, see `check_json`).

    Raises JSONLimitError, or ValueError for text that is not JSON or not UTF-8.
    """
    check_json(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data, limits)
    try:
        return json.loads(data)
    except RecursionError:  # unreachable past the depth check; kept as a refusal, never a traceback
        raise JSONLimitError(f"is nested too deeply (limit {limits.depth} levels)") from None


def read_json(path: str | os.PathLike[str], max_bytes: int, limits: JSONLimits = JSONLimits()) -> Any:
    """A JSON file read with `read_bounded(path, max_bytes)` and parsed with `parse_json`.

    The one reader of JSON files: every JSON file clipn reads is bounded in size, values, containers
    and depth before an object is built. Raises OSError, or ValueError (JSONLimitError, not JSON,
    not UTF-8, not a regular file, too large) with a message fit to follow the file's name.
    """
    data = read_bounded(path, max_bytes)
    try:
        return parse_json(data, limits)
    except JSONLimitError as exc:
        exc.path = path  # named on its own line where no reader wraps it
        raise


def decode_utf8(data: bytes, offset: int = 0, line: int = 1) -> str:
    """`data` as UTF-8 (a BOM at the start of the file dropped); a bad byte raises UnicodeTextError
    naming its true place: its offset in the file and its line.

    `offset` and `line` say where `data` starts in its file (for files decoded a piece at a time).
    Python's own offsets are relative to a decoder's buffer, and to the text after a BOM.
    """
    start = 3 if offset == 0 and data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[start:].decode("utf-8") if start else data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = start + exc.start
        raise UnicodeTextError(offset + bad, line + data.count(b"\n", 0, bad)) from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so that GB checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def env_number(name: str, default: float, kind: type = int, error: type[ClipnError] = ClipnError, finite: bool = False) -> Any:
    """A positive number from the environment, or the default (a bad value is an `error` naming the
    variable); `finite` also refuses infinity, for limits that must end."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if not value > 0 or (finite and value == float("inf")):
        raise error(f"${name} must be a positive number, not {raw[:40]!r}")
    return value
