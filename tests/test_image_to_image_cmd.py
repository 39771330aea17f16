"""The image-to-image commands: `train.py restore` (a folder of condition images and masks, `sample`'s
resumable per-sample-seeded store) and `train.py evaluate_image_to_image` (the calibration study as a report), on a
tiny conditional model saved the way `fit` saves it."""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_model_kwargs
from test_image_to_image import save_checkpoint, tiny_conditional
from uncdiff.__main__ import main as uncdiff_main
from uncdiff.data.masks import box_mask
from uncdiff.data.degradations import Task
from uncdiff.io.images import from_uint8
from uncdiff.lightning.data import DigitsDataModule
from uncdiff.lightning.module import DiffusionModule
from uncdiff.lightning.loading import load_module
from uncdiff.uncertainty.bayesdiff import LastLayerLaplace, fit_last_layer_laplace

pytestmark = pytest.mark.slow  # trains image-to-image checkpoints, runs restore and evaluate_image_to_image

SIZE = 8


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An inpainting and a super-resolution checkpoint (8x8 digits), each in a run folder with the config
    `fit` saves next to it, and an unconditional one."""
    root = tmp_path_factory.mktemp("i2i")
    out = {}
    for task in ("inpaint", "super_resolve"):
        run = root / task
        (run / "checkpoints").mkdir(parents=True)
        out[task] = save_checkpoint(tiny_conditional(task, dropout=0.1), run / "checkpoints" / "last.ckpt")
        data = {"class_path": "uncdiff.lightning.image_to_image_data.ImageToImageDataModule",
                "init_args": {"task": task, "mask": "box",
                              "data": {"class_path": "uncdiff.lightning.data.DigitsDataModule",
                                       "init_args": {"image_size": SIZE, "batch_size": 16}}}}
        (run / "config-20250101-000000.yaml").write_text(yaml.safe_dump({"data": data}))
    out["plain"] = save_checkpoint(DiffusionModule(**tiny_model_kwargs()), root / "plain.ckpt")
    return out


@pytest.fixture
def folders(tmp_path):
    """Three 8x8 grey condition images and their box masks (white = generate)."""
    rng = np.random.default_rng(0)
    mask = (box_mask(SIZE)[0].numpy() * 255).astype(np.uint8)
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / "cond" / name, rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
        write_png(tmp_path / "masks" / name, mask)
    return tmp_path / "cond", tmp_path / "masks"


def restore(checkpoint, out, conditions, *extra, masks=None):
    args = ["restore", "--checkpoint", str(checkpoint), "--out", str(out), "--conditions", str(conditions),
            "--sampler.steps", "3", "--estimator.M", "2", "--progress", "false", "--fabric.accelerator", "cpu",
            "--fabric.devices", "1", *extra]
    uncdiff_main(args + (["--masks", str(masks)] if masks is not None else []))


def refused(call, match: str, capsys) -> None:
    """`call()` ends as uncdiff ends on a user's error: exit status 2 and one line on stderr matching `match`."""
    with pytest.raises(SystemExit) as error:
        call()
    err = capsys.readouterr().err
    assert error.value.code == 2 and re.search(match, err), err


def load_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path)).astype(np.float32))


def test_restore_keeps_the_known_pixels_and_writes_sample_s_store(checkpoints, folders, tmp_path):
    conditions, masks = folders
    out = tmp_path / "out"
    restore(checkpoints["inpaint"], out, conditions, "--seed", "10", "--batch_size", "2", masks=masks)
    rows = list(csv.DictReader(open(out / "inputs.csv")))
    assert [r["condition"] for r in rows] == [str(conditions.resolve() / n) for n in ("a.png", "b.png", "c.png")]
    assert [int(r["seed"]) for r in rows] == [10, 11, 12]
    box = box_mask(SIZE)[0] > 0.5
    for row in rows:
        output, given = load_png(out / row["image"]), load_png(Path(row["condition"]))
        assert torch.equal(output[~box], given[~box])  # known pixels exactly, through the PNGs
        seed = int(row["seed"])
        heat = np.load(out / "samples" / f"{seed:06d}_map.npy")
        assert (heat[:, ~box.numpy()] == 0).all() and (heat[:, box.numpy()] > 0).any()
    manifest = list(csv.DictReader(open(out / "manifest.csv")))
    scores = [float(r["score"]) for r in manifest]
    maps = [np.load(out / r["map"]).astype(np.float64).sum() for r in manifest]
    assert np.allclose(scores, maps, rtol=1e-5)  # the score is the map's sum over the generated pixels
    assert (out / "config.yaml").is_file() and (out / "grid.png").is_file()
    assert json.loads((out / "run.json").read_text())["settings"]["task"] == "inpaint"


