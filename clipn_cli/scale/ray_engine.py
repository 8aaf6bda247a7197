"""Running clipn on a Ray cluster: shards dispatched to a pool of actors, each loading the weights once.

Why Ray core actors for `detect --engine ray` rather than one Ray Data pipeline: the inputs arrive
as a stream (a directory walk, stdin, a table) that is planned into shards while earlier shards
already run, every shard is written and committed on its own (that is what makes `--resume` exact)
and the driver keeps at most `2 × actors` shards in flight, so its memory stays flat. Ray gives
the actors, their placement on GPUs and CPUs, and their restart when a worker is lost (the shard
it held is retried on another actor). People composing their own Ray Data pipelines use
`score_dataset`, which runs the same worker code inside `Dataset.map_batches`.

The cluster itself (joining or starting Ray, the actor pool, dispatch) is `cluster.py`; this module
is the driver's side of a job: what a run's shards mean, planning and committing them, encoding on
the cluster, and Ray Data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .. import __version__
from .cluster import (  # noqa: F401  (also imported from here: the public names of scale-out)
    IN_FLIGHT_PER_ACTOR, INSTALL_HINT, NICENESS_ENV, Cluster, ClusterSpec, EngineError, RayMissing, actor_config, require_ray,
)
from ..model.devices import RunRequest
from .manifest import Manifest, ManifestWriter, ResumeError, check_resumable, previous_run
from .planner import DEFAULT_SHARD_SIZE, plan_shards
from .store import SHARDS
from .worker import ScoreOptions, Worker, WorkerConfig

if TYPE_CHECKING:
    from ..scores.calibration import CalibratedVerdicts
    from ..heads.embeddings import ClassEmbeddings
    from ..inputs.sources import InputItem
    from ..model.encode import EncodedImage
    from .store import OutputStore


def detect_job(
    weights_fingerprint: str, heads: ClassEmbeddings, options: ScoreOptions, fmt: str, shard_size: int,
    verdicts: CalibratedVerdicts | None = None, runtime: str = "torch",
) -> dict[str, Any]:
    """What a run's shards mean: two runs can share an output folder only if this is equal.

    Negative labels and a calibration enter by digest (their words and scores decide the numbers);
    a runtime other than torch by name (runs of torch, from before runtimes, stay resumable).
    """
    job = {
        "clipn_version": __version__,
        "command": "detect",
        "weights_fingerprint": weights_fingerprint,
        "classes": list(heads.classes),
        "templates": heads.templates,
        "format": fmt,
        "shard_size": shard_size,
        **options.as_dict(),
    }
    if runtime != "torch":
        job["runtime"] = runtime
    if heads.negatives:
        job["negatives"] = {pool: n.digest() for pool, n in sorted(heads.negatives.items())}
    if verdicts is not None:
        scores = verdicts.calibration.scores[verdicts.method]
        job["calibration"] = {"method": verdicts.method, "alpha": verdicts.alpha, "fdr": verdicts.fdr, "count": int(scores.size),
                              "scores_sha256": hashlib.sha256(scores.tobytes()).hexdigest()}
    return job


def open_manifest(store: OutputStore, job: dict[str, Any], resume: bool) -> Manifest:
    """The manifest to continue (`resume`) or a new one; refuses to overwrite another run."""
    old = previous_run(store, resume)
    if old is None:
        return Manifest(job)
    check_resumable(old, job, store.uri)
    old.job["clipn_version"] = job["clipn_version"]
    old.complete = False
    present = set(store.list(SHARDS))  # one listing, not a request per shard
    for index in [i for i, s in old.shards.items() if s["file"].split("/", 1)[1] not in present]:
        del old.shards[index]  # committed, but its file is gone: scored again, never counted without its records
    return old


def run_detect(
    items: Iterable[InputItem],
    store: OutputStore,
    job: dict[str, Any],
    cluster: Cluster,
    resume: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Callable[[dict[str, Any]], None] | None = None,
    manifest_interval: float = 2.0,
    finish: Callable[[Manifest], None] | None = None,
) -> Manifest:
    """Plan `items` into shards, score the unfinished ones on the cluster, commit each in the manifest.

    Returns the final manifest (complete). Shards already listed in a resumed manifest are not
    scored again; their digests must match the inputs as planned now, or the inputs changed and
    the run cannot be continued exactly. `finish` (a pass over the whole output, e.g. `apply_fdr`)
    runs once every shard is in, before the manifest says complete: an interrupted one runs again
    on --resume.
    """
    store.prepare()
    manifest = open_manifest(store, job, resume)
    if resume:
        store.remove_temporaries()
    writer = ManifestWriter(store, manifest, manifest_interval)
    writer.flush()
    planned = inputs = 0

    def todo() -> Iterator[Any]:
        nonlocal planned, inputs
        for shard in plan_shards(items, shard_size):
            planned = shard.index + 1
            inputs += len(shard.items)
            done = manifest.shards.get(shard.index)
            if done is None:
                yield shard
            elif done["digest"] != shard.digest:
                raise ResumeError(f"--resume {store.uri}: the inputs of shard {shard.index} differ from the first run's "
                                  "(files added, removed or reordered): continue with the same inputs, or use a new --output")

    fmt = job["format"]
    try:
        for shard, summary in cluster.map_unordered(lambda actor, s: actor.write_shard.remote(s.index, s.items, store, fmt), todo()):
            writer.finished(shard.index, summary)
            if progress:
                progress(summary)
    finally:
        writer.flush()
    stale = [i for i in manifest.shards if i >= planned]
    if stale:
        raise ResumeError(f"--resume {store.uri}: the first run had {max(stale) + 1} or more shards, these inputs make {planned}: "
                          "continue with the same inputs, or use a new --output")
    manifest.inputs = inputs
    if finish is not None:
        finish(manifest)
    manifest.complete = True
    writer.flush(force=True)
    return manifest


class ClusterEncoder:
    """`model.encode.encode_images` on the cluster, for `evaluate(..., encoder=...)`: image features come
    back in input order (the driver's feature cache, if any, is consulted first by `encode_images`)."""

    def __init__(self, cluster: Cluster, options: ScoreOptions, chunk: int = 256) -> None:
        self.cluster = cluster
        self.options = options
        self.chunk = chunk

    def __call__(self, model: Any, items: Iterable[InputItem], batch_size: int | None = None, workers: int | None = None,
                 precision: str = "fp32", exif_transpose: bool = False, on_loaded: Any = None, draft: bool = False) -> Iterator[EncodedImage]:
        from ..model.encode import EncodedImage

        asked = (precision, exif_transpose, draft)
        if asked != (self.options.precision, self.options.exif_transpose, self.options.draft):
            raise ValueError(f"the cluster's workers encode with {self.options}, not precision={precision}, exif_transpose={exif_transpose}, draft={draft}")
        chunks = _chunks(items, self.chunk)
        in_flight = IN_FLIGHT_PER_ACTOR * len(self.cluster.actors)
        for _, encoded in self.cluster.map_ordered(lambda actor, c: actor.encode.remote(c), chunks, in_flight):
            for path, feature, error in encoded:
                yield EncodedImage(path, feature, error)


def encode_on_cluster(cluster: Cluster, items: Iterable[InputItem], options: ScoreOptions) -> Iterator[EncodedImage]:
    """Image features of `items` computed by the cluster's actors, in input order."""
    return ClusterEncoder(cluster, options)(None, items, precision=options.precision,
                                            exif_transpose=options.exif_transpose, draft=options.draft)


def _chunks(items: Iterable[InputItem], size: int) -> Iterator[list[InputItem]]:
    chunk: list[InputItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class DatasetScorer:
    """The callable class `score_dataset` gives `Dataset.map_batches`: one `Worker` per actor."""

    def __init__(
        self, config: WorkerConfig, heads: ClassEmbeddings, options: ScoreOptions, path_column: str, bytes_column: str | None,
        verdicts: CalibratedVerdicts | None = None,
    ) -> None:
        self.worker = Worker(config, heads, options, verdicts)
        self.path_column = path_column
        self.bytes_column = bytes_column

    def __call__(self, batch: dict[str, Any]) -> Any:
        from ..inputs.sources import InputItem
        from ..outputs.records import to_table

        paths = [str(p) for p in batch[self.path_column]]
        if self.bytes_column is not None:
            items = [InputItem(p, data=bytes(b) if b is not None else b"") for p, b in zip(paths, batch[self.bytes_column])]
        else:
            items = [InputItem(p) for p in paths]
        return to_table(self.worker.detect(items), self.worker.options.details, self.worker.extra_columns)


def score_dataset(
    ds: Any,
    weights: str,
    heads: ClassEmbeddings,
    options: ScoreOptions | None = None,
    *,
    path_column: str = "path",
    bytes_column: str | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    batch_size: int = 256,
    device: str = "auto",
    verdicts: CalibratedVerdicts | None = None,
) -> Any:
    """Map a Ray Dataset of image paths (or of paths and file bytes) to a Dataset of clipn records.

    Each row of the result is one `clipn detect` record (`path`, `error`, `verdict`, `rule`, `class`,
    `class_index`, the scores; null where a record lacks a field), decoded and scored by clipn's own
    pipeline in `actors` actors that load the image tower of `weights` once each. With
    `bytes_column` (e.g. "bytes" from `ray.data.read_binary_files(..., include_paths=True)`) the
    images are decoded from those bytes, `path_column` only names them. `verdicts`
    (`CalibratedVerdicts`, from `Calibration.load`) adds `p_value` and calibrated verdicts.
    """
    ray = require_ray()
    options = options or ScoreOptions()
    request = RunRequest(device, precision=options.precision, quantize=options.quantize)
    config = actor_config(WorkerConfig(str(weights), request), cpus_per_actor, gpus_per_actor)
    return ds.map_batches(
        DatasetScorer,
        fn_constructor_kwargs=dict(config=config, heads=heads, options=options, path_column=path_column, bytes_column=bytes_column,
                                   verdicts=verdicts),
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
    )
