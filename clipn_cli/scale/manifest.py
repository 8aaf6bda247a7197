"""The manifest of a scale-out run: what was asked, what is finished, and the totals.

It is the commit record. A shard is finished when the manifest lists it (with its digest, record
and error counts). As each shard finishes, the driver writes a small commit marker
(`committed/part-NNNNNN.json`, after the shard file); it rewrites manifest.json itself at most
every `interval` seconds and at the end, then removes the markers it has folded in. A reader takes
manifest.json plus any markers, so a shard is never lost between two rewrites, and rewriting a
large manifest does not happen per shard. `--resume` trusts only what the manifest lists and
refuses to continue a run that was asked differently (other weights, classes, rule, format, shard
size or options that change the numbers), since its shards could not be mixed.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ClipnError, JSONLimitError
from ..files import JSONLimits, check_json
from ..outputs.records import SHARD_FORMATS
from .planner import shard_name
from .store import COMMITTED, MANIFEST, OutputStore

SCHEMA = "clipn-scale-manifest/1"
SHARD_FILE = re.compile(r"shards/part-[0-9]{6,}\.[a-z]{1,10}")
DIGEST = re.compile(r"[0-9a-f]{1,64}")
SUMMARY_KEYS = ("file", "records", "errors", "digest")  # what a finished shard's entry holds (with its index)


class ResumeError(ClipnError):
    """An output folder cannot be continued (or must not be overwritten)."""


@dataclass
class Manifest:
    """`job` fixes what the shards mean; `shards` maps a finished shard's index to its summary."""

    job: dict[str, Any]
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)
    inputs: int | None = None  # known once the whole input stream was planned
    complete: bool = False

    @property
    def records(self) -> int:
        return sum(s["records"] for s in self.shards.values())

    @property
    def errors(self) -> int:
        return sum(s["errors"] for s in self.shards.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            **self.job,
            "complete": self.complete,
            "inputs": self.inputs,
            "records": self.records,
            "errors": self.errors,
            "finished_shards": [{"index": i, **self.shards[i]} for i in sorted(self.shards)],
        }


MAX_MANIFEST_BYTES = 64 << 20  # ~400,000 shard entries; the file is read whole
MAX_MANIFEST_ELEMENTS = 4_000_000  # JSON values (counted before parsing): ~300 MB of Python objects at most
MAX_MARKER_BYTES = 64 << 10  # a marker is one shard's entry: ~150 bytes


