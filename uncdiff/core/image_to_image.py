"""Image-to-image conditioning (docs/algorithms.md §7) as plain tensor code: the conditional eps model
as a closure over the condition, and the known-pixel replacement of inpainting and uncropping as a
sampler. The masks and degradations that make a task's pairs are data (`uncdiff.data`).

Conventions: a condition `y` is `[B, C_y, H, W]` in [-1, 1]; a mask is `[B, 1 | C, H, W]` with 1 at the
pixels the model generates and 0 at the known ones.
"""

import copy

import torch
from torch import nn

from uncdiff.core.samplers import SampleNoise, Sampler


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

    def for_image(self, i: int) -> "ConditionedNet":
        """The eps model of image `i` alone (its condition only), on the same network."""
        return ConditionedNet(self.net, self.condition[i:i + 1])

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
