"""Crash-safe files: a sampling run and a `fit` run killed (SIGKILL) at a random moment leave no
truncated file and resume to the same result; a non-finite loss stops `fit` at once and leaves the
last good checkpoint intact."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import tiny_model_kwargs
from tiny_checkpoint import tiny_checkpoint  # noqa: F401 (fixture)
from uncdiff.io.lock import LOCK_NAME
from uncdiff.lightning.checkpoint_io import SafeCheckpointIO
from uncdiff.lightning.data import DigitsDataModule
from uncdiff.lightning.module import DiffusionModule, NonFiniteLossError

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")
# JSON fields that record when or how long something ran: the only bytes two runs may differ in.
TIME_FIELDS = {"run.json": ("created",), "summary.json": ("seconds_per_image",), "chunk-": ("seconds",)}


def run_until(args: list[str], cwd: Path, ready, rng: random.Random) -> bool:
    """Start `train.py args`, and once `ready()` holds, SIGKILL it after a random delay (0-50 ms).
    True when it was killed, False when it had already finished."""
    process = subprocess.Popen([sys.executable, TRAIN, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not ready():
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.05))
    if process.poll() is not None:
        assert process.returncode == 0, process.stderr.read()[-3000:]
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def run(args: list[str], cwd: Path) -> None:
    result = subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def comparable(path: Path) -> bytes:
    """The file's bytes; for JSON files that record times, the JSON without those fields."""
    fields = next((f for key, f in TIME_FIELDS.items() if path.name.startswith(key)), None)
    if fields is None:
        return path.read_bytes()
    data = json.loads(path.read_bytes())
    return json.dumps({k: v for k, v in data.items() if k not in fields}, sort_keys=True).encode()


def files(root: Path) -> dict[str, Path]:
    """Every file under `root` but the temporary files a killed write leaves (`.<name>.<pid>.tmp`,
    never read: no reader looks for such names) and the lock file (it names its run's process)."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")) and p.name != LOCK_NAME}


@pytest.mark.slow
def test_killed_sampling_run_resumes_to_the_same_bytes(tiny_checkpoint, tmp_path):  # noqa: F811
    args = ["sample", "--checkpoint", str(tiny_checkpoint), "--out", "out", "--n", "48", "--batch_size", "4",
            "--sampler.steps", "4", "--estimator.M", "2", "--filtering.drop_fraction", "0.25", "--progress", "false"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    run(args, straight)

    # the kill lands after a random number of the 12 chunks (1-6), so that half the run is still to come
    # however fast the machine is; and a random few milliseconds later, inside a chunk's writes
    records, rng = killed / "out" / "records", random.Random(0)
    chunks_before_kill = rng.randint(1, 6)
    was_killed = run_until(args, killed, lambda: records.is_dir()
                           and len(list(records.glob("chunk-*.json"))) >= chunks_before_kill, rng)
    assert was_killed and not (killed / "out" / "manifest.csv").exists(), "the run ended before the kill"
    # what a kill inside a write leaves (if this kill left none): a partial file under a temporary name
    (killed / "out" / "samples" / ".000047.png.4194999.tmp").write_bytes(b"\x89PNG")
    run(args, killed)  # the same command resumes, and clears the temporary files of the killed writes
    assert not list((killed / "out").rglob(".*.tmp"))

    expected, got = files(straight / "out"), files(killed / "out")
    assert got.keys() == expected.keys()
    for name, path in expected.items():
        assert comparable(got[name]) == comparable(path), name


FIT_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 80
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, save_top_k: -1, every_n_train_steps: 4}
model: {base_channels: 8, channel_mults: [1, 2], num_res_blocks: 1,
        attn_resolutions: [], dropout: 0.0, lr: 1.0e-3, warmup_steps: 5, sample_steps: 4}
data:
  class_path: uncdiff.lightning.data.DigitsDataModule
  init_args: {image_size: 8, batch_size: 16}
"""


@pytest.mark.slow
def test_killed_fit_leaves_loadable_checkpoints_and_resumes(tmp_path):
    (tmp_path / "fit.yaml").write_text(FIT_CONFIG)
    args = ["fit", "--config", "fit.yaml", "--trainer.default_root_dir", "run"]
    checkpoints = tmp_path / "run" / "checkpoints"
    # killed once a last.ckpt exists (before it, `--ckpt_path last` is refused: test_errors.py), a few
    # milliseconds later: perhaps inside the next checkpoint write
    was_killed = run_until(args, tmp_path, lambda: (checkpoints / "last.ckpt").is_file(), random.Random(1))
    assert was_killed, "the run ended before the kill"
    saved = sorted(checkpoints.glob("*.ckpt"))
    assert saved
    for path in saved:  # whole files: each loads, weights_only
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] < 80
    run([*args, "--ckpt_path", "last"], tmp_path)
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 80


class NaNAtStep(DiffusionModule):
    """The loss turns NaN at optimizer step `nan_step`."""

    nan_step = 3

    def diffusion_loss(self, net, x0):
        loss = super().diffusion_loss(net, x0)
        return loss * float("nan") if self.global_step == self.nan_step else loss


@pytest.mark.slow
def test_nan_loss_stops_fit_at_that_step_and_keeps_the_last_checkpoint(tmp_path):
    model = NaNAtStep(**tiny_model_kwargs())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=10, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, plugins=[SafeCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1,
                                                   every_n_train_steps=1)])
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss nan at global step 3\b"):
        trainer.fit(model, DigitsDataModule(image_size=8, batch_size=16))
    assert trainer.global_step == NaNAtStep.nan_step  # stopped before step 3's update
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == NaNAtStep.nan_step
    for name, value in last["state_dict"].items():
        assert torch.isfinite(value.float()).all(), name
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0, msg=name)  # what it stopped with
    # one checkpoint per good step, none after, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt",
                                                          "epoch=0-step=3.ckpt", "last.ckpt"]
