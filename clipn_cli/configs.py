"""Model architectures: open_clip config names, config files, and recognising one from tensor shapes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip

from .errors import ConfigError


def _is_plain_clip(cfg: Mapping[str, Any]) -> bool:
    """True for configs CLIPN can extend: open_clip's own ViT/ResNet towers, no HF or timm parts."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    return (
        "embed_dim" in cfg
        and not vision.get("timm_model_name")
        and not text.get("hf_model_name")
        and "multimodal_cfg" not in cfg
    )


# Sizes open_clip reads from a tower config; a file could hold anything there (ResNet `layers` is a list).
_SIZE_KEYS = ("layers", "width", "heads", "head_width", "patch_size", "image_size", "context_length", "vocab_size", "mlp_ratio")


def _is_size(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_is_size(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def validate_config(cfg: Any, source: str) -> dict[str, Any]:
    """Check a model config has the keys every open_clip CLIP config has, with sizes that are sizes.

    Configs come from files (weights metadata, JSON): a bad value must be refused here with the
    file's name, not fail later inside open_clip's constructors.
    """
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= cfg.keys():
        raise ConfigError(f"{source}: a model config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    if not isinstance(cfg["embed_dim"], int) or not _is_size(cfg["embed_dim"]):
        raise ConfigError(f"{source}: embed_dim must be a positive integer, not {cfg['embed_dim']!r}")
    for tower in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg[tower], dict):
            raise ConfigError(f"{source}: {tower} must be a mapping, not {type(cfg[tower]).__name__}")
        for key in _SIZE_KEYS:
            if key in cfg[tower] and cfg[tower][key] is not None and not _is_size(cfg[tower][key]):
                raise ConfigError(f"{source}: {tower}.{key} must be a positive number, not {cfg[tower][key]!r}")
    if not _is_plain_clip(cfg):
        raise ConfigError(f"{source}: only open_clip's built-in CLIP towers are supported (no HF/timm towers)")
    return dict(cfg)


def resolve_config(name_or_file: str) -> dict[str, Any]:
    """An open_clip model name (`ViT-B-16`) or a path to an open_clip model-config JSON file."""
    path = Path(name_or_file)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read model config: {exc}") from None
        cfg = data.get("model_cfg", data) if isinstance(data, dict) else data
        return validate_config(cfg, str(path))
    cfg = open_clip.get_model_config(name_or_file)
    if cfg is None:
        raise ConfigError(
            f"unknown model config '{name_or_file}': give an open_clip model name "
            "(see open_clip.list_models(), e.g. ViT-B-16) or a model-config JSON file"
        )
    return validate_config(cfg, name_or_file)


def candidate_configs() -> dict[str, dict[str, Any]]:
    """open_clip's bundled plain CLIP configs, without `-quickgelu` twins (CLIPN uses GELU)."""
    out = {}
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if cfg and _is_plain_clip(cfg) and not cfg.get("quick_gelu") and not name.startswith("coca"):
            out[name] = cfg
    return out


def infer_config(shapes: Mapping[str, tuple[int, ...]], num_prompts: int) -> tuple[str, dict[str, Any]]:
    """Find the one bundled config whose CLIPN has exactly these tensor names and shapes.

    Head counts leave no trace in shapes, so two configs can fit the same tensors; then the
    user must choose with `--config`.
    """
    from .model import expected_shapes

    width = shapes.get("text_projection", (None, None))
    candidates = candidate_configs()
    matches = []
    for name, cfg in candidates.items():
        if width[-1] != cfg["embed_dim"]:
            continue
        try:
            if expected_shapes(cfg, num_prompts) == dict(shapes):
                matches.append(name)
        except Exception:  # configs this open_clip cannot build are simply not candidates
            continue
    if len(matches) == 1:
        return matches[0], candidates[matches[0]]
    if not matches:
        raise ConfigError(
            "no bundled open_clip config matches these tensor shapes; pass --config NAME or --config FILE.json"
        )
    raise ConfigError(f"several configs match these tensor shapes ({', '.join(matches)}); choose one with --config")
