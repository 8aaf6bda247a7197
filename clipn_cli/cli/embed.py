"""`clipn embed-classes`: class names → cached text heads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import ClassesOpt, DeviceOpt, TemplatesOpt, WeightsOpt, fail, handle_errors, info
from .runtime import load_classes, load_weights_for_cli, text_progress


def embed_classes(
    classes_file: Annotated[Path | None, typer.Argument(help="Text file, one class per line ('#' comments).", show_default=False)] = None,
    classes: ClassesOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output .safetensors. Default: CLASSES.safetensors.", show_default=False)] = None,
    weights: WeightsOpt = None,
    templates: TemplatesOpt = "clipn",
    device: DeviceOpt = "auto",
) -> None:
    """Build the standard and "no" class embeddings once, for fast repeated `detect --embeddings`."""
    with handle_errors():
        if output is None:
            if classes_file is None:
                fail("--output is required with --classes")
            output = classes_file.with_suffix(".safetensors")
        names = load_classes(classes, classes_file, None)
        model, weights_info = load_weights_for_cli(weights, device)
        from ..embeddings import embed_classes as build
        from ..prompts import load_templates

        template_set = load_templates(templates)
        with text_progress(len(names) * len(template_set.templates)) as advance:
            result = build(model, names, template_set, weights_info.fingerprint, progress=advance)
        result.save(output)
        info(f"wrote {output} ({len(names)} classes × {len(template_set.templates)} templates '{template_set.name}')")
