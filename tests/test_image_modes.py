"""Every image mode a user may feed gives the official pipeline's pixels (README "How images are read").

The official inference (`classification.load_model`, i.e. open_clip's `create_model_and_transforms`)
applies open_clip's eval preprocess to the image as PIL opens it: resize, centre crop, and only then
`convert("RGB")`. golden-tiny.json, computed by the official code, confirms that order (its RGBA logo
and palette GIF differ by 0.1 logit under convert-first; tests/test_parity.py). clipn's decoder
(`load_one`, the one every engine calls) must hand the model the same tensor, bit for bit, and so must
the torch-free fast start's NumPy transform fed by the same decoder.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipn_cli.inputs.decode import load_one, make_transform
from clipn_cli.inputs.sources import InputItem
from clipn_cli.runtimes.preprocess import preprocess

pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency expressed in bytes")
SIZE = 224
RNG = np.random.default_rng(7)


def _noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _rgb(height: int = 150, width: int = 200) -> Image.Image:
    return Image.fromarray(_noise(height, width))


def _grey16(big_endian: bool) -> Image.Image:
    values = RNG.integers(0, 65536, (150, 200), dtype=np.uint16)
    if big_endian:
        return Image.frombytes("I;16B", (200, 150), values.astype(">u2").tobytes())
    return Image.fromarray(values)


def _rgb48_png() -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow reads it as 8-bit RGB), written by hand: Pillow cannot write one."""
    import struct
    import zlib

    height, width = 40, 60
    rows = RNG.integers(0, 65536, (height, width * 3), dtype=np.uint16).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return _save(_rgb(120, 200), "JPEG", quality=95, exif=exif.tobytes())


def _mpo() -> bytes:
    return _save(_rgb(), "MPO", save_all=True, append_images=[_rgb()], quality=95)


def _palette_with_alpha_table() -> bytes:
    return _save(_rgb().quantize(16), "PNG", transparency=bytes(range(0, 256, 16)))


CASES: dict[str, Callable[[], bytes]] = {
    "RGB PNG": lambda: _save(_rgb(), "PNG"),
    "L PNG": lambda: _save(_rgb().convert("L"), "PNG"),
    "LA PNG": lambda: _save(Image.merge("LA", [Image.fromarray(_noise(150, 200, 1)[..., 0])] * 2), "PNG"),
    "RGBA PNG (alpha dropped after the resize)": lambda: _save(Image.fromarray(_noise(150, 200, 4)), "PNG"),
    "P PNG": lambda: _save(_rgb().quantize(64), "PNG"),
    "P PNG, one transparent index": lambda: _save(_rgb().quantize(64), "PNG", transparency=3),
    "P PNG, alpha table": _palette_with_alpha_table,
    "P GIF, transparent index": lambda: _save(_rgb().quantize(64), "GIF", transparency=3),
    "1-bit PNG": lambda: _save(_rgb().convert("1"), "PNG"),
    "1-bit TIFF": lambda: _save(_rgb().convert("1"), "TIFF"),
    "CMYK JPEG": lambda: _save(_rgb().convert("CMYK"), "JPEG", quality=95),
    "YCbCr TIFF": lambda: _save(_rgb().convert("YCbCr"), "TIFF"),
    "I;16 PNG": lambda: _save(_grey16(False), "PNG"),
    "I;16B TIFF": lambda: _save(_grey16(True), "TIFF"),
    "I TIFF": lambda: _save(Image.fromarray(RNG.integers(-1000, 70_000, (150, 200)).astype(np.int32)), "TIFF"),
    "F TIFF": lambda: _save(Image.fromarray(RNG.random((150, 200), dtype=np.float32) * 300), "TIFF"),
    "rgb48 PNG": _rgb48_png,
    "L PGM": lambda: _save(_rgb().convert("L"), "PPM"),
    "RGB BMP": lambda: _save(_rgb(), "BMP"),
    "P BMP": lambda: _save(_rgb().quantize(16), "BMP"),
    "progressive JPEG": lambda: _save(_rgb(), "JPEG", quality=90, progressive=True),
    "EXIF-rotated JPEG (orientation ignored)": _exif_rotated_jpeg,
    "animated GIF (first frame)": lambda: _save(_rgb().quantize(64), "GIF", save_all=True, append_images=[_rgb().quantize(8)]),
    "animated WebP (first frame)": lambda: _save(_rgb(), "WEBP", save_all=True, lossless=True, append_images=[_rgb()]),
    "RGBA WebP": lambda: _save(Image.fromarray(_noise(150, 200, 4)), "WEBP", lossless=True),
    "MPO (first picture)": _mpo,
    "multi-page TIFF (first page)": lambda: _save(_rgb().convert("L"), "TIFF", save_all=True, append_images=[_rgb()]),
    "1x1": lambda: _save(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    "1x1 P": lambda: _save(Image.new("P", (1, 1), 5), "PNG"),
    "1xN": lambda: _save(_rgb(60, 1), "PNG"),
    "Nx1 L": lambda: _save(_rgb(1, 90).convert("L"), "PNG"),
    "100:1 strip (the last ratio left whole)": lambda: _save(_rgb(3, 300).convert("P"), "PNG"),
    "shortest side exactly the model size": lambda: _save(_rgb(SIZE, 500), "PNG"),
    "exactly the model size, palette": lambda: _save(_rgb(SIZE, SIZE).quantize(32), "PNG"),
    "smaller than the model size": lambda: _save(_rgb(20, 30).convert("LA"), "PNG"),
}


def _official(path: Path) -> torch.Tensor:
    """The official pipeline: open_clip's eval preprocess (as `create_model_and_transforms` builds it) on the opened image."""
    transform = open_clip.image_transform(
        SIZE, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    with open(path, "rb") as fh, Image.open(fh) as image:
        return transform(image)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("modes")
    paths = {}
    for number, (name, make) in enumerate(CASES.items()):
        paths[name] = folder / f"image-{number}.img"
        paths[name].write_bytes(make())
    return paths


@pytest.mark.parametrize("name", list(CASES))
def test_decoder_gives_the_official_pixels(corpus: dict[str, Path], name: str) -> None:
    want = _official(corpus[name])
    loaded = load_one(InputItem(str(corpus[name])), make_transform(SIZE))
    assert loaded.error is None, loaded.error
    assert loaded.pixels is not None and torch.equal(loaded.pixels, want), (name, (loaded.pixels - want).abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_fast_start_transform_gives_the_official_pixels(corpus: dict[str, Path], name: str) -> None:
    """fastdetect decodes with the same `load_one`, then runtimes.preprocess instead of torch's transform."""
    loaded = load_one(InputItem(str(corpus[name])), lambda image: preprocess(image, SIZE))
    assert loaded.error is None, loaded.error
    assert np.array_equal(loaded.pixels, _official(corpus[name]).numpy()), name


def test_exif_orientation_is_ignored_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_exif_rotated_jpeg())
    transform = make_transform(SIZE)
    plain = load_one(InputItem(str(path)), transform).pixels
    rotated = load_one(InputItem(str(path)), transform, exif_transpose=True).pixels
    with Image.open(path) as image:
        upright = image.transpose(Image.Transpose.ROTATE_270)
    assert torch.equal(plain, _official(path))
    assert torch.equal(rotated, transform(upright))
    assert not torch.equal(plain, rotated)
