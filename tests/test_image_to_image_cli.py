"""`train.py fit --config configs/inpaint_quickstart.yaml` end to end, in a subprocess: a few steps on
the digits, offline, with the validation panels; the checkpoint loads as an image-to-image model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from uncdiff.data.masks import box_mask
from uncdiff.lightning.loading import load_module

pytestmark = pytest.mark.slow  # train.py fit in subprocesses

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "inpaint_quickstart.yaml"


def run(args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_print_config_names_the_image_to_image_classes(tmp_path):
    out = run(["fit", "--config", str(CONFIG), "--print_config"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    config = yaml.safe_load(out.stdout)
    assert config["model"]["class_path"] == "uncdiff.lightning.image_to_image.ImageToImageModule"
    assert config["data"]["init_args"]["task"] == "inpaint"
    assert not {"task", "image_size", "in_channels"} & set(config["model"]["init_args"])  # the data's, linked


def test_fit_a_few_steps_logs_panels_and_writes_a_loadable_checkpoint(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    panels = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ImageToImagePanels"))
    panels["init_args"].update(every_n_epochs=1, sampler={"name": "ddim", "steps": 2}, num_examples=2,
                               estimator={"name": "aleatoric", "M": 2}, interval_width=True)
    small = tmp_path / "config.yaml"
    small.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    out = run(["fit", "--config", str(small), "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", "3",
               "--trainer.limit_train_batches", "3", "--trainer.check_val_every_n_epoch", "1",
               "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
               "--model.init_args.base_channels", "8", "--model.init_args.channel_mults", "[1,2]"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((run_dir / "image_to_image").glob("step_*.png"))) == 1
    assert list(run_dir.glob("wandb/offline-run-*/files/media/images/val/image_to_image/panels_*.png"))
    module = load_module(run_dir / "checkpoints" / "last.ckpt", image_to_image=True)
    assert module.task.name == "inpaint"
    y, mask = torch.zeros(1, 1, 16, 16), box_mask(16)[None]
    result = module.sample(y, mask, sampler={"steps": 2})
    assert torch.equal(result.images[mask.expand_as(y) == 0], y[mask.expand_as(y) == 0])


@pytest.mark.parametrize("option, value, fix", [("task", "super_resolve", "data.init_args.task"),
                                                 ("image_size", "8", "data.init_args.image_size")])
def test_a_model_option_the_data_sets_is_refused_by_name(option, value, fix, tmp_path):
    out = run(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path / "run"),
               "--trainer.max_steps", "1", "--trainer.logger", "false", f"--model.init_args.{option}", value], tmp_path)
    assert out.returncode != 0 and f"model option {option}" in out.stderr and fix in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("task", ["inpaint", "colorize", "uncrop"])
def test_cifar_configs_print_and_run_their_first_steps(task, tmp_path, monkeypatch, capsys):
    """The CIFAR-10 configs on a CIFAR-10-format fixture (in-process: its md5 sums aren't the real files'),
    with a small U-Net: the task's pairs reach the model and a checkpoint is written."""
    from test_data import write_cifar_fixture
    from uncdiff.lightning.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as printed:
        main(["fit", "--config", f"{task}.yaml", "--print_config"])
    assert printed.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["init_args"]["task"] == task and "task" not in config["model"]["init_args"]
    write_cifar_fixture(tmp_path / "data", n_per_batch=4)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    main(["fit", "--config", f"{task}.yaml", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.logger", "false", "--model.init_args.base_channels", "8",
          "--model.init_args.channel_mults", "[1,2]", "--data.init_args.data.init_args.batch_size", "2",
          "--data.init_args.data.init_args.num_workers", "0", "--data.init_args.data.init_args.download", "false"])
    module = load_module(tmp_path / "runs" / task / "checkpoints" / "last.ckpt", image_to_image=True)
    assert module.task.name == task and module.net.conv_in.in_channels == 6
