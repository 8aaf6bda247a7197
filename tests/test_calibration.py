"""Conformal calibration: p-values, the minimum calibration size, Benjamini–Hochberg, calibration
files, and the CLI round trip `calibrate` -> `detect --calibration` / `eval --alpha` on the digits demo."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DIGITS_CLASSES, DIGITS_ID, DIGITS_OOD, DIGITS_WEIGHTS, cli

from clipn_cli.scores.calibration import (
    CalibratedVerdicts,
    Calibration,
    benjamini_hochberg,
    check_size,
    min_calibration_size,
    operating_points,
    p_values,
)
from clipn_cli.scores import methods as method_table
from clipn_cli.errors import CalibrationError


# ---------------------------------------------------------------- p-values and sizes


def test_p_value_formula_counts_ties_against_ood() -> None:
    calib = np.array([3.0, 1.0, 2.0, 2.0])  # unsorted on purpose: Calibration sorts
    c = Calibration({"atd": calib}, "fp", ["a"], "clipn", "sha")
    # #{c <= s}: s=0 -> 0, s=1 -> 1, s=2 -> 3 (both tied 2s count), s=2.5 -> 3, s=3 -> 4, s=9 -> 4
    expected = np.array([1, 2, 4, 4, 5, 5]) / 5
    assert np.array_equal(c.p_values("atd", [0.0, 1.0, 2.0, 2.5, 3.0, 9.0]), expected)
    assert np.array_equal(p_values(np.sort(calib), [0.0, 1.0, 2.0, 2.5, 3.0, 9.0]), expected)
    assert float(c.p_values("atd", 2.0)) == 0.8  # a scalar works too


def test_threshold_agrees_with_p_values() -> None:
    rng = np.random.default_rng(1)
    c = Calibration({"atd": rng.random(57)}, "fp", ["a"], "clipn", "sha")
    s = rng.random(5000)
    for alpha in (0.05, 0.1, 0.3):
        assert np.array_equal(c.p_values("atd", s) <= alpha, s < c.threshold("atd", alpha))


@pytest.mark.parametrize("alpha, need", [(0.5, 1), (0.1, 9), (0.05, 19), (0.03, 33), (0.01, 99)])
def test_minimum_calibration_size(alpha: float, need: int) -> None:
    assert min_calibration_size(alpha) == need
    check_size(need, alpha)  # enough: the smallest p, 1/(need+1), is <= alpha
    assert 1 / (need + 1) <= alpha < 1 / need
    with pytest.raises(CalibrationError, match=f"{need - 1} calibration images are too few for alpha {alpha:g}: at least {need} are needed"):
        check_size(need - 1, alpha)


def test_false_alarm_rate_is_at_most_alpha_on_exchangeable_scores() -> None:
    """Monte Carlo of the guarantee: n = 19, α = 0.05 gives exactly 1/20 for continuous scores."""
    rng = np.random.default_rng(0)
    trials = 20000
    calib = np.sort(rng.normal(size=(trials, 19)), axis=1)
    test = rng.normal(size=trials)
    flagged = np.array([p_values(calib[i], test[i]) <= 0.05 for i in range(trials)])
    assert abs(flagged.mean() - 0.05) < 0.005


def test_operating_points_are_seeded_and_refuse_too_small_halves() -> None:
    rng = np.random.default_rng(2)
    id_scores = {"atd": rng.normal(1, 1, 200), "energy": rng.normal(1, 1, 200)}
    ood = {"far": {"atd": rng.normal(-3, 1, 50), "energy": rng.normal(-3, 1, 50)}}
    a = operating_points(id_scores, ood, 0.1, seed=7)
    assert a == operating_points(id_scores, ood, 0.1, seed=7)
    assert a != operating_points(id_scores, ood, 0.1, seed=8)
    assert a[0].calibration_size == a[0].id_test_size == 100 and a[0].ood_caught["far"] > 0.9
    with pytest.raises(CalibrationError, match="100 calibration images are too few for alpha 0.005: at least 199 are needed"):
        operating_points(id_scores, ood, 0.005)


# ---------------------------------------------------------------- Benjamini–Hochberg


def test_benjamini_hochberg_against_a_hand_computation() -> None:
    p = [0.01, 0.04, 0.03, 0.20, 0.005]
    # sorted: 0.005, 0.01, 0.03, 0.04, 0.20; m p_(j) / j = 0.025, 0.025, 0.05, 0.05, 0.2; running min from the top
    q = benjamini_hochberg(p)
    assert np.allclose(q, [0.025, 0.05, 0.05, 0.2, 0.025])
    # BH step-up at Q = 0.04: p_(k) <= k Q / m holds for k = 1, 2 only -> the 0.005 and 0.01
    assert (q <= 0.04).tolist() == [True, False, False, False, True]
    # at Q = 0.05: up to k = 4 (0.04 <= 4 * 0.05 / 5) -> all but 0.20
    assert (q <= 0.05).tolist() == [True, True, True, False, True]


def test_benjamini_hochberg_steps_up() -> None:
    """The first p fails its own bound (0.03 > 0.025) but the step-up rejects it with the second."""
    q = benjamini_hochberg([0.03, 0.031])
    assert np.allclose(q, [0.031, 0.031]) and (q <= 0.05).all()
    assert benjamini_hochberg([]).size == 0 and benjamini_hochberg([0.9, 0.95]).max() <= 1.0


def test_calibrated_verdicts_apply_and_fdr() -> None:
    c = Calibration({"atd": np.arange(1, 20) / 20, "energy": np.arange(19.0)}, "fp", ["a"], "clipn", "sha", alpha=0.05)
    v = CalibratedVerdicts(c, "atd", 0.05)
    low, high = v.apply({"path": "x", "atd_score": 0.0, "verdict": "ID"}), v.apply({"path": "y", "atd_score": 0.5, "verdict": "OOD"})
    assert (low["p_value"], low["verdict"], high["verdict"]) == (0.05, "OOD", "ID")
    assert v.apply({"path": "z", "error": "bad"}) == {"path": "z", "error": "bad"}
    records = [v.apply({"path": str(i), "atd_score": s}) for i, s in enumerate([0.0, 0.0, 0.9])]
    CalibratedVerdicts(c, "atd", 0.05, fdr=0.2).apply_fdr(records)
    assert [r["verdict"] for r in records] == ["OOD", "OOD", "ID"] and records[0]["q_value"] == pytest.approx(0.075)
    with pytest.raises(CalibrationError, match="at least 99"):
        CalibratedVerdicts(c, "atd", 0.01)
    with pytest.raises(CalibrationError, match="no 'msp' scores"):
        CalibratedVerdicts(c, "msp", 0.05)


# ---------------------------------------------------------------- files


def test_file_round_trip_and_foreign_files_refused(tmp_path: Path) -> None:
    scores = {"atd": np.random.default_rng(3).random(30), "ctw": np.linspace(0, 1, 30)}
    c = Calibration(scores, "abc123", ["cat", "dog"], "clipn", "t-sha", alpha=0.1)
    c.save(tmp_path / "c.json")
    text = (tmp_path / "c.json").read_text()
    assert "path" not in json.loads(text)  # no image paths stored
    back = Calibration.load(tmp_path / "c.json")
    assert np.array_equal(back.scores["atd"], np.sort(scores["atd"])) and back.count == 30 and back.alpha == 0.1
    back.check_matches("abc123", ["cat", "dog"], "t-sha")
    for args, message in [
        (("other", ["cat", "dog"], "t-sha"), "made with other weights"),
        (("abc123", ["dog", "cat"], "t-sha"), "made for other classes"),
        (("abc123", ["cat", "dog"], "x-sha"), "made with other prompt templates"),
    ]:
        with pytest.raises(CalibrationError, match=message):
            back.check_matches(*args)
    data = json.loads(text)
    for change, message in [
        ({"format": "x"}, "not a clipn calibration file"),
        ({"format_version": "9"}, "format version '9'"),
        ({"count": 31}, "score counts disagree"),
        ({"scores": {"atd": [1, "x"]}}, "not a list of numbers"),
        ({"classes": []}, "classes are not a list"),
    ]:
        (tmp_path / "bad.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(CalibrationError, match=message):
            Calibration.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("[" * 100000)
    with pytest.raises(CalibrationError, match="not JSON"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(CalibrationError, match="no such calibration file"):
        Calibration.load(tmp_path / "none.json")


# ---------------------------------------------------------------- CLI on the digits demo


def split_id(held: Path) -> tuple[list[str], list[str]]:
    files = sorted(str(p) for name in DIGITS_ID for p in (held / name).glob("*.png"))
    return files[::2], files[1::2]


def test_calibrate_then_detect_round_trip(digits_held_out: Path, tmp_path: Path) -> None:
    calib_files, test_files = split_id(digits_held_out)
    calib = tmp_path / "calib.json"
    made = cli("calibrate", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--alpha", "0.1", "--output", calib, *calib_files)
    assert made.exit_code == 0, made.output
    stored = json.loads(calib.read_text())
    assert stored["count"] == len(calib_files) == 91 and stored["classes"] == list(DIGITS_ID) and stored["alpha"] == 0.1
    assert list(stored["scores"]) == list(method_table.CLASSIC)
    assert str(digits_held_out) not in calib.read_text()

    ood = sorted(str(p) for p in (digits_held_out / "five").glob("*.png"))
    out = cli("detect", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--calibration", calib, "-f", "jsonl", *test_files, *ood)
    assert out.exit_code == 0, out.output
    records = [json.loads(line) for line in out.stdout.splitlines()]
    atd = np.sort(np.array(stored["scores"]["atd"]))
    for r in records:
        assert r["p_value"] == pytest.approx((1 + np.sum(atd <= r["atd_score"])) / (len(atd) + 1))
        assert r["verdict"] == ("OOD" if r["p_value"] <= 0.1 else "ID") and r["rule"] == "atd"
    id_flagged = np.mean([r["verdict"] == "OOD" for r in records[: len(test_files)]])
    ood_caught = np.mean([r["verdict"] == "OOD" for r in records[len(test_files):]])
    assert id_flagged <= 0.2 and ood_caught >= 0.9

    # another alpha from the same file, another score, CSV keeps p_value
    other = cli("detect", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--calibration", calib, "--alpha", "0.05", "--rule", "energy", "-f", "csv", *test_files[:5], *ood[:5])
    rows = list(csv.DictReader(io.StringIO(other.stdout)))
    assert other.exit_code == 0 and len(rows) == 10 and all(r["rule"] == "energy" and float(r["p_value"]) > 0 for r in rows)
    assert all(r["verdict"] == ("OOD" if float(r["p_value"]) <= 0.05 else "ID") for r in rows)

    # --fdr: BH over the run's p-values
    fdr = cli("detect", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--calibration", calib, "--fdr", "0.1", "-f", "json", *test_files, *ood)
    found = json.loads(fdr.stdout)
    q = benjamini_hochberg([r["p_value"] for r in found])
    assert [r["q_value"] for r in found] == pytest.approx(q.tolist())
    assert [r["verdict"] for r in found] == ["OOD" if v <= 0.1 else "ID" for v in q]


def test_detect_refuses_foreign_or_too_small_calibration(digits_held_out: Path, tmp_path: Path) -> None:
    calib_files, test_files = split_id(digits_held_out)
    calib = tmp_path / "calib.json"
    assert cli("calibrate", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "-o", calib, *calib_files[:30]).returncode == 0
    base = ("detect", "-w", DIGITS_WEIGHTS, "--calibration", calib, test_files[0])
    for extra, message in [
        (("--classes", "zero,one,two,three,nine"), "made for other classes"),
        (("--classes", DIGITS_CLASSES, "--templates", "simple"), "made with other prompt templates"),
        (("--classes", DIGITS_CLASSES, "--alpha", "0.01"), "30 calibration images are too few for alpha 0.01: at least 99 are needed"),
        (("--classes", DIGITS_CLASSES, "--rule", "mcm"), "--rule must be"),
        (("--classes", DIGITS_CLASSES, "--fdr", "0.1", "-f", "jsonl"), "--fdr needs every p-value of the run"),
    ]:
        result = cli(*base, *extra)
        assert result.exit_code == 2 and message in result.stderr, (extra, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
    other_weights = tmp_path / "other.safetensors"
    other_weights.write_bytes(DIGITS_WEIGHTS.read_bytes())
    data = json.loads(calib.read_text())
    data["weights_fingerprint"] = "0" * 64
    (tmp_path / "foreign.json").write_text(json.dumps(data))
    result = cli("detect", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--calibration", tmp_path / "foreign.json", test_files[0])
    assert result.exit_code == 2 and "made with other weights" in result.stderr
    result = cli("detect", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--alpha", "0.1", test_files[0])
    assert result.exit_code == 2 and "--alpha needs --calibration" in result.stderr
    result = cli("calibrate", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, "--alpha", "0.01", "-o", tmp_path / "x.json", *calib_files[:30])
    assert result.exit_code == 2 and "at least 99 are needed" in result.stderr and not (tmp_path / "x.json").exists()


def test_eval_alpha_reports_the_calibrated_operating_point(digits_held_out: Path) -> None:
    ids = [a for name in DIGITS_ID for a in ("--id", str(digits_held_out / name))]
    oods = [a for name in DIGITS_OOD for a in ("--ood", f"digits={digits_held_out / name}")]
    result = cli("eval", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, *ids, *oods, "--alpha", "0.1", "--seed", "3", "-f", "json")
    assert result.exit_code == 0, result.output
    calibrated = json.loads(result.stdout)["calibrated"]
    assert calibrated["alpha"] == 0.1 and calibrated["seed"] == 3
    atd = next(r for r in calibrated["results"] if r["method"] == "atd")
    assert atd["calibration_images"] == 91 and atd["id_test_images"] == 91
    assert atd["id_flagged"] <= 0.2 and atd["ood_caught"]["digits"] > 0.9
    refused = cli("eval", "-w", DIGITS_WEIGHTS, "--classes", DIGITS_CLASSES, *ids, *oods, "--alpha", "0.01")
    assert refused.exit_code == 2 and "at least 99 are needed" in refused.stderr
