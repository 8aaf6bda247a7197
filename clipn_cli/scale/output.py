"""Reading a scale-out run's output back: its records, in input order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .manifest import ResumeError, load_manifest
from .records import decode_shard
from .store import OutputStore


def read_output(uri: str, require_complete: bool = True) -> Iterator[dict[str, Any]]:
    """Every record of the finished shards of the run at `uri` (a folder or URI), shard by shard.

    Only shards the manifest lists are read, so a shard file of an interrupted run that was
    never committed is not. With `require_complete`, an unfinished run is refused.
    """
    store = OutputStore.open(uri)
    manifest = load_manifest(store)
    if manifest is None:
        raise ResumeError(f"{uri}: no clipn manifest here")
    if require_complete and not manifest.complete:
        raise ResumeError(f"{uri}: the run is not finished ({len(manifest.shards)} shards so far): continue it with --resume")
    for index in sorted(manifest.shards):
        entry = manifest.shards[index]
        yield from decode_shard(store.read(entry["file"]), manifest.job["format"])
