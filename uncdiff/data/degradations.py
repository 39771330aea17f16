"""The image-to-image tasks (docs/algorithms.md §7) as transforms: a clean image in, its condition and
mask out, both a function of the image and a per-sample key, so a run can rebuild any pair.

JPEG uses Pillow's encoder, which is why this lives in io/; the other tasks are tensor code from
`uncdiff.core.conditioning`.
"""

import io
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from uncdiff.core.conditioning import (MASK_KINDS, UNCROP_SIDES, downsample_upsample, fill_masked, grayscale,
                                       inpaint_mask, uncrop_mask)
from uncdiff.io.images import from_uint8

TASKS = ("inpaint", "uncrop", "colorize", "super_resolve", "jpeg")
MASKED_TASKS = ("inpaint", "uncrop")  # the model generates only the masked pixels


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def task_rng(task: str, key: Sequence[int]) -> np.random.Generator:
    """A Philox generator keyed by (task, key): the same key gives the same draws, different keys
    independent ones (e.g. `key = (seed, epoch + 1, index)`)."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([zlib.crc32(task.encode()),
                                                                        *(int(k) for k in key)])))


def jpeg_roundtrip(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 `[C, H, W]` (C = 1 or 3) through Pillow's JPEG encoder and decoder at `quality`."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"jpeg needs uint8 [1 or 3, H, W] images, got {pixels.dtype} {tuple(pixels.shape)}")
    array = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0], "L") if pixels.shape[0] == 1 else Image.fromarray(array, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(buffer))
    return torch.from_numpy(decoded.copy()).reshape(pixels.shape[1], pixels.shape[2], -1).permute(2, 0, 1)


@dataclass(frozen=True)
class Task:
    """One image-to-image task and its options:

    - `inpaint`: `mask` = `mixed` (default; centre box or free-form strokes, 1/2 each), `box` or
      `strokes`; the masked pixels of y are standard normal noise.
    - `uncrop`: `sides` = `mixed` (default), `one` (a random half) or `all` (the border, half the area).
    - `colorize` (RGB only): y = the luma repeated to 3 channels.
    - `super_resolve` (the 1-channel substitute for colorize): y = `factor x factor` block means,
      repeated back to full size.
    - `jpeg`: y = the image through Pillow's JPEG at a quality drawn from `quality` (inclusive).
    """

    name: str = "inpaint"
    mask: str = "mixed"
    sides: str = "mixed"
    quality: tuple[int, int] = (5, 30)
    factor: int = 2

    def __post_init__(self):
        check_task(self.name)
        if self.mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS}, got {self.mask!r}")
        if self.sides not in UNCROP_SIDES:
            raise ValueError(f"sides must be one of {UNCROP_SIDES}, got {self.sides!r}")
        low, high = (int(q) for q in self.quality)
        if not 1 <= low <= high <= 95:
            raise ValueError(f"quality must be a range (low, high) with 1 <= low <= high <= 95, got {self.quality}")
        object.__setattr__(self, "quality", (low, high))
        if int(self.factor) != self.factor or self.factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {self.factor}")

    @property
    def masked(self) -> bool:
        return self.name in MASKED_TASKS

    def condition_channels(self, channels: int) -> int:
        if self.name == "colorize" and channels != 3:
            grayscale(torch.zeros(channels, 1, 1))  # raises, naming the substitute
        return channels

    def __call__(self, pixels: torch.Tensor, key: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(y [C, H, W] float32, mask [1, H, W] float32)` of a uint8 image `[C, H, W]`; the mask is
        all ones for the tasks without one. Every draw comes from `task_rng(name, key)`."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 3:
            raise ValueError(f"a task transforms uint8 [C, H, W] images, got {pixels.dtype} {tuple(pixels.shape)}")
        rng = task_rng(self.name, key)
        x0, size = from_uint8(pixels), pixels.shape[-1]
        mask = torch.ones(1, *pixels.shape[1:])
        if self.masked:
            mask = inpaint_mask(size, rng, self.mask) if self.name == "inpaint" else uncrop_mask(size, rng, self.sides)
            noise = torch.from_numpy(rng.standard_normal(tuple(x0.shape), dtype=np.float32))
            return fill_masked(x0, mask, noise), mask
        if self.name == "colorize":
            return grayscale(x0), mask
        if self.name == "super_resolve":
            return downsample_upsample(x0, self.factor), mask
        quality = int(rng.integers(self.quality[0], self.quality[1] + 1))
        return from_uint8(jpeg_roundtrip(pixels, quality)), mask
