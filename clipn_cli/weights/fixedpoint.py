"""16-bit fixed-point storage: int16 values with one float32 scale per leading-dimension slice.

Half the bytes of fp32, like fp16/bf16, but a weight row's values share one scale, so every
value gets 15 significant bits relative to the row's largest instead of fp16's 11: measured on
CLIPN models, scores move 5-9× less than with fp16 (benchmarks/RESULTS.md). Tensors with fewer
than two dimensions (biases, norms, scalars; ~0.1% of the bytes) stay float32.

In a file, tensor `k` is stored as int16 under its own name and its scales as `k` + SCALE_SUFFIX.
"""

from __future__ import annotations

import torch

from ..errors import WeightsError

SCALE_SUFFIX = ":int16_scale"
LEVELS = 32767


def pack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors of two or more dimensions → int16 + per-slice scale; everything else → fp32."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        value = value.float()
        if value.dim() < 2:
            out[key] = value
            continue
        rows = value.reshape(value.shape[0], -1)
        peak = rows.abs().amax(dim=1, keepdim=True)
        scale = torch.where(peak > 0, peak / LEVELS, torch.ones_like(peak))
        out[key] = (rows / scale).round_().clamp_(-LEVELS, LEVELS).to(torch.int16).reshape(value.shape)
        out[key + SCALE_SUFFIX] = scale
    return out


def split_scales(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate the stored scales from the model tensors, checking that they pair up."""
    scales = {k.removesuffix(SCALE_SUFFIX): v for k, v in tensors.items() if k.endswith(SCALE_SUFFIX)}
    values = {k: v for k, v in tensors.items() if not k.endswith(SCALE_SUFFIX)}
    for key, scale in scales.items():
        value = values.get(key)
        if value is None or value.dtype != torch.int16:
            raise WeightsError(f"{source}: scale '{key}{SCALE_SUFFIX}' has no int16 tensor '{key}'")
        if value.dim() < 1 or tuple(scale.shape) != (value.shape[0], 1) or scale.dtype != torch.float32:
            raise WeightsError(f"{source}: scale of '{key}' is {scale.dtype} {tuple(scale.shape)}, expected float32 ({value.shape[0]}, 1)")
    for key, value in values.items():
        if not value.is_floating_point() and key not in scales:
            raise WeightsError(f"{source}: tensor '{key}' is {value.dtype} without a scale; expected floating point")
    return values, scales


def unpack(value: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """One stored tensor → float32 (int16 times its scales, or a plain cast)."""
    if scale is None:
        return value.float()
    return value.reshape(value.shape[0], -1).float().mul_(scale).reshape(value.shape)
