"""Sampling with an uncertainty estimator attached: images, maps, scores and the cost in network
evaluations, over a plain `eps_model(x, t)` callable (no Lightning)."""

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from uncdiff.core.samplers import EpsModel, Progress, SampleNoise, Sampler, StepContext, sample
from uncdiff.uncertainty.bayesdiff import BayesDiffUncertainty
from uncdiff.uncertainty.estimators import AleatoricUncertainty, MCDropoutUncertainty
from uncdiff.uncertainty.guidance import UncertaintyGuidance, table_from_file
from uncdiff.uncertainty.score_reference import load_score_reference

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

    images, maps, scores, step_maps, totals, norms = [], [], [], [], [], []
    for i in range(0, len(seeds), batch_size):
        images.append(sample(counted, sampler, shape, seeds[i:i + batch_size], hook, device, progress).cpu())
        norms.append(noise_norms(seeds[i:i + batch_size], shape))
        if estimator is not None:
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


def make_estimator(kind: str = "none", **options):
    """An estimator hook by name: `'none'` (None), `'aleatoric'` (`AleatoricUncertainty`),
    `'guided'` (`UncertaintyGuidance`), `'mc_dropout'` (`MCDropoutUncertainty`, needs `model`),
    `'bayesdiff'` (`BayesDiffUncertainty`, needs `net` and `laplace`); `options` go to its
    constructor, and an option it doesn't take is an error naming it. A `reference` given as a path
    (the score reference file of `train.py calibrate`) is loaded and checked."""
    if kind not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {kind!r}")
    cls = ESTIMATORS[kind]
    if cls is None:
        if options:
            raise ValueError(f"estimator 'none' takes no options, got {sorted(options)}")
        return None
    if isinstance(options.get("reference"), (str, Path)):  # a score reference file from calibrate
        options = {**options, "reference": load_score_reference(options["reference"])[0]}
    params = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for estimator {kind!r}; it takes {list(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise ValueError(f"estimator {kind!r} needs the option(s) {missing}")
    return cls(**options)


def guided_options(estimator_options: dict, guidance: dict) -> dict:
    """The `UncertaintyGuidance` options of a guided run: `guidance` plus the estimator's options,
    whose `window` (a plain estimator's estimation window) is guidance's `estimate_window` (its
    `window` is the guidance window). An option set in both is an error naming it."""
    options, names = dict(estimator_options), {k: k for k in estimator_options}
    if "window" in options:
        if "estimate_window" in options:
            raise ValueError("estimator_options sets both window and estimate_window, with guidance the same "
                             "(estimation) window: give one")
        options["estimate_window"], names["estimate_window"] = options.pop("window"), "window"
    both = sorted(set(options) & set(guidance))
    if both:
        raise ValueError("set in both estimator_options and guidance: "
                         + ", ".join(f"estimator_options.{names[k]} and guidance.{k}" for k in both)
                         + "; give each once")
    return {**options, **guidance}


def build_hook(estimator: str = "none", options: Optional[dict] = None, guidance: Optional[dict] = None, *,
               net: Optional[torch.nn.Module] = None, laplace: Any = None, steps: Optional[int] = None,
               image_shape: Optional[Sequence[int]] = None, device: torch.device | str | None = None):
    """The sampler hook of a run's settings: the one place where they become an estimator.

    - `guidance` (`UncertaintyGuidance` options, docs/algorithms.md §4): guided sampling, estimating
      with the aleatoric estimator, whose `options` join guidance's (`guided_options`). With
      `threshold='table'`, `table` may be the path of a `save_table` file: loaded, checked against
      `steps` and `image_shape` where given, and moved to `device`.
    - `'mc_dropout'`: dropout passes of `net`; `'bayesdiff'`: `net` with the fitted last-layer
      Laplace posterior `laplace` (moved to `device`); pass the hook's `eps_model` to `generate`.
    - any other `estimator`: `make_estimator(estimator, **options)` (None for `'none'`).
    A bad setting is a ValueError naming it, before anything is sampled.
    """
    options = dict(options or {})
    if guidance is not None:
        if estimator not in ("none", "aleatoric"):
            raise ValueError(f"guidance uses the aleatoric estimator; got estimator={estimator!r}")
        guidance = guided_options(options, guidance)
        if isinstance(guidance.get("table"), (str, Path)):  # a file from calibrate_threshold_table
            try:
                table = table_from_file(guidance["table"], steps, image_shape)
            except ValueError as error:
                raise ValueError(f"guidance.table: {error}") from None
            guidance["table"] = table if device is None else table.to(device)
        try:
            return make_estimator("guided", **guidance)
        except ValueError as error:
            raise ValueError(f"guidance: {error}") from None
    if isinstance(options.get("reference"), (str, Path)):  # checked against the run's step count
        try:
            options["reference"] = load_score_reference(options["reference"], steps)[0]
        except ValueError as error:
            raise ValueError(f"reference: {error}") from None
    if estimator == "mc_dropout":
        return make_estimator("mc_dropout", model=net, **options)
    if estimator == "bayesdiff":
        if laplace is None:
            raise ValueError("estimator='bayesdiff' needs a fitted Laplace posterior: call fit_laplace() "
                             "or load a checkpoint that holds one")
        return make_estimator("bayesdiff", net=net, laplace=laplace if device is None else laplace.to(device),
                              **options)
    return make_estimator(estimator, **options)
