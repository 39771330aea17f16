"""The threshold table of guidance's `threshold='table'` (docs/algorithms.md §4): per step and pixel, a
quantile of the aleatoric map over unguided samples. The same samples give the score variants' per-step
reference statistics (docs/algorithms.md §3). `uncdiff.io.tables` saves and loads both."""

from typing import Optional, Sequence

import torch

from uncdiff.core.samplers import EpsModel, Progress, Sampler
from uncdiff.uncertainty.estimators import AleatoricUncertainty
from uncdiff.uncertainty.sampling import generate


def quantile_over_samples(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile along dim 0 with linear interpolation (as `torch.quantile`, which refuses
    inputs over 2^24 elements)."""
    s = x.sort(dim=0).values
    pos = q * (x.shape[0] - 1)
    lo = int(pos)
    hi = min(lo + 1, x.shape[0] - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def reference_statistics(totals: torch.Tensor) -> dict:
    """`{'mean': [n], 'std': [n]}` (float64) of per-step totals `totals [N, n]` over the N samples (the
    sum over c, h, w of `U_t` of each sample at each step); `std` is the unbiased standard deviation
    (N >= 2). The normalised score variants (docs/algorithms.md §3) divide by them."""
    if totals.dim() != 2 or totals.shape[0] < 2:
        raise ValueError(f"reference statistics need per-step totals [N >= 2, steps], got {tuple(totals.shape)}")
    totals = totals.double()
    return {"mean": totals.mean(0), "std": totals.std(0, correction=1)}


def calibrate_table_and_reference(eps_model: EpsModel, sampler: Sampler, shape: Sequence[int], seeds: Sequence[int],
                                  quantile: float = 0.95, M: int = 5, variant: str = "centered",
                                  chunk_size: Optional[int] = None, batch_size: int = 256,
                                  device: torch.device | str = "cpu",
                                  progress: Optional[Progress] = None) -> tuple[torch.Tensor, dict]:
    """From one set of unguided samples, one per seed: the threshold table `tau [steps, C, H, W]`
    (at each sampler step and position, the `quantile` of `U_t` over the samples; docs/algorithms.md §4,
    `threshold='table'`) and the score variants' reference statistics `{'mean': [steps], 'std': [steps]}`
    (at each step, the mean and standard deviation over the samples of the per-image total of `U_t`;
    docs/algorithms.md §3). Use them with the same sampler, step count, variant and M."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    est = AleatoricUncertainty(M, variant, chunk_size, keep_maps=True)
    result = generate(eps_model, sampler, shape, seeds, est, device, batch_size, progress)
    maps = result.step_maps
    table = torch.stack([quantile_over_samples(maps[:, i], quantile) for i in range(maps.shape[1])])
    return table, reference_statistics(result.step_totals)


def calibrate_threshold_table(eps_model: EpsModel, sampler: Sampler, shape: Sequence[int], seeds: Sequence[int],
                              quantile: float = 0.95, M: int = 5, variant: str = "centered",
                              chunk_size: Optional[int] = None, batch_size: int = 256,
                              device: torch.device | str = "cpu", progress: Optional[Progress] = None) -> torch.Tensor:
    """`tau [steps, C, H, W]`: at each sampler step and position, the `quantile` of `U_t` (docs/algorithms.md §3)
    over unguided samples, one per seed (docs/algorithms.md §4, `threshold='table'`). Use it with the same
    sampler, step count, variant and number of perturbations M."""
    return calibrate_table_and_reference(eps_model, sampler, shape, seeds, quantile, M, variant,
                                         chunk_size, batch_size, device, progress)[0]
