"""The experiments of the evaluation report (uncdiff/evaluation.py) against known truths:

- improved precision / recall on Gaussian clouds: a copy of the real features scores 1 and 1, a
  far-away cloud 0 and 0, a cloud collapsed onto the real cloud's centre high precision, low recall;
- filtering by a known quality measure (the distance to the nearest real image) beats random
  subsets in FID and precision, filtering by a random score does not;
- a guided set that is a noisier copy of the unguided one measures worse, an identical one within
  the spread;
- with the exact noise predictor of a known image, deterministic DDIM from the middle of the
  schedule gives the image back (so `denoise_from` noises at the right step and runs the rest);
  AUSE maps sum only the window's steps of that second half, and a window outside it is an error;
- BayesDiff scores (sums of variances) with negative values mark the filtering row invalid.
"""

import pytest
import torch
from torch import nn

import uncdiff.evaluation.fid as fid
from uncdiff.evaluation.experiments import (FeaturePrecisionRecall, check_variance_scores, compare, denoise_from,
                                            filtering_row, guidance_row, sign_outcome, sparsification_inputs)
from uncdiff.evaluation.fid import FIDEvaluator, compute_real_stats
from uncdiff.core.samplers import make_sampler
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.estimators import StepwiseUncertainty


class Pixels(nn.Module):
    """Pixels as FID features."""

    name, num_features = "pixels", 64

    def forward(self, images):
        return images.flatten(1)


@pytest.fixture(scope="module")
def digits():
    train_x, _, val_x, _ = fid.LABELLED_DATASETS["digits"](8)
    return train_x, val_x


@pytest.fixture(scope="module")
def feature_fid(digits):
    train_x, _ = digits
    return FIDEvaluator.from_features(compute_real_stats(Pixels(), [train_x])).score


