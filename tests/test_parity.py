"""Every number of golden-tiny.json (computed by the official CLIPN code) reproduced by clipn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import IMAGES, OFFICIAL_CHECKPOINT, TINY_CONFIG, cli

import clipn_cli as clipn
from clipn_cli.scores.scoring import score

CLASS_SETS = ("photos", "one", "unicode")
PROB_TOL, LOGIT_TOL = 1e-5, 1e-3


def assert_close(actual, expected, tol: float, what: str) -> None:
    diff = (torch.as_tensor(actual, dtype=torch.float64) - torch.as_tensor(expected, dtype=torch.float64)).abs().max().item()
    assert diff <= tol, f"{what}: max difference {diff:.3g} > {tol}"


def check_record(record: dict, ref: dict, classes: list[str], what: str) -> None:
    assert record["class_index"] == ref["pred"], what
    assert record["class"] == classes[ref["pred"]], what
    assert_close(record["logits_yes"], ref["logits_yes"], LOGIT_TOL, f"{what} logits_yes")
    assert_close(record["logits_no"], ref["logits_no"], LOGIT_TOL, f"{what} logits_no")
    assert_close(record["p_yes"], ref["p_yes"], PROB_TOL, f"{what} p_yes")
    for ours, theirs in (("ctw_score", "ctw_score"), ("atd_score", "atd_score"), ("msp", "msp")):
        assert_close(record[ours], ref[theirs], PROB_TOL, f"{what} {ours}")
    assert_close(record["p_ood"], 1 - ref["atd_score"], PROB_TOL, f"{what} p_ood")
    for name in ("max_logit", "energy"):
        assert_close(record[name], ref[name], LOGIT_TOL, f"{what} {name}")


@pytest.fixture(scope="module")
def cli_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    result = cli("convert", str(OFFICIAL_CHECKPOINT), str(out), "--config", str(TINY_CONFIG))
    assert result.returncode == 0, result.stderr
    assert "fingerprint" in result.stderr and result.stdout == ""
    return out


@pytest.mark.parametrize("class_set", CLASS_SETS)
def test_cli_reproduces_official_numbers(class_set: str, golden: dict, cli_weights: Path, tmp_path: Path) -> None:
    ref = golden["class_sets"][class_set]
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("# reference classes\n" + "\n".join(ref["classes"]) + "\n", encoding="utf-8")
    emb = tmp_path / "classes.safetensors"
    result = cli("embed-classes", str(classes_file), "--weights", str(cli_weights), "--output", str(emb))
    assert result.returncode == 0, result.stderr

    heads = clipn.ClassEmbeddings.load(emb)
    assert heads.classes == [c.strip() for c in ref["classes"]]  # class files strip surrounding whitespace
    assert_close(heads.text_yes, ref["text_yes"], PROB_TOL, "text_yes")
    assert_close(heads.text_no, ref["text_no"], PROB_TOL, "text_no")

    result = cli("detect", "--weights", str(cli_weights), "--embeddings", str(emb), "--format", "jsonl", "--details", str(IMAGES))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == sorted(ref["images"])
    for record in records:
        name = Path(record["path"]).name
        check_record(record, ref["images"][name], ref["classes"], f"{class_set}/{name}")


@pytest.mark.parametrize("class_set", CLASS_SETS)
def test_python_api_reproduces_official_numbers(class_set: str, golden: dict, tiny_weights: Path) -> None:
    ref = golden["class_sets"][class_set]
    model, info = clipn.load_model(tiny_weights)
    heads = clipn.embed_classes(model, ref["classes"], clipn.load_templates("clipn"), info.fingerprint)
    assert_close(heads.text_yes, ref["text_yes"], PROB_TOL, "text_yes")
    assert_close(heads.text_no, ref["text_no"], PROB_TOL, "text_no")

    encoded = {Path(e.path).name: e for e in clipn.encode_images(model, clipn.iter_inputs([str(IMAGES)]))}
    for name, image_ref in ref["images"].items():
        feature = encoded[name].feature
        assert_close(feature, image_ref["image_feature"], PROB_TOL, f"{name} image_feature")
        s = score(feature[None], heads.text_yes, heads.text_no)
        assert s.pred.item() == image_ref["pred"]
        assert_close(s.logits_yes[0], image_ref["logits_yes"], LOGIT_TOL, "logits_yes")
        assert_close(s.p_yes[0], image_ref["p_yes"], PROB_TOL, "p_yes")
        assert_close(s.ctw, [image_ref["ctw_score"]], PROB_TOL, "ctw")
        assert_close(s.atd, [image_ref["atd_score"]], PROB_TOL, "atd")
        assert_close(s.energy, [image_ref["energy"]], LOGIT_TOL, "energy")


def test_templates_are_the_official_128(golden: dict) -> None:
    templates = clipn.load_templates("clipn")
    assert list(templates.templates) == golden["templates"]
    assert len(templates.templates) == 128
    assert templates.templates[0] == "'a bad photo of a {}.'"
    assert sum(t.endswith("',") for t in templates.templates) == 2
