"""Image-to-image data (docs/algorithms.md §7): any `ImageDataModule` (digits, CIFAR-10) whose batches
become `(x0, y, mask)` on the fly, the condition and mask of each image built by a `Task` from a
per-sample key, so a run (and its resume) sees the same pairs."""

from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from uncdiff.data.degradations import Task
from uncdiff.io.images import from_uint8
from uncdiff.lightning.data import ImageDataModule


class IndexedDataset(Dataset):
    """`(*dataset[i], i)`: each item with its index, the per-sample key of its condition."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (*self.dataset[i], i)


class ImageToImageDataModule(ImageDataModule):
    """`data`'s images as image-to-image batches `(x0 [B, C, H, W], y [B, C, H, W], mask [B, 1, H, W])`,
    floats on the device (x0, y in [-1, 1] but for the noise of masked pixels; mask 1 = generate, all
    ones for tasks without one).

    `task` and its options (`mask`, `sides`, `quality`, `factor`) are those of
    `uncdiff.data.degradations.Task`. Image i's pair comes from the key `(seed, epoch + 1, i)` in
    training (new pairs each epoch) and `(seed, 0, i)` in validation (the same pairs every time).
    Batch size, workers, shuffling and resuming are `data`'s.
    """

    def __init__(self, data: ImageDataModule, task: str = "inpaint", mask: str = "mixed", sides: str = "mixed",
                 quality: Sequence[int] = (5, 30), factor: int = 2, seed: int = 0):
        if not isinstance(data, ImageDataModule):
            raise ValueError(f"data must be one of uncdiff's image data modules (ImageDataModule), got {type(data).__name__}")
        super().__init__(data.batch_size, data.num_workers, data.seed)
        self.data, self.seed_of_pairs, self.image_shape = data, int(seed), data.image_shape
        self.task = Task(task, mask, sides, tuple(quality), factor)

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        self.data.setup(stage)
        image = self.data.train_set[0][0]
        self.task.condition_channels(image.shape[0])  # colorize on 1-channel data fails here, naming the substitute
        self.train_set, self.val_set = IndexedDataset(self.data.train_set), IndexedDataset(self.data.val_set)

    def pairs(self, pixels: torch.Tensor, index: torch.Tensor, epoch_key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(y [B, C, H, W], mask [B, 1, H, W])` of uint8 images `[B, C, H, W]` with dataset indices `index [B]`."""
        made = [self.task(p, (self.seed_of_pairs, epoch_key, int(i))) for p, i in zip(pixels.cpu(), index.tolist())]
        return torch.stack([m[0] for m in made]), torch.stack([m[1] for m in made])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        pixels, labels, index = batch
        x0, _ = super().on_after_batch_transfer((pixels, labels), dataloader_idx)
        trainer = self.trainer
        epoch_key = trainer.current_epoch + 1 if trainer is not None and trainer.training else 0
        y, mask = self.pairs(pixels, index, epoch_key)
        return x0, y.to(x0.device), mask.to(x0.device)

    def held_out(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first `n` validation images and the pairs validation builds for them (key `(seed, 0, i)`):
        `(x0 [n, C, H, W], y [n, C, H, W], mask [n, 1, H, W])`, x0 in [-1, 1]. Call `setup` first."""
        if not 1 <= n <= len(self.val_set):
            raise ValueError(f"the validation split holds {len(self.val_set)} images; asked for {n}")
        return self.first_pairs(self.val_set, n, 0)

    def training_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first `n` training images (all of them if there are fewer) and the pairs the first training
        epoch builds for them (key `(seed, 1, i)`), as `held_out` returns them: what BayesDiff's Laplace
        fit of an image-to-image model runs on (docs/algorithms.md §7). Calls `setup` if needed."""
        if n < 1:
            raise ValueError(f"asked for {n} training pairs")
        if not hasattr(self, "train_set"):
            self.prepare_data()
            self.setup("fit")
        return self.first_pairs(self.train_set, min(n, len(self.train_set)), 1)

    def first_pairs(self, dataset: IndexedDataset, n: int, epoch_key: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
        items = [dataset[i] for i in range(n)]
        pixels = torch.stack([item[0] for item in items])
        y, mask = self.pairs(pixels, torch.tensor([item[-1] for item in items]), epoch_key)
        return from_uint8(pixels), y, mask
