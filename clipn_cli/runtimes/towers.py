"""Running an exported image tower with ONNX Runtime (CPU or CUDA) or OpenVINO (CPU) in place of torch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DeviceError, OptionsError
from ..model.clipn import CLIPN
from . import check_runtime
from .onnx_export import cached_export, check_fingerprint
from .sessions import OnnxTower, OpenVinoTower, onnx_providers  # their home: torch-free


class ImageRuntime:
    """An image tower outside torch, called by `encode_batch` through `model.image_runtime`."""

    def __init__(self, name: str, precision: str, tower: OnnxTower | OpenVinoTower) -> None:
        self.name, self.precision, self.tower = name, precision, tower

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized float32 features of a preprocessed batch (CPU tensors in, out)."""
        return torch.from_numpy(np.array(self.tower(pixels.numpy()), dtype=np.float32))

    @property
    def variant(self) -> str:
        """How features cached by this runtime are keyed apart from torch's."""
        return f"runtime={self.name}" + (";int8" if self.precision == "int8" else "")


def attach_runtime(
    model: CLIPN, runtime: str, precision: str, folder: str | os.PathLike[str], fingerprint: str, quantize: str | None = None,
) -> CLIPN:
    """Make `model` encode images with `runtime` (torch: unchanged); the export is cached in `folder`.

    `quantize="int8"` (ONNX Runtime only) runs its dynamic int8 quantisation of the export: faster, not exact.
    """
    check_runtime(runtime, precision)
    if runtime == "torch":
        return model
    device = _runtime_device(model, runtime, quantize)
    if device != "cpu":
        onnx_providers(device)  # a missing CUDA provider is said before any export
        with _on_cpu(model):
            path = cached_export(model, folder, fingerprint, quantize)
    else:
        path = cached_export(model, folder, fingerprint, quantize)
    return load_runtime(model, runtime, precision, path, fingerprint, quantize)


def load_runtime(model: CLIPN, runtime: str, precision: str, path: str | os.PathLike[str], fingerprint: str,
                 quantize: str | None = None) -> CLIPN:
    """Attach the image tower exported at `path` (made by `cached_export`, checked against `fingerprint`);
    exports nothing: what a Ray actor does with the file its driver exported once."""
    check_runtime(runtime, precision)
    device = _runtime_device(model, runtime, quantize)
    check_fingerprint(path, fingerprint)
    tower = OnnxTower(Path(path), device) if runtime == "onnx" else OpenVinoTower(Path(path), precision)
    model.image_runtime = ImageRuntime(runtime, "int8" if quantize else precision, tower)
    return model


def _runtime_device(model: CLIPN, runtime: str, quantize: str | None) -> str:
    """Where `runtime` runs for a model on its device: the CPU, or (ONNX Runtime fp32) a CUDA device."""
    if quantize is not None and runtime != "onnx":
        raise OptionsError(f"--quantize {quantize} runs with --runtime onnx or torch, not --runtime {runtime}")
    device = next(model.visual.parameters()).device
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and runtime == "onnx" and quantize is None:
        return str(device)
    raise DeviceError(f"--runtime {runtime}{' --quantize ' + quantize if quantize else ''} runs on the CPU"
                      f"{' (and --runtime onnx on CUDA)' if runtime == 'onnx' else ''}: give --device cpu, or --runtime torch for this device")


class _on_cpu:
    """The image tower on the CPU for the block (an export is made from fp32 CPU weights), then back."""

    def __init__(self, model: CLIPN) -> None:
        self.model, self.device = model, next(model.visual.parameters()).device

    def __enter__(self) -> None:
        self.model.visual.cpu()

    def __exit__(self, *exc: object) -> None:
        self.model.visual.to(self.device)
