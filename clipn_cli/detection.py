"""Per-image ID/OOD verdicts: image features against class heads, in input order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from .heads.embeddings import ClassEmbeddings
from .inputs.sources import InputItem
from .model.clipn import CLIPN
from .model.devices import RunOptions
from .model.encode import EncodedImage, encode_images
from .outputs.records import SCORE_FIELDS, Detection, detections_from_scores, record_columns, verdicts  # re-exported: their home before outputs.records
from .scores.methods import check_rule  # re-exported: its home before scores.methods
from .scores.scoring import Heads, score_heads

if TYPE_CHECKING:
    from .model.feature_cache import FeatureCache

__all__ = ["SCORE_FIELDS", "Detection", "check_rule", "detect", "detections_from_scores", "record_columns", "score_encoded", "verdicts"]


def score_encoded(
    encoded: Iterable[EncodedImage],
    embeddings: ClassEmbeddings,
    rule: str = "atd",
    details: bool = False,
    top_k: int = 0,
    chunk: int = 256,
    threshold: float | None = None,
    permutation_device: str | torch.device = "cpu",
) -> Iterator[Detection]:
    """Score a stream of encoded images in chunks, keeping input order and error records.

    `rule` is any method of `methods.TABLE` these embeddings can compute; one without a
    threshold-free verdict needs `threshold` (score below it = OOD).
    """
    heads = Heads.prepare(embeddings, permutation_device)
    check_rule(rule, tuple(heads.pools), threshold, has_no=heads.no is not None)
    pending: list[EncodedImage] = []

    def flush() -> Iterator[Detection]:
        good = [e for e in pending if e.feature is not None]
        results = iter(())
        if good:
            scores = score_heads(torch.stack([e.feature for e in good]), heads)
            results = iter(detections_from_scores([e.path for e in good], scores, embeddings.classes, rule, details, top_k, threshold))
        for e in pending:
            yield next(results) if e.feature is not None else Detection(path=e.path, error=e.error)
        pending.clear()

    for item in encoded:
        pending.append(item)
        if len(pending) >= chunk:
            yield from flush()
    yield from flush()


def detect(
    model: CLIPN,
    embeddings: ClassEmbeddings,
    items: Iterable[InputItem],
    rule: str = "atd",
    batch_size: int | None = None,
    workers: int | None = None,
    precision: str = "fp32",
    exif_transpose: bool = False,
    details: bool = False,
    top_k: int = 0,
    cache: FeatureCache | None = None,
    draft: bool = False,
    threshold: float | None = None,
    options: RunOptions | None = None,
) -> Iterator[Detection]:
    """Verdicts for a stream of inputs: decode, encode, score; one Detection per input, in order.

    `cache` reuses image features stored for these weights; `draft` decodes large JPEGs at
    reduced scale (faster, not exact). `batch_size`/`workers` default to the model's device's
    (`devices.RunOptions`); `options`, the run's resolved `RunOptions`, replaces the three. See `encode_images`.
    """
    run = options or RunOptions.resolve(model, precision=precision, forward_batch=batch_size, decode_workers=workers)
    check_rule(rule, tuple(embeddings.negatives), threshold, has_no=embeddings.text_no is not None)  # before any image is read
    encoded = encode_images(model, items, exif_transpose=exif_transpose, cache=cache, draft=draft, options=run)
    return score_encoded(encoded, embeddings, rule=rule, details=details, top_k=top_k, chunk=run.score_chunk,
                         threshold=threshold, permutation_device=run.device)
