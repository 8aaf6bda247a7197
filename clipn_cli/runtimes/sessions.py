"""The exported image tower in ONNX Runtime (CPU or CUDA) or OpenVINO (CPU), NumPy in and out: no torch imported,
so the torch-free fast start (`fastdetect`) runs the same sessions `towers.ImageRuntime` wraps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import DeviceError, WeightsError
from . import FINGERPRINT_KEY

_OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16"}


def onnx_providers(device: str) -> list[str]:
    """ONNX Runtime's execution providers for `device` (cpu, cuda, cuda:N); a CUDA provider that is
    not there is one line saying what is missing."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise DeviceError(f"--runtime onnx --device {device} needs ONNX Runtime's CUDAExecutionProvider, which this onnxruntime "
                          f"{ort.__version__} lacks (it has {', '.join(available)}): pip install onnxruntime-gpu, or use --runtime torch")
    return ["CUDAExecutionProvider"]


@contextmanager
def _loading(path: Path, runtime: str) -> Iterator[None]:
    """A file the runtime cannot load (damaged, truncated, its weights file missing or outside its
    folder, which both runtimes refuse) is one line naming it, not the runtime's traceback."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as exc:  # ONNX Runtime raises its own Exception subclasses (Fail, InvalidProtobuf, NoSuchFile), OpenVINO RuntimeError
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 240 else "..." + reason[-240:].partition(" ")[2]  # the end says what failed
        raise WeightsError(f"{path}: {runtime} cannot load this export ({reason}); if it is damaged, delete it and its .data "
                           "file to export it again") from None


class OnnxTower:
    """ONNX Runtime's session over the exported image tower (fp32, exact), on the CPU or a CUDA device."""

    def __init__(self, path: Path, device: str = "cpu", prepack: bool = True) -> None:
        """`prepack=False` skips ONNX Runtime's repacking of the weights for its matrix products: a
        ViT-B-16 session opens in 0.1 s instead of 0.5 s, each image then takes 5-8% longer (README
        "The torch-free fast start": worth it for a few images)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # its warnings (unused initializers) are noise; its errors reach the user as our one line
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        providers: list = onnx_providers(device)
        if ":" in device:
            providers = [(providers[0], {"device_id": int(device.partition(":")[2])})]
        with _loading(path, "ONNX Runtime"):
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.provider = self.session.get_providers()[0]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    @property
    def fingerprint(self) -> str:
        """The weights fingerprint in the file's metadata, read by ONNX Runtime itself (no `onnx` import: 0.7 s)."""
        return self.session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY, "")

    @property
    def image_size(self) -> int:
        """The side of the square image the tower was exported for (its input is (batch, 3, size, size))."""
        return int(self.session.get_inputs()[0].shape[-1])

    @property
    def embed_dim(self) -> int:
        return int(self.session.get_outputs()[0].shape[-1])


class OpenVinoTower:
    """OpenVINO's CPU plugin over the exported image tower; `precision` is its inference precision hint."""

    def __init__(self, path: Path, precision: str = "fp32") -> None:
        import openvino as ov

        core = ov.Core()
        with _loading(path, "OpenVINO"):
            self.model = core.read_model(str(path))  # read once: its metadata and shapes, then compiled as is
            self.compiled = core.compile_model(self.model, "CPU", {"INFERENCE_PRECISION_HINT": _OPENVINO_HINTS[precision]})

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.compiled(np.ascontiguousarray(pixels, dtype=np.float32))[0], dtype=np.float32)

    @property
    def fingerprint(self) -> str:
        """The weights fingerprint in the file's ONNX metadata, as OpenVINO read it (its `framework` rt_info)."""
        key = ["framework", FINGERPRINT_KEY]
        return self.model.get_rt_info(key).astype(str) if self.model.has_rt_info(key) else ""

    @property
    def image_size(self) -> int:
        """The side of the square image the tower was exported for (its input is (batch, 3, size, size))."""
        return int(self.model.inputs[0].get_partial_shape()[-1].get_length())

    @property
    def embed_dim(self) -> int:
        return int(self.model.outputs[0].get_partial_shape()[-1].get_length())
