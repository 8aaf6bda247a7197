"""What one untrusted image may cost, and the shared budgets that enforce it (decoding: `decode`).

Every limit has a default and an environment variable (`DecodeLimits`); the pieces here are checked
by the decoder: a deadline on every read (`Guard`), one memory budget for all decoding threads
(`MemoryBudget`), a JPEG scan count read from the markers (`jpeg_scans`), and the gate torch's C++
must not be inside when the interpreter ends (`Section`).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from PIL import Image

from ..files import env_number  # re-exported: the decode limits' variables read through it

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own decompression-bomb limit
MAX_ASPECT = 100  # longer side / shorter side beyond which the long side is centre-cropped first
GIVE_UP_AFTER = 5.0  # seconds past a decode's time limit after which it is abandoned inside a C call
TRANSFORM_EXIT_WAIT = 60.0  # at exit, the longest wait for transforms under way (one bounded image each)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on the work one untrusted image may cost; defaults can be changed by environment variables.

    - `max_pixels` (CLIPN_MAX_PIXELS): width × height of the frame that is decoded.
    - `memory_mb` (CLIPN_DECODE_MEMORY_MB): the estimated memory one decode may take, and the total that
      all decoding threads together may hold at once (larger images wait their turn).
    - `max_jpeg_scans` (CLIPN_MAX_JPEG_SCANS): scans of a progressive JPEG; each one is a pass over the
      whole image, so thousands of tiny scans take minutes to decode.
    - `timeout` (CLIPN_DECODE_TIMEOUT, seconds): decoding time per image, waits for memory not counted.
    """

    max_pixels: int = MAX_PIXELS
    memory_mb: int = 512
    max_jpeg_scans: int = 100
    timeout: float = 10.0

    @classmethod
    def from_env(cls) -> DecodeLimits:
        return cls(
            max_pixels=env_number("CLIPN_MAX_PIXELS", MAX_PIXELS),
            memory_mb=env_number("CLIPN_DECODE_MEMORY_MB", 512),
            max_jpeg_scans=env_number("CLIPN_MAX_JPEG_SCANS", 100),
            timeout=env_number("CLIPN_DECODE_TIMEOUT", 10.0, float),
        )


class Stopped(Exception):
    """Raised from a read inside the decoder: the run is stopping or the image ran out of time."""


class Guard:
    """Checked on every read Pillow makes: a decode stops at its next read when time is up or the run ends."""

    def __init__(self, timeout: float, stop: threading.Event | None) -> None:
        self.timeout = timeout
        self.stop = stop
        self.deadline = float("inf")  # set when the decode starts, not while it waits in a queue

    def start(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def extend(self, seconds: float) -> None:
        self.deadline += seconds

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped("the run is stopping")
        if time.monotonic() > self.deadline:
            raise Stopped(f"decoding took longer than {self.timeout:g} s (limit CLIPN_DECODE_TIMEOUT); a decoding-time bomb?")


class Section:
    """Code no thread may be inside while the interpreter ends (torch's C++): counted entries, and a
    `close` that refuses new ones and waits for those inside to leave."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._inside = 0
        self._closed = False

    def enter(self) -> None:
        with self._changed:
            if self._closed:
                raise Stopped("the run is stopping")
            self._inside += 1

    def leave(self) -> None:
        with self._changed:
            self._inside -= 1
            self._changed.notify_all()

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def close(self, timeout: float) -> bool:
        """Refuse new entries; True once nobody is inside, False if `timeout` seconds passed first."""
        with self._changed:
            self._closed = True
            return self._changed.wait_for(lambda: self._inside == 0, timeout)



class MemoryBudget:
    """Estimated bytes of images being decoded, shared by every decoding thread of the process."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._used = 0

    @contextlib.contextmanager
    def hold(self, nbytes: int, capacity: int, guard: Guard) -> Iterator[None]:
        waited_from = time.monotonic()
        with self._cond:
            while self._used and self._used + nbytes > capacity:
                guard.check()
                self._cond.wait(0.05)
                guard.extend(time.monotonic() - waited_from)
                waited_from = time.monotonic()
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


BUDGET = MemoryBudget()
# Pillow allocates pixels in blocks (16 MB by default) that glibc serves from its heap arenas, which
# keep freed memory: with several decoding threads, each arena kept a large image's worth. Blocks
# above glibc's largest mmap threshold (32 MB) are always mapped and unmapped, so a decoded image's
# memory goes back to the system when it is freed (a bomb folder: +480 MB of peak memory → +170 MB).
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(64 << 20)
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_MAX_JPEG_SEGMENTS = 10_000


def jpeg_scans(data: bytes | mmap.mmap, limit: int) -> int:
    """Count the scans (SOS markers) of a JPEG from its markers, stopping past `limit`; decodes nothing.

    Segments are skipped by their lengths and entropy-coded data by searching for the next marker,
    so a thumbnail inside EXIF is not counted. Too many segments of any kind also count as over the limit.
    """
    pos, scans, segments, size = 2, 0, 0, len(data)
    while pos + 4 <= size and scans <= limit:
        segments += 1
        if segments > _MAX_JPEG_SEGMENTS:
            return limit + 1
        if data[pos] != 0xFF:
            found = _JPEG_MARKER.search(data, pos)
            if not found:
                break
            pos = found.start()
            continue
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
        elif marker == 0xD9:
            break
        elif 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            pos += 2
        else:
            end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker != 0xDA:
                pos = end
                continue
            scans += 1
            found = _JPEG_MARKER.search(data, end)
            if not found:
                break
            pos = found.start()
    return scans


def jpeg_scans_of(fp: IO[bytes], limit: int) -> int:
    """`jpeg_scans` of an open file (through a read-only map of its descriptor) or an in-memory one."""
    try:
        fd = fp.fileno()
    except (OSError, io.UnsupportedOperation):
        raw = getattr(fp, "raw", fp)
        return jpeg_scans(raw.getvalue(), limit)
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
        return jpeg_scans(data, limit)

def decode_estimate(img: Image.Image, exif_transpose: bool) -> int:
    """Bytes a decode of `img` holds at its peak: Pillow's pixel buffer (4 bytes a pixel for RGB), a
    second full-size copy where one is made, and a progressive JPEG's coefficients (2 bytes per sample)."""
    pixels = img.width * img.height
    per_pixel = 1 if img.mode in ("1", "L", "P") else 2 if img.mode.startswith("I;16") else 4
    short, long = sorted(img.size)
    copies = 2 if img.mode in ("RGBA", "LA", "PA") or exif_transpose or long > short * MAX_ASPECT else 1
    coefficients = 2 * pixels * len(img.getbands()) if img.info.get("progressive") else 0
    return pixels * per_pixel * copies + coefficients


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
