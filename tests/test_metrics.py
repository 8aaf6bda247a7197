"""Metric functions against scikit-learn/scipy (random and tied scores) and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.interpolate import interp1d
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from clipn_cli.scores import metrics


def labelled(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels with ID = 1, scores) as the official code feeds scikit-learn."""
    return np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))], np.r_[id_scores, ood_scores]


def official_fpr95(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """CLIPN `cal_auc_fpr`: interp1d(tpr, fpr)(0.95) on roc_curve with ID as positive."""
    labels, scores = labelled(id_scores, ood_scores)
    fpr, tpr, _ = sk_roc_curve(labels, scores, pos_label=1)
    return float(interp1d(tpr, fpr)(0.95))


def openood_fpr95(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """OpenOOD: OOD positive, negated scores, FPR at the first point with TPR >= 0.95."""
    labels, scores = labelled(id_scores, ood_scores)
    fpr, tpr, _ = sk_roc_curve(1 - labels, -scores)
    return float(fpr[np.argmax(tpr >= 0.95)])


def cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for n_id, n_ood in ((50, 40), (7, 300), (200, 3), (1, 1), (20, 20)):
        out.append((rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)))  # continuous
        out.append((rng.integers(0, 4, n_id).astype(float), rng.integers(0, 3, n_ood).astype(float)))  # heavy ties
        out.append((np.round(rng.normal(1, 1, n_id), 1), np.round(rng.normal(0, 1, n_ood), 1)))  # some ties
    out.append((np.full(10, 0.5), np.full(7, 0.5)))  # every score tied: chance
    out.append((np.arange(20.0, 0.0, -1.0), np.arange(20.0, 0.0, -1.0)))  # pairwise ties, all steps equal
    return out


@pytest.mark.parametrize("id_scores, ood_scores", cases())
def test_equals_sklearn_and_official(id_scores: np.ndarray, ood_scores: np.ndarray) -> None:
    labels, scores = labelled(id_scores, ood_scores)
    assert metrics.auroc(id_scores, ood_scores) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12, abs=1e-15)
    assert metrics.aupr_in(id_scores, ood_scores) == pytest.approx(average_precision_score(labels, scores), rel=1e-12)
    assert metrics.aupr_out(id_scores, ood_scores) == pytest.approx(average_precision_score(1 - labels, -scores), rel=1e-12)
    assert metrics.fpr95(id_scores, ood_scores, "clipn") == official_fpr95(id_scores, ood_scores)
    assert metrics.fpr95(id_scores, ood_scores, "openood") == openood_fpr95(id_scores, ood_scores)
    for drop in (True, False):
        ours = metrics.roc_curve(id_scores, ood_scores, drop_intermediate=drop)
        theirs = sk_roc_curve(labels, scores, drop_intermediate=drop)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)


def test_hand_made_tie_with_interpolation() -> None:
    # ID 10..1; OOD 20 (above every ID) and two at 1 (tied with the lowest ID image).
    # ROC: (0,0) (1/3,0) (1/3,.1) ... (1/3,.9) (1,1). TPR .95 lies halfway up the last
    # segment: FPR = 1/3 + ½·(2/3) = 2/3. Pairs ID > OOD: 2·9 wins + 2·½ ties = 19 of 30.
    id_scores = np.arange(10.0, 0.0, -1.0)
    ood_scores = np.array([20.0, 1.0, 1.0])
    assert metrics.fpr95(id_scores, ood_scores) == pytest.approx(2 / 3, abs=1e-15)
    assert metrics.auroc(id_scores, ood_scores) == pytest.approx(19 / 30, abs=1e-15)
    # OpenOOD: catching >= 95% of OOD means catching the 20, so every ID image is rejected.
    assert metrics.fpr95(id_scores, ood_scores, "openood") == 1.0


def test_exact_95_percent_point_takes_the_highest_fpr() -> None:
    # 19 of 20 ID images above everything, then one OOD image (1.5), the last ID image (1),
    # one more OOD image (0). Two ROC points have TPR exactly .95: (0, .95) and (.5, .95).
    # interp1d (numpy.interp underneath) returns the last one: FPR .5, not 0.
    id_scores = np.r_[np.arange(20.0, 1.0, -1.0), 1.0]
    ood_scores = np.array([1.5, 0.0])
    assert metrics.fpr95(id_scores, ood_scores) == 0.5 == official_fpr95(id_scores, ood_scores)


def test_openood_uses_sklearn_dropped_points() -> None:
    # Every threshold holds one ID and one OOD image: all inner ROC points are collinear
    # with equal steps and scikit-learn drops them, so the first point with TPR >= .95 is
    # (1, 1), not (.95, .95). OpenOOD's number (1.0) depends on that drop.
    scores = np.arange(20.0, 0.0, -1.0)
    assert metrics.fpr95(scores, scores, "openood") == 1.0
    fpr, tpr, _ = metrics.roc_curve(-scores, -scores, drop_intermediate=False)
    assert fpr[np.argmax(tpr >= 0.95)] == pytest.approx(0.95)
    assert metrics.fpr95(scores, scores, "clipn") == pytest.approx(0.95)


def test_perfect_and_reversed_separation() -> None:
    id_scores, ood_scores = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0])
    assert metrics.ood_metrics(id_scores, ood_scores) == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    reversed_ = metrics.ood_metrics(-id_scores, -ood_scores)
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 1.0


def test_threshold_at_recall() -> None:
    ids = np.arange(1.0, 21.0)  # 20 images: keeping 19 of them means threshold 2
    assert metrics.threshold_at_recall(ids, 0.95) == 2.0
    assert metrics.threshold_at_recall(ids, 1.0) == 1.0
    assert (ids >= metrics.threshold_at_recall(ids, 0.95)).mean() >= 0.95
    assert metrics.threshold_at_recall(np.array([5.0, 5.0, 5.0, 1.0]), 0.5) == 5.0  # ties kept together
    rng = np.random.default_rng(1)
    for n in (1, 3, 19, 20, 21, 100, 101, 997):
        scores = rng.normal(size=n)
        t = metrics.threshold_at_recall(scores, 0.95)
        assert (scores >= t).mean() >= 0.95  # enough ID kept ...
        assert (scores > t).mean() < 0.95  # ... by the highest such threshold


@pytest.mark.parametrize("bad", [np.array([]), np.array([1.0, np.nan]), np.array([np.inf])])
def test_bad_scores_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        metrics.auroc(bad, np.array([0.0]))
    with pytest.raises(ValueError):
        metrics.fpr95(np.array([0.0]), bad, "openood")


def test_unknown_convention() -> None:
    with pytest.raises(ValueError, match="convention"):
        metrics.fpr95(np.array([1.0]), np.array([0.0]), "other")
