"""Score variants and windows (docs/algorithms.md §3) on a constructed estimator whose maps are
known, so every per-step total and every score has a value computed by hand."""

import pytest
import torch

from uncdiff.core.samplers import DDIMSampler, sample
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.estimators import (AleatoricUncertainty, StepwiseUncertainty, variant_scores,
                                            window_totals)
from uncdiff.io.tables import load_score_reference, save_score_reference
from uncdiff.uncertainty.calibration import reference_statistics
from uncdiff.uncertainty.sampling import build_hook, generate
from uncdiff.uncertainty.spec import EstimatorSpec

SHAPE = (2, 3, 3)  # C, H, W: 18 pixels
PIXELS = 18


class KnownMaps(StepwiseUncertainty):
    """U_t[b] = (b + 1) * (i + 1)^2 at every pixel on step i: total (b + 1) (i + 1)^2 * 18."""

    def estimate(self, ctx):
        b = torch.arange(1, ctx.x_t.shape[0] + 1, dtype=ctx.x_t.dtype).view(-1, 1, 1, 1)
        return b * (ctx.index + 1) ** 2 * torch.ones_like(ctx.x_t)


def zero_eps(x, t):
    return torch.zeros_like(x)


def run(estimator, steps=20, batch=3):
    return generate(zero_eps, DDIMSampler(NoiseSchedule(), steps=steps), SHAPE, range(batch), estimator)


def hand_total(b, i):
    return (b + 1) * (i + 1) ** 2 * PIXELS


def reference(steps=20):
    # any positive per-step statistics will do; these differ on every step
    return {"mean": torch.tensor([10.0 + 3 * i for i in range(steps)], dtype=torch.float64),
            "std": torch.tensor([2.0 + 0.5 * i for i in range(steps)], dtype=torch.float64)}


def test_step_totals_and_the_three_variants_by_hand():
    ref = reference()
    results = {score: run(KnownMaps(score=score, reference=None if score == "sum" else ref))
               for score in ("sum", "step_normalized", "standardized")}
    totals = results["sum"].step_totals
    assert results["sum"].total_steps == list(range(20))
    assert totals.shape == (3, 20)
    for b in range(3):
        assert totals[b].tolist() == [hand_total(b, i) for i in range(20)]
        want = {"sum": sum(hand_total(b, i) for i in range(20)),
                "step_normalized": sum(hand_total(b, i) / ref["mean"][i].item() for i in range(20)),
                "standardized": sum((hand_total(b, i) - ref["mean"][i].item()) / ref["std"][i].item()
                                    for i in range(20))}
        for score, result in results.items():
            assert result.scores[b].item() == pytest.approx(want[score], rel=1e-6)
    # the default's score is the sum of the summed map, as before the variants existed
    assert torch.equal(results["sum"].scores, results["sum"].maps.flatten(1).sum(1))


@pytest.mark.parametrize("window, steps", [((0.0, 1.0), range(20)), ((0.0, 0.15), [0, 1, 2]),
                                           ((0.5, 1.0), range(10, 20)), ((0.25, 0.4), [5, 6, 7])])
def test_windows_from_one_run_equal_a_run_with_that_window(window, steps):
    ref = reference()
    all_steps = run(KnownMaps())
    cols, kept = window_totals(all_steps.step_totals, all_steps.total_steps, window, 20)
    assert kept == list(steps)
    for score in ("sum", "step_normalized", "standardized"):
        r = None if score == "sum" else ref
        from_one_run = variant_scores(cols, kept, score, r)
        windowed = run(KnownMaps(window=window, score=score, reference=r))
        torch.testing.assert_close(from_one_run, windowed.scores.double())
        for b in range(3):
            if score == "sum":
                want = sum(hand_total(b, i) for i in steps)
            elif score == "step_normalized":
                want = sum(hand_total(b, i) / ref["mean"][i].item() for i in steps)
            else:
                want = sum((hand_total(b, i) - ref["mean"][i].item()) / ref["std"][i].item() for i in steps)
            assert from_one_run[b].item() == pytest.approx(want, rel=1e-9)


