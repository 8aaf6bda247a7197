"""Self-contained HTML reports for `eval` and `detect`: one file, no network, no script.

Everything is inline: CSS, charts (SVG drawn by `report_svg`, so no plotting library is needed) and
thumbnails (small PNG/JPEG as data: URIs). A Content-Security-Policy forbids every script and
every non-data resource, and every string from the data (paths, class and set names) is
HTML-escaped, so a file named `<script>...</script>.jpg` is shown as text. Galleries and tables
are cut to a fixed size, stated on the page, so a report of 10^5 images stays a few MB.
"""

from __future__ import annotations

import base64
import heapq
import io
import itertools
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..scores import methods as method_table
from ..scores.calibration import p_values
from ..files import atomic_open
from .report_svg import HIST_BINS, ID_COLOR, OOD_COLOR, Curve, Line, Marker, class_table, esc, histogram_svg, roc_curve_log, roc_svg

if TYPE_CHECKING:
    from ..scores.calibration import CalibratedVerdicts, OperatingPoint
    from .results import Evaluation

GALLERY_SIZE = 48  # thumbnails per gallery
THUMB_PIXELS = 112  # longest side of a thumbnail
ERROR_ROWS = 20
HIST_SAMPLE = 20_000  # scores per verdict kept (a uniform sample beyond) for a detect histogram without p_ood
PROVENANCE_CLASSES = 50  # class names listed in the provenance block
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1a202c;padding:0 16px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.note{color:#4a5568;font-size:13px;margin:4px 0 10px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{padding:3px 10px;border-bottom:1px solid #edf2f7;text-align:right}
th{background:#f7fafc;font-weight:600}td.l,th.l{text-align:left}tr.avg td{font-weight:600;background:#fafafa}
.charts{display:flex;flex-wrap:wrap;gap:14px}.chart{border:1px solid #e2e8f0;border-radius:6px;padding:6px;background:#fff}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(168px,1fr));gap:10px}
.card{border:1px solid #e2e8f0;border-radius:6px;padding:6px;font-size:12px;background:#fff;overflow-wrap:anywhere}
.card img{display:block;width:112px;height:112px;object-fit:contain;margin:0 auto 4px;image-rendering:pixelated;background:#f7fafc}
.card .path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;color:#2d3748}
.card .none{width:112px;height:112px;margin:0 auto 4px;display:flex;align-items:center;justify-content:center;background:#f7fafc;color:#a0aec0}
.tag{display:inline-block;padding:0 6px;border-radius:8px;color:#fff;font-weight:600;font-size:11px}.OOD{background:#c53030}.ID{background:#2f855a}
.bar{display:inline-block;height:10px;vertical-align:middle}.kpi{display:flex;gap:12px;flex-wrap:wrap}
.kpi div{border:1px solid #e2e8f0;border-radius:6px;padding:8px 14px;background:#f7fafc}.kpi b{display:block;font-size:20px}
table.prov{font-size:12px;margin:0 0 8px}table.prov th,table.prov td{text-align:left;padding:1px 10px 1px 0;background:none;border:0;vertical-align:top}
"""


def fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def thumbnail_uri(path: str, size: int = THUMB_PIXELS) -> str | None:
    """A small PNG or JPEG (whichever is smaller) of an image file as a data: URI; None if unreadable."""
    from PIL import Image

    from ..inputs.decode import open_image

    try:
        img = open_image(path, draft=size)
        img.thumbnail((size, size), Image.BICUBIC)
        if img.mode in ("RGBA", "LA", "P", "PA"):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, "white")
            img.paste(rgba, mask=rgba.split()[-1])
        img = img.convert("RGB")
        encoded = []
        for kind, options in (("png", {"optimize": True}), ("jpeg", {"quality": 82})):
            buffer = io.BytesIO()
            img.save(buffer, format=kind.upper(), **options)
            encoded.append((len(buffer.getvalue()), kind, buffer.getvalue()))
        _, kind, data = min(encoded)
    except Exception:  # a file that changed or vanished since it was scored costs its thumbnail only
        return None
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def page(title: str, subtitle: str, body: Iterable[str], provenance: Mapping[str, Any] | None = None) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"note\">{esc(subtitle)}</p>" + provenance_html(provenance) + "".join(body) + "</body></html>\n"
    )


def provenance_html(provenance: Mapping[str, Any] | None) -> str:
    """What made the report (weights, classes, version, date, options), as the caller states it.

    Plain values only (the CLI builds the mapping; this module imports neither torch nor the CLI).
    A list is joined with commas, a long class list cut (and said so); None values are left out.
    """
    if not provenance:
        return ""
    rows = []
    for key, value in provenance.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            shown = ", ".join(str(v) for v in value[:PROVENANCE_CLASSES])
            text = shown + (f" … ({len(value)} in all)" if len(value) > PROVENANCE_CLASSES else "")
        else:
            text = str(value)
        rows.append(f"<tr><th>{esc(key)}</th><td>{esc(text)}</td></tr>")
    return f"<table class=\"prov\">{''.join(rows)}</table>" if rows else ""


def write_html(path: str | os.PathLike[str], text: str) -> None:
    """Write the report atomically (UTF-8)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


# ---- galleries ----------------------------------------------------------------------------------

@dataclass
class Card:
    """One gallery thumbnail and its caption."""

    path: str
    verdict: str | None
    caption: list[tuple[str, str]]  # (label, value) lines


def gallery(title: str, note: str, cards: Sequence[Card], total: int) -> str:
    shown = f"showing {len(cards)} of {total}" + (f" (cut to the top {GALLERY_SIZE})" if total > len(cards) else "")
    out = [f"<h3>{esc(title)}</h3><p class=\"note\">{esc(note)}; {esc(shown)}.</p>"]
    if not cards:
        return out[0] + "<p class=\"note\">none</p>"
    out.append("<div class=\"gallery\">")
    for card in cards:
        uri = thumbnail_uri(card.path)
        image = f'<img src="{uri}" alt="{esc(card.path)}">' if uri else '<div class="none">unreadable</div>'
        tag = f'<span class="tag {esc(card.verdict)}">{esc(card.verdict)}</span> ' if card.verdict in ("ID", "OOD") else ""
        lines = "".join(f"<div>{esc(label)}: {esc(value)}</div>" for label, value in card.caption)
        out.append(f'<div class="card">{image}<div class="path">{tag}{esc(card.path)}</div>{lines}</div>')
    out.append("</div>")
    return "".join(out)


# ---- eval ---------------------------------------------------------------------------------------

def eval_report(evaluation: Evaluation, points: Sequence[OperatingPoint] = (), title: str = "clipn eval report",
                provenance: Mapping[str, Any] | None = None) -> str:
    """The HTML report of an evaluation: metrics, ROC (log FPR axis), histograms, galleries.

    `provenance`: what made it (weights, classes, version, date, options), shown at the top.
    """
    id_set = evaluation.sets[0]
    ood_sets = [s for s in evaluation.sets[1:] if s.paths]
    counts = ", ".join(f"{s.name}: {len(s.paths)}" for s in evaluation.sets)
    body = [f"<p class=\"note\">Images {esc(counts)}; {len(evaluation.classes)} classes. "
            f"Every score is higher = more ID. FPR95 convention: {esc(evaluation.convention)}.</p>"]
    if evaluation.id_accuracy is not None:
        body.append(f"<p class=\"note\">ID top-1 accuracy: {pct(evaluation.id_accuracy)}%</p>")
    body.append("<h2>Metrics (%)</h2>" + _metrics_table(evaluation))
    if points:
        body.append(_points_table(points))
    body.append("<h2>ROC curves</h2><p class=\"note\">Oriented as the --plots ROC (ID images as positives, the clipn FPR95 "
                "convention): x = share of OOD images accepted as ID (FPR; log scale, so the region of few misses is visible), "
                "y = share of ID images accepted (TPR); FPR95 is where a curve crosses the dashed 95% line. Circles: the "
                "threshold-free CTW/ATD verdicts" + (" and the calibrated ATD verdict at alpha (conformal, on the held-out ID half)" if points else "") + ".</p>")
    charts = []
    methods = list(id_set.scores)  # the methods this evaluation computed, in table order
    rules = list(id_set.flagged)  # its threshold-free rules
    for ood in ood_sets:
        x_min = 10.0 ** math.floor(math.log10(1.0 / max(len(ood.paths), 2)))  # one OOD image still gets a decade, not log10(1) = 0
        curves = [Curve(method_table.label(m), method_table.get(m).color, *roc_curve_log(id_set.scores[m], ood.scores[m], x_min),
                        width=2.4 if m in rules else 1.4) for m in methods]
        markers = [Marker(f"{method_table.label(r)} rule", method_table.get(r).color, 1 - float(ood.flagged[r].mean()), 1 - float(id_set.flagged[r].mean())) for r in rules]
        markers += [Marker(f"ATD calibrated, alpha {p.alpha:g}", "#000", 1 - p.ood_caught[ood.name], 1 - p.id_flagged)
                    for p in points if p.method == "atd"]
        charts.append(roc_svg(f"ID ({len(id_set.paths)}) vs {ood.name} ({len(ood.paths)})", curves, markers, x_min))
    body.append("<div class=\"charts\">" + "".join(f"<div class=\"chart\">{c}</div>" for c in charts) + "</div>")
    body.append("<h2>Score histograms</h2><p class=\"note\">Share of each group's images per bin; OOD = every OOD set together. "
                "Marked as in the --plots histograms: grey dashes, the threshold keeping 95% of ID images (thr@95%ID); black, "
                "a rule's own boundary (CTW at 0.5; ATD where its margin max_c p_yes&middot;p &minus; p_ood crosses 0).</p><div class=\"charts\">")
    pooled = {m: np.concatenate([s.scores[m] for s in ood_sets]) for m in methods}
    thresholds = {r.method: r.threshold_95 for r in evaluation.results}
    panels = [(m, f"{method_table.label(m)} score", id_set.scores[m], pooled[m]) for m in methods]
    if "atd" in rules and np.isfinite(id_set.atd_margin).any():
        at = [i for i, (m, *_) in enumerate(panels) if m == "atd"][0] + 1
        panels.insert(at, ("atd_margin", "ATD margin (OOD below 0)", id_set.atd_margin, np.concatenate([s.atd_margin for s in ood_sets])))
    for m, label, id_values, ood_values in panels:
        lines = [Line("thr@95%ID", thresholds[m])] if m in thresholds else []
        lines += [Line("CTW rule 0.5", 0.5, True)] if m == "ctw" else [Line("ATD rule 0", 0.0, True)] if m == "atd_margin" else []
        body.append("<div class=\"chart\">" + histogram_svg(label, [("ID", ID_COLOR, id_values), ("OOD", OOD_COLOR, ood_values)], lines) + "</div>")
    calibrated = next((p for p in points if p.method == "atd"), None)
    how = ("Verdicts of the ATD rule (threshold-free)" if calibrated is None else
           f"Calibrated ATD verdicts at alpha {calibrated.alpha:g}, as in the table above: ID images are those of the held-out half "
           f"({calibrated.id_test_size}; the {calibrated.calibration_size} calibration images have no verdict of their own)")
    body.append(f"</div><h2>Galleries</h2><p class=\"note\">{esc(how)}. Class = the predicted class.</p>")
    body.append(_eval_galleries(evaluation, calibrated))
    return page(title, f"{sum(len(s.paths) for s in evaluation.sets)} images scored by CLIPN (CTW, ATD) and baselines", body, provenance)


def _metrics_table(evaluation: Evaluation) -> str:
    rows = ["<table><tr><th class=\"l\">OOD set</th><th class=\"l\">method</th><th>AUROC</th><th>FPR95</th><th>AUPR-In</th>"
            "<th>AUPR-Out</th><th>ID flagged</th><th>OOD caught</th><th>thr@95%ID</th></tr>"]
    for r in evaluation.results:
        cls = ' class="avg"' if r.ood == "average" else ""
        rows.append(f"<tr{cls}><td class=\"l\">{esc(r.ood)}</td><td class=\"l\">{esc(method_table.label(r.method))}</td>"
                    f"<td>{pct(r.auroc)}</td><td>{pct(r.fpr95)}</td><td>{pct(r.aupr_in)}</td><td>{pct(r.aupr_out)}</td>"
                    f"<td>{pct(r.id_flagged)}</td><td>{pct(r.ood_caught)}</td><td>{fmt(r.threshold_95)}</td></tr>")
    return "".join(rows) + "</table>"


def _points_table(points: Sequence[OperatingPoint]) -> str:
    p0 = points[0]
    sets = list(p0.ood_caught)
    head = "".join(f"<th>OOD caught: {esc(s)}</th>" for s in sets)
    rows = [f"<h3>Calibrated verdicts at alpha = {p0.alpha:g}</h3><p class=\"note\">Calibrated on a random half of the ID images "
            f"({p0.calibration_size}), measured on the other half ({p0.id_test_size}) and on every OOD image. The guarantee: "
            f"ID flagged &le; alpha in expectation.</p><table><tr><th class=\"l\">method</th><th>ID flagged</th>{head}</tr>"]
    for p in points:
        cells = "".join(f"<td>{pct(p.ood_caught[s])}</td>" for s in sets)
        rows.append(f"<tr><td class=\"l\">{esc(method_table.label(p.method))}</td><td>{pct(p.id_flagged)}</td>{cells}</tr>")
    return "".join(rows) + "</table>"


def _eval_galleries(evaluation: Evaluation, calibrated: OperatingPoint | None = None) -> str:
    """False alarms, misses and the most certain OOD verdicts: of the ATD rule, or of its calibrated
    operating point (then only the held-out ID images can be false alarms)."""
    classes = evaluation.classes
    id_set, ood_sets = evaluation.sets[0], evaluation.sets[1:]
    judged = np.ones(len(id_set.paths), dtype=bool)  # ID images with a verdict of their own
    if calibrated is None:
        flagged = {s.name: s.flagged["atd"] for s in evaluation.sets}
    else:
        flagged = {s.name: calibrated.flags(s.scores["atd"]) for s in evaluation.sets}
        judged[calibrated.calibration_indices] = False

    def card(s: Any, i: int) -> Card:
        label = s.labels[i]
        caption = [("set", s.name + (f" / {label}" if label else "")), ("class", classes[int(s.pred[i])]),
                   ("ATD", fmt(float(s.scores["atd"][i]))), ("p_ood", fmt(1 - float(s.scores["atd"][i]))), ("CTW", fmt(float(s.scores["ctw"][i])))]
        if calibrated is not None:
            caption.append(("p_value", fmt(float(p_values(calibrated.calibration_scores, s.scores["atd"][i])))))
        return Card(s.paths[i], "OOD" if flagged[s.name][i] else "ID", caption)

    def pick(entries: list[tuple[float, Any, int]], reverse: bool) -> tuple[list[Card], int]:
        entries.sort(key=lambda e: e[0], reverse=reverse)
        return [card(s, i) for _, s, i in entries[:GALLERY_SIZE]], len(entries)

    def where(s: Any, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask & judged) if s is id_set else np.flatnonzero(mask)

    false_alarms = [(float(id_set.scores["atd"][i]), id_set, i) for i in where(id_set, flagged[id_set.name])]
    misses = [(float(s.scores["atd"][i]), s, i) for s in ood_sets for i in where(s, ~flagged[s.name])]
    certain = [(float(s.scores["atd"][i]), s, i) for s in evaluation.sets for i in where(s, flagged[s.name])]
    out = []
    for title, note, entries, reverse in (
        ("ID images flagged OOD (false alarms)", "lowest ATD score first", false_alarms, False),
        ("OOD images accepted as ID (misses)", "highest ATD score first", misses, True),
        ("Most certain OOD verdicts", "all sets, highest p_ood first", certain, False),
    ):
        cards, total = pick(entries, reverse)
        out.append(gallery(title, note, cards, total))
    return "".join(out)


# ---- detect -------------------------------------------------------------------------------------

@dataclass
class DetectReport:
    """What a detect run's report needs, gathered record by record in bounded memory.

    The histogram and gallery rank images by p_ood (1 − ATD score) when the records have it. Records
    without it (a plain CLIP has no "no" tower, so no p_ood nor ATD score) are ranked by the rule's own
    score instead, lowest (most OOD) first, and its histogram is drawn from a bounded uniform sample.
    """

    classes: list[str]
    calibrated: bool = False
    verdicts: Counter = field(default_factory=Counter)
    per_class: Counter = field(default_factory=Counter)  # (class, verdict) -> count
    errors: list[tuple[str, str]] = field(default_factory=list)
    error_count: int = 0
    hist: dict[str, np.ndarray] = field(default_factory=lambda: {"ID": np.zeros(HIST_BINS, np.int64), "OOD": np.zeros(HIST_BINS, np.int64)})
    samples: dict[str, list[float]] = field(default_factory=lambda: {"ID": [], "OOD": []})  # rule scores, without p_ood
    seen: Counter = field(default_factory=Counter)  # rule scores per verdict, sampled or not
    top: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)  # min-heap of the most OOD
    rule: str | None = None
    key: str | None = None  # "p_ood", or the rule's record field when the records have no p_ood
    _order: itertools.count = field(default_factory=itertools.count)
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, record: dict[str, Any]) -> None:
        if "error" in record:
            self.error_count += 1
            if len(self.errors) < ERROR_ROWS:
                self.errors.append((record["path"], record["error"]))
            return
        verdict = record["verdict"]
        self.rule = record.get("rule")
        self.verdicts[verdict] += 1
        self.per_class[(record["class"], verdict)] += 1
        if self.key is None:
            method = method_table.BY_NAME.get(self.rule or "atd")
            self.key = "p_ood" if record.get("p_ood") is not None else method.record if method is not None else None
        value = record.get(self.key) if self.key else None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return  # counted above; nothing to rank it by
        if self.key == "p_ood":
            self.hist[verdict][min(max(int(value * HIST_BINS), 0), HIST_BINS - 1)] += 1
            rank = float(value)
        else:
            self._sample(verdict, float(value))
            rank = -float(value)  # higher = more ID: the lowest score is the most OOD
        keep = {k: record.get(k) for k in ("path", "verdict", "class", "p_ood", "atd_score", "ctw_score", "p_value", "q_value", self.key)}
        entry = (rank, -next(self._order), keep)  # equal rank: the earlier input wins
        if len(self.top) < GALLERY_SIZE:
            heapq.heappush(self.top, entry)
        elif entry[:2] > self.top[0][:2]:
            heapq.heapreplace(self.top, entry)

    def _sample(self, verdict: str, value: float) -> None:
        """Reservoir sampling: every score seen has the same chance to be among the HIST_SAMPLE kept."""
        self.seen[verdict] += 1
        kept = self.samples[verdict]
        if len(kept) < HIST_SAMPLE:
            kept.append(value)
        elif (j := self._rng.randrange(self.seen[verdict])) < HIST_SAMPLE:
            kept[j] = value

    def render(self, verdicts: CalibratedVerdicts | None = None, title: str = "clipn detect report",
               provenance: Mapping[str, Any] | None = None) -> str:
        """The page; `provenance` (weights, classes, version, date, options) is shown at the top."""
        scored = sum(self.verdicts.values())
        total = scored + self.error_count
        rule = method_table.BY_NAME.get(self.rule or "atd")
        rule_name = method_table.label(self.rule or "atd")
        if verdicts is None:
            how = (f"Verdicts: the {esc(rule_name)} rule (threshold-free)." if rule is None or rule.threshold_free else
                   f"Verdicts: OOD when the {esc(rule_name)} score is below the threshold.")
        elif verdicts.fdr is None:
            how = (f"Verdicts: calibrated {esc(method_table.label(verdicts.method))} score, OOD when p_value &le; alpha = {verdicts.alpha:g} "
                   f"(calibration: {verdicts.calibration.count} ID images); an ID image is flagged with probability &le; alpha.")
        else:
            how = (f"Verdicts: Benjamini-Hochberg at FDR {verdicts.fdr:g} over this run's p-values of the {esc(method_table.label(verdicts.method))} score "
                   f"(calibration: {verdicts.calibration.count} ID images); expected share of ID among the OOD verdicts &le; {verdicts.fdr:g}.")
        body = [f"<p class=\"note\">{how}</p><div class=\"kpi\">"]
        for label, value in (("images", total), ("ID", self.verdicts["ID"]), ("OOD", self.verdicts["OOD"]), ("errors", self.error_count)):
            share = f" ({100 * value / total:.1f}%)" if total and label != "images" else ""
            body.append(f"<div>{esc(label)}<b>{value}{share}</b></div>")
        body.append("</div>")
        body.append(class_table(self.per_class))
        if self.key in (None, "p_ood"):
            body.append("<h2>p_ood by verdict</h2><div class=\"charts\"><div class=\"chart\">"
                        + histogram_svg("p_ood = 1 - ATD score", [("ID verdicts", ID_COLOR, np.empty(0)), ("OOD verdicts", OOD_COLOR, np.empty(0))],
                                        bounds=(0.0, 1.0), counts=[self.hist["ID"], self.hist["OOD"]], width=560, height=240)
                        + "</div></div>")
            order, note = "Highest p_ood first", "every scored image, sorted by p_ood"
        else:
            sampled = {v: n for v, n in self.seen.items() if n > HIST_SAMPLE}
            cut = "".join(f" The {v} histogram is drawn from a uniform sample of {HIST_SAMPLE} of its {n} scores." for v, n in sampled.items())
            body.append(f"<h2>{esc(self.key)} by verdict</h2><p class=\"note\">These records have no p_ood (a plain CLIP has no \"no\" "
                        f"tower, so no ATD score): the histogram and the gallery use the {esc(rule_name)} score, the rule's own "
                        f"(higher = more ID).{esc(cut)}</p><div class=\"charts\"><div class=\"chart\">"
                        + histogram_svg(f"{rule_name} score ({self.key})", [("ID verdicts", ID_COLOR, np.asarray(self.samples["ID"])),
                                        ("OOD verdicts", OOD_COLOR, np.asarray(self.samples["OOD"]))], width=560, height=240)
                        + "</div></div>")
            order, note = f"Lowest {self.key} first", f"every scored image, sorted by {self.key} (most OOD first)"
        cards = []
        for _, _, r in sorted(self.top, key=lambda e: e[:2], reverse=True):
            caption = [("class", r["class"])]
            shown = ("p_ood", "p_ood"), ("ATD", "atd_score"), ("CTW", "ctw_score"), *(((self.key, self.key),) if self.key not in ("p_ood", None) else ()), \
                ("p_value", "p_value"), ("q_value", "q_value")
            caption += [(label, fmt(r[k])) for label, k in shown if r.get(k) is not None]
            cards.append(Card(r["path"], r["verdict"], caption))
        body.append("<h2>Gallery</h2>" + gallery(order, note, cards, scored))
        if self.error_count:
            rows = "".join(f"<tr><td class=\"l\">{esc(p)}</td><td class=\"l\">{esc(e)}</td></tr>" for p, e in self.errors)
            body.append(f"<h2>Errors</h2><p class=\"note\">showing {len(self.errors)} of {self.error_count}</p>"
                        f"<table><tr><th class=\"l\">path</th><th class=\"l\">error</th></tr>{rows}</table>")
        return page(title, f"{total} inputs, {len(self.classes)} classes", body, provenance)
