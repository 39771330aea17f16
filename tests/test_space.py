"""Free space before work: a run whose outputs don't fit its disk is refused in one line (the
estimate, the free space, the folder), exit status 1, before any sampling or training and with
nothing written; and the estimates bound what a tiny run really writes."""

import os
import shutil
import sys
from collections import namedtuple
from pathlib import Path
from unittest import mock

import pytest
import torch

from test_errors import FIT_CONFIG, run_main
from test_image_to_image_cmd import checkpoints  # noqa: F401 (fixture)
from tiny_checkpoint import tiny_checkpoint  # noqa: F401 (fixture)
from uncdiff.__main__ import main
from uncdiff.io import space

Usage = namedtuple("Usage", "total used free")


def disk_with(free: int):
    """A `shutil.disk_usage` whose every filesystem has `free` bytes free."""
    return lambda path: Usage(10 * 2**30, 10 * 2**30 - free, free)


def on_disk(root: Path) -> int:
    """What the files under `root` take on their filesystem (their allocated blocks, as `du` counts)."""
    return sum(p.stat().st_blocks * 512 for p in Path(root).rglob("*") if p.is_file())


def estimated(monkeypatch, module_name: str) -> list:
    """Record what the command module `module_name` passes to `check_free_space`, in bytes on disk."""
    import importlib

    module = importlib.import_module(module_name)
    seen = []

    def check(folder, sizes, *args):
        sizes = list(sizes)
        seen.append(space.on_disk(sizes, space.block_size(folder)))
        return space.check_free_space(folder, sizes, *args)

    monkeypatch.setattr(module, "check_free_space", check)
    return seen


def test_estimates_round_each_file_up_to_its_block_and_name_the_sizes(tmp_path, monkeypatch):
    assert space.on_disk([1, 4096, 4097, 0], 4096) == 4096 + 4096 + 8192
    monkeypatch.setattr(shutil, "disk_usage", disk_with(5 * 2**20))
    space.check_free_space(tmp_path / "new" / "folder", [2**20] * 4)  # a folder still to make: its parent's disk
    with pytest.raises(space.NotEnoughSpace, match=rf"--out {tmp_path / 'x'}: this run writes about 6.0 MiB and "
                                                   rf"{tmp_path}'s filesystem has 5.0 MiB free"):
        space.check_free_space(tmp_path / "x", [2**20] * 6)


