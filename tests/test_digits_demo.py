"""The committed digits demo model: held-out bars, the quickstart, and a short `clipn train` run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import DIGITS_CLASSES, DIGITS_IMAGES, DIGITS_WEIGHTS, cli, digits_build, torch_threads

SPLITS = {"0-4 vs 5-9": (0, 1, 2, 3, 4), "even vs odd": (0, 2, 4, 6, 8)}


@pytest.fixture(scope="module")
def build():
    return digits_build()


@pytest.fixture(scope="module")
def split(build):
    return build.load_split()


def _held_out_scores(weights: Path, build, images, labels) -> dict[str, dict[str, float]]:
    """AUROC (ID positive) of CTW, ATD and MSP, and ATD verdict rates, per ID/OOD split."""
    from clipn_cli.heads.embeddings import embed_classes
    from clipn_cli.inputs.decode import make_transform
    from clipn_cli.heads.prompts import clipn_templates
    from clipn_cli.scores.scoring import score
    from clipn_cli.weights.checkpoints import load_model

    model, info = load_model(weights)
    transform = make_transform(model.visual.image_size[0])
    with torch.no_grad():
        features = model.encode_image(torch.stack([transform(im) for im in images]), normalize=True)
    out = {}
    for name, id_digits in SPLITS.items():
        heads = embed_classes(model, [build.NAMES[d] for d in id_digits], clipn_templates(), info.fingerprint)
        s = score(features, heads.text_yes, heads.text_no)
        is_id = np.isin(labels, id_digits)
        flagged = s.is_ood("atd").numpy()
        out[name] = {
            "ctw": roc_auc_score(is_id, s.ctw.numpy()),
            "atd": roc_auc_score(is_id, s.atd.numpy()),
            "msp": roc_auc_score(is_id, s.msp.numpy()),
            "ood_flagged": flagged[~is_id].mean(),
            "id_flagged": flagged[is_id].mean(),
        }
    return out


def test_committed_weights_meet_the_bars(build, split) -> None:
    assert DIGITS_WEIGHTS.stat().st_size < 15e6
    _, _, held_images, held_labels, held_index = split
    assert len(held_images) == 360 and (held_index % 5 == 0).all()
    results = _held_out_scores(DIGITS_WEIGHTS, build, held_images, held_labels)
    for name, r in results.items():
        for rule in ("ctw", "atd"):
            assert r[rule] >= 0.97, (name, rule, r)
            assert r[rule] >= r["msp"] + 0.05, (name, rule, r)
        assert r["ood_flagged"] >= 0.90, (name, r)
        assert r["id_flagged"] <= 0.05, (name, r)


def test_committed_weights_record_their_training() -> None:
    from clipn_cli.weights.checkpoints import read_info

    meta = read_info(DIGITS_WEIGHTS).metadata
    assert meta["trained_by"] == "clipn train" and meta["base"] == "clip:digits-clip.pt"
    config = json.loads(meta["train_config"])
    assert config["exclude_same_caption"] is True and int(meta["steps"]) == config["steps"]


def test_quickstart_says_id_for_zero_to_four(build) -> None:
    files = sorted(DIGITS_IMAGES.glob("*.png"))
    assert len(files) == 20
    result = cli("detect", "--weights", str(DIGITS_WEIGHTS), "--classes", DIGITS_CLASSES, "--format", "jsonl", str(DIGITS_IMAGES))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 20
    for record in records:
        digit = Path(record["path"]).name.split("-")[0]
        expected = "ID" if digit in build.NAMES[:5] else "OOD"
        assert record["verdict"] == expected, record
        if expected == "ID":
            assert record["class"] == digit


def test_short_training_run_through_the_cli(build, split, tmp_path: Path) -> None:
    """CLIPN from the demo's own base CLIP (its frozen tensors), 120 steps through `clipn train`."""
    from safetensors.torch import load_file, save_file

    train_images, train_labels, held_images, held_labels, _ = split
    plain = {k: v for k, v in load_file(str(DIGITS_WEIGHTS)).items() if "_no" not in k}
    save_file(plain, str(tmp_path / "clip.safetensors"))
    (tmp_path / "clip.json").write_text(json.dumps(build.MODEL_CONFIG), encoding="utf-8")
    index = build.write_clipn_data(tmp_path, train_images, train_labels, seed=0)
    out = tmp_path / "short.safetensors"
    with torch_threads(1):  # small matrices: one thread is several times faster on a busy CPU
        result = cli(
            "train", "--base", str(tmp_path / "clip.safetensors"), "--config", str(tmp_path / "clip.json"),
            "--data", str(index), "--output", str(out), "--steps", "120", "--batch-size", "128", "--device", "cpu",
        )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and result.stdout == ""
    for name, r in _held_out_scores(out, build, held_images, held_labels).items():
        for rule in ("ctw", "atd"):
            assert r[rule] >= 0.9 and r[rule] > r["msp"], (name, rule, r)
