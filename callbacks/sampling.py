"""What the sampling callbacks share: their schedule, the files their specs load, and generation split
over DDP ranks (each rank its share of the seeds, results gathered in seed order). Their sampling options
are `uncdiff.uncertainty.spec` dataclasses, checked when the config is parsed."""

import dataclasses
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Sequence

import lightning as L
import torch

from uncdiff.io.tables import load_score_reference, load_threshold_table
from uncdiff.uncertainty.sampling import SampleResult, build_hook
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

# The callbacks log values that are already identical on every rank (computed from gathered or
# synced data) with sync_dist=False; Lightning's advice to sync them would only add a collective.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/(fid|uncertainty)/")


# ------------------------------------------------------------------------------------ schedule

def check_every_n_epochs(every_n_epochs: int) -> int:
    if isinstance(every_n_epochs, bool) or int(every_n_epochs) != every_n_epochs or every_n_epochs < 1:
        raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
    return int(every_n_epochs)


def due(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Whether a sampling callback runs at this validation's end: in `fit`, when
    `(current_epoch + 1) % every_n_epochs == 0` (ModelCheckpoint's and check_val_every_n_epoch's
    rule, so a checkpoint monitoring a logged value sees it); always in `trainer.validate`;
    never in the sanity check."""
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != "fit":
        return True
    return (trainer.current_epoch + 1) % every_n_epochs == 0


# ------------------------------------------------------------------------------- option checks

def with_files(sampler: SamplerSpec, estimator: EstimatorSpec, guidance: GuidanceSpec,
               score_reference: Optional[str] = None,
               guidance_table: Optional[str] = None) -> tuple[EstimatorSpec, GuidanceSpec]:
    """The estimator and guidance specs with the files a callback names loaded into them: `score_reference`
    (calibrate's `<table>.reference.pt`, for `estimator.score` step_normalized | standardized) and
    `guidance_table` (calibrate's threshold table), both checked against `sampler.steps` now."""
    if score_reference is not None:
        try:
            reference, _ = load_score_reference(score_reference, sampler.steps)
        except ValueError as error:
            raise ValueError(f"score_reference: {error}") from None
        estimator = dataclasses.replace(estimator, reference=reference)
    elif estimator.needs_reference:
        raise ValueError(f"estimator.score {estimator.score} needs score_reference, the file `train.py calibrate` "
                         f"writes beside its table")
    if guidance_table is not None:
        try:
            table, _ = load_threshold_table(guidance_table, sampler.steps)
        except ValueError as error:
            raise ValueError(f"guidance_table: {error}") from None
        guidance = dataclasses.replace(guidance, table=table)
    return estimator, guidance


def check_against_model(pl_module: L.LightningModule, sampler: SamplerSpec, estimator: EstimatorSpec,
                        guidance: Optional[GuidanceSpec] = None) -> None:
    """The specs of one run against the model itself (its schedule, image shape and dropout layers), so a
    run fails when it starts, not at its first validation."""
    sampler_obj, estimator, guidance = pl_module.sampling_run(sampler, estimator, guidance)
    build_hook(estimator, guidance, net=pl_module.ema.ema_model, steps=len(sampler_obj.timesteps),
               image_shape=pl_module.image_shape)


def check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_fraction(name: str, value: float) -> float:
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- seeds over ranks

def shard(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of the indices 0..n-1, `ceil(n / world)` per rank (the last
    ranks may get fewer or none), so that concatenating the ranks' shares gives 0..n-1 in order."""
    per_rank = -(-n // world)
    return range(min(rank * per_rank, n), min((rank + 1) * per_rank, n))


def gather_rows(trainer: L.Trainer, local: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Every rank's `local [n_r, ...]` (its `shard` of n rows), concatenated in rank order:
    `[n, ...]` on the CPU, on every rank. Moved to `device` for the collective (NCCL needs CUDA)."""
    world = trainer.world_size
    if world == 1:
        return local.cpu()
    per_rank = -(-n // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[:len(local)] = local
    gathered = trainer.strategy.all_gather(padded.to(device))  # [world, per_rank, ...]
    return gathered.flatten(0, 1)[:n].cpu()


def sample_in_batches(pl_module: L.LightningModule, seeds: Sequence[int], batch_size: int, progress=None,
                      **sample_kwargs) -> Iterator[tuple[Sequence[int], SampleResult]]:
    """`pl_module.sample(seeds=batch, **sample_kwargs)` for successive batches of `seeds`, yielding
    `(batch seeds, result)` and advancing the tqdm bar `progress` by the batch size.

    Runs outside inference mode (Lightning validates under `torch.inference_mode`, in which
    guidance's gradient cannot be taken); the sampler itself turns gradients off where it can.
    """
    for i in range(0, len(seeds), batch_size):
        batch = list(seeds[i:i + batch_size])
        with torch.inference_mode(False):
            result = pl_module.sample(seeds=batch, batch_size=len(batch), **sample_kwargs)
        if progress is not None:
            progress.update(len(batch))
        yield batch, result


# ------------------------------------------------------------------------------ timing, figures

class Clock:
    """Wall-clock seconds since construction (`total`) and per named phase (`seconds`),
    synchronising CUDA so that queued work is counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.start = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def total(self) -> float:
        return self._now() - self.start

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self.seconds[phase] += self._now() - start

    def time(self, phase: str, items: Iterable) -> Iterator:
        """Iterate `items`, counting the time spent producing each one as `phase`."""
        items = iter(items)
        while True:
            with self.timing(phase):
                item = next(items, None)
            if item is None:
                return
            yield item


def log_figure(trainer: L.Trainer, key: str, path, caption: str) -> None:
    """Log a saved PNG to every W&B logger of the run (rank 0 only, by WandbLogger itself)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [str(path)], step=trainer.global_step, caption=[caption])
