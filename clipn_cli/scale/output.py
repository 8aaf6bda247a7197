"""Reading a scale-out run's output back: its records, in input order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import ClipnError
from .manifest import ResumeError, load_manifest
from .records import SHARD_FORMATS, decode_shard
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
    fmt = manifest.job.get("format")
    if fmt not in SHARD_FORMATS:
        raise ResumeError(f"{uri}/manifest.json: not a clipn manifest (format {str(fmt)[:20]!r})")
    for index in sorted(manifest.shards):
        entry = manifest.shards[index]
        try:  # a shard file is read back from a folder others can write to: damage is one error naming it
            records = list(decode_shard(store.read(entry["file"]), fmt))
        except ClipnError as exc:  # the store's own message names the file
            raise ResumeError(f"{exc} (a shard the manifest lists as finished)") from None
        except (ValueError, KeyError, TypeError, OSError, RecursionError) as exc:  # pyarrow's errors are ValueError/OSError
            raise ResumeError(f"{uri}/{entry['file']}: damaged shard ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
        yield from records
