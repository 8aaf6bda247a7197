"""`clipn calibrate`: score images known to be ID and store their scores, so that `detect
--calibration` can give verdicts with a chosen false-alarm rate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..inputs.sources import INPUT_KINDS_HELP
from .common import (
    INPUTS, OUTPUT, CALIBRATION,
    EXIT_OK, EXIT_PARTIAL, PRECISIONS, BatchSizeOpt, ClassesFileOpt, ClassesOpt, DeviceOpt, ExifOpt, NegativesOpt, PrecisionOpt, RuntimeOpt,
    TemplatesOpt, WeightsOpt, WordsOpt, WorkersOpt, check_choice, check_output, fail, handle_errors, info, warn,
)
from .export import check_runtime_option, runtime_provenance, use_runtime
from .runtime import add_negatives, class_embeddings, load_classes, load_weights_for_cli, parse_negatives, preflight


def calibrate(
    paths: Annotated[list[str] | None, typer.Argument(help=f"Images known to be ID (no labels needed): {INPUT_KINDS_HELP}.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", rich_help_panel=OUTPUT, help="The calibration file to write (JSON).", show_default=False)] = None,
    classes: ClassesOpt = None,
    classes_file: ClassesFileOpt = None,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", "-e", rich_help_panel=INPUTS, help="Class embeddings from 'clipn embed-classes'.", show_default=False)] = None,
    weights: WeightsOpt = None,
    templates: TemplatesOpt = "clipn",
    alpha: Annotated[float, typer.Option("--alpha", rich_help_panel=CALIBRATION, help="Default false-alarm rate for 'detect --calibration' (detect --alpha overrides it).")] = 0.05,
    negatives: NegativesOpt = None,
    words: WordsOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    precision: PrecisionOpt = "fp32",
    runtime: RuntimeOpt = "auto",
    exif_transpose: ExifOpt = False,
) -> None:
    """Score ID images with every method and store the sorted scores (no image paths) in a JSON file.

    'clipn detect --calibration FILE' then calls an image OOD when its conformal p-value is <= alpha: an ID image like these is flagged with probability at most alpha. Use the same weights, classes and templates for detect (other ones are refused). n images allow alpha >= 1/(n+1). With --negatives, NegLabel/CSP scores are stored too (detect --rule neglabel --calibration FILE).

    Exit codes: 0 all images scored, 1 some could not be read (left out, file still written), 2 usage or setup error.
    """
    with handle_errors():
        from ..scores.calibration import Calibration, check_alpha, check_size

        check_alpha(alpha)
        check_choice("--precision", precision, PRECISIONS)
        device = check_runtime_option(runtime, precision, device)
        if output is None:
            fail("--output FILE is required: where to write the calibration")
        if not paths:
            fail("no inputs: give the ID images as files, directories, globs, or - for paths on stdin")
        check_output("--output", output)
        pools = parse_negatives(negatives)
        names = load_classes(classes, classes_file, embeddings)
        preflight(weights, device, embeddings=embeddings, templates=templates, inputs=paths, files={"--words": words})
        model, weights_info = load_weights_for_cli(weights, device, text=embeddings is None)
        heads = class_embeddings(model, weights_info, names, embeddings, templates)
        add_negatives(model, weights_info, heads, pools, words, source=embeddings)
        runtime = use_runtime(model, weights_info, runtime, precision)

        from ..evaluation import score_set
        from ..model.devices import RunOptions
        from ..inputs.sets import ImageSet
        from ..inputs.sources import iter_inputs

        items = list(iter_inputs(paths, sys.stdin))
        run = RunOptions.resolve(model, precision=precision, forward_batch=batch_size, decode_workers=workers, runtime=runtime)  # once, for the whole run
        scored = score_set(model, heads, ImageSet("ID", "id", items, [None] * len(items)), exif_transpose=exif_transpose, options=run)
        if not scored.paths:
            fail("no readable image in the given inputs" + (f" (first: {scored.failures[0][0]}: {scored.failures[0][1]})" if scored.failures else ""))
        check_size(len(scored.paths), alpha, "calibrate")
        calibration = Calibration(
            scored.scores, weights_info.fingerprint, list(heads.classes), heads.templates, heads.templates_sha256, alpha,
            settings={"precision": precision, "exif_transpose": exif_transpose, "runtime": runtime_provenance(model, runtime, precision, None)},
            negatives={pool: n.digest() for pool, n in heads.negatives.items()},
        )
        calibration.save(output)
        info(f"wrote {output}: scores of {calibration.count} ID images for {len(calibration.scores)} methods; "
             f"alpha {alpha:g} (ATD flags scores below {calibration.threshold('atd', alpha):.4g})")
        if scored.failures:
            path, why = scored.failures[0]
            warn(f"{len(scored.failures)} images could not be read and were left out (first: {path}: {why})")
            raise typer.Exit(EXIT_PARTIAL)
        raise typer.Exit(EXIT_OK)
