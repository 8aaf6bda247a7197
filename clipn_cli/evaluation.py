"""Evaluation of OOD detection on labelled image sets: CLIPN's rules against the usual baselines.

Sets come from PATH specs (`inputs.sets`: any input kind detect accepts). Every image is encoded
once (through the feature cache if one is given), scored by every method, and the metrics of `metrics` are computed per OOD set and averaged.
Every score is "higher = more ID".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import EvaluationError
from .inputs.sets import AVERAGE, ImageSet
from .outputs.results import Evaluation, MethodResult, SetScores
from .scores import metrics

if TYPE_CHECKING:
    from .model.devices import RunOptions
    from .model.feature_cache import FeatureCache
    from .heads.embeddings import ClassEmbeddings
    from .model.clipn import CLIPN
    from .scores.calibration import OperatingPoint

RECALL = 0.95


def check_convention(convention: str) -> None:
    if convention not in metrics.FPR_CONVENTIONS:
        raise EvaluationError(f"unknown FPR95 convention '{convention}' (expected one of {', '.join(metrics.FPR_CONVENTIONS)})")


def normalize_class(name: str) -> str:
    """Class-name matching key: case-, underscore- and whitespace-insensitive."""
    return " ".join(name.replace("_", " ").lower().split())


def score_set(
    model: CLIPN,
    heads: ClassEmbeddings,
    image_set: ImageSet,
    cache: FeatureCache | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    precision: str = "fp32",
    exif_transpose: bool = False,
    progress: Callable[[int], None] | None = None,
    encoder: Callable[..., Iterable[Any]] | None = None,
    options: RunOptions | None = None,
) -> SetScores:
    """Encode a set (through `cache`) and score every readable image with every method.

    `encoder` replaces this process's image tower (see `model.encode.encode_images`): a Ray cluster's.
    """
    import torch

    from .model.devices import RunOptions
    from .model.encode import encode_images
    from .scores.scoring import Heads, score_heads

    run = options or RunOptions.resolve(model, precision=precision, forward_batch=batch_size, decode_workers=workers)
    chunk = run.score_chunk
    prepared = Heads.prepare(heads, run.device)
    names = [m.name for m in prepared.methods]
    rules = [m.name for m in prepared.methods if m.threshold_free]
    encoded = encode_images(model, image_set.items, exif_transpose=exif_transpose, cache=cache, encoder=encoder, options=run)
    paths: list[str] = []
    labels: list[str | None] = []
    features: list[torch.Tensor] = []
    failures: list[tuple[str, str]] = []
    columns: dict[str, list[np.ndarray]] = {m: [] for m in (*names, "pred", *(f"flag_{r}" for r in rules), "atd_margin")}

    def flush() -> None:
        if not features:
            return
        s = score_heads(torch.stack(features), prepared)
        values = {name: s.value(name) for name in names}
        margin = torch.full_like(s.msp, float("nan")) if s.atd_best is None else s.atd_best - s.p_ood  # NaN: no ATD (plain CLIP)
        values.update({f"flag_{r}": s.is_ood(r) for r in rules}, pred=s.pred, atd_margin=margin)
        for name, value in values.items():
            columns[name].append(value.numpy())
        features.clear()

    for label, item in zip(image_set.labels, encoded):
        if item.feature is None:
            failures.append((item.path, item.error or "unreadable"))
        else:
            paths.append(item.path)
            labels.append(label)
            features.append(item.feature)
            if len(features) >= chunk:  # the chunks `detect` scores in: bit-identical scores
                flush()
        if progress:
            progress(1)
    flush()
    joined = {name: np.concatenate(parts) if parts else np.empty(0) for name, parts in columns.items()}
    return SetScores(
        name=image_set.name,
        role=image_set.role,
        paths=paths,
        labels=labels,
        pred=joined["pred"].astype(np.int64),
        scores={m: joined[m].astype(np.float64) for m in names},
        flagged={rule: joined[f"flag_{rule}"].astype(bool) for rule in rules},
        atd_margin=joined["atd_margin"].astype(np.float64),
        failures=failures,
    )


def compute_results(id_scores: SetScores, ood_sets: Sequence[SetScores], convention: str = "clipn") -> list[MethodResult]:
    """Metrics of every method on every OOD set, then one `average` entry per method."""
    check_convention(convention)
    results: list[MethodResult] = []
    names = list(id_scores.scores)  # table order, the methods these heads computed
    for ood in ood_sets:
        for method in names:
            found = metrics.ood_metrics(id_scores.scores[method], ood.scores[method], convention)
            rule = method in id_scores.flagged
            results.append(MethodResult(
                ood=ood.name, method=method, **found,
                threshold_95=metrics.threshold_at_recall(id_scores.scores[method], RECALL),
                id_flagged=float(id_scores.flagged[method].mean()) if rule else None,
                ood_caught=float(ood.flagged[method].mean()) if rule else None,
            ))
    for method in names:
        rows = [r for r in results if r.method == method]
        mean = {k: float(np.mean([getattr(r, k) for r in rows])) for k in ("auroc", "fpr95", "aupr_in", "aupr_out")}
        caught = float(np.mean([r.ood_caught for r in rows])) if method in id_scores.flagged else None
        results.append(MethodResult(AVERAGE, method, **mean, threshold_95=rows[0].threshold_95, id_flagged=rows[0].id_flagged, ood_caught=caught))
    return results


def id_accuracy(id_scores: SetScores, classes: Sequence[str]) -> tuple[float | None, str | None]:
    """Top-1 accuracy when every ID image sits in a folder named after one of the classes.

    Returns (accuracy, None) or (None, why not). Matching compares names, not indices, so
    duplicate class names (ImageNet's two "missile" classes) count as the same answer.
    """
    if any(label is None for label in id_scores.labels):
        return None, None
    known = {normalize_class(c) for c in classes}
    unmatched = sorted({label for label in id_scores.labels if normalize_class(label) not in known})  # type: ignore[arg-type]
    if unmatched:
        shown = ", ".join(unmatched[:3]) + (" ..." if len(unmatched) > 3 else "")
        return None, f"ID accuracy not reported: {len(unmatched)} ID folder(s) match no class name: {shown}"
    predicted = [normalize_class(classes[i]) for i in id_scores.pred.tolist()]
    correct = sum(p == normalize_class(label) for p, label in zip(predicted, id_scores.labels))  # type: ignore[arg-type]
    return correct / len(predicted), None


def evaluate(
    model: CLIPN,
    heads: ClassEmbeddings,
    sets: Sequence[ImageSet],
    convention: str = "clipn",
    cache: FeatureCache | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    precision: str = "fp32",
    exif_transpose: bool = False,
    progress: Callable[[int], None] | None = None,
    encoder: Callable[..., Iterable[Any]] | None = None,
    options: RunOptions | None = None,
) -> Evaluation:
    """Score every set and compute every metric; `sets` as `inputs.sets.collect_sets` returns them (ID first).

    `options` (a run's resolved `RunOptions`) replaces `batch_size`, `workers` and `precision`.

    An OOD set with no readable image is left out of the metrics (with a note) rather than
    losing the others; with no readable ID image, or none in any OOD set, nothing can be measured.
    """
    check_convention(convention)

    def run(image_set: ImageSet) -> SetScores:
        return score_set(model, heads, image_set, cache=cache, batch_size=batch_size, workers=workers,
                         precision=precision, exif_transpose=exif_transpose, progress=progress, encoder=encoder, options=options)

    id_scores = run(sets[0])
    if not id_scores.paths:  # stop before encoding the OOD sets
        raise EvaluationError(_unreadable(id_scores))
    ood_scores = [run(s) for s in sets[1:]]
    readable = [s for s in ood_scores if s.paths]
    if not readable:
        raise EvaluationError("; ".join(_unreadable(s) for s in ood_scores))
    notes = [f"{_unreadable(s)}: left out of the metrics" for s in ood_scores if not s.paths]
    accuracy, note = id_accuracy(id_scores, heads.classes)
    results = compute_results(id_scores, readable, convention)
    return Evaluation(convention, results, [id_scores, *ood_scores], list(heads.classes), accuracy, notes + ([note] if note else []))


def _unreadable(s: SetScores) -> str:
    path, error = s.failures[0]
    return f"{s.name} set: none of its {len(s.failures)} images could be read (first: {path}: {error})"


def calibrated_points(evaluation: Evaluation, alpha: float, seed: int) -> list[OperatingPoint]:
    """Every method calibrated on a seeded random half of the ID set, tested on the other half and on
    each OOD set with readable images (`calibration.operating_points`): eval's `--alpha` table."""
    from .scores.calibration import operating_points

    id_set = evaluation.sets[0]
    ood = {s.name: s.scores for s in evaluation.sets[1:] if s.paths}
    return operating_points(id_set.scores, ood, alpha, seed)
