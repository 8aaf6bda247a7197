"""A plain open_clip CLIP as --weights: MCM, NegLabel, CSP (and MSP/MaxLogit/Energy) work; CTW/ATD are refused."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from conftest import FIXTURES, IMAGES, TINY_CONFIG, WORDS, cli

from clipn_cli.scores import methods as method_table
from clipn_cli.weights.plainclip import parse_spec
from clipn_cli.weights.checkpoints import load_model

CLASSES = "cat,horse,rocket,coffee,astronaut"


def spec(path: Path) -> str:
    return f"{TINY_CONFIG}:{path}"


def test_spellings() -> None:
    assert parse_spec("ViT-B-16:laion2b_s34b_b88k") == ("ViT-B-16", "laion2b_s34b_b88k")
    assert parse_spec("ViT-B-16:/data/open_clip_pytorch_model.bin") == ("ViT-B-16", "/data/open_clip_pytorch_model.bin")
    assert parse_spec("cfg.json:x.pt") == ("cfg.json", "x.pt")
    assert parse_spec("clipn-vitb16") is None and parse_spec(None) is None and parse_spec("not-a-model:tag") is None


def test_plain_clip_scores_equal_open_clip(plain_checkpoint: Path) -> None:
    model, info = load_model(spec(plain_checkpoint))
    assert not model.has_no and info.metadata["kind"] == "open_clip" and len(info.fingerprint) == 64
    reference = open_clip.model.CLIP(**{k: v for k, v in json.loads(TINY_CONFIG.read_text()).items()})
    reference.load_state_dict(torch.load(plain_checkpoint, weights_only=True))
    tokens = open_clip.tokenize(["a photo of a cat"])
    pixels = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model.encode_text_yes(tokens), reference.eval().encode_text(tokens))
        assert torch.equal(model.encode_image(pixels), reference.encode_image(pixels))


def test_detect_and_eval_with_a_plain_clip(plain_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    w = spec(plain_checkpoint)
    image = str(IMAGES / "chelsea.png")
    refused = cli("detect", "-w", w, "--classes", CLASSES, image)
    assert refused.exit_code == 2 and "rule 'atd' needs CLIPN's \"no\" tower" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    for rule in ("neglabel", "csp", "msp"):
        result = cli("detect", "-w", w, "--classes", CLASSES, "-t", "simple", "--words", str(WORDS), "--rule", rule,
                        "--threshold", "0.5", "--format", "jsonl", image)
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        assert record["ctw_score"] is None and record["atd_score"] is None and record["msp"] > 0
        if rule != "msp":
            assert 0 < record[f"{rule}_score"] < 1 and "atd_neg_score" not in record
    table = cli("detect", "-w", w, "--classes", CLASSES, "-t", "simple", "--rule", "msp", "--threshold", "0.5", "--format", "table", image)
    assert table.exit_code == 0 and "chelsea.png" in table.stdout and "–" in table.stdout
    id_dir, ood_dir = tmp_path / "id", tmp_path / "ood"
    for folder, names in ((id_dir, ("chelsea.png", "coffee.png")), (ood_dir, ("retina.jpg", "brick.png"))):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes((IMAGES / name).read_bytes())
    ev = cli("eval", "-w", w, "--classes", CLASSES, "-t", "simple", "--id", str(id_dir), "--ood", f"misc={ood_dir}",
                "--negatives", "neglabel,csp", "--words", str(WORDS), "--format", "json", "--plots", str(tmp_path / "plots"))
    assert ev.exit_code == 0, ev.output
    methods = [r["method"] for r in json.loads(ev.stdout)["results"] if r["ood"] == "misc"]
    assert methods == [m.name for m in method_table.available(method_table.POOLS, has_no=False)]
    assert len(list((tmp_path / "plots").iterdir())) == 2
    stored = cli("embed-classes", "-w", w, "--classes", CLASSES, "-o", str(tmp_path / "x.safetensors"))
    assert stored.exit_code == 2 and "plain CLIP's class heads are not stored" in stored.stderr


def test_a_clipn_checkpoint_is_not_a_plain_clip(tmp_path: Path) -> None:
    from clipn_cli.errors import WeightsError

    with pytest.raises(WeightsError, match="a CLIPN checkpoint, not a plain CLIP"):
        load_model(f"{TINY_CONFIG}:{FIXTURES / 'clipn-tiny-official.pt'}")
