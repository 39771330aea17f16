"""Guaranteed intervals through the commands (docs/algorithms.md §8): evaluate_image_to_image's interval
study on a tiny inpainting checkpoint; bad settings refused before anything is sampled or written."""

import csv
import json

import pytest

from test_image_to_image_cmd import checkpoints, refused  # noqa: F401 (the module's fixture)
from uncdiff.__main__ import main as uncdiff_main

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
