"""The image tower as an ONNX file: exported once per weights, fingerprinted, refused for other weights."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import WeightsError
from ..files import DiskFullError, atomic_path, disk_full, is_disk_full
from ..model.clipn import CLIPN
from . import FINGERPRINT_KEY, data_path, export_path, is_cached

OPSET = 17


class _ImageTower(torch.nn.Module):
    """What clipn calls: normalized image features of a preprocessed batch."""

    def __init__(self, model: CLIPN) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)


def export_image_tower(model: CLIPN, target: str | os.PathLike[str], fingerprint: str) -> Path:
    """Write the fp32 image tower to `target`, batch size dynamic, fingerprint in metadata_props, its
    weights beside it in `data_path(target)` (ONNX external data).

    External data keeps a tower of any size under protobuf's 2 GB limit and halves the time ONNX
    Runtime and OpenVINO take to open it (0.8 s -> 0.4 s on a ViT-B-16: the weights are mapped, not
    parsed). Both files are written in a private folder beside `target` and renamed into place, the
    weights first, so a reader never pairs a new graph with a half-written or missing weights file.
    Uses torch's TorchScript-based exporter (`dynamo=False`): it needs no onnxscript and traces a
    ViT in seconds; its deprecation warnings are silenced here, the result is checked by the tests.
    """
    visual = model.visual
    if next(visual.parameters()).device.type != "cpu" or getattr(model, "image_quantization", None):
        raise ValueError("the image tower is exported from fp32 weights on the CPU")
    target = Path(target)  # a symlink stays one (the graph is written through it) and the weights go beside it, where runtimes look
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _stage_and_rename(model, target, fingerprint)
    except OSError as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full(target) from None
        raise
    return target


def _stage_and_rename(model: CLIPN, target: Path, fingerprint: str) -> None:
    """Trace into a private folder beside `target`, add the fingerprint, save graph and weights
    there, then rename the weights and the graph into place (the staging folder goes in every case)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        traced = Path(tmp) / "traced" / "tower.onnx"
        traced.parent.mkdir()
        _trace(model, traced)
        proto = onnx.load(str(traced))  # with the weights torch wrote beside a tower over 2 GB
        entry = proto.metadata_props.add()
        entry.key, entry.value = FINGERPRINT_KEY, fingerprint
        staged = Path(tmp) / target.name
        onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_path(target).name)
        del proto
        with atomic_path(data_path(target)) as part:
            os.replace(staged.with_name(data_path(target).name), part)
        with atomic_path(target) as part:
            os.replace(staged, part)


def _trace(model: CLIPN, path: Path) -> None:
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    example = torch.zeros(2, 3, *size)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _ImageTower(model).eval(), (example,), str(path), input_names=["pixels"], output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET, dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def read_fingerprint(path: str | os.PathLike[str]) -> str:
    """The weights fingerprint an exported file was made from ('' when it has none)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise WeightsError(f"{path}: not an ONNX file ({type(exc).__name__})") from None
    return next((p.value for p in proto.metadata_props if p.key == FINGERPRINT_KEY), "")


def check_fingerprint(path: str | os.PathLike[str], fingerprint: str) -> None:
    """Refuse an exported image tower made from other weights, in one line."""
    found = read_fingerprint(path)
    if found != fingerprint:
        raise WeightsError(
            f"{path}: exported from other weights (fingerprint {found[:12] or 'none'}, loaded weights {fingerprint[:12]}); "
            "export it again with 'clipn export'"
        )


def cached_export(model: CLIPN, folder: str | os.PathLike[str], fingerprint: str, quantize: str | None = None) -> Path:
    """`folder/<fingerprint[:16]>.onnx`, exported on first use and reused after (checked each time);
    with `quantize="int8"` its ONNX Runtime dynamic int8 quantisation, `<fingerprint[:16]>-int8.onnx`."""
    path = export_path(folder, fingerprint)
    if not is_cached(path):  # an export written as one file (before its weights moved beside it) is made again
        export_image_tower(model, path, fingerprint)
    check_fingerprint(path, fingerprint)
    if quantize is None:
        return path
    quantized = export_path(folder, fingerprint, quantize)
    if not is_cached(quantized, quantize):
        quantize_int8(path, quantized, fingerprint)
    check_fingerprint(quantized, fingerprint)
    return quantized


def quantize_int8(source: Path, target: Path, fingerprint: str) -> None:
    """ONNX Runtime's dynamic quantisation (int8 weights of the matrix products, activations
    quantised on the fly): what `--quantize int8` was in torch, without torch's deprecated API."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its advice to pre-process is noise here
    import onnx

    with atomic_path(target) as tmp:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8)
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = FINGERPRINT_KEY, fingerprint
        onnx.save(proto, str(tmp))
