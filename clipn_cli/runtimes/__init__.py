"""Other runtimes for the image tower: ONNX Runtime and OpenVINO on the CPU, beside torch.

The image tower is exported once to ONNX (`onnx_export`) with the weights fingerprint in its
metadata, and run by `towers` in place of `model.encode_image`. Neither runtime is a dependency of
the default install: the extras `onnx` and `openvino` bring them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import ClipnError

RUNTIMES = ("torch", "onnx", "openvino")
# what --runtime accepts: auto picks the runtime `clipn weights tune` measured fastest here, else torch (`choice`)
RUNTIME_CHOICES = ("auto", *RUNTIMES)
# Precisions each runtime computes; fp32 is exact (CTW/ATD within 1e-5 of torch fp32, README "Runtimes").
RUNTIME_PRECISIONS = {"torch": ("fp32", "fp16", "bf16"), "onnx": ("fp32",), "openvino": ("fp32", "bf16")}
FINGERPRINT_KEY = "clipn_weights_fingerprint"  # the ONNX metadata entry naming the weights an export was made from


def export_path(folder: str | os.PathLike[str], fingerprint: str, quantize: str | None = None) -> Path:
    """Where the cached export of the weights with `fingerprint` lives in `folder` (fp32, or its
    `quantize="int8"` quantisation); an fp32 export's weights are beside it, in `<name>.data`."""
    return Path(folder) / f"{fingerprint[:16]}{'-' + quantize if quantize else ''}.onnx"



def data_path(path: str | os.PathLike[str]) -> Path:
    """The weights file an fp32 export at `path` names as its external data: `<name>.data`, beside it."""
    return Path(f"{path}.data")


def is_cached(path: Path, quantize: str | None = None) -> bool:
    """Whether an export clipn can load is at `path`: the graph, and for fp32 its weights beside it
    (an int8 quantisation is one file)."""
    return path.is_file() and (quantize is not None or data_path(path).is_file())


# What a runtime needs installed: module to find, extra that brings it.
_NEEDS = {"onnx": (("onnx", "onnxruntime"), "onnx"), "openvino": (("onnx", "openvino"), "openvino")}


def missing(runtime: str) -> str | None:
    """Why `runtime` cannot run here (a package not installed), or None; imports nothing."""
    if runtime not in _NEEDS:
        return None
    modules, extra = _NEEDS[runtime]
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        return f"--runtime {runtime} needs {' and '.join(absent)}: pip install 'clipn-cli[{extra}]'"
    return None


def check_runtime(runtime: str, precision: str) -> None:
    """Refuse a runtime that is not installed or a precision it does not compute, before anything loads
    (auto: torch's precisions; it chooses an other runtime only for fp32)."""
    if runtime not in RUNTIME_CHOICES:
        raise ClipnError(f"--runtime must be {', '.join(RUNTIME_CHOICES[:-1])} or {RUNTIME_CHOICES[-1]}, not '{runtime}'")
    if runtime == "auto":
        runtime = "torch"
    allowed = RUNTIME_PRECISIONS[runtime]
    if precision not in allowed:
        raise ClipnError(f"--runtime {runtime} computes in {' or '.join(allowed)}, not --precision {precision}")
    if reason := missing(runtime):
        raise ClipnError(reason)
