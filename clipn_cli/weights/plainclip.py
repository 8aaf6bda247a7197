"""A plain open_clip CLIP (no "no" tower) as `--weights`: MCM, MSP/MaxLogit/Energy, NegLabel and CSP
work with it; CTW and ATD, which need CLIPN's "no" tower, are refused.

Spellings of `--weights`:
- `MODEL:TAG`, an open_clip model and pretrained tag (`ViT-B-16:laion2b_s34b_b88k`): open_clip
  downloads the weights on first use and caches them in its own cache;
- `MODEL:FILE` or `CONFIG.json:FILE`: a local open_clip checkpoint (a state dict in `.pt`/`.bin`,
  read with `weights_only=True`, or `.safetensors`) of that open_clip model or model config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ClipnError, WeightsError

KIND = "open_clip"


def _clip_class() -> type:
    import open_clip

    class PlainCLIP(open_clip.model.CLIP):
        """open_clip's CLIP with the interface clipn's pipeline uses (`encode_text_yes`, `has_no`)."""

        has_no = False

        @property
        def has_text(self) -> bool:
            return self.transformer is not None

        def require_text(self) -> None:
            if not self.has_text:
                raise ClipnError("this CLIP was loaded without its text tower")

        def encode_text_yes(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            return self.encode_text(tokens, normalize=normalize)

    return PlainCLIP


def parse_spec(weights: str | os.PathLike[str] | None) -> tuple[str, str] | None:
    """(model name or config file, tag or checkpoint file) when `weights` names a plain open_clip CLIP."""
    if weights is None:
        return None
    text = str(weights)
    if os.path.exists(text) or ":" not in text:
        return None
    model, _, source = text.partition(":")
    if not model or not source:
        return None
    if model.endswith(".json") or Path(source).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        return model, source
    import open_clip

    return (model, source) if model in open_clip.list_models() else None


def model_config(model: str) -> dict[str, Any]:
    """The open_clip config of a model name, or of a JSON config file."""
    if model.endswith(".json"):
        from ..model.configs import resolve_config

        return resolve_config(model)  # bounded, depth-limited read; types and sizes checked (ConfigError names the file)
    import open_clip

    from ..model.configs import validate_config

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise WeightsError(f"'{model}' is not an open_clip model (see open_clip.list_models())")
    return validate_config(cfg, model)  # a bundled config too: its arithmetic and size before any build


def load_plain_clip(spec: tuple[str, str], device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, WeightsInfo) of a plain open_clip CLIP; the fingerprint hashes its tensors."""
    from .format import WeightsInfo, _all_finite, fingerprint, read_checkpoint

    name, source = spec
    cfg = model_config(name)
    PlainCLIP = _clip_class()
    if Path(source).is_file() or Path(source).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        if Path(source).suffix == ".safetensors":
            from ..safetensors_file import SafetensorsError, SafetensorsFile

            try:
                with SafetensorsFile(source) as sf:  # bounded, depth-limited header, one descriptor
                    tensors = {k: v.clone() for k, v in sf.tensors().items()}
            except (SafetensorsError, OSError) as exc:
                raise WeightsError(f"{source}: not a readable safetensors file: {str(exc)[:200]}") from None
        else:
            tensors = read_checkpoint(source)
        if "prompt_no" in tensors:
            raise WeightsError(f"{source}: a CLIPN checkpoint, not a plain CLIP: convert it with 'clipn convert'")
        from ..model.configs import check_config_fits, validate_config

        # before building: a config declaring more than the file holds would build for minutes
        check_config_fits(validate_config(cfg, name), {k: tuple(v.shape) for k, v in tensors.items()}, source)
        for key, value in tensors.items():  # as for CLIPN weights: NaN/Inf would make every score NaN
            if value.is_floating_point() and not _all_finite(value):
                raise WeightsError(f"{source}: tensor '{key[:80]}' contains NaN or Inf values")
        try:
            model = PlainCLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
            model.load_state_dict(tensors, strict=True)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{source}: does not fit open_clip model '{name}': {str(exc).splitlines()[0][:200]}") from None
        where = source
    else:
        import logging

        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(name)
        if source.lower().replace("-", "_") not in {t.lower().replace("-", "_") for t in tags}:  # as open_clip matches
            shown = ", ".join(tags[:6]) + (f", ... ({len(tags)} in all)" if len(tags) > 6 else "")
            raise WeightsError(f"{name}:{source}: open_clip has no pretrained tag '{source[:80]}' for {name} (tags: {shown or 'none'})")
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)  # open_clip logs its failures on the root logger, then raises
        try:
            model = open_clip.create_model(name, pretrained=source)
        except Exception as exc:  # no network, damaged download: one line
            raise WeightsError(f"{name}:{source}: open_clip could not load it ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        finally:
            logging.disable(previous)
        if type(model) is not open_clip.model.CLIP:
            raise WeightsError(f"{name}: only open_clip CLIP models with the built-in text tower are supported (got {type(model).__name__})")
        model.__class__ = PlainCLIP
        tensors = model.state_dict()
        where = f"{name}:{source}"
    info = WeightsInfo(Path(where), dict(cfg), name, 0, fingerprint(tensors), {"kind": KIND, "source": where})
    return model.to(device).eval(), info
