"""`clipn serve --engine ray`: the same Starlette app (`app.create_app`) served by Ray Serve.

Two deployments. `ClipnIngress` (one replica, no CPU reserved) is a Ray Serve ingress whose ASGI
app is built on its replica by `__serve_build_asgi_app__` from a `Service` like local serve's: the
same auth, body limits, parsing, guarded decoding, metrics and JSON bodies. Its batcher is a
`HandleBatcher` that sends each request's decoded images to `ClipnModel` through a deployment
handle. `ClipnModel` replicas each load the image tower once (heads and calibration come from the
driver, computed and checked there before anything started) and score with `@serve.batch`.

Why two: Ray Serve's own overload answer (its proxy's `max_queued_requests` rejection) is plain
text; behind a handle the same rejection is a `BackPressureError` our app turns into local
serve's JSON 429 with Retry-After. A plain ASGI ingress (`serve.ingress` with a late-built app)
is what Ray Serve supports for any ASGI app, not only FastAPI.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from .app import RequestError, Service, create_app
from .engine import ModelScorer, ServeLimits

if TYPE_CHECKING:
    from ..heads.embeddings import ClassEmbeddings
    from ..inputs.decode import LoadedImage
    from ..scores.calibration import CalibratedVerdicts

APP_NAME = "clipn"
AUTOSCALE_MIN = 1  # --replicas auto: the fewest replicas (the most: what the cluster holds, cli/serve_ray.py)
AUTOSCALE_TARGET = 2  # ongoing requests per replica the autoscaler aims at (Ray Serve's default)
INGRESS_EXTRA = 32  # ingress places beyond --queue's bound, for /healthz, /metrics and the page
RETRY_AFTER = "1"
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Ray Serve logs every request at INFO otherwise


@dataclass(frozen=True)
class ReplicaSpec:
    """What a `ClipnModel` replica loads: checked on the driver, loaded on the replica."""

    weights: str  # the resolved weights file
    device: str
    precision: str
    rule: str
    threshold: float | None
    max_batch: int
    max_wait_ms: float
    runtime: str = "torch"
    runtime_folder: str | None = None  # the driver's export cache (`--runtime onnx|openvino`)
    fingerprint: str = ""
    threads: int | None = None  # torch threads on CPU: the replica's CPUs


@dataclass(frozen=True)
class ScaleSpec:
    """How many replicas and what each reserves; Ray Serve's backpressure bounds."""

    replicas: int | None = 2  # None: autoscaling between min_replicas and max_replicas
    min_replicas: int = AUTOSCALE_MIN
    max_replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing: int = 16  # requests one replica holds at once (@serve.batch forms batches from them)
    queue: int = 16  # requests waiting for a replica, per caller (Ray Serve's max_queued_requests)

    @property
    def most_replicas(self) -> int:
        return self.replicas if self.replicas is not None else self.max_replicas

    @property
    def capacity(self) -> int:
        """Requests the ingress holds at once: all replicas busy plus a full queue; more get 429."""
        return self.most_replicas * self.max_ongoing + self.queue

    def info(self) -> dict[str, Any]:
        """/v1/info's `limits` additions: what Ray Serve was asked for, so a client sees fixed or autoscaled replicas."""
        if self.replicas is None:
            replicas: dict[str, Any] = {"replicas": "auto", "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                        "target_ongoing_requests": AUTOSCALE_TARGET}
        else:
            replicas = {"replicas": self.replicas}
        return {**replicas, "max_ongoing": self.max_ongoing, "cpus_per_replica": self.cpus_per_replica,
                "gpus_per_replica": self.gpus_per_replica}


@dataclass(frozen=True)
class IngressSpec:
    """What the ingress replica builds its `Service` from (no model: the image size says the transform)."""

    image_size: int
    info: dict[str, Any]
    limits: ServeLimits
    api_key: str | None
    exif_transpose: bool
    decode_threads: int
    capacity: int


class ClipnModel:
    """One replica: the image tower loaded once, scoring batches of requests formed by Ray Serve."""

    def __init__(self, spec: ReplicaSpec, heads: ClassEmbeddings, verdicts: CalibratedVerdicts | None) -> None:
        import torch

        from ..model.devices import resolve_device
        from ..weights.checkpoints import load_model

        if spec.threads:
            torch.set_num_threads(spec.threads)
        model, _ = load_model(spec.weights, device=resolve_device(spec.device), text=False)
        if spec.runtime != "torch":
            from ..runtimes.towers import attach_runtime

            attach_runtime(model, spec.runtime, spec.precision, spec.runtime_folder or ".", spec.fingerprint)
        self.scorer = ModelScorer(model, heads, spec.rule, spec.threshold, verdicts, spec.precision, spec.max_batch)
        self.score_batch.set_max_batch_size(spec.max_batch)
        self.score_batch.set_batch_wait_timeout_s(spec.max_wait_ms / 1000)

    async def detect(self, images: list[LoadedImage]) -> list[dict[str, Any]]:
        """One request's records, in order (scored in a batch with whatever else is waiting)."""
        return await self.score_batch(images)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)  # set from --max-batch, --max-wait-ms in __init__
    async def score_batch(self, requests: list[list[LoadedImage]]) -> list[list[dict[str, Any]]]:
        """Requests → records: one scoring call (forward passes of at most --max-batch images) off the event loop."""
        records = await asyncio.to_thread(self.scorer, [image for request in requests for image in request])
        out, start = [], 0
        for request in requests:
            out.append(records[start:start + len(request)])
            start += len(request)
        return out


