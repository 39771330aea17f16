"""Aleatoric uncertainty (docs/algorithms.md §3) and MC-Dropout (docs/algorithms.md §5a) against independent truths.

Closed form used below (derived here, it agrees with docs/algorithms.md §3): for x0 ~ N(MU, S^2) per pixel,
x_t ~ N(sqrt(a) MU, v) with v = a S^2 + 1 - a, and the exact predictor is linear,
eps*(x) = c (x - sqrt(a) MU) with c = sqrt(1 - a) / v. With x0_hat = (x_t - sqrt(1-a) eps_bar) / sqrt(a)
(no clipping) the re-noised copy is x_t^i = x_t + sqrt(1-a) (z_i - eps_bar), so
eps_i - eps_bar = c sqrt(1-a) (z_i - eps_bar) = k (z_i - eps_bar) with k = (1 - a) / v. Hence
E[sample variant] = k^2 Var[z] = (1-a)^2 / v^2 and E[centered | eps_bar] = k^2 (1 + eps_bar^2).
"""

import numpy as np
import pytest
import torch
from torch import nn

from uncdiff.core.samplers import DDIMSampler, DDPMSampler, SampleNoise, StepContext, sample
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.estimators import (AleatoricUncertainty, MCDropoutUncertainty, aleatoric_map, window_steps)
from uncdiff.core.unet import UNet

T = 1000
MU, S = 0.3, 0.5
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))  # Ho et al., independent of the code


def k2(t: int) -> float:
    a = ABAR[t]
    return ((1 - a) / (a * S**2 + 1 - a)) ** 2


def gaussian_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact E[eps | x_t] for x0 ~ N(MU, S^2)."""
    a = torch.as_tensor(ABAR, dtype=x.dtype)[t].view(-1, 1, 1, 1)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(1.5 * x) * (0.3 + t.to(x.dtype)[:, None, None, None] / 1000) + 0.1 * x


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", T)


def marginal_x_t(t: int, n: int, gen: torch.Generator) -> torch.Tensor:
    a = ABAR[t]
    x0 = MU + S * torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
    return a**0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("t", [20, 250, 600, 950])
def test_gaussian_closed_form(schedule, t):
    gen = torch.Generator().manual_seed(t)
    n, m = 1000, 5
    x_t = marginal_x_t(t, n, gen)
    eps_bar = gaussian_eps(x_t, torch.full((n,), t))
    z = torch.randn(n, m, 1, 4, 4, generator=gen, dtype=torch.float64)
    u_sample = aleatoric_map(gaussian_eps, x_t, eps_bar, t, schedule, False, z, "sample")
    u_centered = aleatoric_map(gaussian_eps, x_t, eps_bar, t, schedule, False, z, "centered")
    # sample variant: k^2 * chi^2_{M-1}/(M-1) per pixel, relative sd sqrt(2/(M-1)) / sqrt(16000) ~ 0.6%
    assert u_sample.mean().item() == pytest.approx(k2(t), rel=0.03)
    # centered: E[U | eps_bar] = k^2 (1 + eps_bar^2); check the level and the dependence on eps_bar
    expected = k2(t) * (1 + eps_bar**2)
    assert u_centered.mean().item() == pytest.approx(expected.mean().item(), rel=0.03)
    w = eps_bar**2
    assert (u_centered * w).mean().item() == pytest.approx((expected * w).mean().item(), rel=0.06)


def test_chunking_matches_one_batch(schedule):
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 2, 4, 4, generator=gen)
    eps_bar = toy_eps(x_t, torch.full((3,), 400))
    z = torch.randn(3, 5, 2, 4, 4, generator=gen)
    calls = []

    def counting(x, t):
        calls.append(x.shape[0])
        return toy_eps(x, t)

    full = aleatoric_map(counting, x_t, eps_bar, 400, schedule, True, z)
    chunked = aleatoric_map(counting, x_t, eps_bar, 400, schedule, True, z, chunk_size=4)
    assert calls == [15, 4, 4, 4, 3]
    torch.testing.assert_close(chunked, full)


def test_abar_indexed_by_training_timestep_in_a_run(schedule):
    """10-step DDIM: timesteps 900, 800, ..., 0 differ from the step counter 0..9. The per-step mean
    of the `sample` map must follow (1-abar[t])^2 / v_t^2 at the training t; indexing abar by the
    step counter (abar ~ 1, a near-zero jitter) would give values orders of magnitude smaller."""
    sampler = DDIMSampler(schedule, steps=10, clip=False)
    est = AleatoricUncertainty(M=5, variant="sample", keep_maps=True)
    sample(gaussian_eps, sampler, (1, 4, 4), range(100), hook=est)
    assert est.step_indices == list(range(10))
    assert sampler.timesteps != list(range(10))
    for i, t in enumerate(sampler.timesteps):
        if t < 50:  # x0 ~ x_t: U ~ (1-a)^2 is tiny and float32 round-off dominates; covered above
            continue
        assert est.step_maps[:, i].mean().item() == pytest.approx(k2(t), rel=0.1), (i, t)


def test_estimation_never_changes_the_samples(schedule):
    sampler = DDPMSampler(schedule, steps=20)  # stochastic: any shift of the sampler's noise shows
    plain = sample(toy_eps, sampler, (2, 4, 4), [3, 4, 5])
    est = AleatoricUncertainty(M=3)
    with_est = sample(toy_eps, sampler, (2, 4, 4), [3, 4, 5], hook=est)
    assert torch.equal(plain, with_est)
    assert est.scores.shape == (3,) and (est.scores > 0).all()
    assert est.nfe == 20 * 3 * 3


def test_scores_do_not_depend_on_the_batch(schedule):
    sampler = DDIMSampler(schedule, steps=8, eta=0.5)
    est = AleatoricUncertainty(M=3, chunk_size=5)
    sample(toy_eps, sampler, (1, 4, 4), [7, 8, 9, 10], hook=est)
    together = est.scores.clone()
    sample(toy_eps, sampler, (1, 4, 4), [9], hook=est)
    torch.testing.assert_close(est.scores, together[2:3])


def test_score_is_sum_over_window_steps_and_pixels(schedule):
    sampler = DDIMSampler(schedule, steps=20)
    est = AleatoricUncertainty(M=2, window=(0.0, 0.15), keep_maps=True)
    sample(toy_eps, sampler, (1, 4, 4), [0, 1], hook=est)
    assert est.step_indices == [0, 1, 2]  # 0.15 * 20 = 3 steps despite float rounding
    torch.testing.assert_close(est.maps, est.step_maps.sum(1))
    torch.testing.assert_close(est.scores, est.step_maps.sum((1, 2, 3, 4)))
    # a second run starts afresh
    sample(toy_eps, sampler, (1, 4, 4), [0, 1], hook=est)
    assert est.step_indices == [0, 1, 2]


def test_window_steps():
    assert list(window_steps((0.0, 0.15), 20)) == [0, 1, 2]
    assert list(window_steps((0.0, 1.0), 7)) == list(range(7))
    assert list(window_steps((0.5, 1.0), 5)) == [3, 4]  # 2.5 <= i < 5
    assert list(window_steps((0.1, 0.3), 10)) == [1, 2]


@pytest.mark.parametrize("kwargs, option", [
    (dict(M=1), "M"),
    (dict(variant="biased"), "variant"),
    (dict(window=(0.5, 0.5)), "window"),
    (dict(window=(-0.1, 0.5)), "window"),
    (dict(window=(0.0, 1.5)), "window"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_aleatoric_validation_names_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        AleatoricUncertainty(**kwargs)


# ----------------------------------------------------------------------------------------------
# MC-Dropout


class DropNet(nn.Module):
    """BatchNorm (whose train mode would change outputs and running stats) and dropout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Conv2d(4, 1, 1)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.2)
            self.bn.running_var.fill_(2.0)

    def forward(self, x, t):
        return self.out(self.drop(torch.relu(self.bn(self.conv(x)))))


