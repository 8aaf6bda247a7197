"""CLIPN losses against a literal transcription of the official formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipn_cli.training.losses import clipn_loss, itbo_loss, negative_pairs, tso_loss


def _features(n: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1) for _ in range(3))  # type: ignore[return-value]


def _official(image, text, text_no, scale):
    """The official ClipLoss (world_size > 1, local_loss=False) written out with softmax and -log."""
    n = image.shape[0]
    pair = torch.stack([scale * image @ text.T, scale * image @ text_no.T], dim=-1).softmax(dim=-1)
    eyes = torch.eye(n, dtype=image.dtype)
    loss_bin = -torch.log(eyes * pair[..., 0] + (1 - eyes) * pair[..., 1])
    l_yes = (eyes * loss_bin).sum() / n
    l_no = ((1 - eyes) * loss_bin).sum() / (n * n - n)
    l_tso = (2 - torch.sqrt(2 - 2 * (text * text_no).sum(-1) + 1e-4)).mean()
    return l_yes, l_no, l_tso, 0.5 * (l_yes + l_no + l_tso)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_matches_official_formula(scale: float) -> None:
    image, text, text_no = _features()
    terms = clipn_loss(image, text, text_no, scale)
    expected = _official(image, text, text_no, scale)
    for got, want in zip((terms.yes, terms.no, terms.tso, terms.total), expected):
        assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)


def test_initial_values_when_no_tower_copies_yes_tower() -> None:
    """At initialisation ḡ = g: p = 0.5 everywhere, so L_yes = L_no = ln 2 and L_TSO = 2 − √1e-4."""
    image, text, _ = _features()
    terms = clipn_loss(image, text, text.clone(), 100.0)
    assert terms.yes.item() == pytest.approx(math.log(2))
    assert terms.no.item() == pytest.approx(math.log(2))
    assert terms.tso.item() == pytest.approx(1.99)
    assert terms.total.item() == pytest.approx(0.5 * (2 * math.log(2) + 1.99))


def test_stable_where_official_overflows() -> None:
    """Margins of 200 logits: the official -log(softmax) gives inf in fp32, ours the exact value."""
    image = torch.eye(3)
    text, text_no = -image.clone(), image.clone()
    l_yes, l_no = itbo_loss(image, text, text_no, 100.0)
    assert math.isinf(_official(image, text, text_no, 100.0)[0].item())
    assert l_yes.item() == pytest.approx(200.0, rel=1e-6)
    assert l_no.item() == pytest.approx(math.log(2), rel=1e-6)  # off-diagonal logits are 0 on both heads


def test_same_caption_pairs_excluded_from_l_no() -> None:
    image, text, text_no = _features(n=5)
    ids = torch.tensor([7, 7, 3, 4, 7])
    mask = negative_pairs(5, ids)
    assert mask.sum().item() == 20 - 6  # 3 samples share caption 7: 6 ordered pairs drop out
    assert not mask[0, 1] and not mask[4, 0] and mask[0, 2] and not mask.diagonal().any()
    with_ids = clipn_loss(image, text, text_no, 10.0, caption_ids=ids)
    margin = 10.0 * (image @ text.T - image @ text_no.T)
    expected_no = -F.logsigmoid(-margin)[mask].mean()
    assert with_ids.no.item() == pytest.approx(expected_no.item(), rel=1e-12)
    assert with_ids.yes.item() == pytest.approx(clipn_loss(image, text, text_no, 10.0).yes.item())
    unique = clipn_loss(image, text, text_no, 10.0, caption_ids=torch.arange(5))
    assert unique.no.item() == pytest.approx(clipn_loss(image, text, text_no, 10.0).no.item(), rel=1e-12)


def test_all_same_caption_gives_zero_l_no() -> None:
    image, text, text_no = _features(n=3)
    terms = clipn_loss(image, text, text_no, 10.0, caption_ids=torch.zeros(3, dtype=torch.long))
    assert terms.no.item() == 0.0


def test_tso_range_and_minimum() -> None:
    _, text, _ = _features()
    assert tso_loss(text, -text).item() == pytest.approx(2 - math.sqrt(4 + 1e-4))
    assert tso_loss(text, text).item() == pytest.approx(2 - math.sqrt(1e-4))


def test_gradients_reach_only_the_no_features() -> None:
    image, text, text_no = _features()
    text_no = text_no.clone().requires_grad_(True)
    clipn_loss(image, text, text_no, 100.0).total.backward()
    assert text_no.grad is not None and text_no.grad.abs().sum() > 0
    assert not image.requires_grad and not text.requires_grad
