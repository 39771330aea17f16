import os

import pytest
import torch

# Tests never talk to W&B servers, whatever the developer's environment says.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_model_kwargs(**overrides) -> dict:
    """A DiffusionModule small enough to train for a few steps on CPU in a test."""
    kwargs = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                  attn_resolutions=(4,), dropout=0.1, lr=1e-3, warmup_steps=3, ema_decay=0.9,
                  random_flip=True, sample_steps=4)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_kwargs():
    return tiny_model_kwargs


LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                      "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def no_launcher_variables_left_over():
    """Lightning's in-process launchers (ddp_spawn, a one-process DDP) leave MASTER_PORT, LOCAL_RANK, ... in
    os.environ. A later test's `train.py ... --fabric.devices 2` subprocess would inherit them, take itself
    for rank 0 of an external launch, never start rank 1, and wait for it forever."""
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    yield
