"""The invalid ("hallucination") rate of EMA samples on the shapes testbed during training (docs/algorithms.md
§6c), logged like the FID: `val/invalid/unguided`, `val/invalid/guided`, `val/invalid/filtered`, and the
unguided rate of each rule (`val/invalid/unguided_<rule>`), so W&B draws their trajectories."""

from typing import Optional

import lightning as L
import torch

from uncdiff.callbacks.sampling import (check_against_model, check_every_n_epochs, check_fraction, check_positive, due,
                                        gather_rows, sample_in_batches, shard)
from uncdiff.core.filtering import keep_best
from uncdiff.data.shapes import RULES, check_batch
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec


class InvalidRate(L.Callback):
    """At the end of validation (every `every_n_epochs` epochs, `uncdiff.callbacks.sampling.due`),
    sample `num_samples` images from seeds `seed ..`, unguided (scored by `estimator`) and, when
    `guidance` is on, guided from the same seeds; the shapes checker (`uncdiff.data.shapes`) labels each.
    Logged: the fraction of invalid samples among the unguided, the guided, and the unguided kept after
    dropping the `fraction_dropped` with the highest scores (`filtered`), and the unguided fraction breaking
    each rule. Under DDP each rank samples its share of the seeds; the labels are gathered, so the values
    do not depend on the number of processes."""

    def __init__(self, num_samples: int = 500, every_n_epochs: int = 1, seed: int = 0,
                 sampler: SamplerSpec = SamplerSpec(name="ddim", steps=20),
                 estimator: EstimatorSpec = EstimatorSpec(name="aleatoric"),
                 guidance: GuidanceSpec = GuidanceSpec(rule="none"), fraction_dropped: float = 1 / 6,
                 batch_size: int = 256):
        self.num_samples = check_positive("num_samples", num_samples)
        self.every_n_epochs = check_every_n_epochs(every_n_epochs)
        if estimator.name not in ("aleatoric", "mc_dropout"):
            raise ValueError(f"estimator.name must be aleatoric or mc_dropout (its scores make the filtered set), "
                             f"got {estimator.name!r}")
        self.seed, self.sampler, self.estimator, self.guidance = int(seed), sampler, estimator, guidance
        self.fraction_dropped = check_fraction("fraction_dropped", fraction_dropped)
        self.batch_size = check_positive("batch_size", batch_size)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("fit", "validate"):
            check_against_model(pl_module, self.sampler, self.estimator, self.guidance)
            if tuple(pl_module.image_shape) != (1, 16, 16):
                raise ValueError(f"InvalidRate checks shapes images [1, 16, 16]; the model makes "
                                 f"{list(pl_module.image_shape)}: use it with ShapesDataModule")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if due(trainer, self.every_n_epochs):
            for name, value in self.rates(trainer, pl_module).items():
                pl_module.log(f"val/invalid/{name}", value, sync_dist=False)  # identical on every rank

    def labels(self, trainer: L.Trainer, pl_module: L.LightningModule, **sample_kwargs) -> tuple[torch.Tensor, ...]:
        """`(rule index [n], scores [n])` of all ranks' samples in seed order (rule -1: valid)."""
        local = shard(self.num_samples, trainer.global_rank, trainer.world_size)
        seeds = [self.seed + i for i in local]
        rules, scores = [], []
        for _, result in sample_in_batches(pl_module, seeds, self.batch_size, sampler=self.sampler, **sample_kwargs):
            rules += [-1 if v.valid else RULES.index(v.rule) for v in check_batch(result.images)]
            scores.append(result.scores if result.scores is not None else torch.zeros(len(result.images)))
        device = pl_module.device
        rules = gather_rows(trainer, torch.tensor(rules, dtype=torch.long), self.num_samples, device)
        scores = gather_rows(trainer, torch.cat(scores).float() if scores else torch.zeros(0), self.num_samples, device)
        return rules, scores

    def rates(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        rules, scores = self.labels(trainer, pl_module, estimator=self.estimator)
        invalid = rules >= 0
        keep = keep_best(scores, self.fraction_dropped)
        values = {"unguided": invalid.float().mean().item(), "filtered": invalid[keep].float().mean().item()}
        values.update({f"unguided_{rule}": (rules == k).float().mean().item() for k, rule in enumerate(RULES)})
        if self.guidance.enabled:
            guided, _ = self.labels(trainer, pl_module, guidance=self.guidance)
            values["guided"] = (guided >= 0).float().mean().item()
        return values
