"""Simple shapes: a procedural dataset whose every image can be checked exactly (docs/algorithms.md §6c).

In the spirit of Aithal et al. (NeurIPS 2024, "Understanding Hallucinations in Diffusion Models through
Mode Interpolation"): each 16x16 image holds a few white shapes on black, under rules that a generated
image can break, so a deterministic checker labels every sample valid or names the rule it breaks.

- Three kinds, each with its own band of rows: `square` (4x4 filled) in rows 0-4, `cross` (5x5 plus,
  arms one pixel wide) in rows 5-10, `triangle` (rows of width 1, 3, 5, 7) in rows 11-15.
- Each kind appears at most once; at least one shape is present.
- Training images draw each kind with probability 1/2 (redrawn while none is drawn), at a uniform
  column and at the band's fixed row (1, 6, 12), so the shapes never touch.

The checker reads an image through one threshold (a pixel is ink when its value is above the middle
of the range: > 0 in [-1, 1], > 127 in uint8), labels 8-connected ink components, and applies the
rules in this order, naming the first one broken:

1. `blank`: no ink at all.
2. `malformed`: a component is not exactly one of the three shapes (any position).
3. `wrong_region`: a shape does not lie entirely within its kind's band.
4. `duplicate`: a kind appears more than once.

Interpolating between training modes (half of one square and half of another, two crosses) breaks
rules 2 or 4; a shape drifting out of its band breaks rule 3.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

SIZE = 16
RULES = ("blank", "malformed", "wrong_region", "duplicate")


def _triangle() -> np.ndarray:
    rows = [np.pad(np.ones(w, bool), (3 - w // 2, 3 - w // 2)) for w in (1, 3, 5, 7)]
    return np.stack(rows)


def _cross() -> np.ndarray:
    shape = np.zeros((5, 5), bool)
    shape[2, :] = shape[:, 2] = True
    return shape


# kind -> (template [h, w], band rows [first, last], training row of the template's top)
KINDS = {
    "square": (np.ones((4, 4), bool), (0, 4), 1),
    "cross": (_cross(), (5, 10), 6),
    "triangle": (_triangle(), (11, 15), 12),
}


def make_shapes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` training images, uint8 `[n, 1, 16, 16]` (0 background, 255 ink), and their labels `[n]`: the
    bit mask of the kinds present (bit k for the k-th kind of `KINDS`). A function of (`n`, `seed`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, SIZE, SIZE), np.uint8)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        present = np.zeros(len(KINDS), bool)
        while not present.any():
            present = rng.random(len(KINDS)) < 0.5
        for k, (template, _, top) in enumerate(KINDS.values()):
            column = rng.integers(0, SIZE - template.shape[1] + 1)  # drawn for every kind: one stream per image
            if present[k]:
                h, w = template.shape
                images[i, 0, top:top + h, column:column + w][template] = 255
                labels[i] |= 1 << k
    return torch.from_numpy(images), torch.from_numpy(labels)


@dataclass(frozen=True)
class Verdict:
    """The checker's label of one image: `rule` is None when it is valid, else the first rule broken
    (one of `RULES`), with `detail` saying where."""

    rule: Optional[str]
    detail: str = ""

    @property
    def valid(self) -> bool:
        return self.rule is None


def ink(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """The ink pixels `[16, 16]` (bool) of one image `[1, 16, 16]` or `[16, 16]`: float in [-1, 1]
    (ink > 0) or uint8 (ink > 127)."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = array.reshape(array.shape[-2:]) if array.ndim == 3 and array.shape[0] == 1 else array
    if array.shape != (SIZE, SIZE):
        raise ValueError(f"a shapes image is [1, {SIZE}, {SIZE}] or [{SIZE}, {SIZE}], got {tuple(array.shape)}")
    return array > 127 if array.dtype == np.uint8 else array > 0


def _kind_of(component: np.ndarray) -> Optional[str]:
    for kind, (template, _, _) in KINDS.items():
        if component.shape == template.shape and np.array_equal(component, template):
            return kind
    return None


def check(image: torch.Tensor | np.ndarray) -> Verdict:
    """The verdict on one image (the module docstring's rules, in order)."""
    pixels = ink(image)
    if not pixels.any():
        return Verdict("blank")
    labels, count = ndimage.label(pixels, structure=np.ones((3, 3), int))
    found = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        kind = _kind_of(labels[box] == index)
        if kind is None:
            return Verdict("malformed", f"component at rows {box[0].start}-{box[0].stop - 1}, "
                                        f"columns {box[1].start}-{box[1].stop - 1} is no known shape")
        found.append((kind, box[0].start, box[0].stop - 1))
    for kind, first, last in found:
        low, high = KINDS[kind][1]
        if first < low or last > high:
            return Verdict("wrong_region", f"{kind} in rows {first}-{last}, outside its band {low}-{high}")
    kinds = [kind for kind, _, _ in found]
    for kind in KINDS:
        if kinds.count(kind) > 1:
            return Verdict("duplicate", f"{kinds.count(kind)} of kind {kind}")
    return Verdict(None)


def check_batch(images: torch.Tensor | Sequence) -> list[Verdict]:
    """The verdicts of images `[N, 1, 16, 16]`."""
    return [check(image) for image in images]


def invalid_mask(images: torch.Tensor | Sequence) -> torch.Tensor:
    """`[N]` bool: which of the images break a rule."""
    return torch.tensor([not v.valid for v in check_batch(images)], dtype=torch.bool)
