"""Sparsification metrics and filtering subsets (docs/algorithms.md §6) against brute force and known cases."""

import math

import pytest
import torch

from uncdiff.core.filtering import keep_best
from uncdiff.evaluation.metrics import ause_aurg, random_subsets, sparsification_curve


def brute_force_curve(unc, err, num_fractions):
    """Remove pixels one fraction at a time with a python sort; RMSE of the rest."""
    pairs = sorted(zip(unc.flatten().tolist(), range(unc.numel())), key=lambda p: (-p[0], p[1]))
    order = [i for _, i in pairs]
    e = err.flatten().tolist()
    out = []
    for k in range(num_fractions):
        removed = math.floor(k / num_fractions * len(e))
        rest = [e[i] for i in order[removed:]]
        out.append(math.sqrt(sum(rest) / len(rest)))
    return out


def test_curve_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    err = torch.rand(3, 1, 5, 7, generator=gen) ** 2
    unc = err + 0.1 * torch.rand(err.shape, generator=gen)
    fractions, curve = sparsification_curve(unc, err, num_fractions=10)
    assert fractions.tolist() == pytest.approx([k / 10 for k in range(10)])
    assert curve.tolist() == pytest.approx(brute_force_curve(unc, err, 10))


def test_oracle_and_random():
    gen = torch.Generator().manual_seed(1)
    err = (torch.randn(8, 3, 8, 8, generator=gen) * torch.rand(8, 3, 8, 8, generator=gen)) ** 2
    ause, aurg = ause_aurg(err, err)
    assert ause == 0.0
    assert aurg > 0.1 * err.mean().sqrt().item()  # dropping the worst pixels clearly helps
    ause_r, aurg_r = ause_aurg(torch.rand(err.shape, generator=gen), err)
    assert ause_r > 0.5 * aurg  # random ordering is far from the oracle ...
    assert abs(aurg_r) < 0.2 * aurg  # ... and gains about nothing over keeping everything
    ause_i, aurg_i = ause_aurg(-err, err)  # inverted: worse than random
    assert ause_i > ause_r and aurg_i < 0


def test_curve_starts_at_full_rmse():
    err = torch.tensor([4.0, 1.0, 0.0, 1.0])
    _, curve = sparsification_curve(torch.tensor([3.0, 2.0, 1.0, 0.0]), err, num_fractions=4)
    assert curve.tolist() == pytest.approx([math.sqrt(6 / 4), math.sqrt(2 / 3), math.sqrt(1 / 2), 1.0])


def test_sparsification_validation():
    with pytest.raises(ValueError, match="shape"):
        sparsification_curve(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="num_fractions"):
        sparsification_curve(torch.zeros(3), torch.zeros(3), num_fractions=0)


def test_keep_best_drops_the_highest_scores():
    scores = torch.tensor([0.5, 3.0, 1.0, float("nan"), 2.0, 0.0])
    keep = keep_best(scores, 1 / 3)
    assert keep.tolist() == [True, False, True, False, True, True]  # NaN and 3.0 dropped
    assert keep_best(torch.arange(60000.0), 1 / 6).sum() == 50000
    assert keep_best(scores, 0.0).all()
    with pytest.raises(ValueError, match="fraction_dropped"):
        keep_best(scores, 1.0)
    with pytest.raises(ValueError, match="scores"):
        keep_best(torch.zeros(2, 2), 0.1)


def test_random_subsets():
    subsets = random_subsets(100, 30, [0, 1, 2])
    assert [len(s) for s in subsets] == [30, 30, 30]
    assert all(len(set(s.tolist())) == 30 and s.min() >= 0 and s.max() < 100 for s in subsets)
    assert not torch.equal(subsets[0], subsets[1])
    assert torch.equal(random_subsets(100, 30, [1])[0], subsets[1])  # a seed is a subset
    with pytest.raises(ValueError, match="keep"):
        random_subsets(10, 11, [0])
