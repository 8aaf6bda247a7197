"""`clipn serve --engine ray`: its options, checked before anything loads, and the hand-over of what
the driver loaded and checked to a Ray Serve application (clipn_cli/serve/ray_app.py)."""

from __future__ import annotations

import os

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import fail

if TYPE_CHECKING:
    from ..heads.embeddings import ClassEmbeddings
    from ..scores.calibration import CalibratedVerdicts
    from ..serve.engine import ServeLimits
    from ..serve.ray_app import ScaleSpec
    from ..weights.format import WeightsInfo

SCALE = "Scale-out (--engine ray)"
ReplicasOpt = Annotated[str, typer.Option("--replicas", rich_help_panel=SCALE, help="With --engine ray: model replicas (each loads the weights once), or auto: Ray Serve autoscaling on ongoing requests between 1 and what the cluster's CPUs (GPUs) allow.")]


def check_ray_options(engine: str, address: str | None, replicas: str, max_ongoing: int | None, max_batch: int, queue: int,
                      cpus: float, gpus: float) -> ScaleSpec | None:
    """The scale-out settings for --engine ray (None: local); scale-out options without it are refused.
    --max-ongoing defaults to --max-batch, so that one replica can hold a full batch."""
    if engine != "ray":
        if address is not None or replicas != "2" or max_ongoing is not None or cpus != 1.0 or gpus != 0.0:
            fail("--ray-address, --replicas, --max-ongoing, --cpus-per-replica and --gpus-per-replica need --engine ray")
        return None
    from ..scale.cluster import require_ray
    from ..serve.ray_app import ScaleSpec

    require_ray()
    if replicas != "auto" and not (replicas.isdigit() and int(replicas) >= 1):
        fail(f"--replicas {replicas}: give a number of replicas (1 or more) or auto")
    return ScaleSpec(replicas=None if replicas == "auto" else int(replicas), cpus_per_replica=cpus, gpus_per_replica=gpus,
                     max_ongoing=max_ongoing or max_batch, queue=queue)


def serve_on_ray(
    image_size: int, weights_info: WeightsInfo, heads: ClassEmbeddings, verdicts: CalibratedVerdicts | None, scale: ScaleSpec,
    address: str | None, *, limits: ServeLimits, details: dict[str, Any], api_key: str | None, exif_transpose: bool,
    decode_threads: int, rule: str, threshold: float | None, precision: str, device: str, runtime: str, host: str, port: int,
    announce: Callable[[str], None],
) -> None:
    """Join or start the cluster, deploy replicas of what was loaded here, serve until a stop signal."""
    import dataclasses

    from ..scale.cluster import connect, require_ray
    from ..serve.ray_app import IngressSpec, ReplicaSpec, application, run_on_ray
    from ..weights.home import weights_home

    replica = ReplicaSpec(
        str(weights_info.path), device, precision, rule, threshold, limits.max_batch, limits.max_wait_ms, runtime=runtime,
        runtime_folder=str(weights_home() / "runtimes"), fingerprint=weights_info.fingerprint,
        threads=max(1, int(scale.cpus_per_replica)) if scale.gpus_per_replica == 0 else None,
    )
    ray = require_ray()
    joined = address or os.environ.get("RAY_ADDRESS")
    own = connect(ray, address)  # this process called ray.init: it disconnects at the end
    try:
        if scale.replicas is None:
            scale = dataclasses.replace(scale, max_replicas=_most_replicas(ray, scale))
        details = {**details, "limits": {**details["limits"], **scale.info()}}
        ingress = IngressSpec(image_size, details, limits, api_key, exif_transpose, decode_threads, scale.capacity)
        # only a cluster started here has its Serve instance shut down; on a joined one just the clipn application goes
        run_on_ray(application(replica, scale, ingress, heads, verdicts), host, port or _free_port(host), limits.timeout, announce,
                   own and not joined)
    finally:
        if own:
            ray.shutdown()


def _most_replicas(ray: Any, scale: ScaleSpec) -> int:
    """--replicas auto's upper bound: as many replicas as the cluster's CPUs (or GPUs) hold."""
    resources = ray.cluster_resources()
    if scale.gpus_per_replica > 0:
        return max(1, int(resources.get("GPU", 0) / scale.gpus_per_replica))
    return max(1, int(resources.get("CPU", 0) / scale.cpus_per_replica))


def _free_port(host: str) -> int:
    """--port 0 with Ray Serve: a port free on this machine now (its proxy binds the number it is given)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
