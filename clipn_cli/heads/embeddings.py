"""Class embeddings: the standard and "no" text heads built from class names and templates.

Per class c: yes_c = normalize(Σ_t normalize(E_yes(t(c)))), and no_c likewise with the "no"
tower (eval mode: mean prompt). Saved as safetensors so that `detect` can skip text encoding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import EmbeddingsError
from ..files import JSONLimits, atomic_path
from ..model.clipn import CLIPN
from ..scores.negatives import GROUPS, NegativePool
from .prompts import TemplateSet
from ..safetensors_file import SafetensorsError, SafetensorsFile, loads_json

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer

from ..weights.home import EMBEDDINGS_FORMAT as FORMAT
FORMAT_VERSION = "1"
NEGATIVES_FORMAT_VERSION = "1.1"  # written only when negative labels are stored; clipn-cli before them refuses such files (it reads "1" only)
READ_VERSIONS = (FORMAT_VERSION, NEGATIVES_FORMAT_VERSION)
TEXT_BATCH = 256
CHUNK_PROMPTS = 64 * TEXT_BATCH  # prompts tokenized and encoded at a time, so memory stays flat for any class count
# the JSON lists in the metadata, bounded before parsing: a million classes (a class file's limit),
# and the negative-label pools (15% of at most `wordpool.MAX_WORDS` candidates, for each of two pools)
CLASS_LIST_LIMITS = JSONLimits(values=1_000_001, containers=1)
NEGATIVES_LIMITS = JSONLimits(values=1_000_000, containers=3)


@dataclass
class ClassEmbeddings:
    """Normalized class heads, rows in the user's class order, tied to the weights that made them."""

    classes: list[str]
    text_yes: torch.Tensor
    text_no: torch.Tensor | None  # None: a plain CLIP's heads (in memory only; files hold CLIPN heads)
    templates: str
    templates_sha256: str
    weights_fingerprint: str
    negatives: dict[str, NegativePool] = field(default_factory=dict)  # mined negative labels by method ("neglabel", "csp")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (float32 `text_yes`, `text_no`); it appears atomically."""
        from safetensors.torch import save_file

        if self.text_no is None:
            raise EmbeddingsError("a plain CLIP's class heads are not stored: give the class names (--classes) each run")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "classes": json.dumps(self.classes, ensure_ascii=False),
            "templates": self.templates,
            "templates_sha256": self.templates_sha256,
            "weights_fingerprint": self.weights_fingerprint,
        }
        tensors = {"text_yes": self.text_yes.float().cpu().contiguous(), "text_no": self.text_no.float().cpu().contiguous()}
        if self.negatives:
            meta["format_version"] = NEGATIVES_FORMAT_VERSION
            meta["negatives"] = json.dumps({name: pool.words for name, pool in self.negatives.items()}, ensure_ascii=False)
            for name, pool in self.negatives.items():
                tensors[f"negatives.{name}"] = pool.negatives.float().cpu().contiguous()
                tensors[f"negatives.{name}.id_heads"] = pool.id_heads.float().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClassEmbeddings:
        """Read and check an embeddings file written by `save`, metadata and tensors through one descriptor."""
        path = Path(path)
        try:
            with SafetensorsFile(path) as sf:
                meta = sf.metadata
                names = [n for n in sf.entries if n in ("text_yes", "text_no") or n.startswith("negatives.")]
                tensors = {k: v.float().clone() for k, v in sf.tensors(names).items()}
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
            yes, no = tensors["text_yes"], tensors["text_no"]
        except KeyError as exc:
            raise EmbeddingsError(f"{path}: damaged embeddings file (no {exc})") from None
        except SafetensorsError as exc:
            raise EmbeddingsError(f"{path}: damaged embeddings file ({exc})") from None
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise EmbeddingsError(f"{path}: damaged embeddings file (class names are not a list of strings)")
        if not (yes.ndim == 2 and yes.shape == no.shape and yes.shape[0] == len(classes) > 0 and yes.shape[1] > 0):
            raise EmbeddingsError(f"{path}: tensor shapes {tuple(yes.shape)}/{tuple(no.shape)} do not fit {len(classes)} classes")
        if not (torch.isfinite(yes).all() and torch.isfinite(no).all()):
            raise EmbeddingsError(f"{path}: embeddings contain NaN or Inf values")
        pools = _load_negatives(path, meta, tensors, yes)
        return cls(classes, yes, no, meta.get("templates", ""), meta.get("templates_sha256", ""), meta.get("weights_fingerprint", ""), pools)

    def check_weights(self, weights_fingerprint: str, source: str = "embeddings", embed_dim: int | None = None) -> None:
        """Refuse embeddings made with other weights (or of another width): their scores would be meaningless."""
        if self.weights_fingerprint != weights_fingerprint:
            raise EmbeddingsError(
                f"{source}: made with other weights (fingerprint {self.weights_fingerprint[:12] or 'none'}, "
                f"loaded weights {weights_fingerprint[:12]}); rebuild it with 'clipn embed-classes'"
            )
        if embed_dim is not None and self.text_yes.shape[1] != embed_dim:
            raise EmbeddingsError(
                f"{source}: embeddings are {self.text_yes.shape[1]}-dimensional but the weights' features are {embed_dim}-dimensional; "
                "rebuild it with 'clipn embed-classes'"
            )


