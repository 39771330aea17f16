"""Data modules: digits, and CIFAR-10 read from a fixture in CIFAR-10's on-disk format."""

import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

import uncdiff.lightning.data as data_module
from uncdiff.lightning.data import CIFAR10DataModule, DigitsDataModule, ResumableSampler


def write_cifar_fixture(root, n_per_batch=4):
    """CIFAR-10's python layout: pickled dicts with 'data' (uint8 [n, 3072], R then G then B planes,
    row-major) and 'labels', in root/cifar-10-batches-py/."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.zeros((n_per_batch, 3, 32, 32), dtype=np.uint8)
        for i in range(n_per_batch):
            data[i, 0] = 10 * b + i  # red plane marks (batch, image)
            data[i, 1, 0, :] = np.arange(32)  # green: first row is a ramp along width
            data[i, 2, :, 0] = 255  # blue: first column lit
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data.reshape(n_per_batch, -1), "labels": [b] * n_per_batch}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    write_cifar_fixture(tmp_path)
    # torchvision checks the real files' md5 sums; the fixture has the format, not the contents.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return tmp_path


def test_cifar_datamodule_reads_the_on_disk_format(cifar_root):
    dm = CIFAR10DataModule(root=str(cifar_root), batch_size=2, num_workers=0, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 4
    images, labels = dm.train_set[5]  # data_batch_2, image 1
    assert images.shape == (3, 32, 32) and images.dtype == torch.uint8
    assert int(images[0, 7, 7]) == 11 and int(labels) == 1
    assert images[1, 0].tolist() == list(range(32)) and int(images[1, 1, 5]) == 0
    assert (images[2, :, 0] == 255).all() and int(images[2, 5, 5]) == 0
    val_images, val_labels = dm.val_set[0]
    assert int(val_images[0, 0, 0]) == 50 and int(val_labels) == 5
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch[0].dtype == torch.float32 and batch[0].min() >= -1 and batch[0].max() <= 1


def test_missing_cifar_says_where_to_put_it(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        dm.prepare_data()


def test_digits_are_16x16_in_range_with_disjoint_val_split():
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup("fit")
    x_train, x_val = dm.train_set.tensors[0], dm.val_set.tensors[0]
    assert x_train.shape[1:] == (1, 16, 16) and len(x_train) + len(x_val) == 1797
    assert x_train.dtype == torch.uint8 and x_train.max() > 200  # ink reaches near-white
    train_rows = {tuple(x.flatten().tolist()) for x in x_train}
    assert sum(tuple(x.flatten().tolist()) in train_rows for x in x_val) < 5  # (a few digits repeat)


def test_sampler_shards_are_disjoint_and_depend_on_epoch(monkeypatch):
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(data_module, "rank_and_world", lambda rank=rank: (rank, 2))
        s = ResumableSampler(11, seed=3)
        shards.append(list(s))
        s.set_epoch(1)
        assert list(s) != shards[-1]
    assert len(shards[0]) == len(shards[1]) == 5 and not set(shards[0]) & set(shards[1])


def test_sampler_resume_skips_only_the_resumed_epoch():
    s = ResumableSampler(10, seed=0)
    full = list(s)
    s.resume_epoch, s.resume_skip = 0, 4
    assert list(s) == full[4:]
    assert len(s) == 10  # the whole shard: Lightning keeps the first epoch's length for every later one
    s.set_epoch(1)
    assert len(list(s)) == 10
