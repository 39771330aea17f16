"""The image-to-image tasks (docs/algorithms.md §7) as transforms: a clean image in, its condition and
mask out, both a function of the image and a per-sample key (`task_rng`), so a run can rebuild any pair.
The masks are `uncdiff.data.masks`; JPEG goes through Pillow's encoder."""

import io
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from uncdiff.data.masks import MASK_KINDS, UNCROP_SIDES, inpaint_mask, uncrop_mask
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


def fill_masked(x0: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The condition of inpainting and uncropping: `x0` at the known pixels, `noise` (standard
    normal, as in Palette) where `mask` is 1. `x0 [C, H, W]`, `mask [1, H, W]`."""
    return torch.where(mask > 0.5, noise, x0)


def grayscale(x0: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma `0.299 R + 0.587 G + 0.114 B` (Pillow's 'L') repeated to 3 channels; `[3, H, W]`."""
    if x0.shape[-3] != 3:
        raise ValueError(f"colorize needs RGB images (3 channels), got {x0.shape[-3]}: for 1-channel data use the "
                         f"task super_resolve")
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x0.dtype).view(3, 1, 1)
    return (x0 * w).sum(-3, keepdim=True).expand_as(x0).clone()


def downsample_upsample(x0: torch.Tensor, factor: int) -> torch.Tensor:
    """Super-resolution's condition: `x0 [C, H, W]` averaged over `factor x factor` blocks, then
    repeated back to `H x W` (nearest)."""
    if factor < 2 or x0.shape[-1] % factor or x0.shape[-2] % factor:
        raise ValueError(f"factor must be >= 2 and divide the image size {tuple(x0.shape[-2:])}, got {factor}")
    low = torch.nn.functional.avg_pool2d(x0[None], factor)
    return torch.nn.functional.interpolate(low, scale_factor=factor, mode="nearest")[0]


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