def test_restore_outputs_depend_on_seeds_only_and_resume(checkpoints, folders, tmp_path):
    conditions, masks = folders
    one, three = tmp_path / "one", tmp_path / "three"
    restore(checkpoints["inpaint"], one, conditions, "--batch_size", "1", masks=masks)
    restore(checkpoints["inpaint"], three, conditions, "--batch_size", "3", masks=masks)
    for seed in range(3):
        name = f"samples/{seed:06d}.png"
        assert torch.equal(load_png(one / name), load_png(three / name))
    # an interrupted run: the second chunk's record and image are gone; the same command finishes it alike
    before = (one / "samples" / "000001.png").read_bytes()
    (one / "records" / "chunk-000001.json").unlink()
    (one / "samples" / "000001.png").unlink()
    untouched = (one / "samples" / "000000.png").stat().st_mtime_ns
    restore(checkpoints["inpaint"], one, conditions, "--batch_size", "1", masks=masks)
    assert (one / "samples" / "000001.png").read_bytes() == before
    assert (one / "samples" / "000000.png").stat().st_mtime_ns == untouched


def test_restore_refuses_another_run_s_folder_and_changed_inputs(checkpoints, folders, tmp_path, capsys):
    conditions, masks = folders
    out = tmp_path / "out"
    restore(checkpoints["inpaint"], out, conditions, masks=masks)
    refused(lambda: restore(checkpoints["inpaint"], out, conditions, "--seed", "5", masks=masks),
            "holds another run", capsys)
    write_png(conditions / "b.png", np.zeros((SIZE, SIZE), np.uint8))
    refused(lambda: restore(checkpoints["inpaint"], out, conditions, masks=masks), "conditions.pixels_sha256",
            capsys)


def test_restore_without_a_mask_for_super_resolution(checkpoints, folders, tmp_path):
    conditions, _ = folders
    out = tmp_path / "out"
    restore(checkpoints["super_resolve"], out, conditions, "--n", "2", "--estimator.name", "mc_dropout")
    assert sorted(p.name for p in (out / "samples").glob("*.png") if "_map" not in p.name) == \
        ["000000.png", "000001.png"]
    module = load_module(checkpoints["super_resolve"], image_to_image=True)
    pixels = torch.stack([load_png(conditions / n)[None] for n in ("a.png", "b.png")])
    expected = module.sample(pixels / 127.5 - 1, seeds=[0, 1], sampler={"steps": 3},
                             estimator={"name": "mc_dropout", "M": 2, "dropout": 0.1, "window": [0.0, 1.0]})
    got = np.stack([np.load(out / "samples" / f"{s:06d}_map.npy") for s in (0, 1)])
    assert np.allclose(got, expected.maps.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case, match", [
    ("size", "is 16x16; this model takes 8x8"),
    ("channels", "is a RGB image; this model takes L images"),
    ("no masks", "needs --masks"),
    ("mask name", "missing \\['c.png'\\]"),
    ("mask values", "values other than 0"),
    ("mask size", "is 4x4; the condition images are 8x8"),
    ("mask for super_resolve", "takes no mask"),
    ("unconditional", "is an unconditional model"),
    ("bayesdiff clip", "sampler.clip false"),
    ("bayesdiff images", "--bayesdiff.laplace_images must be >= 1"),
    ("bayesdiff no config", "fits its Laplace posterior on the run's training pairs: no training config"),
    ("n", "--n must lie in \\[1, 3\\]"),
])
def test_bad_input_is_an_error_before_anything_is_written(case, match, checkpoints, folders, tmp_path, capsys):
    conditions, masks = folders
    checkpoint, extra, give_masks = checkpoints["inpaint"], [], masks
    if case == "size":
        write_png(conditions / "b.png", np.zeros((16, 16), np.uint8))
    elif case == "channels":
        write_png(conditions / "b.png", np.zeros((SIZE, SIZE, 3), np.uint8))
    elif case == "no masks":
        give_masks = None
    elif case == "mask name":
        (masks / "c.png").rename(masks / "d.png")
    elif case == "mask values":
        write_png(masks / "a.png", np.full((SIZE, SIZE), 128, np.uint8))
    elif case == "mask size":
        write_png(masks / "a.png", np.zeros((4, 4), np.uint8))
    elif case == "mask for super_resolve":
        checkpoint = checkpoints["super_resolve"]
    elif case == "unconditional":
        checkpoint = checkpoints["plain"]
    elif case.startswith("bayesdiff"):
        extra = ["--estimator.name", "bayesdiff"]
        if case == "bayesdiff clip":
            extra += ["--sampler.clip", "true"]
        elif case == "bayesdiff images":
            extra += ["--bayesdiff.laplace_images", "0"]
        elif case == "bayesdiff no config":  # the checkpoint alone, without its run's config
            checkpoint = tmp_path / "alone" / "last.ckpt"
            checkpoint.parent.mkdir()
            checkpoint.write_bytes(checkpoints["inpaint"].read_bytes())
    elif case == "n":
        extra = ["--n", "4"]
    refused(lambda: restore(checkpoint, tmp_path / "out", conditions, *extra, masks=give_masks), match, capsys)
    assert not (tmp_path / "out").exists()


