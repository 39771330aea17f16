"""Guaranteed per-pixel intervals (docs/algorithms.md §8) against independent truths.

Truths used below, derived here:
- The Hoeffding-Bentkus bound is recomputed from its definition with scipy.stats.binom.cdf and a
  bisection loop of this file; with zero empirical risk it is 1 - delta^(1/n) (the Hoeffding term
  (1 - mu)^n is below the Bentkus term e (1 - mu)^n).
- Gaussian posterior: truth = f + sigma_p z per pixel, z ~ N(0, 1). For intervals f -+ lam h_p the
  expected loss of an image is the mean over its generated pixels of P(|z| > lam h_p / sigma_p)
  = 2 (1 - Phi(lam h_p / sigma_p)), whatever the correlation between pixels. So
  * a constant heuristic h = 1 has the analytic half-width w solving mean_p 2 (1 - Phi(w / sigma_p))
    = alpha; for a constant sigma, w = sigma Phi^-1(1 - alpha/2);
  * the perfect heuristic h = sigma_p needs lam* = Phi^-1(1 - alpha/2) at every pixel: the oracle's
    intervals, the central (1 - alpha) interval of each pixel's posterior.
  As n grows the bound's slack over the empirical risk shrinks, so lam_hat h approaches these from above.
"""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from uncdiff.uncertainty.intervals import (calibrate_lambda, hb_p_value, hoeffding_bentkus_ucb, image_losses,
                                           interval, k_sample_spread, min_calibration_size)

ALPHA, DELTA = 0.1, 0.1


def direct_ucb(risk: float, n: int, delta: float, rounding=math.ceil) -> float:
    """R+ from the definition: the smallest mu >= risk with min(Hoeffding, Bentkus) p-value <= delta."""
    def p_value(mu):
        a = min(risk, mu)
        h = (a * math.log(a / mu) if a > 0 else 0.0) + ((1 - a) * math.log((1 - a) / (1 - mu)) if a < 1 else 0.0)
        return min(math.exp(-n * h), math.e * stats.binom.cdf(rounding(n * risk), n, mu))

    lo, hi = risk, 1.0
    while hi - lo > 1e-13:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if p_value(mid) <= delta else (mid, hi)
    return hi


@pytest.mark.parametrize("risk, n, delta", [(0.0, 50, 0.1), (0.013, 200, 0.1), (0.25, 40, 0.05),
                                            (0.1234, 1000, 0.01), (0.5, 30, 0.2), (0.9, 20, 0.1)])
def test_bound_matches_direct_computation(risk, n, delta):
    assert hoeffding_bentkus_ucb(risk, n, delta) == pytest.approx(direct_ucb(risk, n, delta), abs=1e-9)


@pytest.mark.parametrize("n, delta", [(1, 0.5), (22, 0.1), (500, 0.01)])
def test_zero_risk_bound_is_closed_form(n, delta):
    assert hoeffding_bentkus_ucb(0.0, n, delta) == pytest.approx(1 - delta ** (1 / n), abs=1e-12)


def test_bentkus_term_rounds_up():
    """n risk = 2.6: the ceiling (what Bates et al. prove) gives a wider bound than the floor would."""
    ceil_bound, floor_bound = direct_ucb(0.013, 200, 0.1), direct_ucb(0.013, 200, 0.1, rounding=math.floor)
    assert ceil_bound > floor_bound + 1e-3
    assert hoeffding_bentkus_ucb(0.013, 200, 0.1) == pytest.approx(ceil_bound, abs=1e-9)
    # a mean whose float product misses the integer (0.07 * 100 = 7.000000000000001) counts as 7 images
    assert hb_p_value(0.07, 100, 0.2) == pytest.approx(hb_p_value(7 / 100, 100, 0.2), rel=1e-12)
    assert hb_p_value(0.07, 100, 0.2) < hb_p_value(0.0701, 100, 0.2)


def test_passing_by_p_value_is_passing_by_bound():
    for n in (30, 200):
        for risk in np.linspace(0, 0.2, 81):
            ucb = hoeffding_bentkus_ucb(float(risk), n, DELTA)
            if abs(ucb - ALPHA) > 1e-6:
                assert (ucb <= ALPHA) == (hb_p_value(float(risk), n, ALPHA) <= DELTA)


