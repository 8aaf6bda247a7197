"""`clipn serve`: the detector as an HTTP service. Everything is loaded and checked here, once,
before the port opens; the server itself lives in clipn_cli/serve/."""

from __future__ import annotations

import gc
import importlib.util
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..scores.methods import RULES, VERDICT_RULES
from .common import (
    CALIBRATION, INPUTS, RULE, PRECISIONS, ClassesFileOpt, ClassesOpt, DeviceOpt, ExifOpt, NegativesOpt, PrecisionOpt, RuntimeOpt,
    TemplatesOpt, WeightsOpt, WordsOpt, WorkersOpt, check_choice, fail, handle_errors, info, warn,
)
from .export import check_runtime_option, use_runtime
from .runtime import add_negatives, calibrated_verdicts, class_embeddings, load_classes, load_weights_for_cli, parse_negatives, preflight
from .scaleout import ENGINES, RayAddressOpt
from .serve_ray import SCALE, ReplicasOpt, check_ray_options, serve_on_ray

if TYPE_CHECKING:
    from ..serve.app import Service

SERVER = "Server"
API_KEY_ENV = "CLIPN_API_KEY"
SERVE_MODULES = ("starlette", "uvicorn", "multipart", "prometheus_client")


def serve(
    classes: ClassesOpt = None,
    classes_file: ClassesFileOpt = None,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", "-e", rich_help_panel=INPUTS, help="Class embeddings from 'clipn embed-classes'.", show_default=False)] = None,
    weights: WeightsOpt = None,
    templates: TemplatesOpt = "clipn",
    rule: Annotated[str, typer.Option("--rule", rich_help_panel=RULE, help=f"Verdict rule: {', '.join(RULES)} (as in 'clipn detect').")] = "atd",
    threshold: Annotated[float | None, typer.Option("--threshold", rich_help_panel=RULE, help="Call an image OOD when the rule's score is below T (as in 'clipn detect').", show_default=False)] = None,
    negatives: NegativesOpt = None,
    words: WordsOpt = None,
    calibration: Annotated[Path | None, typer.Option("--calibration", rich_help_panel=CALIBRATION, help="A file from 'clipn calibrate': p_value per image, OOD when p_value <= alpha.", show_default=False)] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", rich_help_panel=CALIBRATION, help="With --calibration: the false-alarm rate on ID images (default: the file's).", show_default=False)] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    runtime: RuntimeOpt = "auto",
    exif_transpose: ExifOpt = False,
    workers: WorkersOpt = None,
    host: Annotated[str, typer.Option("--host", rich_help_panel=SERVER, help="Address to listen on (loopback by default; 0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", rich_help_panel=SERVER, min=0, max=65535, help="Port to listen on (0: any free port, printed at start).")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", rich_help_panel=SERVER, min=1, help="Most images in one batch (a CPU runs it through the model 4 at a time); batches form only under load.")] = 16,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", rich_help_panel=SERVER, min=0, help="Longest a batch waits for requests still arriving (a lone request runs at once).")] = 5.0,
    queue: Annotated[int, typer.Option("--queue", rich_help_panel=SERVER, min=1, help="Most requests held at once (receiving, decoding, waiting, scoring); more get 429 with Retry-After.")] = 16,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", rich_help_panel=SERVER, min=0.001, help="Largest request body in MB (larger: 413).")] = 16.0,
    max_images: Annotated[int, typer.Option("--max-images", rich_help_panel=SERVER, min=1, help="Most images in one request (more: 413).")] = 64,
    timeout: Annotated[float, typer.Option("--timeout", rich_help_panel=SERVER, min=0.1, help="Seconds a client may take to send its request head, then its body (then 408); idle connections close after it.")] = 30.0,
    grace: Annotated[float, typer.Option("--grace", rich_help_panel=SERVER, min=0, help="Seconds a stop (SIGTERM, SIGINT) waits for requests in flight; those still running then get 503.")] = 30.0,
    api_key_file: Annotated[Path | None, typer.Option("--api-key-file", rich_help_panel=SERVER, help=f"A file holding the API key clients must send (Authorization: Bearer KEY); default ${API_KEY_ENV}, none: no key.", show_default=False)] = None,
    engine: Annotated[str, typer.Option("--engine", rich_help_panel=SCALE, help="local (this process) or ray (a Ray Serve application: see --replicas).")] = "local",
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = "2",
    max_ongoing: Annotated[int | None, typer.Option("--max-ongoing", rich_help_panel=SCALE, min=1, help="With --engine ray: requests one replica holds at once (Ray Serve's max_ongoing_requests; batches form from them). Default: --max-batch.", show_default=False)] = None,
    cpus_per_replica: Annotated[float, typer.Option("--cpus-per-replica", rich_help_panel=SCALE, min=0.01, help="With --engine ray: CPUs each replica reserves (and its torch threads on CPU).")] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option("--gpus-per-replica", rich_help_panel=SCALE, min=0.0, help="With --engine ray: GPUs each replica reserves (fractions share a GPU; 0: CPU replicas).")] = 0.0,
) -> None:
    """Serve ID/OOD verdicts over HTTP: POST images to /v1/detect, get what 'clipn detect --format json' prints.

    Exit codes: 0 stopped by SIGTERM or SIGINT (requests in flight answered), 1 stopped, but requests
    still running after --grace were answered 503, 2 usage or setup error.
    """
    with handle_errors():
        require_serve()
        _check_rule_options(rule, precision, engine, threshold, calibration, alpha)
        scale = check_ray_options(engine, ray_address, replicas, max_ongoing, max_batch, queue, cpus_per_replica, gpus_per_replica)
        device = check_runtime_option(runtime, precision, device)
        key = api_key(api_key_file)
        if key is None and not is_loopback(host):
            warn(f"listening on {host} without an API key: anyone who can reach it can use it (set ${API_KEY_ENV} or --api-key-file)")
        pools = parse_negatives(negatives, rule)
        names = load_classes(classes, classes_file, embeddings)
        preflight(weights, device, embeddings=embeddings, templates=templates, files={"--calibration": calibration, "--words": words})
        model, weights_info = load_weights_for_cli(weights, device, text=embeddings is None)
        heads = class_embeddings(model, weights_info, names, embeddings, templates)
        add_negatives(model, weights_info, heads, pools, words, source=embeddings)
        verdicts = calibrated_verdicts(calibration, alpha, None, rule, heads, weights_info.fingerprint)

        from .. import __version__
        from ..detection import check_rule
        from ..inputs.decode import make_transform, image_size_of
        from ..model.devices import pipeline_sizes
        from ..serve.app import Service
        from ..serve.engine import Batcher, ModelScorer, ServeLimits
        from ..serve.metrics import ServeMetrics

        check_rule(rule, tuple(heads.negatives), threshold if verdicts is None else float("-inf"), has_no=heads.text_no is not None)
        runtime = use_runtime(model, weights_info, runtime, precision)  # auto resolved: replicas get the runtime chosen here
        limits = ServeLimits(max_batch=max_batch, max_wait_ms=max_wait_ms, queue=queue, max_upload_mb=max_upload_mb, timeout=timeout, max_images=max_images)
        details = {
            "version": __version__, "weights": weights_info.path.name, "weights_fingerprint": weights_info.fingerprint,
            "classes": list(heads.classes), "negatives": list(heads.negatives), "rule": verdicts.method if verdicts else rule,
            "threshold": threshold, "calibration_alpha": verdicts.alpha if verdicts else None, "precision": precision,
            "runtime": runtime, "engine": engine,
            "limits": {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "queue": queue, "max_upload_mb": max_upload_mb,
                       "max_images": max_images, "timeout": timeout},
        }
        decode_threads = pipeline_sizes(model, None, workers)[1] or 1
        if scale is not None:
            image_size = image_size_of(model)
            del model  # the replicas load their own image tower; this process keeps what it sends them
            gc.collect()
            serve_on_ray(image_size, weights_info, heads, verdicts, scale, ray_address, limits=limits, details=details, api_key=key,
                         exif_transpose=exif_transpose, decode_threads=decode_threads, rule=rule, threshold=threshold,
                         precision=precision, device=device, runtime=runtime, host=host, port=port, announce=announce)
            info("stopped")
            return
        metrics = ServeMetrics()
        scorer = ModelScorer(model, heads, rule, threshold, verdicts, precision, max_batch)
        service = Service(Batcher(scorer, max_batch, max_wait_ms, queue, on_batch=metrics.batch), make_transform(image_size_of(model)),
                          details, limits, key, exif_transpose=exif_transpose, decode_threads=decode_threads, metrics=metrics)
        _serve_local(service, host, port, grace)


