"""Guaranteed intervals through the commands (docs/algorithms.md §8) on tiny inpainting checkpoints:
evaluate_image_to_image's interval study, calibrate_intervals then restore --intervals, and bad settings
or mismatched calibration files refused before anything is sampled or written.

Truths: lam_hat is checked against the definition (its empirical risk passes the Hoeffding-Bentkus
test at alpha, the grid's next smaller lam fails), recomputed from restorations drawn here and the
explicit intervals; restore's width map is 2 lam_hat sqrt(map) of the map it writes beside it."""

import csv
import json

import numpy as np
import pytest
import torch

from test_image_to_image_cmd import checkpoints, folders, refused  # noqa: F401 (the module's fixtures)
from uncdiff.__main__ import main as uncdiff_main
from uncdiff.lightning.image_to_image import restorer
from uncdiff.lightning.loading import image_to_image_data, load_module
from uncdiff.uncertainty.intervals import DEFAULT_GRID, hb_p_value, image_losses, interval, spread_seeds
from uncdiff.uncertainty.spec import EstimatorSpec, SamplerSpec

pytestmark = pytest.mark.slow  # saves tiny image-to-image checkpoints and samples with them


def evaluate(checkpoint, out, *extra):
    uncdiff_main(["evaluate_image_to_image", "--checkpoint", str(checkpoint), "--out", str(out), "--n", "46",
                  "--seed_groups", "1", "--estimator.M", "2", "--sampler.steps", "2", "--examples", "0",
                  "--estimators", "[aleatoric]", "--fid.extractor", "none", "--progress", "false",
                  "--fabric.accelerator", "cpu", *extra])


def test_evaluate_image_to_image_reports_every_heuristic_at_the_same_alpha_and_delta(checkpoints, tmp_path):
    out = tmp_path / "eval"
    evaluate(checkpoints["inpaint"], out, "--samples", "4", "--intervals.splits", "5")
    rows = {r["heuristic"]: r for r in csv.DictReader(open(out / "intervals.csv"))}
    assert set(rows) == {"K = 2 samples, std", "K = 4 samples, std", "K = 4 samples, quartiles", "aleatoric",
                         "constant"}
    steps = 2
    assert float(rows["constant"]["nfe_per_image"]) == steps  # the output alone
    assert float(rows["K = 4 samples, std"]["nfe_per_image"]) == 5 * steps  # the output and 4 more restorations
    assert float(rows["aleatoric"]["nfe_per_image"]) == 3 * steps  # M = 2 perturbations on every step
    record = json.loads((out / "study.json").read_text())
    assert record["intervals"] == {"alpha": 0.1, "delta": 0.1, "splits": 5, "calibration_images": 23,
                                   "spread_sizes": [2, 4]}
    assert "## Guaranteed intervals" in (out / "report.md").read_text()
    for row in rows.values():
        if row["failed_splits"] != "5":
            assert 0 <= float(row["violation_fraction"]) <= 1 and float(row["width_mean"]) >= 0


@pytest.mark.parametrize("extra, match", [
    (["--intervals.alpha", "1.5"], "--intervals.alpha must lie strictly between 0 and 1"),
    (["--intervals.delta", "0"], "--intervals.delta must lie strictly between 0 and 1"),
    (["--intervals.calibration_images", "10"], "use at least 22"),
    (["--intervals.calibration_images", "46"], "leaves no test image"),
    (["--intervals.spread_sizes", "[8]"], "each K must lie in"),
])
def test_evaluate_image_to_image_refuses_bad_interval_settings_before_sampling(extra, match, checkpoints, tmp_path,
                                                                                capsys):
    refused(lambda: evaluate(checkpoints["inpaint"], tmp_path / "eval", *extra), match, capsys)
    assert not (tmp_path / "eval").exists()


def calibrate(checkpoint, out, *extra):
    uncdiff_main(["calibrate_intervals", "--checkpoint", str(checkpoint), "--out", str(out), "--n", "30",
                  "--sampler.steps", "2", "--progress", "false", "--fabric.accelerator", "cpu", *extra])


def test_calibrate_intervals_finds_the_smallest_lambda_that_passes(checkpoints, tmp_path, capsys):
    out = tmp_path / "samples.json"
    # the tiny model's samples often agree at a clipped extreme where the truth doesn't: alpha 0.3 can pass
    calibrate(checkpoints["inpaint"], out, "--heuristic.K", "3", "--seed", "5", "--alpha", "0.3")
    record = json.loads(out.read_text())
    assert record["heuristic"] == {"name": "samples", "K": 3, "spread": "std"} and record["n"] == 30
    assert record["task"] == "inpaint" and (record["alpha"], record["delta"]) == (0.3, 0.1)
    assert (tmp_path / "samples.json.config.yaml").is_file()
    # the same 30 pairs and seeds restored here; the spread of 3 more restorations with other seeds
    module = load_module(checkpoints["inpaint"], image_to_image=True)
    data, _ = image_to_image_data(module, checkpoints["inpaint"])
    data.prepare_data()
    data.setup("fit")
    x0, condition, mask = data.held_out(30)
    restore = restorer(module, sampler=SamplerSpec(**record["sampler"]))
    seeds = list(range(5, 35))
    output = restore(condition, mask, seeds, None).images
    samples = torch.stack([restore(condition, mask, spread_seeds(seeds, k), None).images for k in (1, 2, 3)])
    std = samples.double().std(0)
    risk = lambda lam: float(image_losses(x0.double(), *interval(output.double(), std, std, lam), mask).mean())
    lam = record["lambda_hat"]
    passes = lambda lam: hb_p_value(risk(lam), 30, 0.3) <= 0.1
    assert passes(lam) and record["risk"] == pytest.approx(risk(lam))
    below = DEFAULT_GRID[np.searchsorted(DEFAULT_GRID, lam) - 1]
    assert lam == DEFAULT_GRID[0] or not passes(below)
    written = out.read_bytes()
    refused(lambda: calibrate(checkpoints["inpaint"], out), "exists; calibrate_intervals never overwrites it", capsys)
    assert out.read_bytes() == written


