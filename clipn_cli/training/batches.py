"""Batches of frozen features for CLIPN training: cached once, or computed from a stream.

Only the "no" tower trains, so a sample's image features and standard text features never
change during a run. With a finite source (index or folder) and no augmentation they are
computed once per distinct image and distinct caption and the run only reads tables; otherwise
each batch is decoded and encoded on the fly.

Each process sees a deterministic, endless sequence of samples; step s uses the samples
[s·B, (s+1)·B) of it. A checkpoint stores how many samples each process consumed, so a resumed
run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import DataError, ImageError
from ..inputs.decode import _DecodePool, image_size_of, load_one
from ..inputs.sources import InputItem
from ..model.devices import autocast
from ..model.encode import encode_batch, encode_images
from ..model.clipn import CLIPN
from .data import IndexedData, Pair, ShardData, caption_id
from .distributed import World, all_objects, gather_rows, share

TEXT_BATCH = 1024
MAX_FAILED_IN_A_ROW = 1000  # undecodable samples in a row after which a stream is given up, not retried for ever


@dataclass
class Batch:
    """What one training step needs from B samples; features are normalized float32."""

    image: torch.Tensor  # (B, D)
    text_yes: torch.Tensor  # (B, D)
    tokens: torch.Tensor  # (B, context)
    caption_ids: torch.Tensor  # (B,) int64, equal for equal captions


@dataclass
class FeatureTable:
    """Frozen features of a finite data set: one row per distinct image and per distinct caption."""

    image: torch.Tensor
    text_yes: torch.Tensor
    tokens: torch.Tensor
    caption_ids: torch.Tensor
    sample_image: torch.Tensor  # (samples,) row of each sample's image
    sample_caption: torch.Tensor  # (samples,) row of each sample's caption
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sample_image)


def tokenize(model: CLIPN, captions: list[str]) -> torch.Tensor:
    """CLIP BPE tokens at the model's context length (the official tokenizer)."""
    from ..heads.embeddings import tokenizer_for

    return tokenizer_for(model)(captions)


@torch.inference_mode()
def encode_captions(model: CLIPN, tokens: torch.Tensor, device: torch.device, precision: str = "fp32", batch_size: int = TEXT_BATCH) -> torch.Tensor:
    """Normalized standard-tower features, batched by similar length (the model cuts padding)."""
    out = torch.empty(len(tokens), model.text_projection.shape[1])
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)
    for start in range(0, len(tokens), batch_size):
        idx = order[start : start + batch_size]
        with autocast(device, precision):
            out[idx] = model.encode_text_yes(tokens[idx].to(device), normalize=True).float().cpu()
    return out


def build_feature_table(
    model: CLIPN,
    data: IndexedData,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
    world: World = World(),
) -> FeatureTable:
    """Encode every distinct image and caption once; samples whose image fails are dropped (listed).

    Under torchrun each process encodes only its `share` of the distinct images and captions and
    the pieces are gathered: every process ends with the table one process builds.
    """
    paths = list(dict.fromkeys(p.image for p in data.pairs if isinstance(p.image, str)))
    captions = list(dict.fromkeys(p.caption for p in data.pairs))
    mine = share(len(paths), world)
    features, errors = [], []
    for encoded in encode_images(model, (InputItem(p) for p in paths[mine.start : mine.stop]), batch_size=batch_size, workers=workers, precision=precision):
        errors.append(None if encoded.feature is not None else str(encoded.error))
        if encoded.feature is not None:
            features.append(encoded.feature)
        if progress:
            progress(1)
    width = model.text_projection.shape[1]
    image = gather_rows(world, torch.stack(features) if features else torch.empty(0, width))
    errors = [e for part in all_objects(world, errors) for e in part]
    rows, skipped = {}, list(data.skipped)
    for path, error in zip(paths, errors):
        if error is None:
            rows[path] = len(rows)
        else:
            skipped.append(f"{path}: {error}")
    kept = [p for p in data.pairs if p.image in rows]
    if not kept:
        raise DataError(f"{data.description}: no image could be read (first problem: {skipped[0] if skipped else 'none'})")
    part = share(len(captions), world)
    tokens = tokenize(model, captions[part.start : part.stop])
    text_yes = gather_rows(world, encode_captions(model, tokens, device, precision))
    caption_row = {c: i for i, c in enumerate(captions)}
    return FeatureTable(
        image=image,
        text_yes=text_yes,
        tokens=gather_rows(world, tokens),
        caption_ids=torch.tensor([caption_id(c) for c in captions], dtype=torch.int64),
        sample_image=torch.tensor([rows[p.image] for p in kept], dtype=torch.int64),
        sample_caption=torch.tensor([caption_row[p.caption] for p in kept], dtype=torch.int64),
        skipped=skipped,
    )


