"""Finding image inputs and decoding them exactly as the official pipeline does.

Decoding: PIL opens the file (first frame of animations), then open_clip's eval transform:
resize the shorter side to the model's size (bicubic), centre crop, convert to RGB, normalize
with the OpenAI mean/std. EXIF orientation is ignored by default, as in the official code.
"""

from __future__ import annotations

import errno
import glob
import io
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own decompression-bomb limit
MAX_ASPECT = 100  # longer side / shorter side beyond which the long side is centre-cropped first
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class InputItem:
    """One input as the user named it; `error` is set when it could not even be found.

    `data` holds the file's bytes when they were read elsewhere (a Ray Dataset's `bytes` column):
    they are then decoded instead of opening `path`.
    """

    path: str
    error: str | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)


def iter_inputs(args: Iterable[str], stdin: IO[str] | None = None) -> Iterator[InputItem]:
    """Expand files, directories (recursive, image extensions), globs and `-` (paths on stdin).

    Lazy: paths from stdin are yielded as they are read, so millions of them stream through.
    """
    for arg in args:
        if arg == "-":
            if stdin is None:
                continue
            for line in stdin:
                line = line.rstrip("\r\n")
                if line:
                    yield InputItem(line)
        elif os.path.isdir(arg):
            found = False
            for item in _walk(arg):
                found = True
                yield item
            if not found:
                yield InputItem(arg, error="directory contains no image files")
        elif os.path.lexists(arg) or not GLOB_CHARS & set(arg):
            yield InputItem(arg)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                yield InputItem(arg, error="no file matches this pattern")
            for match in matches:
                yield from _walk(match) if os.path.isdir(match) else (InputItem(match),)


def _walk(directory: str) -> Iterator[InputItem]:
    """Image files under `directory`, recursively, in a stable (sorted) order."""
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield InputItem(os.path.join(root, name))


def open_image(path: str, exif_transpose: bool = False, max_pixels: int = MAX_PIXELS, draft: int = 0, data: bytes | None = None) -> Image.Image:
    """Decode the first frame of an image file; any failure becomes an ImageError naming the problem.

    `draft` > 0 lets a JPEG decode at 1/2, 1/4 or 1/8 scale while both sides stay ≥ `draft` pixels:
    several times faster for large photos, but no longer pixel-exact (opt-in, `detect --draft`).
    `data`: the file's bytes, already read; `path` then only names the input.
    """
    try:
        if data is None:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                raise ImageError("not a regular file (device, socket or pipe)")
            if st.st_size == 0 and stat.S_ISREG(st.st_mode):
                raise ImageError("empty file (0 bytes)")
        elif not data:
            raise ImageError("empty file (0 bytes)")
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"image too large: {img.width}x{img.height} pixels (limit {max_pixels}); possible decompression bomb")
            img.seek(0)
            if draft and img.format == "JPEG":
                img.draft(img.mode, (draft, draft))
            img.load()
            out = ImageOps.exif_transpose(img) if exif_transpose else img.copy()
            out = limit_aspect(out)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("broken symbolic link" if os.path.islink(path) else "no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unknown or unsupported format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if getattr(exc, "errno", None) == errno.ELOOP:
            raise ImageError("symbolic link loop") from None
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageError(f"corrupt or truncated image ({detail[:160]})") from None
    return out


def limit_aspect(img: Image.Image, max_aspect: int = MAX_ASPECT) -> Image.Image:
    """Centre-crop the long side of extreme panoramas/strips to `max_aspect` × the short side.

    Resizing the short side to 224 would otherwise blow a 1×20000 strip up to 224×4,480,000
    pixels (3 GB) just to keep its central 224×224 crop. Images within the limit (all normal
    photos) are untouched, so parity with the official pipeline holds for them.
    """
    short, long = sorted(img.size)
    if long <= short * max_aspect:
        return img
    keep = short * max_aspect
    if img.width > img.height:
        left = (img.width - keep) // 2
        return img.crop((left, 0, left + keep, img.height))
    top = (img.height - keep) // 2
    return img.crop((0, top, img.width, top + keep))


def make_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform (the one the official inference uses) at the model's size."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=False)


def image_size_of(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@dataclass(frozen=True)
class LoadedImage:
    """A preprocessed image tensor, or the reason it could not be made."""

    path: str
    pixels: torch.Tensor | None
    error: str | None


def load_one(
    item: InputItem, transform: Callable[[Image.Image], torch.Tensor], exif_transpose: bool = False, draft: int = 0
) -> LoadedImage:
    """Decode and preprocess one input; never raises for a bad file."""
    if item.error:
        return LoadedImage(item.path, None, item.error)
    try:
        return LoadedImage(item.path, transform(open_image(item.path, exif_transpose, draft=draft, data=item.data)), None)
    except ImageError as exc:
        return LoadedImage(item.path, None, str(exc))
    except Exception as exc:  # a decoder bug must cost one record, not the run
        return LoadedImage(item.path, None, f"cannot decode image ({type(exc).__name__}: {str(exc)[:160]})")


def load_images(
    items: Iterable[InputItem],
    transform: Callable[[Image.Image], torch.Tensor],
    workers: int = 0,
    exif_transpose: bool = False,
    prefetch: int = 64,
    draft: int = 0,
) -> Iterator[LoadedImage]:
    """Decode inputs in input order; with `workers` > 0, in a thread pool `prefetch` items ahead.

    Pillow releases the GIL while decoding and resizing, so threads overlap decoding with the
    model's forward pass without the start-up cost of processes. At most `prefetch` decoded
    images are held at once, whatever the number of inputs.
    """
    if workers <= 0:
        for item in items:
            yield load_one(item, transform, exif_transpose, draft)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipn-decode")
    pending: deque[Future[LoadedImage]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(load_one, item, transform, exif_transpose, draft))
            if len(pending) >= max(prefetch, workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # on Ctrl-C or an abandoned generator, drop queued work instead of decoding it all
        pool.shutdown(wait=True, cancel_futures=True)
