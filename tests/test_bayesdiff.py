"""BayesDiff (docs/algorithms.md §5b) against independent truths: per-sample autograd for the Fisher diagonal,
sampled heads for the closed-form predictive variance, Monte Carlo trajectories for the DDIM
variance propagation, and the pass counts docs/algorithms.md §5b states."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uncdiff.uncertainty.bayesdiff import (MOMENT_ESTIMATORS, BayesDiffUncertainty, FeatureCachingEps, LastLayerLaplace, fit_last_layer_laplace,
                               last_layer_fisher)
from uncdiff.core.samplers import DDIMSampler, DDPMSampler, SampleNoise, sample
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.sampling import generate
from uncdiff.core.unet import UNet

T = 1000
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def abar(t: int) -> float:
    return 1.0 if t < 0 else float(ABAR[t])


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", T)


class TinyConvNet(nn.Module):
    """features -> head, like the U-Net's last layer (3x3 conv with padding)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(2, 5, 3, padding=1)
        self.head = nn.Conv2d(5, 2, 3, padding=1)

    def features(self, x, t):
        return torch.tanh(self.body(x) + t.to(x.dtype)[:, None, None, None] / 1000)

    def forward(self, x, t):
        return self.head(self.features(x, t))


def test_fisher_diagonal_equals_per_sample_autograd(schedule):
    torch.manual_seed(0)
    net = TinyConvNet().double()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([10, 300, 700, 999])
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    h_w, h_b = last_layer_fisher(net, x0, t, eps, schedule)
    want_w, want_b = torch.zeros_like(net.head.weight), torch.zeros_like(net.head.bias)
    for i in range(4):  # brute force: one sample at a time, autograd through the head
        a = abar(int(t[i]))
        x_t = a**0.5 * x0[i:i + 1] + (1 - a) ** 0.5 * eps[i:i + 1]
        loss = (net(x_t, t[i:i + 1]) - eps[i:i + 1]).pow(2).sum()
        gw, gb = torch.autograd.grad(loss, (net.head.weight, net.head.bias))
        want_w += 0.5 * gw**2
        want_b += 0.5 * gb**2
    torch.testing.assert_close(h_w, want_w.detach(), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(h_b, want_b.detach(), rtol=1e-6, atol=1e-10)


def test_fit_posterior_variance(schedule):
    torch.manual_seed(0)
    net = TinyConvNet().double()
    images = torch.randn(7, 2, 5, 5, dtype=torch.float64)
    la = fit_last_layer_laplace(net, images, schedule, num_images=6, prior_precision=2.0, sigma_noise=0.5,
                                seed=3, batch_size=8)
    # the documented draws: t then eps from a CPU generator seeded with `seed`, per batch
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, T, (6,), generator=gen)
    eps = torch.randn(6, 2, 5, 5, generator=gen).double()
    h_w, h_b = last_layer_fisher(net, images[:6], t, eps, schedule)
    torch.testing.assert_close(la.var_W, 1 / (h_w / 0.25 + 2.0))
    torch.testing.assert_close(la.var_b, 1 / (h_b / 0.25 + 2.0))
    assert la.num_images == 6 and la.seed == 3 and la.padding == (1, 1)
    # an iterable of (image, label) pairs gives the same fit as the tensor
    la2 = fit_last_layer_laplace(net, [(x, 0) for x in images], schedule, num_images=6, prior_precision=2.0,
                                 sigma_noise=0.5, seed=3, batch_size=8)
    torch.testing.assert_close(la2.var_W, la.var_W)


def test_closed_form_predictive_variance_equals_sampled_heads():
    gen = torch.Generator().manual_seed(0)
    la = LastLayerLaplace(weight=torch.randn(2, 3, 3, 3, generator=gen), bias=torch.randn(2, generator=gen),
                          var_W=0.05 * torch.rand(2, 3, 3, 3, generator=gen), var_b=torch.tensor([0.02, 0.1]))
    h = torch.randn(2, 3, 4, 4, generator=gen)
    closed = la.predictive_variance(h)
    # the direct formula, written out: sum over inputs of var_W * h^2 at each tap, plus var_b
    hp = F.pad(h, (1, 1, 1, 1))
    direct = torch.zeros_like(closed) + la.var_b.view(1, 2, 1, 1)
    for dy in range(3):
        for dx in range(3):
            direct += torch.einsum("oc,bchw->bohw", la.var_W[:, :, dy, dx], hp[:, :, dy:dy + 4, dx:dx + 4] ** 2)
    torch.testing.assert_close(closed, direct)
    sampled = la.sampled_variance(h, num_heads=20000, generator=torch.Generator().manual_seed(1))
    # relative sd of a variance estimate from n draws is sqrt(2 / n) = 1%
    torch.testing.assert_close(sampled, closed, rtol=0.06, atol=0)