def sample_order(n: int, seed: int, rank: int, world_size: int, start: int = 0) -> Iterator[int]:
    """Endless sample indices of one process: its share of one global order, whatever the world size.

    The global order is epoch after epoch of a permutation of all n samples seeded by (seed,
    epoch), without a break between epochs; a step with global batch G takes its next G
    positions, so a batch may span two epochs and every batch is full, for any n. Process r takes
    the positions r, r + W, r + 2W, ...: W processes with batch B see exactly the samples of one
    process with batch W·B, step by step. `start` (samples this process already used) costs nothing.
    """
    if n < 1:
        raise DataError("no samples to train on")
    position = start * world_size + rank
    while True:
        epoch, index = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        mine = perm[index::world_size].tolist()
        yield from mine
        position += len(mine) * world_size


class CachedBatches:
    """Batches read from a FeatureTable."""

    def __init__(self, table: FeatureTable, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, consumed: int = 0) -> None:
        self.table, self.batch_size, self.consumed = table, batch_size, consumed
        self._order = sample_order(len(table), seed, rank, world_size, consumed)

    def next(self) -> Batch:
        rows = torch.tensor(list(itertools.islice(self._order, self.batch_size)), dtype=torch.int64)
        self.consumed += len(rows)
        images, captions = self.table.sample_image[rows], self.table.sample_caption[rows]
        return Batch(self.table.image[images], self.table.text_yes[captions], self.table.tokens[captions], self.table.caption_ids[captions])


class StreamBatches:
    """Batches decoded and encoded as they come; unreadable samples are replaced by the next ones."""

    def __init__(
        self,
        model: CLIPN,
        pairs: Iterator[Pair],
        batch_size: int,
        device: torch.device,
        precision: str = "fp32",
        augment: bool = False,
        workers: int = 4,
        consumed: int = 0,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        import open_clip

        from .augment import KeyedTransform

        self.model, self.batch_size, self.device, self.precision = model, batch_size, device, precision
        self.transform = open_clip.image_transform(image_size_of(model), is_train=augment)
        # augmentation draws from a generator per (seed, rank, stream position), never torch's global one
        self.augment = KeyedTransform(self.transform, seed, rank) if augment else None
        self._position = consumed  # of the next pair taken from the stream
        self.consumed, self.failed, self.in_a_row = consumed, 0, 0
        self.errors: deque[str] = deque(maxlen=20)
        # the decoding threads detect uses: daemons, so a decode stuck in a C decoder never delays exit
        self._stop = threading.Event()
        self._pool = _DecodePool(max(1, workers), self._stop)
        self._pairs = itertools.islice(pairs, consumed, None)
        self._pending: deque = deque()
        self._prefetch = 2 * batch_size

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch:
            pair = next(self._pairs)
            self._pending.append((pair, self._pool.submit(functools.partial(self._decode, pair, self._position))))
            self._position += 1

    def _decode(self, pair: Pair, position: int) -> torch.Tensor:
        """Through `load_one`, the input layer detect uses: allow-list, limits, `stop` honoured."""
        item = InputItem(pair.image) if isinstance(pair.image, str) else InputItem(pair.key, data=pair.image)
        transform = (lambda image: self.augment(image, position)) if self.augment is not None else self.transform
        loaded = load_one(item, transform, stop=self._stop)
        if loaded.error is not None:
            raise ImageError(loaded.error)
        return loaded.pixels

    def next(self) -> Batch:
        good: list[tuple[Pair, torch.Tensor]] = []
        while len(good) < self.batch_size:
            self._fill()
            pair, future = self._pending.popleft()
            self.consumed += 1
            try:
                good.append((pair, future.result()))
                self.in_a_row = 0
            except ImageError as exc:
                self.failed += 1
                self.in_a_row += 1
                self.errors.append(f"{pair.key}: {exc}")
                if self.in_a_row >= MAX_FAILED_IN_A_ROW:
                    raise DataError(f"{MAX_FAILED_IN_A_ROW} samples in a row could not be decoded (last: {self.errors[-1][:300]})") from None
        captions = [p.caption for p, _ in good]
        tokens = tokenize(self.model, captions)
        # .clone(): features made under inference mode become ordinary tensors autograd may save
        return Batch(
            image=encode_batch(self.model, torch.stack([t for _, t in good]), self.device, self.precision).clone(),
            text_yes=encode_captions(self.model, tokens, self.device, self.precision).clone(),
            tokens=tokens,
            caption_ids=torch.tensor([caption_id(c) for c in captions], dtype=torch.int64),
        )

    def close(self) -> None:
        self._stop.set()  # running decodes end at their next read; queued ones are cancelled
        self._pool.shutdown(future for _, future in self._pending)


def pair_stream(data: IndexedData | ShardData, seed: int, rank: int, world_size: int) -> Iterator[Pair]:
    """The endless pair sequence of one process, for sources read without a feature table."""
    if isinstance(data, ShardData):
        return data.stream(seed, rank, world_size)
    return (data.pairs[i] for i in sample_order(len(data), seed, rank, world_size))

