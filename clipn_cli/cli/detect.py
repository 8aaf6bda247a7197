"""`clipn detect`: one ID/OOD verdict per image."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..scores.methods import RULES, VERDICT_RULES
from ..outputs.writers import FORMATS
from .common import (
    INPUTS, MODEL, RULE, OUTPUT, CALIBRATION,
    EXIT_OK, EXIT_PARTIAL, PRECISIONS, BatchSizeOpt, ClassesFileOpt, ClassesOpt, DeviceOpt, ExifOpt, NegativesOpt, PrecisionOpt,
    RuntimeOpt, TemplatesOpt, Terminated, WeightsOpt, WordsOpt, WorkersOpt, check_choice, check_output, check_stdout, fail, handle_errors, info, stderr,
    stdout_is_terminal,
)
from .export import check_runtime_option, use_runtime
from .scaleout import ENGINES, ActorsOpt, CpusPerActorOpt, EngineOpt, GpusPerActorOpt, RayAddressOpt, ShardSizeOpt, ray_options_given
from .runtime import (
    add_negatives, calibrated_verdicts, class_embeddings, load_classes, load_weights_for_cli, parse_negatives, preflight, report_provenance,
)

if TYPE_CHECKING:
    from ..scores.calibration import CalibratedVerdicts


def detect(
    paths: Annotated[list[str] | None, typer.Argument(help="Image files, directories (recursive), glob patterns, .csv/.parquet tables with a path column, or - to read paths from stdin.", show_default=False)] = None,
    classes: ClassesOpt = None,
    classes_file: ClassesFileOpt = None,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", "-e", rich_help_panel=INPUTS, help="Class embeddings from 'clipn embed-classes'.", show_default=False)] = None,
    weights: WeightsOpt = None,
    templates: TemplatesOpt = "clipn",
    rule: Annotated[str, typer.Option("--rule", rich_help_panel=RULE, help=f"Verdict rule: {', '.join(RULES)}. Threshold-free: {', '.join(VERDICT_RULES)} (atd = agreeing-to-differ, ctw = competing-to-win); the others need --threshold or --calibration.")] = "atd",
    threshold: Annotated[float | None, typer.Option("--threshold", rich_help_panel=RULE, help="Call an image OOD when the rule's score is below T (needed by rules without a threshold-free verdict, e.g. thr@95%ID from 'clipn eval').", show_default=False)] = None,
    negatives: NegativesOpt = None,
    words: WordsOpt = None,
    fmt: Annotated[str | None, typer.Option("--format", "-f", rich_help_panel=OUTPUT, help="table, json, jsonl or csv. Default: table on a terminal, jsonl otherwise.", show_default=False)] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", rich_help_panel=OUTPUT, help="Write results to this file instead of stdout (with --engine ray: a folder or URI for shards and manifest).", show_default=False)] = None,
    details: Annotated[bool, typer.Option("--details", rich_help_panel=OUTPUT, help="Add p_yes, logits_yes and logits_no (per class) to each record.")] = False,
    top_k: Annotated[int, typer.Option("--top-k", rich_help_panel=OUTPUT, min=0, help="Add the K most probable classes to each record.")] = 0,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    precision: PrecisionOpt = "fp32",
    runtime: RuntimeOpt = "torch",
    exif_transpose: ExifOpt = False,
    resume: Annotated[bool, typer.Option("--resume", rich_help_panel=OUTPUT, help="With --format jsonl --output F: skip inputs already in F and append the rest (with --engine ray: score only unfinished shards).")] = False,
    cache: Annotated[Path | None, typer.Option("--cache", rich_help_panel=MODEL, help="Feature cache directory: images already encoded with these weights are not encoded again.", show_default=False)] = None,
    draft: Annotated[bool, typer.Option("--draft", rich_help_panel=MODEL, help="Decode large JPEGs at reduced scale: several times faster for big photos, not exact.")] = False,
    quantize: Annotated[str | None, typer.Option("--quantize", rich_help_panel=MODEL, help="int8: quantise the image tower's linear layers (CPU only; with --runtime onnx, ONNX Runtime's int8): faster, not exact.", show_default=False)] = None,
    calibration: Annotated[Path | None, typer.Option("--calibration", rich_help_panel=CALIBRATION, help="A file from 'clipn calibrate': add p_value per image and call OOD when p_value <= alpha.", show_default=False)] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", rich_help_panel=CALIBRATION, help="With --calibration: the false-alarm rate on ID images (default: the one the file was made with).", show_default=False)] = None,
    fdr: Annotated[float | None, typer.Option("--fdr", rich_help_panel=CALIBRATION, help="With --calibration: Benjamini-Hochberg over the whole run, expected share of ID among OOD verdicts <= Q (adds q_value). Needs the whole run before writing: --format json/csv/table or --output FILE (with --engine ray: a last pass rewrites the shards).", show_default=False)] = None,
    report: Annotated[Path | None, typer.Option("--report", rich_help_panel=OUTPUT, help="Also write a self-contained HTML report (verdict counts, counts per class, gallery by p_ood).", show_default=False)] = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    actors: ActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = 0.0,
    cpus_per_actor: CpusPerActorOpt = None,
    shard_size: ShardSizeOpt = 10_000,
) -> None:
    """Say ID or OOD for each image, from class names alone.

    Exit codes: 0 all inputs scored, 1 some inputs failed (error records), 2 usage or setup error.
    """
    _huge_pages_for_activations()
    _few_malloc_arenas()
    with handle_errors():
        check_choice("--rule", rule, RULES)
        check_choice("--engine", engine, ENGINES)
        if engine == "ray":
            if runtime != "torch":
                fail("--runtime onnx/openvino runs with --engine local only (Ray workers use torch)")
            return _detect_on_ray(locals())
        if ray_options_given(ray_address, actors, gpus_per_actor, cpus_per_actor, shard_size):
            fail("--ray-address, --actors, --gpus-per-actor, --cpus-per-actor and --shard-size need --engine ray")
        output = Path(output) if output is not None else None
        fmt = fmt or ("table" if output is None and stdout_is_terminal() else "jsonl")
        check_choice("--format", fmt, FORMATS)
        check_choice("--precision", precision, PRECISIONS)
        check_choice("--quantize", quantize, ("int8",))
        if quantize and runtime == "openvino":
            fail("--quantize int8 runs with --runtime onnx (ONNX Runtime's int8) or torch, not --runtime openvino")
        device = check_runtime_option(runtime, precision, device)
        if not paths:
            fail("no inputs: give image files, directories, globs, or - for paths on stdin")
        check_output("--output", output)
        check_stdout(output)
        if resume and (output is None or fmt != "jsonl"):
            fail("--resume needs --format jsonl and --output FILE (the file to continue)")
        if quantize and precision != "fp32":
            fail("--quantize int8 computes in fp32: it cannot be combined with --precision fp16 or bf16")
        check_output("--report", report)
        _check_calibration_options(calibration, alpha, fdr, fmt, output, resume)
        if calibration is not None and threshold is not None:
            fail("give --threshold (a fixed score cut) or --calibration (a false-alarm rate), not both")
        pools = parse_negatives(negatives, rule)
        if threshold is None and calibration is None and rule not in VERDICT_RULES:
            fail(f"--rule {rule} has no threshold-free verdict: give --threshold T (e.g. its thr@95%ID from 'clipn eval') or --calibration FILE")
        names = load_classes(classes, classes_file, embeddings)
        preflight(weights, device, embeddings=embeddings, templates=templates, inputs=paths, files={"--calibration": calibration, "--words": words})
        model, weights_info = load_weights_for_cli(weights, device, text=embeddings is None)
        heads = class_embeddings(model, weights_info, names, embeddings, templates)
        add_negatives(model, weights_info, heads, pools, words, source=embeddings)
        verdicts = calibrated_verdicts(calibration, alpha, fdr, rule, heads, weights_info.fingerprint)
        if quantize and runtime == "torch":
            from ..model.encode import quantize_image_tower

            quantize_image_tower(model)
        use_runtime(model, weights_info, runtime, precision, quantize)
        # Modules, model and heads live until exit: freezing them spares the garbage collector from
        # walking torch's millions of objects during the run and at exit (exit 1.1 s → 0.2 s).
        gc.freeze()

        from ..model.feature_cache import FeatureCache
        from ..detection import detect as run_detect
        from ..inputs.sources import iter_inputs
        from ..outputs.writers import open_writer, resume_jsonl
        from ..outputs.progress import input_progress

        report_data = None
        if report is not None:
            from ..outputs.report import DetectReport

            report_data = DetectReport(heads.classes, calibrated=verdicts is not None)
        items = iter_inputs(paths, sys.stdin)
        already = resume_jsonl(output, report_data.add if report_data is not None else None) if resume and output is not None else set()
        if already:
            info(f"resuming: {len(already)} inputs already in {output} are skipped")
            items = (item for item in items if item.path not in already)
        feature_cache = FeatureCache(cache, weights_info.fingerprint) if cache is not None else None
        results = run_detect(
            model, heads, items, rule=rule, batch_size=batch_size,
            workers=workers,
            precision=precision, exif_transpose=exif_transpose, details=details, top_k=top_k,
            cache=feature_cache, draft=draft,
            # calibrated verdicts replace the engine's: a cut no score is below keeps it from needing a threshold
            threshold=threshold if verdicts is None else float("-inf"),
        )
        done = failed = 0
        last = None
        buffered: list[dict] = []
        try:
            with input_progress(sys.stderr, paths, already) as status, open_writer(
                fmt, output, details=details, append=resume, columns=_extra_columns(verdicts), top_k=top_k, classes=heads.classes, status=status,
            ) as writer:

                def emit(record: dict) -> None:
                    writer.write(record)
                    if report_data is not None:
                        report_data.add(record)

                for result in results:
                    record = result.as_dict(details)
                    if verdicts is not None:
                        verdicts.apply(record)
                    if fdr is not None:
                        buffered.append(record)
                    else:
                        emit(record)
                    done += 1
                    failed += not result.ok
                    last = result.path
                    status.advance()
                if fdr is not None and verdicts is not None:
                    verdicts.apply_fdr(buffered)
                    for record in buffered:
                        emit(record)
        except (KeyboardInterrupt, Terminated):
            where = f"after {done} inputs (last: {last})" if last else "before any input was finished"
            kept = f"; {output} keeps every finished line, continue with --resume" if output is not None and fmt == "jsonl" else ""
            info(f"stopped {where}{kept}")
            raise
        if done == 0 and not already:
            fail("no images found in the given inputs")
        if report_data is not None and report is not None:
            from ..outputs.report import write_html

            made_by = report_provenance(
                weights_info.path, weights_info.fingerprint, heads, rule=rule, threshold=threshold, calibration=calibration,
                alpha=verdicts.alpha if verdicts is not None and fdr is None else None, fdr=fdr, precision=precision,
                embeddings=embeddings, quantize=quantize, draft=draft or None,
            )
            write_html(report, report_data.render(verdicts, provenance=made_by))
            info(f"wrote the report to {report}")
        if failed:
            info(f"{failed} of {done} inputs could not be scored (see their error records)")
            raise typer.Exit(EXIT_PARTIAL)
        raise typer.Exit(EXIT_OK)


def _check_calibration_options(calibration: Path | None, alpha: float | None, fdr: float | None, fmt: str, output: str | Path | None, resume: bool) -> None:
    """--alpha and --fdr only mean something with a calibration; --fdr needs the whole run before writing."""
    if calibration is None and (alpha is not None or fdr is not None):
        fail(f"{'--alpha' if alpha is not None else '--fdr'} needs --calibration FILE (from 'clipn calibrate')")
    if fdr is not None and alpha is not None:
        fail("give --alpha (a false-alarm rate per image) or --fdr (a false-discovery rate over the run), not both")
    if fdr is not None and (resume or (fmt == "jsonl" and output is None)):
        fail("--fdr needs every p-value of the run before it writes: use --format json, csv or table, or --output FILE (not --resume)")


def _extra_columns(verdicts: CalibratedVerdicts | None) -> tuple[str, ...]:
    if verdicts is None:
        return ()
    return ("p_value",) if verdicts.fdr is None else ("p_value", "q_value")


def _detect_on_ray(args: dict) -> None:
    """`--engine ray`: the same checks and class heads as here, the scoring on the cluster."""
    from ..scale.ray_engine import require_ray
    from ..scale.worker import ScoreOptions
    from .scaleout import detect_on_ray

    require_ray()  # the engine itself first: no other check matters without it
    check_output("--report", args["report"])
    if args["output"] is not None and "://" not in args["output"]:
        check_output("--output", Path(args["output"]), directory=True)
    # shards are written as they finish and --fdr rewrites them at the end: resuming is allowed here
    _check_calibration_options(args["calibration"], args["alpha"], args["fdr"], args["fmt"] or "parquet", args["output"], False)
    if args["calibration"] is not None and args["threshold"] is not None:
        fail("give --threshold (a fixed score cut) or --calibration (a false-alarm rate), not both")
    if args["threshold"] is None and args["calibration"] is None and args["rule"] not in VERDICT_RULES:
        fail(f"--rule {args['rule']} has no threshold-free verdict: give --threshold T (e.g. its thr@95%ID from 'clipn eval') or --calibration FILE")
    pools = parse_negatives(args["negatives"], args["rule"])
    check_choice("--precision", args["precision"], PRECISIONS)
    check_choice("--quantize", args["quantize"], ("int8",))
    if not args["paths"]:
        fail("no inputs: give image files, directories, globs, tables, or - for paths on stdin")
    names = load_classes(args["classes"], args["classes_file"], args["embeddings"])
    preflight(args["weights"], args["device"], embeddings=args["embeddings"], templates=args["templates"], inputs=args["paths"],
              files={"--calibration": args["calibration"], "--words": args["words"]})
    options = ScoreOptions(rule=args["rule"], precision=args["precision"], exif_transpose=args["exif_transpose"],
                           details=args["details"], top_k=args["top_k"], draft=args["draft"], quantize=args["quantize"],
                           threshold=args["threshold"])
    detect_on_ray(
        paths=args["paths"], output=args["output"], fmt=args["fmt"], resume=args["resume"], cache=args["cache"], names=names,
        embeddings=args["embeddings"], weights=args["weights"], templates=args["templates"], device=args["device"],
        batch_size=args["batch_size"], workers=args["workers"], options=options, ray_address=args["ray_address"],
        actors=args["actors"], cpus_per_actor=args["cpus_per_actor"], gpus_per_actor=args["gpus_per_actor"],
        shard_size=args["shard_size"], pools=pools, words=args["words"], calibration=args["calibration"], alpha=args["alpha"],
        report=args["report"], fdr=args["fdr"],
    )


def _huge_pages_for_activations() -> None:
    """Let torch back large CPU tensors with transparent huge pages (Linux), unless the user chose.

    A ViT-B-16 forward pass at batch 32 allocates and frees gigabytes of activations, and with
    4 KB pages every batch faults them in afresh: huge pages make the CPU forward ~12% faster at no
    extra peak memory (benchmarks/). torch reads the variable at its first allocation, which in
    this process comes later: commands import torch only when they run.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _few_malloc_arenas(limit: int = 2) -> None:
    """Cap glibc's malloc arenas before the decoding threads start (Linux; no-op elsewhere).

    Each thread otherwise gets its own arena that keeps freed image buffers: with 2 decoding
    threads, a 256-image ViT-B-16 run peaked at 1418 MB, and at 1355 MB with the cap, at the
    same speed (measured on 2 cores).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).mallopt(-8, limit)  # -8 = M_ARENA_MAX
    except (OSError, AttributeError, TypeError):
        pass

