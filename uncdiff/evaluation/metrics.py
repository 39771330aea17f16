"""Evaluation helpers of docs/algorithms.md §6 that are not FID: sparsification (AUSE / AURG) and the subsets
of the filtering experiment (the filter itself is `uncdiff.core.filtering.keep_best`)."""

from typing import Sequence

import torch


def sparsification_curve(uncertainty: torch.Tensor, error: torch.Tensor,
                         num_fractions: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSE of the pixels that remain after removing the fraction `f` with the highest uncertainty.

    Over all pixels of all images: `uncertainty` and `error` (the per-pixel *squared* error) have
    the same shape. Fractions are `f_k = k / num_fractions`, k = 0..num_fractions-1 (`f = 0` keeps
    every pixel; `floor(f N)` pixels are removed). Returns `(fractions, rmse)`, both
    `[num_fractions]` float64. Ties in uncertainty are broken by position (stable sort).
    """
    if uncertainty.shape != error.shape:
        raise ValueError(f"uncertainty {tuple(uncertainty.shape)} and error {tuple(error.shape)} "
                         "must have the same shape")
    if num_fractions < 1:
        raise ValueError(f"num_fractions must be >= 1, got {num_fractions}")
    u, e = uncertainty.flatten().double(), error.flatten().double()
    n = e.numel()
    e_sorted = e[torch.argsort(u, descending=True, stable=True)]
    tail = e_sorted.flip(0).cumsum(0).flip(0)  # tail[r] = sum of the errors left after removing r pixels
    fractions = torch.arange(num_fractions, dtype=torch.float64) / num_fractions
    removed = (fractions * n).floor().long()
    return fractions, (tail[removed] / (n - removed)).clamp(min=0).sqrt()


def curve_area(rmse: torch.Tensor) -> float:
    """Area under a sparsification curve over [0, 1): the mean of its equally spaced points (left
    Riemann sum), so a flat curve at the full RMSE has exactly that area."""
    return float(rmse.mean())


def ause_aurg(uncertainty: torch.Tensor, error: torch.Tensor, num_fractions: int = 50) -> tuple[float, float]:
    """`(AUSE, AURG)` (docs/algorithms.md §6): AUSE = area(uncertainty curve) - area(oracle curve), where the oracle
    removes pixels by decreasing error; AURG = RMSE(all pixels) - area(uncertainty curve).
    Lower AUSE and higher AURG are better; `error` is the per-pixel squared error."""
    _, curve = sparsification_curve(uncertainty, error, num_fractions)
    _, oracle = sparsification_curve(error, error, num_fractions)
    area = curve_area(curve)
    return area - curve_area(oracle), float(curve[0]) - area


def random_subsets(n: int, keep: int, seeds: Sequence[int]) -> list[torch.Tensor]:
    """One random subset of `keep` of the indices 0..n-1 per seed (sorted `[keep]` long tensors):
    the baseline the filtered set is compared with."""
    if not 0 < keep <= n:
        raise ValueError(f"keep must be in [1, n={n}], got {keep}")
    return [torch.randperm(n, generator=torch.Generator().manual_seed(int(s)))[:keep].sort().values for s in seeds]
