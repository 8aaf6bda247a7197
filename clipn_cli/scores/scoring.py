"""CLIPN decision rules and the official baselines as pure array functions (no I/O, no devices).

Notation: f image features, yes/no the class heads (all L2-normalized), s = cos(f, yes),
s̄ = cos(f, no). Logits are `scale`·s and `scale`·s̄ with the official inference scale 100.
The formulas take torch tensors or NumPy arrays (`arrays`: the same torch calls as always for a
tensor); the negative-label pools are torch only. Importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import arrays as xp
from . import methods
from .arrays import unit
from .methods import Scores  # made here, read by the table: it lives there (no import circle)

if TYPE_CHECKING:
    import torch

INFERENCE_SCALE = 100.0  # hard-coded in the official inference, not the checkpoint's logit_scale
RULES = methods.VERDICT_RULES


class PoolSource(Protocol):
    """A negative-label pool as `heads.embeddings` builds it: what `Heads.prepare` reads of it."""

    negatives: torch.Tensor  # (M, D)
    id_heads: torch.Tensor  # (C, D)


class HeadSource(Protocol):
    """Class heads as `heads.embeddings.ClassEmbeddings` holds them (scores/ does not import heads/)."""

    text_yes: torch.Tensor  # (C, D)
    text_no: torch.Tensor | None  # None for a plain CLIP

    @property
    def negatives(self) -> Mapping[str, PoolSource]: ...


def clipn_logits(
    image_features: torch.Tensor, text_yes: torch.Tensor, text_no: torch.Tensor, scale: float = INFERENCE_SCALE,
    heads_normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cosine logits of both heads; inputs are re-normalized as the official classifier does.

    `heads_normalized=True` says the heads already went through `unit` (`Heads`): normalising them
    again per batch cost 127 of 198 ms per batch of 12 images at 50,000 classes, for the same bits.
    """
    f = unit(image_features)
    yes, no = (text_yes, text_no) if heads_normalized else (unit(text_yes), unit(text_no))
    return scale * f @ yes.T, scale * f @ no.T


def scores_from_logits(logits_yes: torch.Tensor, logits_no: torch.Tensor | None, extra: dict[str, torch.Tensor] | None = None) -> Scores:
    """All CLIPN scores and baselines from the two logit matrices (only the baselines without `logits_no`)."""
    probs = xp.softmax(logits_yes)
    pred = xp.argmax(logits_yes)
    baselines = {"msp": xp.row_max(probs), "max_logit": xp.row_max(logits_yes), "energy": xp.logsumexp(logits_yes),
                 "extra": {} if extra is None else extra}
    if logits_no is None:
        return Scores(logits_yes, None, None, probs, pred, None, None, None, None, **baselines)
    p_yes = xp.pair_first(logits_yes, logits_no)
    joint = p_yes * probs
    atd = xp.row_sum(joint)
    return Scores(
        logits_yes=logits_yes,
        logits_no=logits_no,
        p_yes=p_yes,
        probs=probs,
        pred=pred,
        ctw=xp.take(p_yes, pred),
        atd=atd,
        p_ood=1.0 - atd,
        atd_best=xp.row_max(joint),
        **baselines,
    )


def score(
    image_features: torch.Tensor, text_yes: torch.Tensor, text_no: torch.Tensor, scale: float = INFERENCE_SCALE
) -> Scores:
    """CLIPN scores of image features against class heads."""
    return scores_from_logits(*clipn_logits(image_features, text_yes, text_no, scale))


def mcm(image_features: torch.Tensor, text_yes: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MCM (Ming et al. 2022): max softmax of cosines divided by `temperature` (1 is standard)."""
    import torch

    f = torch.nn.functional.normalize(image_features.float(), dim=-1)
    yes = torch.nn.functional.normalize(text_yes.float(), dim=-1)
    return ((f @ yes.T) / temperature).softmax(dim=-1).max(dim=-1).values


@dataclass(frozen=True)
class PreparedPool:
    """A negative-label pool ready to score: unit rows and its group permutation, made once."""

    negatives: torch.Tensor  # (M, D)
    id_heads: torch.Tensor  # (C, D)
    permutation: torch.Tensor  # (M − M mod GROUPS,)


@dataclass(frozen=True)
class Heads:
    """Class heads and negative-label pools normalised once, for scoring batch after batch.

    `permutation_device` picks the generator of the groups' permutation: the official code draws
    it on CUDA, so pass the model's device to be bit-exact there (see `negatives`).
    """

    yes: torch.Tensor
    no: torch.Tensor | None  # None for a plain CLIP
    pools: dict[str, PreparedPool]

    @classmethod
    def prepare(cls, embeddings: HeadSource, permutation_device: str | torch.device = "cpu") -> Heads:
        from . import negatives

        pools = {
            name: PreparedPool(unit(pool.negatives), unit(pool.id_heads), negatives.group_permutation(len(pool.negatives), device=permutation_device))
            for name, pool in embeddings.negatives.items()
        }
        return cls(unit(embeddings.text_yes), None if embeddings.text_no is None else unit(embeddings.text_no), pools)

    @property
    def methods(self) -> tuple[methods.Method, ...]:
        """The methods these heads can compute."""
        return methods.available(tuple(self.pools), has_no=self.no is not None)


def score_heads(image_features: torch.Tensor, heads: Heads, scale: float = INFERENCE_SCALE) -> Scores:
    """Every method `heads` can compute (`Heads.methods`), for a batch of image features."""
    f = unit(image_features)
    logits_yes = scale * f @ heads.yes.T
    logits_no = None if heads.no is None else scale * f @ heads.no.T  # = clipn_logits(..., heads_normalized=True)
    extra = {"mcm": xp.row_max(xp.softmax(f @ heads.yes.T))}  # = mcm(f, yes), heads normalised once
    scores = scores_from_logits(logits_yes, logits_no, extra)
    if not heads.pools:
        return scores
    from . import negatives

    inverse_t = 1.0 / negatives.TEMPERATURE  # 100.0: logits as the official 100.0 * f @ heads.T
    for name, pool in heads.pools.items():
        negative_logits = inverse_t * f @ pool.negatives.T
        extra[name] = negatives.grouped_id_mass(inverse_t * f @ pool.id_heads.T, negative_logits, pool.permutation)
        if name == "neglabel" and scores.p_yes is not None:
            extra["atd_neg"], extra["atd_neg_best"] = negatives.grouped_atd(
                logits_yes, scores.p_yes, negative_logits if scale == inverse_t else scale * f @ pool.negatives.T, pool.permutation)
    return scores
