"""Model architectures: open_clip config names, config files, and recognising one from tensor shapes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip

from ..errors import ConfigError
from ..files import read_bounded

MAX_CONFIG_FILE_BYTES = 1 << 20  # open_clip's configs are under 1 KB


def _is_plain_clip(cfg: Mapping[str, Any]) -> bool:
    """True for configs CLIPN can extend: open_clip's own ViT/ResNet towers, no HF or timm parts."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    return (
        "embed_dim" in cfg
        and not vision.get("timm_model_name")
        and not text.get("hf_model_name")
        and "multimodal_cfg" not in cfg
    )


# Sizes open_clip reads from a tower config, with the largest value accepted: a file could hold
# anything there, and building a model declaring 10,000,000 layers takes minutes and gigabytes even
# on the meta device. The bounds are far above every open_clip model (ViT-bigG: 48 layers, width 1664).
_INT_LIMITS = {
    "layers": 256, "width": 16384, "heads": 1024, "head_width": 4096, "patch_size": 4096,
    "image_size": 4096, "context_length": 8192, "vocab_size": 1_000_000,
}
# The largest model clipn builds, in parameters (estimated from the config, CLIPN's second text tower
# included): every bundled open_clip config fits (the largest, ViT-bigG-14-worldwide as CLIPN, about
# 5.4 billion). Building costs memory in proportion (4 bytes a parameter), so a config over the cap is
# refused before anything is built. Change it with CLIPN_MAX_PARAMS.
MAX_PARAMETERS = 8_000_000_000
_FLOAT_LIMITS = {"mlp_ratio": 64.0}
_DEFAULTS = {
    "vision_cfg": {"layers": 12, "width": 768},
    "text_cfg": {"layers": 12, "width": 512, "context_length": 77},
}