def make_ctx(model, b=3, index=0, num_steps=4, t=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 4, 4, generator=gen)
    t_b = torch.full((b,), t)
    noise = SampleNoise(range(b))
    sampler = DDIMSampler(NoiseSchedule(), steps=num_steps)
    with torch.no_grad():
        eps = model(x, t_b)
    return StepContext(index, num_steps, t, -1, x, eps, model, sampler, noise)


def test_mc_dropout_zero_rate_has_zero_variance_and_norms_stay_in_eval():
    model = DropNet().train()  # whatever the caller's mode, only dropout may be active
    stats = model.bn.running_mean.clone()
    ctx = make_ctx(model.eval())
    model.train()
    est = MCDropoutUncertainty(model, M=4, dropout=0.0)
    assert torch.equal(est(ctx), ctx.eps)
    assert torch.equal(est.maps, torch.zeros_like(ctx.eps))
    assert torch.equal(model.bn.running_mean, stats)  # BatchNorm never ran in train mode
    assert model.training and model.bn.training and model.drop.p == 0.3  # modes and rate restored
    assert est.nfe == 3 * 4


def test_mc_dropout_positive_variance_with_dropout():
    model = DropNet().eval()
    ctx = make_ctx(model)
    est = MCDropoutUncertainty(model, M=6, dropout=0.1)
    est(ctx)
    assert (est.scores > 0).all()
    assert not model.training and model.drop.p == 0.3


