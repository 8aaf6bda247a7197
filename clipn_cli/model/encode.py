"""Running the image tower over a stream of inputs in batches, keeping input order and errors."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..inputs.decode import LoadedImage, image_size_of, load_images, make_transform
from ..inputs.sources import InputItem
from .clipn import CLIPN

if TYPE_CHECKING:
    from .feature_cache import FeatureCache

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
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device '{device}' (expected auto, cpu, cuda, cuda:N or mps)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device '{device}' requested but Apple MPS is not available")
    return resolved


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass when the user gives none.

    On a CPU a ViT-B-16 forward runs at 5.0-5.3 img/s at any batch from 4 to 32 (2 cores,
    interleaved), but the whole `detect` command does not: on 256 JPEGs batch 8 ran 4-8% below the
    bare forward and batch 12 and 16 ~2% faster than 8. Memory grows with the batch (glibc keeps
    freed activations for reuse): peaks of 1.24-1.28 GB at 8, 1.32 at 12, 1.34-1.45 at 16. Batch 12
    is as fast as 16 with less memory. A GPU wants large batches to stay busy.
    """
    return 128 if device.type == "cuda" else 12


def default_workers(device: torch.device) -> int:
    """Decoding threads when the user gives none: a few beside a CPU forward pass, all cores for a GPU."""
    cpus = os.cpu_count() or 1
    return cpus if device.type == "cuda" else min(4, cpus)


def pipeline_sizes(model: CLIPN, batch_size: int | None = None, workers: int | None = None) -> tuple[int, int]:
    """The given batch size and decoding threads, or the defaults for the model's device."""
    device = next(model.parameters()).device
    return batch_size or default_batch_size(device), default_workers(device) if workers is None else workers


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; fp32 runs exactly as the official code."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (expected one of {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@torch.inference_mode()
def encode_batch(model: CLIPN, pixels: torch.Tensor, device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """Normalized float32 image features of a preprocessed batch (by `model.image_runtime` when one is attached)."""
    if (runtime := getattr(model, "image_runtime", None)) is not None:
        return runtime.encode(pixels)
    non_blocking = device.type == "cuda"
    if non_blocking:
        pixels = pixels.pin_memory()
    with autocast(device, precision):
        features = model.encode_image(pixels.to(device, non_blocking=non_blocking), normalize=True)
    return features.float().cpu()


def quantize_image_tower(model: CLIPN) -> CLIPN:
    """int8 dynamic quantisation of the image tower's linear layers, in place (CPU only; opt-in).

    Weights become int8 and activations are quantised on the fly: on a 2-core x86 CPU the image
    tower runs about 2× faster, at the cost of exactness (see benchmarks/RESULTS.md).
    Features then differ from fp32, so feature caches key them apart (`model.image_quantization`).
    """
    import warnings

    from torch.ao.quantization import quantize_dynamic

    if next(model.visual.parameters()).device.type != "cpu":
        raise ValueError("int8 quantisation runs on the CPU only; drop --quantize or use --device cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantisation announces its move to torchao
        quantize_dynamic(model.visual, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    model.image_quantization = "int8"
    return model


def encode_images(
    model: CLIPN,
    items: Iterable[InputItem],
    batch_size: int | None = None,
    workers: int | None = None,
    precision: str = "fp32",
    exif_transpose: bool = False,
    on_loaded: Callable[[LoadedImage], None] | None = None,
    cache: FeatureCache | None = None,
    draft: bool = False,
    encoder: Callable[..., Iterator[EncodedImage]] | None = None,
) -> Iterator[EncodedImage]:
    """Encode images in batches, yielding one EncodedImage per input, in input order.

    Failed inputs are carried along in their place so that output order never changes.
    `batch_size` and `workers` default to what suits the model's device (`pipeline_sizes`).
    With `cache`, stored features are used instead of decoding and encoding (see `_encode_cached`).
    `draft` decodes large JPEGs at reduced scale, keeping at least twice the model's input size
    on both sides: faster, not exact (see `images.open_image`). `encoder` (same arguments as this
    function) encodes instead of `model` what the cache does not hold: a remote engine's workers.
    """
    batch_size, workers = pipeline_sizes(model, batch_size, workers)
    if cache is not None:
        yield from _encode_cached(model, items, cache, batch_size, workers, precision, exif_transpose, on_loaded, draft, encoder)
        return
    if encoder is not None:
        yield from encoder(model, items, batch_size, workers, precision, exif_transpose, on_loaded, draft=draft)
        return
    device = next(model.parameters()).device
    size = image_size_of(model)
    transform = make_transform(size)
    batch: list[LoadedImage] = []
    loaded = load_images(
        items, transform, workers=workers, exif_transpose=exif_transpose, prefetch=max(2 * batch_size, 8), draft=2 * size if draft else 0
    )

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


def _encode_cached(
    model: CLIPN,
    items: Iterable[InputItem],
    cache: FeatureCache,
    batch_size: int,
    workers: int,
    precision: str,
    exif_transpose: bool,
    on_loaded: Callable[[LoadedImage], None] | None,
    draft: bool = False,
    encoder: Callable[..., Iterator[EncodedImage]] | None = None,
) -> Iterator[EncodedImage]:
    """Cache-aware encoding, in chunks of 8 batches: look every input up, encode only the misses.

    Chunks keep memory flat and let hits skip decoding entirely; the price is that inputs are
    read one chunk ahead and the decoding threads restart at each chunk. A feature is stored only
    if the file's identity did not change while it was being encoded.
    """
    variant = f"precision={precision};exif_transpose={exif_transpose}"
    if draft:
        variant += ";draft"
    if quantized := getattr(model, "image_quantization", None):
        variant += f";quantized={quantized}"
    if (runtime := getattr(model, "image_runtime", None)) is not None:
        variant += f";{runtime.variant}"
    stream = iter(items)
    while block := list(itertools.islice(stream, 8 * batch_size)):
        keys = [cache.key(item.path, variant) if item.error is None else None for item in block]
        found = [cache.get(key) if key else None for key in keys]
        misses = [item for item, hit in zip(block, found) if hit is None]
        fresh = encode_images(model, misses, batch_size, workers, precision, exif_transpose, on_loaded, draft=draft, encoder=encoder)
        try:
            for item, key, hit in zip(block, keys, found):
                if hit is not None:
                    yield EncodedImage(item.path, hit, None)
                    continue
                encoded = next(fresh)
                if encoded.feature is not None and key is not None and cache.key(item.path, variant) == key:
                    cache.put(key, encoded.feature)
                yield encoded
        finally:
            fresh.close()
