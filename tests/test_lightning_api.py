"""What uncdiff relies on from Lightning, checked against the installed version (run these under the
lowest and highest Lightning that pyproject.toml allows): our sampler survives
`use_distributed_sampler=True`, the data module counts the batches trained on (for exact resume),
and `close_run` can finish and forget a WandbLogger's run (the one private attribute we use)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

from conftest import tiny_model_kwargs
from uncdiff.lightning.data import DigitsDataModule, ResumableSampler
from uncdiff.lightning.module import DiffusionModule
from uncdiff.lightning.wandb_logger import WandbLogger, close_run


class Record(L.Callback):
    """The training sampler's type, and per batch (batch_idx, epoch, the data module's state)."""

    def __init__(self):
        self.samplers, self.states = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.samplers.append(trainer.train_dataloader.sampler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append((batch_idx, trainer.current_epoch, trainer.datamodule.state_dict()))


class PlainSampling(DigitsDataModule):
    """The same data with a plain RandomSampler: what Lightning does replace under DDP."""

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=RandomSampler(self.train_set))


def fit(datamodule, strategy="auto", max_steps=5, limit_train_batches=3) -> Record:
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, use_distributed_sampler=True,
                        max_steps=max_steps, limit_train_batches=limit_train_batches, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record])
    try:
        trainer.fit(DiffusionModule(**tiny_model_kwargs()), datamodule)
    finally:
        if torch.distributed.is_initialized():  # one-process DDP: leave no process group behind
            torch.distributed.destroy_process_group()
    return record


@pytest.mark.slow
def test_distributed_training_keeps_our_sampler():
    # The control: under a DDP strategy Lightning swaps a plain sampler for a DistributedSampler...
    plain = fit(PlainSampling(image_size=8, batch_size=8), strategy="ddp", max_steps=1)
    assert isinstance(plain.samplers[0], DistributedSampler) and not isinstance(plain.samplers[0], RandomSampler)
    # ...and leaves ours, which shards and resumes by itself.
    ours = fit(DigitsDataModule(image_size=8, batch_size=8), strategy="ddp", max_steps=1)
    assert type(ours.samplers[0]) is ResumableSampler


@pytest.mark.slow
def test_datamodule_state_counts_the_batches_of_the_epoch():
    record = fit(DigitsDataModule(image_size=8, batch_size=8), max_steps=5, limit_train_batches=3)
    # after batch i of epoch e, i + 1 batches of epoch e have been trained on
    assert [state for _, _, state in record.states] == [{"epoch": e, "batches": i + 1} for i, e, _ in record.states]
    assert [(i, e) for i, e, _ in record.states] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]


def test_datamodule_state_continues_from_a_checkpoint_mid_epoch():
    data = DigitsDataModule(image_size=8, batch_size=8)
    data.load_state_dict({"epoch": 0, "batches": 2})  # as a resumed fit does, before its first batch
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[record])
    trainer.fit(DiffusionModule(**tiny_model_kwargs()), data)
    assert record.states[0][2] == {"epoch": 0, "batches": 3}
    sampler = trainer.train_dataloader.sampler
    assert list(sampler) == list(ResumableSampler(len(data.train_set), seed=data.seed))[2 * 8:]  # skipped those two
    assert len(sampler) == len(data.train_set)  # the whole shard: Lightning keeps this length for later epochs


@pytest.mark.slow
def test_close_run_finishes_the_run_and_the_logger_starts_a_new_one(tmp_path):
    import wandb

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    first = logger.experiment
    first.log({"x": 1.0})
    close_run(logger)
    assert wandb.run is None  # finished
    second = logger.experiment
    try:
        assert second.id != first.id
        second.log({"x": 2.0})  # a finished run would refuse this
    finally:
        close_run(logger)
    close_run(logger)  # no run: nothing to do
