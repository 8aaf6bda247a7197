"""The table of score methods is what scoring, records, CSV columns, evaluation, plots and --rule read."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipn_cli.scores import methods
from clipn_cli.detection import SCORE_FIELDS, check_rule, detections_from_scores
from clipn_cli.evaluation import compute_results
from clipn_cli.outputs.results import METHODS, SetScores
from clipn_cli.outputs.writers import CSV_COLUMNS
from clipn_cli.scores.scoring import Heads, score, score_heads
from conftest import cli


def test_table_entries_are_complete_and_unique() -> None:
    names = [m.name for m in methods.TABLE]
    assert len(set(names)) == len(names) and len({m.color for m in methods.TABLE}) == len(names)
    assert all(m.label and m.description and m.color.startswith("#") for m in methods.TABLE)
    assert methods.RULES == tuple(m.name for m in methods.TABLE if m.record) and "mcm" not in methods.RULES
    assert methods.VERDICT_RULES == ("ctw", "atd", "atd_neg")
    assert methods.POOLS == ("neglabel", "csp")
    plain = [m.name for m in methods.TABLE if not m.needs_no and m.pool is None]
    assert {"msp", "max_logit", "energy", "mcm"} <= set(plain)
    assert [m.name for m in methods.available(has_no=False)] == plain
    assert [m.name for m in methods.available(("csp",), has_no=False)] == [*plain, "csp"]
    assert [m.name for m in methods.TABLE if m.experimental] == ["atd_neg"]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.get("nope")


def test_existing_record_fields_columns_and_eval_methods_are_unchanged() -> None:
    assert SCORE_FIELDS[:6] == ("ctw_score", "atd_score", "p_ood", "msp", "max_logit", "energy")  # new methods follow
    assert SCORE_FIELDS == methods.record_fields(methods.available())
    assert CSV_COLUMNS == ("path", "error", "verdict", "rule", "class", "class_index", *methods.record_fields())
    assert list(METHODS)[:5] == ["ctw", "atd", "msp", "max_logit", "energy"]  # new methods follow
    assert METHODS == {m.name: m.label for m in methods.TABLE if m.pool is None}


def test_scores_and_verdicts_come_from_the_table() -> None:
    g = torch.Generator().manual_seed(0)
    f, yes, no = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    from clipn_cli.heads.embeddings import ClassEmbeddings

    heads = Heads.prepare(ClassEmbeddings(["a", "b", "c"], yes, no, "", "", ""))
    s = score_heads(f, heads)
    old = score(f, yes, no)  # the unprepared path: the very same numbers
    for field in ("ctw", "atd", "msp", "max_logit", "energy", "p_ood"):
        assert torch.equal(getattr(s, field), getattr(old, field))
    assert torch.equal(s.is_ood("ctw"), s.ctw < 0.5) and torch.equal(s.is_ood("atd"), s.p_ood > s.atd_best)
    with pytest.raises(ValueError, match="unknown rule 'msp'"):
        s.is_ood("msp")  # no threshold-free verdict
    assert [m.name for m in heads.methods] == list(METHODS)
    records = detections_from_scores(list("vwxyz"), s, ["a", "b", "c"], "msp", threshold=0.5)
    assert [r.verdict for r in records] == ["OOD" if v < 0.5 else "ID" for v in s.msp.tolist()]
    assert all(r.extra_scores == {} for r in records)
    with pytest.raises(ValueError, match="needs the 'csp' negative labels"):
        check_rule("csp", (), 0.5)
    with pytest.raises(ValueError, match="no threshold-free verdict"):
        check_rule("energy", ())
    with pytest.raises(ValueError, match="evaluation score, not a detection rule"):
        check_rule("mcm", ())


def fake_set(name: str, role: str, names: list[str], rules: list[str], shift: float) -> SetScores:
    rng = np.random.default_rng(len(name))
    n = 30
    return SetScores(name, role, [f"{name}/{i}.png" for i in range(n)], [None] * n, np.zeros(n, dtype=np.int64),
                     {m: rng.normal(shift, 1.0, n) for m in names}, {r: rng.random(n) < 0.3 for r in rules},
                     rng.normal(shift, 1.0, n), [])


def test_eval_and_plots_handle_every_method_of_the_table(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from clipn_cli.outputs.results import Evaluation
    from clipn_cli.outputs.plots import COLUMNS, histogram_figure, write_plots

    names = [m.name for m in methods.TABLE]
    rules = list(methods.VERDICT_RULES)
    id_set, ood = fake_set("ID", "id", names, rules, 1.0), fake_set("far", "ood", names, rules, -1.0)
    results = compute_results(id_set, [ood])
    assert [r.method for r in results if r.ood == "far"] == names
    assert {r.method for r in results if r.id_flagged is not None} == set(rules)
    written = write_plots(Evaluation("clipn", results, [id_set, ood], ["a"]), tmp_path)
    assert [p.name for p in written] == ["roc-far.png", "scores-far.png"]
    figure = histogram_figure(id_set, ood, {r.method: r for r in results if r.ood == "far"}, names)
    panels = len(names) + 1 + 1  # every method, ATD's margin, the summary
    assert len(figure.axes) == COLUMNS * math.ceil(panels / COLUMNS)


def test_detect_rule_choices_are_the_table() -> None:
    result = cli("detect", "--classes", "cat", "--rule", "bogus", "x.png")
    assert result.returncode == 2
    assert f"--rule must be {', '.join(methods.RULES[:-1])} or {methods.RULES[-1]}, not 'bogus'" in result.stderr
