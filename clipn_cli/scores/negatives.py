"""Negative labels (NegLabel, ICLR 2024; CSP, NeurIPS 2024) as pure tensor functions.

Mining: every candidate word's affinity to the ID classes is a percentile (0.95) of its cosines to
them; nouns and adjectives are ranked apart, ascending, and the lowest fraction (15%) of each kind
is kept, nouns first. CSP also pushes a candidate whose highest cosine to any ID class exceeds
0.95 to the top of the ranking (it can never be kept).

Scoring: the negatives are shuffled by a permutation seeded with 0 and split into 100 groups
(the last `M mod 100` negatives, before shuffling, are dropped); per group, the ID probability mass
of a softmax over [ID, group] of the cosines / 0.01 (logits 100·cos); the score is the mean over
groups, higher = more ID. The official code draws the permutation with `torch.randperm` on a CUDA
device after seeding 0, and the CUDA generator gives another permutation than the CPU one for the
same seed: `group_permutation` uses the generator of the device it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PERCENTILE = 0.95
FRACTION = 0.15
GROUPS = 100
TEMPERATURE = 0.01
SEED = 0
CSP_MAX_COSINE = 0.95
QUANTILE_ROWS = 1000  # torch.quantile refuses inputs over 2**24 elements: rank in row chunks


def affinity(candidates: torch.Tensor, id_heads: torch.Tensor, percentile: float = PERCENTILE, max_cosine: float | None = None) -> torch.Tensor:
    """(M,) the `percentile` quantile (linear interpolation) of each candidate's cosines to the ID heads.

    With `max_cosine` (CSP), a candidate whose highest cosine exceeds it gets affinity 1.0.
    Inputs are unit rows.
    """
    out = []
    ids = id_heads.float().T
    for start in range(0, len(candidates), QUANTILE_ROWS):
        cos = candidates[start : start + QUANTILE_ROWS].float() @ ids
        found = torch.quantile(cos, q=percentile, dim=-1)
        if max_cosine is not None:
            found[cos.max(dim=-1).values > max_cosine] = 1.0
        out.append(found)
    return torch.cat(out) if out else torch.empty(0)


def select_lowest(affinities: torch.Tensor, is_adjective: torch.Tensor, fraction: float = FRACTION) -> torch.Tensor:
    """Indices of the kept candidates: per kind the int(n·fraction) lowest affinities, ascending, nouns first.

    Ties keep candidate order (a stable sort; the official argsort is unstable, which matters only
    for exactly equal affinities).
    """
    kept = []
    for adjective in (False, True):
        members = torch.nonzero(is_adjective == adjective).flatten()
        order = torch.argsort(affinities[members], stable=True)
        kept.append(members[order[: int(len(members) * fraction)]])
    return torch.cat(kept)


def group_permutation(count: int, groups: int = GROUPS, device: str | torch.device = "cpu", seed: int = SEED) -> torch.Tensor:
    """The official shuffle of the `count − count mod groups` kept negatives, as CPU int64 indices.

    Drawn by the generator of `device` (CUDA; anything else: the CPU's) seeded with `seed`, as
    `torch.manual_seed(0); torch.randperm(n, device=...)` draws it: on CUDA this is the official
    permutation.
    """
    device = torch.device(device)
    if device.type != "cuda":  # the official code knows only CUDA; any other device draws as the CPU does
        device = torch.device("cpu")
    kept = count - count % groups
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randperm(kept, generator=generator, device=device).cpu()


def grouped_id_mass(id_logits: torch.Tensor, negative_logits: torch.Tensor, permutation: torch.Tensor, groups: int = GROUPS) -> torch.Tensor:
    """(N,) mean over groups of the ID mass of softmax([ID logits, group's negative logits]).

    Logits are cosines / temperature. Per group the mass is sigmoid(lse(ID) − lse(group)), the same
    quantity as the official per-group softmax sum, computed without materialising the softmax.
    """
    grouped = negative_logits[:, permutation.to(negative_logits.device)].reshape(len(id_logits), groups, -1)
    lse_id = torch.logsumexp(id_logits, dim=-1, keepdim=True)
    lse_group = torch.logsumexp(grouped, dim=-1)
    return torch.sigmoid(lse_id - lse_group).mean(dim=-1)


def grouped_atd(
    logits_yes: torch.Tensor, p_yes: torch.Tensor, negative_logits: torch.Tensor, permutation: torch.Tensor, groups: int = GROUPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATD with the negative labels as extra known classes (experimental): (score, best), both (N,).

    Per group g, p^g = softmax over [ID classes, group g's negatives] of the yes logits; the ID
    score is Σ_c p_yes_c · p^g_c over the ID classes only, so mass on a negative label counts as
    "unknown" like the "no" branch does; `best` is max_c p_yes_c · p^g_c. Both are averaged over
    groups; the rule says OOD iff 1 − score > best, ATD's own threshold-free test.
    """
    grouped = negative_logits[:, permutation.to(negative_logits.device)].reshape(len(logits_yes), groups, -1)
    lse = torch.logaddexp(torch.logsumexp(logits_yes, dim=-1, keepdim=True), torch.logsumexp(grouped, dim=-1))  # (N, G)
    joint = p_yes[:, None, :] * torch.exp(logits_yes[:, None, :] - lse[..., None])  # (N, G, C)
    return joint.sum(dim=-1).mean(dim=-1), joint.max(dim=-1).values.mean(dim=-1)


@dataclass
class NegativePool:
    """Mined negative labels of one method for one class list: the words, their unit yes-tower
    embeddings, and the method's own unit ID heads (its prompts differ from the CLIPN heads')."""

    name: str  # "neglabel" or "csp"
    words: list[str]
    negatives: torch.Tensor  # (M, D)
    id_heads: torch.Tensor  # (C, D)

    def digest(self) -> str:
        """SHA-256 of the words, in order: with the weights and classes, what decides the pool's scores."""
        import hashlib

        return hashlib.sha256("\n".join(self.words).encode("utf-8", "surrogateescape")).hexdigest()
