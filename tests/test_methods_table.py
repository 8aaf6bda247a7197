"""The methods table is the one source: GEN, added as one row and one function, reaches scoring,
records, CSV columns, eval, calibrate, plots and report; README's method lists are the table's."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clipn_cli.outputs.writers import CSV_COLUMNS
from clipn_cli.scores import methods
from clipn_cli.scores.methods import Scores

from conftest import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def gen_reference(probs: np.ndarray, gamma: float = 0.1, m: int = 100) -> np.ndarray:
    """GEN as Liu et al. (CVPR 2023) write it: −Σ_{j ≤ M} p_(j)^γ (1 − p_(j))^γ over the M largest."""
    top = np.sort(probs, axis=1)[:, ::-1][:, :min(m, probs.shape[1])]
    return -np.sum(top**gamma * (1.0 - top) ** gamma, axis=1)


def test_gen_is_the_papers_generalized_entropy() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.98, 0.01, 0.01]])
    got = methods.gen(torch.tensor(probs)).numpy()
    assert got == pytest.approx(gen_reference(probs), abs=1e-12)
    # by hand for the first row: 0.7^0.1·0.3^0.1 + 0.2^0.1·0.8^0.1 + 0.1^0.1·0.9^0.1
    assert got[0] == pytest.approx(-(0.21**0.1 + 0.16**0.1 + 0.09**0.1), abs=1e-12)
    assert got[2] > got[0] > got[1]  # confident = more ID, uniform = least


def test_gen_keeps_the_top_100_probabilities() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 300))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = methods.gen(torch.tensor(probs)).numpy()
    assert got == pytest.approx(gen_reference(probs), abs=1e-12)
    assert not np.allclose(got, gen_reference(probs, m=300))  # the cut changes the score


def test_gen_is_a_row_of_the_table() -> None:
    gen = methods.get("gen")
    assert (gen.label, gen.record, gen.threshold_free, gen.needs_no, gen.pool) == ("GEN", None, False, False, None)
    probs = torch.tensor([[0.6, 0.4]])
    scores = Scores(probs.log(), None, None, probs, torch.tensor([0]), None, None, None, None, probs.max(-1).values,
                    probs.log().max(-1).values, probs.log().logsumexp(-1))
    assert scores.value("gen").tolist() == pytest.approx(gen_reference(probs.numpy()).tolist())
    # an evaluation score, as MCM: detect's records keep their fields (byte for byte those of earlier releases)
    assert "gen" not in methods.RULES and "gen" in methods.CLASSIC and "gen_score" not in CSV_COLUMNS


# ---------------------------------------------------------------- README lists


def names_in(text: str) -> list[str]:
    return re.findall(r"`([a-z_]+)`", text)


def test_readme_method_lists_are_the_table() -> None:
    rules = re.search(r"\| `--rule ([a-z_\\|]+)` \| verdict rule", README).group(1).split("\\|")
    assert rules == list(methods.RULES)
    calibrated = re.search(r"- `--rule ([a-z_|]+)` picks the score", README).group(1).split("|")
    assert calibrated == [m for m in methods.CLASSIC if m in methods.RULES]
    eval_methods = re.search(r"`method` is one of (.+?); `ood`", README, re.S).group(1)
    assert names_in(eval_methods) == list(methods.CLASSIC)
    bold = re.search(r"Methods, all scored \"higher = more ID\": (.+?)\n\n", README, re.S).group(1)
    assert re.findall(r"\*\*([^*]+)\*\*", bold) == [methods.label(m) for m in methods.CLASSIC]
    stored = re.search(r"for every score method \(([^)]+)\)", README).group(1)
    assert stored.split(", ") == [methods.label(m) for m in methods.CLASSIC]
    columns = re.search(r"every image's scores: `path, set, role, label, pred, ([a-z_, ]+), error`", README).group(1).split(", ")
    assert columns == [*methods.CLASSIC, *(f"{r}_ood" for r in methods.VERDICT_RULES if r in methods.CLASSIC)]
    table = re.search(r"\| method \(`--rule` / eval name\) \|.*?\n\n", README, re.S).group(0)
    assert [n for row in table.splitlines()[2:] if row for n in names_in(row.split("|")[1])] == [m.name for m in methods.TABLE]
    plain = re.search(r"\n([A-Za-z+, ]+) work with it \(records", README).group(1).replace(" and ", ", ").split(", ")
    assert plain == [m.label for m in methods.available(methods.POOLS, has_no=False)]


# ---------------------------------------------------------------- GEN through the CLI


@pytest.fixture()
def sets(images_dir: Path) -> tuple[list[str], list[str]]:
    files = sorted(str(p) for p in images_dir.iterdir() if p.suffix in (".png", ".jpg"))
    return files[: len(files) // 2], files[len(files) // 2:]


def test_gen_is_an_evaluation_score_not_a_detect_rule(tiny_weights: Path, sets: tuple[list[str], list[str]]) -> None:
    ids, _ = sets
    out = cli("detect", "-w", str(tiny_weights), "--classes", "cat,dog,car", "--rule", "gen", "--threshold", "-2.5", *ids)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--rule" in out.stderr and "gen" in out.stderr


def test_gen_in_eval_calibrate_plots_and_report(tiny_weights: Path, sets: tuple[list[str], list[str]], tmp_path: Path) -> None:
    ids, oods = sets
    report, id_list, ood_list = tmp_path / "report.html", tmp_path / "id.txt", tmp_path / "ood.txt"
    id_list.write_text("\n".join(ids) + "\n")
    ood_list.write_text("\n".join(oods) + "\n")
    out = cli("eval", "-w", str(tiny_weights), "--classes", "cat,dog,car", "--id", str(id_list), "--ood", f"far={ood_list}",
              "-f", "json", "--report", str(report), "--plots", str(tmp_path / "plots"))
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    gen = [r for r in found["results"] if r["method"] == "gen"]
    assert [r["ood"] for r in gen] == ["far", "average"] and 0 <= gen[0]["auroc"] <= 1 and 0 <= gen[0]["fpr95"] <= 1
    page = report.read_text(encoding="utf-8")
    assert ">GEN<" in page and f'stroke="{methods.get("gen").color}"' in page  # metrics row and ROC curve
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["roc-far.png", "scores-far.png"]
    calib = tmp_path / "calib.json"
    made = cli("calibrate", "-w", str(tiny_weights), "--classes", "cat,dog,car", "--alpha", "0.5", "-o", str(calib), *ids)
    assert made.returncode == 0, made.stderr
    assert len(json.loads(calib.read_text())["scores"]["gen"]) == len(ids)