class HandleBatcher:
    """The `Batcher` interface over a `ClipnModel` handle: admission bounds what the ingress holds;
    Ray Serve's rejection of a full queue becomes the same 429 local serve gives; a request whose
    replica died is sent once more (scoring has no side effects). Used on the ingress's event loop
    only, so the counts need no lock."""

    def __init__(self, handle: Any, capacity: int) -> None:
        self._handle, self._capacity, self._admitted = handle, capacity, 0

    def admit(self) -> bool:
        if self._admitted >= self._capacity:
            return False
        self._admitted += 1
        return True

    def submit(self, images: list[LoadedImage]) -> asyncio.Future:
        return asyncio.ensure_future(self._score(images))

    async def _score(self, images: list[LoadedImage]) -> list[dict[str, Any]]:
        try:
            try:
                return await self._handle.detect.remote(images)
            except RayActorError:  # its replica died: once more, on a live one
                return await self._handle.detect.remote(images)
        except BackPressureError:
            raise RequestError(429, "busy: every replica is busy and the queue is full (--queue); retry shortly",
                               {"Retry-After": RETRY_AFTER}) from None

    def release(self, submitted: bool) -> None:
        self._admitted -= 1

    def depth(self) -> int:
        return self._admitted

    def close(self) -> None:
        """Nothing to stop here: Ray Serve drains and stops the replicas."""


@serve.ingress()
class ClipnIngress:
    """The HTTP side: local serve's Starlette app, scoring through `ClipnModel`."""

    def __init__(self, model: Any, spec: IngressSpec) -> None:
        self.model, self.spec = model, spec

    def __serve_build_asgi_app__(self) -> Any:
        from ..inputs.decode import make_transform

        s = self.spec
        limits = dataclasses.replace(s.limits, queue=s.capacity)  # what this ingress holds at once (429 beyond)
        service = Service(HandleBatcher(self.model, s.capacity), make_transform(s.image_size), s.info, limits, s.api_key,
                          exif_transpose=s.exif_transpose, decode_threads=s.decode_threads)
        return create_app(service)


def application(replica: ReplicaSpec, scale: ScaleSpec, ingress: IngressSpec, heads: ClassEmbeddings,
                verdicts: CalibratedVerdicts | None) -> Any:
    """The Ray Serve application: `ClipnIngress` → `ClipnModel` with the replicas and bounds of `scale`."""
    if scale.replicas is None:
        replicas: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas, "target_ongoing_requests": AUTOSCALE_TARGET}}
    else:
        replicas = {"num_replicas": scale.replicas}
    model = serve.deployment(
        ClipnModel, name="ClipnModel", max_ongoing_requests=scale.max_ongoing, max_queued_requests=scale.queue,
        ray_actor_options={"num_cpus": scale.cpus_per_replica, "num_gpus": scale.gpus_per_replica}, **replicas,
    )
    front = serve.deployment(
        ClipnIngress, name="ClipnIngress", num_replicas=1, max_ongoing_requests=scale.capacity + INGRESS_EXTRA,
        ray_actor_options={"num_cpus": 0},
    )
    return front.bind(model.bind(replica, heads, verdicts), ingress)


def run_on_ray(app: Any, host: str, port: int, timeout: float, announce: Callable[[str], None], own_cluster: bool) -> None:
    """Deploy `app` behind Ray Serve's HTTP proxy on host:port, serve until SIGTERM or SIGINT, then
    remove it: all of Ray Serve on a cluster this process started, only the clipn application on a
    cluster it joined (other applications there keep running)."""
    import signal
    import threading

    from ..errors import ClipnError

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": max(1, int(timeout))}, logging_config=QUIET)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=QUIET)
        except RuntimeError as exc:
            raise ClipnError(f"Ray Serve could not start clipn's replicas: {str(exc).strip().splitlines()[-1][:300]}") from None
        announce(f"http://{f'[{host}]' if ':' in host else host}:{port}")
        while not stop.wait(0.5):
            pass
    finally:
        try:
            if own_cluster:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
