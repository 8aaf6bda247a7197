"""Training data: (image, caption) pairs from an index file, a folder, or webdataset tar shards.

- Index: CSV, TSV or JSONL with an image-path column and a caption column (paths relative to
  the index file). Column names are found among common ones (`image`, `filepath`, ... /
  `caption`, `text`, `title`, ...) or given explicitly; a CSV/TSV without a header row is read
  as (image, caption).
- Folder: every image with a same-named `.txt` caption beside it, recursively.
- Shards: `.tar` files as img2dataset writes them (`KEY.jpg`/`KEY.png` + `KEY.txt`), brace
  patterns such as `cc3m-{00000..00331}.tar`; read as a stream with the stdlib `tarfile`, nothing
  is extracted to disk and no file content is ever executed.

Index and folder sources are finite and indexable (their features can be cached); shards are
streamed, each process reading its own subset of shards in a seeded order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..files import read_bounded
from ..inputs.sources import IMAGE_EXTENSIONS

IMAGE_KEYS = ("image", "filepath", "file", "path", "image_path", "img", "jpg", "png")
CAPTION_KEYS = ("caption", "text", "title", "txt", "prompt")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 64 << 20  # a tar member larger than this is not an image we can use
MAX_INDEX_BYTES = 1 << 30  # an index file (CSV/TSV/JSONL) is read whole: at most 1 GiB
# A caption is at most 16 KiB of UTF-8, whatever holds it (an index field, a `.txt` beside an image or
# in a shard): CLIP's tokenizer keeps 77 tokens (a few hundred bytes), and a longer text only costs
# tokenizer time and memory. In an index or a folder a longer one is one DataError naming the file
# (and line); in a shard stream its sample is skipped unread.
MAX_CAPTION_BYTES = 16 << 10
MAX_SHARDS = 1_000_000  # brace patterns expand to at most this many shard names (LAION-5B has 231,350)
SHUFFLE_BUFFER_BYTES = 256 << 20  # encoded images held by a shard stream's shuffle buffer
BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Pair:
    """One training sample: an image (a file path, or encoded bytes from a shard) and its caption."""

    key: str
    caption: str
    image: str | bytes


def caption_id(caption: str) -> int:
    """A 63-bit id of the exact caption text: equal captions, equal ids, in every process."""
    return int.from_bytes(hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest(), "little") >> 1


@dataclass
class IndexedData:
    """A finite list of pairs whose images are files: can be shuffled by index and cached."""

    pairs: list[Pair]
    description: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class ShardData:
    """Webdataset tar shards, read as a stream."""

    shards: list[str]
    description: str
    shuffle_buffer: int = 1000
    skipped: list[str] = field(default_factory=list)

    def stream(self, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[Pair]:
        """This process's endless sample stream: epoch after epoch over its shards, seeded shuffles.

        The sequence depends only on (seed, rank, world_size), so a resumed run can skip what it
        already used and see exactly the samples the uninterrupted run would have seen.
        """
        if len(self.shards) < world_size:
            raise DataError(f"{self.description}: {len(self.shards)} shard(s) cannot feed {world_size} processes; give at least one shard per process")
        mine = self.shards[rank::world_size]
        for epoch in itertools.count():
            rng = random.Random(f"{seed}:{epoch}:{rank}")
            order = list(mine)
            rng.shuffle(order)
            found = 0
            for pair in _shuffled((pair for shard in order for pair in read_shard(shard)), self.shuffle_buffer, rng):
                found += 1
                yield pair
            if not found:  # else the next epoch would find nothing either, for ever
                raise DataError(f"{self.description}: no (image, caption) pair in {_shards_named(mine)}")


def _shuffled(items: Iterator[Pair], size: int, rng: random.Random) -> Iterator[Pair]:
    """Approximate shuffle of a stream with a buffer of `size` items (webdataset's method)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Pair] = []
    held = 0  # encoded image bytes in the buffer: big samples make it hold fewer
    for item in items:
        cost = len(item.image) if isinstance(item.image, bytes) else 0
        if len(buffer) < size and (held + cost <= SHUFFLE_BUFFER_BYTES or not buffer):
            buffer.append(item)
            held += cost
            continue
        j = rng.randrange(len(buffer))
        out = buffer[j]
        yield out
        buffer[j] = item
        held += cost - (len(out.image) if isinstance(out.image, bytes) else 0)
    rng.shuffle(buffer)
    yield from buffer


def _shards_named(shards: list[str]) -> str:
    return shards[0] if len(shards) == 1 else f"{len(shards)} shards ({shards[0]}, ...)"


def brace_count(pattern: str) -> int:
    """How many names `pattern` expands to, computed without expanding it."""
    count = 1
    for match in BRACE.finditer(pattern):
        span = re.fullmatch(r"(\d+)\.\.(\d+)", match.group(1))
        count *= max(0, int(span.group(2)) - int(span.group(1)) + 1) if span else len(match.group(1).split(","))
    return count


def expand_braces(pattern: str, limit: int = MAX_SHARDS) -> list[str]:
    """Expand `{a,b}` lists and `{000..123}` numeric ranges (zero padding kept), left to right;
    a pattern naming more than `limit` shards is refused before anything is built."""
    if (count := brace_count(pattern)) > limit:
        raise DataError(f"{pattern}: names {count:,} shards, more than the {limit:,} allowed")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    match = BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.group(1), span.group(2)
        if int(hi) < int(lo):
            raise DataError(f"{pattern}: empty range {{{body}}}")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in _expand(head + option + tail)]


