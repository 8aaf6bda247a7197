"""`--engine ray` for `clipn detect` and `clipn eval`: option checks and the summary lines; the work
is in `clipn_cli.scale`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import ENGINE, EXIT_OK, EXIT_PARTIAL, fail, info, warn
from ..verdicts import VerdictStep
from .runtime import calibrated_verdicts

if TYPE_CHECKING:
    from ..model.devices import RunRequest
    from ..scale.manifest import Manifest
    from ..scale.store import OutputStore
    from ..scale.worker import ScoreOptions, WorkerConfig

ENGINES = ("local", "ray")
EngineOpt = Annotated[str, typer.Option("--engine", rich_help_panel=ENGINE, help="local (this process) or ray (a Ray cluster: see --ray-address, --actors).")]
RayAddressOpt = Annotated[str | None, typer.Option("--ray-address", rich_help_panel=ENGINE, help="With --engine ray: 'auto' joins the cluster running here, ray://HOST:PORT or HOST:PORT another; default: start a local cluster.", show_default=False)]
ActorsOpt = Annotated[int | None, typer.Option("--actors", rich_help_panel=ENGINE, min=1, help="With --engine ray: scoring actors (each loads the weights once). Default: cluster GPUs / --gpus-per-actor, or CPUs / --cpus-per-actor.", show_default=False)]
GpusPerActorOpt = Annotated[float, typer.Option("--gpus-per-actor", rich_help_panel=ENGINE, min=0.0, help="With --engine ray: GPUs per actor (0 = CPU actors).")]
CpusPerActorOpt = Annotated[float | None, typer.Option("--cpus-per-actor", rich_help_panel=ENGINE, min=0.01, help="With --engine ray: CPUs per actor (its decoding threads and, on CPU, torch threads). Default: a whole node's CPUs for CPU actors (one actor per node, like local detect), 1 per GPU actor.", show_default=False)]
ShardSizeOpt = Annotated[int, typer.Option("--shard-size", rich_help_panel=ENGINE, min=1, help="With --engine ray: inputs per output shard (the unit of work and of --resume).")]


def ray_options_given(ray_address: str | None, actors: int | None, gpus_per_actor: float, cpus_per_actor: float | None, shard_size: int | None) -> bool:
    from ..scale.planner import DEFAULT_SHARD_SIZE

    return ray_address is not None or actors is not None or gpus_per_actor != 0.0 or cpus_per_actor is not None or shard_size not in (None, DEFAULT_SHARD_SIZE)


def detect_on_ray(
    *, paths: list[str], output: str | None, fmt: str | None, resume: bool, cache: Path | None,
    names: list[str], embeddings: Path | None, weights: Path | None, templates: str, run: RunRequest,
    options: ScoreOptions, ray_address: str | None, actors: int | None,
    cpus_per_actor: float | None, gpus_per_actor: float, shard_size: int, pools: tuple[str, ...] = (),
    words: Path | None = None, calibration: Path | None = None, alpha: float | None = None, report: Path | None = None,
    fdr: float | None = None,
) -> None:
    """Score `paths` on Ray into the folder `output`; exits like local detect (0, 1 or 2).

    Negative labels are mined and a calibration is checked here, once; the actors get the results.
    With another runtime than torch the image tower is exported here, once, before any actor starts.
    A `report` is built here afterwards from the finished shards (all of them, resumed ones too), and
    with `fdr` every shard is rewritten with its q-values once all are in.
    """
    from ..inputs.sources import iter_inputs
    from ..scale.manifest import previous_run
    from ..scale.ray_engine import Cluster, ClusterSpec, detect_job, require_ray, run_detect
    from ..scale.store import OutputStore

    fmt = _check_ray_output(fmt, output, cache)
    require_ray()
    store = OutputStore.open(output)
    previous_run(store, resume)  # a finished run is refused now, not after a cluster has started
    weights_path, heads, fingerprint = _heads_on_driver(weights, run.device, names, embeddings, templates, pools, words)
    verdicts = calibrated_verdicts(calibration, alpha, fdr, options.rule, heads, fingerprint)
    step = VerdictStep(options.rule, threshold=options.threshold, calibrated=verdicts,
                       report_classes=heads.classes if report is not None else None)
    config = _worker_config(weights_path, fingerprint, run, gpus_per_actor)
    job = detect_job(fingerprint, heads, options, fmt, shard_size, verdicts, runtime=config.run.runtime)
    progress = _Progress()
    with Cluster(ClusterSpec(ray_address, actors, cpus_per_actor, gpus_per_actor), config, heads, options, verdicts) as cluster:
        info(f"scoring on Ray with {len(cluster.actors)} actors of {cluster.cpus_per_actor:g} CPUs; shards of {shard_size} inputs into {output}")
        if (warning := cluster.niceness_warning()) is not None:
            warn(warning)
        manifest = run_detect(iter_inputs(paths, sys.stdin), store, job, cluster, resume=resume, shard_size=shard_size,
                              progress=progress, finish=_fdr_pass(store, fdr))
    if manifest.inputs == 0:
        fail("no images found in the given inputs")
    if report is not None:
        from .export import runtime_provenance
        from .runtime import report_provenance

        made_by = report_provenance(
            weights_path, fingerprint, heads, rule=options.rule, threshold=options.threshold, calibration=calibration,
            alpha=verdicts.alpha if verdicts is not None and fdr is None else None, fdr=fdr, precision=options.precision,
            embeddings=embeddings, quantize=options.quantize, draft=options.draft or None, engine="ray",
            runtime=runtime_provenance(None, config.run.runtime, run.precision, run.quantize),
        )
        _write_report(report, output, step, made_by)
    _summary(manifest, output, progress.shards if resume else None)


def _check_ray_output(fmt: str | None, output: str | None, cache: Path | None) -> str:
    """The shard format (default parquet), with the options a Ray run cannot take refused."""
    from ..outputs.records import SHARD_FORMATS

    fmt = fmt or "parquet"
    if fmt not in SHARD_FORMATS:
        fail(f"--engine ray writes shards as {' or '.join(SHARD_FORMATS)}, not '{fmt}' (--format {'|'.join(SHARD_FORMATS)})")
    if output is None:
        fail("--engine ray needs --output DIR (a folder or a URI such as s3://bucket/run) for its shards and manifest")
    if cache is not None:
        fail("--cache is not supported with --engine ray for detect (the workers may not share this machine's disk)")
    return fmt


def _worker_config(weights: Path, fingerprint: str, run: RunRequest, gpus_per_actor: float) -> WorkerConfig:
    """What every actor gets: `run` with `--runtime auto` decided here (CPU actors only: the measurement
    is of a CPU), and the runtime's export, made here once so that no two actors ever export at once."""
    from dataclasses import replace

    from ..scale.worker import WorkerConfig
    from .export import choose_runtime, exported_for_workers

    if run.quantize and run.runtime == "openvino":
        fail("--quantize int8 runs with --runtime onnx (ONNX Runtime's int8) or torch, not --runtime openvino")
    on_cpu = gpus_per_actor == 0 and run.device in ("auto", "cpu")
    run = replace(run, runtime=choose_runtime(run.runtime, run.precision, run.quantize, fingerprint, on_cpu))
    return WorkerConfig(str(weights), run, runtime_file=exported_for_workers(weights, run.runtime, run.quantize))


