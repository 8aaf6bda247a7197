"""The verdict step every engine shares (`clipn_cli.verdicts`), through library calls on record dicts."""

from __future__ import annotations

import numpy as np
import pytest

from clipn_cli.errors import VerdictError
from clipn_cli.scores.calibration import CalibratedVerdicts, Calibration
from clipn_cli.verdicts import VerdictStep


def calibrated(fdr: float | None = None) -> CalibratedVerdicts:
    calibration = Calibration({"atd": np.arange(1, 20) / 20}, "f" * 64, ["cat"], "clipn", "0" * 64)  # 19 ID scores
    return CalibratedVerdicts(calibration, "atd", 0.05, fdr)


def records() -> list[dict]:
    scored = {"verdict": "ID", "rule": "atd", "class": "cat", "class_index": 0, "ctw_score": 0.5, "p_ood": 0.0}
    return [{"path": "low.png", **scored, "atd_score": 0.01}, {"path": "bad.png", "error": "no such file"},
            {"path": "high.png", **scored, "atd_score": 0.99}]


def test_calibrated_verdicts_stream_and_gather_the_report() -> None:
    step = VerdictStep("atd", calibrated=calibrated(), report_classes=["cat"])
    taken: list[int] = []
    out = []
    for record in step.run(records(), lambda: taken.append(step.done)):
        assert taken == [1, 2, 3][:len(out)]  # each record is yielded before the next input is taken in
        out.append(record)
    assert [r.get("p_value") for r in out] == [pytest.approx(1 / 20), None, pytest.approx(1.0)]
    assert [r.get("verdict") for r in out] == ["OOD", None, "ID"]
    assert (step.done, step.failed, step.last, step.columns, step.engine_threshold) == (3, 1, "high.png", ("p_value",), float("-inf"))
    assert step.report is not None and step.report.error_count == 1 and sum(step.report.verdicts.values()) == 2


def test_fdr_holds_the_run_and_sets_q_values() -> None:
    step = VerdictStep("atd", calibrated=calibrated(fdr=0.1))
    stream = step.run(records())
    first = next(stream)  # only after the last input is in
    assert step.done == 3 and first["path"] == "low.png"
    out = [first, *stream]
    # BH over p = (1/20, 1): q = (2/20, 1)
    assert [r.get("q_value") for r in out] == [pytest.approx(0.1), None, pytest.approx(1.0)]
    assert [r.get("verdict") for r in out] == ["OOD", None, "ID"]
    assert step.columns == ("p_value", "q_value") and step.record_columns == ("p_value",)


def test_plain_rules_pass_records_through() -> None:
    step = VerdictStep("msp", threshold=0.3)
    assert step.engine_threshold == 0.3 and step.columns == ()
    assert list(step.run(records())) == records()


@pytest.mark.parametrize("kwargs, message", [
    ({"rule": "msp"}, "--rule msp has no threshold-free verdict"),
    ({"rule": "atd", "threshold": 0.5, "calibrated": calibrated()}, "not both"),
])
def test_a_verdict_that_cannot_be_given_is_refused(kwargs: dict, message: str) -> None:
    rule = kwargs.pop("rule")
    with pytest.raises(VerdictError, match=message):
        VerdictStep(rule, **kwargs)
