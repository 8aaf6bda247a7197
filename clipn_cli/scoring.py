"""CLIPN decision rules and the official baselines as pure tensor functions (no I/O, no devices).

Notation: f image features, yes/no the class heads (all L2-normalized), s = cos(f, yes),
s̄ = cos(f, no). Logits are `scale`·s and `scale`·s̄ with the official inference scale 100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INFERENCE_SCALE = 100.0  # hard-coded in the official inference, not the checkpoint's logit_scale
RULES = ("atd", "ctw")


@dataclass(frozen=True)
class Scores:
    """Every per-image quantity of CLIPN and the baselines; leading dimension = images."""

    logits_yes: torch.Tensor  # (N, C) scale · cos(f, yes_c)
    logits_no: torch.Tensor  # (N, C) scale · cos(f, no_c)
    p_yes: torch.Tensor  # (N, C) softmax over the (yes, no) pair, "yes" entry
    probs: torch.Tensor  # (N, C) softmax over classes of logits_yes
    pred: torch.Tensor  # (N,) argmax class of the yes head
    ctw: torch.Tensor  # (N,) p_yes at the predicted class; OOD iff < 0.5
    atd: torch.Tensor  # (N,) Σ_c p_yes_c · p_c
    p_ood: torch.Tensor  # (N,) 1 − atd, the (C+1)-th "unknown" probability of ATD
    atd_best: torch.Tensor  # (N,) max_c p_yes_c · p_c; ATD says OOD iff p_ood > this
    msp: torch.Tensor  # (N,) max softmax probability
    max_logit: torch.Tensor  # (N,) max of logits_yes
    energy: torch.Tensor  # (N,) logsumexp of logits_yes (higher = more ID)

    def is_ood(self, rule: str) -> torch.Tensor:
        """Threshold-free verdicts of the paper: True where the image is out of distribution."""
        if rule == "ctw":
            return self.ctw < 0.5
        if rule == "atd":
            return self.p_ood > self.atd_best
        raise ValueError(f"unknown rule '{rule}' (expected one of {RULES})")


def clipn_logits(
    image_features: torch.Tensor, text_yes: torch.Tensor, text_no: torch.Tensor, scale: float = INFERENCE_SCALE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cosine logits of both heads; inputs are re-normalized as the official classifier does."""
    f = torch.nn.functional.normalize(image_features.float(), dim=-1)
    yes = torch.nn.functional.normalize(text_yes.float(), dim=-1)
    no = torch.nn.functional.normalize(text_no.float(), dim=-1)
    return scale * f @ yes.T, scale * f @ no.T


def scores_from_logits(logits_yes: torch.Tensor, logits_no: torch.Tensor) -> Scores:
    """All CLIPN scores and baselines from the two logit matrices."""
    p_yes = torch.stack([logits_yes, logits_no], dim=-1).softmax(dim=-1)[..., 0]
    probs = logits_yes.softmax(dim=-1)
    pred = logits_yes.argmax(dim=-1)
    ctw = p_yes.gather(-1, pred[:, None])[:, 0]
    joint = p_yes * probs
    atd = joint.sum(dim=-1)
    return Scores(
        logits_yes=logits_yes,
        logits_no=logits_no,
        p_yes=p_yes,
        probs=probs,
        pred=pred,
        ctw=ctw,
        atd=atd,
        p_ood=1.0 - atd,
        atd_best=joint.max(dim=-1).values,
        msp=probs.max(dim=-1).values,
        max_logit=logits_yes.max(dim=-1).values,
        energy=torch.logsumexp(logits_yes, dim=-1),
    )


def score(
    image_features: torch.Tensor, text_yes: torch.Tensor, text_no: torch.Tensor, scale: float = INFERENCE_SCALE
) -> Scores:
    """CLIPN scores of image features against class heads."""
    return scores_from_logits(*clipn_logits(image_features, text_yes, text_no, scale))


def mcm(image_features: torch.Tensor, text_yes: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MCM (Ming et al. 2022): max softmax of cosines divided by `temperature` (1 is standard)."""
    f = torch.nn.functional.normalize(image_features.float(), dim=-1)
    yes = torch.nn.functional.normalize(text_yes.float(), dim=-1)
    return ((f @ yes.T) / temperature).softmax(dim=-1).max(dim=-1).values
