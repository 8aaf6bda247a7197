"""`clipn eval`: OOD detection metrics of CLIPN and the baselines on labelled ID and OOD sets."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, NoReturn

import typer

from ..inputs.sources import INPUT_KINDS_HELP
from .common import (
    INPUTS, MODEL, RULE, OUTPUT, CALIBRATION,
    EXIT_OK, EXIT_PARTIAL, PRECISIONS, BatchSizeOpt, ClassesFileOpt, ClassesOpt, DeviceOpt, ExifOpt, NegativesOpt, PrecisionOpt, RuntimeOpt,
    TemplatesOpt, WeightsOpt, WordsOpt, WorkersOpt, check_choice, check_output, check_stdout, fail, handle_errors, info, stderr, stdout_is_terminal,
    warn,
)
from .scaleout import ENGINES, ActorsOpt, CpusPerActorOpt, EngineOpt, GpusPerActorOpt, RayAddressOpt, ray_options_given
from .export import check_runtime_option, runtime_provenance, use_runtime
from .runtime import add_negatives, class_embeddings, load_classes, load_weights_for_cli, parse_negatives, preflight, report_provenance

if TYPE_CHECKING:
    from ..model.devices import RunRequest
    from ..scores.calibration import OperatingPoint
    from ..model.feature_cache import FeatureCache
    from ..outputs.results import Evaluation

FORMATS = ("table", "json", "csv")
CSV_COLUMNS = ("ood", "method", "auroc", "fpr95", "aupr_in", "aupr_out", "id_flagged", "ood_caught", "threshold_95", "fpr95_convention")


def evaluate(
    id_paths: Annotated[list[str], typer.Option("--id", rich_help_panel=INPUTS, help=f"ID images: {INPUT_KINDS_HELP} (one - among all --id/--ood). A directory's class-named sub-folders give ID accuracy. Repeatable: one class-named folder per --id also gives ID accuracy.", show_default=False)],
    ood: Annotated[list[str], typer.Option("--ood", rich_help_panel=INPUTS, help="OOD images as NAME=PATH (PATH as for --id). Repeatable; a repeated NAME merges its paths.", show_default=False)],
    classes: ClassesOpt = None,
    classes_file: ClassesFileOpt = None,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", "-e", rich_help_panel=INPUTS, help="Class embeddings from 'clipn embed-classes'.", show_default=False)] = None,
    weights: WeightsOpt = None,
    templates: TemplatesOpt = "clipn",
    negatives: NegativesOpt = None,
    words: WordsOpt = None,
    fmt: Annotated[str | None, typer.Option("--format", "-f", rich_help_panel=OUTPUT, help="table (percentages), json or csv (fractions). Default: table on a terminal, json otherwise.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", rich_help_panel=OUTPUT, help="Write the report to this file instead of stdout.", show_default=False)] = None,
    fpr_convention: Annotated[str, typer.Option("--fpr-convention", rich_help_panel=RULE, help="clipn: ID positive, OOD accepted at 95% ID recall, interpolated (CLIPN/MCM papers). openood: OOD positive, ID rejected at the first point with 95% OOD caught.")] = "clipn",
    save_scores: Annotated[Path | None, typer.Option("--save-scores", rich_help_panel=OUTPUT, help="Write every image's scores (path, set, all methods) as CSV, or JSON Lines if FILE ends in .jsonl.", show_default=False)] = None,
    plots: Annotated[Path | None, typer.Option("--plots", rich_help_panel=OUTPUT, help="Write ROC curves and score histograms per OOD set as PNG files into DIR (needs matplotlib).", show_default=False)] = None,
    cache: Annotated[Path | None, typer.Option("--cache", rich_help_panel=MODEL, help="Feature cache directory: images already encoded with these weights are not encoded again.", show_default=False)] = None,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    precision: PrecisionOpt = "fp32",
    runtime: RuntimeOpt = "auto",
    exif_transpose: ExifOpt = False,
    alpha: Annotated[float | None, typer.Option("--alpha", rich_help_panel=CALIBRATION, help="Also report calibrated verdicts: calibrate every method on a seeded random half of the ID images, report ID flagged on the other half and OOD caught per set.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=CALIBRATION, help="Seed of the random ID half for --alpha.")] = 0,
    report: Annotated[Path | None, typer.Option("--report", rich_help_panel=OUTPUT, help="Also write a self-contained HTML report (metrics, ROC with a log false-alarm axis, histograms, galleries).", show_default=False)] = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    actors: ActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = 0.0,
    cpus_per_actor: CpusPerActorOpt = None,
) -> None:
    """Measure how well CTW and ATD (and MSP, MaxLogit, Energy, MCM) separate ID from OOD images.

    Reports AUROC, FPR95, AUPR-In, AUPR-Out per OOD set and averaged, the CTW/ATD threshold-free
    operating points, each score's threshold at 95% ID recall, and ID accuracy when labels exist.

    Exit codes: 0 all images scored, 1 some images could not be read (left out, listed), 2 usage or setup error.
    """
    with handle_errors():
        fmt = fmt or ("table" if output is None and stdout_is_terminal() else "json")
        device = _check_options(fmt, precision, engine, runtime, device, (ray_address, actors, gpus_per_actor, cpus_per_actor))
        _check_outputs(output, save_scores, plots, report, alpha, fpr_convention)
        from ..inputs.sets import collect_sets, group_ood_specs

        pools = parse_negatives(negatives)
        names = load_classes(classes, classes_file, embeddings)
        preflight(weights, device, embeddings=embeddings, templates=templates, files={"--words": words})
        sets = collect_sets(id_paths, group_ood_specs(ood), sys.stdin)
        if alpha is not None:
            from ..scores.calibration import check_size

            check_size(len(sets[0].items) // 2, alpha, f"--alpha {alpha:g} on a random half of {len(sets[0].items)} ID images")
        model, weights_info = load_weights_for_cli(weights, device, text=embeddings is None)
        heads = class_embeddings(model, weights_info, names, embeddings, templates)
        add_negatives(model, weights_info, heads, pools, words, source=embeddings)
        runtime = use_runtime(model, weights_info, runtime, precision)

        from ..evaluation import evaluate as run_evaluation
        from ..model.devices import RunOptions, RunRequest
        from ..model.feature_cache import FeatureCache

        feature_cache = FeatureCache(cache, weights_info.fingerprint) if cache is not None else None
        run = RunOptions.resolve(model, precision=precision, forward_batch=batch_size, decode_workers=workers, runtime=runtime)  # once, for the whole run
        with _engine(engine, weights_info.path, RunRequest(device, precision, batch_size, workers, runtime), exif_transpose,
                     ray_address, actors, cpus_per_actor, gpus_per_actor) as encoder, \
                _progress(sum(len(s.items) for s in sets)) as advance:
            evaluation = run_evaluation(
                model, heads, sets, convention=fpr_convention, cache=feature_cache, exif_transpose=exif_transpose,
                progress=advance, encoder=encoder, options=run,
            )
        for note in evaluation.notes:
            warn(note)
        from ..evaluation import calibrated_points

        points = calibrated_points(evaluation, alpha, seed) if alpha is not None else []
        _write_report(evaluation, fmt, output, points, seed)
        if report is not None:
            from ..outputs.report import eval_report, write_html

            made_by = report_provenance(weights_info.path, weights_info.fingerprint, heads, precision=precision, embeddings=embeddings,
                                        runtime=runtime_provenance(model, runtime, precision, None),
                                        **{"FPR95 convention": fpr_convention, "alpha": alpha, "seed": seed if alpha is not None else None})
            write_html(report, eval_report(evaluation, points, provenance=made_by))
            info(f"wrote the report to {report}")
        _write_extras(evaluation, save_scores, plots)
        if feature_cache is not None:
            _tell_cache(feature_cache, cache)
        _exit(evaluation)


def _check_options(fmt: str, precision: str, engine: str, runtime: str, device: str, ray: tuple) -> str:
    """The choices and the engine before anything is loaded; returns the device to load on."""
    check_choice("--format", fmt, FORMATS)
    check_choice("--precision", precision, PRECISIONS)
    check_choice("--engine", engine, ENGINES)
    device = check_runtime_option(runtime, precision, device)
    if engine == "ray":
        from ..scale.ray_engine import require_ray

        require_ray()
    elif ray_options_given(*ray, None):
        fail("--ray-address, --actors, --gpus-per-actor and --cpus-per-actor need --engine ray")
    return device


def _check_outputs(output: Path | None, save_scores: Path | None, plots: Path | None, report: Path | None, alpha: float | None,
                   fpr_convention: str) -> None:
    """Every file the run will write, --alpha, the FPR95 convention and matplotlib (for --plots), before the
    model loads: a mistake here costs a second, not an evaluation."""
    check_output("--output", output)
    check_stdout(output)
    check_output("--save-scores", save_scores)
    check_output("--plots", plots, directory=True)
    check_output("--report", report)
    if alpha is not None:
        from ..scores.calibration import check_alpha

        check_alpha(alpha)
    from ..evaluation import check_convention

    check_convention(fpr_convention)
    if plots is not None:
        from ..outputs.plots import require_matplotlib

        require_matplotlib()


def _write_extras(evaluation: Evaluation, save_scores: Path | None, plots: Path | None) -> None:
    """--save-scores and --plots, each said on stderr."""
    if save_scores is not None:
        from ..outputs.results import write_scores

        write_scores(evaluation, save_scores)
        info(f"wrote per-image scores to {save_scores}")
    if plots is not None:
        from ..outputs.plots import write_plots

        written = write_plots(evaluation, plots)
        info(f"wrote {len(written)} plots to {plots}")


def _tell_cache(feature_cache: FeatureCache, cache: Path | None) -> None:
    """What the feature cache reused, stored and rebuilt, and how many entries could not be written."""
    stats = feature_cache.stats
    info(f"feature cache {cache}: {stats.hits} reused, {stats.written} encoded and stored"
         + (f", {stats.corrupt} damaged entries rebuilt" if stats.corrupt else ""))
    if stats.write_errors:
        warn(f"{len(stats.write_errors)} cache entries could not be written (first: {stats.write_errors[0]})")


def _exit(evaluation: Evaluation) -> NoReturn:
    """Exit 1 when images were left out (the first named), else 0."""
    failures = evaluation.failures
    if failures:
        first_set, first_path, first_error = failures[0]
        warn(f"{len(failures)} images could not be read and were left out (first: {first_path}: {first_error})")
        raise typer.Exit(EXIT_PARTIAL)
    raise typer.Exit(EXIT_OK)


@contextlib.contextmanager
def _engine(engine: str, weights: Path, run: RunRequest, exif_transpose: bool, ray_address: str | None, actors: int | None,
            cpus_per_actor: float | None, gpus_per_actor: float) -> Iterator[Callable | None]:
    """None (encode here) or, with --engine ray, an encoder that runs on a cluster for the block (its
    actors load the runtime's export made here, the one the local model already uses)."""
    if engine == "local":
        yield None
        return
    from ..scale.ray_engine import Cluster, ClusterEncoder, ClusterSpec
    from ..scale.worker import ScoreOptions, WorkerConfig

    from .export import exported_for_workers

    options = ScoreOptions(precision=run.precision, exif_transpose=exif_transpose)
    spec = ClusterSpec(ray_address, actors, cpus_per_actor, gpus_per_actor)
    config = WorkerConfig(str(weights), run, runtime_file=exported_for_workers(weights, run.runtime, run.quantize))
    with Cluster(spec, config, None, options) as cluster:
        info(f"encoding images on Ray with {len(cluster.actors)} actors of {cluster.cpus_per_actor:g} CPUs")
        if (warning := cluster.niceness_warning()) is not None:
            warn(warning)
        yield ClusterEncoder(cluster, options)


def _write_report(evaluation: Evaluation, fmt: str, output: Path | None, points: list[OperatingPoint] | None = None, seed: int = 0) -> None:
    from ..files import atomic_open
    from ..outputs.writers import TEXT_ERRORS, CsvRows, json_text

    with contextlib.ExitStack() as stack:
        stream: IO[str] = sys.stdout if output is None else stack.enter_context(atomic_open(output, "w", encoding="utf-8", errors=TEXT_ERRORS, newline=""))
        calibrated = {p.method: p for p in points or ()}
        if fmt == "json":
            found = evaluation.as_dict()
            if points:
                found["calibrated"] = {"alpha": points[0].alpha, "seed": seed, "split": "random half of the ID images calibrates, the other half tests",
                                       "results": [p.as_dict() for p in points]}
            stream.write(json_text(found, indent=2) + "\n")
        elif fmt == "csv":
            columns = CSV_COLUMNS + (("calibrated_alpha", "calibrated_id_flagged", "calibrated_ood_caught") if points else ())
            writer = CsvRows(stream, columns)
            writer.writeheader()
            for result in evaluation.results:
                row = {**result.as_dict(), "fpr95_convention": evaluation.convention}
                point = calibrated.get(result.method)
                if point is not None:
                    caught = point.ood_caught.get(result.ood, sum(point.ood_caught.values()) / len(point.ood_caught))
                    row.update(calibrated_alpha=point.alpha, calibrated_id_flagged=point.id_flagged, calibrated_ood_caught=caught)
                writer.writerow(row)
        else:
            _print_table(evaluation, stream)
            if points:
                _print_points(points, stream)
        stream.flush()


def _print_table(evaluation: Evaluation, stream: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..outputs.results import LABELS as METHODS
    from ..scores.metrics import FPR_CONVENTIONS

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.2f}"

    table = Table(header_style="bold", title="OOD detection (%)", title_justify="left")
    for name in ("OOD set", "method", "AUROC↑", "FPR95↓", "AUPR-In↑", "AUPR-Out↑", "ID flagged", "OOD caught", "thr@95%ID"):
        table.add_column(name, justify="left" if name in ("OOD set", "method") else "right")
    previous = None
    for r in evaluation.results:
        if previous is not None and r.ood != previous:
            table.add_section()
        previous = r.ood
        style = "bold" if r.ood == "average" else None
        table.add_row(Text(r.ood), METHODS[r.method], pct(r.auroc), pct(r.fpr95), pct(r.aupr_in), pct(r.aupr_out),
                      pct(r.id_flagged), pct(r.ood_caught), f"{r.threshold_95:.4g}", style=style)
    console = Console(file=stream, width=None if stream.isatty() else 160, highlight=False)
    console.print(table)
    counts = ", ".join(f"{s.name} {len(s.paths)}" for s in evaluation.sets)
    console.print(f"images: {counts}; classes: {len(evaluation.classes)}", markup=False)
    if evaluation.id_accuracy is not None:
        console.print(f"ID top-1 accuracy: {100 * evaluation.id_accuracy:.2f}%", markup=False)
    console.print(f"FPR95 ({evaluation.convention}): {FPR_CONVENTIONS[evaluation.convention]}", markup=False)
    console.print("ID flagged / OOD caught: images a threshold-free rule (CTW, ATD, ATD+NegLabel) calls OOD. "
                  "thr@95%ID: score threshold keeping 95% of ID images (score >= thr is ID).", markup=False)


def _print_points(points: list[OperatingPoint], stream: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..outputs.results import METHODS

    first = points[0]
    table = Table(header_style="bold", title_justify="left", title=f"Calibrated verdicts at alpha {first.alpha:g} (%)", caption_justify="left",
                  caption=f"each method calibrated on {first.calibration_size} random ID images, tested on the other {first.id_test_size}")
    table.add_column("method")
    table.add_column("ID flagged", justify="right")
    for name in first.ood_caught:
        table.add_column(Text(f"OOD caught: {name}"), justify="right")
    for p in points:
        table.add_row(METHODS[p.method], f"{100 * p.id_flagged:.2f}", *(f"{100 * v:.2f}" for v in p.ood_caught.values()))
    Console(file=stream, width=None if stream.isatty() else 160, highlight=False).print(table)


def _progress(total: int) -> contextlib.AbstractContextManager[Callable[[int], None] | None]:
    """A progress bar on a terminal's stderr; nothing in pipelines and tests."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar() -> Iterator[Callable[[int], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        with Progress("images", MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(), console=stderr, transient=True) as progress:
            task = progress.add_task("images", total=total)
            yield lambda n: progress.advance(task, n)

    return bar()
