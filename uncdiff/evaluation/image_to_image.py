"""Image-to-image metrics (docs/algorithms.md §7): distance of outputs to the ground truth, and how well a
pixel uncertainty map ranks the real per-pixel error (sparsification, restricted to the generated
pixels). Images are `[N, C, H, W]` in [-1, 1]; masks `[N, 1, H, W]` with 1 at the generated pixels."""

from typing import Optional

import torch

from uncdiff.evaluation.metrics import ause_aurg


def generated(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The entries of `values [N, C, H, W]` at generated pixels (all of them without a mask), flat."""
    if mask is None:
        return values.flatten()
    return values[mask.to(values.device).expand_as(values) > 0.5]


def l1_psnr(outputs: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """`(L1, PSNR)` on the [0, 1] scale over the generated pixels: the mean absolute error, and
    `10 log10(1 / MSE)` of each image's generated pixels, averaged over images (dB)."""
    diff = (outputs.double() - targets.double()) / 2
    l1 = float(generated(diff.abs(), mask).mean())
    psnrs = []
    for i in range(len(diff)):
        mse = generated(diff[i:i + 1].pow(2), None if mask is None else mask[i:i + 1]).mean()
        psnrs.append(float(10 * torch.log10(1 / mse.clamp_min(1e-10))))
    return l1, sum(psnrs) / len(psnrs)


def error_calibration(maps: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, num_fractions: int = 50) -> tuple[float, float]:
    """`(AUSE, AURG)` of the uncertainty `maps [N, C, H, W]` against the squared error of `outputs` to
    `targets`, over the generated pixels (docs/algorithms.md §6's sparsification)."""
    error = (outputs.double() - targets.double()).pow(2)
    return ause_aurg(generated(maps.double(), mask), generated(error, mask), num_fractions)
