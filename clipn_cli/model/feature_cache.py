"""A disk cache of image features, so that re-scoring with other classes, templates or rules skips
the image tower.

Layout: ``DIR/<weights fingerprint[:16]>/<key[:2]>/<key>.feat``, one small file per image, where
``key`` = sha256 of the image's identity (real path, size, mtime in ns) and the encoding variant
(precision, EXIF handling). Why one file per image rather than a database or shards:

- lookups and writes are O(1) and independent: no index to load, no lock, no compaction, and two
  processes filling the same cache at once cannot damage each other (each entry is written to a
  temporary file and renamed into place);
- damage stays local: every entry carries a checksum over its key and payload, so a truncated,
  corrupted or misplaced file is detected, ignored and rewritten, never trusted;
- it scales to the ~100k images of the usual benchmarks (and well beyond) with 256 fan-out
  directories, and one model's features are removed with one ``rm -r`` of its fingerprint folder.

Entries are raw little-endian float32 (no pickle, nothing executable). A write is not fsync'ed:
an entry cut by a crash fails its checksum and is simply encoded again.

Identity, not content, is the key, so a file rewritten with the same size and its mtime forced
back (``touch -d``) is not noticed; hashing every image's bytes would cost a read per lookup.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CacheError

MAGIC = b"CLIPNF1\n"
DIGEST_SIZE = 32


@dataclass
class CacheStats:
    """What the cache did during a run, for a summary line."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    written: int = 0
    write_errors: list[str] = field(default_factory=list)


class FeatureCache:
    """Image features of one set of weights, stored per image under `root`."""

    def __init__(self, root: str | os.PathLike[str], weights_fingerprint: str) -> None:
        if not weights_fingerprint:
            raise CacheError("a feature cache needs the weights fingerprint")
        self.root = Path(root)
        self.directory = self.root / weights_fingerprint[:16]
        self.stats = CacheStats()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"{root}: cannot create the feature cache: {exc.strerror or exc}") from None

    def key(self, path: str, variant: str = "") -> str | None:
        """The entry key for an image file as it is now, or None if it cannot be stat'ed."""
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
        except (OSError, ValueError):
            return None
        identity = f"{variant}\n{real}\n{st.st_size}\n{st.st_mtime_ns}"
        return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()

    def _entry(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.feat"

    def _digest(self, key: str, payload: bytes) -> bytes:
        return hashlib.blake2b(key.encode() + b"\0" + payload, digest_size=DIGEST_SIZE).digest()

    def get(self, key: str) -> torch.Tensor | None:
        """The stored feature, or None when absent or damaged (a damaged entry counts as corrupt)."""
        try:
            data = self._entry(key).read_bytes()
        except OSError:
            self.stats.misses += 1
            return None
        head = len(MAGIC) + DIGEST_SIZE
        payload = data[head:]
        valid = (
            data[: len(MAGIC)] == MAGIC
            and len(payload) > 0
            and len(payload) % 4 == 0
            and data[len(MAGIC) : head] == self._digest(key, payload)
        )
        if not valid:
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))

    def put(self, key: str, feature: torch.Tensor) -> None:
        """Store a feature atomically; a failed write is recorded in `stats`, never raised."""
        payload = feature.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()
        target = self._entry(key)
        tmp = None
        try:
            target.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", suffix=".part", dir=target.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(MAGIC + self._digest(key, payload) + payload)
            os.replace(tmp, target)
            self.stats.written += 1
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self.stats.write_errors.append(f"{target}: {exc.strerror or exc}")
