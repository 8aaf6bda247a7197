"""Which exact runtime is fastest for an image tower on this machine: measured, not guessed.

Each installed exact runtime (torch, ONNX Runtime and OpenVINO, all fp32) encodes the same fixed
batch in alternating rounds (A B C, A B C, ...), so a change of load on a shared machine hits all
of them alike; the time of a runtime is its best round. A runtime counts only if its CTW and ATD on
that batch are within `EXACT_BOUND` of torch fp32's (README "Runtimes"); the fastest exact one wins.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.clipn import CLIPN
from ..scores.scoring import score
from . import missing
from .onnx_export import cached_export
from .towers import OnnxTower, OpenVinoTower

EXACT_BOUND = 1e-5  # CTW/ATD of an exact runtime against torch fp32 (README "Runtimes")
EXACT_RUNTIMES = ("torch", "onnx", "openvino")


@dataclass
class Measurement:
    """Seconds per batch (best round) and the largest CTW/ATD change against torch, per runtime."""

    batch: int
    rounds: int
    seconds: dict[str, float] = field(default_factory=dict)
    max_diff: dict[str, float] = field(default_factory=dict)

    @property
    def exact(self) -> list[str]:
        return [name for name in self.seconds if self.max_diff[name] <= EXACT_BOUND]

    @property
    def winner(self) -> str:
        return min(self.exact, key=self.seconds.__getitem__)

    def as_dict(self) -> dict[str, object]:
        return {"batch": self.batch, "rounds": self.rounds, "seconds_per_batch": self.seconds, "max_ctw_atd_diff": self.max_diff,
                "exact_bound": EXACT_BOUND}


def fixed_batch(size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """A seeded batch of preprocessed-looking pixels (the same every run, so every runtime sees the same)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def installed_runtimes() -> list[str]:
    """The exact runtimes this machine can run (torch always)."""
    return [name for name in EXACT_RUNTIMES if missing(name) is None]


def encoders(model: CLIPN, folder: str | os.PathLike[str], fingerprint: str, runtimes: list[str]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One fp32 image tower per runtime, each mapping a pixel batch to normalized features."""
    made: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in runtimes:
        if name == "torch":
            made[name] = lambda pixels: model.encode_image(pixels, normalize=True).float()
            continue
        path = cached_export(model, folder, fingerprint)
        tower = OnnxTower(path) if name == "onnx" else OpenVinoTower(path, "fp32")
        made[name] = lambda pixels, tower=tower: torch.from_numpy(np.array(tower(pixels.numpy()), dtype=np.float32))
    return made


@torch.inference_mode()
def measure_runtimes(
    model: CLIPN, text_yes: torch.Tensor, text_no: torch.Tensor, folder: str | os.PathLike[str], fingerprint: str,
    runtimes: list[str] | None = None, batch: int = 8, rounds: int = 3,
) -> Measurement:
    """Time each runtime (torch always) on one fixed batch, alternating rounds, and compare its CTW/ATD with torch fp32's."""
    size = model.visual.image_size
    pixels = fixed_batch(size[0] if isinstance(size, tuple) else size, batch)
    names = list(dict.fromkeys(["torch", *(runtimes or installed_runtimes())]))  # torch fp32 is the reference
    towers = encoders(model, folder, fingerprint, names)
    reference = score(towers["torch"](pixels), text_yes, text_no)
    result = Measurement(batch, rounds)
    for name, encode in towers.items():  # a first call warms each up (allocations, kernel choice) and checks it
        found = score(encode(pixels), text_yes, text_no)
        result.max_diff[name] = max(float((found.ctw - reference.ctw).abs().max()), float((found.atd - reference.atd).abs().max()))
    for _ in range(rounds):
        for name, encode in towers.items():
            start = time.perf_counter()
            encode(pixels)
            elapsed = time.perf_counter() - start
            result.seconds[name] = min(result.seconds.get(name, elapsed), elapsed)
    return result