def test_mc_dropout_variance_of_inverted_dropout_matches_its_closed_form():
    """Through dropout alone, a pixel x is x / (1 - p) with probability 1 - p and 0 otherwise: its variance
    over passes is x^2 p / (1 - p), which the unbiased variance of M passes estimates without bias."""

    class DropoutOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.3)

        def forward(self, x, t):
            return self.drop(x)

    p, m = 0.2, 400
    model = DropoutOnly().eval()
    ctx = make_ctx(model, b=4)
    est = MCDropoutUncertainty(model, M=m, dropout=p)
    est(ctx)
    ratio = est.maps / (ctx.x_t**2 * p / (1 - p))  # ~ 1 per pixel
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.03)
    # sd(s^2) / var = sqrt((mu_4 / var^2 - 1) / M), mu_4 / var^2 = (1 - 3q + 3q^2) / (q (1 - q)) for Bernoulli(q)
    q = 1 - p
    assert ratio.std().item() == pytest.approx(((1 - 3 * q + 3 * q * q) / (q * (1 - q)) - 1) ** 0.5 / m**0.5, rel=0.2)
    assert model.drop.p == 0.3 and not model.training


def test_mc_dropout_on_unet_groupnorm():
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), dropout=0.1)
    with torch.no_grad():  # give Ho's zero-initialised layers weights, so outputs depend on the net
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ctx = make_ctx(net.eval(), b=2)
    est = MCDropoutUncertainty(net, M=3)
    est(ctx)
    assert (est.scores > 0).all()
    est0 = MCDropoutUncertainty(net, M=3, dropout=0.0)
    est0(ctx)  # identical passes up to float rounding of the batched kernels
    assert est0.scores.max() < 1e-6 * est.scores.min()


def test_mc_dropout_reproducible_for_the_same_batch():
    model = DropNet().eval()
    ctx = make_ctx(model)
    a, b = MCDropoutUncertainty(model, dropout=0.2), MCDropoutUncertainty(model, dropout=0.2)
    a(ctx), b(ctx)
    torch.testing.assert_close(a.maps, b.maps)


@pytest.mark.parametrize("kwargs, option", [
    (dict(M=1), "M"),
    (dict(dropout=1.0), "dropout"),
    (dict(window=(0.2, 0.1)), "window"),
    (dict(chunk_size=-1), "chunk_size"),
])
def test_mc_dropout_validation_names_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        MCDropoutUncertainty(DropNet(), **kwargs)


def test_mc_dropout_needs_dropout_layers():
    with pytest.raises(ValueError, match="dropout"):
        MCDropoutUncertainty(nn.Conv2d(1, 1, 1))


def test_mc_dropout_on_a_model_trained_without_dropout_needs_a_rate():
    """At the model's own rate 0 every pass is the same network: all-zero maps, so it is refused."""
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), dropout=0.0)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    with pytest.raises(ValueError, match="trained without dropout.*dropout="):
        MCDropoutUncertainty(net, M=3)
    est = MCDropoutUncertainty(net, M=3, dropout=0.1)
    est(make_ctx(net.eval(), b=2))
    assert (est.scores > 0).all()
    assert all(d.p == 0.0 for d in net.modules() if isinstance(d, nn.Dropout))  # its own rate restored


# ----------------------------------------------------------------------------------------------
# generate() and build_hook()


def test_generate_is_batch_independent_and_counts_every_evaluation(schedule):
    from uncdiff.uncertainty.sampling import generate

    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return toy_eps(x, t)

    sampler = DDPMSampler(schedule, steps=5)
    est = AleatoricUncertainty(M=3, keep_maps=True, window=(0.0, 0.6))
    together = generate(counted, sampler, (1, 4, 4), [5, 6, 7], est, batch_size=3)
    assert sum(calls) == together.nfe == 3 * 5 + 3 * 3 * 3  # 5 steps, M = 3 on steps 0, 1, 2
    apart = generate(toy_eps, sampler, (1, 4, 4), [5, 6, 7], est, batch_size=2)
    torch.testing.assert_close(apart.images, together.images)
    torch.testing.assert_close(apart.scores, together.scores)
    assert together.step_maps.shape == (3, 3, 1, 4, 4) and together.step_indices == [0, 1, 2]
    plain = generate(toy_eps, sampler, (1, 4, 4), [5, 6, 7])
    assert torch.equal(plain.images, together.images) and plain.maps is None and plain.nfe == 15


def test_build_hook_builds_each_estimator_from_its_spec():
    from uncdiff.uncertainty.sampling import build_hook
    from uncdiff.uncertainty.spec import EstimatorSpec

    assert build_hook(EstimatorSpec()) is None
    est = build_hook(EstimatorSpec("aleatoric", M=3, variant="sample", window=(0.0, 0.5)))
    assert isinstance(est, AleatoricUncertainty) and (est.M, est.variant, est.window) == (3, "sample", (0.0, 0.5))
    with pytest.raises(ValueError, match="net"):
        build_hook(EstimatorSpec("mc_dropout"))
    with pytest.raises(ValueError, match="Laplace"):
        build_hook(EstimatorSpec("bayesdiff"), net=nn.Conv2d(1, 1, 1))
