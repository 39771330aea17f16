"""Sampling with an uncertainty estimator attached: images, maps, scores and the cost in network
evaluations, over a plain `eps_model(x, t)` callable (no Lightning)."""

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from uncdiff.core.samplers import EpsModel, Progress, SampleNoise, Sampler, StepContext, sample
from uncdiff.uncertainty.bayesdiff import BayesDiffUncertainty
from uncdiff.uncertainty.estimators import AleatoricUncertainty, MCDropoutUncertainty, window_steps
from uncdiff.uncertainty.generative import Features, GenerativeUncertainty
from uncdiff.uncertainty.guidance import UncertaintyGuidance
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec, check_run
from uncdiff.uncertainty.trajectory import X0TrajectoryUncertainty


@dataclass
class SampleResult:
    """What `generate` returns; tensors on the CPU, one row per seed.

    `maps [N, C, H, W]`: the estimator's per-pixel uncertainty (summed over its window's steps;
    `Var[x_0]` for BayesDiff; the variance of x0_hat over the window's steps for the x0 trajectory, of
    the M chains' final samples for the generative estimator); `scores [N]`: the per-sample score used
    for filtering; `nfe`: network evaluations in total (image rows through a network: the sampler's
    predictions plus the estimator's); `step_maps [N, S, C, H, W]` at the sampler steps `step_indices` when the estimator
    keeps them. `step_totals [N, S]` (float64): per image, the sum over c, h, w of `U_t` at each step
    `total_steps` where the estimator computed a map (every score variant and window is a function
    of them, docs/algorithms.md §3); `noise_norms [N]` (float64): `|x_T|^2` of each sample's
    starting noise (docs/algorithms.md §6b).
    """

    images: torch.Tensor
    maps: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    nfe: int = 0
    step_maps: Optional[torch.Tensor] = None
    step_indices: Optional[list[int]] = None
    step_totals: Optional[torch.Tensor] = None
    total_steps: Optional[list[int]] = None
    noise_norms: Optional[torch.Tensor] = None

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
             progress: Optional[Progress] = None) -> SampleResult:
    """One image per seed (`uncdiff.core.samplers.sample`, in batches of `batch_size`) with `estimator`
    (e.g. from `build_hook`) as the sampler hook, collecting its maps and scores. A
    `GenerativeUncertainty` is no step hook: each batch is sampled plainly, then its M posterior chains
    run from the same seeds.

    The sampler's own predictions are counted by a wrapper; the estimator counts what it spends
    itself (`estimator.nfe`, it sees the unwrapped `eps_model`), so nothing is counted twice.
    For BayesDiff pass `estimator.eps_model` (its `FeatureCachingEps`) as `eps_model`, so the
    Laplace variance reuses the features of the sampler's pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    counted = CountingEps(eps_model)
    chains = isinstance(estimator, GenerativeUncertainty)
    hook = None
    if estimator is not None:
        estimator.reset()
    if estimator is not None and not chains:
        def hook(ctx: StepContext) -> torch.Tensor:
            return estimator(dataclasses.replace(ctx, eps_model=eps_model))

    images, maps, scores, step_maps, totals, norms = [], [], [], [], [], []
    for i in range(0, len(seeds), batch_size):
        batch = seeds[i:i + batch_size]
        images.append(sample(counted, sampler, shape, batch, hook, device, progress).cpu())
        norms.append(noise_norms(batch, shape))
        if chains:
            batch_maps, batch_scores = estimator(sampler, shape, batch, device)
            maps.append(batch_maps.cpu())
            scores.append(batch_scores.cpu())
        elif estimator is not None:
            maps.append(None if estimator.maps is None else estimator.maps.cpu())
            scores.append(None if estimator.scores is None else estimator.scores.cpu())
            step_maps.append(None if estimator.step_maps is None else estimator.step_maps.cpu())
            totals.append(getattr(estimator, "step_totals", None))
    totals = [None if t is None else t.cpu() for t in totals]
    return SampleResult(
        images=torch.cat(images), maps=_cat(maps), scores=_cat(scores),
        nfe=counted.count + (estimator.nfe if estimator is not None else 0),
        step_maps=_cat(step_maps),
        step_indices=list(estimator.step_indices) if step_maps and step_maps[0] is not None else None,
        step_totals=_cat(totals), total_steps=list(estimator.step_indices) if totals and totals[0] is not None
        else None, noise_norms=torch.cat(norms))


def noise_norms(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """`|x_T|^2 [N]` (float64) of the starting noise of each seed (its `initial` stream, as
    `uncdiff.core.samplers.sample` draws it), recomputed on the CPU."""
    return SampleNoise(seeds).initial(shape).double().flatten(1).pow(2).sum(1)


def build_hook(estimator: Optional[EstimatorSpec] = None, guidance: Optional[GuidanceSpec] = None, *,
               net: Optional[torch.nn.Module] = None, laplace: Any = None, steps: Optional[int] = None,
               image_shape: Optional[Sequence[int]] = None, device: torch.device | str | None = None,
               features: Optional[Features] = None):
    """The sampler hook of a run's specs (None for no estimator and no guidance): the one place where
    they become an estimator.

    - `guidance` with a rule (docs/algorithms.md §4): `UncertaintyGuidance`, estimating with the
      aleatoric estimator of `estimator`'s `M`, `variant`, `window` (the estimation window),
      `chunk_size` and `keep_maps`; its threshold `table` is checked against `steps` and `image_shape`
      where given, and moved to `device`.
    - `aleatoric` (§3), `mc_dropout` (§5a: dropout passes of `net`), `bayesdiff` (§5b: `net` with the
      fitted last-layer Laplace posterior `laplace`, moved to `device`; sample with the hook's
      `eps_model`). A score `reference` is checked to cover `steps` where given.
    - `x0_trajectory` (§6c): `X0TrajectoryUncertainty` over the estimation window, checked to hold two
      of `steps` where given.
    - `generative` (§6c): `GenerativeUncertainty` of `net` and `laplace` with `M` chains, scored in
      `features` (the extractor of `estimator.features`, on the samples' device; none for `pixels`); not a
      step hook, `generate` runs it after the plain chain.
    A setting that doesn't fit is a ValueError naming the option, before anything is sampled.
    """
    estimator = EstimatorSpec() if estimator is None else estimator
    guidance = GuidanceSpec() if guidance is None else guidance
    check_run(SamplerSpec(), estimator, guidance)
    e = estimator
    if guidance.enabled:
        table = guidance.table
        if table is not None:
            need = (table.shape[0] if steps is None else steps, *(table.shape[1:] if image_shape is None
                                                                  else image_shape))
            if tuple(table.shape) != tuple(need):
                raise ValueError(f"guidance.table has shape {tuple(table.shape)}; this run needs {tuple(need)} "
                                 f"(steps, C, H, W): calibrate it with this model and step count")
            table = table if device is None else table.to(device)
        aleatoric = AleatoricUncertainty(e.M, e.variant, e.chunk_size, e.estimation_window, e.keep_maps)
        return UncertaintyGuidance(aleatoric, guidance.rule, guidance.sign, guidance.lam, guidance.quantile, table,
                                   guidance.window, guidance.grad_wrt, guidance.reduce, guidance.prior_precision)
    if e.needs_reference:
        raise ValueError(f"estimator.score {e.score} divides by the per-step reference statistics of unguided samples: "
                         f"give the score reference file `train.py calibrate` writes (<table>.reference.pt)")
    if e.reference is not None and steps is not None and len(e.reference["mean"]) != steps:
        raise ValueError(f"estimator.reference covers {len(e.reference['mean'])} sampler steps; this run has {steps}: "
                         f"calibrate it with this run's sampler and step count")
    window = e.estimation_window
    if e.name == "none":
        return None
    if e.name == "aleatoric":
        return AleatoricUncertainty(e.M, e.variant, e.chunk_size, window, e.keep_maps, e.score, e.reference)
    if e.name == "x0_trajectory":
        if steps is not None and len(window_steps(window, steps)) < 2:
            raise ValueError(f"estimator.window {list(window)} holds {len(window_steps(window, steps))} of the "
                             f"{steps} sampler steps; the x0 trajectory's variance needs at least 2: widen it or "
                             f"sample more steps")
        return X0TrajectoryUncertainty(window)
    if net is None:
        raise ValueError(f"estimator.name {e.name} needs the network (net)")
    if e.name == "mc_dropout":
        try:
            return MCDropoutUncertainty(net, e.M, e.dropout, window, e.keep_maps, e.chunk_size)
        except ValueError as error:
            raise ValueError(f"estimator.dropout: {error}") from None
    if laplace is None:
        raise ValueError(f"estimator.name {e.name} needs a fitted Laplace posterior: call fit_laplace() or load a "
                         f"checkpoint that holds one")
    if e.name == "generative":
        if features is None and e.features != "pixels":
            raise ValueError(f"estimator.features {e.features} needs its feature extractor (features)")
        return GenerativeUncertainty(net, laplace if device is None else laplace.to(device), e.M, features=features)
    return BayesDiffUncertainty(net, laplace if device is None else laplace.to(device), e.draws, e.skip, e.moments,
                                e.keep_maps, e.chunk_size)
