"""The on-disk side of CLIPN weights: what a file says about itself, reading official checkpoints
safely, checking tensors against a config, fingerprints. Nothing here builds or loads a model, so
`plainclip` and `checkpoints` (which dispatches to it) both stand on this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..model.clipn import expected_shapes
from ..model.configs import check_config_fits
from .home import VOCABULARY  # defined there: read without torch

FORMAT_VERSION = "1"
MAX_PROMPTS = 4096
# A `.pt` is a zip archive that torch writes uncompressed: declared sizes far above the archive's
# own size mean compressed members, which torch would inflate in memory (a 1 MB zip bomb: 1 GiB).
ZIP_INFLATION_LIMIT = 2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STORAGE_DTYPES = (*DTYPES, "int16")  # int16: fixed point with per-row scales, see fixedpoint.py
MAX_VOCABULARY = 100_000


@dataclass(frozen=True)
class WeightsInfo:
    """What a weights file says about itself, readable without loading a tensor."""

    path: Path
    model_cfg: dict[str, Any]
    model_name: str
    num_prompts: int
    fingerprint: str
    metadata: dict[str, str]

    @property
    def vocabulary(self) -> tuple[str, ...] | None:
        """The class names the model was trained on, when it knows no others (None: open vocabulary)."""
        text = self.metadata.get(VOCABULARY)
        return None if text is None else tuple(json.loads(text))


def vocabulary_metadata(names: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """The metadata entry recording a closed vocabulary (none for an open one)."""
    return {} if names is None else {VOCABULARY: json.dumps(list(names), ensure_ascii=False)}


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of an official training checkpoint or a bare state dict, `module.` stripped per key.

    Unpickling uses `weights_only=True`: a checkpoint holding anything but tensors and plain
    containers (code, custom classes) is refused instead of executed.
    """
    path = Path(path)
    try:  # non-blocking: a FIFO put where the checkpoint was is refused by _check_archive, not waited on
        fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)), "rb")
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        with fh, warnings.catch_warnings():  # torch's note on the pickle protocol would add lines to a one-line refusal
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            zipped = _check_archive(fh, path)
            # one descriptor: torch memory-maps by name, and /proc/self/fd/N names this open file, not the path
            same_file = f"/proc/self/fd/{fh.fileno()}" if os.path.exists(f"/proc/self/fd/{fh.fileno()}") else None
            obj = torch.load(same_file if zipped and same_file else fh, map_location="cpu", weights_only=True, mmap=bool(zipped and same_file))
    except WeightsError:
        raise
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path}: refused to load: not a checkpoint of plain weights ({_unpickler_reason(exc)[:200]}); "
            "only tensors in plain containers are accepted, nothing that could run code"
        ) from None
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path}: no state dict found (expected a dict of tensors or a dict with 'state_dict')")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
        tensors[key.removeprefix("module.")] = value
    return tensors


def _check_archive(fh: Any, path: Path) -> bool:
    """Whether `fh` is torch's zip format (all checkpoints since torch 1.6), refusing a zip bomb.

    Members' declared sizes come from the central directory, read without inflating anything;
    the whole archive may declare at most `ZIP_INFLATION_LIMIT` times its own size (plus 1 MiB).
    """
    import stat
    import zipfile

    mode = os.fstat(fh.fileno()).st_mode
    if stat.S_ISDIR(mode):
        raise WeightsError(f"{path}: cannot read: Is a directory")
    if not stat.S_ISREG(mode):
        raise WeightsError(f"{path}: not a regular file (device, socket or pipe)")
    zipped = fh.read(4) == b"PK\x03\x04"
    fh.seek(0)
    if not zipped:
        return False
    size = os.fstat(fh.fileno()).st_size
    try:
        with zipfile.ZipFile(fh) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (damaged zip archive: {_first_line(exc)})") from None
    declared = sum(info.file_size for info in members)
    if declared > ZIP_INFLATION_LIMIT * size + (1 << 20):
        raise WeightsError(
            f"{path}: refused to load: its zip archive declares {declared / 2**20:.0f} MiB of contents in a "
            f"{size / 2**20:.1f} MiB file (a zip bomb? torch writes checkpoints uncompressed)"
        )
    for info in members:
        _check_member(fh, path, info, size)
    fh.seek(0)
    return True


def _check_member(fh: Any, path: Path, info: Any, size: int) -> None:
    """A member as torch.save writes it: stored, not compressed (so nothing inflates past what is on
    disk), its declared size its stored size, its local header there, and all its bytes inside the
    file. One 30-byte read per member; the data itself is not read (torch memory-maps it)."""
    import struct
    import zipfile

    name = info.filename[:80]
    if info.compress_type != zipfile.ZIP_STORED:
        raise WeightsError(f"{path}: refused to load: member '{name}' is compressed (torch.save stores members uncompressed; a zip bomb?)")
    if info.compress_size != info.file_size:
        raise WeightsError(f"{path}: refused to load: stored member '{name}' declares {info.file_size} bytes but stores {info.compress_size}")
    fh.seek(info.header_offset)
    local = fh.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04" or struct.unpack("<H", local[8:10])[0] != zipfile.ZIP_STORED:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (damaged zip archive: member '{name}' has no stored local header)")
    start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
    if start + info.file_size > size:
        raise WeightsError(
            f"{path}: refused to load: member '{name}' declares {info.file_size} bytes, the file holds {max(0, size - start)} of them (cut short?)"
        )


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's long weights-only message that says what was refused (a global, an opcode)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch bolds parts of it for terminals
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if found:
        return re.split(r"(?<=\.)\s", found.group(1).strip())[0]  # first sentence; the rest is advice to trust the file
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    return (reasons or lines or ["unsafe content"])[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def check_tensors(
    tensors: dict[str, torch.Tensor], model_cfg: dict[str, Any], num_prompts: int, source: str, finite: bool = True
) -> None:
    """Every expected tensor present with its shape, nothing extra, no NaN/Inf: else one clear error.

    `finite=False` checks only names and shapes (for memory-mapped tensors, see `check_finite_file`).
    """
    check_config_fits(model_cfg, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    expected = expected_shapes(model_cfg, num_prompts)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    wrong = sorted(
        f"{k} {tuple(tensors[k].shape)} (expected {expected[k]})"
        for k in expected.keys() & tensors.keys()
        if tuple(tensors[k].shape) != expected[k]
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError(f"{source}: tensors do not fit the model config: " + "; ".join(problems))
    for key, value in tensors.items():
        if finite and value.is_floating_point() and not _all_finite(value):
            raise WeightsError(f"{source}: tensor '{key}' contains NaN or Inf values")


def _all_finite(values: torch.Tensor) -> bool:
    """Exact NaN/Inf test, fast: a sum is finite iff every term is, unless it overflows (then ask isfinite)."""
    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A stable id of the tensors (names, dtypes, shapes and bytes): equal ids, equal weights."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
