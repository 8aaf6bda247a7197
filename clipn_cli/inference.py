"""Running the image tower over a stream of inputs in batches, keeping input order and errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .images import InputItem, LoadedImage, image_size_of, load_images, make_transform
from .model import CLIPN

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class EncodedImage:
    """An image's normalized feature (float32, CPU) or the reason there is none."""

    path: str
    feature: torch.Tensor | None
    error: str | None


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device '{device}': {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    return resolved


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; fp32 runs exactly as the official code."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (expected one of {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@torch.inference_mode()
def encode_batch(model: CLIPN, pixels: torch.Tensor, device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """Normalized float32 image features of a preprocessed batch."""
    non_blocking = device.type == "cuda"
    if non_blocking:
        pixels = pixels.pin_memory()
    with autocast(device, precision):
        features = model.encode_image(pixels.to(device, non_blocking=non_blocking), normalize=True)
    return features.float().cpu()


def encode_images(
    model: CLIPN,
    items: Iterable[InputItem],
    batch_size: int = 32,
    workers: int = 0,
    precision: str = "fp32",
    exif_transpose: bool = False,
    on_loaded: Callable[[LoadedImage], None] | None = None,
) -> Iterator[EncodedImage]:
    """Encode images in batches, yielding one EncodedImage per input, in input order.

    Failed inputs are carried along in their place so that output order never changes.
    """
    device = next(model.parameters()).device
    transform = make_transform(image_size_of(model))
    batch: list[LoadedImage] = []
    loaded = load_images(items, transform, workers=workers, exif_transpose=exif_transpose, prefetch=max(2 * batch_size, 8))

    def flush() -> Iterator[EncodedImage]:
        good = [b for b in batch if b.pixels is not None]
        features = iter(encode_batch(model, torch.stack([b.pixels for b in good]), device, precision)) if good else iter(())
        for b in batch:
            yield EncodedImage(b.path, next(features), None) if b.pixels is not None else EncodedImage(b.path, None, b.error)
        batch.clear()

    for image in loaded:
        if on_loaded:
            on_loaded(image)
        batch.append(image)
        if sum(b.pixels is not None for b in batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()
