"""The interval study (docs/algorithms.md §8) against independent truths.

- Losses on a whole grid at once equal `image_losses` of the explicit intervals, lam by lam.
- The violation interval is the exact binomial one of scipy's binomtest.
- A model whose posterior is Gaussian and known: truth = f + sigma_p z per pixel. The expected loss of
  the intervals f -+ lam h_p is mean_p 2 (1 - Phi(lam h_p / sigma_p)), so over independent calibration
  draws the calibrated true risk must be <= alpha in >= 1 - delta of them; the constant map's interval
  length tends to the analytic w solving mean_p 2 (1 - Phi(w / sigma_p)) = alpha, and the true posterior
  std's to the oracle's central (1 - alpha) intervals, Phi^-1(1 - alpha/2) sigma_p.
"""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from uncdiff.evaluation.intervals import Heuristic, calibration_split, clopper_pearson, interval_study
from uncdiff.uncertainty.intervals import image_losses, interval, losses_on_grid, miss_thresholds

ALPHA, DELTA = 0.1, 0.1
SIGMA = torch.tensor([0.02, 0.05, 0.1, 0.2]).repeat(4).view(1, 1, 4, 4).double()  # posterior std per pixel


def gaussian_problem(n: int, seed: int):
    """n images of a known Gaussian posterior around the output f (the [-1, 1] scale, no clipping)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.rand(n, 1, 4, 4, generator=gen, dtype=torch.float64) - 0.5
    return f, f + SIGMA * torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)


def true_risk(lam: float, h: torch.Tensor) -> float:
    """E[L(lam)] of f -+ lam h under the Gaussian posterior (every image has the same sigma_p)."""
    return float((2 * stats.norm.sf((lam * h / SIGMA).numpy())).mean())


def heuristics(f):
    constant, perfect = torch.ones_like(f), SIGMA.expand_as(f)
    return {"constant": Heuristic(f, constant, constant, 1.0), "posterior std": Heuristic(f, perfect, perfect, 2.0)}


def test_losses_on_a_grid_equal_the_losses_of_explicit_intervals():
    gen = torch.Generator().manual_seed(0)
    truth, f = torch.randn(5, 2, 6, 6, generator=gen), torch.randn(5, 2, 6, 6, generator=gen)
    lower, upper = torch.rand(5, 2, 6, 6, generator=gen), torch.rand(5, 2, 6, 6, generator=gen)
    lower[0, 0, 0, 0], truth[0, 0, 0, 0] = 0, f[0, 0, 0, 0] - 1  # a zero spread never covers a value off the output
    mask = (torch.rand(5, 1, 6, 6, generator=gen) > 0.4).float()
    mask[:, :, 0, 0] = 1
    grid = [0.0, 0.1, 0.5, 1.0, 2.5, 10.0, 1e6]
    table = losses_on_grid(miss_thresholds(truth, f, lower, upper), mask, grid)
    for g, lam in enumerate(grid):
        lo, hi = interval(f, lower, upper, lam)
        assert np.allclose(table[g], image_losses(truth, lo, hi, mask).numpy(), atol=1e-12)
    assert table[-1, 0] >= 1 / float(mask[0].sum() * 2)


@pytest.mark.parametrize("k, n", [(0, 20), (1, 20), (7, 30), (20, 20)])
def test_violation_interval_is_the_exact_binomial_interval(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-10)


def test_splits_are_disjoint_random_and_reproducible():
    cal, test = calibration_split(50, 22, 3, seed=7)
    assert len(cal) == 22 and len(test) == 28 and not set(cal) & set(test)
    assert np.array_equal(cal, calibration_split(50, 22, 3, seed=7)[0])
    assert not np.array_equal(cal, calibration_split(50, 22, 4, seed=7)[0])


def test_the_guarantee_holds_over_independent_calibration_draws():
    """Each draw is a new pool of images; lam_hat from its calibration half, judged by the true risk."""
    draws, bad = 150, 0
    for d in range(draws):
        f, truth = gaussian_problem(60, seed=d)
        study = interval_study(truth, None, {"constant": heuristics(f)["constant"]}, ALPHA, DELTA, splits=1,
                               calibration_size=40, seed=d, grid=np.geomspace(1e-3, 10, 401))
        lam = study["rows"]["constant"]["lambda"][0]
        bad += true_risk(lam, torch.ones_like(SIGMA)) > ALPHA
    assert bad / draws <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / draws)


def test_widths_approach_the_analytic_constant_width_and_the_oracle():
    f, truth = gaussian_problem(3000, seed=1)
    study = interval_study(truth, None, heuristics(f), ALPHA, DELTA, splits=3, calibration_size=2000)
    sigma = SIGMA.flatten().numpy()
    w = optimize.brentq(lambda w: (2 * stats.norm.sf(w / sigma)).mean() - ALPHA, 1e-6, 2.0)
    oracle = stats.norm.ppf(1 - ALPHA / 2) * sigma.mean()  # mean half-length of the central 1 - alpha intervals
    rows = study["rows"]
    # interval length on the [0, 1] scale is half the [-1, 1] length 2 w: w itself
    assert w <= rows["constant"]["width"][0] <= 1.1 * w
    assert oracle <= rows["posterior std"]["width"][0] <= 1.1 * oracle
    assert rows["posterior std"]["width"][0] < 0.8 * rows["constant"]["width"][0]
    for row in rows.values():
        assert row["risk"][0] <= ALPHA and row["violations"] == 0 and row["failed_splits"] == 0
        assert row["violation_interval"] == pytest.approx(clopper_pearson(0, 3))
    assert rows["constant"]["spearman"] is None and rows["posterior std"]["spearman"][0] > 0.2
    # the perfect heuristic misses alike in every quartile of width; the constant one can't rank
    quartiles = [q[0] for q in rows["posterior std"]["risk_by_width_quartile"]]
    assert max(quartiles) - min(quartiles) < 0.03
    assert rows["constant"]["nfe"] == 1.0 and study["settings"]["calibration_images"] == 2000


def test_too_small_a_calibration_set_is_refused_naming_the_smallest():
    f, truth = gaussian_problem(30, seed=0)
    with pytest.raises(ValueError, match="at least 22 images"):
        interval_study(truth, None, heuristics(f), ALPHA, DELTA, calibration_size=15)
    with pytest.raises(ValueError, match="alpha must lie strictly between 0 and 1"):
        interval_study(truth, None, heuristics(f), 1.5, DELTA)
