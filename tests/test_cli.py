"""The train.py CLI, run as users run it (subprocesses): both configs' first steps, run-directory
safety, resume, offline W&B, DDP through the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_data import write_cifar_fixture
from uncdiff.lightning.cli import main, resolve_config_args

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.check_val_every_n_epoch", "1", "--model.sample_steps", "3",
         "--data.init_args.batch_size", "16", "--trainer.max_steps", "4"]


def train(args, cwd, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}, **(extra_env or {}))
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_quickstart_first_steps_offline_wandb_and_no_overwrite(tmp_path):
    args = ["--config", "quickstart.yaml", *QUICK]  # bare name: resolved in configs/
    first = train(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert len(list(run.glob("config-*.yaml"))) == 1
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_00000002.png", "step_00000004.png"]
    # offline by itself (no API key, no WANDB_MODE), said once, with the sync command
    assert (first.stdout + first.stderr).count("wandb sync runs/quickstart/wandb/offline-run-*") == 1
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("files/media/images/val/ema_samples_*.png"))

    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    again = train(args, tmp_path)  # the same command again must not overwrite the run
    assert again.returncode != 0 and "--ckpt_path last" in again.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1

    resumed = train([*args, "--trainer.max_steps", "6", "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert len(list(run.glob("config-*.yaml"))) == 2
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # a new W&B run; the first is untouched


def test_user_wandb_mode_wins(tmp_path):
    result = train(["--config", "quickstart.yaml", *QUICK, "--trainer.max_steps", "1"], tmp_path,
                   {"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb sync" not in result.stdout + result.stderr
    assert not list((tmp_path / "runs" / "quickstart").glob("wandb/offline-run-*"))


def test_ddp_through_the_cli(tmp_path):
    result = train(["--config", "quickstart.yaml", *QUICK, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--trainer.accelerator", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4


def test_cifar_recipe_first_steps(tmp_path, monkeypatch):
    """The real config, full-size model, on a CIFAR-10-format fixture (in-process: the fixture's
    md5 sums differ from the real files', which torchvision checks)."""
    write_cifar_fixture(tmp_path / "data", n_per_batch=4)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "cifar.yaml", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.logger", "false", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
          "--data.init_args.download", "false"])
    ckpt = torch.load(tmp_path / "runs" / "cifar" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    n_params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("net."))
    assert abs(n_params - 35.7e6) < 0.3e6
    assert ckpt["hyper_parameters"]["dropout"] == 0.1 and ckpt["hyper_parameters"]["lr"] == 2e-4


def test_config_names_resolve_in_configs_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_args(["fit", "--config", "cifar.yaml"])[2] == str(REPO / "configs" / "cifar.yaml")
    assert resolve_config_args(["--config=quickstart.yaml"])[0] == f"--config={REPO / 'configs' / 'quickstart.yaml'}"
    (tmp_path / "mine.yaml").write_text("{}")
    assert resolve_config_args(["--config", "mine.yaml"])[1] == "mine.yaml"


def test_bad_config_value_fails_before_training(tmp_path):
    result = train(["--config", "quickstart.yaml", "--model.image_size", "18"], tmp_path)
    assert result.returncode != 0 and "image_size" in result.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))
