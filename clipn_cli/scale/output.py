"""Reading a scale-out run's output back (its records, in input order), and the one pass over all of
it that a run's false-discovery control needs."""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from typing import Any

from ..errors import ClipnError, ShardError
from .manifest import Manifest, ResumeError, load_manifest
from ..outputs.records import MAX_SHARD_BYTES, SHARD_FORMATS, decode_shard, encode_shard
from ..verdicts import set_q_value
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
        yield from _shard_records(store, manifest, index)


def _shard_records(store: OutputStore, manifest: Manifest, index: int) -> list[dict[str, Any]]:
    """One finished shard's records; a shard is read back from a folder others can write to, so
    it is bounded (MAX_SHARD_BYTES, the manifest's record count), every record is checked (a
    calibrated run's all carry `p_value`), and damage is one error naming it."""
    summary = manifest.shards[index]
    file, fmt = summary["file"], manifest.job["format"]
    required = ("p_value",) if manifest.job.get("calibration") else ()
    try:
        return list(decode_shard(store.read(*file.split("/"), limit=MAX_SHARD_BYTES), fmt, summary["records"], required))
    except ShardError as exc:  # says what is wrong, not where: name the shard (before ClipnError, which it also is)
        raise ResumeError(f"{store.uri}/{file}: damaged shard ({exc})") from None
    except ClipnError as exc:  # the store's own message names the file
        raise ResumeError(f"{exc} (a shard the manifest lists as finished)") from None
    except (ValueError, KeyError, TypeError, OSError, RecursionError) as exc:  # pyarrow's errors are ValueError/OSError
        raise ResumeError(f"{store.uri}/{file}: damaged shard ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None


def apply_fdr(store: OutputStore, manifest: Manifest, fdr: float) -> int:
    """Benjamini-Hochberg at `fdr` over every p_value of a run: each shard is rewritten (atomically)
    with `q_value` and the verdict OOD when q <= fdr. Returns the number of OOD verdicts.

    Two passes over the shards: the p-values first (8 bytes per record held), then the rewrite. It
    can run again after an interruption: the q-values are computed from the p-values alone.
    """
    from ..scores.calibration import benjamini_hochberg

    fmt, details = manifest.job["format"], bool(manifest.job.get("details"))
    order = sorted(manifest.shards)
    p_values = array("d")
    for index in order:
        p_values.extend(r["p_value"] for r in _shard_records(store, manifest, index) if "error" not in r)
    q = iter(benjamini_hochberg(p_values).tolist())
    flagged = 0
    for index in order:
        file = manifest.shards[index]["file"]
        records = _shard_records(store, manifest, index)
        for record in records:
            if "error" not in record:
                flagged += set_q_value(record, next(q), fdr)["verdict"] == "OOD"
        store.write(encode_shard(records, fmt, details, ("p_value", "q_value")), *file.split("/"))
    return flagged
