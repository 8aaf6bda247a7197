"""The CLIPN network: an open_clip CLIP plus a second, "no" text tower with learnable prompts.

Attribute names follow the official code (`transformer_no`, `token_embedding_no`, ... `prompt_no`),
so `state_dict()` keys are exactly the official checkpoint's keys without the DDP `module.` prefix
and strict loading needs no renaming table.
"""

from __future__ import annotations

import copy
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipnError, ConfigError

NUM_PROMPTS = 16  # learnable "no" prompts in the official model
TEXT_PARTS = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")
TEXT_ATTRS = (*TEXT_PARTS, *(f"{name}_no" for name in TEXT_PARTS), "prompt_no")


def is_text_key(key: str) -> bool:
    """Whether a state-dict key belongs to one of the two text towers (prompts included)."""
    return key.split(".", 1)[0] in TEXT_ATTRS


def causal_mask(length: int) -> torch.Tensor:
    """Additive causal attention mask: -inf above the diagonal, as open_clip builds it."""
    return torch.full((length, length), float("-inf")).triu_(1)


class CLIPN(open_clip.model.CLIP):
    """CLIP with a "no" text tower: same architecture, own weights, plus `prompt_no`.

    The "no" tower adds a prompt (16 × context × width) to the token + positional embeddings at
    every position. In eval mode that prompt is the mean of the 16; in training mode each text
    gets one of the 16 or their mean, uniformly at random, as the official code does.
    """

    has_no = True  # a plain CLIP (`plainclip`) has no "no" tower

    def __init__(self, model_cfg: dict[str, Any], num_prompts: int = NUM_PROMPTS) -> None:
        cfg = dict(model_cfg)
        super().__init__(
            embed_dim=cfg["embed_dim"],
            vision_cfg=cfg["vision_cfg"],
            text_cfg=cfg["text_cfg"],
            quick_gelu=cfg.get("quick_gelu", False),
        )
        self.model_cfg = cfg
        self.num_prompts = num_prompts
        for name in TEXT_PARTS:
            setattr(self, f"{name}_no", copy.deepcopy(getattr(self, name)))
        context, width = self.positional_embedding.shape
        self.prompt_no = nn.Parameter(torch.zeros(num_prompts, context, width))

    @property
    def has_text(self) -> bool:
        """False for an image-only model (`drop_text_towers`), which can score but not embed classes."""
        return self.transformer is not None

    def drop_text_towers(self) -> None:
        """Remove both text towers and the prompts: for scoring with cached class embeddings.

        They are ~60% of a ViT-B-16 CLIPN; without them a half-precision file needs no fp32 copy
        of them and a GPU run does not hold them in device memory.
        """
        for name in TEXT_ATTRS:
            setattr(self, name, None)

    def require_text(self) -> None:
        if not self.has_text:
            raise ClipnError("this model was loaded without its text towers (text=False): it can score "
                             "images against cached class embeddings but cannot embed class names")

    def encode_text_yes(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Standard CLIP text features."""
        self.require_text()
        return self._encode_text(tokens, suffix="", prompt=None, normalize=normalize)

    def encode_text_no(
        self, tokens: torch.Tensor, normalize: bool = False, prompt_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """"No" text features: the same tokens through the "no" tower with the added prompt.

        `prompt_index` (one per text, in 0..num_prompts, where num_prompts means the mean) fixes
        the training-mode choice, so a trainer can draw it from its own seeded generator.
        """
        self.require_text()
        if self.training or prompt_index is not None:
            choice = prompt_index if prompt_index is not None else torch.randint(0, self.num_prompts + 1, (tokens.shape[0],), device=tokens.device)
            prompts = torch.cat([self.prompt_no, self.prompt_no.mean(0, keepdim=True)], dim=0)
            prompt = prompts[choice.to(prompts.device)]
        else:
            prompt = self.prompt_no.mean(0)
        return self._encode_text(tokens, suffix="_no", prompt=prompt, normalize=normalize)

    def _encode_text(
        self, tokens: torch.Tensor, suffix: str, prompt: torch.Tensor | None, normalize: bool
    ) -> torch.Tensor:
        """Encode tokens with the tower named by `suffix`, cut to the batch's longest text.

        With a causal mask and pooling at the end-of-text token, positions after the last
        end-of-text token cannot affect the result, so computing only up to it is exact.
        """
        eot = tokens.argmax(dim=-1)
        length = int(eot.max().item()) + 1
        tokens = tokens[:, :length]
        cast_dtype = self.transformer.get_cast_dtype()
        x = getattr(self, f"token_embedding{suffix}")(tokens).to(cast_dtype)
        x = x + getattr(self, f"positional_embedding{suffix}")[:length].to(cast_dtype)
        if prompt is not None:
            x = x + prompt[..., :length, :].to(cast_dtype)
        mask = causal_mask(length).to(device=x.device, dtype=x.dtype)
        x = getattr(self, f"transformer{suffix}")(x, attn_mask=mask)
        x = getattr(self, f"ln_final{suffix}")(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        x = x @ getattr(self, f"text_projection{suffix}")
        return F.normalize(x, dim=-1) if normalize else x

    def forward(  # type: ignore[override]
        self, image: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized image, yes-text and no-text features and the logit scale, as the official forward."""
        return (
            self.encode_image(image, normalize=True),
            self.encode_text_yes(tokens, normalize=True),
            self.encode_text_no(tokens, normalize=True),
            self.logit_scale.exp(),
        )


def build_model(model_cfg: dict[str, Any], num_prompts: int = NUM_PROMPTS, device: str | torch.device = "cpu") -> CLIPN:
    """Build a CLIPN with freshly initialised weights; on `meta` no memory is allocated."""
    try:
        with torch.device(device):
            return CLIPN(model_cfg, num_prompts=num_prompts)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as exc:
        raise ConfigError(f"the model config does not build a CLIP ({type(exc).__name__}: {exc})") from None


def expected_shapes(model_cfg: dict[str, Any], num_prompts: int = NUM_PROMPTS) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a CLIPN of this architecture holds (computed without memory)."""
    model = build_model(model_cfg, num_prompts, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
