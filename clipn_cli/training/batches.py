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

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import DataError, ImageError
from ..images import InputItem, decode_bytes, image_size_of, open_image
from ..inference import autocast, encode_batch, encode_images
from ..model import CLIPN
from .data import IndexedData, Pair, ShardData, caption_id

TEXT_BATCH = 1024


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
    from ..embeddings import tokenizer_for

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
) -> FeatureTable:
    """Encode every distinct image and caption once; samples whose image fails are dropped (listed)."""
    paths = list(dict.fromkeys(p.image for p in data.pairs if isinstance(p.image, str)))
    captions = list(dict.fromkeys(p.caption for p in data.pairs))
    rows, features, skipped = {}, [], list(data.skipped)
    for encoded in encode_images(model, (InputItem(p) for p in paths), batch_size=batch_size, workers=workers, precision=precision):
        if encoded.feature is None:
            skipped.append(f"{encoded.path}: {encoded.error}")
        else:
            rows[encoded.path] = len(features)
            features.append(encoded.feature)
        if progress:
            progress(1)
    kept = [p for p in data.pairs if p.image in rows]
    if not kept:
        raise DataError(f"{data.description}: no image could be read (first problem: {skipped[0] if skipped else 'none'})")
    caption_row = {c: i for i, c in enumerate(captions)}
    tokens = tokenize(model, captions)
    return FeatureTable(
        image=torch.stack(features),
        text_yes=encode_captions(model, tokens, device, precision),
        tokens=tokens,
        caption_ids=torch.tensor([caption_id(c) for c in captions], dtype=torch.int64),
        sample_image=torch.tensor([rows[p.image] for p in kept], dtype=torch.int64),
        sample_caption=torch.tensor([caption_row[p.caption] for p in kept], dtype=torch.int64),
        skipped=skipped,
    )


def sample_order(n: int, seed: int, rank: int, world_size: int, start: int = 0) -> Iterator[int]:
    """Endless sample indices of one process: per epoch a seeded permutation, every world_size-th entry.

    Starting at `start` costs nothing, whatever the number of samples already used.
    """
    per_epoch = len(range(rank, n, world_size))
    if per_epoch == 0:
        raise DataError(f"{n} sample(s) cannot feed {world_size} processes")
    epoch, offset = divmod(start, per_epoch)
    for e in itertools.count(epoch):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        yield from perm[rank::world_size][offset:].tolist()
        offset = 0


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
    ) -> None:
        import open_clip

        self.model, self.batch_size, self.device, self.precision = model, batch_size, device, precision
        self.transform = open_clip.image_transform(image_size_of(model), is_train=augment)
        self.consumed, self.failed = consumed, 0
        self.errors: deque[str] = deque(maxlen=20)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="clipn-train-decode")
        self._pairs = itertools.islice(pairs, consumed, None)
        self._pending: deque = deque()
        self._prefetch = 2 * batch_size

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch:
            pair = next(self._pairs)
            self._pending.append((pair, self._pool.submit(self._decode, pair)))

    def _decode(self, pair: Pair) -> torch.Tensor:
        return self.transform(open_image(pair.image) if isinstance(pair.image, str) else open_bytes(pair.image))

    def next(self) -> Batch:
        good: list[tuple[Pair, torch.Tensor]] = []
        while len(good) < self.batch_size:
            self._fill()
            pair, future = self._pending.popleft()
            self.consumed += 1
            try:
                good.append((pair, future.result()))
            except ImageError as exc:
                self.failed += 1
                self.errors.append(f"{pair.key}: {exc}")
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
        self._pool.shutdown(wait=False, cancel_futures=True)


def open_bytes(data: bytes) -> Image.Image:
    """Decode an encoded image held in memory (a shard member), first frame, with the checks files get."""
    return decode_bytes(data)


def pair_stream(data: IndexedData | ShardData, seed: int, rank: int, world_size: int) -> Iterator[Pair]:
    """The endless pair sequence of one process, for sources read without a feature table."""
    if isinstance(data, ShardData):
        return data.stream(seed, rank, world_size)
    return (data.pairs[i] for i in sample_order(len(data), seed, rank, world_size))

