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
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ClipnError
from .store import COMMITTED, MANIFEST, OutputStore

SCHEMA = "clipn-scale-manifest/1"


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {"schema", "complete", "inputs", "records", "errors", "finished_shards"}
        job = {k: v for k, v in data.items() if k not in known}
        shards = {int(s["index"]): {k: v for k, v in s.items() if k != "index"} for s in data.get("finished_shards", [])}
        return cls(job, shards, data.get("inputs"), bool(data.get("complete")))


def load_manifest(store: OutputStore) -> Manifest | None:
    """manifest.json with the commit markers written since its last rewrite; None if there is none."""
    if not store.exists(MANIFEST):
        return None
    try:
        data = json.loads(store.read(MANIFEST))
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}")
        manifest = Manifest.from_dict(data)
        for name in store.list(COMMITTED):
            marker = json.loads(store.read(COMMITTED, name))
            manifest.shards.setdefault(int(marker.pop("index")), marker)
        return manifest
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ResumeError(f"{store.uri}/{MANIFEST}: not a clipn manifest ({exc})") from None


def check_resumable(old: Manifest, job: dict[str, Any], uri: str) -> None:
    """Refuse to mix shards of differently asked runs; names the first difference."""
    for key in sorted(set(old.job) | set(job)):
        if key != "clipn_version" and old.job.get(key) != job.get(key):
            raise ResumeError(f"--resume {uri}: the run there was made with {key}={old.job.get(key)!r}, "
                              f"this one has {key}={job.get(key)!r}; use the same options or a new --output")


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