def test_restore_writes_the_calibrated_interval_maps(checkpoints, folders, tmp_path):
    conditions, masks = folders
    calibration = tmp_path / "aleatoric.json"
    calibrate(checkpoints["inpaint"], calibration, "--heuristic.name", "aleatoric", "--estimator.M", "2")
    lam = json.loads(calibration.read_text())["lambda_hat"]
    out = tmp_path / "restored"
    uncdiff_main(["restore", "--checkpoint", str(checkpoints["inpaint"]), "--out", str(out), "--conditions",
                  str(conditions), "--masks", str(masks), "--sampler.steps", "2", "--estimator.M", "2",
                  "--progress", "false", "--fabric.accelerator", "cpu", "--fabric.devices", "1",
                  "--intervals", str(calibration)])
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 3 and all(r["width"] for r in rows)
    for row in rows:
        lower, upper, width = (np.load(out / row[key]) for key in ("lower", "upper", "width"))
        heat = np.load(out / row["map"])
        assert np.allclose(width, upper - lower, atol=1e-6) and lower.min() >= -1 and upper.max() <= 1
        inside = (lower > -1) & (upper < 1)  # not cut to the images' range
        assert inside.any() and np.allclose(width[inside], (2 * lam * np.sqrt(heat))[inside], atol=1e-5)
        assert (width <= 2 * lam * np.sqrt(heat) + 1e-5).all()
        assert (width[:, heat[0] == 0] == 0).all()  # known pixels: no interval to speak of


@pytest.mark.parametrize("case, match", [
    ("checkpoint", "was made for another checkpoint"),
    ("task", "was made for another task"),
    ("heuristic", "was made for another heuristic"),
    ("sampler", "was made for another sampler"),
    ("bayesdiff", "BayesDiff's are its own"),
    ("damaged", "is damaged"),
])
def test_restore_refuses_a_calibration_made_for_another_run(case, match, checkpoints, folders, tmp_path, capsys):
    conditions, masks = folders
    calibration = tmp_path / "calibration.json"
    heuristic = ["aleatoric", "--estimator.M", "2"] if case in ("heuristic", "sampler") else ["constant"]
    calibrate(checkpoints["inpaint"], calibration, "--heuristic.name", *heuristic)
    record = json.loads(calibration.read_text())
    checkpoint, extra = checkpoints["inpaint"], []
    if case == "checkpoint":
        checkpoint = checkpoints["super_resolve"]
    elif case == "task":
        calibration.write_text(json.dumps({**record, "task": "uncrop"}))
    elif case == "heuristic":
        extra = ["--estimator.name", "mc_dropout"]
    elif case == "sampler":
        extra = ["--sampler.steps", "3"]
    elif case == "bayesdiff":
        extra = ["--estimator.name", "bayesdiff"]
    elif case == "damaged":
        calibration.write_text(json.dumps({**record, "lambda_hat": -1}))
    out = tmp_path / "restored"
    args = ["restore", "--checkpoint", str(checkpoint), "--out", str(out), "--conditions", str(conditions),
            "--sampler.steps", "2", "--estimator.M", "2", "--progress", "false", "--fabric.accelerator", "cpu",
            "--intervals", str(calibration), *extra]
    args += [] if case == "checkpoint" else ["--masks", str(masks)]
    refused(lambda: uncdiff_main(args), match, capsys)
    assert not out.exists()


@pytest.mark.parametrize("extra, match", [
    (["--alpha", "0"], "--alpha must lie strictly between 0 and 1"),
    (["--delta", "1"], "--delta must lie strictly between 0 and 1"),
    (["--n", "21"], "use at least 22"),
    (["--heuristic.K", "1"], "--heuristic.K must lie in"),
    (["--heuristic.spread", "quartiles", "--heuristic.K", "3"], "--heuristic.K must lie in"),
])
def test_calibrate_intervals_refuses_bad_settings_before_sampling(extra, match, checkpoints, tmp_path, capsys):
    out = tmp_path / "calibration.json"
    refused(lambda: calibrate(checkpoints["inpaint"], out, *extra), match, capsys)
    assert not out.exists() and not (tmp_path / "calibration.json.config.yaml").exists()


def test_calibrate_intervals_too_big_for_the_disk_is_refused_before_sampling(checkpoints, tmp_path, capsys,
                                                                              monkeypatch):
    import shutil

    from test_space import disk_with

    monkeypatch.setattr(shutil, "disk_usage", disk_with(1024))
    monkeypatch.setattr("uncdiff.commands.calibrate_intervals.restore_with_heuristic",
                        lambda *a, **k: pytest.fail("sampled"))
    out = tmp_path / "calibration.json"
    with pytest.raises(SystemExit) as error:
        calibrate(checkpoints["inpaint"], out)
    err = capsys.readouterr().err.strip().splitlines()
    assert error.value.code == 1 and len(err) == 1 and "this run writes about" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
