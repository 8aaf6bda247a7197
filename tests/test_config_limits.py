"""Model configs from every source (bundled names, JSON files, weights metadata) are checked for their
arithmetic and their size before anything is built: one line naming the source, never an
AssertionError from open_clip's constructors or gigabytes spent on a model that is then refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import pytest
from safetensors.torch import load_file, save_file

from clipn_cli.model.configs import MAX_PARAMETERS, estimate_parameters, validate_config
from clipn_cli.errors import ClipnError

from conftest import TINY_CONFIG, cli

TINY = json.loads(TINY_CONFIG.read_text())


def changed(tower: str, **values: object) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg[tower].update(values)
    return cfg


BAD = {
    "text heads do not divide the width": (changed("text_cfg", heads=5), "text_cfg.width 32 is not divisible by text_cfg.heads 5"),
    "vision head_width does not divide the width": (changed("vision_cfg", width=100, head_width=32), "vision_cfg.width 100 is not divisible into heads of vision_cfg.head_width 32 (3 heads"),
    "vision head_width wider than the tower": (changed("vision_cfg", head_width=128), "vision_cfg.width 64 is not divisible into heads"),
    "ResNet pool heads": (changed("vision_cfg", layers=[1, 1, 1, 1], width=64, head_width=48), "32 × vision_cfg.width (2048) is not divisible into heads"),
    "ResNet of 3 stages": (changed("vision_cfg", layers=[1, 1, 1], head_width=64), "a ResNet vision_cfg needs 4 layers"),
    "patch larger than the image": (changed("vision_cfg", patch_size=256), "vision_cfg.patch_size 256 does not fit in image_size 224"),
    "vocab_size 10,000,000": (changed("text_cfg", vocab_size=10_000_000), "vocab_size must be a whole number from 1 to 1000000"),
    "billions of parameters": (changed("vision_cfg", width=16384, layers=256, head_width=64), "declares about 825 billion parameters, more than the 8 billion clipn builds ($CLIPN_MAX_PARAMS)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_config_arithmetic_and_size_from_a_json_file(case: str, tmp_path: Path) -> None:
    from clipn_cli.model.configs import resolve_config

    cfg, message = BAD[case]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ClipnError) as caught:
        resolve_config(str(path))
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), str(caught.value)


def test_clipn_weights_whose_config_has_5_heads(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.safetensors_file import SafetensorsFile

    with SafetensorsFile(tiny_weights) as sf:
        meta = dict(sf.metadata)
    cfg = json.loads(meta["model_config"])
    cfg["text_cfg"]["heads"] = 5
    meta["model_config"] = json.dumps(cfg)
    bad = tmp_path / "heads5.safetensors"
    save_file(load_file(str(tiny_weights)), str(bad), metadata=meta)
    out = cli("detect", "-w", str(bad), "--classes", "cat,dog", str(TINY_CONFIG.parent / "images" / "chelsea.png"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"{bad}: text_cfg.width 32 is not divisible by text_cfg.heads 5" in out.stderr and "Assertion" not in out.stderr


def test_plain_clip_vocab_beyond_the_file_is_refused_before_building(plain_checkpoint: Path, tmp_path: Path) -> None:
    """Within the bounds, but not what the checkpoint holds: refused from the shapes, nothing built."""
    from clipn_cli.weights.plainclip import load_plain_clip

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(changed("text_cfg", vocab_size=900_000)))
    with pytest.raises(ClipnError, match=r"text_cfg.vocab_size 900000 \(the tensors hold 49408\)"):
        load_plain_clip((str(cfg), str(plain_checkpoint)))


def test_unknown_pretrained_tag_is_one_line_naming_it() -> None:
    out = cli("detect", "-w", "ViT-B-16:no-such-tag", "--classes", "cat,dog", str(TINY_CONFIG.parent / "images" / "chelsea.png"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "ViT-B-16:no-such-tag: open_clip has no pretrained tag 'no-such-tag' for ViT-B-16 (tags: openai," in out.stderr
    assert "ERROR:root" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("name, tolerance", [("ViT-B-16", 0.01), ("ViT-L-14", 0.01), ("RN50", 0.2)])
def test_parameter_estimate_is_close_to_what_is_built(name: str, tolerance: float) -> None:
    from clipn_cli.model.clipn import build_model

    cfg = open_clip.get_model_config(name)
    built = sum(p.numel() for p in build_model(cfg, 16, device="meta").parameters())
    assert abs(estimate_parameters(cfg) - built) <= tolerance * built


def test_every_bundled_config_fits_the_default_cap_and_the_cap_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipn_cli.model.configs import candidate_configs

    assert all(estimate_parameters(cfg) <= MAX_PARAMETERS for cfg in candidate_configs().values())
    validate_config(open_clip.get_model_config("ViT-B-16"), "ViT-B-16")
    monkeypatch.setenv("CLIPN_MAX_PARAMS", "100000000")
    with pytest.raises(ClipnError, match=r"ViT-B-16: the model config declares about 0.213 billion parameters, more than the 0.1 billion"):
        validate_config(open_clip.get_model_config("ViT-B-16"), "ViT-B-16")
