"""Exact resume: N steps, stop, resume for N more == 2N straight (spec: issue item 4)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import tiny_model_kwargs
from uncdiff.lightning.data import DigitsDataModule
from uncdiff.lightning.module import DiffusionModule

pytestmark = pytest.mark.slow  # interrupted and straight training runs


def fit(tmp_path, max_steps, ckpt_path=None, every=None, limit_train_batches=1.0):
    L.seed_everything(0)
    model = DiffusionModule(**tiny_model_kwargs())
    data = DigitsDataModule(image_size=8, batch_size=16)
    callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=every)] if every else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=callbacks,
                        enable_checkpointing=bool(every), enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, limit_train_batches=limit_train_batches, gradient_clip_val=1.0,
                        use_distributed_sampler=False)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


def state(model, trainer):
    opt = trainer.optimizers[0]
    return {
        "net": {k: v.clone() for k, v in model.net.state_dict().items()},
        "ema": {k: v.clone() for k, v in model.ema.state_dict().items()},
        "opt": [s[k].clone() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")],
        "lr": opt.param_groups[0]["lr"],
        "step": trainer.global_step,
    }


@pytest.mark.parametrize("n, limit", [(7, 1.0), (5, 5)], ids=["mid-epoch", "epoch-boundary"])
def test_resume_equals_straight_run(tmp_path, n, limit):
    straight = state(*fit(tmp_path / "a", 2 * n, limit_train_batches=limit))
    fit(tmp_path / "b", n, every=n, limit_train_batches=limit)
    assert (tmp_path / "b" / "last.ckpt").exists()
    resumed = state(*fit(tmp_path / "b", 2 * n, ckpt_path=str(tmp_path / "b" / "last.ckpt"), every=n,
                         limit_train_batches=limit))
    assert resumed["step"] == straight["step"] == 2 * n
    assert resumed["lr"] == pytest.approx(straight["lr"])
    for key in ("net", "ema"):
        assert straight[key].keys() == resumed[key].keys()
        for name in straight[key]:
            torch.testing.assert_close(resumed[key][name], straight[key][name], msg=f"{key}.{name}")
    for a, b in zip(resumed["opt"], straight["opt"]):
        torch.testing.assert_close(a, b)


def test_checkpoint_holds_online_weights_once(tmp_path):
    fit(tmp_path, 2, every=2)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    keys = ckpt["state_dict"].keys()
    n_net = sum(k.startswith("net.") for k in keys)
    assert n_net > 0
    assert sum(k.startswith("ema.ema_model.") for k in keys) == n_net  # the EMA copy
    assert not any("online_model" in k for k in keys)  # and no second copy of the online weights
