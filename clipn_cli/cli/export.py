"""`clipn export` (the image tower as ONNX), `clipn weights tune` (the measurement `--runtime auto`
reads), and attaching a runtime other than torch to a loaded model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import check_output, fail, handle_errors, info, warn
from .runtime import load_weights_for_cli, preflight

if TYPE_CHECKING:
    from ..model.clipn import CLIPN
    from ..weights.checkpoints import WeightsInfo


def export(
    weights: Annotated[Path, typer.Argument(help="CLIPN weights: a .safetensors file or a name from 'clipn weights list'.")],
    output: Annotated[Path, typer.Argument(help="Output .onnx file; its weights go beside it, in OUTPUT.data (both written atomically).")],
) -> None:
    """Write the image tower as ONNX (fp32, any batch size), the weights fingerprint in its metadata,
    its weights beside it in OUTPUT.data (ONNX external data: any size of model, opened in half the time).

    --runtime onnx/openvino export it themselves on first use and keep it in the weights home; this
    command writes it where you choose, for other tools.
    """
    with handle_errors():
        check_output("OUTPUT", output)
        import importlib.util

        if importlib.util.find_spec("onnx") is None:
            fail("clipn export needs onnx: pip install 'clipn-cli[onnx]'")
        from ..runtimes import data_path
        from ..runtimes.onnx_export import export_image_tower
        preflight(weights, "cpu")
        model, weights_info = load_weights_for_cli(weights, "cpu", text=False)
        graph = export_image_tower(model, output, weights_info.fingerprint)
        data = data_path(graph)
        info(f"wrote {graph} and {data.name} ({(graph.stat().st_size + data.stat().st_size) / 1e6:.1f} MB, image tower of "
             f"{weights_info.model_name}, fingerprint {weights_info.fingerprint[:12]})")


TUNE_CLASSES = ["cat", "dog", "car", "airplane", "tree", "flower"]  # fixed heads for the CTW/ATD check


def tune(
    weights: Annotated[Path | None, typer.Argument(help="Weights to measure: a name or file (default: the default weights).", show_default=False)] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, max=256, help="Images in the fixed batch every runtime encodes.")] = 8,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=100, help="Alternating rounds (each runtime's best round counts).")] = 3,
) -> None:
    """Measure which exact runtime (torch, onnx, openvino; fp32) encodes images fastest with these
    weights on this CPU, and record it for '--runtime auto' (the default of detect, eval, calibrate).

    Each installed runtime encodes one fixed batch in alternating rounds; one counts only if its CTW
    and ATD are within 1e-5 of torch fp32's. The record is keyed by the weights fingerprint, the CPU
    model and the runtimes' versions: measure again after an upgrade or on another machine.
    """
    with handle_errors():
        from ..heads.embeddings import embed_classes
        from ..heads.prompts import load_templates
        from ..runtimes.choice import cpu_model, record_measurement
        from ..runtimes.measure import measure_runtimes
        from ..weights.home import weights_home

        preflight(weights, "cpu")
        model, weights_info = load_weights_for_cli(weights, "cpu")
        heads = embed_classes(model, TUNE_CLASSES, load_templates("clipn"), weights_info.fingerprint)
        if heads.text_no is None:
            fail(f"{weights_info.path}: a plain CLIP has no 'no' heads for the CTW/ATD check: tune CLIPN weights")
        folder = weights_home() / "runtimes"
        result = measure_runtimes(model, heads.text_yes, heads.text_no, folder, weights_info.fingerprint, batch=batch, rounds=rounds)
        for name, seconds in result.seconds.items():
            exact = "exact" if name in result.exact else "NOT exact: never chosen"
            info(f"{name:9s} {1000 * seconds / batch:8.1f} ms/image  {result.seconds['torch'] / seconds:5.2f}x torch  "
                 f"CTW/ATD within {result.max_diff[name]:.1e} of torch fp32 ({exact})")
        path = record_measurement(folder, weights_info.fingerprint, result.winner, result.as_dict())
        info(f"--runtime auto now runs {result.winner} for these weights on this CPU ({cpu_model()}); recorded in {path}")
        typer.echo(result.winner)


def check_runtime_option(runtime: str, precision: str, device: str) -> str:
    """--runtime and --precision together, before torch is imported (a missing package costs a line);
    returns the device to load on: `auto` means the CPU for the CPU-only runtimes."""
    from ..runtimes import check_runtime

    check_runtime(runtime, precision)
    return "cpu" if runtime not in ("torch", "auto") and device == "auto" else device


def choose_runtime(runtime: str, precision: str, quantize: str | None, fingerprint: str, on_cpu: bool) -> str:
    """`--runtime auto`: the exact runtime 'clipn weights tune' measured fastest for these weights on
    this CPU (fp32, no --quantize, a CPU run), else torch; said on stderr when it is not torch."""
    if runtime != "auto":
        return runtime
    if precision != "fp32" or quantize is not None or not on_cpu:
        return "torch"
    from ..runtimes.choice import measured_runtime
    from ..weights.home import weights_home

    chosen, warning = measured_runtime(weights_home() / "runtimes", fingerprint)
    if warning is not None:
        warn(warning)
    if chosen is None or chosen == "torch":
        return "torch"
    info(f"--runtime auto: {chosen} (measured fastest and exact for these weights on this CPU by 'clipn weights tune')")
    return chosen


def use_runtime(model: CLIPN, weights_info: WeightsInfo, runtime: str, precision: str, quantize: str | None = None) -> str:
    """Run the image tower with `runtime` (auto: `choose_runtime`), its export cached in
    `<weights home>/runtimes/`; returns the runtime now running it."""
    on_cpu = next(model.visual.parameters()).device.type == "cpu"
    runtime = choose_runtime(runtime, precision, quantize, weights_info.fingerprint, on_cpu)
    if runtime == "torch":
        return runtime
    from ..runtimes.towers import attach_runtime
    from ..weights.home import weights_home

    attach_runtime(model, runtime, precision, weights_home() / "runtimes", weights_info.fingerprint, quantize)
    return runtime


def exported_for_workers(weights: Path, runtime: str, quantize: str | None) -> str | None:
    """The export a Ray run's actors load (made here, once, before any actor starts; reused when cached)."""
    if runtime == "torch":
        return None
    from ..runtimes import export_path, is_cached
    from ..runtimes.onnx_export import cached_export, check_fingerprint
    from ..weights.home import read_header, weights_home

    fingerprint = read_header(weights).get("fingerprint", "")
    path = export_path(weights_home() / "runtimes", fingerprint, quantize)
    if is_cached(path, quantize):
        check_fingerprint(path, fingerprint)
        return str(path)
    from ..weights.checkpoints import load_model

    model, info_ = load_model(weights, device="cpu", text=False)
    return str(cached_export(model, weights_home() / "runtimes", info_.fingerprint, quantize))


def runtime_provenance(model: CLIPN | None, runtime: str, precision: str, quantize: str | None) -> str:
    """What computed the image features, for a report or an output's provenance: the runtime, its
    precision and its package's version (and ONNX Runtime's execution provider when not the CPU)."""
    from ..runtimes.choice import VERSIONED, package_version

    computed = "int8" if quantize else precision
    version = package_version(VERSIONED[runtime])
    attached = getattr(model, "image_runtime", None)
    provider = getattr(getattr(attached, "tower", None), "provider", "CPUExecutionProvider")
    where = f", {provider}" if provider != "CPUExecutionProvider" else ""
    return f"{runtime} {computed} ({VERSIONED[runtime]} {version or 'unknown version'}{where})"
