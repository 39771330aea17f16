"""Detection metrics (uncdiff/evaluation/detection.py, docs/algorithms.md §6c) against independent truths:
scikit-learn's AUROC and average precision, scipy's exact binomial test, cases counted by hand, and the
power formula checked by simulating the test it describes."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import average_precision_score, roc_auc_score

from uncdiff.evaluation.detection import (auprc, auroc, bootstrap_interval, detectable_auroc, detectable_difference,
                                          detection_row, detection_rows, mcnemar, random_scores, retention)


def labelled(n=300, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    invalid = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 0.8 * invalid
    return (np.round(scores, 1) if ties else scores), invalid


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_auprc_equal_scikit_learns(ties):
    scores, invalid = labelled(ties=ties)
    assert auroc(scores, invalid) == pytest.approx(roc_auc_score(invalid, scores), abs=1e-12)
    assert auprc(scores, invalid) == pytest.approx(average_precision_score(invalid, scores), abs=1e-12)
    assert auroc(torch.tensor(scores), torch.tensor(invalid)) == pytest.approx(roc_auc_score(invalid, scores))


def test_hand_built_cases():
    invalid = [False, False, True, True]
    assert auroc([0.1, 0.2, 0.8, 0.9], invalid) == 1.0 and auprc([0.1, 0.2, 0.8, 0.9], invalid) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], invalid) == 0.0
    assert auroc([1, 1, 1, 1], invalid) == 0.5  # all tied: one half
    # ranked invalid, valid, invalid, valid from the top: precision 1 at recall 1/2, 2/3 at recall 1
    assert auprc([4, 3, 2, 1], [True, False, True, False]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert math.isnan(auroc([1, 2], [True, True])) and math.isnan(auprc([1, 2], [False, False]))
    with pytest.raises(ValueError, match="one length"):
        auroc([1, 2, 3], [True, False])


def test_retention_keeps_the_lowest_scores():
    # ten samples, scores 0..9; the invalid ones are 7, 8, 9 and 2
    scores = np.arange(10.0)
    invalid = np.isin(np.arange(10), [2, 7, 8, 9])
    assert retention(scores, invalid, 0.9) == (0.25, 1.0)  # drops 9: one of four invalid, every valid kept
    assert retention(scores, invalid, 0.7) == (0.75, 1.0)  # drops 7, 8, 9
    assert retention(scores, invalid, 0.5) == (0.75, 4 / 6)  # drops 5..9: valid 5 and 6 go too


def test_the_bootstrap_interval_covers_the_estimate_and_is_seeded():
    scores, invalid = labelled(n=400)
    low, high = bootstrap_interval(auroc, scores, invalid, seed=3)
    assert low < auroc(scores, invalid) < high and high - low < 0.2
    assert bootstrap_interval(auroc, scores, invalid, seed=3) == (low, high)
    assert bootstrap_interval(auroc, scores, invalid, seed=4) != (low, high)
    # the textbook standard error of AUROC (Hanley & McNeil 1982) gives about the same width
    a, n1, n0 = auroc(scores, invalid), invalid.sum(), (~invalid).sum()
    q1, q2 = a / (2 - a), 2 * a**2 / (1 + a)
    se = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a**2) + (n0 - 1) * (q2 - a**2)) / (n1 * n0))
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.25)
    with pytest.raises(ValueError, match="resamples must be >= 1000"):
        bootstrap_interval(auroc, scores, invalid, resamples=100)


def test_a_random_score_detects_nothing():
    invalid = np.random.default_rng(1).random(4000) < 0.25
    row = detection_row(random_scores(4000, seed=2), invalid)
    assert row["n"] == 4000 and row["invalid"] == invalid.sum()
    assert row["auroc_low"] < 0.5 < row["auroc_high"]
    assert row["auprc_low"] < invalid.mean() < row["auprc_high"]
    assert row["removed_at_90"] == pytest.approx(0.1, abs=0.03) and row["kept_at_95"] == pytest.approx(0.95, abs=0.02)
    assert torch.equal(random_scores(5, seed=2), random_scores(5, seed=2))


@pytest.mark.parametrize("b, c, same", [(0, 0, 10), (3, 9, 40), (12, 2, 0), (30, 52, 918), (5, 5, 1)])
def test_mcnemar_is_scipys_exact_binomial_test_on_the_discordant_pairs(b, c, same):
    first = [True] * b + [False] * c + [True] * (same // 2) + [False] * (same - same // 2)
    second = [False] * b + [True] * c + [True] * (same // 2) + [False] * (same - same // 2)
    result = mcnemar(first, second)
    assert (result.n, result.only_first, result.only_second) == (b + c + same, b, c)
    assert result.rate_first - result.rate_second == pytest.approx((b - c) / (b + c + same))
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-12)


def test_the_detectable_difference_has_the_stated_power():
    """Simulate the exact test at the difference the formula gives: it rejects about 80% of the time."""
    n, psi = 2000, 0.1
    delta = detectable_difference(n, psi)
    assert 0 < delta < psi
    # the closed form without the delta^2 term bounds it from above
    assert delta < (1.959964 + 0.841621) * math.sqrt(psi / n)
    rng = np.random.default_rng(0)
    p10, p01 = (psi + delta) / 2, (psi - delta) / 2
    rejected = 0
    for _ in range(400):
        kind = rng.choice(3, size=n, p=[p10, p01, 1 - psi])
        b, c = int((kind == 0).sum()), int((kind == 1).sum())
        rejected += binomtest(b, b + c, 0.5).pvalue < 0.05
    assert rejected / 400 == pytest.approx(0.8, abs=0.07)
    assert math.isnan(detectable_difference(n, 0.0))


def test_the_detectable_auroc_has_the_stated_power():
    """Simulate scores whose AUROC is 1/2 + the formula's distance (normal scores, the invalid ones
    shifted): the test of AUROC = 1/2 against its bootstrap-free null spread rejects about 80 % of the
    time; the null spread itself is that of random scores' AUROC."""
    n1, n0 = 250, 750
    delta = detectable_auroc(n1, n0)
    null_sd = math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
    assert delta == pytest.approx((1.959964 + 0.841621) * null_sd, rel=1e-6)
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(n1, bool), np.zeros(n0, bool)]
    null = [auroc(rng.random(n1 + n0), labels) for _ in range(400)]
    assert np.std(null) == pytest.approx(null_sd, rel=0.1)
    shift = math.sqrt(2) * NormalDist().inv_cdf(0.5 + delta)  # P(X1 > X0) = 1/2 + delta for unit normals
    rejected = sum(abs(auroc(np.r_[rng.normal(shift, 1, n1), rng.normal(0, 1, n0)], labels) - 0.5)
                   > 1.959964 * null_sd for _ in range(400))
    assert rejected / 400 == pytest.approx(0.8, abs=0.07)
    assert math.isnan(detectable_auroc(0, 10))


