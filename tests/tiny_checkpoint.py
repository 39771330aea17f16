"""A tiny checkpoint trained through `train.py fit` (in-process), once per test session, for the
tests of the commands that read checkpoints (`train.py sample`, `train.py evaluate`)."""

import functools
import sys
from pathlib import Path
from unittest import mock

import pytest

from uncdiff.lightning.cli import main as cli_main

TINY_FIT = ["--model.base_channels", "8", "--model.channel_mults", "[1,2]",
            "--model.attn_resolutions", "[4]", "--model.dropout", "0.1", "--model.sample_steps", "4",
            "--data.init_args.image_size", "8", "--data.init_args.batch_size", "16",
            "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@functools.cache
def _train(root: str) -> Path:
    run = Path(root) / "runs" / "tiny"
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # LightningCLI warns when argv and sys.argv both have args
        cli_main(["fit", "--config", "quickstart.yaml", "--trainer.default_root_dir", str(run), *TINY_FIT])
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """`<run>/checkpoints/last.ckpt` of a 3-step quickstart-config run with an 8x8 U-Net; the run's
    `config-*.yaml` (digits at 8x8) lies in `<run>`."""
    return _train(str(tmp_path_factory.getbasetemp()))
