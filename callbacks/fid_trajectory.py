"""FID of unguided, guided and uncertainty-filtered EMA samples during training (docs/algorithms.md §6), logged as
`val/fid/unguided`, `val/fid/guided`, `val/fid/filtered` so W&B draws their trajectories."""

from pathlib import Path
from typing import Optional

import lightning as L
import torch
from tqdm.auto import tqdm

from uncdiff.callbacks.sampling import (Clock, check_against_model, check_every_n_epochs, check_fraction,
                                        check_positive, due, gather_rows, sample_in_batches, shard, with_files)
from uncdiff.evaluation.fid import EXTRACTORS, FIDEvaluator, datamodule_images, make_extractor, stats_path
from uncdiff.core.filtering import keep_best
from uncdiff.io.files import save_atomic
from uncdiff.lightning.data import dataset_key
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

KINDS = ("unguided", "guided", "filtered")


class FIDTrajectory(L.Callback):
    """At the end of validation (every `every_n_epochs` epochs, see `uncdiff.callbacks.sampling.due`),
    generate `num_samples` images with the EMA network from seeds `seed .. seed + num_samples - 1`,
    unguided (scored by `estimator`) and guided (`guidance`, docs/algorithms.md §4) from the same seeds, and log
    the FID against cached real-data statistics of
    - `unguided`: all unguided samples;
    - `guided`: all guided samples;
    - `filtered`: the unguided samples without the `fraction_dropped` with the highest score
      (docs/algorithms.md §3; decided over all ranks' scores).
    Also logged: `val/fid/seconds` (the whole evaluation), `val/fid/sampling_seconds` and
    `val/fid/feature_seconds` (features and the Fréchet distances).

    Under DDP every rank generates a contiguous share of the seeds and adds its images' features
    to torchmetrics' sums, which are summed over ranks; each seed gives the same image whatever the
    number of processes, so the three sets do not depend on it (the scores, like the images, are
    per seed). The values are
    logged on every rank (identical after the sync), so `ModelCheckpoint(monitor='val/fid/...')`
    works under DDP; loggers write from rank 0 only.

    Options (`sampler`, `estimator`, `guidance` are `uncdiff.uncertainty.spec` dataclasses):
    - `sampler` (e.g. `{name: ddim, steps: 20, eta: 0.0}`): the sampler of both sets;
    - `estimator` (name aleatoric | mc_dropout): the scores (BayesDiff needs a Laplace posterior
      fitted after training: `train.py evaluate`/`sample` run it on a checkpoint). The filtered
      set's score variant (docs/algorithms.md §3) is `estimator.score` (`sum` by default;
      `step_normalized` or `standardized` with `score_reference`, the file `train.py calibrate`
      writes beside its table, loaded and checked against `sampler.steps` now);
    - `guidance` (rule, sign, lam, window, quantile, ...), with thresholds from the file `guidance_table`
      when given. The guided run estimates with the aleatoric estimator of `estimator.M` and
      `variant` only on its guidance steps (where it is computed anyway); this never changes the images;
    - `extractor` ('inception' | 'digits-classifier') and `extractor_options` (e.g.
      `{weights_path: /path/to/weights-inception-2015-12-05-6726825d.pth}`); the digits classifier
      loads the weights shipped for the model's image size unless told otherwise (`{retrain: true}`
      trains one into `cache_dir`);
    - real statistics: the data module's `real_split`, cached at
      `<cache_dir>/fid_stats/<dataset>-<extractor name>.pt` with `dataset` by default
      `dataset_key(...)`; computed once (on rank 0), then read;
    - `batch_size`: images per `sample()` call; `progress`: a tqdm bar on rank 0;
    - `save_images`: also write each rank's seeds, images and scores to
      `<default_root_dir>/fid/step_<global step>/rank<r>.pt` (for checks; large for big N).

    The extractor's name (and the digits classifier's weights sha256), the dataset key and the
    sampling options are logged as the run's config key `fid`, so every FID value says what it measured.
    """

    def __init__(self, num_samples: int = 10_000, every_n_epochs: int = 1, seed: int = 0,
                 sampler: SamplerSpec = SamplerSpec(name="ddim", steps=20),
                 estimator: EstimatorSpec = EstimatorSpec(name="aleatoric"), score_reference: Optional[str] = None,
                 guidance: GuidanceSpec = GuidanceSpec(rule="gradient"), guidance_table: Optional[str] = None,
                 fraction_dropped: float = 1 / 6, extractor: str = "inception",
                 extractor_options: Optional[dict] = None, dataset: Optional[str] = None,
                 real_split: str = "train", cache_dir: str = "cache", batch_size: int = 256,
                 progress: bool = True, save_images: bool = False):
        self.num_samples = check_positive("num_samples", num_samples)
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (a covariance needs two samples), got {num_samples}")
        self.every_n_epochs = check_every_n_epochs(every_n_epochs)
        self.seed, self.sampler = int(seed), sampler
        if estimator.name == "bayesdiff":
            raise ValueError("estimator.name bayesdiff can't score samples during training: it needs a Laplace "
                             "posterior fitted after training (and unclipped DDIM). Run `train.py evaluate` or "
                             "`train.py sample --estimator.name bayesdiff` on the checkpoint instead")
        if not estimator.enabled:
            raise ValueError("estimator.name must be aleatoric or mc_dropout: its scores make the filtered set")
        if not guidance.enabled:
            raise ValueError("guidance.rule must be gradient or posterior: it makes the guided set")
        self.estimator, self.guidance = with_files(sampler, estimator, guidance, score_reference, guidance_table)
        self.score_reference, self.guidance_table = score_reference, guidance_table
        # the guided run records its map only where guidance computes it anyway: no extra cost
        self.guided_estimator = EstimatorSpec("aleatoric", M=estimator.M, variant=estimator.variant,
                                              window=guidance.window, chunk_size=estimator.chunk_size)
        self.fraction_dropped = check_fraction("fraction_dropped", fraction_dropped)
        if extractor not in EXTRACTORS:
            raise ValueError(f"extractor must be one of {sorted(EXTRACTORS)}, got {extractor!r}")
        self.extractor, self.extractor_options = extractor, dict(extractor_options or {})
        weights = self.extractor_options.get("weights_path")
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"extractor_options.weights_path={weights!r} is not a file")
        if real_split not in ("train", "val"):
            raise ValueError(f"real_split must be 'train' or 'val', got {real_split!r}")
        self.dataset, self.real_split, self.cache_dir = dataset, real_split, cache_dir
        self.batch_size = check_positive("batch_size", batch_size)
        self.progress, self.save_images = progress, save_images
        self.evaluators: Optional[dict[str, FIDEvaluator]] = None
        self.config: dict = {}

    # ------------------------------------------------------------------------------ setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Build the extractor and the three evaluators, and load (or compute once and cache) the
        real statistics, on every rank: DDP is initialised here."""
        if stage not in ("fit", "validate") or self.evaluators is not None or trainer.limit_val_batches == 0:
            return  # nothing to evaluate (e.g. validation switched off)
        check_against_model(pl_module, self.sampler, self.estimator)
        check_against_model(pl_module, self.sampler, self.guided_estimator, self.guidance)
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("FIDTrajectory needs the trainer's datamodule (its real images): "
                             "pass one to fit/validate")
        options = dict(self.extractor_options)
        if self.extractor == "digits-classifier":
            options.setdefault("cache_dir", self.cache_dir)
            options.setdefault("image_size", pl_module.image_shape[-1])
        extractor = make_extractor(self.extractor, **options)
        dataset = self.dataset or dataset_key(datamodule, pl_module.image_shape, self.real_split)
        real = datamodule_images(datamodule, self.real_split)
        self.evaluators = {kind: FIDEvaluator(extractor, dataset, real, self.cache_dir) for kind in KINDS}
        for evaluator in self.evaluators.values():
            evaluator.prepare()  # the first computes and caches when needed; the others read the file
        self.config = {"extractor": extractor.name, "extractor_sha256": getattr(extractor, "sha256", None),
                       "extractor_options": options, "dataset": dataset,
                       "real_stats": str(stats_path(self.cache_dir, dataset, extractor.name)),
                       "num_samples": self.num_samples, "seed": self.seed,
                       "sampler": pl_module.resolve_sampler(self.sampler, self.estimator).settings(),
                       "estimator": self.estimator.settings(), "score_reference": self.score_reference,
                       "guidance": {**self.guidance.settings(), "estimator": self.guided_estimator.settings()},
                       "guidance_table": self.guidance_table, "fraction_dropped": self.fraction_dropped}
        for logger in trainer.loggers:
            logger.log_hyperparams({"fid": self.config})

    # ----------------------------------------------------------------------------- evaluation

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not due(trainer, self.every_n_epochs):
            return
        values, seconds = self.evaluate(trainer, pl_module)
        for kind, value in values.items():
            # identical on every rank (torchmetrics summed the states over ranks): no sync needed
            pl_module.log(f"val/fid/{kind}", value, sync_dist=False)
        for name, value in seconds.items():
            pl_module.log(f"val/fid/{name}", value, sync_dist=False)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[dict, dict]:
        """The three FIDs and the time spent: `({kind: fid}, {'seconds', 'sampling_seconds',
        'feature_seconds'})`. A collective: every rank must call it."""
        if self.evaluators is None:
            self.setup(trainer, pl_module, "validate")
        device = pl_module.device
        clock = Clock(device)
        for evaluator in self.evaluators.values():
            evaluator.to(device).reset()
        n, rank, world = self.num_samples, trainer.global_rank, trainer.world_size
        local = shard(n, rank, world)
        seeds = [self.seed + i for i in local]
        bar = tqdm(total=2 * len(seeds), desc=f"FID: {2 * n} samples on {world} process(es), rank 0's share",
                   unit="img", leave=False, disable=not (self.progress and trainer.is_global_zero))
        unguided, scores = [], []
        for _, result in clock.time("sampling", sample_in_batches(
                pl_module, seeds, self.batch_size, bar, sampler=self.sampler, estimator=self.estimator)):
            with clock.timing("features"):
                self.evaluators["unguided"].update(result.images.to(device))
            unguided.append(result.images)
            scores.append(result.scores)
        guided = []
        for _, result in clock.time("sampling", sample_in_batches(
                pl_module, seeds, self.batch_size, bar, sampler=self.sampler, estimator=self.guided_estimator,
                guidance=self.guidance)):
            with clock.timing("features"):
                self.evaluators["guided"].update(result.images.to(device))
            if self.save_images:
                guided.append(result.images)
        bar.close()

        with clock.timing("features"):
            local_scores = torch.cat(scores) if scores else torch.zeros(0)
            keep = keep_best(gather_rows(trainer, local_scores.float(), n, device), self.fraction_dropped)
            local_keep = keep[local.start:local.stop]
            kept = torch.cat(unguided)[local_keep] if unguided else torch.zeros(0)
            for batch in kept.split(self.batch_size):
                self.evaluators["filtered"].update(batch.to(device))
            values = {kind: self.evaluators[kind].compute() for kind in KINDS}
        if self.save_images:
            self._save(trainer, seeds, unguided, guided, local_scores, local_keep)
        seconds = {"seconds": clock.total(), "sampling_seconds": clock.seconds["sampling"],
                   "feature_seconds": clock.seconds["features"]}
        return values, seconds

    def _save(self, trainer, seeds, unguided, guided, scores, keep) -> None:
        path = Path(trainer.default_root_dir) / "fid" / f"step_{trainer.global_step:08d}" / f"rank{trainer.global_rank}.pt"
        empty = lambda parts: torch.cat(parts) if parts else torch.zeros(0)
        save_atomic({"seeds": torch.tensor(seeds, dtype=torch.long), "unguided": empty(unguided),
                     "guided": empty(guided), "scores": scores, "kept": keep}, path)
