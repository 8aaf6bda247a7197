"""The model a training run starts from, initialised and frozen as the official code does.

BASE is one of: an open_clip model name with a pretrained tag (downloaded by open_clip), a local
checkpoint of a plain open_clip CLIP (`.pt`/`.bin` state dict or training checkpoint, or a
`.safetensors` state dict), or a CLIPN (our `.safetensors` or an official `.pt`) to continue.
A fresh "no" tower is an exact copy of the standard text tower and `prompt_no` is zeros.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model.configs import check_config_fits, infer_config, resolve_config
from ..errors import ClipnError, TrainError
from ..model.clipn import CLIPN, NUM_PROMPTS, TEXT_PARTS, build_model, causal_mask


@dataclass(frozen=True)
class Base:
    """A model ready to train, with what it was made from (recorded in the output's metadata)."""

    model: CLIPN
    model_name: str
    description: str
    vocabulary: tuple[str, ...] | None = None  # a CLIPN base's closed vocabulary, kept by what is trained from it


def load_base(base: str, pretrained: str | None = None, config: str | None = None, num_prompts: int | None = None) -> Base:
    """Build the starting CLIPN from BASE; only the `_no` parameters require gradients afterwards."""
    path = Path(base)
    if pretrained is not None:
        result = _from_open_clip(base, pretrained, num_prompts)
    elif path.is_file():
        result = _from_file(path, config, num_prompts)
    elif os.sep in base or path.suffix:
        raise TrainError(f"{base}: no such base checkpoint")
    else:
        raise TrainError(f"--base {base}: an open_clip model name needs --pretrained TAG (e.g. ViT-B-16 with laion2b_s34b_b88k)")
    freeze(result.model)
    return result


def freeze(model: CLIPN) -> None:
    """Official freezing: image tower, standard text tower and logit scale fixed; every `_no` parameter trains."""
    for name, param in model.named_parameters():
        param.requires_grad_("_no" in name)


def init_clipn(model_cfg: dict[str, Any], clip_state: dict[str, torch.Tensor], num_prompts: int, source: str) -> CLIPN:
    """A CLIPN whose CLIP part is `clip_state` (strict) and whose "no" tower copies the text tower."""
    try:
        check_config_fits(model_cfg, {k: tuple(v.shape) for k, v in clip_state.items()}, source)
    except ClipnError as exc:
        raise TrainError(str(exc)) from None
    model = build_model(model_cfg, num_prompts, device="meta")
    expected = {k for k in model.state_dict() if "_no" not in k}
    missing = sorted(expected - clip_state.keys())
    unexpected = sorted(clip_state.keys() - expected)
    if missing or unexpected:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}" for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys
        )
        raise TrainError(f"{source}: not a plain CLIP of this architecture ({detail})")
    state = {k: v.float() for k, v in clip_state.items()}
    for key in list(state):
        if key.startswith(TEXT_PARTS):
            part, _, rest = key.partition(".")
            state[f"{part}_no{'.' + rest if rest else ''}"] = state[key].clone()
    context, width = state["positional_embedding"].shape
    state["prompt_no"] = torch.zeros(num_prompts, context, width)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise TrainError(f"{source}: tensors do not fit the model config ({str(exc).splitlines()[0][:200]})") from None
    model.attn_mask = causal_mask(model.context_length)
    return model


def _from_open_clip(name: str, tag: str, num_prompts: int | None) -> Base:
    import open_clip

    model_cfg = resolve_config(name)
    pretrained_cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if pretrained_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    _check_can_download(name, tag, pretrained_cfg)
    try:
        clip = open_clip.create_model(name, pretrained=tag, require_pretrained=True)
    except Exception as exc:
        raise TrainError(f"cannot get open_clip {name} '{tag}' ({type(exc).__name__}: {_shortened(str(exc))}); it is downloaded on first use, so this needs network access") from None
    state = {k: v for k, v in clip.state_dict().items() if k != "attn_mask"}
    model = init_clipn(model_cfg, state, num_prompts or NUM_PROMPTS, f"{name} {tag}")
    return Base(model, name, f"open_clip:{name}:{tag}")


