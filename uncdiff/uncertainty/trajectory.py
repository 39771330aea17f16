"""The x0-trajectory detector of Aithal et al. (NeurIPS 2024, "Understanding Hallucinations in Diffusion
Models through Mode Interpolation"; docs/algorithms.md §6c) as a sampler hook.

A sample that interpolates between modes keeps changing its mind late in sampling: its clean-image
estimate `x0_hat = (x_t - sqrt(1 - abar[t]) eps) / sqrt(abar[t])` still moves over the final steps. The
map is the per-pixel variance of `x0_hat` over the steps of `window` (by default the last fifth), the
score its sum over pixels. It reads the sampler's own prediction at each step, so it costs no network
evaluation beyond plain sampling.
"""

from typing import Optional, Sequence

import torch

from uncdiff.core.samplers import StepContext, predict_x0
from uncdiff.uncertainty.estimators import check_window, window_steps

DEFAULT_WINDOW = (0.8, 1.0)


class X0TrajectoryUncertainty:
    """Per-pixel variance (unbiased, over steps) of the sampler's `x0_hat` on the steps of `window`
    (fractions of the steps, at least two of them inside): `maps [B, C, H, W]`, `scores [B]` their sum.
    `x0_hat` is clipped as the sampler clips it. Results describe the latest run (a run starts at step
    index 0); `nfe` is always 0."""

    def __init__(self, window: Sequence[float] = DEFAULT_WINDOW):
        self.window = check_window("window", window)
        self.reset()

    def reset(self) -> None:
        self.nfe = 0
        self.step_indices: list[int] = []
        self._x0: list[torch.Tensor] = []

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        inside = window_steps(self.window, ctx.num_steps)
        if ctx.index == 0:
            self.reset()
            if len(inside) < 2:
                raise ValueError(f"window {self.window} holds {len(inside)} of the sampler's {ctx.num_steps} steps; "
                                 f"the x0 trajectory's variance needs at least 2: widen it or sample more steps")
        if ctx.index in inside:
            self._x0.append(predict_x0(ctx.sampler.schedule, ctx.x_t, ctx.eps, ctx.t, ctx.sampler.clip).double())
            self.step_indices.append(ctx.index)
        return ctx.eps

    @property
    def maps(self) -> Optional[torch.Tensor]:
        """`[B, C, H, W]`: the variance over the window's steps of each pixel's `x0_hat`."""
        if len(self._x0) < 2:
            return None
        return torch.stack(self._x0).var(0, correction=1).float()

    @property
    def scores(self) -> Optional[torch.Tensor]:
        maps = self.maps
        return None if maps is None else maps.flatten(1).sum(1)

    step_maps = None  # the per-step maps of the stepwise estimators: none here
    step_totals = None
