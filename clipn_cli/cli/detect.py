"""`clipn detect`: one ID/OOD verdict per image."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from ..model.devices import RunOptions, tune_process
from ..scores.methods import RULES, VERDICT_RULES
from ..inputs.sources import INPUT_KINDS_HELP
from ..outputs.writers import FILE_ONLY, FORMATS, check_writer
from ..verdicts import VerdictStep, check_verdict_options
from .common import (
    INPUTS, MODEL, RULE, OUTPUT, CALIBRATION, ENGINE,
    EXIT_OK, EXIT_PARTIAL, PRECISIONS, BatchSizeOpt, ClassesFileOpt, ClassesOpt, DeviceOpt, ExifOpt, NegativesOpt, PrecisionOpt,
    RuntimeOpt, TemplatesOpt, Terminated, WeightsOpt, WordsOpt, WorkersOpt, check_choice, check_output, check_stdout, fail, handle_errors, info, stderr,
    stdout_is_terminal,
)
from .export import check_runtime_option, runtime_provenance, use_runtime
from .scaleout import ENGINES, ActorsOpt, CpusPerActorOpt, EngineOpt, GpusPerActorOpt, RayAddressOpt, ShardSizeOpt, ray_options_given
from .runtime import (
    add_negatives, calibrated_verdicts, check_inputs, class_embeddings, load_classes, load_weights_for_cli, parse_negatives, preflight, report_provenance,
)

if TYPE_CHECKING:
    from ..inputs.sources import InputItem
    from ..model.clipn import CLIPN
    from ..weights.checkpoints import WeightsInfo


def detect(
    paths: Annotated[list[str] | None, typer.Argument(help=f"Inputs: {INPUT_KINDS_HELP}.", show_default=False)] = None,
    classes: ClassesOpt = None,
    classes_file: ClassesFileOpt = None,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", "-e", rich_help_panel=INPUTS, help="Class embeddings from 'clipn embed-classes'.", show_default=False)] = None,
    weights: WeightsOpt = None,
    templates: TemplatesOpt = "clipn",
    rule: Annotated[str, typer.Option("--rule", rich_help_panel=RULE, help=f"Verdict rule: {', '.join(RULES)}. Threshold-free: {', '.join(VERDICT_RULES)} (atd = agreeing-to-differ, ctw = competing-to-win); the others need --threshold or --calibration.")] = "atd",
    threshold: Annotated[float | None, typer.Option("--threshold", rich_help_panel=RULE, help="Call an image OOD when the rule's score is below T (needed by rules without a threshold-free verdict, e.g. thr@95%ID from 'clipn eval').", show_default=False)] = None,
    negatives: NegativesOpt = None,
    words: WordsOpt = None,
    fmt: Annotated[str | None, typer.Option("--format", "-f", rich_help_panel=OUTPUT, help=f"{', '.join(FORMATS[:-1])} or {FORMATS[-1]} (written to --output FILE only: {', '.join(FILE_ONLY)}). Default: table on a terminal, jsonl otherwise.", show_default=False)] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", rich_help_panel=OUTPUT, help="Write results to this file instead of stdout (with --engine ray: a folder or URI for shards and manifest).", show_default=False)] = None,
    details: Annotated[bool, typer.Option("--details", rich_help_panel=OUTPUT, help="Add p_yes, logits_yes and logits_no (per class) to each record.")] = False,
    top_k: Annotated[int, typer.Option("--top-k", rich_help_panel=OUTPUT, min=0, help="Add the K most probable classes to each record.")] = 0,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    precision: PrecisionOpt = "fp32",
    runtime: RuntimeOpt = "auto",
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
    server: Annotated[str | None, typer.Option("--server", rich_help_panel=ENGINE, help="Send the images to a running 'clipn serve' at this URL instead of loading a model (its weights, classes and rule apply; key from $CLIPN_API_KEY).", show_default=False)] = None,
) -> None:
    """Say ID or OOD for each image, from class names alone.

    Exit codes: 0 all inputs scored, 1 some inputs failed (error records), 2 usage or setup error.
    """
    tune_process()
    with handle_errors():
        check_choice("--rule", rule, RULES)
        check_choice("--engine", engine, ENGINES)
        if server is not None:
            return _detect_on_server(locals())
        if engine == "ray":
            return _detect_on_ray(locals())
        if ray_options_given(ray_address, actors, gpus_per_actor, cpus_per_actor, shard_size):
            fail("--ray-address, --actors, --gpus-per-actor, --cpus-per-actor and --shard-size need --engine ray")
        output = Path(output) if output is not None else None
        fmt = fmt or ("table" if output is None and stdout_is_terminal() else "jsonl")
        device = _check_options(paths, fmt, output, precision, quantize, runtime, device, resume, report)
        _check_calibration_options(calibration, alpha, fdr, fmt, output, resume)
        pools = parse_negatives(negatives, rule)
        check_verdict_options(rule, threshold, calibration is not None)
        names = load_classes(classes, classes_file, embeddings)
        preflight(weights, device, embeddings=embeddings, templates=templates, inputs=paths, files={"--calibration": calibration, "--words": words})
        if runtime in ("onnx", "openvino", "auto"):  # the torch-free fast start, when it can take this run (cli/fastpath.py)
            from .fastpath import fast_detect

            fast_detect(locals(), pools, _write_records)  # exits when it took the run
        model, weights_info = load_weights_for_cli(weights, device, text=embeddings is None)
        heads = class_embeddings(model, weights_info, names, embeddings, templates)
        add_negatives(model, weights_info, heads, pools, words, source=embeddings)
        verdicts = calibrated_verdicts(calibration, alpha, fdr, rule, heads, weights_info.fingerprint)
        step = VerdictStep(rule, threshold=threshold, calibrated=verdicts, report_classes=heads.classes if report is not None else None)
        runtime = _use_runtime(model, weights_info, runtime, precision, quantize)

        from ..model.feature_cache import FeatureCache
        from ..detection import detect as run_detect

        items, already = _pending_inputs(paths, output, step, resume)
        run = RunOptions.resolve(model, precision=precision, forward_batch=batch_size, decode_workers=workers,
                                 runtime=runtime, quantize=quantize)  # once, for the whole run
        results = run_detect(
            model, heads, items, rule=rule, options=run, exif_transpose=exif_transpose,
            details=details, top_k=top_k, cache=FeatureCache(cache, weights_info.fingerprint) if cache is not None else None,
            draft=draft, threshold=step.engine_threshold,
        )
        _write_records(step, (result.as_dict(details) for result in results), fmt, output, paths, already, details=details,
                       top_k=top_k, classes=heads.classes, resume=resume)
        if step.done == 0 and not already:
            fail("no images found in the given inputs")
        if report is not None:
            made_by = report_provenance(
                weights_info.path, weights_info.fingerprint, heads, rule=rule, threshold=threshold, calibration=calibration,
                alpha=verdicts.alpha if verdicts is not None and fdr is None else None, fdr=fdr, precision=precision,
                embeddings=embeddings, quantize=quantize, draft=draft or None, runtime=runtime_provenance(model, runtime, precision, quantize),
            )
            _write_report(report, step, made_by)
        if step.failed:
            info(f"{step.failed} of {step.done} inputs could not be scored (see their error records)")
            raise typer.Exit(EXIT_PARTIAL)
        raise typer.Exit(EXIT_OK)


def _write_report(report: Path, step: VerdictStep, made_by: dict[str, object]) -> None:
    """--report: the HTML page of what the verdict step gathered, with how the run was made."""
    from ..outputs.report import write_html

    write_html(report, step.render_report(made_by))
    info(f"wrote the report to {report}")


def _check_options(paths: list[str] | None, fmt: str, output: Path | None, precision: str, quantize: str | None, runtime: str,
                   device: str, resume: bool, report: Path | None) -> str:
    """Local detect's choices, their combinations and the files it will write, before the model loads;
    returns the device to load on (`check_runtime_option`)."""
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
    check_writer(fmt, output)
    if resume and (output is None or fmt != "jsonl"):
        fail("--resume needs --format jsonl and --output FILE (the file to continue)")
    if quantize and precision != "fp32":
        fail("--quantize int8 computes in fp32: it cannot be combined with --precision fp16 or bf16")
    check_output("--report", report)
    return device


def _use_runtime(model: CLIPN, weights_info: WeightsInfo, runtime: str, precision: str, quantize: str | None) -> str:
    """The image tower as the run computes it (torch's int8, or another runtime), then the heap frozen;
    returns the runtime used (`auto` resolved)."""
    if quantize and runtime in ("torch", "auto"):  # auto with --quantize is torch
        from ..model.encode import quantize_image_tower

        quantize_image_tower(model)
    runtime = use_runtime(model, weights_info, runtime, precision, quantize)
    # Modules, model and heads live until exit: freezing them spares the garbage collector from
    # walking torch's millions of objects during the run and at exit (exit 1.1 s → 0.2 s).
    gc.freeze()
    return runtime


def _pending_inputs(paths: list[str], output: Path | None, step: VerdictStep, resume: bool) -> tuple[Iterator[InputItem], set[str]]:
    """The inputs still to score, and (with --resume) the paths already in the output file."""
    from ..inputs.sources import iter_inputs
    from ..outputs.writers import resume_jsonl

    items = iter_inputs(paths, sys.stdin)
    already = resume_jsonl(output, step.gather) if resume and output is not None else set()
    if already:
        info(f"resuming: {len(already)} inputs already in {output} are skipped")
        items = (item for item in items if item.path not in already)
    return items, already


def _write_records(
    step: VerdictStep, records: Iterator[dict], fmt: str, output: Path | None, paths: list[str], already: set[str], *,
    details: bool, top_k: int, classes: list[str], resume: bool,
) -> None:
    """Feed the records through the verdict step into the writer, with a progress line; on Ctrl-C or
    SIGTERM say how far the run got (and how to continue it) before the CLI exits."""
    from ..outputs.progress import input_progress
    from ..outputs.writers import open_writer

    try:
        with input_progress(sys.stderr, paths, already) as status, open_writer(
            fmt, output, details=details, append=resume, columns=step.columns, top_k=top_k, classes=classes, status=status,
        ) as writer:
            for record in step.run(records, status.advance):
                writer.write(record)
    except (KeyboardInterrupt, Terminated):
        where = f"after {step.done} inputs (last: {step.last})" if step.last else "before any input was finished"
        kept = f"; {output} keeps every finished line, continue with --resume" if output is not None and fmt == "jsonl" else ""
        info(f"stopped {where}{kept}")
        raise


def _check_calibration_options(calibration: Path | None, alpha: float | None, fdr: float | None, fmt: str, output: str | Path | None, resume: bool) -> None:
    """--alpha and --fdr only mean something with a calibration; --fdr needs the whole run before writing."""
    if calibration is None and (alpha is not None or fdr is not None):
        fail(f"{'--alpha' if alpha is not None else '--fdr'} needs --calibration FILE (from 'clipn calibrate')")
    if fdr is not None and alpha is not None:
        fail("give --alpha (a false-alarm rate per image) or --fdr (a false-discovery rate over the run), not both")
    if fdr is not None and (resume or (fmt == "jsonl" and output is None)):
        fail("--fdr needs every p-value of the run before it writes: use --format json, csv or table, or --output FILE (not --resume)")


def _detect_on_ray(args: dict) -> None:
    """`--engine ray`: the same checks and class heads as here, the scoring on the cluster."""
    from ..model.devices import RunRequest
    from ..scale.ray_engine import require_ray
    from ..scale.worker import ScoreOptions
    from .scaleout import detect_on_ray

    require_ray()  # the engine itself first: no other check matters without it
    check_output("--report", args["report"])
    if args["output"] is not None and "://" not in args["output"]:
        check_output("--output", Path(args["output"]), directory=True)
    # shards are written as they finish and --fdr rewrites them at the end: resuming is allowed here
    _check_calibration_options(args["calibration"], args["alpha"], args["fdr"], args["fmt"] or "parquet", args["output"], False)
    pools = parse_negatives(args["negatives"], args["rule"])
    check_verdict_options(args["rule"], args["threshold"], args["calibration"] is not None)
    check_choice("--precision", args["precision"], PRECISIONS)
    check_choice("--quantize", args["quantize"], ("int8",))
    device = check_runtime_option(args["runtime"], args["precision"], args["device"])
    if not args["paths"]:
        fail("no inputs: give image files, directories, globs, tables, or - for paths on stdin")
    names = load_classes(args["classes"], args["classes_file"], args["embeddings"])
    preflight(args["weights"], device, embeddings=args["embeddings"], templates=args["templates"], inputs=args["paths"],
              files={"--calibration": args["calibration"], "--words": args["words"]})
    options = ScoreOptions(rule=args["rule"], precision=args["precision"], exif_transpose=args["exif_transpose"],
                           details=args["details"], top_k=args["top_k"], draft=args["draft"], quantize=args["quantize"],
                           threshold=args["threshold"])
    detect_on_ray(
        paths=args["paths"], output=args["output"], fmt=args["fmt"], resume=args["resume"], cache=args["cache"], names=names,
        embeddings=args["embeddings"], weights=args["weights"], templates=args["templates"], options=options,
        run=RunRequest(device, args["precision"], args["batch_size"], args["workers"], args["runtime"], args["quantize"]),
        ray_address=args["ray_address"],
        actors=args["actors"], cpus_per_actor=args["cpus_per_actor"], gpus_per_actor=args["gpus_per_actor"],
        shard_size=args["shard_size"], pools=pools, words=args["words"], calibration=args["calibration"], alpha=args["alpha"],
        report=args["report"], fdr=args["fdr"],
    )


SERVER_DECIDES = ("classes", "classes_file", "embeddings", "weights", "threshold", "negatives", "words", "calibration", "alpha", "fdr",
                  "cache", "quantize", "report", "resume", "ray_address", "actors")


def _detect_on_server(args: dict) -> None:
    """`--server URL`: the inputs' bytes go to a running `clipn serve`; its records are written as local detect writes them."""
    from ..inputs.sources import iter_inputs
    from ..outputs.writers import open_writer
    from ..serve.client import remote_records, server_info

    given = [name for name in SERVER_DECIDES if args[name] not in (None, False)]
    if given or args["engine"] != "local" or args["details"] or args["top_k"] or args["draft"]:
        option = "--" + (given[0] if given else "engine/--details/--top-k/--draft").replace("_", "-")
        fail(f"{option} cannot be used with --server: the server's weights, classes and rule apply (GET /v1/info shows them)")
    if not args["paths"]:
        fail("no inputs: give image files, directories, globs, or - for paths on stdin")
    check_inputs(args["paths"])
    output = Path(args["output"]) if args["output"] is not None else None
    fmt = args["fmt"] or ("table" if output is None and stdout_is_terminal() else "jsonl")
    check_choice("--format", fmt, FORMATS)
    check_output("--output", output)
    check_stdout(output)
    key = os.environ.get("CLIPN_API_KEY", "").strip() or None
    served = server_info(args["server"], key)
    columns = ("p_value",) if served.get("calibration_alpha") is not None else ()
    done = failed = 0
    with open_writer(fmt, output, columns=columns, classes=served.get("classes", []), status=None) as writer:
        for record in remote_records(args["server"], iter_inputs(args["paths"], sys.stdin), key, int(served["limits"]["max_upload_mb"] * (1 << 20))):
            writer.write(record)
            done += 1
            failed += "error" in record
    if done == 0:
        fail("no images found in the given inputs")
    if failed:
        info(f"{failed} of {done} inputs could not be scored (see their error records)")
        raise typer.Exit(EXIT_PARTIAL)
    raise typer.Exit(EXIT_OK)