def test_interval_and_losses_against_a_loop():
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 3, 3, 4, 5
    f, truth = torch.rand(n, c, h, w, generator=g), torch.rand(n, c, h, w, generator=g)
    lower, upper = torch.rand(n, c, h, w, generator=g) * 0.3, torch.rand(n, c, h, w, generator=g) * 0.3
    mask = (torch.rand(n, 1, h, w, generator=g) > 0.4).float()
    lo, hi = interval(f, lower, upper, 1.7)
    losses = image_losses(truth, lo, hi, mask)
    unmasked = image_losses(truth, lo, hi)
    for i in range(n):
        missed = total = missed_all = 0
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    out = not (f[i, ch, y, x] - 1.7 * lower[i, ch, y, x] <= truth[i, ch, y, x]
                               <= f[i, ch, y, x] + 1.7 * upper[i, ch, y, x])
                    missed_all += out
                    if mask[i, 0, y, x] == 1:
                        total += 1
                        missed += out
        assert float(losses[i]) == pytest.approx(missed / total, abs=1e-12)
        assert float(unmasked[i]) == pytest.approx(missed_all / (c * h * w), abs=1e-12)
    with pytest.raises(ValueError, match="image 1 has no generated pixels"):
        image_losses(truth, lo, hi, torch.cat([mask[:1], torch.zeros_like(mask[:1]), mask[2:]]))


def gaussian_losses(n: int, sigma: np.ndarray, heuristic: np.ndarray, rng: np.random.Generator):
    """A calibration set of n images of the known Gaussian posterior (`sigma`, `heuristic`: the
    generated pixels' posterior std and heuristic spread) and its losses as a function of lam: a pixel
    is missed when |truth - f| = sigma |z| > lam h (as `image_losses` counts, checked above by a loop)."""
    ratio = sigma * np.abs(rng.standard_normal((n, sigma.size))) / heuristic
    return lambda lam: (ratio > lam).mean(axis=1)


def true_risk(lam: float, sigma: np.ndarray, heuristic: np.ndarray) -> float:
    """E[L(lam)] = mean over generated pixels of 2 (1 - Phi(lam h / sigma))."""
    return float((2 * stats.norm.sf(lam * heuristic / sigma)).mean())


SIGMA = np.linspace(0.05, 0.5, 16)  # the posterior std of the 16 pixels of a 4x4 image


def test_guarantee_holds_over_calibration_draws():
    """300 calibration sets of 200 images, heuristic blind to sigma (constant), 12 of 16 pixels
    generated: the true risk of lam_hat exceeds alpha in at most delta of them, up to 3 binomial
    standard deviations."""
    draws, n = 300, 200
    rng = np.random.default_rng(1)
    generated = SIGMA.reshape(4, 4)[:, 1:].flatten()  # one known column
    heuristic = np.ones_like(generated)
    grid = np.arange(0.02, 1.5 + 1e-9, 0.02)
    violations = 0
    for _ in range(draws):
        lam = calibrate_lambda(gaussian_losses(n, generated, heuristic, rng), grid, n, ALPHA, DELTA)
        violations += true_risk(lam, generated, heuristic) > ALPHA
    assert violations / draws <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / draws)


def constant_half_width(sigma: np.ndarray, alpha: float) -> float:
    """w with mean_p 2 (1 - Phi(w / sigma_p)) = alpha."""
    return optimize.brentq(lambda w: 2 * stats.norm.sf(w / sigma).mean() - alpha, 1e-9, 10 * sigma.max())


def calibrated_lam(heuristic: np.ndarray, n: int, analytic_lam: float, seed: int) -> float:
    grid = analytic_lam * np.linspace(0.9, 1.5, 601)
    losses = gaussian_losses(n, SIGMA, heuristic, np.random.default_rng(seed))
    return calibrate_lambda(losses, grid, n, ALPHA, DELTA)


def test_constant_heuristic_width_approaches_its_analytic_value():
    assert constant_half_width(np.full(16, 0.3), ALPHA) == pytest.approx(0.3 * stats.norm.ppf(1 - ALPHA / 2))
    analytic = constant_half_width(SIGMA, ALPHA)
    widths = [calibrated_lam(np.ones(16), n, analytic, seed=2) for n in (500, 20000)]
    assert widths[0] > widths[1] >= analytic * 0.995
    assert widths[1] <= analytic * 1.03


