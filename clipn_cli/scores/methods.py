"""The one table of score methods: scoring, detection records, output columns, evaluation, plots and
the CLI's `--rule` choices all read it, so a new method is one entry here plus its formula.

Every score is "higher = more ID". A method with a `verdict` says ID/OOD by itself (threshold-free);
the others need a threshold (`clipn detect --threshold`, e.g. `thr@95%ID` from `clipn eval`).
`needs_no` methods use CLIPN's "no" tower; `pool` names the negative-label pool a method uses.
`Scores`, what a method reads, lives here too so that `scoring` (which makes it) and this table
(which reads it) need no circle. No torch imported here: the table is read by `--help` and option checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import RuleError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Scores:
    """Every per-image quantity of CLIPN and the baselines; leading dimension = images."""

    logits_yes: torch.Tensor  # (N, C) scale · cos(f, yes_c)
    logits_no: torch.Tensor | None  # (N, C) scale · cos(f, no_c); None (and so the CLIPN rules) for a plain CLIP
    p_yes: torch.Tensor | None  # (N, C) softmax over the (yes, no) pair, "yes" entry
    probs: torch.Tensor  # (N, C) softmax over classes of logits_yes
    pred: torch.Tensor  # (N,) argmax class of the yes head
    ctw: torch.Tensor | None  # (N,) p_yes at the predicted class; OOD iff < 0.5
    atd: torch.Tensor | None  # (N,) Σ_c p_yes_c · p_c
    p_ood: torch.Tensor | None  # (N,) 1 − atd, the (C+1)-th "unknown" probability of ATD
    atd_best: torch.Tensor | None  # (N,) max_c p_yes_c · p_c; ATD says OOD iff p_ood > this
    msp: torch.Tensor  # (N,) max softmax probability
    max_logit: torch.Tensor  # (N,) max of logits_yes
    energy: torch.Tensor  # (N,) logsumexp of logits_yes (higher = more ID)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # (N,) scores of the other methods (mcm, neglabel, ...)

    def is_ood(self, rule: str) -> torch.Tensor:
        """Threshold-free verdicts (`TABLE`): True where the image is out of distribution."""
        method = BY_NAME.get(rule)
        if method is None or method.verdict is None:
            raise RuleError(f"unknown rule '{rule}' (expected one of {', '.join(VERDICT_RULES)})")
        return method.verdict(self)

    def value(self, method: str) -> torch.Tensor:
        """(N,) the score of `method` (higher = more ID)."""
        return get(method).value(self)


@dataclass(frozen=True)
class Method:
    """One score method and what it needs."""

    name: str  # key in evaluation reports, `--rule` value
    label: str  # what tables and plots call it
    color: str  # its colour in plots
    value: Callable[[Scores], Any]  # (N,) score tensor, higher = more ID
    record: str | None = None  # field of detection records (None: evaluation only)
    verdict: Callable[[Scores], Any] | None = None  # (N,) bool, True = OOD; None: needs a threshold
    needs_no: bool = False  # uses the "no" tower (CLIPN weights only)
    pool: str | None = None  # negative-label pool it scores against
    experimental: bool = False
    description: str = ""

    @property
    def threshold_free(self) -> bool:
        return self.verdict is not None


def gen(probs: torch.Tensor, gamma: float = 0.1, top: int = 100) -> torch.Tensor:
    """GEN (Liu et al., CVPR 2023): −Σ p_j^γ (1 − p_j)^γ over the min(`top`, classes) largest softmax
    probabilities, the negated generalized entropy (higher = more ID); γ = 0.1, M = 100 as the paper's ImageNet setting."""
    p = probs.double().topk(min(top, probs.shape[-1]), dim=-1).values
    return -(p.pow(gamma) * (1.0 - p).pow(gamma)).sum(dim=-1)


def _extra(name: str) -> Callable[[Scores], Any]:
    return lambda s: s.extra[name]


