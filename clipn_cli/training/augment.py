"""Training augmentation whose randomness belongs to the sample, not to a thread.

open_clip's train transform draws its random resized crop from torch's global generator. Images
are decoded in a thread pool, so which crop a sample got depended on thread timing, and a resumed
run could not draw the same crops again. Here each crop comes from a generator seeded by
(seed, rank, position of the sample in this process's stream): the same run makes the same crops
with any number of threads, and a resumed run makes the crops the interrupted one would have.
The crop parameters follow torchvision's RandomResizedCrop (up to 10 tries, then a central crop).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from PIL import Image


def sample_generator(seed: int, rank: int, position: int) -> torch.Generator:
    """A generator that depends only on (seed, rank, position): independent of threads and of resumes."""
    digest = hashlib.blake2b(f"clipn-augment:{seed}:{rank}:{position}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop, drawn from `generator`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class KeyedTransform:
    """open_clip's train transform with its crop drawn per sample: `transform(image, position)`."""

    def __init__(self, train_transform: Callable, seed: int, rank: int = 0) -> None:
        from torchvision import transforms

        steps = list(getattr(train_transform, "transforms", []))
        if not steps or not isinstance(steps[0], transforms.RandomResizedCrop):
            raise ValueError("expected open_clip's train transform to start with a RandomResizedCrop")
        self.crop, self.rest = steps[0], transforms.Compose(steps[1:])
        if any(isinstance(t, (transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.RandomApply)) for t in steps[1:]):
            raise ValueError("open_clip's train transform has random steps beyond the crop")
        self.seed, self.rank = seed, rank

    def __call__(self, image: Image.Image, position: int) -> torch.Tensor:
        from torchvision.transforms import functional

        top, left, h, w = crop_params(image.width, image.height, tuple(self.crop.scale), tuple(self.crop.ratio), sample_generator(self.seed, self.rank, position))
        cropped = functional.resized_crop(image, top, left, h, w, list(self.crop.size), self.crop.interpolation, antialias=self.crop.antialias)
        return self.rest(cropped)
