"""HTML reports: escaping, bounded size, and the real thing opened in headless Chromium
(tests/headless_chromium.py: the page's Content-Security-Policy in force, every console error seen)."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import DIGITS_CLASSES, DIGITS_ID, DIGITS_IMAGES, DIGITS_OOD, DIGITS_WEIGHTS, IMAGES, TINY_CONFIG, cli
from clipn_cli.evaluation import compute_results
from clipn_cli.outputs.results import METHODS, Evaluation, SetScores
from clipn_cli.outputs.report import GALLERY_SIZE, DetectReport, eval_report, thumbnail_uri
from headless_chromium import DevTools, needs_chromium

SCRIPT_NAME = "<script>alert(1)</script>.png"  # a directory '<script>alert(1)<' holding 'script>.png'
IMG_NAME = "<img src=x onerror=alert(2)>.png"


def hostile_copies(folder: Path, source: Path) -> list[Path]:
    """Copies of an image under hostile names, one of them with a non-UTF-8 byte."""
    (folder / "<script>alert(1)<").mkdir(parents=True, exist_ok=True)
    targets = [folder / SCRIPT_NAME, folder / IMG_NAME, Path(os.fsdecode(bytes(folder) + b"/caf\xe9 & co.png"))]
    for target in targets:
        shutil.copy(source, target)
    return targets


# ---------------------------------------------------------------- rendering, no browser


def fake_evaluation(paths: list[str], n_id: int, rng: np.random.Generator) -> Evaluation:
    def scores(name: str, role: str, chosen: list[str], shift: float) -> SetScores:
        n = len(chosen)
        values = {m: rng.normal(shift, 1.0, n) for m in METHODS}
        values["atd"] = 1 / (1 + np.exp(-values["atd"]))
        return SetScores(name, role, chosen, [None] * n, np.zeros(n, np.int64), values,
                         {"ctw": values["atd"] < 0.5, "atd": values["atd"] < 0.5}, values["atd"] - 0.5, [])

    id_set = scores("ID", "id", paths[:n_id], 1.0)
    ood = scores("<b>ood</b>", "ood", paths[n_id:], -1.0)
    return Evaluation("clipn", compute_results(id_set, [ood]), [id_set, ood], ["<i>cat</i>", "dog"])


def test_eval_report_escapes_every_string_and_cuts_galleries(tmp_path: Path) -> None:
    hostile = [str(p) for p in hostile_copies(tmp_path, DIGITS_IMAGES / "five-0015.png")]
    paths = hostile + [str(p) for p in sorted(DIGITS_IMAGES.glob("*.png"))] * 30  # 303 images, many flagged
    evaluation = fake_evaluation(paths, 150, np.random.default_rng(0))
    id_set = evaluation.sets[0]
    id_set.scores["atd"][:3] = 1e-4  # the hostile names: the most certain false alarms
    id_set.flagged["atd"][:3] = True
    text = eval_report(evaluation)
    assert "<script" not in text and "<img src=x" not in text and "<b>ood" not in text and "<i>cat" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in text and "&lt;img src=x onerror=alert(2)&gt;.png" in text
    assert "caf\ufffd &amp; co.png" in text
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert len(sources) <= 3 * GALLERY_SIZE
    assert re.search(rf"showing {GALLERY_SIZE} of \d+ \(cut to the top {GALLERY_SIZE}\)", text)
    assert not re.search(r"(src|href)=\"(?!data:)", text) and "@import" not in text and "url(" not in text
    assert text.count("<svg") == 1 + len(METHODS) + 1  # one ROC per OOD set, one histogram per method and ATD's margin


def test_eval_report_galleries_follow_the_calibrated_verdict_with_alpha(tmp_path: Path) -> None:
    """With --alpha the galleries show the calibrated ATD verdicts of the table above them: false
    alarms are held-out ID images with p_value <= alpha, never the calibration images themselves."""
    from clipn_cli.scores.calibration import operating_points, p_values

    paths = [str(tmp_path / f"img-{i:03d}.png") for i in range(120)]  # distinct names; unreadable, so no thumbnails
    evaluation = fake_evaluation(paths, 80, np.random.default_rng(1))
    id_set, ood = evaluation.sets
    points = operating_points({m: id_set.scores[m] for m in METHODS}, {ood.name: {m: ood.scores[m] for m in METHODS}}, 0.1, seed=2)
    atd = next(p for p in points if p.method == "atd")
    text = eval_report(evaluation, points)
    held_out = np.setdiff1d(np.arange(80), atd.calibration_indices)
    alarms = held_out[p_values(atd.calibration_scores, id_set.scores["atd"][held_out]) <= 0.1]
    missed = np.flatnonzero(p_values(atd.calibration_scores, ood.scores["atd"]) > 0.1)
    assert 0 < len(alarms) < len(held_out) and len(missed) > 0
    assert len(alarms) != int(id_set.flagged["atd"].sum())  # the threshold-free verdict would show another set
    sections = dict(re.findall(r"<h3>([^<]*)</h3>(.*?)(?=<h3>|</body>|$)", text, re.S))
    false_section = sections["ID images flagged OOD (false alarms)"]
    assert f"showing {len(alarms)} of {len(alarms)}." in false_section
    assert sorted(re.findall(r"img-(\d{3})\.png</div>", false_section)) == [f"{i:03d}" for i in alarms]
    assert f"showing {len(missed)} of {len(missed)}." in sections["OOD images accepted as ID (misses)"]
    assert "Calibrated ATD verdicts at alpha 0.1" in text and "p_value: " in false_section
    plain = eval_report(evaluation)
    assert f"showing {int(id_set.flagged['atd'].sum())} of {int(id_set.flagged['atd'].sum())}." in plain


def test_detect_report_stays_bounded_for_100k_images(tmp_path: Path) -> None:
    files = [str(p) for p in sorted(DIGITS_IMAGES.glob("*.png"))]
    report = DetectReport(["zero", "one"])
    rng = np.random.default_rng(0)
    p_ood = rng.random(100_000)
    for i, p in enumerate(p_ood):
        verdict = "OOD" if p > 0.5 else "ID"
        report.add({"path": files[i % len(files)], "verdict": verdict, "rule": "atd", "class": "one" if i % 3 else "zero",
                    "p_ood": float(p), "atd_score": 1 - float(p), "ctw_score": 0.5})
    report.add({"path": "gone.png", "error": "no such file"})
    text = report.render()
    assert len(report.top) == GALLERY_SIZE and len(text) < 2_000_000
    assert f"showing {GALLERY_SIZE} of 100000" in text and "100001" in text
    shown = [float(v) for v in re.findall(r"p_ood: ([0-9.]+)</div>", text)]
    assert shown == sorted(shown, reverse=True) and shown[-1] >= np.sort(p_ood)[-GALLERY_SIZE] - 1e-4


def test_thumbnails_are_small_and_unreadable_files_cost_only_their_thumbnail(tmp_path: Path, images_dir: Path) -> None:
    uri = thumbnail_uri(str(images_dir / "astronaut.png"))
    assert uri is not None and uri.startswith("data:image/") and len(uri) < 40_000
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert thumbnail_uri(str(tmp_path / "bad.png")) is None and thumbnail_uri(str(tmp_path / "none.png")) is None


# ---------------------------------------------------------------- headless Chromium


PAGE_CHECK = """JSON.stringify({
  images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt})),
  scripts: document.scripts.length,
  resources: performance.getEntriesByType('resource').map(e => e.name),
  text: document.body.innerText,
  svgs: document.querySelectorAll('svg').length,
})"""


def open_in_chromium(page: Path, profile: Path) -> tuple[dict[str, Any], list[str]]:
    """Load `page` as a user would (its CSP in force); return what the page holds and every console error."""
    browser = DevTools(profile)
    try:
        state = browser.evaluate(PAGE_CHECK, browser.open(page.resolve().as_uri()))
    finally:
        browser.close()
    return state, browser.errors()


@pytest.fixture(scope="module")
def digit_sets(digits_held_out: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """ID digits (zero..four) and OOD digits (five..nine) from the demo's held-out images; hostile names among the OOD."""
    held = digits_held_out
    root = tmp_path_factory.mktemp("sets")
    for role, names in (("id", DIGITS_ID), ("ood", DIGITS_OOD)):
        for name in names:
            for png in sorted((held / name).glob("*.png"))[:6]:
                (root / role / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(png, root / role / name / png.name)
    hostile_copies(root / "ood" / "hostile", held / "five" / "0015.png")
    return root / "id", root / "ood"


def check_page(state: dict[str, Any], errors: list[str]) -> None:
    assert errors == []
    assert state["images"] and all(i["complete"] and i["width"] > 0 for i in state["images"]), state["images"]
    assert state["scripts"] == 0 and state["resources"] == [] and state["svgs"] >= 1
    assert SCRIPT_NAME in state["text"] and IMG_NAME in state["text"] and "caf\ufffd & co.png" in state["text"]


@needs_chromium
def test_reports_open_cleanly_in_headless_chromium(digit_sets: tuple[Path, Path], tmp_path: Path) -> None:
    id_dir, ood_dir = digit_sets
    detect_html, eval_html = tmp_path / "detect.html", tmp_path / "eval.html"
    detected = cli("detect", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "-f", "json", "-o", tmp_path / "d.json", "--report", detect_html, id_dir, ood_dir)
    assert detected.returncode == 0, detected.stderr
    evaluated = cli("eval", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--id", id_dir, "--ood", f"digits={ood_dir}", "-f", "json", "--report", eval_html)
    assert evaluated.returncode == 0, evaluated.stderr

    state, errors = open_in_chromium(detect_html, tmp_path / "profile-detect")
    check_page(state, errors)
    assert len(state["images"]) == GALLERY_SIZE and f"showing {GALLERY_SIZE} of 63 (cut to the top {GALLERY_SIZE})" in state["text"]
    state, errors = open_in_chromium(eval_html, tmp_path / "profile-eval")
    check_page(state, errors)
    assert "Most certain OOD verdicts" in state["text"] and "ID images flagged OOD (false alarms)" in state["text"]


@needs_chromium
def test_the_browser_check_itself_sees_scripts_and_broken_images(tmp_path: Path) -> None:
    """The checks can fail: a page with an external image, a broken image and a script is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:\">"
                    "</head><body><img src=\"http://127.0.0.1:9/x.png\"><img src=\"data:image/png;base64,AAAA\">"
                    "<script>alert(1)</script></body></html>")
    state, errors = open_in_chromium(page, tmp_path / "profile")
    assert [i["width"] for i in state["images"]] == [0, 0] and state["scripts"] == 1
    assert any("Content Security Policy" in e and "img-src" in e for e in errors)
    assert any("inline script" in e for e in errors)


def test_resumed_detect_report_covers_the_whole_file(tmp_path: Path) -> None:
    """--resume --report: the records already in the file count in the report, as the new ones do."""
    images = sorted(str(p) for p in DIGITS_IMAGES.glob("*.png"))[:6]
    out, report = tmp_path / "out.jsonl", tmp_path / "report.html"
    common = ["detect", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--format", "jsonl", "--output", out]
    assert cli(*common, *images[:4]).returncode == 0
    resumed = cli(*common, "--resume", "--report", report, *images)
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == images
    text = report.read_text()
    assert "<div>images<b>6</b></div>" in text
    ood = sum(r["verdict"] == "OOD" for r in records)
    assert f"<div>OOD<b>{ood} (" in text and all(html.escape(p) in text for p in images)


# ---------------------------------------------------------------- provenance, ROC orientation, histograms, plain CLIP


def test_reports_say_what_made_them(tmp_path: Path) -> None:
    """Weights (name, fingerprint), classes, version, UTC date and options, from the CLI, escaped like the rest."""
    import clipn_cli
    from clipn_cli.weights.checkpoints import read_info

    fingerprint = read_info(DIGITS_WEIGHTS).fingerprint
    id_dir, ood_dir = tmp_path / "id", tmp_path / "ood"
    for folder, prefixes in ((id_dir, DIGITS_ID), (ood_dir, DIGITS_OOD)):
        folder.mkdir()
        for png in DIGITS_IMAGES.glob("*.png"):
            if png.name.startswith(prefixes):
                shutil.copy(png, folder / png.name)
    detect_html, eval_html = tmp_path / "detect.html", tmp_path / "eval.html"
    assert cli("detect", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--precision", "fp32", "-f", "jsonl", "-o", tmp_path / "d.jsonl",
               "--report", detect_html, id_dir).returncode == 0
    assert cli("eval", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--id", id_dir, "--ood", f"digits={ood_dir}", "-f", "json",
               "-o", tmp_path / "e.json", "--report", eval_html).returncode == 0
    for page, options in ((detect_html, ("<th>rule</th><td>atd</td>", "<th>precision</th><td>fp32</td>")),
                          (eval_html, ("<th>FPR95 convention</th><td>clipn</td>", "<th>precision</th><td>fp32</td>"))):
        block = re.search(r'<table class="prov">(.*?)</table>', page.read_text()).group(1)
        assert f"<th>weights fingerprint</th><td>{fingerprint}</td>" in block and str(DIGITS_WEIGHTS) in block
        assert f"<th>classes</th><td>{DIGITS_CLASSES.replace(',', ', ')}</td>" in block
        assert f"<th>clipn version</th><td>{clipn_cli.__version__}</td>" in block and "<th>templates</th><td>clipn</td>" in block
        assert re.search(r"<th>date \(UTC\)</th><td>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00</td>", block)
        assert all(option in block for option in options)
    hostile = DetectReport(["<b>x</b>"]).render(provenance={"classes": ["<script>alert(1)</script>"] * 60, "weights": "<img src=x>", "fdr": None})
    assert "<script>alert" not in hostile and "<img src=x>" not in hostile and "fdr" not in hostile
    assert "&lt;script&gt;alert(1)&lt;/script&gt;, " in hostile and "… (60 in all)" in hostile


def test_eval_roc_is_oriented_as_the_plots_roc() -> None:
    """ID positive, as plots.roc_figure: x = OOD accepted as ID (FPR), y = ID accepted (TPR).

    ID [1, 2, 3, 4], OOD [0, 3.5]: with no OOD accepted, 1 of 4 ID images is (score 4); from half the
    OOD accepted (3.5) all ID images are. The old orientation (x = ID flagged, y = OOD caught) gives
    0.5 below x = 0.75 instead.
    """
    from clipn_cli.outputs.report_svg import Curve, roc_curve_log, roc_svg

    id_scores, ood_scores = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 3.5])
    xs, ys = roc_curve_log(id_scores, ood_scores, 0.01)
    assert xs[0] == pytest.approx(0.01) and xs[-1] == pytest.approx(1.0)
    assert np.all(ys[xs < 0.5 - 1e-12] == 0.25) and np.all(ys[xs >= 0.5] == 1.0)
    svg = roc_svg("t", [Curve("ATD", "#000", xs, ys)], [], 0.01)
    points = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]*)"', svg).group(1).split()]
    # plot area: x from 56 to 56 + 314 (log10 0.01 .. 0), y from 26 + 330 (0) to 26 (1)
    assert points[0] == (56.0, pytest.approx(26 + 330 * 0.75, abs=0.06)) and points[-1] == (370.0, 26.0)
    assert "OOD images accepted as ID (FPR, log scale)" in svg and "ID images accepted as ID (TPR)" in svg

    mpl = pytest.importorskip("matplotlib")
    assert mpl
    from clipn_cli.outputs.plots import roc_figure

    evaluation = fake_evaluation([f"{i}.png" for i in range(300)], 200, np.random.default_rng(3))
    id_set, ood = evaluation.sets
    results = {r.method: r for r in evaluation.results if r.ood == ood.name}
    axes = roc_figure(id_set, ood, results, list(METHODS)).axes[0]
    x_min = 0.01
    for line, method in zip(axes.lines, METHODS):  # the plots draw the methods' curves first, in this order
        xs, ys = roc_curve_log(id_set.scores[method], ood.scores[method], x_min)
        fpr, tpr = line.get_xdata(), line.get_ydata()
        assert np.allclose(ys, [tpr[fpr <= x].max() for x in xs]), method
    text = eval_report(evaluation)
    r = results["atd"]
    x_min = 10.0 ** math.floor(math.log10(1 / len(ood.paths)))
    sx = 56 + 314 * (math.log10(max(1 - r.ood_caught, x_min)) - math.log10(x_min)) / -math.log10(x_min)
    circles = [(float(x), float(y)) for x, y in re.findall(r'<circle cx="([0-9.]+)" cy="([0-9.]+)" r="5"', text)]
    assert circles and all(abs(x - sx) <= 0.06 and abs(y - (26 + 330 * r.id_flagged)) <= 0.06 for x, y in circles)  # plots: (1 - caught, 1 - flagged)


def test_eval_histograms_have_a_y_scale_and_the_plots_markers() -> None:
    from clipn_cli.outputs.report_svg import Line, histogram_svg

    svg = histogram_svg("t", [("ID", "#00f", np.array([0.0, 0.01, 0.9, 1.0]))], [Line("rule", 0.5, True), Line("thr", 0.25)])
    assert "share per bin" in svg and '>0%</text>' in svg and '>25%</text>' in svg and '>50%</text>' in svg  # peak: 2 of 4 in a bin
    # plot area x 52..350 over [0, 1]: the boundary solid black at 0.5, the threshold grey dashed at 0.25
    assert '<line x1="201.0" y1="24" x2="201.0" y2="166" stroke="#000" stroke-width="2"/>' in svg
    assert '<line x1="126.5" y1="24" x2="126.5" y2="166" stroke="#718096" stroke-width="1.2" stroke-dasharray="4 3"/>' in svg

    evaluation = fake_evaluation([f"{i}.png" for i in range(300)], 200, np.random.default_rng(4))
    text = eval_report(evaluation)
    histograms = re.findall(r"<svg[^>]*>(?:(?!</svg>).)*share per bin.*?</svg>", text)
    assert len(histograms) == len(METHODS) + 1  # every method and ATD's margin
    thresholds = {r.method: r.threshold_95 for r in evaluation.results if r.ood == evaluation.sets[1].name}
    for method, svg in zip(["ctw", "atd", "atd_margin", *list(METHODS)[2:]], histograms):
        assert ("thr@95%ID" in svg) == (method != "atd_margin"), method
        assert ("CTW rule 0.5" in svg) == (method == "ctw") and ("ATD rule 0<" in svg) == (method == "atd_margin"), method
    ctw = histograms[0]
    lo = min(evaluation.sets[0].scores["ctw"].min(), evaluation.sets[1].scores["ctw"].min())
    hi = max(evaluation.sets[0].scores["ctw"].max(), evaluation.sets[1].scores["ctw"].max())
    assert f'<line x1="{52 + 298 * (thresholds["ctw"] - lo) / (hi - lo):.1f}" y1="24"' in ctw  # thr@95%ID where the plots put it


def test_detect_report_without_p_ood_ranks_by_the_rule_score(tmp_path: Path) -> None:
    """A plain CLIP has no p_ood nor ATD score: the report ranks by the rule's score, lowest first, and says so."""
    report = DetectReport(["cat", "dog"])
    msp = np.random.default_rng(5).random(200)
    for i, value in enumerate(msp):
        report.add({"path": f"img-{i:03d}.png", "verdict": "OOD" if value < 0.3 else "ID", "rule": "msp", "class": "cat",
                    "ctw_score": None, "atd_score": None, "p_ood": None, "msp": float(value), "max_logit": 1.0, "energy": 1.0})
    text = report.render(provenance={"threshold": 0.3})
    assert "Lowest msp first" in text and "These records have no p_ood" in text and "OOD when the MSP score is below the threshold" in text
    shown = [int(i) for i in re.findall(r"img-(\d{3})\.png</div>", text)]
    assert shown == list(np.argsort(msp, kind="stable")[:GALLERY_SIZE])
    assert "ATD:" not in text and "p_ood:" not in text and "share per bin" in text
    assert f"showing {GALLERY_SIZE} of 200" in text


def test_plain_clip_detect_report_from_the_cli(plain_checkpoint: Path, tmp_path: Path) -> None:
    """`detect --report` with a plain CLIP (records with p_ood null) writes the report, exit 0."""
    page = tmp_path / "r.html"
    images = [IMAGES / n for n in ("chelsea.png", "coffee.png", "astronaut.png")]
    result = cli("detect", "-w", f"{TINY_CONFIG}:{plain_checkpoint}", "--classes", "cat,coffee", "-t", "simple",
                 "--rule", "msp", "--threshold", "0.6", "-f", "jsonl", "-o", tmp_path / "out.jsonl", "--report", page, *images)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(r["p_ood"] is None for r in records)
    text = page.read_text()
    order = [r["path"] for r in sorted(records, key=lambda r: r["msp"])]
    assert [m for m in re.findall(r'<div class="path">(?:<span[^>]*>[^<]*</span> )?([^<]*)</div>', text)] == [html.escape(p) for p in order]
    assert "<th>rule</th><td>msp</td>" in text and "<th>threshold</th><td>0.6</td>" in text
