"""Image-to-image sampling with uncertainty (docs/algorithms.md §7): `generate` of
`uncdiff.uncertainty.sampling` on the conditional eps model `ConditionedNet(net, y)`, batch by batch,
with the known pixels replaced at every step and the maps restricted to the generated pixels where a
mask exists. No Lightning."""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from uncdiff.core.image_to_image import ConditionedNet, with_known_pixels
from uncdiff.core.samplers import Progress, SampleNoise, Sampler
from uncdiff.uncertainty.bayesdiff import BayesDiffUncertainty
from uncdiff.uncertainty.sampling import SampleResult, generate

HookFactory = Callable[[nn.Module], Any]  # the conditional eps model of one batch -> its sampler hook (or None)


def restrict_to_generated(result: SampleResult, mask: torch.Tensor) -> SampleResult:
    """`result` with its maps zero at the known pixels (`mask [N, 1, H, W]` is 0 there) and the
    per-sample scores the sums of the restricted maps (the `sum` score over the generated pixels);
    per-step totals are recomputed from kept step maps, and dropped without them."""
    if result.maps is None:
        return result
    mask = mask.to(result.maps)
    maps = result.maps * mask
    step_maps = None if result.step_maps is None else result.step_maps * mask[:, None]
    totals = None if step_maps is None else step_maps.flatten(2).double().sum(2)
    return dataclasses.replace(result, maps=maps, scores=maps.flatten(1).sum(1), step_maps=step_maps,
                               step_totals=totals, total_steps=result.step_indices if totals is not None else None)


def merge_results(parts: Sequence[SampleResult]) -> SampleResult:
    """The results of consecutive batches as one."""
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
    first = parts[0]
    return SampleResult(images=cat("images"), maps=cat("maps"), scores=cat("scores"), nfe=sum(p.nfe for p in parts),
                        step_maps=cat("step_maps"), step_indices=first.step_indices, step_totals=cat("step_totals"),
                        total_steps=first.total_steps, noise_norms=cat("noise_norms"))


def generate_conditional(net: nn.Module, sampler: Sampler, condition: torch.Tensor, seeds: Sequence[int],
                         shape: Sequence[int], mask: Optional[torch.Tensor] = None,
                         make_hook: Optional[HookFactory] = None, device: torch.device | str = "cpu",
                         batch_size: int = 256, progress: Optional[Progress] = None) -> SampleResult:
    """One output per condition `condition [N, C_y, H, W]` and seed (`seeds`, N of them), of image
    `shape (C, H, W)`, from `net(concat(y, x_t), t)`.

    - `mask [N, 1, H, W]` (1 = generate): the known pixels (mask 0) are `condition`'s, replaced after
      every step (`with_known_pixels`), so they come out exactly; the maps and scores count only the
      generated pixels (`restrict_to_generated`). Needs `C_y = C`.
    - `make_hook(eps_model)`: builds the batch's estimator or guidance hook for its conditional model
      (MC-Dropout and BayesDiff need the model itself); None for plain sampling.
    Per-sample randomness comes from the seeds, so an output doesn't depend on `batch_size`.
    """
    seeds = list(seeds)
    if condition.shape[0] != len(seeds):
        raise ValueError(f"{condition.shape[0]} conditions for {len(seeds)} seeds: give one seed per condition")
    if mask is not None and (mask.shape[0] != condition.shape[0] or condition.shape[1] != shape[0]):
        raise ValueError(f"mask {tuple(mask.shape)} and condition {tuple(condition.shape)} don't fit images of {shape}")
    parts = []
    for i in range(0, len(seeds), batch_size):
        batch = seeds[i:i + batch_size]
        y = condition[i:i + batch_size].to(device)
        model = ConditionedNet(net, y)
        step_sampler = sampler
        if mask is not None:
            step_sampler = with_known_pixels(sampler, y, mask[i:i + batch_size].to(device), SampleNoise(batch, device))
        hook = None if make_hook is None else make_hook(model)
        # BayesDiff's hook brings its own eps model, which caches the features of the sampler's pass
        eps_model = hook.eps_model if isinstance(hook, BayesDiffUncertainty) else model
        result = generate(eps_model, step_sampler, shape, batch, hook, device, len(batch), progress)
        parts.append(result if mask is None else restrict_to_generated(result, mask[i:i + batch_size]))
    return merge_results(parts)
