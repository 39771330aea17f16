"""Two CPU processes (ddp_spawn) training the image-to-image model, as tests/test_ddp.py does for the
unconditional one: the ranks see disjoint images, each image's condition and mask follow from its own key
whatever rank builds them (so the ranks' pairs differ), and the ranks end with identical weights."""

import lightning as L
import pytest
import torch

from conftest import tiny_model_kwargs
from uncdiff.lightning.data import DigitsDataModule
from uncdiff.lightning.image_to_image import ImageToImageModule
from uncdiff.lightning.image_to_image_data import ImageToImageDataModule

pytestmark = pytest.mark.slow  # two DDP processes train


class IndexRecordingData(ImageToImageDataModule):
    """Remembers the dataset indices of the latest batch (the batch itself loses them)."""

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        self.last_index = batch[2].detach().cpu().clone()
        return super().on_after_batch_transfer(batch, dataloader_idx)


class RecordPairs(L.Callback):
    """Each rank writes the (image, condition, mask) batches it trained on, their indices and its final
    weights to `out/rank{r}.pt`."""

    def __init__(self, out):
        self.out, self.seen = out, {"x0": [], "y": [], "mask": [], "index": [], "epoch": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for name, value in zip(("x0", "y", "mask"), batch):
            self.seen[name].append(value.detach().cpu().clone())
        self.seen["index"].append(trainer.datamodule.last_index)
        self.seen["epoch"].append(torch.tensor([trainer.current_epoch]))

    def on_train_end(self, trainer, pl_module):
        torch.save({**{k: torch.cat(v) for k, v in self.seen.items()}, "net": pl_module.net.state_dict(), "ema": pl_module.ema.ema_model.state_dict()},
                   self.out / f"rank{trainer.global_rank}.pt")


def inpaint_data() -> IndexRecordingData:
    return IndexRecordingData(DigitsDataModule(image_size=8, batch_size=8), task="inpaint", seed=3)


def test_two_ranks_train_on_different_pairs_of_their_own_keys_and_agree_on_weights(tmp_path):
    model = ImageToImageModule(task="inpaint", **tiny_model_kwargs())
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[RecordPairs(tmp_path)])
    trainer.fit(model, inpaint_data())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["x0"].shape == r1["x0"].shape == (4 * 8, 1, 8, 8)
    assert r0["epoch"].tolist() == r1["epoch"].tolist() == [0] * 4  # four steps within the first epoch
    assert not set(r0["index"].tolist()) & set(r1["index"].tolist())  # disjoint images
    # every pair is the task's transform of its image under the key (seed, epoch + 1, index), rebuilt here in one
    # process: which rank built it doesn't matter
    reference = inpaint_data()
    reference.setup("fit")
    pixels = reference.data.train_set.tensors[0]
    for record in (r0, r1):
        y, mask = reference.pairs(pixels[record["index"]], record["index"], 1)
        torch.testing.assert_close(record["y"], y, rtol=0, atol=0)
        torch.testing.assert_close(record["mask"], mask, rtol=0, atol=0)
        assert torch.equal(record["x0"], pixels[record["index"]].float() / 127.5 - 1)
    assert not torch.equal(r0["mask"], r1["mask"]) and not torch.equal(r0["y"], r1["y"])  # the ranks' pairs differ
    for key in ("net", "ema"):
        for name, value in r0[key].items():
            torch.testing.assert_close(r1[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
