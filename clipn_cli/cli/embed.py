"""`clipn embed-classes`: class names → cached text heads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import ClassesOpt, DeviceOpt, NegativesOpt, TemplatesOpt, WeightsOpt, WordsOpt, check_output, fail, handle_errors, info
from .runtime import add_negatives, class_embeddings, load_classes, load_weights_for_cli, parse_negatives, preflight


def embed_classes(
    classes_file: Annotated[Path | None, typer.Argument(metavar="CLASSES_FILE", help="Text file, one class per line ('#' comments).", show_default=False)] = None,
    classes: ClassesOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output .safetensors. Default: CLASSES.safetensors.", show_default=False)] = None,
    weights: WeightsOpt = None,
    templates: TemplatesOpt = "clipn",
    negatives: NegativesOpt = None,
    words: WordsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Build the standard and "no" class embeddings once, for fast repeated `detect --embeddings`."""
    with handle_errors():
        pools = parse_negatives(negatives)
        names = load_classes(classes, classes_file, None, sources=("--classes", "a CLASSES_FILE argument"))
        if output is None:
            if classes_file is None:
                fail("--output is required with --classes")
            output = classes_file.with_suffix(".safetensors")
        check_output("--output", output)
        preflight(weights, device, templates=templates, files={"--words": words})
        model, weights_info = load_weights_for_cli(weights, device)
        heads = class_embeddings(model, weights_info, names, None, templates)
        add_negatives(model, weights_info, heads, pools, words)
        heads.save(output)
        info(f"wrote {output} ({len(names)} class{'es' if len(names) != 1 else ''}, templates '{heads.templates}'{''.join(f', {len(p.words)} {n} negatives' for n, p in heads.negatives.items())}, weights {weights_info.fingerprint[:12]})")