def test_perfect_heuristic_width_approaches_the_oracle():
    oracle_lam = stats.norm.ppf(1 - ALPHA / 2)
    lam = calibrated_lam(SIGMA, 20000, oracle_lam, seed=3)
    assert oracle_lam * 0.995 <= lam <= oracle_lam * 1.03
    # the oracle's mean half-width is below the constant heuristic's for the same risk
    assert oracle_lam * SIGMA.mean() < constant_half_width(SIGMA, ALPHA)


def test_scan_keeps_only_lambdas_above_every_failure():
    """lam = 2 fails while 1, 3 and 4 pass: lam_hat is 3, not 1."""
    n = 50
    losses = lambda lam: torch.ones(n) if lam == 2 else torch.zeros(n)  # a tensor, as image_losses gives
    assert calibrate_lambda(losses, [1, 2, 3, 4], n, ALPHA, DELTA) == 3


def never_called(lam):
    raise AssertionError("the losses were computed before the input was checked")


@pytest.mark.parametrize("name, alpha, delta", [("alpha", 0.0, 0.1), ("alpha", 1.0, 0.1), ("alpha", -0.2, 0.1),
                                                ("alpha", float("nan"), 0.1), ("delta", 0.1, 0.0),
                                                ("delta", 0.1, 1.5)])
def test_levels_outside_0_1_are_refused(name, alpha, delta):
    with pytest.raises(ValueError, match=f"{name} must lie strictly between 0 and 1"):
        calibrate_lambda(never_called, [1.0, 2.0], 100, alpha, delta)
    with pytest.raises(ValueError, match=name):
        min_calibration_size(alpha, delta)


@pytest.mark.parametrize("alpha, delta", [(0.1, 0.1), (0.05, 0.01), (0.3, 0.2)])
def test_too_few_images_are_refused_naming_the_smallest_that_works(alpha, delta):
    smallest = next(n for n in range(1, 10000) if (1 - alpha) ** n <= delta)
    assert min_calibration_size(alpha, delta) == smallest
    with pytest.raises(ValueError, match=f"use at least {smallest} images"):
        calibrate_lambda(never_called, [1.0, 2.0], smallest - 1, alpha, delta)
    assert calibrate_lambda(lambda lam: np.zeros(smallest), [1.0, 2.0], smallest, alpha, delta) == 1.0


def test_bad_grid_and_failing_grid_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        calibrate_lambda(never_called, [2.0, 1.0], 100, ALPHA, DELTA)
    with pytest.raises(ValueError, match="extend the lambda grid upward"):
        calibrate_lambda(lambda lam: np.full(100, 0.5), [1.0, 2.0], 100, ALPHA, DELTA)
    with pytest.raises(ValueError, match="n must be a positive whole number"):
        calibrate_lambda(never_called, [1.0], 0, ALPHA, DELTA)
    with pytest.raises(ValueError, match="gave 99 losses"):
        calibrate_lambda(lambda lam: np.zeros(99), [1.0], 100, ALPHA, DELTA)


def test_k_sample_spread_against_numpy():
    g = torch.Generator().manual_seed(4)
    samples = torch.randn(5, 2, 3, 4, 4, generator=g)
    spread = k_sample_spread(samples)
    x = samples.double().numpy()
    np.testing.assert_allclose(spread.std.numpy(), x.std(axis=0, ddof=1), atol=1e-12)
    q25, q50, q75 = np.quantile(x, [0.25, 0.5, 0.75], axis=0)
    np.testing.assert_allclose(spread.lower.numpy(), q50 - q25, atol=1e-12)
    np.testing.assert_allclose(spread.upper.numpy(), q75 - q50, atol=1e-12)
    assert k_sample_spread(samples[:3]).lower is None
    with pytest.raises(ValueError, match="K >= 2"):
        k_sample_spread(samples[:1])
    with pytest.raises(ValueError, match=r"samples\[0\] is the judged output"):
        k_sample_spread(samples, judged=samples[0])
