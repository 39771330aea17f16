"""The masks of inpainting and uncropping (docs/algorithms.md §7): 1 at the pixels the model generates,
0 at the known ones. Each random mask is drawn from a numpy Generator, so a sample's mask follows from
its key (`uncdiff.data.degradations.task_rng`)."""

import math
from typing import Optional

import numpy as np
import torch

MASK_KINDS = ("mixed", "box", "strokes")  # inpainting
UNCROP_SIDES = ("mixed", "one", "all")


def box_mask(size: int) -> torch.Tensor:
    """Palette's centre box: the middle `size/2 x size/2` square (a quarter of the area), `[1, H, W]`."""
    mask = torch.zeros(1, size, size)
    lo, hi = size // 4, size // 4 + size // 2
    mask[:, lo:hi, lo:hi] = 1
    return mask


def stroke_mask(size: int, rng: np.random.Generator, max_strokes: int = 4) -> torch.Tensor:
    """Free-form brush strokes (in the manner of DeepFill v2's masks, used by Palette): 1..`max_strokes`
    polylines of 4..12 segments from a random start, each segment at a random angle with length
    10-40% of the side, drawn with a round brush 6-15% of the side wide. `[1, H, W]`."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        radius = rng.uniform(0.06, 0.15) * size / 2
        p = rng.uniform(0, size, 2)
        for _ in range(int(rng.integers(4, 13))):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * size
            q = np.clip(p + length * np.array([math.cos(angle), math.sin(angle)]), 0, size)
            mask |= segment_distance(xs, ys, p, q) <= radius
            p = q
    return torch.from_numpy(mask).float()[None]


def segment_distance(xs: np.ndarray, ys: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance of the points `(xs, ys)` to the segment from `p` to `q` (each `(x, y)`)."""
    d = q - p
    length2 = float(d @ d)
    s = np.zeros_like(xs) if length2 == 0 else np.clip(((xs - p[0]) * d[0] + (ys - p[1]) * d[1]) / length2, 0, 1)
    return np.hypot(xs - (p[0] + s * d[0]), ys - (p[1] + s * d[1]))


def inpaint_mask(size: int, rng: np.random.Generator, kind: str = "mixed") -> torch.Tensor:
    """`box`, `strokes`, or `mixed` (either, with probability 1/2 each). `[1, H, W]`."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask must be one of {MASK_KINDS}, got {kind!r}")
    if kind == "mixed":
        kind = "box" if rng.random() < 0.5 else "strokes"
    return box_mask(size) if kind == "box" else stroke_mask(size, rng)


def uncrop_mask(size: int, rng: np.random.Generator, sides: str = "mixed") -> torch.Tensor:
    """Half of the area to generate: `one` side (the left, right, top or bottom half, drawn), `all`
    sides (the border around a centred square of side `round(size / sqrt 2)`, so about half the
    area), or `mixed` (either, with probability 1/2 each). `[1, H, W]`."""
    if sides not in UNCROP_SIDES:
        raise ValueError(f"sides must be one of {UNCROP_SIDES}, got {sides!r}")
    if sides == "mixed":
        sides = "one" if rng.random() < 0.5 else "all"
    mask = torch.zeros(1, size, size)
    if sides == "all":
        mask[:] = 1
        inner = round(size / math.sqrt(2))
        lo = (size - inner) // 2
        mask[:, lo:lo + inner, lo:lo + inner] = 0
        return mask
    half = size // 2
    side = int(rng.integers(4))
    if side == 0:
        mask[:, :, :half] = 1
    elif side == 1:
        mask[:, :, size - half:] = 1
    elif side == 2:
        mask[:, :half, :] = 1
    else:
        mask[:, size - half:, :] = 1
    return mask


def check_mask(mask: Optional[torch.Tensor], shape: tuple[int, ...], what: str = "mask") -> torch.Tensor:
    """`mask` as `[N, 1, H, W]` bool-valued float for `N` images of `shape = (N, C, H, W)`, or a
    ValueError naming what doesn't fit."""
    if mask is None:
        raise ValueError(f"{what} is missing: inpainting and uncropping need a mask (1 = generate, 0 = known)")
    if mask.dim() == 3:
        mask = mask[:, None]
    n, c, h, w = shape
    if mask.dim() != 4 or mask.shape[0] not in (1, n) or mask.shape[1] not in (1, c) or tuple(mask.shape[2:]) != (h, w):
        raise ValueError(f"{what} of shape {tuple(mask.shape)} doesn't match {n} images of {(c, h, w)}: give "
                         f"[{n} or 1, 1, {h}, {w}]")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{what} must hold only 0 (known) and 1 (generate)")
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            raise ValueError(f"{what} must be the same in every channel")
        mask = mask[:, :1]
    return mask.float().expand(n, 1, h, w)
