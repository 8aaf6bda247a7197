"""Running an exported image tower with ONNX Runtime or OpenVINO in place of torch (CPU)."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import OptionsError
from ..model.clipn import CLIPN
from . import check_runtime
from .onnx_export import cached_export
from .sessions import OnnxTower, OpenVinoTower  # their home: torch-free


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
    if quantize is not None and runtime != "onnx":
        raise OptionsError(f"--quantize {quantize} runs with --runtime onnx or torch, not --runtime {runtime}")
    if next(model.visual.parameters()).device.type != "cpu":
        raise OptionsError(f"--runtime {runtime} runs on the CPU: give --device cpu, or --runtime torch for a GPU")
    path = cached_export(model, folder, fingerprint, quantize)
    tower = OnnxTower(path) if runtime == "onnx" else OpenVinoTower(path, precision)
    model.image_runtime = ImageRuntime(runtime, "int8" if quantize else precision, tower)
    return model
