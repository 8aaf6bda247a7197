"""Decoding image inputs, guarded and bounded, exactly as the official pipeline does (finding them: `inputs`).

Decoding: PIL opens the file (first frame of animations), then open_clip's eval transform:
resize the shorter side to the model's size (bicubic), centre crop, convert to RGB, normalize
with the OpenAI mean/std. EXIF orientation is ignored by default, as in the official code.
"""

from __future__ import annotations

import atexit
import io
import os
import queue
import re
import stat
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from .limits import (
    BUDGET, GIVE_UP_AFTER, TRANSFORM_EXIT_WAIT, DecodeLimits, Guard, Section, Stopped, decode_estimate, jpeg_scans_of,
    limit_aspect,
)
from .sources import InputItem, os_reason

if TYPE_CHECKING:  # torch only for the transform's type: the torch-free fast start decodes here too
    import torch

# Formats Pillow decodes in-process with its own or a linked library; nothing that hands the file
# to an external program (EPS/PostScript/PDF go to Ghostscript) and no icon containers. MPO (the
# multi-picture JPEG of many cameras) is what Pillow's JPEG reader reports for such files.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM")
_OPENED_FORMATS = frozenset({*ALLOWED_FORMATS, "MPO"})
# What other formats look like, so that a refusal can name the format it refuses.
_SIGNATURES = (
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"), (b"icns", "ICNS"), (b"8BPS", "PSD"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"gimp xcf", "XCF"), (b"SIMPLE  =", "FITS"), (b"DDS ", "DDS"),
    (b"\xd7\xcd\xc6\x9a", "WMF"), (b"\x01\x00\x00\x00", "EMF"), (b"qoif", "QOI"), (b"#?RADIANCE", "HDR"),
)


_TRANSFORMS = Section()
# A decoding thread stays inside _TRANSFORMS from its transform until it has let go of the result:
# freeing a tensor's last reference is torch C++ too (it releases the GIL), and it happens in
# whichever thread drops that reference last.
_POOL_THREAD = threading.local()


class _GuardedReader(io.BufferedReader):
    def __init__(self, raw: io.RawIOBase, guard: Guard) -> None:
        super().__init__(raw, buffer_size=1 << 16)
        self._guard = guard

    def read(self, size: int | None = -1) -> bytes:
        self._guard.check()
        return super().read(size)


def _refused_format(head: bytes) -> str:
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head.lstrip()[:5].lower() in (b"<?xml", b"<svg "):
        return "SVG/XML"
    if head[4:8] == b"ftyp":
        return f"ISO media ({head[8:12].decode('latin-1').strip()})"
    return ""


