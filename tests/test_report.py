"""HTML reports: escaping, bounded size, and the real thing opened in headless Chromium.

The browser is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`, fds 3/4):
no extra dependency, and the page's own Content-Security-Policy stays in force, so a blocked
script or external resource shows up as the console error it is.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from clipn_cli.cli.app import app
from clipn_cli.evaluation import METHODS, Evaluation, SetScores, compute_results
from clipn_cli.report import GALLERY_SIZE, DetectReport, eval_report, thumbnail_uri

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "clipn_cli" / "data" / "clipn-digits.safetensors"
DIGITS = ROOT / "examples" / "digits" / "images"
CLASSES = "zero,one,two,three,four"
SCRIPT_NAME = "<script>alert(1)</script>.png"  # a directory '<script>alert(1)<' holding 'script>.png'
IMG_NAME = "<img src=x onerror=alert(2)>.png"
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def invoke(*args: Any):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


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
    hostile = [str(p) for p in hostile_copies(tmp_path, DIGITS / "five-0015.png")]
    paths = hostile + [str(p) for p in sorted(DIGITS.glob("*.png"))] * 30  # 303 images, many flagged
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
    from clipn_cli.calibration import operating_points, p_values

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
    files = [str(p) for p in sorted(DIGITS.glob("*.png"))]
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


class DevTools:
    """A headless Chromium spoken to over the DevTools protocol on fds 3 (commands) and 4 (replies)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome = os.pipe()
        from_chrome = os.pipe()

        def child_fds() -> None:
            a, b = os.dup(to_chrome[0]), os.dup(from_chrome[1])  # os.dup2 makes the targets inheritable
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome[0])
        os.close(from_chrome[1])
        self.write_fd, self.read_fd = to_chrome[1], from_chrome[0]
        self.buffer = b""
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self.last_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 120.0) -> dict[str, Any]:
        """The next message `match` accepts; others are kept as events. A generous hang guard only."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buffer:
                ready, _, _ = select.select([self.read_fd], [], [], max(deadline - time.monotonic(), 0.0))
                if not ready:
                    raise TimeoutError("chromium did not answer")
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    raise EOFError("chromium closed the DevTools pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            message = json.loads(raw)
            if match(message):
                return message
            self.events.append(message)

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self.write_fd)
            os.close(self.read_fd)


PAGE_CHECK = """JSON.stringify({
  images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt})),
  scripts: document.scripts.length,
  resources: performance.getEntriesByType('resource').map(e => e.name),
  text: document.body.innerText,
  svgs: document.querySelectorAll('svg').length,
})"""


def open_in_chromium(page: Path, profile: Path) -> tuple[dict[str, Any], list[str]]:
    """Load `page` as a user would (its CSP in force); return what the page holds and every console error."""
    assert CHROMIUM is not None
    browser = DevTools(CHROMIUM, profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            browser.call(domain, session=session)
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
        found = browser.call("Runtime.evaluate", {"expression": PAGE_CHECK, "returnByValue": True}, session=session)
        state = json.loads(found["result"]["value"])
    finally:
        browser.close()
    errors = []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
        elif method == "Runtime.exceptionThrown":
            errors.append(str(params["exceptionDetails"]))
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append(str(params["args"]))
        elif method == "Page.javascriptDialogOpening":
            errors.append(f"dialog: {params.get('message')}")
    return state, errors


@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """ID digits (zero..four) and OOD digits (five..nine) from the demo's held-out images; hostile names among the OOD."""
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("digits_build", ROOT / "examples" / "digits" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # type: ignore[union-attr]
    held = tmp_path_factory.mktemp("held")
    build.export_held_out(held)
    root = tmp_path_factory.mktemp("sets")
    for role, names in (("id", ("zero", "one", "two", "three", "four")), ("ood", ("five", "six", "seven", "eight", "nine"))):
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


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found on PATH (Debian: apt-get install chromium); the report browser test needs it")
def test_reports_open_cleanly_in_headless_chromium(digit_sets: tuple[Path, Path], tmp_path: Path) -> None:
    id_dir, ood_dir = digit_sets
    detect_html, eval_html = tmp_path / "detect.html", tmp_path / "eval.html"
    detected = invoke("detect", "-w", WEIGHTS, "--classes", CLASSES, "-f", "json", "-o", tmp_path / "d.json", "--report", detect_html, id_dir, ood_dir)
    assert detected.exit_code == 0, detected.output
    evaluated = invoke("eval", "-w", WEIGHTS, "--classes", CLASSES, "--id", id_dir, "--ood", f"digits={ood_dir}", "-f", "json", "--report", eval_html)
    assert evaluated.exit_code == 0, evaluated.output

    state, errors = open_in_chromium(detect_html, tmp_path / "profile-detect")
    check_page(state, errors)
    assert len(state["images"]) == GALLERY_SIZE and f"showing {GALLERY_SIZE} of 63 (cut to the top {GALLERY_SIZE})" in state["text"]
    state, errors = open_in_chromium(eval_html, tmp_path / "profile-eval")
    check_page(state, errors)
    assert "Most certain OOD verdicts" in state["text"] and "ID images flagged OOD (false alarms)" in state["text"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found on PATH (Debian: apt-get install chromium); the report browser test needs it")
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
    images = sorted(str(p) for p in DIGITS.glob("*.png"))[:6]
    out, report = tmp_path / "out.jsonl", tmp_path / "report.html"
    common = ["detect", "-w", WEIGHTS, "--classes", CLASSES, "--format", "jsonl", "--output", out]
    assert invoke(*common, *images[:4]).exit_code == 0
    resumed = invoke(*common, "--resume", "--report", report, *images)
    assert resumed.exit_code == 0, resumed.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == images
    text = report.read_text()
    assert "<div>images<b>6</b></div>" in text
    ood = sum(r["verdict"] == "OOD" for r in records)
    assert f"<div>OOD<b>{ood} (" in text and all(html.escape(p) in text for p in images)
