"""Figures of EMA samples and their pixel-wise uncertainty (docs/algorithms.md §3-4) during training: unguided
and guided grids from the same seeds, heatmaps with a colour scale, the score histogram, and the
highest- and lowest-score samples; as PNG under the run directory and on W&B."""

import math
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import matplotlib
import numpy as np
import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from uncdiff.callbacks.sampling import (Clock, check_against_model, check_every_n_epochs, check_fraction,
                                        check_positive, due, gather_rows, log_figure, sample_in_batches, shard,
                                        with_files)
from uncdiff.core.filtering import keep_best
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

SETS = ("unguided", "guided")
FIGURES = ("grids", "heatmaps_unguided", "heatmaps_guided", "score_histogram", "extremes")
MAP_LABEL = "pixel uncertainty U\n(summed over window steps, channels)"


class UncertaintySampling(L.Callback):
    """At the end of validation (every `every_n_epochs` epochs, see `uncdiff.callbacks.sampling.due`),
    sample `num_samples` images with the EMA network from seeds `seed .. seed + num_samples - 1` with
    `sampler`, unguided and guided (`guidance`, docs/algorithms.md §4, its thresholds from the file
    `guidance_table` when given), both with the aleatoric `estimator` (M, variant, window, chunk_size:
    the guided run records its map over the same window), and write to
    `<default_root_dir>/uncertainty/step_<global step>/`:

    - `grids.png`: the unguided and the guided grid side by side (same seeds, same positions);
    - `heatmaps_unguided.png`, `heatmaps_guided.png`: each sample next to its uncertainty map
      (summed over channels), one colour scale for both figures (`cmap`), with its colour bar;
    - `score_histogram.png`: the per-sample scores of both sets, and where filtering with
      `fraction_dropped` would cut the unguided set;
    - `extremes.png`: the `num_extremes` lowest- and highest-score samples of each set, with maps.

    Each PNG is logged to W&B as `val/uncertainty/<name>`; the mean scores as
    `val/uncertainty/mean_score/{unguided,guided}`, and the time taken (sampling and figures) as
    `val/uncertainty/seconds`. Under DDP every rank samples its share of the
    seeds, and rank 0 draws the gathered results (the same figures whatever the process count).
    """

    def __init__(self, num_samples: int = 16, every_n_epochs: int = 1, seed: int = 0,
                 sampler: SamplerSpec = SamplerSpec(name="ddim", steps=20),
                 estimator: EstimatorSpec = EstimatorSpec(name="aleatoric"),
                 guidance: GuidanceSpec = GuidanceSpec(rule="gradient"), guidance_table: Optional[str] = None,
                 num_extremes: int = 4, fraction_dropped: float = 1 / 6, cmap: str = "magma", batch_size: int = 256,
                 progress: bool = True):
        self.num_samples = check_positive("num_samples", num_samples)
        self.every_n_epochs = check_every_n_epochs(every_n_epochs)
        self.seed, self.sampler = int(seed), sampler
        if estimator.name != "aleatoric" or estimator.score != "sum":
            raise ValueError(f"estimator.name must be aleatoric with score sum (the figures show its maps), got "
                             f"{estimator.name} with score {estimator.score}")
        if not guidance.enabled:
            raise ValueError("guidance.rule must be gradient or posterior: the figures compare guided with unguided")
        # the guided run's map is the same quantity over the same steps as the unguided one's
        self.estimator, self.guidance = with_files(sampler, estimator, guidance, guidance_table=guidance_table)
        self.num_extremes = check_positive("num_extremes", num_extremes)
        self.fraction_dropped = check_fraction("fraction_dropped", fraction_dropped)
        if cmap not in matplotlib.colormaps:
            raise ValueError(f"cmap must be a matplotlib colormap name, got {cmap!r}")
        self.cmap = cmap
        self.batch_size = check_positive("batch_size", batch_size)
        self.progress = progress

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_against_model(pl_module, self.sampler, self.estimator, self.guidance)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not due(trainer, self.every_n_epochs):
            return
        clock = Clock(pl_module.device)
        results = self.generate(trainer, pl_module)
        for name in SETS:
            pl_module.log(f"val/uncertainty/mean_score/{name}", results[name]["scores"].mean().item(),
                          sync_dist=False)  # the same gathered scores on every rank
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir) / "uncertainty" / f"step_{trainer.global_step:08d}"
            caption = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
            for name, path in self.write_figures(results, out, caption).items():
                log_figure(trainer, f"val/uncertainty/{name}", path, caption)
        # sampling and, on rank 0 (whose value the loggers write), the figures
        pl_module.log("val/uncertainty/seconds", clock.total(), sync_dist=False)

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
        """`{set: {images, maps, scores}}`, all `num_samples` rows in seed order, on every rank."""
        n = self.num_samples
        local = shard(n, trainer.global_rank, trainer.world_size)
        seeds = [self.seed + i for i in local]
        bar = tqdm(total=2 * len(seeds), desc="uncertainty figures: sampling", unit="img", leave=False,
                   disable=not (self.progress and trainer.is_global_zero))
        runs = {"unguided": None, "guided": self.guidance}
        results = {}
        for name, guidance in runs.items():
            parts = [r for _, r in sample_in_batches(pl_module, seeds, self.batch_size, bar, sampler=self.sampler,
                                                     estimator=self.estimator, guidance=guidance)]
            shape = pl_module.image_shape
            local_rows = {"images": torch.cat([r.images for r in parts]) if parts else torch.zeros(0, *shape),
                          "maps": torch.cat([r.maps for r in parts]) if parts else torch.zeros(0, *shape),
                          "scores": torch.cat([r.scores for r in parts]) if parts else torch.zeros(0)}
            results[name] = {k: gather_rows(trainer, v.float(), n, pl_module.device) for k, v in local_rows.items()}
        bar.close()
        return results

    def write_figures(self, results: dict, out: Path, caption: str) -> dict[str, Path]:
        """Draw the five figures of `results` (as from `generate`) into `out/<name>.png`."""
        out.mkdir(parents=True, exist_ok=True)
        seeds = list(range(self.seed, self.seed + self.num_samples))
        pixel_maps = {name: results[name]["maps"].sum(1) for name in SETS}  # [N, H, W]
        # one scale for both sets; the top 0.5% of pixels saturate, so one hot pixel can't wash out the rest
        vmax = torch.quantile(torch.cat([m.flatten() for m in pixel_maps.values()]).float(), 0.995).item()
        norm = Normalize(0.0, vmax if vmax > 0 else 1.0)
        figures = {
            "grids": grids_figure({name: results[name]["images"] for name in SETS}, caption),
            "score_histogram": histogram_figure({name: results[name]["scores"] for name in SETS},
                                                self.fraction_dropped, caption),
            "extremes": extremes_figure(results, pixel_maps, seeds, self.num_extremes, norm, self.cmap, caption),
        }
        for name in SETS:
            figures[f"heatmaps_{name}"] = heatmaps_figure(results[name]["images"], pixel_maps[name],
                                                          [f"seed {s}" for s in seeds], norm, self.cmap,
                                                          f"{name} samples and their uncertainty, {caption}")
        paths = {}
        for name in FIGURES:
            paths[name] = out / f"{name}.png"
            figures[name].savefig(paths[name], dpi=100, bbox_inches="tight")
        return paths