def test_restore_with_bayesdiff_fits_on_the_run_s_training_pairs_and_maps_only_generated_pixels(checkpoints, folders,
                                                                                              tmp_path):
    conditions, masks = folders
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(checkpoints["inpaint"].read_bytes())
    config = checkpoints["inpaint"].parent.parent / "config-20250101-000000.yaml"
    (run / config.name).write_bytes(config.read_bytes())
    out = tmp_path / "out"
    restore(checkpoint, out, conditions, "--estimator.name", "bayesdiff",
            "--bayesdiff.laplace_images", "12", "--estimator.draws", "2", "--estimator.skip", "1", masks=masks)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["laplace"] == {"source": "fit", "num_images": 12}
    assert settings["sampler"]["clip"] is False and settings["estimator"]["name"] == "bayesdiff"
    # the cached posterior is the fit on the first 12 training pairs the run's first epoch builds: the digits
    # training split's first images, each with the box mask and the noise of its key (seed 0, epoch 0 + 1, index)
    cached = LastLayerLaplace.from_state_dict(torch.load(checkpoint.with_name("last.ckpt.laplace-12.pt"))["laplace"])
    digits = DigitsDataModule(image_size=SIZE)
    digits.setup("fit")
    pixels = digits.train_set.tensors[0][:12]
    task = Task("inpaint", mask="box")
    condition = torch.stack([task(pixels[i], (0, 1, i))[0] for i in range(12)])
    module = load_module(checkpoint, image_to_image=True)
    expected = fit_last_layer_laplace(module.ema.ema_model, from_uint8(pixels), module.schedule, num_images=12,
                                      conditions=condition)
    torch.testing.assert_close(cached.var_W, expected.var_W)
    torch.testing.assert_close(cached.var_b, expected.var_b)
    box = box_mask(SIZE)[0].numpy() > 0.5
    for seed in range(3):
        heat = np.load(out / "samples" / f"{seed:06d}_map.npy")
        assert (heat[:, ~box] == 0).all() and (heat[:, box] > 0).all()  # a variance: positive where generated
        output, given = load_png(out / "samples" / f"{seed:06d}.png"), load_png(conditions / f"{'abc'[seed]}.png")
        assert torch.equal(output[~torch.from_numpy(box)], given[~torch.from_numpy(box)])
    # the same command again reads the cached posterior and finds the run complete
    restore(checkpoint, out, conditions, "--estimator.name", "bayesdiff",
            "--bayesdiff.laplace_images", "12", "--estimator.draws", "2", "--estimator.skip", "1", masks=masks)


