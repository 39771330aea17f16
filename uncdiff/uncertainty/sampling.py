"""Sampling with an uncertainty estimator attached: images, maps, scores and the cost in network
evaluations, over a plain `eps_model(x, t)` callable (no Lightning)."""

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from uncdiff.uncertainty.bayesdiff import BayesDiffUncertainty
from uncdiff.uncertainty.guidance import UncertaintyGuidance
from uncdiff.core.samplers import EpsModel, Sampler, StepContext, sample
from uncdiff.uncertainty.estimators import AleatoricUncertainty, MCDropoutUncertainty

ESTIMATORS = {
    "none": None,
    "aleatoric": AleatoricUncertainty,
    "guided": UncertaintyGuidance,
    "mc_dropout": MCDropoutUncertainty,
    "bayesdiff": BayesDiffUncertainty,
}


@dataclass
class SampleResult:
    """What `generate` returns; tensors on the CPU, one row per seed.

    `maps [N, C, H, W]`: the estimator's per-pixel uncertainty (summed over its window's steps;
    `Var[x_0]` for BayesDiff); `scores [N]`: the per-sample score used for filtering; `nfe`: network
    evaluations in total (image rows through a network: the sampler's predictions plus the
    estimator's); `step_maps [N, S, C, H, W]` at the sampler steps `step_indices` when the estimator
    keeps them.
    """

    images: torch.Tensor
    maps: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    nfe: int = 0
    step_maps: Optional[torch.Tensor] = None
    step_indices: Optional[list[int]] = None

    @property
    def nfe_per_image(self) -> float:
        return self.nfe / len(self.images)


class CountingEps:
    """`eps_model` that counts the image rows it evaluates."""

    def __init__(self, eps_model: EpsModel):
        self.eps_model, self.count = eps_model, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.count += x.shape[0]
        return self.eps_model(x, t)


def _cat(parts: list) -> Optional[torch.Tensor]:
    return None if not parts or parts[0] is None else torch.cat(parts)


def generate(eps_model: EpsModel, sampler: Sampler, shape: Sequence[int], seeds: Sequence[int],
             estimator: Optional[Any] = None, device: torch.device | str = "cpu", batch_size: int = 256,
             progress: bool = False) -> SampleResult:
    """One image per seed (`uncdiff.core.samplers.sample`, in batches of `batch_size`) with `estimator`
    (e.g. from `make_estimator`) as the sampler hook, collecting its maps and scores.

    The sampler's own predictions are counted by a wrapper; the estimator counts what it spends
    itself (`estimator.nfe`, it sees the unwrapped `eps_model`), so nothing is counted twice.
    For BayesDiff pass `estimator.eps_model` (its `FeatureCachingEps`) as `eps_model`, so the
    Laplace variance reuses the features of the sampler's pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    counted = CountingEps(eps_model)
    hook = None
    if estimator is not None:
        estimator.reset()

        def hook(ctx: StepContext) -> torch.Tensor:
            return estimator(dataclasses.replace(ctx, eps_model=eps_model))

    images, maps, scores, step_maps = [], [], [], []
    for i in range(0, len(seeds), batch_size):
        images.append(sample(counted, sampler, shape, seeds[i:i + batch_size], hook, device, progress).cpu())
        if estimator is not None:
            maps.append(None if estimator.maps is None else estimator.maps.cpu())
            scores.append(None if estimator.scores is None else estimator.scores.cpu())
            step_maps.append(None if estimator.step_maps is None else estimator.step_maps.cpu())
    return SampleResult(
        images=torch.cat(images), maps=_cat(maps), scores=_cat(scores),
        nfe=counted.count + (estimator.nfe if estimator is not None else 0),
        step_maps=_cat(step_maps),
        step_indices=list(estimator.step_indices) if step_maps and step_maps[0] is not None else None)


def make_estimator(kind: str = "none", **options):
    """An estimator hook by name: `'none'` (None), `'aleatoric'` (`AleatoricUncertainty`),
    `'guided'` (`UncertaintyGuidance`), `'mc_dropout'` (`MCDropoutUncertainty`, needs `model`),
    `'bayesdiff'` (`BayesDiffUncertainty`, needs `net` and `laplace`); `options` go to its
    constructor, and an option it doesn't take is an error naming it."""
    if kind not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {kind!r}")
    cls = ESTIMATORS[kind]
    if cls is None:
        if options:
            raise ValueError(f"estimator 'none' takes no options, got {sorted(options)}")
        return None
    params = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for estimator {kind!r}; it takes {list(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise ValueError(f"estimator {kind!r} needs the option(s) {missing}")
    return cls(**options)
