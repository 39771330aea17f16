"""What the sampling callbacks share: their schedule, option checks, and generation split over
DDP ranks (each rank its share of the seeds, results gathered in seed order)."""

import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import lightning as L
import torch
from torch import nn

from uncdiff.core.samplers import make_sampler
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.guidance import UncertaintyGuidance
from uncdiff.uncertainty.sampling import SampleResult, build_hook, make_estimator

SCORE_ESTIMATORS = ("aleatoric", "mc_dropout")

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

def check_sampler(sampler: str, steps: int, sampler_options: Optional[dict]) -> dict:
    """Build the sampler once on the default schedule so a bad option fails now, naming it."""
    options = dict(sampler_options or {})
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    try:
        make_sampler(NoiseSchedule(), sampler, steps=steps, **options)
    except TypeError as error:  # an unknown keyword: say it's one of sampler_options
        raise ValueError(f"sampler_options {sorted(options)} don't fit sampler {sampler!r}: {error}") from None
    return options


def check_guidance(guidance: Optional[dict], steps: int) -> tuple[dict, UncertaintyGuidance]:
    """`UncertaintyGuidance` options (docs/algorithms.md §4), checked by building one; returns both. With
    `threshold: table`, `table` may be a file from `save_table`: it must load and have `steps`
    steps now; the options keep its absolute path, which `DiffusionModule.sample` reads (and
    checks against the model's image shape) when sampling."""
    options = dict(guidance or {})
    hook = build_hook(guidance=options, steps=steps)
    if isinstance(options.get("table"), (str, Path)):
        options["table"] = str(Path(options["table"]).resolve())
    return options, hook


def check_estimator(estimator: str, estimator_options: Optional[dict]) -> dict:
    """A per-sample score estimator of `DiffusionModule.sample` and its options, checked now (MC-Dropout's
    against a stand-in `nn.Dropout`; the model's own rate is checked in `check_mc_dropout`)."""
    options = dict(estimator_options or {})
    if estimator == "bayesdiff":
        raise ValueError("estimator: 'bayesdiff' can't score samples during training: it needs a Laplace "
                         "posterior fitted after training (and unclipped DDIM). Run `train.py evaluate` or "
                         "`train.py sample --estimator.name bayesdiff` on the checkpoint instead")
    if estimator not in SCORE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {SCORE_ESTIMATORS} (it scores the samples), got {estimator!r}")
    try:
        if estimator == "aleatoric":
            make_estimator("aleatoric", **options)
        else:
            make_estimator("mc_dropout", model=nn.Dropout(), **options)
    except ValueError as error:
        raise ValueError(f"estimator_options: {error}") from None
    return options


def check_mc_dropout(pl_module: L.LightningModule, estimator_options: dict) -> None:
    """MC-Dropout's options against the model itself (e.g. a model trained without dropout needs
    `dropout`), so a run fails when it starts, not at its first validation."""
    try:
        build_hook("mc_dropout", estimator_options, net=pl_module.ema.ema_model)
    except ValueError as error:
        raise ValueError(f"estimator_options: {error}") from None


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
