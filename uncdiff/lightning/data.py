"""Data modules: the scikit-learn digits (quickstart, offline) and CIFAR-10 (torchvision).

Images are kept as uint8 `[N, C, H, W]` tensors and turned into floats in [-1, 1] on the device.
Shuffling and sharding over DDP ranks is done by `ResumableSampler`, whose order is a function of
(seed, epoch) and which can skip the part of an epoch a checkpoint had already trained on: that
is what makes `--ckpt_path last` continue exactly, even from the middle of an epoch.
"""

import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from uncdiff.data.datasets import digits
from uncdiff.data.shapes import make_shapes
from uncdiff.io.images import from_uint8
from uncdiff.io.processes import rank_and_world

# Lightning warns about mid-epoch resumes unless the DataLoader itself is stateful; ours skips the
# trained part of the epoch through the datamodule's state instead (see ImageDataModule.state_dict).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices, split into equal disjoint shards, one per DDP rank.

    The permutation of epoch e comes from a generator seeded with (seed, e). `skip` drops the
    first indices of one epoch's shard (used once, when resuming mid-epoch).

    It is a `DistributedSampler` only so that Lightning keeps it whatever
    `Trainer(use_distributed_sampler=...)` says (documented: an existing DistributedSampler is not
    replaced); it shards by itself, so DistributedSampler's `__init__` (which wants the process
    group and the dataset) is not run.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        self.resume_epoch, self.resume_skip = -1, 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at each epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        # the whole shard, also in a resumed epoch that yields fewer: Lightning reads the length once per
        # dataloader and keeps it for every later epoch, and it restores the resumed epoch's batch count
        rank, world = rank_and_world()
        return self.size // world

    def __iter__(self) -> Iterator[int]:
        rank, world = rank_and_world()
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.size)
        per_rank = self.size // world
        shard = order[rank * per_rank:(rank + 1) * per_rank]
        if self.epoch == self.resume_epoch:
            shard = shard[self.resume_skip:]
        return iter(shard.tolist())


class ImageDataModule(L.LightningDataModule):
    """Shared loading logic; subclasses fill `self.train_set` / `self.val_set` in `setup`.

    `batch_size` is per process (Lightning's convention): with N GPUs the global batch is N times it.
    """

    train_set: Dataset
    val_set: Dataset
    image_shape: tuple[int, int, int]  # (C, H, W), known before setup: the CLI gives it to the model

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._resume: Optional[dict] = None
        self._trained = (-1, 0)  # (epoch, batches trained on in it), counted in on_after_batch_transfer

    def _loader(self, dataset: Dataset, sampler: Sampler) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableSampler(len(self.train_set), self.seed, shuffle=True)
        if self._resume is not None:
            sampler.resume_epoch = self._resume["epoch"]
            sampler.resume_skip = self._resume["batches"] * self.batch_size
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, ResumableSampler(len(self.val_set), shuffle=False))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training:  # count the training batches for state_dict
            epoch, done = self._trained                # (Lightning's own count is in private classes)
            self._trained = (trainer.current_epoch, done + 1 if epoch == trainer.current_epoch else 1)
        images, labels = batch
        return from_uint8(images), labels

    def state_dict(self) -> dict:
        """Where in the epoch training is: the next run skips the batches already trained on."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        epoch, done = self._trained
        return {"epoch": trainer.current_epoch, "batches": done if epoch == trainer.current_epoch else 0}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None
        if state:
            self._trained = (state["epoch"], state["batches"])


def dataset_key(datamodule, image_shape: Sequence[int], split: str = "train") -> str:
    """The one name of a data module's split at an image size: the key of its cached real FID
    statistics. Its class name without 'DataModule', lower-cased, then `<H>x<W>-<split>`, e.g.
    'digits-16x16-train', 'cifar10-32x32-train'."""
    stem = type(datamodule).__name__.removesuffix("DataModule").lower()
    return f"{stem}-{image_shape[-2]}x{image_shape[-1]}-{split}"


class DigitsDataModule(ImageDataModule):
    """The 1797 8x8 handwritten digits that ship with scikit-learn, resized to `image_size`
    (one channel). A fixed 10% is held out for validation. Needs no download."""

    def __init__(self, image_size: int = 16, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.1):
        super().__init__(batch_size, num_workers, seed)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.image_size, self.val_fraction = image_size, val_fraction
        self.image_shape = (1, image_size, image_size)

    def setup(self, stage: Optional[str] = None) -> None:
        (train_x, train_y), (val_x, val_y) = digits(self.image_size, self.val_fraction, min_val=self.batch_size)
        self.train_set = TensorDataset(train_x, train_y)
        self.val_set = TensorDataset(val_x, val_y)


class ShapesDataModule(ImageDataModule):
    """The simple-shapes testbed (`uncdiff.data.shapes`, docs/algorithms.md §6c): 16x16 images whose
    validity a checker decides exactly. `train_size` images from `data_seed`, and a validation set
    of `val_size` from the next seed; generated here, no download."""

    def __init__(self, train_size: int = 20000, val_size: int = 1000, data_seed: int = 0, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        for name, value in (("train_size", train_size), ("val_size", val_size)):
            if value < batch_size:
                raise ValueError(f"{name} must be >= batch_size ({batch_size}), got {value}")
        self.image_size, self.train_size, self.val_size, self.data_seed = 16, train_size, val_size, data_seed
        self.image_shape = (1, 16, 16)

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_set = TensorDataset(*make_shapes(self.train_size, self.data_seed))
        self.val_set = TensorDataset(*make_shapes(self.val_size, self.data_seed + 1))

CIFAR_HELP = (
    "CIFAR-10 is not in {root} and could not be downloaded ({error}). Download "
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a machine with internet and "
    "either put the .tar.gz file in {root}/ or extract it so that {root}/cifar-10-batches-py/ "
    "holds data_batch_1..5 and test_batch; then run again (or set data.init_args.root)."
)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 through torchvision (downloaded to `root` on first use); test split for validation."""

    image_shape = (3, 32, 32)

    def __init__(self, root: str = "data", batch_size: int = 128, num_workers: int = 4, seed: int = 0,
                 download: bool = True):
        super().__init__(batch_size, num_workers, seed)
        self.root, self.download = Path(root), download

    def _dataset(self, train: bool, download: bool):
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(str(self.root), train=train, download=download)
        except Exception as error:  # torchvision raises URLError / RuntimeError / OSError
            raise FileNotFoundError(CIFAR_HELP.format(root=self.root, error=error)) from error

    def prepare_data(self) -> None:
        self._dataset(train=True, download=self.download)  # rank 0 only: download once

    def setup(self, stage: Optional[str] = None) -> None:
        for name, train in (("train_set", True), ("val_set", False)):
            ds = self._dataset(train=train, download=False)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            setattr(self, name, TensorDataset(images, torch.tensor(ds.targets)))
