"""Calibration of image-to-image uncertainty against the real error (docs/algorithms.md §7), on a
Gaussian model whose posterior variance differs from pixel to pixel, so a good map has something
to find."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from uncdiff.core.samplers import DDIMSampler
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.evaluation.image_to_image import (calibration_markdown, calibration_study, l1_psnr, mean_pairwise_ssim,
                                               sample_variance)
from uncdiff.uncertainty.image_to_image import generate_conditional
from uncdiff.uncertainty.sampling import build_hook
from uncdiff.uncertainty.spec import EstimatorSpec, SamplerSpec

MU, S, R = 0.0, 0.5, 0.2
GAIN = torch.tensor([0.0, 0.3, 1.0, 3.0]).repeat(4).view(1, 1, 4, 4)  # how well y observes each pixel


class PerPixelGaussianEps(nn.Module):
    """Exact `E[eps | x_t, y]` for `x0 ~ N(MU, S^2)` per pixel and `y = GAIN x0 + N(0, R^2)`
    (channel 0 of the input is y, channel 1 is x_t), by Gaussian regression on (x_t, y)."""

    def __init__(self, schedule):
        super().__init__()
        self.abar = schedule.alphas_cumprod.float()

    def forward(self, z, t):
        y, x = z[:, :1], z[:, 1:]
        a = self.abar[t][:, None, None, None]
        c_xx, c_yy, c_xy = a * S**2 + 1 - a, GAIN**2 * S**2 + R**2, a.sqrt() * GAIN * S**2
        det = c_xx * c_yy - c_xy**2
        return (1 - a).sqrt() * (c_yy * (x - a.sqrt() * MU) - c_xy * (y - GAIN * MU)) / det


@pytest.fixture(scope="module")
def problem():
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(0)
    x0 = (MU + S * torch.randn(48, 1, 4, 4, generator=gen)).clamp(-1, 1)
    y = GAIN * x0 + R * torch.randn(48, 1, 4, 4, generator=gen)
    net, sampler = PerPixelGaussianEps(schedule), DDIMSampler(schedule, 50, eta=1.0, clip=False)

    def restore(condition, mask, seeds, estimator, guidance=None):
        make_hook = None if estimator is None else (lambda model: build_hook(estimator, net=model))
        return generate_conditional(net, sampler, condition, seeds, (1, 4, 4), mask, make_hook)

    return restore, x0, y


def test_the_study_ranks_the_sample_variance_above_random_and_the_oracle_first(problem):
    restore, x0, y = problem
    study = calibration_study(restore, x0, y, None, {"aleatoric": EstimatorSpec("aleatoric", M=3)},
                              num_samples=4, seed_groups=(0, 1))
    rows = study["rows"]
    assert set(rows) == {"aleatoric", "K-sample variance", "random", "oracle"}
    assert abs(rows["oracle"]["ause"][0]) < 1e-12
    assert all(rows["oracle"]["aurg"][0] >= row["aurg"][0] - 1e-12 for row in rows.values())
    # the posterior variance is S^2 at unobserved pixels and ~R^2 / GAIN^2 at well observed ones
    assert rows["K-sample variance"]["ause"][0] < 0.5 * rows["random"]["ause"][0]
    assert study["groups"] == 2 and set(study["quality"]) == {"l1", "psnr", "diversity_ssim"}
    assert "| K-sample variance |" in calibration_markdown(study)


def test_quality_metrics_against_textbook_formulas():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 1, 4, 4, generator=gen) * 2 - 1, torch.rand(3, 1, 4, 4, generator=gen) * 2 - 1
    mask = torch.zeros(3, 1, 4, 4)
    mask[:, :, :2] = 1
    l1, psnr = l1_psnr(a, b, mask)
    diffs = [((a[i, 0, :2] - b[i, 0, :2]) / 2) for i in range(3)]
    assert l1 == pytest.approx(float(torch.cat([d.flatten() for d in diffs]).abs().mean()))
    assert psnr == pytest.approx(sum(-10 * torch.log10(d.pow(2).mean()).item() for d in diffs) / 3, rel=1e-6)
    samples = torch.randn(4, 2, 1, 8, 8, generator=gen)
    loop = torch.stack([((samples[:, n] - samples[:, n].mean(0)) ** 2).sum(0) / 3 for n in range(2)])
    assert torch.allclose(sample_variance(samples).float(), loop, atol=1e-6)
    same = samples[:1].repeat(4, 1, 1, 1, 1).clamp(-1, 1)
    assert mean_pairwise_ssim(same) == pytest.approx(1.0, abs=1e-5)
    assert mean_pairwise_ssim(samples.clamp(-1, 1)) < 0.5
    assert len(list(itertools.combinations(range(4), 2))) == 6  # the pairs averaged over


def test_the_study_runs_on_a_conditional_module():
    from test_image_to_image import tiny_conditional
    from uncdiff.data.masks import box_mask
    from uncdiff.lightning.image_to_image import restorer

    module = tiny_conditional("inpaint")
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    mask = box_mask(8)[None].repeat(3, 1, 1, 1)
    y = torch.where(mask > 0, torch.randn_like(x0), x0)
    study = calibration_study(restorer(module, sampler=SamplerSpec(steps=3)), x0, y, mask,
                              {"aleatoric": EstimatorSpec("aleatoric", M=2),
                               "mc_dropout": EstimatorSpec("mc_dropout", M=2)}, num_samples=3, seed_groups=(0, 1))
    assert {"aleatoric", "mc_dropout", "K-sample variance", "random", "oracle"} == set(study["rows"])
    assert all(torch.isfinite(torch.tensor(row["ause"])).all() for row in study["rows"].values())


def test_the_study_keeps_per_group_values_and_the_examples_it_ranked(problem):
    """The per-group values average to the table's means; the kept baseline map is the variance of K
    restorations drawn here with the first group's seeds (image i, sample j: seed j n + i)."""
    from uncdiff.evaluation.image_to_image import paired_difference

    restore, x0, y = problem
    x0, y = x0[:6], y[:6]
    study = calibration_study(restore, x0, y, None, {"aleatoric": EstimatorSpec("aleatoric", M=2)},
                              num_samples=3, seed_groups=(0, 1, 2), keep_examples=2)
    for name, row in study["rows"].items():
        values = torch.tensor(study["per_group"][name]["ause"], dtype=torch.float64)
        assert row["ause"] == pytest.approx((float(values.mean()), float(values.std())))
    a, b = study["per_group"]["aleatoric"]["ause"], study["per_group"]["random"]["ause"]
    diffs = torch.tensor([p - q for p, q in zip(a, b)], dtype=torch.float64)
    assert paired_difference(study, "aleatoric", "random") == pytest.approx((float(diffs.mean()), float(diffs.std())))
    output = restore(y, None, list(range(6)), None).images
    samples = torch.stack([restore(y, None, [j * 6 + i for i in range(6)], None).images for j in range(1, 4)])
    examples = study["examples"]
    assert torch.equal(examples["output"], output[:2]) and torch.equal(examples["x0"], x0[:2])
    spread = samples[:, :2].double()
    loop = ((spread - spread.mean(0)) ** 2).sum(0) / 2
    assert torch.allclose(examples["maps"]["K-sample variance"], loop)
    assert torch.allclose(examples["error"], (output[:2].double() - x0[:2].double()) ** 2)


def test_the_k_sample_spread_never_sees_the_output_it_is_judged_against():
    """Issue 22 item 5: the baseline's K restorations are drawn with seeds other than the output's, so
    the map is the variance of K images that are all different from the output."""
    n, k = 3, 4
    x0 = torch.zeros(n, 1, 4, 4, dtype=torch.float64)
    calls = []

    def restore(condition, mask, seeds, estimator, guidance=None):
        images = torch.stack([torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                              for s in seeds])
        if estimator is None:
            calls.append((list(seeds), images))
        return SimpleNamespace(images=images, maps=torch.ones_like(images))

    study = calibration_study(restore, x0, x0, None, {}, num_samples=k, seed_groups=(5,), keep_examples=n)
    output = study["examples"]["output"]
    others = [images for seeds, images in calls if not torch.equal(images, output)]
    assert len(calls) == k + 1 and len(others) == k
    assert not set(calls[0][0]) & {s for seeds, _ in calls[1:] for s in seeds}
    spread = torch.stack(others)
    assert torch.allclose(study["examples"]["maps"]["K-sample variance"], spread.var(0, correction=1))
