"""Evaluation of OOD detection on labelled image sets: CLIPN's rules against the usual baselines.

Sets come from PATH specs (a directory, searched recursively; a glob; a text file listing image
paths; or one image). Every image is encoded once (through the feature cache if one is given),
scored by every method, and the metrics of `metrics` are computed per OOD set and averaged.
Every score is "higher = more ID".
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .scores import methods as method_table
from .scores import metrics
from .errors import EvaluationError
from .files import UnicodeTextError, atomic_open, decode_utf8, read_bounded
from .inputs.sources import GLOB_CHARS, IMAGE_EXTENSIONS, InputItem, iter_inputs, iter_table
from .inputs.tables import TableError, is_table
from .outputs.writers import TEXT_ERRORS, json_text

if TYPE_CHECKING:
    from .model.feature_cache import FeatureCache
    from .heads.embeddings import ClassEmbeddings
    from .model.clipn import CLIPN

METHODS = {m.name: m.label for m in method_table.TABLE if m.name in method_table.CLASSIC}  # every evaluation has these
LABELS = {m.name: m.label for m in method_table.TABLE}
MAX_PATH_LIST_BYTES = 256 << 20  # an `eval --id/--ood` list of image paths: about 2.5 million lines
RULE_METHODS = method_table.VERDICT_RULES  # the ones with a threshold-free verdict
ID_SET = "ID"
AVERAGE = "average"
RECALL = 0.95


@dataclass
class ImageSet:
    """Images of one set; `labels` holds each image's class folder where the layout gives one."""

    name: str
    role: str  # "id" or "ood"
    items: list[InputItem] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)


@dataclass
class SetScores:
    """Every method's score of every readable image of a set, plus the images that failed."""

    name: str
    role: str
    paths: list[str]
    labels: list[str | None]
    pred: np.ndarray  # predicted class index (yes head)
    scores: dict[str, np.ndarray]  # method -> (N,) float64
    flagged: dict[str, np.ndarray]  # threshold-free rule -> (N,) bool, True = OOD
    atd_margin: np.ndarray  # max_c p_yes_c·p_c − p_ood: ATD says OOD where this is < 0
    failures: list[tuple[str, str]]  # (path, error)


@dataclass(frozen=True)
class MethodResult:
    """The metrics of one method on one OOD set (or their average over sets)."""

    ood: str
    method: str
    auroc: float
    fpr95: float
    aupr_in: float
    aupr_out: float
    threshold_95: float
    id_flagged: float | None = None
    ood_caught: float | None = None

    def as_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ood": self.ood, "method": self.method, "auroc": self.auroc, "fpr95": self.fpr95,
            "aupr_in": self.aupr_in, "aupr_out": self.aupr_out, "threshold_95": self.threshold_95,
        }
        if self.method in RULE_METHODS:
            record.update(id_flagged=self.id_flagged, ood_caught=self.ood_caught)
        return record


@dataclass
class Evaluation:
    """Everything an evaluation found: metrics, accuracy, per-image scores, failures, notes."""

    convention: str
    results: list[MethodResult]
    sets: list[SetScores]
    classes: list[str]
    id_accuracy: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[tuple[str, str, str]]:
        """(set, path, error) of every image that could not be scored."""
        return [(s.name, path, error) for s in self.sets for path, error in s.failures]

    def as_dict(self) -> dict[str, Any]:
        """The JSON report (fractions, not percentages)."""
        return {
            "fpr95_convention": self.convention,
            "fpr95_definition": metrics.FPR_CONVENTIONS[self.convention],
            "threshold_95_definition": "highest score threshold keeping >= 95% of ID images (score >= threshold means ID)",
            "id_accuracy": self.id_accuracy,
            "classes": len(self.classes),
            "images": {s.name: len(s.paths) for s in self.sets},
            "failed": [{"set": name, "path": path, "error": error} for name, path, error in self.failures],
            "results": [r.as_dict() for r in self.results],
        }


