"""CLIPN's training losses as pure tensor functions: ITBO (L_yes, L_no) and TSO.

Notation as in the official `open_clip/loss.py`: f image features, g "yes" text features,
ḡ "no" text features (all L2-normalized, rows = the global batch), σ the logit scale.
p_ij = softmax over the pair (σ⟨f_i,g_j⟩, σ⟨f_i,ḡ_j⟩), taking the "yes" entry.

The official code takes -log of the softmax, which overflows to inf once the two logits differ
by more than ~100 in fp32; we use log-sigmoid of the logit difference, which is the same number
wherever the official one is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TSO_EPS = 1e-4  # official epsilon: keeps the square root's gradient finite when ḡ = g


@dataclass(frozen=True)
class LossTerms:
    """The three CLIPN loss terms and their official combination 0.5·(L_yes + L_no + L_TSO)."""

    total: torch.Tensor
    yes: torch.Tensor
    no: torch.Tensor
    tso: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        values = torch.stack([self.total, self.yes, self.no, self.tso]).detach().float().tolist()
        return dict(zip(("loss", "yes", "no", "tso"), values))


def negative_pairs(n: int, caption_ids: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (n, n) mask of the pairs L_no treats as "no": i ≠ j, and different captions if ids are given.

    Two samples with the same caption are not true negatives: the official code still counts them.
    """
    mask = ~torch.eye(n, dtype=torch.bool, device=device)
    if caption_ids is not None:
        ids = caption_ids.to(device)
        mask &= ids[:, None] != ids[None, :]
    return mask


def itbo_loss(
    image: torch.Tensor,
    text_yes: torch.Tensor,
    text_no: torch.Tensor,
    scale: torch.Tensor | float,
    negatives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text binary-opposite loss: L_yes = −mean_i log p_ii, L_no = −mean over negatives of log(1 − p_ij).

    `negatives` defaults to every off-diagonal pair (the official choice); with a mask that
    leaves no negative at all, L_no is 0.
    """
    logits_yes = scale * image @ text_yes.T
    logits_no = scale * image @ text_no.T
    margin = logits_yes - logits_no  # p_ij = sigmoid(margin_ij)
    l_yes = -F.logsigmoid(margin.diagonal()).mean()
    if negatives is None:
        negatives = negative_pairs(margin.shape[0], device=margin.device)
    log_not = F.logsigmoid(-margin)
    count = negatives.sum()
    l_no = -(log_not * negatives).sum() / count.clamp(min=1)
    return l_yes, l_no


def tso_loss(text_yes: torch.Tensor, text_no: torch.Tensor) -> torch.Tensor:
    """Text semantic-opposite loss, official "L2" mode: mean_j 2 − sqrt(2 − 2⟨g_j, ḡ_j⟩ + 1e-4)."""
    distance = 2 - 2 * (text_yes * text_no).sum(-1) + TSO_EPS
    return (2 - torch.sqrt(distance)).mean()


def clipn_loss(
    image: torch.Tensor,
    text_yes: torch.Tensor,
    text_no: torch.Tensor,
    scale: torch.Tensor | float,
    caption_ids: torch.Tensor | None = None,
) -> LossTerms:
    """Total CLIPN loss 0.5·(L_yes + L_no + L_TSO); pass `caption_ids` to drop same-caption pairs from L_no."""
    negatives = negative_pairs(image.shape[0], caption_ids, image.device) if caption_ids is not None else None
    l_yes, l_no = itbo_loss(image, text_yes, text_no, scale, negatives)
    l_tso = tso_loss(text_yes, text_no)
    return LossTerms(0.5 * (l_yes + l_no + l_tso), l_yes, l_no, l_tso)
