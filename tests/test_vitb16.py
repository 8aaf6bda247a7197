"""A full-size ViT-B-16 CLIPN in the official checkpoint layout: recognised, loaded strictly, scored."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from conftest import IMAGES, cli

from clipn_cli.model.clipn import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def official_vitb16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random ViT-B-16 CLIPN saved exactly as the official DDP training saves it (~855 MB)."""
    torch.manual_seed(0)
    model = build_model(open_clip.get_model_config("ViT-B-16"))
    torch.nn.init.normal_(model.prompt_no, std=0.05)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("vitb16") / "epoch_10.pt"
    torch.save({"epoch": 10, "name": "random-ViT-B-16", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    assert len(state) == 452
    assert sum(v.numel() for v in state.values()) == 213_679_617
    return path


def test_convert_recognises_vitb16_and_detect_scores(official_vitb16: Path, tmp_path: Path) -> None:
    out = tmp_path / "clipn-vitb16.safetensors"
    result = cli("convert", str(official_vitb16), str(out))
    assert result.returncode == 0, result.stderr
    assert "ViT-B-16" in result.stderr

    from clipn_cli.weights.checkpoints import read_info

    info = read_info(out)
    assert info.model_name == "ViT-B-16"
    assert info.model_cfg == open_clip.get_model_config("ViT-B-16")
    assert info.num_prompts == 16
    assert len(info.metadata["source_sha256"]) == 64

    result = cli("detect", "--weights", str(out), "--classes", "cat,rocket", "--templates", "simple", "--format", "json", str(IMAGES / "chelsea.png"))
    assert result.returncode == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert record["verdict"] in {"ID", "OOD"}
    assert record["class"] in {"cat", "rocket"}
    assert 0.0 <= record["atd_score"] <= 1.0 and 0.0 <= record["ctw_score"] <= 1.0