TABLE: tuple[Method, ...] = (
    Method("ctw", "CTW", "#9467bd", lambda s: s.ctw, "ctw_score", lambda s: s.ctw < 0.5, needs_no=True,
           description="competing-to-win: p_yes at the predicted class; OOD iff < 0.5"),
    Method("atd", "ATD", "#2ca02c", lambda s: s.atd, "atd_score", lambda s: s.p_ood > s.atd_best, needs_no=True,
           description="agreeing-to-differ: Σ_c p_yes_c·p_c; OOD iff 1 − that > max_c p_yes_c·p_c"),
    Method("msp", "MSP", "#ff7f0e", lambda s: s.msp, "msp", description="max softmax probability (logits 100·cos)"),
    Method("max_logit", "MaxLogit", "#8c564b", lambda s: s.max_logit, "max_logit", description="max logit"),
    Method("energy", "Energy", "#e377c2", lambda s: s.energy, "energy", description="logsumexp of the logits"),
    Method("mcm", "MCM", "#17becf", _extra("mcm"), description="max softmax of cosines (temperature 1)"),
    Method("gen", "GEN", "#393b79", lambda s: gen(s.probs),
           description="generalized entropy of the top-100 softmax probabilities, γ = 0.1 (CVPR 2023)"),
    Method("neglabel", "NegLabel", "#bcbd22", _extra("neglabel"), "neglabel_score", pool="neglabel",
           description="grouped ID probability mass against ~10k WordNet negative labels (ICLR 2024)"),
    Method("csp", "CSP", "#7f7f7f", _extra("csp"), "csp_score", pool="csp",
           description="NegLabel's score with the conjugated semantic pool (NeurIPS 2024)"),
    Method("atd_neg", "ATD+NegLabel", "#1a9850", _extra("atd_neg"), "atd_neg_score",
           lambda s: 1.0 - s.extra["atd_neg"] > s.extra["atd_neg_best"], needs_no=True, pool="neglabel", experimental=True,
           description="experimental: ATD with NegLabel's negatives as extra known classes; threshold-free"),
)
BY_NAME = {m.name: m for m in TABLE}
RULES = tuple(m.name for m in TABLE if m.record is not None)  # what `detect --rule` accepts
VERDICT_RULES = tuple(m.name for m in TABLE if m.threshold_free)
POOLS = tuple(dict.fromkeys(m.pool for m in TABLE if m.pool))
EXTRA_RECORD_FIELDS = {"atd": ("p_ood", lambda s: s.p_ood)}  # companion fields written after a method's own
CLASSIC = tuple(m.name for m in TABLE if m.pool is None)  # need no negative labels


def get(name: str) -> Method:
    """The method called `name`, or a ValueError naming the choices."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise RuleError(f"unknown method '{name}' (expected one of {', '.join(BY_NAME)})") from None


def label(name: str) -> str:
    """What tables and plots call method `name` (the name itself if the table lacks it)."""
    return BY_NAME[name].label if name in BY_NAME else name


def available(pools: tuple[str, ...] | list[str] = (), has_no: bool = True) -> tuple[Method, ...]:
    """The methods that can be computed with these negative-label pools and model."""
    return tuple(m for m in TABLE if (m.pool is None or m.pool in pools) and (has_no or not m.needs_no))


def record_fields(methods: tuple[Method, ...] | None = None) -> tuple[str, ...]:
    """Detection-record score fields of `methods` (all by default), in table order."""
    fields: list[str] = []
    for m in TABLE if methods is None else methods:
        if m.record:
            fields.append(m.record)
            if m.name in EXTRA_RECORD_FIELDS:
                fields.append(EXTRA_RECORD_FIELDS[m.name][0])
    return tuple(fields)


def check_rule(rule: str, pools: tuple[str, ...], threshold: float | None = None, has_no: bool = True) -> None:
    """A ValueError unless `rule` can give verdicts with these negative-label pools (and `threshold`)."""
    method = get(rule)
    if method.needs_no and not has_no:
        raise RuleError(f"rule '{rule}' needs CLIPN's \"no\" tower, which a plain CLIP does not have: "
                         f"use --rule {' or '.join(m.name for m in available(POOLS, has_no=False) if m.record)} with --threshold")
    if method.record is None:
        raise RuleError(f"'{rule}' is an evaluation score, not a detection rule (choose one of {', '.join(RULES)})")
    if method.pool is not None and method.pool not in pools:
        raise RuleError(f"rule '{rule}' needs the '{method.pool}' negative labels: build them with --negatives {method.pool} "
                         "(or 'clipn embed-classes --negatives')")
    if method.verdict is None and threshold is None:
        raise RuleError(f"rule '{rule}' has no threshold-free verdict: give --threshold T (e.g. thr@95%ID from 'clipn eval')")