def test_plain_sample_refuses_an_image_to_image_checkpoint_naming_restore(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    refused(lambda: uncdiff_main(["sample", "--checkpoint", str(checkpoints["inpaint"]), "--out", str(out)]),
            "use `restore`", capsys)
    assert not (tmp_path / "out").exists()


def test_evaluate_image_to_image_writes_the_report_with_every_row(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    uncdiff_main(["evaluate_image_to_image", "--checkpoint", str(checkpoints["inpaint"]), "--out", str(out), "--n", "4",
                  "--seed_groups", "2", "--estimator.M", "2", "--sampler.steps", "3", "--examples", "2",
                  "--fid.extractor", "none", "--progress", "false", "--fabric.accelerator", "cpu",
                  "--bayesdiff.laplace_images", "16", "--estimator.draws", "2", "--estimator.skip", "1",
                  "--intervals.splits", "0"])  # 4 images can't calibrate intervals (tests/test_intervals_cmd.py)
    report = (out / "report.md").read_text()
    for row in ("aleatoric", "MC-Dropout", "BayesDiff", "K-sample variance", "random", "oracle", "diversity_ssim",
                "psnr"):
        assert f"| {row} |" in report
    assert "Laplace posterior from the first 16 training pairs" in report and "## Guidance" not in report
    rows = list(csv.DictReader(open(out / "calibration.csv")))
    oracle = next(r for r in rows if r["name"] == "oracle" and r["metric"] == "ause")
    assert abs(float(oracle["mean"])) < 1e-9  # the error ranks itself perfectly
    record = json.loads((out / "study.json").read_text())
    assert record["samples"] == 2 and record["seed_groups"] == [0, 1]  # K = M, besides the output
    assert record["laplace"] == {"source": "fit", "num_images": 16} and record["guidance_study"] is None
    assert checkpoints["inpaint"].with_name("last.ckpt.laplace-16.pt").is_file()
    bayesdiff = [float(r["mean"]) for r in rows if r["name"] == "BayesDiff"]
    assert len(bayesdiff) == 2 and all(math.isfinite(v) for v in bayesdiff)
    assert (out / "panels.png").is_file() and (out / "config.yaml").is_file()
    refused(lambda: uncdiff_main(["evaluate_image_to_image", "--checkpoint", str(checkpoints["inpaint"]), "--out", str(out)]),
            "not an empty folder", capsys)  # never overwritten


def test_evaluate_image_to_image_compares_guided_with_unguided_outputs_of_the_same_seeds(checkpoints, tmp_path):
    out = tmp_path / "eval"
    uncdiff_main(["evaluate_image_to_image", "--checkpoint", str(checkpoints["super_resolve"]), "--out", str(out), "--n", "4",
                  "--seed_groups", "2", "--estimator.M", "2", "--sampler.steps", "3", "--examples", "0",
                  "--estimators", "[aleatoric]", "--guidance.rule", "gradient", "--guidance.lam", "0.5",
                  "--fid.extractor", "none", "--progress", "false", "--fabric.accelerator", "cpu",
                  "--intervals.splits", "0"])
    report = (out / "report.md").read_text()
    assert "## Guidance" in report and "| gradient, sign +1, lam 0.5 | psnr (higher is better) |" in report
    rows = list(csv.DictReader(open(out / "guidance.csv")))
    assert [r["metric"] for r in rows] == ["l1", "psnr"]
    record = json.loads((out / "study.json").read_text())
    # the unguided outputs are the calibration study's outputs: the same L1 over the groups
    l1 = next(r for r in rows if r["metric"] == "l1")
    unguided = [float(v) for v in l1["unguided_per_group"].split()]
    assert sum(unguided) / 2 == pytest.approx(record["study"]["quality"]["l1"][0], rel=1e-5)
    for row in rows:
        difference = [float(g) - float(u) for g, u in zip(row["guided_per_group"].split(),
                                                         row["unguided_per_group"].split())]
        assert float(row["difference_mean"]) == pytest.approx(sum(difference) / 2, abs=1e-5)  # CSV: 6 digits


@pytest.mark.parametrize("case, match", [
    ("unconditional", "is an unconditional model"),
    ("samples", "--samples must be >= 2"),
    ("bayesdiff ddpm", "needs --sampler.name ddim with --sampler.eta 0"),
    ("bayesdiff images", "--bayesdiff.laplace_images must be >= 1"),
    ("guidance table", "threshold tables are calibrated on unconditional models"),
    ("guidance lam", "lam"),
    ("n", "the validation split holds"),
    ("config", "not an image-to-image data module"),
])
def test_evaluate_image_to_image_bad_input_is_an_error_before_the_folder_is_made(case, match, checkpoints, tmp_path, capsys):
    checkpoint, extra = checkpoints["inpaint"], []
    if case == "unconditional":
        checkpoint = checkpoints["plain"]
    elif case == "samples":
        extra = ["--samples", "1"]
    elif case == "bayesdiff ddpm":
        extra = ["--sampler.name", "ddpm"]
    elif case == "bayesdiff images":
        extra = ["--bayesdiff.laplace_images", "0"]
    elif case == "guidance table":
        extra = ["--guidance.rule", "gradient", "--guidance_table", str(tmp_path / "table.pt")]
    elif case == "guidance lam":
        extra = ["--guidance.rule", "gradient", "--guidance.lam", "-1"]
    elif case == "n":
        extra = ["--n", "100000"]
    elif case == "config":
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"data": {"class_path": "uncdiff.lightning.data.DigitsDataModule"}}))
        extra = ["--data.run_config", str(config)]
    refused(lambda: uncdiff_main(["evaluate_image_to_image", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"),
                                  *extra]), match, capsys)
    assert not (tmp_path / "eval").exists()