def test_png_bound_holds_for_incompressible_images():
    """A PNG of random pixels can't be compressed: the bound must still hold."""
    from io import BytesIO

    from PIL import Image

    for h, w, c in ((8, 8, 1), (32, 32, 3), (300, 200, 3)):
        pixels = torch.randint(0, 256, (h, w, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        buffer = BytesIO()
        Image.fromarray(pixels.squeeze(-1).numpy()).save(buffer, format="PNG")
        assert len(buffer.getvalue()) <= space.png_bytes(h, w, c)


def test_kept_checkpoints_counts_last_top_k_and_every_snapshot():
    from lightning.pytorch.callbacks import ModelCheckpoint

    last = ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=2000)
    snapshots = ModelCheckpoint(filename="{step}", save_top_k=-1, every_n_train_steps=500)
    best = ModelCheckpoint(monitor="val/fid", save_top_k=2)
    assert space.kept_checkpoints([last, snapshots, best], max_steps=2000) == 1 + 4 + 2
    assert space.kept_checkpoints([snapshots], max_steps=-1) == 1  # unknown length: at least one


@pytest.mark.slow
def test_sample_calibrate_evaluate_and_restore_too_big_for_the_disk_are_refused_before_sampling(
        tiny_checkpoint, tmp_path, monkeypatch, capsys):  # noqa: F811
    from test_lock import super_resolution_inputs

    sr_checkpoint, conditions = super_resolution_inputs(tmp_path / "inputs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", disk_with(4096))
    sampled = mock.Mock(side_effect=AssertionError("sampled"))
    for command in ("sample", "evaluate", "restore"):
        monkeypatch.setattr(f"uncdiff.commands.{command}.generate_run", sampled)
    monkeypatch.setattr("uncdiff.commands.calibrate.calibrate_table_and_reference", sampled)
    common = ["--n", "20", "--batch_size", "10", "--sampler.steps", "2", "--estimator.M", "2", "--progress", "false"]
    for argv, out in (
            (["sample", "--checkpoint", str(tiny_checkpoint), *common, "--out", "samples"], "samples"),
            (["calibrate", "--checkpoint", str(tiny_checkpoint), *common, "--out", "tables/tau.pt"], "tables/tau.pt"),
            (["evaluate", "--checkpoint", str(tiny_checkpoint), *common, "--experiments", "cost", "--out", "eval"],
             "eval"),
            (["restore", "--checkpoint", str(sr_checkpoint), "--conditions", str(conditions), "--estimator.name",
              "none", "--sampler.steps", "2", "--progress", "false", "--out", "restored"], "restored")):
        status, errors = run_main(argv, capsys)
        assert status == 1 and len(errors) == 1, errors
        assert f"--out {out}: this run writes about" in errors[0] and "4.0 KiB free" in errors[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # nothing made, not even a folder or lock


def test_fit_too_big_for_its_disk_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fit.yaml").write_text(FIT_CONFIG)
    monkeypatch.setattr(shutil, "disk_usage", disk_with(2**20))
    status, errors = run_main(["fit", "--config", "fit.yaml", "--trainer.default_root_dir", "run"], capsys)
    assert status == 1 and len(errors) == 1, errors
    assert "--trainer.default_root_dir run: this run writes about" in errors[0] and "1.0 MiB free" in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_estimates_bound_what_a_tiny_run_writes(tiny_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    """Each estimate is at least what the run's files take on disk, and not much more. At 8x8 every
    per-sample file (image, map, heatmap) and every chunk record takes one block, as estimated; the
    grids are counted at their raw pixels (the 4x-upscaled grid compresses far below that), dropped.png
    as large as grid.png (every score NaN: every sample dropped); the text
    files (run.json, config.yaml, summary.json, the manifest) are bounded at their longest values,
    a block or two each: 25 % over what was written, once the grids are counted raw, covers them."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    common = ["--checkpoint", str(tiny_checkpoint), "--n", "12", "--batch_size", "4", "--sampler.steps", "3",
              "--estimator.M", "2", "--progress", "false"]
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        sample = estimated(monkeypatch, "uncdiff.commands.sample")
        main(["sample", *common, "--out", "samples"])
        calibrate = estimated(monkeypatch, "uncdiff.commands.calibrate")
        main(["calibrate", *common, "--quantile", "0.5", "--out", "tables/tau.pt"])
    written, block = on_disk(tmp_path / "samples"), space.block_size(tmp_path)
    # grid.png's raw pixels, twice: dropped.png holds as many samples when every score is NaN
    width, height = Image.open(tmp_path / "samples" / "grid.png").size
    raw_grids = 2 * space.on_disk([height * (1 + 3 * width)], block) - sum(
        on_disk_file(tmp_path / "samples" / name) for name in ("grid.png", "dropped.png"))
    assert written <= sample[0] <= 1.25 * (written + raw_grids), (sample, written, raw_grids)
    # three files of a few KB: a block each, the table's and the reference's settings may take a second
    written = on_disk(tmp_path / "tables")
    assert written <= calibrate[0] <= 1.5 * written, (calibrate, written)

    # fit's checkpoint: weights, EMA copy and Adam's moments, against the tiny run's last.ckpt
    from uncdiff.lightning.module import DiffusionModule

    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    estimate, size = space.checkpoint_bytes(DiffusionModule(**checkpoint["hyper_parameters"])), tiny_checkpoint.stat().st_size
    assert size <= estimate <= 1.5 * size, (estimate, size)


def on_disk_file(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_evaluate_image_to_image_too_big_for_the_disk_is_refused_before_sampling(checkpoints, tmp_path,  # noqa: F811
                                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", disk_with(4096))
    monkeypatch.setattr("uncdiff.commands.evaluate_image_to_image.run_study",
                        mock.Mock(side_effect=AssertionError("sampled")))
    status, errors = run_main(["evaluate_image_to_image", "--checkpoint", str(checkpoints["inpaint"]), "--out", "eval",
                               "--n", "4", "--estimator.M", "2", "--sampler.steps", "2", "--fid.extractor", "none",
                               "--progress", "false", "--intervals.splits", "0"], capsys)
    assert status == 1 and len(errors) == 1, errors
    assert "--out eval: this run writes about" in errors[0] and "4.0 KiB free" in errors[0]
    assert list(tmp_path.iterdir()) == []
