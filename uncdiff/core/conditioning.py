"""Image-to-image conditioning (docs/algorithms.md §7) as plain tensor code: the conditional eps model
as a closure over the condition, the known-pixel replacement of inpainting and uncropping as a sampler,
and the masks of those tasks.

Conventions: a condition `y` is `[B, C_y, H, W]` in [-1, 1]; a mask is `[B, 1, H, W]` (or `[1, H, W]` for
one image) with 1 at the pixels the model generates and 0 at the known ones.
"""

import copy
import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from uncdiff.core.samplers import SampleNoise, Sampler

MASK_KINDS = ("mixed", "box", "strokes")  # inpainting
UNCROP_SIDES = ("mixed", "one", "all")


# ----------------------------------------------------------------------------------------------
# The conditional eps model


class ConditionedNet(nn.Module):
    """`eps_model(x [N, C, H, W], t [N]) = net(concat(y, x), t)` for the conditions `y [B, C_y, H, W]`.

    Every sampler, estimator and guidance rule takes it as an ordinary noise predictor. The estimators
    evaluate their M copies of each image as one image-major batch (rows `b*M .. b*M + M - 1` are image
    b), so a call with `N = k B` rows gives each row of image b its condition `y[b]`; any other `N` is an
    error (a batch split into chunks of arbitrary size can't be matched to its conditions).
    `features` and `head` are the wrapped network's (BayesDiff, docs/algorithms.md §5b), and the wrapped
    network is a submodule, so MC-Dropout finds its dropout layers.
    """

    def __init__(self, net: nn.Module, condition: torch.Tensor):
        super().__init__()
        if condition.dim() != 4:
            raise ValueError(f"condition must be [B, C, H, W], got shape {tuple(condition.shape)}")
        self.net, self.condition = net, condition

    def rows(self, n: int) -> torch.Tensor:
        """The condition of each of `n` image-major rows: `[n, C_y, H, W]`."""
        b = self.condition.shape[0]
        if n % b:
            raise ValueError(f"the conditional model got {n} rows for {b} conditions: rows must be a whole number "
                             f"of copies of each image, in order (chunk_size is not supported for image-to-image)")
        return self.condition if n == b else self.condition.repeat_interleave(n // b, dim=0)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.rows(x.shape[0]).to(x), x], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(self.joined(x), t)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.joined(x), t)

    @property
    def head(self) -> nn.Module:
        return self.net.head


# ----------------------------------------------------------------------------------------------
# Known pixels: inpainting and uncropping


class KnownPixels:
    """A sampler whose every step ends with the known pixels (mask 0) replaced by the ground truth
    noised to the step's target level, `sqrt(abar[t']) x0 + sqrt(1 - abar[t']) z`, and by the ground
    truth itself after the last step, so the output holds the known pixels exactly. Built by
    `with_known_pixels`; `z` comes from each sample's own stream `'known'`."""

    known: torch.Tensor  # [B, C, H, W]
    known_mask: torch.Tensor  # [B, 1 | C, H, W], True where the model generates
    known_noise: SampleNoise

    def step(self, eps, t, t_prev, x_t, noise=None):
        x = super().step(eps, t, t_prev, x_t, noise)
        known = self.known.to(x)
        if t_prev >= 0:
            a = self.schedule.abar_at(t_prev)
            z = self.known_noise.randn(known.shape[1:], stream="known").to(x)
            known = a**0.5 * known + (1 - a) ** 0.5 * z
        return torch.where(self.known_mask.to(x.device), x, known)


_KNOWN_CLASSES: dict[type, type] = {}


def with_known_pixels(sampler: Sampler, known: torch.Tensor, mask: torch.Tensor, noise: SampleNoise) -> Sampler:
    """A copy of `sampler` (of a subclass of its own class, so that checks such as BayesDiff's
    `isinstance(sampler, DDIMSampler)` still hold) that replaces the known pixels after every step
    (`KnownPixels`). `known [B, C, H, W]` holds the ground truth where `mask [B, 1 | C, H, W]` is 0;
    `noise` holds the batch's B seeds. One batch, one run: the `'known'` streams advance per step."""
    if known.dim() != 4 or mask.dim() != 4 or mask.shape[0] != known.shape[0] or mask.shape[2:] != known.shape[2:] \
            or mask.shape[1] not in (1, known.shape[1]):
        raise ValueError(f"mask {tuple(mask.shape)} doesn't fit the known pixels {tuple(known.shape)}: "
                         f"it must be [B, 1 or C, H, W] for the same B, H, W")
    if len(noise) != known.shape[0]:
        raise ValueError(f"{len(noise)} seeds for {known.shape[0]} images")
    base = type(sampler)
    cls = _KNOWN_CLASSES.setdefault(base, type(f"KnownPixels{base.__name__}", (KnownPixels, base), {}))
    out = copy.copy(sampler)
    out.__class__ = cls
    out.known, out.known_mask, out.known_noise = known, mask > 0.5, noise
    return out


# ----------------------------------------------------------------------------------------------
# Masks (1 = generate), each from a numpy Generator so that a sample's mask follows from its seed


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
