"""The few array operations the score formulas use, for torch tensors and NumPy arrays alike.

`scoring` and `outputs.records` write each formula once against these; a torch tensor takes
exactly the torch calls the formulas always made (the same bits as before), a NumPy array the
NumPy equivalents (float32 throughout), so the torch-free fast start scores with the same code.
Imports no torch: a tensor's own methods are called.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any  # a torch.Tensor or a numpy.ndarray


def is_numpy(x: Array) -> bool:
    return isinstance(x, np.ndarray)


def float32(x: Array) -> Array:
    return x.astype(np.float32, copy=False) if is_numpy(x) else x.float()


def unit(x: Array) -> Array:
    """float32 rows of length 1 (torch's `F.normalize`: divided by max(norm, 1e-12))."""
    if not is_numpy(x):
        import torch

        return torch.nn.functional.normalize(x.float(), dim=-1)
    x = float32(x)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def softmax(x: Array) -> Array:
    """Softmax over the last axis."""
    if not is_numpy(x):
        return x.softmax(dim=-1)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def pair_first(a: Array, b: Array) -> Array:
    """The first entry of the softmax over each pair (a, b): CLIPN's p_yes from the yes and no logits."""
    if not is_numpy(a):
        import torch

        return torch.stack([a, b], dim=-1).softmax(dim=-1)[..., 0]
    return softmax(np.stack([a, b], axis=-1))[..., 0]


def logsumexp(x: Array) -> Array:
    if not is_numpy(x):
        import torch

        return torch.logsumexp(x, dim=-1)
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


def row_max(x: Array) -> Array:
    return x.max(axis=-1) if is_numpy(x) else x.max(dim=-1).values


def row_sum(x: Array) -> Array:
    return x.sum(axis=-1) if is_numpy(x) else x.sum(dim=-1)


def argmax(x: Array) -> Array:
    return x.argmax(axis=-1) if is_numpy(x) else x.argmax(dim=-1)


def take(x: Array, index: Array) -> Array:
    """x[i, index[i]] for each row i."""
    if is_numpy(x):
        return np.take_along_axis(x, index[:, None], axis=-1)[:, 0]
    return x.gather(-1, index[:, None])[:, 0]


def topk(x: Array, k: int) -> tuple[Array, Array]:
    """The `k` largest values of each row, largest first, and their indices."""
    if not is_numpy(x):
        import torch

        top = torch.topk(x, k, dim=-1)
        return top.values, top.indices
    index = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(x, index, axis=-1), index
