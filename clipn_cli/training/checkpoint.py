"""Training checkpoints: enough to resume a run exactly, and nothing that could run code.

A checkpoint holds the trainable ("no") tensors, the optimizer and grad-scaler state, the step,
the samples each process consumed, and the settings that must not change on resume. The frozen
weights are not stored: they come from BASE again, and their fingerprint must match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainError, WeightsError
from ..files import atomic_path

FORMAT = "clipn-cli.train-state"
FORMAT_VERSION = 1


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a crash mid-write leaves the previous one intact)."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, tmp)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`: tensors and plain containers only.

    Before torch inflates anything, the zip's central directory must declare at most twice the file's
    size and every member must be stored uncompressed (as torch.save writes them), so what is loaded is
    at most what is on disk (`weights.format._check_archive`, shared with official checkpoints); after
    loading, every key a resume reads must be there with its type."""
    from ..weights.format import _check_archive

    path = Path(path)
    try:
        fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)), "rb")
    except OSError as exc:
        raise TrainError(f"{path}: no such checkpoint" if isinstance(exc, FileNotFoundError) else f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        with fh:
            try:
                zipped = _check_archive(fh, path)
            except WeightsError as exc:
                raise TrainError(str(exc).replace("PyTorch checkpoint", "training checkpoint")) from None
            if not zipped:
                raise TrainError(f"{path}: not a clipn training checkpoint (not a zip archive as torch.save writes)")
            state = torch.load(fh, map_location="cpu", weights_only=True)
    except TrainError:
        raise
    except Exception as exc:
        raise TrainError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: {str(exc).strip()[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainError(f"{path}: not a clipn training checkpoint (written by 'clipn train --checkpoint-every')")
    if state.get("format_version") != FORMAT_VERSION:
        raise TrainError(f"{path}: checkpoint format version {str(state.get('format_version'))[:20]} is not supported")
    _check_fields(path, state)
    return state


def _check_fields(path: Path, state: dict[str, Any]) -> None:
    """Every entry a resume reads, with its type: a damaged checkpoint is one line, not a KeyError."""
    def natural(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    checks = {
        "settings": lambda v: isinstance(v, dict),
        "trainable": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
        "optimizer": lambda v: isinstance(v, dict) and {"state", "param_groups"} <= v.keys(),
        "scaler": lambda v: isinstance(v, dict),
        "step": natural,
        "consumed": lambda v: isinstance(v, list) and len(v) > 0 and all(natural(c) for c in v),
    }
    for key, ok in checks.items():
        if key not in state:
            raise TrainError(f"{path}: damaged training checkpoint (no '{key}')")
        if not ok(state[key]):
            raise TrainError(f"{path}: damaged training checkpoint ('{key}' is not what clipn writes there)")


def check_compatible(path: str | os.PathLike[str], saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume with settings that would make the result differ from an uninterrupted run."""
    changed = [f"{k} {saved.get(k)!r} → {v!r}" for k, v in current.items() if saved.get(k) != v]
    if changed:
        raise TrainError(f"{path}: cannot resume with changed settings: {'; '.join(changed)}")
