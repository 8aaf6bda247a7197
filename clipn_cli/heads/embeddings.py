"""Class embeddings: the standard and "no" text heads built from class names and templates.

Per class c: yes_c = normalize(Σ_t normalize(E_yes(t(c)))), and no_c likewise with the "no"
tower (eval mode: mean prompt). Saved as safetensors so that `detect` can skip text encoding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import EmbeddingsError
from ..files import atomic_path
from ..model.clipn import CLIPN
from ..scores.negatives import GROUPS, NegativePool
from .prompts import TemplateSet
from .embeddings_file import CLASS_LIST_LIMITS, FORMAT, FORMAT_VERSION, NEGATIVES_FORMAT_VERSION, check_made_with, read_embeddings  # noqa: F401  (their home before embeddings_file)

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer

TEXT_BATCH = 256
CHUNK_PROMPTS = 64 * TEXT_BATCH  # prompts tokenized and encoded at a time, so memory stays flat for any class count


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
        """Read and check an embeddings file written by `save` (`embeddings_file.read_embeddings` checks it)."""
        stored = read_embeddings(path)
        pools = {}
        for name, pool in stored.pools.items():
            if len(pool.words) < GROUPS:  # mining never stores fewer; scoring them would give every image 1.0
                raise EmbeddingsError(f"{path}: damaged negative labels '{name}' ({len(pool.words)} words; {GROUPS} groups need at least {GROUPS})")
            pools[name] = NegativePool(name, pool.words, torch.from_numpy(pool.negatives), torch.from_numpy(pool.id_heads))
        return cls(stored.classes, torch.from_numpy(stored.text_yes), torch.from_numpy(stored.text_no), stored.templates,
                   stored.templates_sha256, stored.weights_fingerprint, pools)

    def check_weights(self, weights_fingerprint: str, source: str = "embeddings", embed_dim: int | None = None) -> None:
        """Refuse embeddings made with other weights (or of another width): their scores would be meaningless."""
        check_made_with(self.weights_fingerprint, int(self.text_yes.shape[1]), weights_fingerprint, source, embed_dim)


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
