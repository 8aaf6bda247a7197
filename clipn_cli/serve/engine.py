"""The model behind the server: one thread owns it; requests hand it decoded images and get records back.

Batches form only under load: a lone request is scored at once; while requests are still being
received or decoded, the worker waits at most `max_wait` for them, up to `max_batch` images.
Admission (`Batcher.admit`) bounds the requests held at once, so memory never grows with the number
of waiting clients: the rest are refused (429) before their bodies are read.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..verdicts import VerdictStep

if TYPE_CHECKING:
    from ..heads.embeddings import ClassEmbeddings
    from ..inputs.decode import LoadedImage
    from ..model.clipn import CLIPN
    from ..model.encode import EncodedImage
    from ..scores.calibration import CalibratedVerdicts

Score = Callable[[list["LoadedImage"]], list[dict[str, Any]]]


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts; README "Serve" documents each (`clipn serve --help` names the options)."""

    max_batch: int = 16  # images per forward pass
    max_wait_ms: float = 5.0  # the longest a batch waits for requests still arriving
    queue: int = 16  # requests held at once (receiving, decoding, waiting, scoring); more get 429
    max_upload_mb: float = 16.0  # request body
    timeout: float = 30.0  # seconds to receive a request body (408 after), and idle keep-alive connections
    max_images: int = 64  # images per request

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))


def verdict_step(
    encoded: list[EncodedImage], heads: ClassEmbeddings, step: VerdictStep, permutation_device: Any = "cpu",
) -> list[dict[str, Any]]:
    """Records for encoded images as `clipn detect` makes them, through the run's shared `VerdictStep`
    (the rule's verdict, `score < threshold`, or the calibrated one; no FDR: it needs a whole run)."""
    from ..detection import score_encoded

    detections = score_encoded(
        encoded, heads, rule=step.rule, chunk=max(1, len(encoded)), permutation_device=permutation_device,
        threshold=step.engine_threshold,
    )
    return [step.apply(d.as_dict(False)) for d in detections]


CPU_FORWARD_CHUNK = 4  # images per CPU forward pass, whatever --max-batch gathers


class ModelScorer:
    """Decoded images → records with the loaded model: features in forward chunks, then `verdict_step`.

    A batch runs through the model `max_batch` images at a time on a GPU, but at most
    `CPU_FORWARD_CHUNK` on a CPU: a ViT-B-16 forward pass holds ~15 MB of activations per image
    (peaks of +200-240 MB at 16 images, +60-70 MB at 4) and scores as many images per second at
    4 as at 16 (benchmarks/README.md "Serve"), so the server's memory does not grow with the batch.
    """

    def __init__(self, model: CLIPN, heads: ClassEmbeddings, rule: str, threshold: float | None,
                 verdicts: CalibratedVerdicts | None, precision: str, max_batch: int) -> None:
        self.model, self.heads, self.rule, self.threshold, self.verdicts = model, heads, rule, threshold, verdicts
        self.step = VerdictStep(rule, threshold=threshold, calibrated=verdicts)
        self.precision, self.max_batch = precision, max_batch
        self.device = next(model.parameters()).device
        self.chunk = max_batch if self.device.type == "cuda" else min(max_batch, CPU_FORWARD_CHUNK)

    def __call__(self, loaded: list[LoadedImage]) -> list[dict[str, Any]]:
        import torch

        from ..model.encode import EncodedImage, encode_batch

        good = [image.pixels for image in loaded if image.pixels is not None]
        features: list[torch.Tensor] = []
        for start in range(0, len(good), self.chunk):
            features.extend(encode_batch(self.model, torch.stack(good[start:start + self.chunk]), self.device, self.precision))
        found = iter(features)
        encoded = [EncodedImage(i.path, next(found), None) if i.pixels is not None else EncodedImage(i.path, None, i.error) for i in loaded]
        return verdict_step(encoded, self.heads, self.step, self.device)


_Job = tuple[list["LoadedImage"], Future]


class Batcher:
    """The one thread that runs `score`, fed by a queue of admitted requests."""

    def __init__(self, score: Score, max_batch: int, max_wait_ms: float, capacity: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self._score, self._max_batch, self._max_wait = score, max_batch, max_wait_ms / 1000
        self._capacity, self._on_batch = capacity, on_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0
        self._arriving = 0  # admitted, not yet queued: a batch may wait for them
        self._held: _Job | None = None  # taken from the queue, left for the next batch (it would overflow this one)
        self._thread = threading.Thread(target=self._run, name="clipn-serve-model", daemon=True)
        self._thread.start()

    def admit(self) -> bool:
        """Take a place for a request, or False when all `capacity` places are taken (answer 429)."""
        with self._lock:
            if self._admitted >= self._capacity:
                return False
            self._admitted += 1
            self._arriving += 1
            return True

    def submit(self, images: list[LoadedImage]) -> Future:
        """Queue an admitted request's images; the future gets their records, in order."""
        future: Future = Future()
        with self._lock:
            self._arriving -= 1
            self._jobs.put((images, future))
        return future

    def release(self, submitted: bool) -> None:
        """Give back an admitted request's place (once answered, or failed before `submit`)."""
        with self._lock:
            self._admitted -= 1
            if not submitted:
                self._arriving -= 1

    def depth(self) -> int:
        """Requests admitted and not yet answered."""
        return self._admitted

    def close(self, wait: bool = True) -> None:
        """Score what is queued, then end the thread (`wait`: until it has ended)."""
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def _next_batch(self) -> list[_Job] | None:
        first = self._held if self._held is not None else self._jobs.get()
        self._held = None
        if first is None:
            return None
        batch, size = [first], len(first[0])
        deadline = time.monotonic() + self._max_wait
        while size < self._max_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                with self._lock:
                    waiting = self._arriving > 0
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                try:
                    job = self._jobs.get(timeout=left)
                except queue.Empty:
                    break
            if job is None:
                self._jobs.put(None)
                break
            if size + len(job[0]) > self._max_batch:
                self._held = job
                break
            batch.append(job)
            size += len(job[0])
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._answer(batch)
            del batch  # its decoded images are not kept while the thread waits for the next batch

    def _answer(self, batch: list[_Job]) -> None:
        batch = [job for job in batch if job[1].set_running_or_notify_cancel()]  # a cancelled request is not scored
        if not batch:
            return
        images = [image for job, _ in batch for image in job]
        if self._on_batch is not None:
            self._on_batch(len(images))
        try:
            records = self._score(images)
        except BaseException as exc:  # a failed batch answers its requests (500), the thread goes on
            for _, future in batch:
                future.set_exception(exc)
            return
        start = 0
        for job, future in batch:
            future.set_result(records[start:start + len(job)])
            start += len(job)