def _fdr_pass(store: OutputStore, fdr: float | None) -> Callable[[Manifest], None] | None:
    """With --fdr, the pass that rewrites every shard with its q-value once all are in."""
    if fdr is None:
        return None
    from ..scale.output import apply_fdr

    def finish(manifest: Manifest) -> None:
        info(f"Benjamini-Hochberg at FDR {fdr:g} over the run's p-values: rewriting {len(manifest.shards)} shards")
        flagged = apply_fdr(store, manifest, fdr)
        info(f"{flagged} OOD verdicts at FDR {fdr:g}")

    return finish


def _summary(manifest: Manifest, output: str, scored_now: int | None) -> None:
    """The closing lines of a Ray run, and its exit: 0, or 1 when some inputs have error records."""
    info(f"{manifest.records} records ({manifest.errors} errors) in {len(manifest.shards)} shards in {output}"
         + (f"; {scored_now} shards scored now" if scored_now is not None else ""))
    if manifest.errors:
        info(f"{manifest.errors} of {manifest.records} inputs could not be scored (see their error records)")
        raise typer.Exit(EXIT_PARTIAL)
    raise typer.Exit(EXIT_OK)


def _write_report(report: Path, output: str, step: VerdictStep, provenance: dict | None = None) -> None:
    """The detect report of a whole Ray run, gathered record by record from its shards in bounded memory."""
    from ..outputs.report import write_html
    from ..scale import read_output

    for record in read_output(output):
        step.gather(record)
    write_html(report, step.render_report(provenance))
    info(f"wrote the report to {report}")


def _heads_on_driver(
    weights: Path | None, device: str, names: list[str], embeddings: Path | None, templates: str,
    pools: tuple[str, ...] = (), words: Path | None = None,
):
    """Class heads (with the negative labels of `pools`) made once on the driver: the workers get
    them, and need only the image tower.

    With --embeddings the driver reads only the weights' header (for the fingerprint check), unless
    the file predates stored fingerprints; its negative labels must then be stored in it, as locally.
    """
    from ..heads.embeddings import ClassEmbeddings
    from ..weights.home import resolve_weights
    from ..weights.checkpoints import read_info
    from .runtime import add_negatives, class_embeddings, load_weights_for_cli

    if embeddings is not None and (weights_info := read_info(resolve_weights(weights))).fingerprint:
        heads = ClassEmbeddings.load(embeddings)
        heads.check_weights(weights_info.fingerprint, str(embeddings))
        add_negatives(None, weights_info, heads, pools, words, source=embeddings)
        return weights_info.path, heads, weights_info.fingerprint
    model, weights_info = load_weights_for_cli(weights, device, text=embeddings is None)
    heads = class_embeddings(model, weights_info, names, embeddings, templates)
    add_negatives(model, weights_info, heads, pools, words, source=embeddings)
    return weights_info.path, heads, weights_info.fingerprint


class _Progress:
    """Counts shards scored in this run (and shows them on a terminal's stderr)."""

    def __init__(self) -> None:
        self.shards = 0

    def __call__(self, summary: dict) -> None:
        self.shards += 1
        if sys.stderr.isatty():
            info(f"shard {summary['file']}: {summary['records']} records")
