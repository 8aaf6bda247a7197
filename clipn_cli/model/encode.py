"""Running the image tower over a stream of inputs in batches, keeping input order and errors."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..inputs.decode import LoadedImage, image_size_of, load_images, make_transform
from ..inputs.sources import InputItem
from ..errors import DeviceError
from .clipn import CLIPN
from .devices import RunOptions, autocast

if TYPE_CHECKING:
    from .feature_cache import FeatureCache

@dataclass(frozen=True)
class EncodedImage:
    """An image's normalized feature (float32, CPU) or the reason there is none."""

    path: str
    feature: torch.Tensor | None
    error: str | None


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
        raise DeviceError("int8 quantisation runs on the CPU only; drop --quantize or use --device cpu")
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
    options: RunOptions | None = None,
) -> Iterator[EncodedImage]:
    """Encode images in batches, yielding one EncodedImage per input, in input order.

    Failed inputs are carried along in their place so that output order never changes.
    `batch_size` (the forward batch) and `workers` (decoding threads) default to what suits the
    model's device (`devices.RunOptions`); `options`, a run's resolved `RunOptions`, replaces all three.
    With `cache`, stored features are used instead of decoding and encoding (see `_encode_cached`).
    `draft` decodes large JPEGs at reduced scale, keeping at least twice the model's input size
    on both sides: faster, not exact (see `inputs.decode.open_image`). `encoder` (same arguments as this
    function) encodes instead of `model` what the cache does not hold: a remote engine's workers.
    """
    run = options or RunOptions.resolve(model, precision=precision, forward_batch=batch_size, decode_workers=workers)
    batch_size, workers, precision = run.forward_batch, run.decode_workers, run.precision
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
        items, transform, workers=workers, exif_transpose=exif_transpose, prefetch=run.prefetch, draft=2 * size if draft else 0
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
