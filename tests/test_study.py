"""The per-sample study (docs/algorithms.md §6b): rank correlations and their bootstrap intervals
against scipy and brute force, a constructed set whose right ranking is known, the realism
measure against a loop, cross-fitted score variants by hand, and the kept-set curve."""

import numpy as np
import pytest
import torch
from scipy import stats

from uncdiff.evaluation.study import (correlation_rows, correlation_verdict, cross_fitted_scores, drop_curve_rows,
                                      nearest_real_distance, spearman_interval, spearman_statistic, study_scores)


def brute_spearman(x, y):
    """Pearson correlation of average ranks, ranks counted by hand."""
    def ranks(v):
        return np.array([np.sum(v < a) + (np.sum(v == a) + 1) / 2 for a in v])
    rx, ry = ranks(np.asarray(x)), ranks(np.asarray(y))
    return np.corrcoef(rx, ry)[0, 1]


def test_vectorised_statistic_is_spearmans_rho_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(4, 40)).astype(float)  # many ties
    y = x + rng.normal(size=(4, 40))
    got = spearman_statistic(x, y, axis=-1)
    for i in range(4):
        assert got[i] == pytest.approx(stats.spearmanr(x[i], y[i]).statistic, abs=1e-12)
        assert got[i] == pytest.approx(brute_spearman(x[i], y[i]), abs=1e-12)


@pytest.mark.slow
def test_bootstrap_interval_matches_a_plain_resampling_loop():
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    y = 0.4 * x + rng.normal(size=300)
    rho, low, high = spearman_interval(torch.tensor(x), torch.tensor(y), resamples=1000, seed=3)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert low < rho < high
    assert spearman_interval(torch.tensor(x), torch.tensor(y), 1000, seed=3) == (rho, low, high)  # seeded
    loop = np.random.default_rng(99)
    boot = []
    for _ in range(2000):
        idx = loop.integers(0, 300, 300)
        boot.append(brute_spearman(x[idx], y[idx]))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert low == pytest.approx(lo, abs=0.03) and high == pytest.approx(hi, abs=0.03)


def test_a_score_equal_to_the_starting_noise_ranks_it_perfectly():
    noise = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    realism = -noise  # a constructed set where more noise means more realistic (lower distance)
    rows = correlation_rows("fake", {("sum", "all steps"): noise.clone()}, {"noise": noise, "realism": realism},
                            resamples=200)
    assert rows[0]["rho_noise"] == pytest.approx(1.0) and rows[0]["rho_noise_low"] == pytest.approx(1.0)
    assert rows[0]["rho_realism"] == pytest.approx(-1.0) and rows[0]["sign_realism"] == "negative"
    assert rows[0]["sign_noise"] == "positive"
    assert correlation_verdict(-0.1, 0.2) == "no sign (interval contains 0)"


def test_nearest_real_distance_is_the_mean_over_the_five_nearest():
    g = torch.Generator().manual_seed(0)
    fake, real = torch.randn(7, 3, generator=g), torch.randn(20, 3, generator=g)
    got = nearest_real_distance(fake, real, k=5, batch_size=3)
    for i in range(7):
        distances = sorted(float(((fake[i] - r) ** 2).sum().sqrt()) for r in real)
        assert got[i].item() == pytest.approx(sum(distances[:5]) / 5)


def test_cross_fitted_variants_use_the_other_folds_statistics():
    totals = torch.tensor([[1.0, 10.0], [2.0, 30.0], [3.0, 20.0], [6.0, 50.0]], dtype=torch.float64)
    # even rows 0, 2 use the odd rows 1, 3: mean (4, 40), std (2.828.., 14.14..); odd use even: mean (2, 15)
    s_odd, s_even = (2.0**0.5 * 2, 200.0**0.5), (2.0**0.5, 50.0**0.5)
    want = [(1 - 4) / s_odd[0] + (10 - 40) / s_odd[1], (2 - 2) / s_even[0] + (30 - 15) / s_even[1],
            (3 - 4) / s_odd[0] + (20 - 40) / s_odd[1], (6 - 2) / s_even[0] + (50 - 15) / s_even[1]]
    assert cross_fitted_scores(totals, "standardized").tolist() == pytest.approx(want)
    want = [1 / 4 + 10 / 40, 2 / 2 + 30 / 15, 3 / 4 + 20 / 40, 6 / 2 + 50 / 15]
    assert cross_fitted_scores(totals, "step_normalized").tolist() == pytest.approx(want)
    assert cross_fitted_scores(totals, "sum").tolist() == [11.0, 32.0, 23.0, 56.0]


def test_study_scores_cover_each_variant_and_window_of_one_run():
    totals = torch.arange(1.0, 1 + 6 * 20, dtype=torch.float64).view(6, 20)
    scores = study_scores(totals, list(range(20)), 20)
    assert len(scores) == 9
    assert scores[("sum", "first 15%")].tolist() == totals[:, :3].sum(1).tolist()
    assert scores[("sum", "last half")].tolist() == totals[:, 10:].sum(1).tolist()
    # a run that recorded only the last half has no first-15% window
    assert {w for _, w in study_scores(totals[:, 10:], list(range(10, 20)), 20)} == {"all steps", "last half"}


def test_drop_curve_keeps_the_lowest_scores_and_shares_the_random_subsets():
    features = torch.arange(12, dtype=torch.float64)[:, None]
    calls = []

    def fid(f):  # a stand-in "FID": the mean feature, lower is better
        calls.append(len(f))
        return float(f.mean())

    good = torch.arange(12, dtype=torch.float64)  # the highest score marks the highest feature
    bad = -good
    rows = drop_curve_rows("fake", features, {("sum", "all"): good, ("sum", "reversed"): bad}, [0.5],
                           range(5), fid)
    assert [r["kept"] for r in rows] == [6, 6]
    assert rows[0]["fid_kept"] == 2.5 and rows[1]["fid_kept"] == 8.5
    assert rows[0]["verdict"] == "better than random" and rows[1]["verdict"] == "worse than random"
    assert len(calls) == 5 + 2  # the random subsets once for both scores