def check_convention(convention: str) -> None:
    if convention not in metrics.FPR_CONVENTIONS:
        raise EvaluationError(f"unknown FPR95 convention '{convention}' (expected one of {', '.join(metrics.FPR_CONVENTIONS)})")


def parse_ood_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` → (NAME, PATH); a bare PATH is named after its last component."""
    name, sep, path = spec.partition("=")
    if sep and name and not os.path.exists(spec) and os.sep not in name and "/" not in name:
        return name, path
    stem = Path(spec.rstrip("/\\")).stem or spec
    return stem, spec


def normalize_class(name: str) -> str:
    """Class-name matching key: case-, underscore- and whitespace-insensitive."""
    return " ".join(name.replace("_", " ").lower().split())


def collect(spec: str) -> tuple[list[InputItem], list[str | None]]:
    """The images a PATH spec names, with their class folder when `spec` is a directory."""
    if os.path.isdir(spec):
        # keep an unlistable sub-folder's error item (it is reported as unreadable), not "no image files"
        items = [item for item in iter_inputs([spec]) if not (item.error and item.path == spec)]
        labels = [_class_folder(spec, item.path) for item in items]
    elif is_table(spec):
        try:
            items = list(iter_table(spec))
        except TableError as exc:
            raise EvaluationError(str(exc)) from None
        labels = [None] * len(items)
    elif os.path.isfile(spec) and Path(spec).suffix.lower() not in IMAGE_EXTENSIONS:
        items = _read_list(spec)
        labels = [None] * len(items)
    elif os.path.isfile(spec) or GLOB_CHARS & set(spec):
        items = list(iter_inputs([spec]))
        if len(items) == 1 and items[0].error:
            raise EvaluationError(f"{spec}: {items[0].error}")
        labels = [None] * len(items)
    else:
        raise EvaluationError(f"{spec}: no such file or directory")
    if not items:
        raise EvaluationError(f"{spec}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)")
    return items, labels


def _class_folder(root: str, path: str) -> str | None:
    parts = Path(os.path.relpath(path, root)).parts
    return parts[0] if len(parts) > 1 else None


def _read_list(path: str) -> list[InputItem]:
    """A UTF-8 list of image paths, one per line; relative paths are relative to the list's folder."""
    try:
        text = decode_utf8(read_bounded(path, MAX_PATH_LIST_BYTES))
    except OSError as exc:
        raise EvaluationError(f"{path}: cannot read the path list: {exc.strerror or exc}") from None
    except UnicodeTextError as exc:
        raise EvaluationError(f"{path}: not a UTF-8 list of image paths (byte {exc.offset}, line {exc.line}); "
                              "is it an image with an unknown extension?") from None
    except ValueError as exc:  # a FIFO or device, or over the size limit
        raise EvaluationError(f"{path}: cannot read the path list: {exc}") from None
    base = os.path.dirname(path)
    lines = [line.strip() for line in text.splitlines()]
    return [InputItem(os.path.join(base, line)) for line in lines if line and not line.startswith("#")]


def collect_sets(id_specs: str | Sequence[str], ood_specs: Mapping[str, str | Sequence[str]]) -> list[ImageSet]:
    """The ID set (all `id_specs` together) followed by one set per OOD name."""
    id_specs = [id_specs] if isinstance(id_specs, str) else list(id_specs)
    if not id_specs:
        raise EvaluationError("no ID images: give at least one --id PATH")
    if not ood_specs:
        raise EvaluationError("no OOD images: give at least one --ood NAME=PATH")
    for name in ood_specs:
        if name.lower() in (AVERAGE, ID_SET.lower()):
            raise EvaluationError(f"OOD set name '{name}' is reserved ('{AVERAGE}' and '{ID_SET}' name the average and the ID set); choose another")
    sets = [ImageSet(ID_SET, "id")]
    # one --id folder per class (`--id d/cat --id d/dog`): each folder's name labels its images
    per_class = len(id_specs) > 1 and all(os.path.isdir(spec) for spec in id_specs)
    for spec in id_specs:
        items, labels = collect(spec)
        if per_class:
            labels = [label if label is not None else Path(os.path.abspath(spec)).name for label in labels]
        sets[0].items += items
        sets[0].labels += labels
    for name, specs in ood_specs.items():
        ood = ImageSet(name, "ood")
        for spec in [specs] if isinstance(specs, str) else specs:
            items, _ = collect(spec)
            ood.items += items
            ood.labels += [None] * len(items)
        sets.append(ood)
    return sets


def group_ood_specs(specs: Iterable[str]) -> dict[str, list[str]]:
    """`NAME=PATH` strings → {NAME: [PATH, ...]} in first-seen order (a repeated NAME merges paths)."""
    grouped: dict[str, list[str]] = {}
    for spec in specs:
        name, path = parse_ood_spec(spec)
        grouped.setdefault(name, []).append(path)
    return grouped


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
) -> SetScores:
    """Encode a set (through `cache`) and score every readable image with every method.

    `encoder` replaces this process's image tower (see `inference.encode_images`): a Ray cluster's.
    """
    import torch

    from .model.devices import pipeline_sizes
    from .model.encode import encode_images
    from .scores.scoring import Heads, score_heads

    batch_size, workers = pipeline_sizes(model, batch_size, workers)
    prepared = Heads.prepare(heads, next(model.parameters()).device)
    names = [m.name for m in prepared.methods]
    rules = [m.name for m in prepared.methods if m.threshold_free]
    encoded = encode_images(
        model, image_set.items, batch_size=batch_size, workers=workers, precision=precision,
        exif_transpose=exif_transpose, cache=cache, encoder=encoder,
    )
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
            if len(features) >= batch_size:  # the chunks `detect` scores in: bit-identical scores
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
) -> Evaluation:
    """Score every set and compute every metric; `sets` as `collect_sets` returns them (ID first).

    An OOD set with no readable image is left out of the metrics (with a note) rather than
    losing the others; with no readable ID image, or none in any OOD set, nothing can be measured.
    """
    check_convention(convention)

    def run(image_set: ImageSet) -> SetScores:
        return score_set(model, heads, image_set, cache=cache, batch_size=batch_size, workers=workers,
                         precision=precision, exif_transpose=exif_transpose, progress=progress, encoder=encoder)

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


SCORE_COLUMNS = ("path", "set", "role", "label", "pred", *METHODS, "ctw_ood", "atd_ood", "error")  # with the classic methods


def score_columns(evaluation: Evaluation) -> tuple[str, ...]:
    """The per-image columns of this evaluation: its methods' scores, then its rules' verdicts."""
    first = evaluation.sets[0]
    return ("path", "set", "role", "label", "pred", *first.scores, *(f"{r}_ood" for r in first.flagged), "error")


def write_scores(evaluation: Evaluation, path: str | os.PathLike[str]) -> None:
    """Every image's scores as CSV (JSON Lines if `path` ends in .jsonl), written atomically."""
    jsonl = str(path).endswith(".jsonl")
    with atomic_open(path, "w", encoding="utf-8", errors=TEXT_ERRORS, newline="") as fh:
        writer = None if jsonl else csv.DictWriter(fh, fieldnames=score_columns(evaluation), lineterminator="\n")
        if writer:
            writer.writeheader()
        for row in score_rows(evaluation):
            if writer:
                writer.writerow(row)
            else:
                fh.write(json_text(row) + "\n")


def score_rows(evaluation: Evaluation) -> Iterable[dict[str, Any]]:
    """One record per image (failed images last in their set, with `error`)."""
    for s in evaluation.sets:
        for i, path in enumerate(s.paths):
            row: dict[str, Any] = {"path": path, "set": s.name, "role": s.role, "label": s.labels[i],
                                   "pred": evaluation.classes[int(s.pred[i])]}
            row.update({m: float(values[i]) for m, values in s.scores.items()})
            row.update({f"{r}_ood": bool(flags[i]) for r, flags in s.flagged.items()}, error=None)
            yield row
        for path, error in s.failures:
            yield {"path": path, "set": s.name, "role": s.role, "error": error}