def test_laplace_state_dict_round_trip(tmp_path, schedule):
    net = TinyConvNet()
    la = fit_last_layer_laplace(net, torch.randn(3, 2, 5, 5), schedule, num_images=3)
    torch.save(la.state_dict(), tmp_path / "la.pt")
    back = LastLayerLaplace.from_state_dict(torch.load(tmp_path / "la.pt", weights_only=True))
    h = torch.randn(1, 5, 5, 5)
    torch.testing.assert_close(back.predictive_variance(h), la.predictive_variance(h))
    assert back.num_images == 3 and back.stride == (1, 1)


def test_feature_caching_eps():
    net = TinyConvNet().train()
    cache = FeatureCachingEps(net)
    x, t = torch.randn(2, 2, 5, 5), torch.full((2,), 40)
    with torch.no_grad():
        torch.testing.assert_close(cache(x, t), net(x, t))
        assert torch.equal(cache.cached_features(x, 40), net.features(x, t))
    assert cache.cached_features(x.clone(), 40) is None and cache.cached_features(x, 41) is None
    assert net.training


# ----------------------------------------------------------------------------------------------
# Propagation


MU, S = 0.3, 0.5


class AnalyticNet(nn.Module):
    """features = a nonlinear eps predictor, head = identity 1x1 conv: net(x, t) == features.

    The predictor is the exact one for Gaussian data N(MU, S^2) plus a nonlinear term that mixes
    neighbouring pixels, so trajectories behave like a diffusion model's (they don't blow up)."""

    def __init__(self, channels=1):
        super().__init__()
        self.head = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.head.bias.zero_()

    @staticmethod
    def eps_map(x, t):
        a = torch.as_tensor(ABAR, dtype=x.dtype)[t].view(-1, 1, 1, 1)
        gaussian = (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        return (1 - a).sqrt() * (gaussian + 0.3 * torch.tanh(2 * x + 0.5 * torch.roll(x, 1, -1)))

    def features(self, x, t):
        return self.eps_map(x, t)

    def forward(self, x, t):
        return self.head(self.features(x, t))


class FixedVariance:
    """A stand-in Laplace with a known per-pixel eps variance."""

    def __init__(self, var):
        self.var = var

    def predictive_variance(self, h):
        return torch.full_like(h, self.var)


class Recorder:
    def __init__(self, hook):
        self.hook, self.steps = hook, []

    def __call__(self, ctx):
        out = self.hook(ctx)
        self.steps.append((ctx.t, ctx.t_prev, ctx.x_t.clone(), ctx.eps.clone(), out.clone()))
        return out


def k_coefficients(t, t_prev):
    kx = (abar(t_prev) / abar(t)) ** 0.5
    return kx, (1 - abar(t_prev)) ** 0.5 - kx * (1 - abar(t)) ** 0.5


@pytest.mark.parametrize("moments", ["paper", "regression"])
def test_first_steps_by_hand(schedule, moments):
    """Steps 0, 1 (first draw block) and the final non-UQ step against the formulas written out."""
    var_eps, s_draws, seeds, shape = 0.02, 6, [3, 4], (1, 2, 3)
    bd = BayesDiffUncertainty(AnalyticNet(), FixedVariance(var_eps), draws=s_draws, skip=1, moments=moments,
                              keep_maps=True)
    rec = Recorder(bd)
    sample(bd.eps_model, DDIMSampler(schedule, steps=4, clip=False), shape, seeds, hook=rec)
    var = bd.step_maps.double()
    # step 0: Var[x_T] = 0, MAP eps, Cov = 0: Var = ke^2 var_eps
    t, t_prev, _, eps0, out0 = rec.steps[0]
    kx, ke = k_coefficients(t, t_prev)
    assert torch.equal(out0, eps0)
    torch.testing.assert_close(var[:, 0], torch.full_like(var[:, 0], ke**2 * var_eps))
    # step 1: draws from the per-sample 'bayesdiff' stream, reproduced independently
    t, t_prev, x_t, _, out1 = rec.steps[1]
    kx, ke = k_coefficients(t, t_prev)
    v = var[:, 0]
    z = SampleNoise(seeds).randn((s_draws, *shape), stream="bayesdiff").double()
    x_j = x_t.double()[:, None] + v.sqrt()[:, None] * z
    eps_j = AnalyticNet.eps_map(x_j.flatten(0, 1), torch.full((2 * s_draws,), t)).view(x_j.shape)
    mean_eps = eps_j.mean(1)
    torch.testing.assert_close(out1.double(), mean_eps, rtol=1e-4, atol=1e-5)
    if moments == "paper":
        cov = (x_j * eps_j).mean(1) - x_t.double() * mean_eps
        want = kx**2 * v + 2 * kx * ke * cov + ke**2 * var_eps
    else:
        xs, es = x_j.numpy(), eps_j.numpy()
        want = torch.zeros_like(v)
        for b in range(2):
            for idx in np.ndindex(*shape):  # least-squares slope and residual variance per pixel
                xv, ev = xs[(b, slice(None)) + idx], es[(b, slice(None)) + idx]
                slope, intercept = np.polyfit(xv, ev, 1)
                resid = ((ev - slope * xv - intercept) ** 2).sum() / (s_draws - 1)
                want[(b,) + idx] = (kx + ke * slope) ** 2 * v[(b,) + idx] + ke**2 * (resid + var_eps)
    torch.testing.assert_close(var[:, 1], want, rtol=2e-3, atol=1e-7)
    # the final step (t = 0 -> x_0) is not a UQ step: Var = kx^2 Var, MAP eps
    t, t_prev, _, eps3, out3 = rec.steps[3]
    kx, _ = k_coefficients(t, t_prev)
    assert torch.equal(out3, eps3)
    torch.testing.assert_close(var[:, 3], kx**2 * var[:, 2])


def test_variance_propagation_matches_monte_carlo_trajectories(schedule):
    var_eps, steps, seeds, shape = 0.01, 10, [0, 1], (1, 4, 4)
    bd = BayesDiffUncertainty(AnalyticNet(), FixedVariance(var_eps), draws=10, skip=1, moments="regression")
    sample(bd.eps_model, DDIMSampler(schedule, steps=steps, clip=False), shape, seeds, hook=bd)
    propagated = bd.maps.double()  # Var[x_0], [2, 1, 4, 4]

    # brute force: DDIM (eta=0) trajectories from the same x_T with eps ~ N(eps_map(x), var_eps) at every step
    n = 4000
    gen = torch.Generator().manual_seed(9)
    ts = [i * T // steps for i in range(steps)][::-1]
    x = SampleNoise(seeds).initial(shape).double().repeat_interleave(n, 0)
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        e = AnalyticNet.eps_map(x, torch.full((x.shape[0],), t)) + var_eps**0.5 * noise
        x0 = (x - (1 - abar(t)) ** 0.5 * e) / abar(t) ** 0.5
        x = abar(t_prev) ** 0.5 * x0 + (1 - abar(t_prev)) ** 0.5 * e
    brute = x.view(len(seeds), n, *shape).var(1)  # relative MC error ~ sqrt(2 / n) = 2%
    ratio = propagated / brute
    assert ratio.min() > 1 / 1.5 and ratio.max() < 1.5, ratio


def test_skip_steps_scale_the_variance(schedule):
    bd = BayesDiffUncertainty(AnalyticNet(), FixedVariance(0.01), draws=3, skip=3, keep_maps=True)
    rec = Recorder(bd)
    sample(bd.eps_model, DDIMSampler(schedule, steps=8, clip=False), (1, 2, 2), [0], hook=rec)
    assert bd.draw_steps(8) == [3, 6]
    for i in (1, 2, 4, 5, 7):
        t, t_prev, _, eps, out = rec.steps[i]
        assert torch.equal(out, eps)
        torch.testing.assert_close(bd.step_maps[:, i], k_coefficients(t, t_prev)[0] ** 2 * bd.step_maps[:, i - 1])


@pytest.mark.parametrize("moments", ["paper", "regression"])
@pytest.mark.parametrize("skip, passes", [(5, 140), (1, 530)])
def test_pass_counts_for_50_ddim_steps(schedule, skip, passes, moments):
    net = AnalyticNet()
    bd = BayesDiffUncertainty(net, FixedVariance(0.01), draws=10, skip=skip, moments=moments)
    assert len(bd.draw_steps(50)) == (passes - 50) // 10
    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return bd.eps_model(x, t)

    result = generate(counted, DDIMSampler(schedule, steps=50, clip=False), (1, 2, 2), [0], bd)
    assert sum(calls) == passes
    assert result.nfe == passes
    assert result.maps.shape == (1, 1, 2, 2) and torch.isfinite(result.scores).all()


def test_uncached_features_cost_a_counted_pass(schedule):
    net = AnalyticNet()
    bd = BayesDiffUncertainty(net, FixedVariance(0.01), draws=3, skip=2)
    sample(lambda x, t: net(x, t), DDIMSampler(schedule, steps=6, clip=False), (1, 2, 2), [0], hook=bd)
    # UQ steps 0, 2, 4 each recompute the features (1 pass); draws at 2 and 4 (3 passes each)
    assert bd.nfe == 3 + 2 * 3


@pytest.mark.parametrize("sampler, match", [
    (lambda s: DDPMSampler(s, steps=4, clip=False), "ddim"),
    (lambda s: DDIMSampler(s, steps=4, eta=0.5, clip=False), "eta"),
    (lambda s: DDIMSampler(s, steps=4), "clip"),
])
def test_needs_deterministic_unclipped_ddim(schedule, sampler, match):
    bd = BayesDiffUncertainty(AnalyticNet(), FixedVariance(0.01))
    with pytest.raises(ValueError, match=match):
        sample(bd.eps_model, sampler(schedule), (1, 2, 2), [0], hook=bd)


@pytest.mark.parametrize("kwargs, option", [(dict(draws=1), "draws"), (dict(skip=0), "skip"),
                                            (dict(chunk_size=0), "chunk_size"), (dict(moments="exact"), "moments")])
def test_validation_names_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        BayesDiffUncertainty(AnalyticNet(), FixedVariance(0.01), **kwargs)


def test_on_the_unet(schedule):
    """End to end on a tiny U-Net: fit, then sample; per-sample draws make scores batch-independent."""
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), dropout=0.1)
    with torch.no_grad():  # give Ho's zero-initialised layers weights, so outputs depend on the net
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    la = fit_last_layer_laplace(net, torch.rand(6, 1, 8, 8) * 2 - 1, schedule, num_images=6, batch_size=4)
    assert (la.var_W > 0).all() and (la.var_W <= 1).all()
    bd = BayesDiffUncertainty(net, la, draws=3, skip=2, moments="regression", chunk_size=4)
    sampler = DDIMSampler(schedule, steps=6, clip=False)
    together = generate(bd.eps_model, sampler, (1, 8, 8), [0, 1, 2], bd, batch_size=3)
    alone = generate(bd.eps_model, sampler, (1, 8, 8), [0, 1, 2], bd, batch_size=1)
    assert together.nfe == alone.nfe == 3 * (6 + 2 * 3)
    assert torch.isfinite(together.maps).all() and (together.scores > 0).all()
    torch.testing.assert_close(alone.scores, together.scores, rtol=1e-4, atol=0)
    torch.testing.assert_close(alone.images, together.images, rtol=1e-4, atol=1e-5)


def test_regression_is_the_default_and_paper_the_other_estimator():
    assert BayesDiffUncertainty(AnalyticNet(), FixedVariance(0.01)).moments == "regression"
    assert MOMENT_ESTIMATORS == ("regression", "paper")
    with pytest.raises(ValueError, match="moments must be one of"):
        BayesDiffUncertainty(AnalyticNet(), FixedVariance(0.01), moments="spec")
