"""Deterministic shards from a streaming list of inputs.

A shard is the unit of work, output and resume: shard `i` holds inputs `i*size .. (i+1)*size-1`
of the input stream, in order. The same inputs therefore always give the same shards, and a
resumed run can tell a finished shard from an unfinished one by its index alone; its digest
(over the inputs it holds) proves that the inputs did not change in between. Planning holds one
shard in memory at a time, so the driver's memory does not grow with the number of inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import OptionsError
from ..inputs.sources import InputItem

DEFAULT_SHARD_SIZE = 10_000


@dataclass(frozen=True)
class Shard:
    """Inputs `index*size ..` of the stream; `digest` identifies exactly which inputs those are."""

    index: int
    items: tuple[InputItem, ...]
    digest: str

    @property
    def name(self) -> str:
        return shard_name(self.index)


def shard_name(index: int) -> str:
    """File stem of a shard: zero-padded so that names sort in input order."""
    return f"part-{index:06d}"


def shard_digest(items: Iterable[InputItem]) -> str:
    """A short hash of the inputs (paths and listing errors) of one shard, in order."""
    h = hashlib.blake2b(digest_size=12)
    for item in items:
        h.update(item.path.encode("utf-8", "surrogateescape"))
        h.update(b"\0" + (item.error or "").encode("utf-8") + b"\n")
    return h.hexdigest()


def plan_shards(items: Iterable[InputItem], size: int = DEFAULT_SHARD_SIZE) -> Iterator[Shard]:
    """Cut a stream of inputs into shards of `size` (the last may be smaller), lazily."""
    if size < 1:
        raise OptionsError("shard size must be at least 1")
    batch: list[InputItem] = []
    index = 0
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield Shard(index, tuple(batch), shard_digest(batch))
            batch = []
            index += 1
    if batch:
        yield Shard(index, tuple(batch), shard_digest(batch))
