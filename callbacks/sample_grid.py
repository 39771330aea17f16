"""Logs a grid of EMA samples each validation epoch (to W&B and as PNG under the run dir)."""

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import make_grid, save_image

from uncdiff.uncertainty.spec import SamplerSpec


class SampleGrid(L.Callback):
    """`num_samples` EMA samples from fixed seeds `seed..seed+num_samples-1`, so grids of
    successive epochs show the same starting noise, with `sampler` (its unset options the model's).
    Runs on rank 0 only."""

    def __init__(self, num_samples: int = 64, seed: int = 0, sampler: SamplerSpec = SamplerSpec(name="ddim", steps=50)):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.seed, self.sampler = num_samples, seed, sampler

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        images = pl_module.sample(self.num_samples, seed=self.seed, sampler=self.sampler).images
        grid = make_grid((images.float().cpu() + 1) / 2, nrow=int(self.num_samples**0.5 + 0.5), padding=1)
        path = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/ema_samples", [str(path)], step=trainer.global_step,
                                 caption=[f"step {trainer.global_step}"])
