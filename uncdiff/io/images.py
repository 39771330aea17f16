"""The one conversion between float images and 8-bit pixels.

Images in the math are float `[..., C, H, W]` in [-1, 1]; on disk and in the data modules they are
uint8 in 0..255. A saved PNG, the FID extractors' input and the datasets all quantise the same way.
"""

from typing import Sequence

import torch


def to_uint8(images: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float `[..., C, H, W]` with values in `value_range` (default [-1, 1]) -> uint8 0..255:
    scaled to [0, 1], clamped, times 255, rounded to nearest. Computed in the input's float dtype."""
    low, high = value_range
    unit = (images - low) / (high - low)
    return (unit.clamp(0, 1) * 255).round().to(torch.uint8)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., C, H, W]` -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return pixels.float() / 127.5 - 1.0
