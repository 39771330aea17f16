"""Every config in configs/ fits, resumes and validates through the CLI, each command in its own process
(docs/configs.md, "Resuming"):

1. `fit` 2N steps, the uninterrupted run, keeping its checkpoints of steps N and 2N;
2. the step-N checkpoint as `last.ckpt` of a second run directory (a run killed after step N, in the
   middle of an epoch), then `fit --ckpt_path last` to 2N there: its step-2N checkpoint must hold the
   uninterrupted run's weights, EMA weights, Adam moments and step;
3. `validate --ckpt_path <that checkpoint file>`: a file's hyperparameters are read for the config's
   model class (image-to-image runs used to fail here).

Each config runs as written but for a tiny network, small batches, two validation batches, no logger and
none of the callbacks that need a trained model or downloaded features (FID, and what monitors it); the
sampling callbacks stay, shrunk to two images of two steps, and run in `validate`. The CIFAR-10 configs
read a fixture in CIFAR-10's on-disk format (tests/test_data.py): its md5 sums are not the real files',
so the CLI runs behind a one-line driver that skips torchvision's integrity check. Nothing is downloaded.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from test_data import write_cifar_fixture

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
STEPS = 3  # N: the resume starts mid-epoch

DRIVER = ("import torchvision.datasets.cifar as cifar; cifar.check_integrity = lambda *a, **k: True; "
          "from uncdiff.lightning.cli import main; main()")
HEAVY = ("FIDTrajectory", "EarlyStopping")  # need a trained model or downloaded features; ...
TINY_DIFFUSERS = {"layers_per_block": 1, "block_out_channels": [8, 8], "down_block_types": ["DownBlock2D"] * 2,
                  "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 8, "attention_head_dim": 8}


def init_args(node: dict) -> dict:
    """A `class_path`/`init_args` entry's arguments, or a plain mapping itself."""
    return node.setdefault("init_args", {}) if "class_path" in node else node


def tiny(config: dict) -> dict:
    """`config` with a tiny network, small batches and light callbacks; everything else as written."""
    model = init_args(config["model"])
    if "diffusers_unet" in model:
        model["diffusers_unet"].update(TINY_DIFFUSERS)
    else:
        model.update(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attn_resolutions=[])
    data = init_args(config["data"])
    while isinstance(data.get("data"), dict):  # an image-to-image module wraps the image data
        data = init_args(data["data"])
    data["batch_size"] = 4
    data.update({k: v for k, v in (("num_workers", 0), ("download", False), ("train_size", 64), ("val_size", 16))
                 if k in data})
    trainer = config["trainer"]
    trainer.update(logger=False, limit_val_batches=2, enable_progress_bar=False, enable_model_summary=False)
    callbacks = []
    for callback in trainer.get("callbacks") or []:
        options = init_args(callback)
        if callback["class_path"].endswith(HEAVY) or "monitor" in options:  # ... or monitor what they log
            continue
        options.update({k: 2 for k in ("num_samples", "num_examples") if k in options})
        if isinstance(options.get("sampler"), dict):
            options["sampler"]["steps"] = 2
        callbacks.append(callback)
    # checkpoints of steps N and 2N, written mid-epoch as a periodic last.ckpt is
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"filename": "step{step}", "auto_insert_metric_name": False, "save_top_k": -1,
                                    "every_n_train_steps": STEPS}})
    trainer["callbacks"] = callbacks
    return config


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=cwd, env=env, capture_output=True, text=True)


def ok(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, f"{what} exited {result.returncode}:\n{result.stderr[-4000:]}"


def state(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in checkpoint["optimizer_states"][0]["state"].values()]
    return {"step": checkpoint["global_step"], "weights": checkpoint["state_dict"], "adam": moments}


@pytest.mark.slow  # three train.py processes: about 2 minutes for quickstart.yaml on 2 busy CPU cores
@pytest.mark.parametrize("config_path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_fits_resumes_and_validates(config_path, tmp_path):
    config = tiny(yaml.safe_load(config_path.read_text()))
    small = tmp_path / config_path.name
    small.write_text(yaml.safe_dump(config))
    write_cifar_fixture(tmp_path / "data", n_per_batch=4)  # read by the CIFAR-10 configs (root: data)
    straight, resumed = tmp_path / "straight" / "checkpoints", tmp_path / "resumed" / "checkpoints"

    def run(command, run_dir, *extra):
        return cli(command, "--config", str(small), "--trainer.default_root_dir", str(run_dir.parent),
                   "--trainer.max_steps", str(2 * STEPS), *extra, cwd=tmp_path)

    ok(run("fit", straight), "fit")
    resumed.mkdir(parents=True)
    shutil.copy(straight / f"step{STEPS}.ckpt", resumed / "last.ckpt")
    ok(run("fit", resumed, "--ckpt_path", "last"), "fit --ckpt_path last")
    end = f"step{2 * STEPS}.ckpt"
    ok(run("validate", resumed, "--ckpt_path", str(resumed / end)), "validate --ckpt_path")

    after_resume, uninterrupted = state(resumed / end), state(straight / end)
    assert after_resume["step"] == uninterrupted["step"] == 2 * STEPS
    assert after_resume["weights"].keys() == uninterrupted["weights"].keys()
    for name, value in uninterrupted["weights"].items():  # the online and the EMA weights
        torch.testing.assert_close(after_resume["weights"][name], value, msg=name)
    for a, b in zip(after_resume["adam"], uninterrupted["adam"], strict=True):
        torch.testing.assert_close(a, b)


class KillAt(Callback):
    """Stands in for a run killed (node failure, time limit) at the start of an epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"killed at epoch {self.epoch}")


@pytest.mark.parametrize("config_path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_a_killed_run_leaves_its_last_checkpoint(config_path, tmp_path):
    """The config's `save_last` checkpoint is written during the run, not only when it ends: Lightning
    writes last.ckpt at an epoch interval only when the same callback saved a top-k file there, so
    `save_top_k: 0` with `every_n_epochs` left a run killed mid-way nothing to resume from. The
    callback runs as configured, its interval shortened, beside a tiny model killed after two
    intervals."""
    config = yaml.safe_load(config_path.read_text())
    options = [dict(init_args(c)) for c in config["trainer"]["callbacks"]
               if c["class_path"].endswith("ModelCheckpoint") and init_args(c).get("save_last")]
    assert len(options) == 1, "one ModelCheckpoint writes last.ckpt"
    interval = options[0]
    for key, short in (("every_n_epochs", 2), ("every_n_train_steps", 4)):
        if key in interval:
            interval[key] = short
    check_val = 1 if config["trainer"].get("check_val_every_n_epoch", 1) == 1 else 2
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_train_batches=2, limit_val_batches=1,
                        check_val_every_n_epoch=check_val, max_epochs=10,
                        callbacks=[ModelCheckpoint(**interval), KillAt(epoch=4)])
    with pytest.raises(RuntimeError, match="killed at epoch 4"):
        trainer.fit(BoringModel())
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
