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

from ..errors import TrainError
from ..files import atomic_path

FORMAT = "clipn-cli.train-state"
FORMAT_VERSION = 1


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a crash mid-write leaves the previous one intact)."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, tmp)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: {str(exc).strip()[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainError(f"{path}: not a clipn training checkpoint (written by 'clipn train --checkpoint-every')")
    if state.get("format_version") != FORMAT_VERSION:
        raise TrainError(f"{path}: checkpoint format version {state.get('format_version')} is not supported")
    return state


def check_compatible(path: str | os.PathLike[str], saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume with settings that would make the result differ from an uninterrupted run."""
    changed = [f"{k} {saved.get(k)!r} → {v!r}" for k, v in current.items() if saved.get(k) != v]
    if changed:
        raise TrainError(f"{path}: cannot resume with changed settings: {'; '.join(changed)}")