def _load_negatives(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor], yes: torch.Tensor) -> dict[str, NegativePool]:
    """The negative-label pools of a format-1.1 file, checked against the class heads' shape."""
    if "negatives" not in meta:
        return {}
    try:
        words = loads_json(meta["negatives"], "negative labels", max_depth=2, limits=NEGATIVES_LIMITS)
        if not all(isinstance(w, list) for w in words.values()):  # list("abc") would make three words of a string
            raise TypeError("each pool's words must be a list")
        if not set(words) <= {"neglabel", "csp"}:
            raise ValueError(f"unknown pools {', '.join(sorted(set(words) - {'neglabel', 'csp'}))[:80]}")
        pools = {name: NegativePool(name, list(w), tensors[f"negatives.{name}"].float(), tensors[f"negatives.{name}.id_heads"].float())
                 for name, w in words.items()}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # SafetensorsError is a ValueError
        raise EmbeddingsError(f"{path}: damaged negative labels ({exc})") from None
    for name, pool in pools.items():
        if not (all(isinstance(w, str) for w in pool.words) and pool.negatives.shape == (len(pool.words), yes.shape[1])
                and pool.id_heads.shape == yes.shape and torch.isfinite(pool.negatives).all() and torch.isfinite(pool.id_heads).all()):
            raise EmbeddingsError(f"{path}: damaged negative labels '{name}' (shapes or values do not fit the class heads)")
        if len(pool.words) < GROUPS:  # mining never stores fewer; scoring them would give every image 1.0
            raise EmbeddingsError(f"{path}: damaged negative labels '{name}' ({len(pool.words)} words; {GROUPS} groups need at least {GROUPS})")
    return pools


def tokenizer_for(model: CLIPN) -> SimpleTokenizer:
    """The CLIP BPE tokenizer at the model's context length (what the official code uses)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=model.context_length)


def truncated_names(classes: list[str], templates: TemplateSet, context_length: int, tokenizer: SimpleTokenizer) -> list[str]:
    """Class names whose prompt exceeds the context and will be cut, as the official tokenizer cuts."""
    longest = max(templates.templates, key=len)
    return [c for c in dict.fromkeys(classes) if len(tokenizer.encode(longest.format(c))) + 2 > context_length]


@torch.inference_mode()
def encode_texts(
    model: CLIPN,
    tokens: torch.Tensor,
    batch_size: int = TEXT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized yes/no features of token rows, batched by similar length (exact, see model)."""
    model.require_text()
    device = next(model.parameters()).device
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)
    yes = torch.empty(len(tokens), model.text_projection.shape[1])
    no = torch.empty_like(yes) if getattr(model, "has_no", True) else None  # a plain CLIP has no "no" tower
    for start in range(0, len(tokens), batch_size):
        idx = order[start : start + batch_size]
        batch = tokens[idx].to(device)
        yes[idx] = model.encode_text_yes(batch, normalize=True).float().cpu()
        if no is not None:
            no[idx] = model.encode_text_no(batch, normalize=True).float().cpu()
        if progress:
            progress(len(idx))
    return yes, no


def embed_classes(
    model: CLIPN,
    classes: list[str],
    templates: TemplateSet,
    weights_fingerprint: str,
    batch_size: int = TEXT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> ClassEmbeddings:
    """Build both class heads with the template ensemble of the official inference.

    Classes go through in chunks of about `CHUNK_PROMPTS` prompts, each chunk tokenized, sorted
    by length and reduced to per-class sums before the next: holding every prompt's features
    would take 4 KB per prompt (ImageNet-1K × 128 templates: 0.5 GB; 21K classes: 11 GB).
    Length-sorting within a chunk pads 0.8% more token positions than one global sort (ImageNet).
    """
    if not classes:
        raise EmbeddingsError("no class names given")
    model.eval()
    tokenizer = tokenizer_for(model)
    per_chunk = max(1, CHUNK_PROMPTS // len(templates.templates))
    sums_yes: list[torch.Tensor] = []
    sums_no: list[torch.Tensor] = []
    for start in range(0, len(classes), per_chunk):
        chunk = classes[start : start + per_chunk]
        tokens = tokenizer([text for c in chunk for text in templates.texts(c)])
        yes, no = encode_texts(model, tokens, batch_size, progress)
        shape = (len(chunk), len(templates.templates), -1)
        sums_yes.append(yes.view(shape).sum(dim=1))
        if no is not None:
            sums_no.append(no.view(shape).sum(dim=1))
    text_yes = F.normalize(torch.cat(sums_yes), dim=-1)
    text_no = F.normalize(torch.cat(sums_no), dim=-1) if sums_no else None
    return ClassEmbeddings(list(classes), text_yes, text_no, templates.name, templates.sha256, weights_fingerprint)
