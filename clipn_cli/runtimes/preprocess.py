"""open_clip's eval transform in Pillow and NumPy, pixel for pixel: preprocessing without torch.

The same Pillow operations as torchvision's Resize (shorter side to `size`, bicubic) and CenterCrop,
then RGB, then the same float32 operations as ToTensor (÷ 255) and Normalize (− mean, ÷ std): IEEE
float32 subtraction and division give the same bits in NumPy as in torch, so the pixels are equal,
not close (tests/test_runtimes.py checks it on the fixture images and odd modes). Imports no torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# OpenAI CLIP's normalisation, as open_clip's image_transform uses it
MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32).reshape(3, 1, 1)
STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32).reshape(3, 1, 1)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's size for Resize(int): the shorter side becomes `size`, the longer is truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """A (3, size, size) float32 array equal to `open_clip.image_transform(size, is_train=False)(image)`."""
    width, height = resized_size(*image.size, size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return (pixels - MEAN) / STD