def test_the_table_has_a_row_per_estimator_then_random():
    invalid = np.random.default_rng(3).random(300) < 0.4
    perfect = invalid.astype(float)
    rows = detection_rows({"perfect": (perfect, invalid)}, {"perfect": {"nfe_per_image": 20, "seconds_per_image": 0.5}})
    assert [r["estimator"] for r in rows] == ["perfect", "random"]
    assert rows[0]["auroc"] == rows[0]["auroc_low"] == 1.0 and rows[0]["nfe_per_image"] == 20
    assert rows[0]["removed_at_90"] == pytest.approx(30 / invalid.sum())  # the 30 dropped are all invalid
    assert rows[1]["invalid"] == invalid.sum() and rows[1]["nfe_per_image"] is None


# ------------------------------------------------------------------------ evaluate --experiments detection

TINY_SHAPES_FIT = ["--model.base_channels", "8", "--model.channel_mults", "[1,2]", "--model.attn_resolutions", "[]",
                   "--model.sample_steps", "10", "--data.init_args.train_size", "64", "--data.init_args.val_size",
                   "16", "--data.init_args.batch_size", "16", "--trainer.max_steps", "3", "--trainer.limit_val_batches",
                   "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                   "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory):
    """A 3-step shapes model, trained through the CLI as a user would."""
    import sys
    from unittest import mock

    from uncdiff.lightning.cli import main as cli_main

    run = tmp_path_factory.mktemp("runs") / "shapes"
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli_main(["fit", "--config", "shapes.yaml", "--trainer.default_root_dir", str(run), *TINY_SHAPES_FIT])
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.slow  # trains a 3-step shapes model, then samples nine sets
def test_evaluate_detection_on_a_tiny_shapes_model(tmp_path, shapes_checkpoint):
    import csv

    from uncdiff.commands.evaluate import main as evaluate
    from uncdiff.data.shapes import invalid_mask
    from PIL import Image

    out = tmp_path / "eval"
    # the shapes testbed has no FID features: the checker judges the guidance sweep's sets too
    evaluate(["--checkpoint", str(shapes_checkpoint), "--out", str(out), "--experiments", "detection",
              "sweep", "--sweep.lams", "[1.0]", "--sweep.grad_wrt", "[eps]", "--sweep.prior_precisions", "[]",
              "--sweep.seed_groups", "2", "--n", "8", "--batch_size", "8", "--sampler.steps", "10", "--estimator.M", "2", "--estimator.draws", "2",
              "--bayesdiff.laplace_images", "16", "--fabric.accelerator", "cpu", "--progress", "false"])
    with open(out / "detection.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = ["aleatoric", "mc_dropout", "bayesdiff", "x0_trajectory", "generative", "random"]
    assert [r["estimator"] for r in rows] == names
    # the labels are the checker's verdicts on each set's images; the AUROC is scikit-learn's on the set's scores
    for r in rows[:-1]:
        with open(out / "sets" / r["estimator"] / "manifest.csv", newline="") as f:
            manifest = list(csv.DictReader(f))
        images = torch.stack([torch.from_numpy(np.array(Image.open(out / "sets" / r["estimator"] / m["image"])))
                              for m in manifest])
        invalid = invalid_mask(images)
        assert int(r["invalid"]) == int(invalid.sum()) and int(r["n"]) == 8
        scores = [float(m["score"]) for m in manifest]
        if 0 < invalid.sum() < 8:
            assert float(r["auroc"]) == pytest.approx(roc_auc_score(invalid.numpy(), scores), abs=1e-9)
    nfe = {r["estimator"]: float(r["nfe_per_image"]) for r in rows[:-1]}
    assert nfe["x0_trajectory"] == 10 and nfe["generative"] == 10 * (1 + 2) and nfe["aleatoric"] == 10 * (1 + 2)
    report = (out / "report.md").read_text()
    assert "(f) Detecting invalid samples" in report and "FIDs of a few hundred" not in report
    # guided against plain on the same seeds: the counts of the checker's labels, scipy's exact test
    with open(out / "detection_guidance.csv", newline="") as f:
        paired = list(csv.DictReader(f))
    assert [r["set"] for r in paired] == ["guided-gradient-plus", "guided-gradient-minus", "guided-posterior",
                                          "sweep-gradient-eps-lam1"]
    assert not (out / "sweep.csv").exists()

    def labels(name):
        with open(out / "sets" / name / "manifest.csv", newline="") as f:
            return invalid_mask(torch.stack([torch.from_numpy(np.array(Image.open(out / "sets" / name / m["image"])))
                                             for m in csv.DictReader(f)]))

    plain = labels("plain")
    for r in paired:
        guided = labels(r["set"])
        b, c = int((plain & ~guided).sum()), int((~plain & guided).sum())
        assert (int(r["only_first"]), int(r["only_second"]), int(r["n"])) == (b, c, 8)
        assert float(r["p_value"]) == pytest.approx(binomtest(b, b + c).pvalue if b + c else 1.0)


@pytest.mark.slow  # trains a 3-step shapes model (shared with the test above)
def test_evaluate_refuses_fid_experiments_on_a_shapes_model(tmp_path, shapes_checkpoint):
    from uncdiff.commands.evaluate import main as evaluate

    common = ["--checkpoint", str(shapes_checkpoint), "--out", str(tmp_path / "eval"), "--n", "8",
              "--fabric.accelerator", "cpu"]
    with pytest.raises(SystemExit, match="no FID features"):
        evaluate([*common, "--experiments", "filtering"])
    with pytest.raises(SystemExit, match="add detection"):
        evaluate([*common, "--experiments", "sweep"])
    assert not (tmp_path / "eval").exists()
