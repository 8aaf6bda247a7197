"""From detect's records to their final verdicts, and the report data gathered on the way: the one
step every engine shares (local detect, the Ray workers and driver, the HTTP server).

A record leaves `detection.detect` with the rule's own verdict: threshold-free, or `score <
threshold`. With calibrated verdicts (`scores.calibration.CalibratedVerdicts`) the step adds the
record's conformal `p_value` and calls OOD when p <= α; with a false-discovery rate it holds the
run's records until the last is in, then Benjamini–Hochberg sets `q_value` and the verdict.

    step = VerdictStep("atd", calibrated=verdicts, report_classes=heads.classes)
    results = detection.detect(model, heads, items, rule=step.rule, threshold=step.engine_threshold)
    for record in step.run(r.as_dict() for r in results):
        writer.write(record)
    html = step.render_report(provenance)

Torch-free: it handles record dicts only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .errors import VerdictError
from .scores.methods import VERDICT_RULES

if TYPE_CHECKING:
    from .outputs.report import DetectReport
    from .scores.calibration import CalibratedVerdicts


def check_verdict_options(rule: str, threshold: float | None, calibrated: bool) -> None:
    """Refuse a verdict that cannot be given, before anything is loaded: two cuts, or none for a rule that needs one."""
    if calibrated and threshold is not None:
        raise VerdictError("give --threshold (a fixed score cut) or --calibration (a false-alarm rate), not both")
    if threshold is None and not calibrated and rule not in VERDICT_RULES:
        raise VerdictError(f"--rule {rule} has no threshold-free verdict: give --threshold T (e.g. its thr@95%ID from 'clipn eval') "
                           "or --calibration FILE")


def set_q_value(record: dict[str, Any], q: float, fdr: float) -> dict[str, Any]:
    """A scored record's Benjamini–Hochberg q-value and its verdict at `fdr` (OOD when q <= fdr)."""
    record["q_value"] = q
    record["verdict"] = "OOD" if q <= fdr else "ID"
    return record


class VerdictStep:
    """The verdict of each record of one run, configured once: `rule`, an optional `threshold`
    (OOD when the rule's score is below it) or `calibrated` verdicts (p <= α, or BH at their `fdr`),
    and, with `report_classes`, the report data of every record that passes.

    `apply` gives one record its verdict now; `finish` runs the FDR pass over a whole run; `run`
    does both over a stream, yielding records ready to write. `done`, `failed` and `last` count
    the inputs `run` has taken in (for progress and the interruption message).
    """

    def __init__(
        self, rule: str, *, threshold: float | None = None, calibrated: CalibratedVerdicts | None = None,
        report_classes: Sequence[str] | None = None,
    ) -> None:
        check_verdict_options(rule, threshold, calibrated is not None)
        self.rule = rule
        self.threshold = threshold
        self.calibrated = calibrated
        self.report: DetectReport | None = None
        if report_classes is not None:
            from .outputs.report import DetectReport

            self.report = DetectReport(list(report_classes), calibrated=calibrated is not None)
        self.done = self.failed = 0
        self.last: str | None = None

    @property
    def fdr(self) -> float | None:
        return self.calibrated.fdr if self.calibrated is not None else None

    @property
    def holds_run(self) -> bool:
        """True when no record can be written before the last is in (FDR)."""
        return self.fdr is not None

    @property
    def engine_threshold(self) -> float | None:
        """The `threshold` for `detection.detect`: calibrated verdicts replace the engine's, and a cut
        no score is below keeps a rule without a threshold-free verdict from needing one."""
        return self.threshold if self.calibrated is None else float("-inf")

    @property
    def record_columns(self) -> tuple[str, ...]:
        """Fields `apply` adds beyond detect's own (the columns of a Ray shard before the FDR pass)."""
        return ("p_value",) if self.calibrated is not None else ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Fields a finished record has beyond detect's own (extra CSV, table and Parquet columns)."""
        return self.record_columns + (("q_value",) if self.holds_run else ())

    def apply(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record's verdict as far as it alone decides it (in place; error records pass through)."""
        if self.calibrated is not None:
            self.calibrated.apply(record)
        return record

    def finish(self, records: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
        """With FDR, the q-value and verdict of every record of the whole run (in place); otherwise nothing to do."""
        fdr = self.fdr
        if fdr is not None:
            from .scores.calibration import benjamini_hochberg

            scored = [r for r in records if "error" not in r]
            for record, q in zip(scored, benjamini_hochberg([r["p_value"] for r in scored]).tolist()):
                set_q_value(record, q, fdr)
        return records

    def gather(self, record: dict[str, Any]) -> None:
        """Add a finished record to the report data (also records written earlier: a resumed file, a Ray run's shards)."""
        if self.report is not None:
            self.report.add(record)

    def run(self, records: Iterable[dict[str, Any]], on_input: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
        """Each record with its final verdict, in input order, once it may be written: at once, or
        with FDR all after the last. A record is gathered for the report after the consumer took it;
        `on_input` is called once per input taken in (after its record was taken, when it is at once)."""
        held: list[dict[str, Any]] = []
        for record in records:
            self.apply(record)
            if self.holds_run:
                held.append(record)
            else:
                yield record
                self.gather(record)
            self.done += 1
            self.failed += "error" in record
            self.last = record["path"]
            if on_input is not None:
                on_input()
        for record in self.finish(held):
            yield record
            self.gather(record)

    def render_report(self, provenance: dict[str, Any] | None = None) -> str:
        """The HTML report of the records gathered (needs `report_classes`)."""
        if self.report is None:
            raise ValueError("this verdict step gathers no report: give it report_classes")
        return self.report.render(self.calibrated, provenance=provenance)
