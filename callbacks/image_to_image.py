"""Validation panels of an image-to-image model (docs/algorithms.md §7): for fixed held-out examples, the
condition, the output, the ground truth, the pixel uncertainty and the real error side by side, and
the metrics of the outputs as trajectories on W&B."""

from pathlib import Path

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure

from uncdiff.callbacks.sampling import check_against_model, check_every_n_epochs, check_positive, due, log_figure
from uncdiff.evaluation.image_to_image import error_calibration, generated, l1_psnr
from uncdiff.io.images import from_uint8
from uncdiff.uncertainty.intervals import spread_from_map
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

COLUMNS = ("condition", "output", "ground truth", "uncertainty", "squared error")
WIDTH_COLUMN = "interval width at lam = 1"


class ImageToImagePanels(L.Callback):
    """At the end of validation (every `every_n_epochs` epochs, `uncdiff.callbacks.sampling.due`),
    restore the first `num_examples` validation images of the run's `ImageToImageDataModule` with
    the EMA network (seeds `seed ..`, `sampler`, the aleatoric `estimator`) and write
    `<default_root_dir>/image_to_image/step_<global step>.png`: one row per example, the columns
    `COLUMNS` (uncertainty and error summed over channels, each row on its own colour scale; the
    known pixels of inpainting and uncropping are zero in both). Logged to W&B as
    `val/image_to_image/panels`, with `val/image_to_image/{l1, psnr, ause, aurg}` over the generated pixels
    (`uncdiff.evaluation.image_to_image`). Runs on rank 0.

    With `interval_width`, a last column shows the width of the aleatoric heuristic's intervals
    (docs/algorithms.md §8) at lam = 1, `2 sqrt(map)`, logged as `val/image_to_image/width` (its mean
    over the generated pixels, on the [0, 1] scale). It is the heuristic's spread, not a calibrated
    width: lam_hat belongs to a finished checkpoint (`calibrate_intervals`), and the calibrated width
    is lam_hat times this one.
    """

    def __init__(self, num_examples: int = 8, every_n_epochs: int = 1, seed: int = 0,
                 sampler: SamplerSpec = SamplerSpec(name="ddim", steps=20),
                 estimator: EstimatorSpec = EstimatorSpec(name="aleatoric"), cmap: str = "magma",
                 interval_width: bool = False):
        self.num_examples = check_positive("num_examples", num_examples)
        self.every_n_epochs = check_every_n_epochs(every_n_epochs)
        if estimator.name != "aleatoric" or estimator.score != "sum":
            raise ValueError(f"estimator.name must be aleatoric with score sum (the panels show its maps over the "
                             f"generated pixels), got {estimator.name} with score {estimator.score}")
        self.seed, self.sampler, self.estimator, self.cmap = int(seed), sampler, estimator, cmap
        self.columns = COLUMNS + ((WIDTH_COLUMN,) if interval_width else ())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(trainer.datamodule, "pairs") or not hasattr(pl_module, "check_inputs"):
            raise ValueError("ImageToImagePanels needs an image-to-image run: model ImageToImageModule and "
                             "data ImageToImageDataModule")
        check_against_model(pl_module, self.sampler, self.estimator, GuidanceSpec())

    def examples(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dm = trainer.datamodule
        n = min(self.num_examples, len(dm.val_set))
        items = [dm.val_set[i] for i in range(n)]
        pixels = torch.stack([item[0] for item in items])
        y, mask = dm.pairs(pixels, torch.tensor([item[-1] for item in items]), 0)  # validation's pairs
        return from_uint8(pixels), y, mask

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not due(trainer, self.every_n_epochs) or not trainer.is_global_zero:
            return
        x0, y, mask = self.examples(trainer)
        masked = pl_module.task.masked
        result = pl_module.sample(y, mask if masked else None, seed=self.seed, sampler=self.sampler,
                                  estimator=self.estimator)
        out, maps = result.images.float(), result.maps.float()
        region = mask if masked else None
        l1, psnr = l1_psnr(out, x0, region)
        ause, aurg = error_calibration(maps, out, x0, region)
        for name, value in (("l1", l1), ("psnr", psnr), ("ause", ause), ("aurg", aurg)):
            pl_module.log(f"val/image_to_image/{name}", value, rank_zero_only=True)
        error = (out - x0).pow(2) * (mask if masked else 1)
        heats = [maps.sum(1), error.sum(1)]
        if WIDTH_COLUMN in self.columns:
            width = 2 * spread_from_map(maps)  # lam (l + u) at lam = 1; zero at the known pixels
            pl_module.log("val/image_to_image/width", float(generated(width / 2, region).mean()), rank_zero_only=True)
            heats.append(width.sum(1).float())
        path = Path(trainer.default_root_dir) / "image_to_image" / f"step_{trainer.global_step:08d}.png"
        self.draw(path, y, out, x0, heats)
        log_figure(trainer, "val/image_to_image/panels", path,
                   f"step {trainer.global_step}: " + " | ".join(self.columns))

    def draw(self, path: Path, y, out, x0, heats: list) -> None:
        """One row per example: condition, output and ground truth, then the `heats` maps `[N, H, W]`."""
        n, columns = len(out), self.columns
        fig = Figure(figsize=(2 * len(columns), 2 * n + 0.4))
        axes = np.asarray(fig.subplots(n, len(columns), squeeze=False))
        image = lambda v: ((v.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1).numpy()
        for i in range(n):
            cells = (image(y[i]), image(out[i]), image(x0[i]), *(heat[i].numpy() for heat in heats))
            for j, (ax, cell) in enumerate(zip(axes[i], cells)):
                ax.imshow(cell, cmap=self.cmap if j >= 3 else ("gray" if cell.ndim == 2 else None),
                          vmin=0 if j < 3 else None, vmax=1 if j < 3 else None)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(columns[j], fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