def test_standardized_is_invariant_to_per_step_affine_rescaling():
    """Rescaling step i's totals by a_i > 0 and shifting them by c_i, the reference statistics
    rescale and shift with them, so the z-scores and their sum are unchanged."""
    g = torch.Generator().manual_seed(0)
    totals = torch.rand(50, 8, generator=g, dtype=torch.float64) * torch.logspace(3, -3, 8, dtype=torch.float64)
    a = torch.rand(8, generator=g, dtype=torch.float64) * 100 + 0.01
    c = torch.randn(8, generator=g, dtype=torch.float64) * 10
    steps = list(range(8))
    before = variant_scores(totals, steps, "standardized", reference_statistics(totals))
    moved = a * totals + c
    after = variant_scores(moved, steps, "standardized", reference_statistics(moved))
    torch.testing.assert_close(before, after)
    # step_normalized: invariant to scaling (not to shifts)
    before = variant_scores(totals, steps, "step_normalized", reference_statistics(totals))
    scaled = a * totals
    torch.testing.assert_close(before, variant_scores(scaled, steps, "step_normalized", reference_statistics(scaled)))
    # and the plain sum is not: the largest steps dominate it
    assert not torch.allclose(variant_scores(totals, steps).argsort(), variant_scores(scaled, steps).argsort())


def test_reference_statistics_are_the_per_step_mean_and_unbiased_std():
    totals = torch.tensor([[1.0, 10.0], [3.0, 14.0], [5.0, 12.0]], dtype=torch.float64)
    ref = reference_statistics(totals)
    assert ref["mean"].tolist() == [3.0, 12.0]
    assert ref["std"].tolist() == pytest.approx([2.0, 2.0])  # sum of squares 8 over n - 1 = 2


def test_reference_file_round_trip_and_checks(tmp_path):
    path = tmp_path / "tau.pt.reference.pt"
    save_score_reference(path, reference(20), {"M": 5})
    loaded, settings = load_score_reference(path, steps=20)
    assert torch.equal(loaded["mean"], reference(20)["mean"]) and settings == {"M": 5}
    with pytest.raises(ValueError, match="calibrated for 20 sampler steps; this run has 10"):
        load_score_reference(path, steps=10)
    with pytest.raises(ValueError, match="no score reference file"):
        load_score_reference(tmp_path / "missing.pt")
    torch.save({"table": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a score reference file"):
        load_score_reference(tmp_path / "other.pt")
    # a file of the first settings format (num_perturbations for M) is refused by name, not mis-read
    torch.save({"kind": "uncdiff score reference", "mean": torch.ones(20), "std": torch.ones(20),
                "settings": {"num_perturbations": 5}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="earlier uncdiff .*format 1.*calibrate it again"):
        load_score_reference(tmp_path / "old.pt")
    # the loaded values go into the spec; the hook builder checks them against the run's steps
    spec = EstimatorSpec("aleatoric", score="standardized", reference=loaded)
    est = build_hook(spec, steps=20)
    assert torch.equal(est.reference["std"], reference(20)["std"])
    with pytest.raises(ValueError, match="estimator.reference covers 20 sampler steps; this run has 4"):
        build_hook(spec, steps=4)
    with pytest.raises(ValueError, match="estimator.score standardized divides .* reference"):
        build_hook(EstimatorSpec("aleatoric", score="standardized"), steps=20)
    # a reference of another step count is refused when the run starts, before any map
    est = KnownMaps(score="standardized", reference=reference(20))
    with pytest.raises(ValueError, match="cover 20 steps but this sampler runs 10"):
        run(est, steps=10)


@pytest.mark.parametrize("options, match", [
    ({"score": "standardized"}, "pass reference"),
    ({"score": "step_normalized"}, "pass reference"),
    ({"score": "sum", "reference": reference()}, "uses no reference"),
    ({"score": "mean"}, "score must be one of"),
    ({"score": "standardized", "reference": {"mean": torch.ones(3), "std": torch.tensor([1.0, 0.0, 1.0])}},
     r"steps \[1\]"),
])
def test_bad_score_options_are_refused_when_built(options, match):
    with pytest.raises(ValueError, match=match):
        AleatoricUncertainty(**options)


def test_noise_norms_are_the_squared_norms_of_each_seeds_starting_noise():
    seen = {}

    def hook(ctx):
        if ctx.index == 0:
            seen["x_T"] = ctx.x_t.clone()
        return ctx.eps

    sampler = DDIMSampler(NoiseSchedule(), steps=3)
    sample(zero_eps, sampler, SHAPE, [7, 8, 9], hook)
    result = generate(zero_eps, sampler, SHAPE, [7, 8, 9], batch_size=2)
    torch.testing.assert_close(result.noise_norms, seen["x_T"].double().pow(2).flatten(1).sum(1))
