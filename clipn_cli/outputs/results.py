"""What an evaluation found, and its per-image scores as records: torch-free, so the report, the
plots and the CLI's rendering read results without importing the evaluation workflow.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..files import atomic_open
from ..scores import methods as method_table
from ..scores import metrics
from .writers import TEXT_ERRORS, CsvRows, json_text

METHODS = {m.name: m.label for m in method_table.TABLE if m.name in method_table.CLASSIC}  # every evaluation has these
LABELS = {m.name: m.label for m in method_table.TABLE}
RULE_METHODS = method_table.VERDICT_RULES  # the ones with a threshold-free verdict


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


SCORE_COLUMNS = ("path", "set", "role", "label", "pred", *METHODS, "ctw_ood", "atd_ood", "error")  # with the classic methods


def score_columns(evaluation: Evaluation) -> tuple[str, ...]:
    """The per-image columns of this evaluation: its methods' scores, then its rules' verdicts."""
    first = evaluation.sets[0]
    return ("path", "set", "role", "label", "pred", *first.scores, *(f"{r}_ood" for r in first.flagged), "error")


def write_scores(evaluation: Evaluation, path: str | os.PathLike[str]) -> None:
    """Every image's scores as CSV (JSON Lines if `path` ends in .jsonl), written atomically."""
    jsonl = str(path).endswith(".jsonl")
    with atomic_open(path, "w", encoding="utf-8", errors=TEXT_ERRORS, newline="") as fh:
        writer = None if jsonl else CsvRows(fh, score_columns(evaluation))
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
