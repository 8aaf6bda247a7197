"""Per-image ID/OOD verdicts: image features against class heads, in input order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from .errors import RuleError
from .heads.embeddings import ClassEmbeddings
from .inputs.sources import InputItem
from .model.clipn import CLIPN
from .model.devices import RunOptions
from .model.encode import EncodedImage, encode_images
from .outputs.records import SCORE_FIELDS, Detection  # re-exported: clipn_cli.detection.Detection stays
from .scores import methods
from .scores.scoring import Heads, Scores, score_heads

if TYPE_CHECKING:
    from .model.feature_cache import FeatureCache

__all__ = ["SCORE_FIELDS", "Detection", "check_rule", "detect", "detections_from_scores", "record_columns", "score_encoded", "verdicts"]


def verdicts(scores: Scores, rule: str, threshold: float | None = None) -> torch.Tensor:
    """(N,) True = OOD: the rule's own verdict, or `score < threshold` for a rule without one."""
    method = methods.get(rule)
    if threshold is not None:
        return method.value(scores) < threshold
    if method.verdict is None:
        raise RuleError(f"rule '{rule}' has no threshold-free verdict: give a threshold (e.g. thr@95%ID from 'clipn eval')")
    return method.verdict(scores)


def record_columns(scores: Scores) -> dict[str, list[float]]:
    """Detection-record field → per-image values, for every method these scores hold."""
    columns: dict[str, list[float]] = {}
    for m in methods.TABLE:
        if m.record is None or (m.pool is not None and m.name not in scores.extra) or (m.needs_no and scores.p_yes is None):
            continue
        columns[m.record] = m.value(scores).tolist()
        if m.name in methods.EXTRA_RECORD_FIELDS:
            name, value = methods.EXTRA_RECORD_FIELDS[m.name]
            columns[name] = value(scores).tolist()
    return columns


def detections_from_scores(
    paths: list[str], scores: Scores, classes: list[str], rule: str, details: bool = False, top_k: int = 0,
    threshold: float | None = None,
) -> list[Detection]:
    """Turn a batch of Scores into Detection records (pure: no model, no files)."""
    ood = verdicts(scores, rule, threshold).tolist()
    pred = scores.pred.tolist()
    columns = record_columns(scores)
    k = min(top_k, len(classes))
    top = torch.topk(scores.probs, k, dim=-1) if k else None
    out = []
    for i, path in enumerate(paths):
        det = Detection(
            path=path,
            verdict="OOD" if ood[i] else "ID",
            rule=rule,
            class_name=classes[pred[i]],
            class_index=pred[i],
            scores={name: values[i] for name, values in columns.items()},  # no CLIPN scores for a plain CLIP
        )
        if details:
            det.p_yes = None if scores.p_yes is None else scores.p_yes[i].tolist()
            det.logits_yes = scores.logits_yes[i].tolist()
            det.logits_no = None if scores.logits_no is None else scores.logits_no[i].tolist()
        if top is not None:
            det.top_k = [
                {"class": classes[j], "class_index": j, "probability": p}
                for p, j in zip(top.values[i].tolist(), top.indices[i].tolist())
            ]
        out.append(det)
    return out


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


def check_rule(rule: str, pools: tuple[str, ...], threshold: float | None = None, has_no: bool = True) -> None:
    """A ValueError unless `rule` can give verdicts with these negative-label pools (and `threshold`)."""
    method = methods.get(rule)
    if method.needs_no and not has_no:
        raise RuleError(f"rule '{rule}' needs CLIPN's \"no\" tower, which a plain CLIP does not have: "
                         f"use --rule {' or '.join(m.name for m in methods.available(methods.POOLS, has_no=False) if m.record)} with --threshold")
    if method.record is None:
        raise RuleError(f"'{rule}' is an evaluation score, not a detection rule (choose one of {', '.join(methods.RULES)})")
    if method.pool is not None and method.pool not in pools:
        raise RuleError(f"rule '{rule}' needs the '{method.pool}' negative labels: build them with --negatives {method.pool} "
                         "(or 'clipn embed-classes --negatives')")
    if method.verdict is None and threshold is None:
        raise RuleError(f"rule '{rule}' has no threshold-free verdict: give --threshold T (e.g. thr@95%ID from 'clipn eval')")


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
