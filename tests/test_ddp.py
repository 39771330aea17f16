"""Two CPU processes (ddp_spawn): the ranks see disjoint data and end with identical weights."""

import lightning as L
import pytest
import torch

from conftest import tiny_model_kwargs
from uncdiff.lightning.data import DigitsDataModule
from uncdiff.lightning.module import DiffusionModule

pytestmark = pytest.mark.slow  # two DDP processes train


class RecordRank(L.Callback):
    """Each rank writes the images it trained on and its final weights to `out/rank{r}.pt`."""

    def __init__(self, out):
        self.out, self.seen = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch[0].detach().cpu().clone())

    def on_train_end(self, trainer, pl_module):
        torch.save({"seen": torch.cat(self.seen), "net": pl_module.net.state_dict(),
                    "ema": pl_module.ema.ema_model.state_dict()}, self.out / f"rank{trainer.global_rank}.pt")


def test_two_ranks_see_different_data_and_agree_on_weights(tmp_path):
    model = DiffusionModule(**tiny_model_kwargs())
    data = DigitsDataModule(image_size=8, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[RecordRank(tmp_path)])
    trainer.fit(model, data)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["seen"].shape == r1["seen"].shape == (4 * 8, 1, 8, 8)
    # no image (as a row of pixels) trained on by rank 0 is among rank 1's
    rows0 = {tuple(x.flatten().tolist()) for x in r0["seen"]}
    rows1 = {tuple(x.flatten().tolist()) for x in r1["seen"]}
    assert not rows0 & rows1
    for key in ("net", "ema"):
        for name, value in r0[key].items():
            torch.testing.assert_close(r1[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
