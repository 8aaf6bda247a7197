"""PNG plots of an evaluation: per OOD set, the ROC curves of all methods and the ID/OOD score
histograms of each method, with the CTW/ATD decision boundaries marked.

matplotlib is an optional extra (`pip install 'clipn-cli[plots]'`) imported only here, inside the
functions, and only its object API is used (no pyplot: no GUI backend, no global figure state).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..scores import methods as method_table
from ..scores.methods import label
from ..scores import metrics
from ..errors import ClipnError
from ..files import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .results import Evaluation, MethodResult, SetScores

ID_COLOR, OOD_COLOR = "#1f77b4", "#d62728"
RULE_MARKERS = "soD^vP"  # ROC markers of the threshold-free rules, in table order
COLUMNS = 4  # histogram panels per row


def require_matplotlib() -> None:
    """Fail early, before any image is encoded, when the plots extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ClipnError("--plots needs matplotlib: pip install 'clipn-cli[plots]'") from None


def safe_name(name: str) -> str:
    """A file-name-safe form of an OOD set name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "set"


def write_plots(evaluation: Evaluation, directory: str | os.PathLike[str]) -> list[Path]:
    """Write `roc-<set>.png` and `scores-<set>.png` per OOD set; returns the paths written."""
    require_matplotlib()
    directory = Path(directory)
    id_set, ood_sets = evaluation.sets[0], [s for s in evaluation.sets[1:] if s.paths]  # unreadable sets have no metrics
    written: list[Path] = []
    used: set[str] = set()
    for ood in ood_sets:
        results = {r.method: r for r in evaluation.results if r.ood == ood.name}
        stem = safe_name(ood.name)
        if stem in used:
            stem = f"{stem}-{len(used) + 1}"
        used.add(stem)
        names = list(id_set.scores)  # the methods this evaluation computed, in table order
        for kind, figure in (
            ("roc", roc_figure(id_set, ood, results, names)),
            ("scores", histogram_figure(id_set, ood, results, names)),
        ):
            target = directory / f"{kind}-{stem}.png"
            with atomic_path(target) as tmp:
                figure.savefig(tmp, format="png", dpi=110)
            written.append(target)
    return written


def roc_figure(id_set: SetScores, ood: SetScores, results: dict[str, MethodResult], methods: list[str]) -> Figure:
    """All methods' ROC curves (ID positive) with AUROC/FPR95 in the legend and the rules' points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    for method in methods:
        fpr, tpr, _ = metrics.roc_curve(id_set.scores[method], ood.scores[method])
        r = results[method]
        ax.plot(fpr, tpr, color=method_table.get(method).color, lw=2 if method_table.get(method).threshold_free else 1.3,
                label=f"{label(method)}  AUROC {100 * r.auroc:.1f}%  FPR95 {100 * r.fpr95:.1f}%")
    rules = [m for m in methods if method_table.get(m).threshold_free]
    for method, marker in zip(rules, RULE_MARKERS):
        r = results[method]
        ax.plot([1 - r.ood_caught], [1 - r.id_flagged], marker=marker, ms=9, ls="none", mfc="white", mew=2,
                color=method_table.get(method).color, label=f"{label(method)} rule (threshold-free)")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
    ax.axhline(0.95, color="black", lw=0.8, ls="--", label="95% of ID accepted")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel(f"OOD images accepted as ID (FPR), {ood.name}")
    ax.set_ylabel("ID images accepted as ID (TPR)")
    ax.set_title(f"ROC: ID ({len(id_set.paths)} images) vs {ood.name} ({len(ood.paths)} images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def histogram_figure(id_set: SetScores, ood: SetScores, results: dict[str, MethodResult], methods: list[str]) -> Figure:
    """One panel per method (ID vs OOD score densities), one for ATD's decision margin, one summary."""
    from matplotlib.figure import Figure

    panels: list[tuple[str, np.ndarray, np.ndarray, str]] = []
    for method in methods:
        panels.append((method, id_set.scores[method], ood.scores[method], f"{label(method)} score (higher = more ID)"))
        if method == "atd":
            panels.append(("atd_margin", id_set.atd_margin, ood.atd_margin, "max_c p_yes·p − p_ood (ATD: OOD below 0)"))
    rows = math.ceil((len(panels) + 1) / COLUMNS)  # + the summary panel
    fig = Figure(figsize=(17, 4 * rows), layout="constrained")
    axes = fig.subplots(rows, COLUMNS).ravel()
    for ax, (method, id_scores, ood_scores, xlabel) in zip(axes, panels):
        _histogram(ax, id_scores, ood_scores, ood.name)
        ax.set_xlabel(xlabel)
        if method == "atd_margin":
            ax.axvline(0.0, color="black", lw=2, label="ATD rule boundary")
            ax.set_title(f"ATD rule margin: flags {100 * results['atd'].id_flagged:.1f}% ID, catches {100 * results['atd'].ood_caught:.1f}% OOD")
        else:
            r = results[method]
            ax.axvline(r.threshold_95, color="grey", lw=1.2, ls="--", label="threshold at 95% ID recall")
            if method == "ctw":
                ax.axvline(0.5, color="black", lw=2, label="CTW rule boundary (0.5)")
            ax.set_title(f"{label(method)}: AUROC {100 * r.auroc:.1f}%, FPR95 {100 * r.fpr95:.1f}%")
        ax.legend(fontsize=7, loc="best")
    for ax in axes[len(panels):]:
        ax.axis("off")
    if len(panels) < len(axes):
        axes[len(panels)].text(0, 0.5, _summary(id_set, ood, results), fontsize=10, va="center", family="monospace")
    fig.suptitle(f"Score distributions: ID ({len(id_set.paths)} images) vs {ood.name} ({len(ood.paths)} images)", fontsize=13)
    return fig


def _histogram(ax: Axes, id_scores: np.ndarray, ood_scores: np.ndarray, ood_name: str) -> None:
    lo = float(min(id_scores.min(), ood_scores.min()))
    hi = float(max(id_scores.max(), ood_scores.max()))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    ax.hist(id_scores, bins=bins, density=True, alpha=0.55, color=ID_COLOR, label="ID")
    ax.hist(ood_scores, bins=bins, density=True, alpha=0.55, color=OOD_COLOR, label=f"OOD: {ood_name}")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)


def _summary(id_set: SetScores, ood: SetScores, results: dict[str, MethodResult]) -> str:
    lines = ["Threshold-free rules", ""]
    for rule in id_set.flagged:
        r = results[rule]
        lines.append(f"{label(rule)}: flags {100 * r.id_flagged:5.1f}% of ID")
        lines.append(f"     catches {100 * r.ood_caught:5.1f}% of OOD")
    lines += ["", f"ID images:  {len(id_set.paths)}", f"OOD images: {len(ood.paths)}"]
    return "\n".join(lines)