# ------------------------------------------------------------------------------------ figures

def to_display(images: torch.Tensor) -> np.ndarray:
    """`[N, C, H, W]` in [-1, 1] -> `[N, H, W]` (grey) or `[N, H, W, 3]` in [0, 1] for imshow."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    return x[:, 0].numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).numpy()


def show_image(ax, image: np.ndarray, title: Optional[str] = None) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=7)


def grids_figure(images: dict[str, torch.Tensor], caption: str) -> Figure:
    """The sets' grids side by side; sample i at the same position in each."""
    n = len(next(iter(images.values())))
    nrow = math.ceil(math.sqrt(n))
    fig = Figure(figsize=(4.2 * len(images), 4.6), layout="constrained")
    for ax, (name, x) in zip(fig.subplots(1, len(images), squeeze=False)[0], images.items()):
        grid = make_grid((x.float() + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
        show_image(ax, grid.clamp(0, 1).permute(1, 2, 0).numpy(), name)
    fig.suptitle(f"same seeds, unguided vs guided; {caption}", fontsize=9)
    return fig


def draw_pairs(axes_row_pairs, images: np.ndarray, maps: torch.Tensor, titles: Sequence[str], norm, cmap: str):
    """Image i next to its map i in the axes pairs given; returns the last map's image (for a colour bar)."""
    mappable = None
    for (ax_image, ax_map), image, u, title in zip(axes_row_pairs, images, maps, titles):
        show_image(ax_image, image, title)
        mappable = ax_map.imshow(u.numpy(), cmap=cmap, norm=norm, interpolation="nearest")
        ax_map.set_axis_off()
    return mappable


def heatmaps_figure(images: torch.Tensor, maps: torch.Tensor, titles: Sequence[str], norm, cmap: str,
                    caption: str) -> Figure:
    """Each sample (`images [N, C, H, W]`) next to its map (`maps [N, H, W]`), with a colour bar."""
    n = len(images)
    per_row = math.ceil(math.sqrt(n))
    rows = math.ceil(n / per_row)
    fig = Figure(figsize=(2.0 * per_row + 1.2, 1.15 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    pairs = [(axes[i // per_row, 2 * (i % per_row)], axes[i // per_row, 2 * (i % per_row) + 1]) for i in range(n)]
    mappable = draw_pairs(pairs, to_display(images), maps, titles, norm, cmap)
    fig.colorbar(mappable, ax=axes, label=MAP_LABEL, extend="max", shrink=0.9)
    fig.suptitle(caption, fontsize=9)
    return fig


def histogram_figure(scores: dict[str, torch.Tensor], fraction_dropped: float, caption: str) -> Figure:
    """Overlaid histograms of the sets' per-sample scores on shared bins, with the filtering cut."""
    values = {name: s.double().numpy() for name, s in scores.items()}
    everything = np.concatenate(list(values.values()))
    bins = np.histogram_bin_edges(everything, bins=int(np.clip(len(everything) // 4, 5, 40)))
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, v in values.items():
        ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (mean {v.mean():.4g})")
    unguided = scores["unguided"]
    keep = keep_best(unguided, fraction_dropped)
    if (~keep).any():
        cut = unguided[keep].max().item()
        ax.axvline(cut, color="k", linestyle="--", linewidth=1,
                   label=f"filtering drops the unguided above ({fraction_dropped:.3g} of them)")
    ax.set_xlabel("per-sample score S (sum of U over window steps and pixels)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    ax.set_title(caption, fontsize=9)
    return fig


def extremes_figure(results: dict, pixel_maps: dict[str, torch.Tensor], seeds: Sequence[int], k: int, norm,
                    cmap: str, caption: str) -> Figure:
    """Per set, a row of the `k` lowest- and a row of the `k` highest-score samples, each next to its map."""
    n = len(seeds)
    k = min(k, n)
    rows = []
    for name in SETS:
        order = torch.argsort(results[name]["scores"], stable=True)
        rows += [(f"{name}, lowest", name, order[:k]), (f"{name}, highest", name, order[-k:].flip(0))]
    fig = Figure(figsize=(2.0 * k + 1.6, 1.35 * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), 2 * k, squeeze=False)
    mappable = None
    for r, (label, name, index) in enumerate(rows):
        scores = results[name]["scores"][index]
        titles = [f"S={s:.3g}, seed {seeds[i]}" for s, i in zip(scores.tolist(), index.tolist())]
        pairs = [(axes[r, 2 * j], axes[r, 2 * j + 1]) for j in range(k)]
        mappable = draw_pairs(pairs, to_display(results[name]["images"][index]), pixel_maps[name][index], titles,
                              norm, cmap)
        axes[r, 0].text(-0.15, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=8)
    fig.colorbar(mappable, ax=axes, label=MAP_LABEL, extend="max", shrink=0.9)
    fig.suptitle(f"lowest and highest per-sample scores; {caption}", fontsize=9)
    return fig
