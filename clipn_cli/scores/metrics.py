"""OOD detection metrics in plain numpy, exact with tied scores.

Every score is "higher = more in-distribution". Definitions follow the reference implementations
so that numbers can be compared with published tables:

- AUROC: area under the ROC, ties counted as half (equals scikit-learn's `roc_auc_score`); it is
  the same whichever set is called positive.
- AUPR-In / AUPR-Out: average precision (scikit-learn's `average_precision_score`) with ID as the
  positive class on the scores, or OOD as the positive class on the negated scores.
- FPR95, `clipn` convention (CLIPN and MCM code, the CLIP-OOD papers): ID positive; the fraction of
  OOD images accepted when 95% of ID images are accepted, read off the ROC by linear interpolation
  exactly as `scipy.interpolate.interp1d(tpr, fpr)(0.95)` on scikit-learn's `roc_curve` (that
  is, `numpy.interp`; on a tie at exactly 95% the highest FPR at that TPR is taken).
- FPR95, `openood` convention (OpenOOD, pytorch-ood): OOD positive; the fraction of ID images
  rejected at the first ROC point (scikit-learn's `roc_curve` with its default
  `drop_intermediate=True`) where at least 95% of OOD images are caught.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import OptionsError, ScoresError

FPR_CONVENTIONS = {
    "clipn": "ID positive: fraction of OOD images accepted at 95% ID recall, ROC linearly interpolated (CLIPN/MCM code)",
    "openood": "OOD positive: fraction of ID images rejected at the first ROC point with >= 95% of OOD caught (OpenOOD)",
}


@dataclass(frozen=True)
class RocCounts:
    """Cumulative true/false positives at each distinct threshold, highest threshold first."""

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray


def _check(scores: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ScoresError(f"no {name} scores")
    if not np.isfinite(scores).all():
        raise ScoresError(f"{name} scores contain NaN or Inf")
    return scores


def roc_counts(positive: np.ndarray, negative: np.ndarray) -> RocCounts:
    """Counts of positives/negatives scoring >= each distinct score value (the ROC's corners)."""
    positive = _check(positive, "positive")
    negative = _check(negative, "negative")
    scores = np.concatenate([positive, negative])
    is_pos = np.concatenate([np.ones(positive.size, np.int64), np.zeros(negative.size, np.int64)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_group = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    tps = np.cumsum(is_pos)[last_of_group]
    fps = (last_of_group + 1) - tps
    return RocCounts(scores[last_of_group], tps, fps)


def roc_curve(
    positive: np.ndarray, negative: np.ndarray, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) starting at (0, 0) with threshold +inf, as scikit-learn returns them.

    With `drop_intermediate`, a corner is dropped when the steps before and after it are equal
    (scikit-learn's rule); the curve's shape, area and interpolated values do not change.
    """
    counts = roc_counts(positive, negative)
    tps, fps, thresholds = counts.tps, counts.fps, counts.thresholds
    if drop_intermediate and tps.size > 2:
        keep = np.r_[True, (np.diff(tps, 2) != 0) | (np.diff(fps, 2) != 0), True]
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """P(ID score > OOD score) + ½ P(tie): the trapezoid area of the ROC, summed in integers."""
    counts = roc_counts(id_scores, ood_scores)
    d_tp = np.diff(np.r_[0, counts.tps])
    d_fp = np.diff(np.r_[0, counts.fps])
    tp_before = counts.tps - d_tp
    twice_area = int(np.sum(d_fp * (2 * tp_before + d_tp)))
    return twice_area / (2 * int(counts.tps[-1]) * int(counts.fps[-1]))


def average_precision(positive: np.ndarray, negative: np.ndarray) -> float:
    """Σ over distinct thresholds of (recall gain) × precision, scikit-learn's definition."""
    counts = roc_counts(positive, negative)
    precision = counts.tps / (counts.tps + counts.fps)
    recall_gain = np.diff(np.r_[0, counts.tps]) / counts.tps[-1]
    return float(np.sum(recall_gain * precision))


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with ID images as the positive class."""
    return average_precision(id_scores, ood_scores)


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with OOD images as the positive class (scores negated)."""
    return average_precision(-_check(ood_scores, "OOD"), -_check(id_scores, "ID"))


def fpr_at_tpr_interpolated(positive: np.ndarray, negative: np.ndarray, tpr: float = 0.95) -> float:
    """FPR at `tpr` on the linearly interpolated ROC, as `interp1d(tpr, fpr)(tpr)` computes it.

    scipy's interp1d hands 1-D float64 linear interpolation to `numpy.interp`, so this is that
    call on the same curve. Where several ROC points have exactly the target TPR (a run of OOD
    images between two ID scores), `numpy.interp` returns the last of them: the highest FPR.
    """
    fpr_curve, tpr_curve, _ = roc_curve(positive, negative)
    return float(np.interp(tpr, tpr_curve, fpr_curve))


def fpr_at_tpr_first(positive: np.ndarray, negative: np.ndarray, tpr: float = 0.95) -> float:
    """FPR at the first ROC point (after scikit-learn's intermediate-point drop) with TPR >= `tpr`."""
    fpr_curve, tpr_curve, _ = roc_curve(positive, negative)
    return float(fpr_curve[int(np.argmax(tpr_curve >= tpr))])


def fpr95(id_scores: np.ndarray, ood_scores: np.ndarray, convention: str = "clipn", recall: float = 0.95) -> float:
    """FPR at 95% recall in the chosen convention (see the module docstring)."""
    if convention == "clipn":
        return fpr_at_tpr_interpolated(id_scores, ood_scores, recall)
    if convention == "openood":
        return fpr_at_tpr_first(-_check(ood_scores, "OOD"), -_check(id_scores, "ID"), recall)
    raise OptionsError(f"unknown FPR95 convention '{convention}' (expected one of {', '.join(FPR_CONVENTIONS)})")


def threshold_at_recall(id_scores: np.ndarray, recall: float = 0.95) -> float:
    """The highest threshold t for which at least `recall` of ID images score >= t.

    Accepting `score >= t` as ID keeps that share of ID images (more if scores tie at t): the
    percentile answer maintainers give when users ask which threshold to deploy.
    """
    scores = np.sort(_check(id_scores, "ID"))[::-1]
    n = scores.size
    k = min(max(int(np.ceil(recall * n)), 1), n)
    while k > 1 and (k - 1) / n >= recall:
        k -= 1
    while k < n and k / n < recall:
        k += 1
    return float(scores[k - 1])


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, convention: str = "clipn") -> dict[str, float]:
    """AUROC, FPR95 (in `convention`), AUPR-In and AUPR-Out of one score on one ID/OOD pair."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr95(id_scores, ood_scores, convention),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
    }