def _parse(data: bytes, what: str) -> Any:
    """JSON of a manifest or marker, bounded before any object is built (`_check_elements`, then
    `files.check_json`'s depth and containers), and unambiguous: a key given twice (readers differ on
    which one counts) or NaN/Infinity (not JSON) is refused."""
    _check_elements(data)
    try:
        check_json(data, JSONLimits(values=MAX_MANIFEST_ELEMENTS, containers=MAX_MANIFEST_ELEMENTS, depth=32))
        return json.loads(data, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (JSONLimitError, _Ambiguous):
        raise
    except (ValueError, RecursionError) as exc:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        raise ValueError(f"{what} is not valid JSON ({str(exc)[:120]})") from None


class _Ambiguous(ValueError):
    """JSON that readers read differently."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Ambiguous(f"the key {_shown(twice)} is given twice")
    return data


def _no_constant(name: str) -> Any:
    raise _Ambiguous(f"{name} is not a JSON number")


def _check_elements(data: bytes) -> bytes:
    """Refuse JSON with more than MAX_MANIFEST_ELEMENTS values before building any: a small file of
    a long list (`[0,0,0,...]`) makes objects 40 times its size. Every value after the first
    follows a ',' or ':' or opens a '[' or '{', so their count bounds the values from above."""
    count = sum(data.count(c) for c in (b",", b":", b"[", b"{"))
    if count > MAX_MANIFEST_ELEMENTS:
        raise ValueError(f"more than {MAX_MANIFEST_ELEMENTS:,} JSON values")
    return data


def previous_run(store: OutputStore, resume: bool) -> Manifest | None:
    """The run already in `store` (None for an empty or new folder), refusing what must not be
    written over: another run without --resume, or shard files without a manifest. Cheap (a
    manifest read), so the command asks before it starts a cluster."""
    old = load_manifest(store)
    if old is None:
        if store.has_shard_files():
            raise ResumeError(f"--output {store.uri}: holds shard files but no clipn manifest: choose an empty or new folder")
        return None
    if not resume:
        state = "a finished" if old.complete else "an unfinished"
        raise ResumeError(f"--output {store.uri}: holds {state} clipn run ({len(old.shards)} shards): add --resume to continue it, or choose a new folder")
    return old


def load_manifest(store: OutputStore) -> Manifest | None:
    """manifest.json with the commit markers written since its last rewrite; None if there is none.

    Both are read back from a folder others can write to: bounded in size, depth-limited, and each
    shard entry checked (an index, record and error counts, a digest and a file name), so a damaged
    or hostile manifest is one line naming it, not a traceback later.
    """
    if not store.exists(MANIFEST):
        return None
    where = f"{store.uri}/{MANIFEST}"
    try:
        manifest = _checked_manifest(_parse(store.read(MANIFEST, limit=MAX_MANIFEST_BYTES), "manifest.json"))
        for name in store.list(COMMITTED):
            where = f"{store.uri}/{COMMITTED}/{name}"
            marker = _check_summary(_parse(store.read(COMMITTED, name, limit=MAX_MARKER_BYTES), "commit marker"), manifest.job["format"])
            manifest.shards.setdefault(marker.pop("index"), marker)
        where = f"{store.uri}/{MANIFEST}"
        if manifest.complete:
            _check_complete(manifest)
        return manifest
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:  # SafetensorsError is a ValueError
        raise ResumeError(f"{where}: not a clipn manifest ({str(exc)[:200]})") from None


def _checked_manifest(data: Any) -> Manifest:
    """manifest.json's object as the driver writes it, or ValueError naming what is wrong: every field
    a reader relies on has its type, and the totals agree with the shards listed."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"schema {str(data.get('schema') if isinstance(data, dict) else type(data).__name__)[:40]!r}")
    entries = data.get("finished_shards", [])
    if not isinstance(entries, list):
        raise ValueError("finished_shards is not a list")
    if data.get("format") not in SHARD_FORMATS:
        raise ValueError(f"format {_shown(data.get('format'))[:20]}")
    shards = [_check_summary(entry, data["format"]) for entry in entries]
    if not isinstance(data.get("complete", False), bool):
        raise ValueError(f"complete is {_shown(data['complete'])[:20]}, not true or false")
    for key in ("inputs", "shard_size"):
        if data.get(key) is not None and not _is_count(data[key]):
            raise ValueError(f"{key} is {_shown(data[key])[:20]}, not a count")
    for key in ("records", "errors"):  # written from the shards listed: another total means an edit
        if key in data and data[key] != sum(s[key] for s in shards):
            raise ValueError(f"{key} is {_shown(data[key])[:20]}, the finished shards hold {sum(s[key] for s in shards)}")
    job = {k: v for k, v in data.items() if k not in {"schema", "complete", "inputs", "records", "errors", "finished_shards"}}
    manifest = Manifest(job, {s.pop("index"): s for s in shards}, data.get("inputs"), data.get("complete", False))
    if len(manifest.shards) != len(shards):
        raise ValueError("a shard is listed twice")
    return manifest


def _check_complete(manifest: Manifest) -> None:
    """A finished run lists every shard of its inputs: shards 0..n-1, as many records as inputs, so a
    reader of it never misses a shard that an edit removed from the list."""
    missing = next((i for i in range(len(manifest.shards)) if i not in manifest.shards), None)
    if missing is not None:
        raise ValueError(f"complete, but shard {missing} is not listed")
    if manifest.inputs != manifest.records:
        raise ValueError(f"complete, but its shards hold {manifest.records} records for {_shown(manifest.inputs)[:20]} inputs")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 53


def _check_summary(entry: Any, fmt: str) -> dict[str, Any]:
    """A finished shard's entry as the driver writes it (only its own keys kept: an entry padded with
    more is not held), or ValueError naming what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError("a finished shard is not an object")
    for key in ("index", "records", "errors"):
        value = entry.get(key)
        if not _is_count(value):
            raise ValueError(f"a finished shard's {key} is {str(value)[:20]!r}, not a count")
    if not (isinstance(entry.get("digest"), str) and DIGEST.fullmatch(entry["digest"])):
        raise ValueError("a finished shard has no digest")
    if not (isinstance(entry.get("file"), str) and SHARD_FILE.fullmatch(entry["file"])):  # never a path out of the folder
        raise ValueError(f"a finished shard's file {str(entry.get('file'))[:60]!r} is not shards/part-NNNNNN.FORMAT")
    if not entry["file"].endswith(f".{fmt}"):  # read as the run's format, so written as it
        raise ValueError(f"a finished shard's file {entry['file'][:60]!r} is not a {fmt} shard")
    if entry["file"].split("/")[1].split(".")[0] != shard_name(entry["index"]):  # one shard, one file: never read twice
        raise ValueError(f"shard {entry['index']}'s file is {entry['file'][:60]!r}, not {shard_name(entry['index'])}")
    if entry["errors"] > entry["records"]:
        raise ValueError(f"shard {entry['index']} has more errors than records")
    return {"index": entry["index"], **{key: entry[key] for key in SUMMARY_KEYS}}


def check_resumable(old: Manifest, job: dict[str, Any], uri: str) -> None:
    """Refuse to mix shards of differently asked runs; names the first difference."""
    for key in sorted(set(old.job) | set(job)):
        if key != "clipn_version" and old.job.get(key) != job.get(key):
            raise ResumeError(f"--resume {uri}: the run there was made with {key[:40]}={_shown(old.job.get(key))}, "
                              f"this one has {key[:40]}={_shown(job.get(key))}; use the same options or a new --output")


def _shown(value: Any) -> str:
    """A value for a one-line message: a manifest may hold anything, of any length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ManifestWriter:
    """Rewrites the manifest as shards finish, at most every `interval` seconds (and on `flush`)."""

    def __init__(self, store: OutputStore, manifest: Manifest, interval: float = 2.0) -> None:
        self.store = store
        self.manifest = manifest
        self.interval = interval
        self._last = 0.0
        self._dirty = True

    def finished(self, index: int, summary: dict[str, Any]) -> None:
        """Commit a shard whose file is written: its marker now, the manifest when `interval` has passed."""
        self.store.write(json.dumps({"index": index, **summary}).encode("utf-8"), COMMITTED, f"{summary['file'].rsplit('/', 1)[-1]}.json")
        self.manifest.shards[index] = summary
        self._dirty = True
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self, force: bool = False) -> None:
        """Rewrite manifest.json (atomically), then drop the markers it now holds."""
        if not (self._dirty or force):
            return
        folded = set(self.store.list(COMMITTED))
        self.store.write(json.dumps(self.manifest.as_dict(), indent=1).encode("utf-8"), MANIFEST)
        for name in folded:
            self.store.delete(COMMITTED, name)
        self._last = time.monotonic()
        self._dirty = False
