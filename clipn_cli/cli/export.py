"""`clipn export`: the image tower as ONNX; and attaching a runtime other than torch to a loaded model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import check_output, fail, handle_errors, info

if TYPE_CHECKING:
    from ..model.clipn import CLIPN
    from ..weights.checkpoints import WeightsInfo


def export(
    weights: Annotated[Path, typer.Argument(help="CLIPN weights: a .safetensors file or a name from 'clipn weights list'.")],
    output: Annotated[Path, typer.Argument(help="Output .onnx file (written atomically).")],
) -> None:
    """Write the image tower as ONNX (fp32, any batch size), the weights fingerprint in its metadata.

    --runtime onnx/openvino export it themselves on first use and keep it in the weights home; this
    command writes it where you choose, for other tools.
    """
    with handle_errors():
        check_output("OUTPUT", output)
        import importlib.util

        if importlib.util.find_spec("onnx") is None:
            fail("clipn export needs onnx: pip install 'clipn-cli[onnx]'")
        from ..runtimes.onnx_export import export_image_tower
        from .runtime import load_weights_for_cli, preflight

        preflight(weights, "cpu")
        model, weights_info = load_weights_for_cli(weights, "cpu", text=False)
        export_image_tower(model, output, weights_info.fingerprint)
        info(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, image tower of {weights_info.model_name}, fingerprint {weights_info.fingerprint[:12]})")


def check_runtime_option(runtime: str, precision: str, device: str) -> str:
    """--runtime and --precision together, before torch is imported (a missing package costs a line);
    returns the device to load on: `auto` means the CPU for the CPU-only runtimes."""
    from ..runtimes import check_runtime

    check_runtime(runtime, precision)
    return "cpu" if runtime != "torch" and device == "auto" else device


def use_runtime(model: CLIPN, weights_info: WeightsInfo, runtime: str, precision: str, quantize: str | None = None) -> None:
    """Run the image tower with `runtime`, its export cached in `<weights home>/runtimes/`."""
    if runtime == "torch":
        return
    from ..runtimes.towers import attach_runtime
    from ..weights.home import weights_home

    attach_runtime(model, runtime, precision, weights_home() / "runtimes", weights_info.fingerprint, quantize)
