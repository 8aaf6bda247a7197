"""What one worker (a Ray actor, or this process) does: load the image tower once, then score or
encode lists of inputs with clipn's own pipeline (`images` decoding, `inference`, `detection`).

Nothing here imports Ray, so the exact same code runs in a test, in a local process and in an
actor; only `ray_engine` knows about the cluster.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..model.devices import RunRequest
from ..verdicts import VerdictStep

if TYPE_CHECKING:
    import torch

    from ..scores.calibration import CalibratedVerdicts
    from ..heads.embeddings import ClassEmbeddings
    from ..inputs.sources import InputItem
    from .store import OutputStore


@dataclass(frozen=True)
class ScoreOptions:
    """Everything that decides the numbers and the records, fixed for a whole run."""

    rule: str = "atd"
    precision: str = "fp32"
    exif_transpose: bool = False
    details: bool = False
    top_k: int = 0
    draft: bool = False
    quantize: str | None = None
    threshold: float | None = None  # OOD below this score (rules without a threshold-free verdict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorkerConfig:
    """Where and how a worker runs: the weights file, the run's options as given (each worker resolves
    them on its own device), and with another runtime than torch the image tower its driver exported."""

    weights: str
    run: RunRequest = RunRequest()
    threads: int | None = None  # torch intra-op threads (a CPU actor gets its share of the node)
    runtime_file: str | None = None  # the export `run.runtime` loads (made once by the driver, never here)


class Worker:
    """The image tower of one set of weights, loaded once, scoring inputs against class heads."""

    def __init__(
        self, config: WorkerConfig, heads: ClassEmbeddings | None, options: ScoreOptions, verdicts: CalibratedVerdicts | None = None,
    ) -> None:
        import torch

        from ..model.devices import resolve_device
        from ..weights.checkpoints import load_model

        if (options.precision, options.quantize) != (config.run.precision, config.run.quantize):
            raise ValueError(f"the run computes with precision={config.run.precision}, quantize={config.run.quantize}, not as {options}")
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model, self.info = load_model(config.weights, device=resolve_device(config.run.device), text=False)
        self.run = config.run.resolve(self.model)  # once, on this worker's device
        self._attach_runtime(config.runtime_file)
        self.heads = heads
        self.options = options
        self.verdicts = verdicts
        self.step = VerdictStep(options.rule, threshold=options.threshold, calibrated=verdicts) if heads is not None else None
        self.config = config
        self.pid = os.getpid()

    def _attach_runtime(self, runtime_file: str | None) -> None:
        """The image tower of `run.runtime`: torch's int8 path, or the export at `runtime_file` (loaded, not made)."""
        if self.run.runtime == "torch":
            if self.run.quantize:
                from ..model.encode import quantize_image_tower

                quantize_image_tower(self.model)
            return
        from ..runtimes.towers import load_runtime

        if runtime_file is None:
            raise ValueError(f"--runtime {self.run.runtime} on a worker needs the file its driver exported")
        load_runtime(self.model, self.run.runtime, self.run.precision, runtime_file, self.info.fingerprint, self.run.quantize)

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """Shard columns beyond detect's own: `p_value` with calibrated verdicts (`q_value` comes with the FDR pass)."""
        return self.step.record_columns if self.step is not None else ()

    def niceness(self) -> int:
        """This process's nice value: Ray starts its workers at 15 unless told otherwise."""
        return os.getpriority(os.PRIO_PROCESS, 0)

    def version(self) -> str:
        """The clipn-cli version this worker runs (the driver refuses a mixed cluster)."""
        from .. import __version__

        return __version__

    def detect(self, items: Sequence[InputItem]) -> list[dict[str, Any]]:
        """detect's records for `items`, in order (error records for unreadable inputs); with calibrated
        verdicts, each record's `p_value` and verdict as local detect gives them."""
        from ..detection import detect

        o = self.options
        if self.heads is None or self.step is None:
            raise ValueError("this worker encodes only: it was given no class heads")
        results = detect(
            self.model, self.heads, items, rule=o.rule, options=self.run, exif_transpose=o.exif_transpose, details=o.details,
            top_k=o.top_k, draft=o.draft, threshold=self.step.engine_threshold,
        )
        return [self.step.apply(r.as_dict(o.details)) for r in results]

    def encode(self, items: Sequence[InputItem]) -> list[tuple[str, torch.Tensor | None, str | None]]:
        """(path, normalized feature or None, error) per input, in order: `model.encode.encode_images`."""
        from ..model.encode import encode_images

        o = self.options
        encoded = encode_images(self.model, items, exif_transpose=o.exif_transpose, draft=o.draft, options=self.run)
        return [(e.path, e.feature, e.error) for e in encoded]

    def write_shard(self, index: int, items: Sequence[InputItem], store: OutputStore, fmt: str) -> dict[str, Any]:
        """Score one shard and write its file; returns the summary the manifest records."""
        from .planner import shard_digest, shard_name
        from ..outputs.records import encode_shard

        records = self.detect(items)
        name = f"{shard_name(index)}.{fmt}"
        store.write(encode_shard(records, fmt, self.options.details, self.extra_columns), "shards", name)
        return {"file": f"shards/{name}", "records": len(records), "errors": sum("error" in r for r in records),
                "digest": shard_digest(items)}