def _check_rule_options(rule: str, precision: str, engine: str, threshold: float | None, calibration: Path | None,
                        alpha: float | None) -> None:
    """The rule, its threshold or calibration, and the choices, before anything loads."""
    check_choice("--rule", rule, RULES)
    check_choice("--precision", precision, PRECISIONS)
    check_choice("--engine", engine, ENGINES)
    if calibration is None and alpha is not None:
        fail("--alpha needs --calibration FILE (from 'clipn calibrate')")
    if calibration is not None and threshold is not None:
        fail("give --threshold (a fixed score cut) or --calibration (a false-alarm rate), not both")
    if threshold is None and calibration is None and rule not in VERDICT_RULES:
        fail(f"--rule {rule} has no threshold-free verdict: give --threshold T (e.g. its thr@95%ID from 'clipn eval') or --calibration FILE")


def _serve_local(service: Service, host: str, port: int, grace: float) -> None:
    """Run the local server until a stop; exit 1 when requests were still running after --grace."""
    from ..serve.run import run_server

    gc.freeze()  # the model and heads live until exit (see detect)
    cut_off = run_server(service, host, port, announce, grace=grace)
    if cut_off:
        warn(f"stopped: {cut_off} request(s) still running after --grace {grace:g} s were answered 503")
        raise typer.Exit(1)
    info("stopped")


def announce(url: str) -> None:
    info(f"serving on {url} (stop: Ctrl-C or SIGTERM)")


def require_serve() -> None:
    """The `serve` extra's packages, or one line saying how to install them."""
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"clipn serve needs the serve extra ({', '.join(missing)} missing): pip install 'clipn-cli[serve]'")


def api_key(path: Path | None) -> str | None:
    """The key from --api-key-file (its first line) or $CLIPN_API_KEY; None: no key asked."""
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--api-key-file {path}: cannot read it ({exc.__class__.__name__})")
        if not key or not key[0].strip():
            fail(f"--api-key-file {path}: the file is empty")
        return key[0].strip()
    value = os.environ.get(API_KEY_ENV, "").strip()
    return value or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