def _open_descriptor(path: str) -> io.RawIOBase:
    """Open `path` for reading without blocking, then check the type of what was opened.

    Checking first and opening by name after would let a file swapped for a FIFO in between block
    `open()` forever; a non-blocking open of a FIFO returns at once and `fstat` shows what it is.
    """
    if "\x00" in path:
        raise ImageError("path contains a NUL byte (not a valid file name)")
    st = os.stat(path)  # devices are refused before they are opened (opening some has side effects)
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file (device, socket or pipe)")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory, not an image")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file (device, socket or pipe)")
        if st.st_size == 0:
            raise ImageError("empty file (0 bytes)")
        return io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def _decode(
    fp: IO[bytes],
    exif_transpose: bool,
    draft: int,
    limits: DecodeLimits,
    guard: Guard,
    transform: Callable[[Image.Image], Any] | None,
) -> Any:
    """Identify (allowed formats only), check the frame to be decoded, decode within the budget, transform."""
    head = fp.read(64)
    fp.seek(0)
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow refuses at open past twice its own limit: CLIPN_MAX_PIXELS raises it
    try:
        img = Image.open(fp, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:  # past twice Pillow's limit, said in clipn's words
        size = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageError(f"image too large: {size.group(1) + ' pixels' if size else exc} (limit {limits.max_pixels}, CLIPN_MAX_PIXELS); "
                         "possible decompression bomb") from None
    except UnidentifiedImageError:
        refused = _refused_format(head)
        if refused:
            raise ImageError(f"format {refused} is not decoded by clipn (allowed: {', '.join(ALLOWED_FORMATS)})") from None
        raise ImageError("not an image (unknown or unsupported format)") from None
    with img:
        if img.format not in _OPENED_FORMATS:  # a plugin registered by something else
            raise ImageError(f"format {img.format} is not decoded by clipn (allowed: {', '.join(ALLOWED_FORMATS)})")
        img.seek(0)  # the frame that is decoded; its size is the one checked
        if img.width * img.height > limits.max_pixels:
            raise ImageError(f"image too large: {img.width}x{img.height} pixels (limit {limits.max_pixels}, CLIPN_MAX_PIXELS); possible decompression bomb")
        if img.format in ("JPEG", "MPO") and img.info.get("progressive"):
            if jpeg_scans_of(fp, limits.max_jpeg_scans) > limits.max_jpeg_scans:
                raise ImageError(f"progressive JPEG with more than {limits.max_jpeg_scans} scans (limit CLIPN_MAX_JPEG_SCANS); a decoding-time bomb?")
        if draft and img.format == "JPEG":
            img.draft(img.mode, (draft, draft))
        need = decode_estimate(img, exif_transpose)
        capacity = limits.memory_mb << 20
        if need > capacity:
            raise ImageError(
                f"image needs about {need >> 20} MB to decode (limit {limits.memory_mb} MB, CLIPN_DECODE_MEMORY_MB): "
                f"{img.width}x{img.height} {img.mode}; possible decompression bomb"
            )
        with BUDGET.hold(need, capacity, guard):
            img.load()
            out = limit_aspect(ImageOps.exif_transpose(img) if exif_transpose else img)
            if transform is None:
                return out
            if getattr(_POOL_THREAD, "holding", None) is False:  # a pool thread: it leaves when it lets go
                _TRANSFORMS.enter()
                _POOL_THREAD.holding = True
                return transform(out)
            with _TRANSFORMS.inside():
                return transform(out)


def _read_image(
    path: str,
    exif_transpose: bool,
    draft: int,
    limits: DecodeLimits | None,
    stop: threading.Event | None,
    transform: Callable[[Image.Image], Any] | None,
    guard: Guard | None = None,
    data: bytes | None = None,
) -> Any:
    """Open, check and decode one image file (then `transform` it); every failure is an ImageError.

    `data`: the file's bytes, already read (a remote engine's input); `path` then only names it.
    """
    limits = limits or DecodeLimits.from_env()
    guard = guard or Guard(limits.timeout, stop)
    guard.start()
    try:
        if data is not None and not data:
            raise ImageError("empty file (0 bytes)")
        raw = _open_descriptor(path) if data is None else io.BytesIO(data)
        with _GuardedReader(raw, guard) as fp:  # type: ignore[arg-type]
            return _decode(fp, exif_transpose, draft, limits, guard, transform)
    except ImageError:
        raise
    except Stopped as exc:
        raise ImageError(str(exc)) from None
    except ValueError as exc:
        if "null byte" in str(exc):
            raise ImageError("path contains a NUL byte (not a valid file name)") from None
        raise ImageError(f"corrupt or truncated image ({_detail(exc)})") from None
    except FileNotFoundError:
        raise ImageError("broken symbolic link" if os.path.islink(path) else "no such file") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:
            raise ImageError(os_reason(exc)) from None
        raise ImageError(f"corrupt or truncated image ({_detail(exc)})") from None
    except (SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise ImageError(f"corrupt or truncated image ({_detail(exc)})") from None


def _detail(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def open_image(
    path: str, exif_transpose: bool = False, max_pixels: int | None = None, draft: int = 0, limits: DecodeLimits | None = None,
    data: bytes | None = None,
) -> Image.Image:
    """Decode the first frame of an image file; any failure becomes an ImageError naming the problem.

    Only `ALLOWED_FORMATS` are decoded, within `limits` (see DecodeLimits).
    `draft` > 0 lets a JPEG decode at 1/2, 1/4 or 1/8 scale while both sides stay ≥ `draft` pixels:
    several times faster for large photos, but no longer pixel-exact (opt-in, `detect --draft`).
    `data`: the file's bytes, already read; `path` then only names the input.
    """
    limits = limits or DecodeLimits.from_env()
    if max_pixels is not None:
        limits = DecodeLimits(max_pixels, limits.memory_mb, limits.max_jpeg_scans, limits.timeout)
    return _read_image(path, exif_transpose, draft, limits, None, None, data=data)


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
    item: InputItem,
    transform: Callable[[Image.Image], torch.Tensor],
    exif_transpose: bool = False,
    draft: int = 0,
    limits: DecodeLimits | None = None,
    stop: threading.Event | None = None,
    _guard: Guard | None = None,
) -> LoadedImage:
    """Open, check, decode and preprocess one input; never raises for a bad file.

    The one entry point for every engine (threads here, remote workers elsewhere): the format
    allow-list, the descriptor checks and every limit of `limits` apply. `stop` set by another
    thread ends a decode at its next read.
    """
    if item.error:
        return LoadedImage(item.path, None, item.error)
    try:
        return LoadedImage(item.path, _read_image(item.path, exif_transpose, draft, limits, stop, transform, _guard, item.data), None)
    except ImageError as exc:
        return LoadedImage(item.path, None, str(exc))
    except Exception as exc:  # a decoder bug must cost one record, not the run
        return LoadedImage(item.path, None, f"cannot decode image ({type(exc).__name__}: {str(exc)[:160]})")


class _DecodePool:
    """Daemon decoding threads: one stuck inside a C decoder can never keep the process from exiting
    (ThreadPoolExecutor joins its threads at exit), and a replacement thread keeps the pool's size."""

    def __init__(self, workers: int, stop: threading.Event) -> None:
        self.stop = stop
        self._jobs: queue.SimpleQueue[tuple[Future[LoadedImage], Callable[[], LoadedImage]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        for _ in range(workers):
            self.add_thread()
        _POOLS.add(self)

    def add_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"clipn-decode-{len(self._threads)}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run(self) -> None:
        _POOL_THREAD.holding = False
        while (job := self._jobs.get()) is not None:
            future, work = job
            if self.stop.is_set():  # the run is over: queued work is dropped, not started
                future.cancel()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except BaseException as exc:  # load_one does not raise; this keeps a bug visible
                    future.set_exception(exc)
            job = future = work = None  # type: ignore[assignment]  # let go of the image and its tensor
            if _POOL_THREAD.holding:
                _POOL_THREAD.holding = False
                _TRANSFORMS.leave()

    def submit(self, work: Callable[[], LoadedImage]) -> Future[LoadedImage]:
        future: Future[LoadedImage] = Future()
        self._jobs.put((future, work))
        return future

    def shutdown(self, pending: Iterable[Future[LoadedImage]]) -> None:
        """Cancel queued work and let the threads end; never waits for a running decode."""
        for future in pending:
            future.cancel()
        for _ in self._threads:
            self._jobs.put(None)


_POOLS: weakref.WeakSet[_DecodePool] = weakref.WeakSet()


@atexit.register
def _settle_decoding_threads() -> None:
    """At exit, stop running decodes (at their next read) and wait for the threads inside torch to leave.

    A thread left inside Pillow's C decoder can be ended by the interpreter safely; one ended inside
    torch's C++ (a transform, or freeing a tensor's last reference) aborts the whole process
    ("terminate called without an active exception", exit 134 instead of the code the command
    chose), so a decoding thread is inside a gated section from its transform until it has let go
    of the result.
    """
    for pool in list(_POOLS):
        pool.stop.set()
    _TRANSFORMS.close(TRANSFORM_EXIT_WAIT)


def load_images(
    items: Iterable[InputItem],
    transform: Callable[[Image.Image], torch.Tensor],
    workers: int = 0,
    exif_transpose: bool = False,
    prefetch: int = 64,
    draft: int = 0,
    limits: DecodeLimits | None = None,
) -> Iterator[LoadedImage]:
    """Decode inputs in input order; with `workers` > 0, in daemon threads `prefetch` items ahead.

    Pillow releases the GIL while decoding and resizing, so threads overlap decoding with the
    model's forward pass without the start-up cost of processes. At most `prefetch` decoded
    images are held at once, whatever the number of inputs. A decode that outlives its time limit
    inside one C call (where no read can stop it) is given up: its input gets an error record, its
    thread is left to finish on its own and a new one takes its place.
    """
    limits = limits or DecodeLimits.from_env()
    stop = threading.Event()
    if workers <= 0:
        for item in items:
            yield load_one(item, transform, exif_transpose, draft, limits, stop)
        return
    pool = _DecodePool(workers, stop)
    pending: deque[tuple[InputItem, Guard, Future[LoadedImage]]] = deque()

    def submit(item: InputItem) -> None:
        guard = Guard(limits.timeout, stop)
        pending.append((item, guard, pool.submit(lambda: load_one(item, transform, exif_transpose, draft, limits, stop, guard))))

    def next_result() -> LoadedImage:
        item, guard, future = pending.popleft()
        while True:
            try:
                return future.result(timeout=0.25)
            except FutureTimeout:
                if time.monotonic() > guard.deadline + GIVE_UP_AFTER:
                    pool.add_thread()
                    return LoadedImage(item.path, None, f"decoding took longer than {limits.timeout:g} s (limit CLIPN_DECODE_TIMEOUT); a decoding-time bomb?")

    try:
        for item in items:
            submit(item)
            if len(pending) >= max(prefetch, workers):
                yield next_result()
        while pending:
            yield next_result()
    finally:
        # on Ctrl-C, SIGTERM or an abandoned generator: drop queued work and stop running decodes at
        # their next read, without waiting for them
        stop.set()
        pool.shutdown(f for _, _, f in pending)
