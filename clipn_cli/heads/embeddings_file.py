"""Reading a class-embeddings file into NumPy, every check made here: `ClassEmbeddings.load` and the
torch-free fast start (`fastdetect`) read it through this one function, so both refuse the same
files with the same one-line errors. Imports no torch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EmbeddingsError
from ..files import JSONLimits
from ..safetensors_file import SafetensorsError, SafetensorsFile, loads_json
from ..weights.home import EMBEDDINGS_FORMAT as FORMAT

FORMAT_VERSION = "1"
NEGATIVES_FORMAT_VERSION = "1.1"  # written only when negative labels are stored; clipn-cli before them refuses such files (it reads "1" only)
READ_VERSIONS = (FORMAT_VERSION, NEGATIVES_FORMAT_VERSION)
POOL_NAMES = ("neglabel", "csp")
# the JSON lists in the metadata, bounded before parsing: a million classes (a class file's limit),
# and the negative-label pools (15% of at most `wordpool.MAX_WORDS` candidates, for each of two pools)
CLASS_LIST_LIMITS = JSONLimits(values=1_000_001, containers=1)
NEGATIVES_LIMITS = JSONLimits(values=1_000_000, containers=3)


@dataclass(frozen=True)
class StoredPool:
    """A negative-label pool as stored: its words, their embeddings and the ID heads it was mined against."""

    words: list[str]
    negatives: np.ndarray  # (M, D) float32
    id_heads: np.ndarray  # (C, D) float32


@dataclass(frozen=True)
class StoredEmbeddings:
    """A checked embeddings file: class names, float32 heads, and the metadata that ties them to weights."""

    classes: list[str]
    text_yes: np.ndarray  # (C, D)
    text_no: np.ndarray  # (C, D)
    templates: str
    templates_sha256: str
    weights_fingerprint: str
    pools: dict[str, StoredPool] = field(default_factory=dict)


def read_embeddings(path: str | os.PathLike[str]) -> StoredEmbeddings:
    """Read and check an embeddings file written by `ClassEmbeddings.save`, metadata and tensors through one descriptor."""
    path = Path(path)
    try:
        with SafetensorsFile(path) as sf:
            meta = sf.metadata
            names = [n for n in sf.entries if n in ("text_yes", "text_no") or n.startswith("negatives.")]
            arrays = sf.float32_arrays(names)
    except FileNotFoundError:
        raise EmbeddingsError(f"{path}: no such embeddings file") from None
    except IsADirectoryError:
        raise EmbeddingsError(f"{path}: is a directory, not an embeddings file") from None
    except (SafetensorsError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()[:200]
        raise EmbeddingsError(f"{path}: not a valid safetensors file: {detail}") from None
    if meta.get("format") != FORMAT:
        raise EmbeddingsError(f"{path}: not a clipn-cli embeddings file (make one with 'clipn embed-classes')")
    if meta.get("format_version", FORMAT_VERSION) not in READ_VERSIONS:
        raise EmbeddingsError(f"{path}: embeddings format version {meta['format_version'][:20]} is not one this clipn-cli reads ({', '.join(READ_VERSIONS)}); a newer clipn-cli may read it")
    try:
        classes = loads_json(meta["classes"], "class list", max_depth=1, limits=CLASS_LIST_LIMITS)
        yes, no = arrays["text_yes"], arrays["text_no"]
    except KeyError as exc:
        raise EmbeddingsError(f"{path}: damaged embeddings file (no {exc})") from None
    except SafetensorsError as exc:
        raise EmbeddingsError(f"{path}: damaged embeddings file ({exc})") from None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise EmbeddingsError(f"{path}: damaged embeddings file (class names are not a list of strings)")
    if not (yes.ndim == 2 and yes.shape == no.shape and yes.shape[0] == len(classes) > 0 and yes.shape[1] > 0):
        raise EmbeddingsError(f"{path}: tensor shapes {tuple(yes.shape)}/{tuple(no.shape)} do not fit {len(classes)} classes")
    if not (np.isfinite(yes).all() and np.isfinite(no).all()):
        raise EmbeddingsError(f"{path}: embeddings contain NaN or Inf values")
    pools = _read_pools(path, meta, arrays, yes)
    return StoredEmbeddings(classes, yes, no, meta.get("templates", ""), meta.get("templates_sha256", ""), meta.get("weights_fingerprint", ""), pools)


def _read_pools(path: Path, meta: dict[str, str], arrays: dict[str, np.ndarray], yes: np.ndarray) -> dict[str, StoredPool]:
    """The negative-label pools of a format-1.1 file, checked against the class heads' shape."""
    if "negatives" not in meta:
        return {}
    try:
        words = loads_json(meta["negatives"], "negative labels", max_depth=2, limits=NEGATIVES_LIMITS)
        if not all(isinstance(w, list) for w in words.values()):  # list("abc") would make three words of a string
            raise TypeError("each pool's words must be a list")
        if not set(words) <= set(POOL_NAMES):
            raise ValueError(f"unknown pools {', '.join(sorted(set(words) - set(POOL_NAMES)))[:80]}")
        pools = {name: StoredPool(list(w), arrays[f"negatives.{name}"], arrays[f"negatives.{name}.id_heads"]) for name, w in words.items()}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # SafetensorsError is a ValueError
        raise EmbeddingsError(f"{path}: damaged negative labels ({exc})") from None
    for name, pool in pools.items():
        if not (all(isinstance(w, str) for w in pool.words) and pool.negatives.shape == (len(pool.words), yes.shape[1])
                and pool.id_heads.shape == yes.shape and np.isfinite(pool.negatives).all() and np.isfinite(pool.id_heads).all()):
            raise EmbeddingsError(f"{path}: damaged negative labels '{name}' (shapes or values do not fit the class heads)")
    return pools


def check_made_with(made_with: str, dim: int, weights_fingerprint: str, source: str, embed_dim: int | None = None) -> None:
    """Refuse embeddings made with other weights (or of another width): their scores would be meaningless."""
    if made_with != weights_fingerprint:
        raise EmbeddingsError(
            f"{source}: made with other weights (fingerprint {made_with[:12] or 'none'}, "
            f"loaded weights {weights_fingerprint[:12]}); rebuild it with 'clipn embed-classes'"
        )
    if embed_dim is not None and dim != embed_dim:
        raise EmbeddingsError(
            f"{source}: embeddings are {dim}-dimensional but the weights' features are {embed_dim}-dimensional; "
            "rebuild it with 'clipn embed-classes'"
        )
