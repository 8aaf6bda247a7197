"""Reading a safetensors file through one open descriptor, its header bounded and checked first.

`safetensors.safe_open` and `load_file` each open the file by name: metadata read through one
open and tensors through another can come from two different files when an atomic rename lands
in between. Here the header, the metadata and the memory map of the tensors all come from one
descriptor, so what is read is always one complete file. The header is untrusted input: its
length, JSON nesting, dtypes, shapes and offsets are checked before any tensor is made.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import OPEN_FLAGS
from .jsonsafe import MAX_JSON_DEPTH, SafetensorsError, loads_json  # noqa: F401  (their home before jsonsafe)

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# safetensors dtype → (torch dtype name, NumPy dtype, bytes per element); torch is imported only when
# tensors are asked for, so a torch-free reader (`arrays`) can use the same checked header.
DTYPES: dict[str, tuple[str, str, int]] = {
    "F64": ("float64", "<f8", 8), "F32": ("float32", "<f4", 4), "F16": ("float16", "<f2", 2), "BF16": ("bfloat16", "<u2", 2),
    "I64": ("int64", "<i8", 8), "I32": ("int32", "<i4", 4), "I16": ("int16", "<i2", 2), "I8": ("int8", "i1", 1),
    "U8": ("uint8", "u1", 1), "BOOL": ("bool", "?", 1),
}

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class TensorEntry:
    kind: str  # the safetensors dtype ("F32", "BF16", ...)
    shape: tuple[int, ...]
    start: int  # byte offsets from the start of the data section
    end: int

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, DTYPES[self.kind][0])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """One open safetensors file: `metadata`, `entries` (name → dtype, shape, offsets) and `tensors()`.

    Use as a context manager; tensors made by `tensors()` stay valid after it closes (they view a
    private memory map of the file, which pages load on first use).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fd = os.open(self.path, OPEN_FLAGS)
        try:
            self._fd = fd
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(21, "is a directory", str(self.path))
            if not stat.S_ISREG(st.st_mode):
                raise SafetensorsError("not a regular file (device, socket or pipe)")
            self.size = st.st_size
            self.metadata, self.entries, self.data_start = self._read_header()
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, SafetensorsError) and exc.path is None:
                exc.path = self.path  # named on its own line where no reader wraps it
            raise
        self._map: mmap.mmap | None = None

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorEntry], int]:
        if self.size < 8:
            raise SafetensorsError(f"too short for a safetensors file ({self.size} bytes)")
        length = int.from_bytes(self.pread(8, 0), "little")
        if length < 2 or length > min(MAX_HEADER_BYTES, self.size - 8):
            raise SafetensorsError(f"header length {length} does not fit the file ({self.size} bytes; limit {MAX_HEADER_BYTES})")
        header = loads_json(self.pread(length, 8), "header")
        if not isinstance(header, dict):
            raise SafetensorsError("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise SafetensorsError("__metadata__ is not a mapping of strings")
        data_size = self.size - 8 - length
        entries = {}
        for name, entry in header.items():
            entries[name] = self._entry(name, entry, data_size)
        spans = sorted((e.start, e.end) for e in entries.values() if e.end > e.start)
        if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
            raise SafetensorsError("tensor data ranges overlap")
        return meta, entries, 8 + length

    @staticmethod
    def _entry(name: str, entry: Any, data_size: int) -> TensorEntry:
        if not isinstance(entry, dict):
            raise SafetensorsError(f"tensor '{name[:80]}': entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise SafetensorsError(f"tensor '{name[:80]}': unsupported dtype {str(dtype)[:20]!r}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_count(d) for d in shape)):
            raise SafetensorsError(f"tensor '{name[:80]}': shape is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise SafetensorsError(f"tensor '{name[:80]}': data_offsets is not two offsets")
        start, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype][2]
        if not (start <= end <= data_size and end - start == nbytes):
            raise SafetensorsError(f"tensor '{name[:80]}': data_offsets {offsets} do not fit its shape {shape} or the file")
        return TensorEntry(dtype, tuple(shape), start, end)

    def pread(self, count: int, offset: int) -> bytes:
        """Exactly `count` bytes at `offset` of this descriptor (the file shrinking meanwhile is an error)."""
        chunks, done = [], 0
        while done < count:
            chunk = os.pread(self._fd, count - done, offset + done)
            if not chunk:
                raise SafetensorsError("file ends early (truncated or being rewritten)")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def readinto(self, buffer: memoryview, offset: int) -> int:
        """Fill `buffer` from data-section `offset` (for chunked scans that leave the map untouched)."""
        return os.preadv(self._fd, [buffer], self.data_start + offset)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in self.entries.items()}

    def _mapped(self) -> mmap.mmap | None:
        if self._map is None and self.size > self.data_start:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        return self._map

    def tensors(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors viewing a private (copy-on-write) map of this descriptor: nothing is read until used."""
        import torch

        self._mapped()
        out = {}
        for name in self.entries if names is None else names:
            entry = self.entries[name]
            count = math.prod(entry.shape)
            if count == 0 or self._map is None:
                out[name] = torch.empty(entry.shape, dtype=entry.dtype)
            else:
                flat = torch.frombuffer(self._map, dtype=entry.dtype, count=count, offset=self.data_start + entry.start)
                out[name] = flat.view(entry.shape)
        return out

    def float32_arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        """NumPy float32 copies of tensors (any stored dtype, bf16 widened exactly as torch does): no torch."""
        import numpy as np

        mapped = self._mapped()
        out = {}
        for name in names:
            entry = self.entries[name]
            count = math.prod(entry.shape)
            stored = DTYPES[entry.kind][1]
            if count == 0 or mapped is None:
                out[name] = np.zeros(entry.shape, dtype=np.float32)
                continue
            flat = np.frombuffer(mapped, dtype=stored, count=count, offset=self.data_start + entry.start)
            wide = (flat.astype(np.uint32) << 16).view(np.float32) if entry.kind == "BF16" else flat.astype(np.float32)
            out[name] = wide.reshape(entry.shape)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
