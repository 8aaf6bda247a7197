"""Per-image ID/OOD verdicts: image features against class heads, in input order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .embeddings import ClassEmbeddings
from .images import InputItem
from .inference import EncodedImage, encode_images, pipeline_sizes
from .model import CLIPN
from .scoring import RULES, Scores, score

if TYPE_CHECKING:
    from .cache import FeatureCache

SCORE_FIELDS = ("ctw_score", "atd_score", "p_ood", "msp", "max_logit", "energy")


@dataclass
class Detection:
    """The verdict for one input, or the error that prevented one."""

    path: str
    error: str | None = None
    verdict: str | None = None  # "ID" or "OOD"
    rule: str | None = None
    class_name: str | None = None
    class_index: int | None = None
    ctw_score: float | None = None
    atd_score: float | None = None
    p_ood: float | None = None
    msp: float | None = None
    max_logit: float | None = None
    energy: float | None = None
    p_yes: list[float] | None = None
    logits_yes: list[float] | None = None
    logits_no: list[float] | None = None
    top_k: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self, details: bool = False) -> dict[str, Any]:
        """The JSON record: `path` and `error`, or the verdict and scores (plus details if asked)."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        record: dict[str, Any] = {
            "path": self.path,
            "verdict": self.verdict,
            "rule": self.rule,
            "class": self.class_name,
            "class_index": self.class_index,
        }
        record.update({name: getattr(self, name) for name in SCORE_FIELDS})
        if details:
            record.update(p_yes=self.p_yes, logits_yes=self.logits_yes, logits_no=self.logits_no)
        if self.top_k:
            record["top_k"] = self.top_k
        return record


def detections_from_scores(
    paths: list[str], scores: Scores, classes: list[str], rule: str, details: bool = False, top_k: int = 0
) -> list[Detection]:
    """Turn a batch of Scores into Detection records (pure: no model, no files)."""
    ood = scores.is_ood(rule).tolist()
    pred = scores.pred.tolist()
    columns = {
        "ctw_score": scores.ctw.tolist(),
        "atd_score": scores.atd.tolist(),
        "p_ood": scores.p_ood.tolist(),
        "msp": scores.msp.tolist(),
        "max_logit": scores.max_logit.tolist(),
        "energy": scores.energy.tolist(),
    }
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
            **{name: values[i] for name, values in columns.items()},
        )
        if details:
            det.p_yes = scores.p_yes[i].tolist()
            det.logits_yes = scores.logits_yes[i].tolist()
            det.logits_no = scores.logits_no[i].tolist()
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
) -> Iterator[Detection]:
    """Score a stream of encoded images in chunks, keeping input order and error records."""
    if rule not in RULES:
        raise ValueError(f"unknown rule '{rule}' (expected one of {', '.join(RULES)})")
    pending: list[EncodedImage] = []

    def flush() -> Iterator[Detection]:
        good = [e for e in pending if e.feature is not None]
        results = iter(())
        if good:
            scores = score(torch.stack([e.feature for e in good]), embeddings.text_yes, embeddings.text_no)
            results = iter(detections_from_scores([e.path for e in good], scores, embeddings.classes, rule, details, top_k))
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
) -> Iterator[Detection]:
    """Verdicts for a stream of inputs: decode, encode, score; one Detection per input, in order.

    `cache` reuses image features stored for these weights; `draft` decodes large JPEGs at
    reduced scale (faster, not exact). `batch_size`/`workers` default to the model's device's
    (`inference.pipeline_sizes`). See `encode_images`.
    """
    batch_size, workers = pipeline_sizes(model, batch_size, workers)
    encoded = encode_images(
        model, items, batch_size=batch_size, workers=workers, precision=precision,
        exif_transpose=exif_transpose, cache=cache, draft=draft,
    )
    return score_encoded(encoded, embeddings, rule=rule, details=details, top_k=top_k, chunk=batch_size)