def read_shard(path: str) -> Iterator[Pair]:
    """Pairs of one tar shard, in file order: members grouped by key (name up to the first dot)."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            key, parts = None, {}
            for member in tar:
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    continue
                directory, name = os.path.split(member.name)
                stem, _, ext = name.partition(".")
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key:
                    if key is not None and (pair := _pair(path, key, parts)):
                        yield pair
                    key, parts = member_key, {}
                ext = ext.lower()
                # only what a sample uses is read: one image, a caption of at most MAX_CAPTION_BYTES (a
                # longer one is left unread and its sample skipped, as a stream skips what it cannot use)
                wanted = (ext == "txt" and member.size <= MAX_CAPTION_BYTES) or (
                    ext in SHARD_IMAGE_EXTS and not any(e in parts for e in SHARD_IMAGE_EXTS)
                )
                handle = tar.extractfile(member) if wanted else None
                if handle is not None:
                    parts[ext] = handle.read()
            if key is not None and (pair := _pair(path, key, parts)):
                yield pair
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:  # ValueError: a damaged compressed stream
        raise DataError(f"{path}: cannot read tar shard ({str(exc).strip() or type(exc).__name__})") from None


def _pair(shard: str, key: str, parts: dict[str, bytes]) -> Pair | None:
    """A sample needs a caption and an image; others (json, parquet leftovers) are ignored."""
    image = next((parts[e] for e in SHARD_IMAGE_EXTS if e in parts), None)
    if image is None or "txt" not in parts:
        return None
    caption = parts["txt"].decode("utf-8", errors="replace").strip()
    return Pair(f"{shard}:{key}", caption, image) if caption else None


def read_index(path: str | os.PathLike[str], image_key: str | None = None, caption_key: str | None = None) -> IndexedData:
    """An index file: `.jsonl` (one object per line) or `.csv`/`.tsv` (comma / tab separated)."""
    path = Path(path)
    try:
        text = read_bounded(path, MAX_INDEX_BYTES).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # not a regular file, too large
        raise DataError(f"{path}: {exc}") from None
    rows = _jsonl_rows(path, text, image_key, caption_key) if path.suffix.lower() == ".jsonl" else _table_rows(path, text, image_key, caption_key)
    pairs, skipped = [], []
    for line, image, caption in rows:
        if (size := len(caption.encode("utf-8", "surrogatepass"))) > MAX_CAPTION_BYTES:
            raise DataError(f"{path}:{line}: {_long_caption(size)}")
        caption = caption.strip()
        if not image.strip():
            raise DataError(f"{path}:{line}: empty image path")
        if not caption:
            skipped.append(f"{path}:{line}: empty caption")
            continue
        full = image if os.path.isabs(image) else str(path.parent / image)
        pairs.append(Pair(full, caption, full))
    return _checked(IndexedData(pairs, str(path), skipped))


def _pick(columns: list[str], given: str | None, known: tuple[str, ...], what: str, source: Path) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"{source}: no {what} column '{given}' (columns: {', '.join(columns)})")
        return given
    lowered = {c.lower(): c for c in columns}
    for name in known:
        if name in lowered:
            return lowered[name]
    raise DataError(f"{source}: no {what} column found among {', '.join(columns)}; name it with --{what}-key")


def _jsonl_rows(path: Path, text: str, image_key: str | None, caption_key: str | None) -> Iterator[tuple[int, str, str]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        columns = list(obj)
        image = obj[_pick(columns, image_key, IMAGE_KEYS, "image", path)]
        caption = obj[_pick(columns, caption_key, CAPTION_KEYS, "caption", path)]
        if not isinstance(image, str) or not isinstance(caption, str):
            raise DataError(f"{path}:{number}: image and caption must be strings")
        yield number, image, caption


def _table_rows(path: Path, text: str, image_key: str | None, caption_key: str | None) -> Iterator[tuple[int, str, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as exc:  # a field over the csv module's 128 KiB limit, a NUL byte
        raise DataError(f"{path}:{reader.line_num}: not a valid {'TSV' if delimiter == chr(9) else 'CSV'} line ({exc})") from None
    if not rows:
        return
    header = [c.strip() for c in rows[0]]
    lowered = {c.lower() for c in header}
    has_header = image_key is not None or caption_key is not None or (
        bool(lowered & set(IMAGE_KEYS)) and bool(lowered & set(CAPTION_KEYS))
    )
    if has_header:
        image_col = header.index(_pick(header, image_key, IMAGE_KEYS, "image", path))
        caption_col = header.index(_pick(header, caption_key, CAPTION_KEYS, "caption", path))
        body, first = rows[1:], 2
    else:
        image_col, caption_col, body, first = 0, 1, rows, 1
    for number, row in enumerate(body, first):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(image_col, caption_col):
            raise DataError(f"{path}:{number}: expected an image column and a caption column, got {len(row)} field(s)")
        yield number, row[image_col], row[caption_col]


def read_folder(path: str | os.PathLike[str]) -> IndexedData:
    """Images under a folder (recursive) each with a same-named `.txt` caption; others are skipped."""
    root = Path(path)
    pairs, skipped = [], []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            image = Path(directory) / name
            if image.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            caption_file = image.with_suffix(".txt")
            if not caption_file.is_file():
                skipped.append(f"{image}: no caption file {caption_file.name}")
                continue
            try:
                caption = read_bounded(caption_file, MAX_CAPTION_BYTES).decode("utf-8-sig").strip()
            except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not a regular file, over MAX_CAPTION_BYTES
                raise DataError(f"{caption_file}: cannot read caption ({exc})") from None
            if caption:
                pairs.append(Pair(str(image), caption, str(image)))
            else:
                skipped.append(f"{caption_file}: empty caption")
    return _checked(IndexedData(pairs, str(root), skipped))


def _long_caption(size: int) -> str:
    return f"a caption of {size:,} bytes, more than the {MAX_CAPTION_BYTES >> 10} KiB a caption may hold"


def _checked(data: IndexedData) -> IndexedData:
    if not data.pairs:
        reason = f" (first problem: {data.skipped[0]})" if data.skipped else ""
        raise DataError(f"{data.description}: no (image, caption) pairs found{reason}")
    return data


def open_data(
    spec: str, image_key: str | None = None, caption_key: str | None = None, shuffle_buffer: int = 1000
) -> IndexedData | ShardData:
    """Recognise a data source from its spec: a folder, tar shards (braces allowed) or an index file."""
    if spec.endswith(".tar") or "{" in spec:
        shards = expand_braces(spec)
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"{missing[0]}: no such shard ({len(missing)} of {len(shards)} missing)")
        return ShardData(shards, spec, shuffle_buffer)
    if os.path.isdir(spec):
        return read_folder(spec)
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: no such file or folder")
    if Path(spec).suffix.lower() not in (".csv", ".tsv", ".jsonl"):
        raise DataError(f"{spec}: unknown data format; give a .csv, .tsv or .jsonl index, a folder, or .tar shards")
    return read_index(spec, image_key, caption_key)