def degraded(val_x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Held-out digits, each with Gaussian noise of its own level in [0, 0.8]: samples of graded quality."""
    gen = torch.Generator().manual_seed(seed)
    level = torch.rand(len(val_x), 1, 1, 1, generator=gen) * 0.8
    return (val_x + level * torch.randn(val_x.shape, generator=gen)).clamp(-1, 1)


def gaussian(n: int, dim: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def test_precision_recall_of_gaussian_clouds():
    real = gaussian(400, 2, seed=0)
    prc = FeaturePrecisionRecall(real)  # k = 5, docs/algorithms.md §6
    assert prc(real.clone()) == (pytest.approx(1.0), pytest.approx(1.0))  # every point lies in its own ball
    assert prc(gaussian(300, 2, seed=1, shift=100.0)) == (0.0, 0.0)  # far from every real ball and vice versa
    # collapsed onto the densest part of the real cloud: realistic (inside the real balls) but its
    # own balls are tiny, so few real points are covered
    precision, recall = prc(gaussian(300, 2, seed=2, scale=0.05))
    assert precision > 0.9 and recall < 0.2
    # a fresh draw from the same distribution as the real cloud: both high
    assert min(prc(gaussian(400, 2, seed=3))) > 0.8


def test_precision_recall_needs_more_samples_than_neighbours():
    with pytest.raises(ValueError, match="more than 5"):
        FeaturePrecisionRecall(gaussian(400, 2, seed=0))(gaussian(5, 2, seed=1))


def test_filtering_by_a_quality_measure_beats_random_and_a_random_score_does_not(digits, feature_fid):
    train_x, val_x = digits
    images = degraded(val_x)
    features = images.flatten(1).double()
    prc = FeaturePrecisionRecall(train_x.flatten(1).double())
    distance = torch.cdist(images.flatten(1), train_x.flatten(1)).min(1).values  # higher = worse
    random = torch.rand(len(images), generator=torch.Generator().manual_seed(1))  # not 0: `degraded`'s levels
    good = filtering_row("distance", features, distance, 1 / 6, range(20), feature_fid, prc)
    noise = filtering_row("random", features, random, 1 / 6, range(20), feature_fid, prc)
    assert good["kept"] == noise["kept"] == len(images) - round(len(images) / 6)
    assert good["fid_kept"] < good["fid_random_mean"] - 2 * good["fid_random_std"]
    assert good["verdict"] == "better than random"
    assert noise["verdict"] != "better than random"
    assert noise["fid_random_mean"] == good["fid_random_mean"]  # the same random subsets of the same set
    # precision: the noisiest samples, the ones dropped, are the ones outside the real balls
    assert good["precision_kept"] > good["precision_random_mean"] + 2 * good["precision_random_std"]
    assert good["precision_verdict"] == "better than random"
    assert noise["precision_verdict"] != "better than random"
    assert noise["precision_random_mean"] == good["precision_random_mean"]
    assert 0 <= good["recall_kept"] <= 1 and good["recall_random_std"] >= 0


def test_guided_versus_unguided_verdicts(digits, feature_fid):
    _, val_x = digits
    clean = val_x.flatten(1).double()
    noisy = degraded(val_x, seed=2).flatten(1).double()
    worse = guidance_row("noisier", noisy, clean, 3, feature_fid)
    assert worse["difference"] > 0 and worse["verdict"] == "worse than unguided"
    same = guidance_row("same", clean, clean, 3, feature_fid)
    assert same["difference"] == 0 and same["verdict"].startswith("within the spread")
    sign = sign_outcome(same, worse, clean, noisy, 3, feature_fid)  # '+1' is the clean set here
    assert sign["better_sign"] == "+1" and sign["verdict"] == "+1 better"


def test_compare_needs_more_than_twice_the_spread():
    assert compare(-2.1, 1.0) == "better" and compare(2.1, 1.0) == "worse"
    assert compare(-1.9, 1.0).startswith("within") and compare(1.0, None) == "no spread to judge by"


def test_feature_fid_is_torchmetrics_fid(digits):
    train_x, val_x = digits
    expected = fid.fid_between(train_x, val_x, Pixels())
    fid_of = FIDEvaluator.from_features(compute_real_stats(Pixels(), [train_x])).score
    assert fid_of(val_x.flatten(1).double()) == pytest.approx(expected)
    assert fid_of(val_x.flatten(1).double()) == pytest.approx(expected)  # each call a fresh set


@pytest.mark.parametrize("steps", [10, 20])
def test_denoising_from_the_middle_with_the_exact_predictor_returns_the_image(steps):
    schedule = NoiseSchedule("linear", 1000)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1

    def exact_eps(x, t):  # the noise that takes x0 to x at t: DDIM (eta = 0) then lands on x0
        a = schedule.abar(t)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    seen = []
    out = denoise_from(exact_eps, make_sampler(schedule, "ddim", steps=steps), x0, [0, 1, 2],
                       hook=lambda ctx: seen.append(ctx.index) or ctx.eps)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert seen == list(range(steps // 2, steps))  # the second half, with the sampler's own step indices


class StepIndexMap(StepwiseUncertainty):
    """A map of the step index everywhere: the sum over a run tells which steps were recorded."""

    def estimate(self, ctx):
        return torch.full_like(ctx.x_t, float(ctx.index))


def test_ause_maps_sum_the_window_steps_of_the_denoised_half():
    sampler = make_sampler(NoiseSchedule("linear", 1000), "ddim", steps=4)
    images = torch.zeros(3, 1, 2, 2)
    eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    # steps 0..2 of 4 in the window; AUSE runs steps 2 and 3, so the map is step 2's alone
    result = sparsification_inputs(eps, sampler, images, [0, 1, 2], StepIndexMap(window=(0.0, 0.75)), batch_size=2)
    assert torch.equal(result.maps, torch.full_like(images, 2.0))
    full = sparsification_inputs(eps, sampler, images, [0, 1, 2], StepIndexMap(), batch_size=2)
    assert torch.equal(full.maps, torch.full_like(images, 2.0 + 3.0))
    with pytest.raises(ValueError, match=r"window \(0.0, 0.5\) has no step among the denoised steps 2..3 of 4"):
        sparsification_inputs(eps, sampler, images, [0, 1, 2], StepIndexMap(window=(0.0, 0.5)))


def test_negative_bayesdiff_variances_mark_the_filtering_row_invalid():
    row = {"estimator": "bayesdiff", "fid_kept": 1.0, "verdict": "better than random",
           "precision_verdict": "within the spread", "recall_verdict": "worse than random"}
    spec = {"name": "bayesdiff", "draws": 10, "skip": 5, "moments": "paper"}
    marked, note = check_variance_scores(row, torch.tensor([0.5, -0.1, 2.0, -3.0]), spec)
    assert marked == {**row, "verdict": "better than random (scores invalid: negative variances)",
                      "precision_verdict": "within the spread (scores invalid: negative variances)",
                      "recall_verdict": "worse than random (scores invalid: negative variances)"}
    assert note.startswith("2 of 4 BayesDiff scores")
    assert "S = 10 draws" in note and "`--estimator.moments regression` gives usable variances" in note
    # the regression estimator: still invalid, but no advice to use what is already used
    _, note = check_variance_scores(row, torch.tensor([-0.5, 1.0]), {**spec, "moments": "regression"})
    assert note.startswith("1 of 2") and "--estimator.moments" not in note
    # variances that can be variances leave the row as it was
    assert check_variance_scores(row, torch.tensor([0.0, 0.5, 2.0]), spec) == (row, None)
