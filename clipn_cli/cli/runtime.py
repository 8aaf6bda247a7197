"""Library calls several commands share: resolving classes, weights, embeddings; progress bars."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .common import fail, stderr, warn

if TYPE_CHECKING:
    from ..embeddings import ClassEmbeddings
    from ..model import CLIPN
    from ..weights import WeightsInfo


def load_classes(classes: str | None, classes_file: Path | None, embeddings: Path | None) -> list[str]:
    """Exactly one class source; prints warnings for duplicates and single classes."""
    from ..classes import class_warnings, parse_class_list, read_class_file

    given = [x for x in (classes, classes_file, embeddings) if x is not None]
    if len(given) != 1:
        fail("give exactly one of --classes, --classes-file/CLASSES or --embeddings")
    if embeddings is not None:
        return []
    names = parse_class_list(classes) if classes is not None else read_class_file(classes_file)  # type: ignore[arg-type]
    for message in class_warnings(names):
        warn(message)
    return names


def load_weights_for_cli(weights: Path | None, device: str, text: bool = True) -> tuple[CLIPN, WeightsInfo]:
    """The model on the chosen device; `text=False` (cached class embeddings) skips the text towers."""
    from ..inference import resolve_device
    from ..weights import load_model

    return load_model(weights, device=resolve_device(device), text=text)


def class_embeddings(
    model: CLIPN,
    weights_info: WeightsInfo,
    names: list[str],
    embeddings: Path | None,
    templates: str,
) -> ClassEmbeddings:
    """Load `--embeddings` (refusing other weights) or build heads from class names now."""
    from ..classes import class_warnings
    from ..embeddings import ClassEmbeddings, embed_classes, tokenizer_for, truncated_names
    from ..prompts import load_templates

    if embeddings is not None:
        loaded = ClassEmbeddings.load(embeddings)
        loaded.check_weights(weights_info.fingerprint, str(embeddings), embed_dim=int(weights_info.model_cfg["embed_dim"]))
        for message in class_warnings(loaded.classes):
            warn(message)
        return loaded
    template_set = load_templates(templates)
    cut = truncated_names(names, template_set, model.context_length, tokenizer_for(model))
    if cut:
        warn(f"{len(cut)} class name(s) longer than the {model.context_length}-token context are truncated, as the official tokenizer does: {cut[0][:40]!r}…")
    with text_progress(len(names) * len(template_set.templates)) as advance:
        return embed_classes(model, names, template_set, weights_info.fingerprint, progress=advance)


@contextlib.contextmanager
def text_progress(total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar for text encoding on a terminal; nothing when stderr is not one."""
    if not sys.stderr.isatty() or total < 512:
        yield None
        return
    from rich.progress import Progress

    with Progress(console=stderr, transient=True) as progress:
        task = progress.add_task("encoding class prompts", total=total)
        yield lambda n: progress.advance(task, n)