def _is_int(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_size(source: str, name: str, value: Any) -> None:
    key = name.rsplit(".", 1)[-1]
    if key in _FLOAT_LIMITS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= _FLOAT_LIMITS[key]
        if not ok:
            raise ConfigError(f"{source}: {name} must be a positive number up to {_FLOAT_LIMITS[key]:g}, not {_shown(value)}")
        return
    limit = _INT_LIMITS[key]
    items = value if isinstance(value, list) and key in ("layers", "image_size") else [value]
    if not items or len(items) > 8 or not all(_is_positive(v) for v in items):
        raise ConfigError(f"{source}: {name} must be a positive number, not {_shown(value)}")
    if not all(_is_int(v, limit) for v in items):
        raise ConfigError(f"{source}: {name} must be a whole number from 1 to {limit}, not {_shown(value)}")


def validate_config(cfg: Any, source: str) -> dict[str, Any]:
    """Check a model config has the keys every open_clip CLIP config has, with sizes that are sizes.

    Configs come from files (weights metadata, JSON): a bad value must be refused here with the
    file's name, not fail later inside open_clip's constructors (or build for minutes).
    """
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= cfg.keys():
        raise ConfigError(f"{source}: a model config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    if not _is_int(cfg["embed_dim"], _INT_LIMITS["width"]):
        raise ConfigError(f"{source}: embed_dim must be a positive integer up to {_INT_LIMITS['width']}, not {_shown(cfg['embed_dim'])}")
    for tower in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg[tower], dict):
            raise ConfigError(f"{source}: {tower} must be a mapping, not {type(cfg[tower]).__name__}")
        for key in (*_INT_LIMITS, *_FLOAT_LIMITS):
            if cfg[tower].get(key) is not None:
                _check_size(source, f"{tower}.{key}", cfg[tower][key])
    if not _is_plain_clip(cfg):
        raise ConfigError(f"{source}: only open_clip's built-in CLIP towers are supported (no HF/timm towers)")
    _check_arithmetic(cfg, source)
    from ..inputs.limits import env_number as _env_number

    cap = _env_number("CLIPN_MAX_PARAMS", MAX_PARAMETERS)
    if (count := estimate_parameters(cfg)) > cap:
        raise ConfigError(
            f"{source}: the model config declares about {count / 1e9:.3g} billion parameters, more than the "
            f"{cap / 1e9:.3g} billion clipn builds ($CLIPN_MAX_PARAMS)"
        )
    return dict(cfg)


def _sides(value: Any) -> list[int]:
    return list(value) if isinstance(value, list) else [value, value]


def _check_arithmetic(cfg: Mapping[str, Any], source: str) -> None:
    """Sizes that are each in range but do not fit together (heads that do not divide the width, a patch
    larger than the image) would fail inside open_clip's constructors with an AssertionError."""
    vision, text = {**_DEFAULTS["vision_cfg"], **cfg["vision_cfg"]}, {**_DEFAULTS["text_cfg"], **cfg["text_cfg"]}
    head_width = vision.get("head_width", 64)
    resnet = isinstance(vision["layers"], list)
    attention = vision["width"] * 32 if resnet else vision["width"]  # a ResNet's attention pool is 32 × width wide
    heads = attention // head_width
    if heads < 1 or attention % heads:
        what = f"32 × vision_cfg.width ({attention})" if resnet else f"vision_cfg.width {attention}"
        raise ConfigError(f"{source}: {what} is not divisible into heads of vision_cfg.head_width {head_width} ({max(heads, 1)} heads of {attention / max(heads, 1):g})")
    image = _sides(vision.get("image_size", 224))
    if resnet:
        if len(vision["layers"]) != 4 or min(image) < 32:
            raise ConfigError(f"{source}: a ResNet vision_cfg needs 4 layers (got {len(vision['layers'])}) and image_size of at least 32")
    else:
        patch = _sides(vision.get("patch_size", 16))
        if len(image) != 2 or len(patch) != 2 or any(p > i for p, i in zip(patch, image, strict=True)):
            raise ConfigError(f"{source}: vision_cfg.patch_size {_shown(vision.get('patch_size', 16))} does not fit in image_size {_shown(vision.get('image_size', 224))}")
    t_heads = text.get("heads", 8)
    if text["width"] % t_heads:
        raise ConfigError(f"{source}: text_cfg.width {text['width']} is not divisible by text_cfg.heads {t_heads}")


def estimate_parameters(cfg: Mapping[str, Any], num_prompts: int = 16) -> int:
    """About how many parameters the CLIPN of a validated config has (both text towers, `num_prompts`
    learnable prompts); a plain CLIP has one text tower less. Within 20% for open_clip's models (ViTs within 1%)."""
    vision, text = {**_DEFAULTS["vision_cfg"], **cfg["vision_cfg"]}, {**_DEFAULTS["text_cfg"], **cfg["text_cfg"]}
    embed = cfg["embed_dim"]

    def blocks(layers: int, width: int, ratio: float) -> int:
        return int(layers * (4 + 2 * ratio) * width * width)

    w, ctx = text["width"], text["context_length"]
    text_tower = text.get("vocab_size", 49408) * w + ctx * w + blocks(text["layers"], w, text.get("mlp_ratio", 4.0)) + w * embed
    image = _sides(vision.get("image_size", 224))
    w = vision["width"]
    if isinstance(vision["layers"], list):
        stages = sum(n * 25 * (w * 2**s) ** 2 for s, n in enumerate(vision["layers"]))
        pool = (image[0] // 32) * (image[1] // 32) * 32 * w + 3 * (32 * w) ** 2 + 32 * w * embed
        vision_tower = stages + pool
    else:
        patch = _sides(vision.get("patch_size", 16))
        grid = (image[0] // patch[0]) * (image[1] // patch[1])
        vision_tower = 3 * patch[0] * patch[1] * w + (grid + 1) * w + blocks(vision["layers"], w, vision.get("mlp_ratio", 4.0)) + w * embed
    return vision_tower + 2 * text_tower + num_prompts * ctx * text["width"]


def _blocks(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """How many numbered blocks (`prefix0.`, `prefix1.`, ...) the tensor names hold."""
    return len({k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()})


def check_config_fits(cfg: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Before anything is built: the config's depths and widths must be those of the tensors at hand.

    Building a model costs time in proportion to its declared size, so a config must not declare
    more than the file holds: the exact name-by-name comparison (`expected_shapes`) comes after.
    """
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    problems = []
    layers = vision.get("layers", _DEFAULTS["vision_cfg"]["layers"])
    if isinstance(layers, list):  # ResNet: blocks per stage
        found = [_blocks(shapes, f"visual.layer{stage}.") for stage in range(1, len(layers) + 1)]
        if found != list(layers) or _blocks(shapes, f"visual.layer{len(layers) + 1}."):
            problems.append(f"vision_cfg.layers {layers} (the tensors hold {found})")
    else:
        found_v = _blocks(shapes, "visual.transformer.resblocks.")
        if found_v != layers:
            problems.append(f"vision_cfg.layers {layers} (the tensors hold {found_v})")
        conv = shapes.get("visual.conv1.weight")
        width = vision.get("width", _DEFAULTS["vision_cfg"]["width"])
        if conv is not None and conv[0] != width:
            problems.append(f"vision_cfg.width {width} (the tensors hold {conv[0]})")
    found_t = _blocks(shapes, "transformer.resblocks.")
    t_layers = text.get("layers", _DEFAULTS["text_cfg"]["layers"])
    if found_t != t_layers:
        problems.append(f"text_cfg.layers {t_layers} (the tensors hold {found_t})")
    tokens = shapes.get("token_embedding.weight")
    vocab = text.get("vocab_size", 49408)
    if tokens is not None and tokens[0] != vocab:
        problems.append(f"text_cfg.vocab_size {vocab} (the tensors hold {tokens[0]})")
    positional = shapes.get("positional_embedding")
    declared = (text.get("context_length", _DEFAULTS["text_cfg"]["context_length"]), text.get("width", _DEFAULTS["text_cfg"]["width"]))
    if positional is not None and tuple(positional) != declared:
        problems.append(f"text_cfg context_length x width {declared[0]}x{declared[1]} (the tensors hold {'x'.join(map(str, positional))})")
    if problems:
        raise ConfigError(f"{source}: the model config does not fit the tensors: " + "; ".join(problems))


def resolve_config(name_or_file: str) -> dict[str, Any]:
    """An open_clip model name (`ViT-B-16`) or a path to an open_clip model-config JSON file."""
    path = Path(name_or_file)
    if path.suffix == ".json" or path.is_file():
        from ..safetensors_file import loads_json

        try:
            data = loads_json(read_bounded(path, MAX_CONFIG_FILE_BYTES), "the model config")
        except (OSError, ValueError) as exc:  # ValueError: not JSON, nested too deeply, not a regular file, too large
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
    from .clipn import expected_shapes

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