def _check_can_download(name: str, tag: str, pretrained_cfg: dict[str, Any]) -> None:
    """Fail in seconds, in one line, when the weights are neither cached nor reachable: offline,
    open_clip's hub client otherwise retries for about a minute and prints every retry."""
    hub = str(pretrained_cfg.get("hf_hub") or "").strip("/")
    if hub and _in_hub_cache(hub):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # only the proxy knows whether the host is reachable
    from huggingface_hub import constants

    url = constants.ENDPOINT if hub else str(pretrained_cfg.get("url") or "")
    offline = hub and os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    if url and (offline or not _reachable(url)):
        where = "$HF_HUB_OFFLINE is set" if offline else f"{urllib.parse.urlparse(url).hostname} cannot be reached"
        raise TrainError(
            f"cannot get open_clip {name} '{tag}': not in the local cache and {where}; "
            "run once with network access (it is cached), or pass a local CLIP checkpoint as --base"
        )


def _shortened(text: str, limit: int = 200) -> str:
    """The first line of a message, cut at a word boundary (with '…') when longer than `limit`."""
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + "…"


def _in_hub_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds."""
    parsed = urllib.parse.urlparse(url)
    if not parsed.hostname:
        return False
    try:
        with socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _from_file(path: Path, config: str | None, num_prompts: int | None) -> Base:
    from ..weights.checkpoints import model_from_file, open_weights
    from ..weights.format import read_checkpoint
    from ..weights.home import FORMAT

    if path.suffix == ".safetensors":
        with open_weights(path) as sf:  # one descriptor for the format test and the tensors
            if sf.metadata.get("format") == FORMAT:
                model, info = model_from_file(sf)
                _check_prompts(path, info.num_prompts, num_prompts)
                return Base(model, info.model_name, f"clipn:{path.name}:{info.fingerprint[:16]}", info.vocabulary)
            tensors = {k.removeprefix("module."): v for k, v in sf.tensors().items()}
    else:
        tensors = read_checkpoint(path)
    if "prompt_no" in tensors:
        return _continue_official(path, tensors, config, num_prompts)
    model_name, model_cfg = _config_for_clip(tensors, config, path)
    model = init_clipn(model_cfg, tensors, num_prompts or NUM_PROMPTS, str(path))
    return Base(model, model_name, f"clip:{path.name}")


def _continue_official(path: Path, tensors: dict[str, torch.Tensor], config: str | None, num_prompts: int | None) -> Base:
    from ..weights.format import check_tensors

    found = int(tensors["prompt_no"].shape[0])
    _check_prompts(path, found, num_prompts)
    if config is None:
        model_name, model_cfg = infer_config({k: tuple(v.shape) for k, v in tensors.items()}, found)
    else:
        model_cfg, model_name = resolve_config(config), Path(config).stem
    check_tensors(tensors, model_cfg, found, str(path))
    model = build_model(model_cfg, found, device="meta")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    model.attn_mask = causal_mask(model.context_length)
    return Base(model, model_name, f"clipn:{path.name}")


def _check_prompts(path: Path, found: int, wanted: int | None) -> None:
    if wanted is not None and wanted != found:
        raise TrainError(f"{path}: this CLIPN has {found} 'no' prompts; --num-prompts {wanted} cannot continue it")


def _config_for_clip(tensors: dict[str, torch.Tensor], config: str | None, path: Path) -> tuple[str, dict[str, Any]]:
    """The architecture of a plain CLIP checkpoint: from --config, or recognised from its shapes."""
    if config is not None:
        return (Path(config).stem if Path(config).is_file() else config), resolve_config(config)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for key, shape in list(shapes.items()):
        if key.startswith(TEXT_PARTS):
            part, _, rest = key.partition(".")
            shapes[f"{part}_no{'.' + rest if rest else ''}"] = shape
    if "positional_embedding" not in shapes:
        raise TrainError(f"{path}: no 'positional_embedding' tensor: not an open_clip CLIP checkpoint")
    shapes["prompt_no"] = (NUM_PROMPTS, *shapes["positional_embedding"])
    try:
        return infer_config(shapes, NUM_PROMPTS)
    except ClipnError as exc:
        raise TrainError(f"{path}: {exc}") from None
