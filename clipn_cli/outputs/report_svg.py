"""The drawings of an HTML report: ROC curves and histograms as inline SVG (no plotting library),
the per-class bar table, and the escaping every string from the data goes through. `report.py` builds the pages from them.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..scores import metrics

HIST_BINS = 40
ROC_POINTS = 240  # points per ROC curve, log-spaced on the false-alarm axis
CLASS_ROWS = 50  # rows of the per-class table
ID_COLOR, OOD_COLOR = "#2b6cb0", "#c53030"


def esc(value: Any) -> str:
    """HTML-escaped text; a file name's non-UTF-8 bytes (lone surrogates) are shown as U+FFFD."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return html.escape(text, quote=True)


@dataclass
class Curve:
    label: str
    color: str
    x: np.ndarray
    y: np.ndarray
    width: float = 1.6


@dataclass
class Marker:
    label: str
    color: str
    x: float
    y: float


def roc_svg(title: str, curves: Sequence[Curve], markers: Sequence[Marker], x_min: float, width: int = 560, height: int = 400) -> str:
    """ROC oriented as the `--plots` ROC (ID positive): x = OOD accepted as ID (FPR, log scale from
    `x_min` to 1), y = ID accepted as ID (TPR, linear), with the 95%-of-ID line of FPR95."""
    left, right, top, bottom = 56, 190, 26, 44
    pw, ph = width - left - right, height - top - bottom
    lo = math.log10(x_min)

    def sx(x: float) -> float:
        return left + pw * (math.log10(min(max(x, x_min), 1.0)) - lo) / -lo

    def sy(y: float) -> float:
        return top + ph * (1 - y)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{left}" y="16" font-size="13" font-weight="600">{esc(title)}</text>']
    for exponent in range(int(round(lo)), 1):
        x = sx(10.0 ** exponent)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#e2e8f0"/>'
                     f'<text x="{x:.1f}" y="{top + ph + 14}" font-size="11" text-anchor="middle">{_pow10(exponent)}</text>')
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = sy(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e2e8f0"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick:g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#a0aec0"/>')
    parts.append(f'<line x1="{left}" y1="{sy(0.95):.1f}" x2="{left + pw}" y2="{sy(0.95):.1f}" stroke="#1a202c" stroke-dasharray="5 3"/>'
                 f'<text x="{left + 4}" y="{sy(0.95) + 12:.1f}" font-size="10">95% of ID accepted</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" font-size="12" text-anchor="middle">OOD images accepted as ID (FPR, log scale)</text>')
    parts.append(f'<text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">ID images accepted as ID (TPR)</text>')
    for c in curves:
        points = " ".join(f"{sx(float(x)):.1f},{sy(float(y)):.1f}" for x, y in zip(c.x, c.y))
        parts.append(f'<polyline fill="none" stroke="{c.color}" stroke-width="{c.width}" points="{points}"/>')
    for m in markers:
        parts.append(f'<circle cx="{sx(m.x):.1f}" cy="{sy(m.y):.1f}" r="5" fill="#fff" stroke="{m.color}" stroke-width="2.2"/>')
    legend = [(c.label, c.color, "line") for c in curves] + [(m.label, m.color, "dot") for m in markers]
    for i, (label, color, kind) in enumerate(legend):
        y = top + 10 + 17 * i
        x = left + pw + 12
        shape = (f'<line x1="{x}" y1="{y}" x2="{x + 18}" y2="{y}" stroke="{color}" stroke-width="2.5"/>' if kind == "line"
                 else f'<circle cx="{x + 9}" cy="{y}" r="4.5" fill="#fff" stroke="{color}" stroke-width="2"/>')
        parts.append(f'{shape}<text x="{x + 24}" y="{y + 4}" font-size="11">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _pow10(exponent: int) -> str:
    return {0: "1", -1: "0.1", -2: "0.01"}.get(exponent, f"1e{exponent}")


def roc_curve_log(id_scores: np.ndarray, ood_scores: np.ndarray, x_min: float) -> tuple[np.ndarray, np.ndarray]:
    """(OOD accepted as ID, ID accepted) at `ROC_POINTS` log-spaced FPRs: ID positive, as `plots.roc_figure`
    and the clipn FPR95 convention (a score at or above the threshold is accepted as ID).

    The curve is resampled, so its size does not grow with the number of images.
    """
    fpr, tpr, _ = metrics.roc_curve(np.asarray(id_scores), np.asarray(ood_scores))
    xs = np.logspace(math.log10(x_min), 0, ROC_POINTS)
    # a step up at one FPR: take the highest ID acceptance reached there
    order = np.lexsort((tpr, fpr))
    return xs, np.interp(xs, fpr[order], tpr[order])


@dataclass
class Line:
    """A marked value on a histogram: a rule's boundary (solid black) or a threshold (grey dashes)."""

    label: str
    value: float
    boundary: bool = False


def histogram_svg(title: str, series: Sequence[tuple[str, str, np.ndarray]], lines: Sequence[Line] = (),
                  bounds: tuple[float, float] | None = None, counts: Sequence[np.ndarray] | None = None,
                  width: int = 360, height: int = 210) -> str:
    """Overlaid histograms (step outlines, light fill) of several score arrays, with marked values.

    The y axis is each series' share of its images per bin (ticks at 0, half the peak and the peak).
    `counts` (pre-binned, HIST_BINS-long arrays over `bounds`) replaces the raw arrays when given.
    """
    left, right, top, bottom = 52, 10, 24, 44
    pw, ph = width - left - right, height - top - bottom
    if counts is None:
        series = [(label, color, v[np.isfinite(v)]) for label, color, v in series]  # NaN: a score this model lacks
        values = [v for _, _, v in series if v.size]
        lo = bounds[0] if bounds else float(min(v.min() for v in values)) if values else 0.0
        hi = bounds[1] if bounds else float(max(v.max() for v in values)) if values else 1.0
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, HIST_BINS + 1)
        counts = [np.histogram(v, bins=edges)[0] for _, _, v in series]
    else:
        lo, hi = bounds or (0.0, 1.0)
    densities = [c / max(int(c.sum()), 1) for c in counts]
    peak = max((float(d.max()) for d in densities if d.size), default=1.0) or 1.0

    def sx(x: float) -> float:
        return left + pw * (x - lo) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{left}" y="15" font-size="12" font-weight="600">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#a0aec0"/>']
    bin_width = pw / HIST_BINS
    for (label, color, _), density in zip(series, densities):
        d = [f"M{left},{top + ph}"]
        for i, value in enumerate(density):
            y = top + ph * (1 - float(value) / peak)
            d.append(f"L{left + i * bin_width:.1f},{y:.1f}L{left + (i + 1) * bin_width:.1f},{y:.1f}")
        d.append(f"L{left + pw},{top + ph}Z")
        parts.append(f'<path d="{"".join(d)}" fill="{color}" fill-opacity="0.18" stroke="{color}" stroke-width="1.4"/>')
    for tick in (0.0, peak / 2, peak):
        y = top + ph * (1 - tick / peak)
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#a0aec0"/>'
                     f'<text x="{left - 6}" y="{y + 3.5:.1f}" font-size="10" text-anchor="end">{100 * tick:.3g}%</text>')
    parts.append(f'<text x="10" y="{top + ph / 2}" font-size="10" text-anchor="middle" transform="rotate(-90 10 {top + ph / 2})">share per bin</text>')
    for i, line in enumerate(lines):
        if lo <= line.value <= hi:
            x = sx(line.value)
            style = 'stroke="#000" stroke-width="2"' if line.boundary else 'stroke="#718096" stroke-width="1.2" stroke-dasharray="4 3"'
            parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" {style}/>'
                         f'<text x="{x + 3:.1f}" y="{top + 11 + 12 * i}" font-size="10">{esc(line.label)}</text>')
    for x, anchor in ((lo, "start"), ((lo + hi) / 2, "middle"), (hi, "end")):
        parts.append(f'<text x="{sx(x):.1f}" y="{top + ph + 13}" font-size="10" text-anchor="{anchor}">{x:.3g}</text>')
    for i, (label, color, _) in enumerate(series):
        x = left + 4 + 120 * i
        parts.append(f'<rect x="{x}" y="{height - 14}" width="10" height="10" fill="{color}" fill-opacity="0.5"/>'
                     f'<text x="{x + 14}" y="{height - 5}" font-size="10">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def class_table(per_class: Counter) -> str:
    totals: Counter = Counter()
    for (name, _), count in per_class.items():
        totals[name] += count
    ranked = totals.most_common(CLASS_ROWS)
    peak = max(totals.values(), default=1)
    cut = f"; the {CLASS_ROWS} most frequent of {len(totals)} shown" if len(totals) > CLASS_ROWS else ""
    rows = [f"<h2>Counts per predicted class</h2><p class=\"note\">Predicted class of each image and its verdict{esc(cut)}.</p>"
            "<table><tr><th class=\"l\">class</th><th>ID</th><th>OOD</th><th class=\"l\"></th></tr>"]
    for name, total in ranked:
        n_id, n_ood = per_class[(name, "ID")], per_class[(name, "OOD")]
        bars = (f'<span class="bar" style="width:{160 * n_id / peak:.0f}px;background:{ID_COLOR}"></span>'
                f'<span class="bar" style="width:{160 * n_ood / peak:.0f}px;background:{OOD_COLOR}"></span>')
        rows.append(f"<tr><td class=\"l\">{esc(name)}</td><td>{n_id}</td><td>{n_ood}</td><td class=\"l\">{bars}</td></tr>")
    return "".join(rows) + "</table>"
