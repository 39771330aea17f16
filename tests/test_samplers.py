"""Samplers (docs/algorithms.md §2) against independent truths.

- Every step is compared with a textbook loop written here from the papers (Ho et al. Algorithm 2 /
  the posterior mean of q(x_{t-1} | x_t, x0); Song et al. eq. 12), with its own float64 schedule and
  timestep lists, fed the same noise, to float32 rounding.
- For Gaussian data the exact noise predictor is linear in x_t, so every step is affine and the
  output mean and variance follow in closed form; samples are compared with that pushforward.
- Per-sample seeds and independent noise streams are checked as properties.
"""

import numpy as np
import pytest
import torch

from uncdiff.core.samplers import (DDIMSampler, DDPMSampler, SampleNoise, StepContext, make_sampler, sample,
                              spaced_timesteps)
from uncdiff.core.schedule import NoiseSchedule

T = 1000
MU, S = 0.3, 0.5  # Gaussian data x0 ~ N(MU, S^2) per pixel

# Textbook schedule (Ho et al.): linear betas 1e-4..0.02, abar = cumprod(1 - beta); abar(-1) = 1.
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def abar(t: int) -> float:
    return 1.0 if t < 0 else float(ABAR[t])


def song_uniform(steps: int) -> list[int]:
    """Song et al.'s DDIM code, `skip_type == 'uniform'` (descending)."""
    return list(range(0, T, T // steps))[::-1]


def song_quadratic(steps: int) -> list[int]:
    """Song et al.'s DDIM code, `skip_type == 'quad'` (descending)."""
    return [int(v) for v in np.linspace(0, np.sqrt(0.8 * T), steps) ** 2][::-1]


def pairs(ts: list[int]) -> list[tuple[int, int]]:
    return list(zip(ts, ts[1:] + [-1]))


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A small nonlinear, t-dependent noise predictor (works in any float dtype)."""
    return torch.tanh(x) * (t.to(x.dtype)[:, None, None, None] / 1000) + 0.1 * x


def gaussian_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact eps*(x_t, t) = E[eps | x_t] for x0 ~ N(MU, S^2): sqrt(1-a)(x_t - sqrt(a) MU) / (a S^2 + 1 - a)."""
    a = torch.as_tensor(ABAR, dtype=x.dtype)[t].view(-1, 1, 1, 1)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", T)


class Recording:
    """Wraps a sampler and records what `sample()` hands each step (x_t, t, t_prev, noise)."""

    def __init__(self, inner):
        self.inner = inner
        self.schedule, self.timesteps = inner.schedule, inner.timesteps
        self.clip, self.stochastic = inner.clip, inner.stochastic
        self.calls = []

    def step(self, eps, t, t_prev, x_t, noise=None):
        self.calls.append(dict(t=t, t_prev=t_prev, x_t=x_t.clone(), noise=None if noise is None else noise.clone()))
        return self.inner.step(eps, t, t_prev, x_t, noise)


# ----------------------------------------------------------------------------------------------
# Textbook loops (float64, own schedule, own timesteps)


def textbook_ddpm(eps_model, x_T, noises, ts, variance, clip):
    """Ho et al. Algorithm 2, respaced with alpha_t = abar[t] / abar[t_prev]. Without clipping in its
    eps form `(x_t - beta / sqrt(1 - abar) eps) / sqrt(alpha) + sigma z`; with clipping as the posterior
    mean of q(x_{t_prev} | x_t, x0) at the clipped x0 (the only place clipping can enter)."""
    x = x_T.double()
    for (t, t_prev), z in zip(pairs(ts), noises):
        a, a_prev = abar(t), abar(t_prev)
        alpha = a / a_prev
        beta = 1 - alpha
        eps = eps_model(x, torch.full((x.shape[0],), t))
        if clip:
            x0 = ((x - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
            mean = a_prev**0.5 * beta / (1 - a) * x0 + alpha**0.5 * (1 - a_prev) / (1 - a) * x
        else:
            mean = (x - beta / (1 - a) ** 0.5 * eps) / alpha**0.5
        if t_prev < 0:  # last step: no noise (Algorithm 2, "z = 0 if t = 1")
            x = mean
        else:
            var = beta if variance == "beta" else (1 - a_prev) / (1 - a) * beta
            x = mean + var**0.5 * z.double()
    return x


def textbook_ddim(eps_model, x_T, noises, ts, eta, clip):
    """Song et al. eq. 12 with sigma from eq. 16; with clipping, eps is re-derived from the clipped x0."""
    x = x_T.double()
    for (t, t_prev), z in zip(pairs(ts), noises):
        a, a_prev = abar(t), abar(t_prev)
        eps = eps_model(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        sigma = eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * z.double()
    return x


def run_recorded(sampler, eps_model=toy_eps, shape=(1, 4, 4), seeds=(0, 1, 2), hook=None):
    rec = Recording(sampler)
    out = sample(eps_model, rec, shape, list(seeds), hook=hook)
    return out, rec


def check_noise_passed(rec, stochastic):
    """A stochastic sampler gets fresh noise at every step but the last, a deterministic one none."""
    for call in rec.calls:
        if stochastic and call["t_prev"] >= 0:
            assert call["noise"] is not None and call["noise"].shape == call["x_t"].shape
        else:
            assert call["noise"] is None


# ----------------------------------------------------------------------------------------------
# 1. Every sampler equals its textbook loop


@pytest.mark.parametrize("steps", [None, 100])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_matches_textbook(schedule, variance, clip, steps):
    sampler = DDPMSampler(schedule, steps=steps, variance=variance, clip=clip)
    ts = song_uniform(steps or T)
    assert sampler.timesteps == ts
    out, rec = run_recorded(sampler)
    assert [(c["t"], c["t_prev"]) for c in rec.calls] == pairs(ts)
    check_noise_passed(rec, stochastic=True)
    ref = textbook_ddpm(toy_eps, rec.calls[0]["x_t"], [c["noise"] for c in rec.calls], ts, variance, clip)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    if clip:  # clipping really was exercised: the unclipped loop gives a different answer
        unclipped = textbook_ddpm(toy_eps, rec.calls[0]["x_t"], [c["noise"] for c in rec.calls], ts, variance, False)
        assert (unclipped - ref).abs().max() > 1e-2


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing,steps", [("uniform", 50), ("uniform", 20), ("quadratic", 20), ("quadratic", 10)])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_textbook(schedule, eta, spacing, steps, clip):
    sampler = DDIMSampler(schedule, steps=steps, eta=eta, spacing=spacing, clip=clip)
    ts = song_uniform(steps) if spacing == "uniform" else song_quadratic(steps)
    assert sampler.timesteps == ts
    out, rec = run_recorded(sampler)
    assert [(c["t"], c["t_prev"]) for c in rec.calls] == pairs(ts)
    check_noise_passed(rec, stochastic=eta > 0)
    ref = textbook_ddim(toy_eps, rec.calls[0]["x_t"], [c["noise"] for c in rec.calls], ts, eta, clip)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_make_sampler_builds_by_name(schedule):
    ddim = make_sampler(schedule, "ddim", steps=10, eta=0.5, spacing="quadratic", clip=False)
    assert isinstance(ddim, DDIMSampler)
    assert (ddim.eta, ddim.clip, ddim.timesteps) == (0.5, False, song_quadratic(10))
    ddpm = make_sampler(schedule, "ddpm", steps=50, variance="beta")
    assert isinstance(ddpm, DDPMSampler) and ddpm.variance == "beta" and ddpm.timesteps == song_uniform(50)


# ----------------------------------------------------------------------------------------------
# Timestep lists


@pytest.mark.parametrize("steps", [1, 2, 10, 20, 50, 100, 250, 1000])
def test_uniform_spacing_is_songs_for_divisors_of_T(steps):
    assert spaced_timesteps(T, steps, "uniform") == song_uniform(steps)


@pytest.mark.parametrize("steps", [3, 7, 30, 300, 600, 999])
def test_uniform_spacing_gives_exactly_steps_timesteps(steps):
    # Song's range(0, T, T // S) gives more than S steps when S does not divide T (S = 600 gives 1000);
    # uncdiff keeps exactly S: floor(i T / S), i = 0..S-1, descending.
    ts = spaced_timesteps(T, steps, "uniform")
    assert ts == [i * T // steps for i in range(steps)][::-1]
    assert len(set(ts)) == steps and ts[-1] == 0


@pytest.mark.parametrize("steps", [2, 5, 10, 15, 20, 25, 29])
def test_quadratic_spacing_is_songs(steps):
    assert spaced_timesteps(T, steps, "quadratic") == song_quadratic(steps)


@pytest.mark.parametrize("steps", [16, 21, 26, 27])
def test_quadratic_spacing_is_songs_at_exact_squares(steps):
    assert spaced_timesteps(T, steps, "quadratic") == song_quadratic(steps)


# ----------------------------------------------------------------------------------------------
# 2. Gaussian data: exact predictor, closed-form pushforward


def affine_step(t, t_prev, kind, eta=0.0, variance="beta_tilde"):
    """For eps = k (x - sqrt(a) MU) the unclipped step is x' = cx x + c0 + sigma z; returns (cx, c0, sigma)."""
    a, a_prev = abar(t), abar(t_prev)
    k = (1 - a) ** 0.5 / (a * S**2 + 1 - a)
    # x0 = (x - sqrt(1-a) eps) / sqrt(a) = x0x x + x0c
    x0x, x0c = (1 - (1 - a) ** 0.5 * k) / a**0.5, (1 - a) ** 0.5 * k * MU
    ex, ec = k, -k * a**0.5 * MU  # eps = ex x + ec
    if kind == "ddim":
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        ce = (1 - a_prev - sigma**2) ** 0.5
        return a_prev**0.5 * x0x + ce * ex, a_prev**0.5 * x0c + ce * ec, sigma
    beta = 1 - a / a_prev
    cx = a_prev**0.5 * beta / (1 - a) * x0x + (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)
    c0 = a_prev**0.5 * beta / (1 - a) * x0c
    var = beta if variance == "beta" else beta * (1 - a_prev) / (1 - a)
    return cx, c0, (var if t_prev >= 0 else 0.0) ** 0.5


def pushforward(ts, kind, **kw):
    """Exact (mean, var) of x_0 from x_{ts[0]} ~ N(0, 1), propagating through the affine steps."""
    mean, var = 0.0, 1.0
    for t, t_prev in pairs(ts):
        cx, c0, sigma = affine_step(t, t_prev, kind, **kw)
        mean, var = cx * mean + c0, cx**2 * var + sigma**2
    return mean, var


def assert_moments(x: torch.Tensor, mean: float, var: float, n_sigma: float = 5.0):
    """Empirical mean/var of iid N(mean, var) pixels agree within n_sigma standard errors."""
    x = x.double().flatten()
    n = x.numel()
    assert abs(x.mean().item() - mean) < n_sigma * (var / n) ** 0.5
    assert abs(x.var().item() - var) < n_sigma * var * (2 / (n - 1)) ** 0.5


def test_gaussian_predictor_is_the_posterior_mean_of_eps():
    # Independent check of the closed form used below: regress eps on x_t by Monte Carlo.
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(200_000, generator=g, dtype=torch.float64)
    eps = torch.randn(200_000, generator=g, dtype=torch.float64)
    for t in (10, 500, 990):
        a = abar(t)
        x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
        slope = torch.cov(torch.stack([x_t, eps]))[0, 1] / x_t.var()
        intercept = eps.mean() - slope * x_t.mean()
        pred = gaussian_eps(x_t.view(1, 1, 1, -1), torch.tensor([t])).flatten()
        fit = slope * x_t + intercept
        assert (pred - fit).abs().max() < 0.02


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_1000_steps_samples_the_gaussian(schedule, variance):
    x = sample(gaussian_eps, DDPMSampler(schedule, variance=variance, clip=False), (1, 8, 8), range(64))
    n = x.numel()  # 4096 iid pixels
    assert abs(x.mean().item() - MU) < 5 * S / n**0.5
    assert abs(x.std().item() - S) < 5 * S / (2 * n) ** 0.5
    # and, sharper, the exact pushforward of the 1000 affine steps
    assert_moments(x, *pushforward(song_uniform(T), "ddpm", variance=variance))


@pytest.mark.parametrize("steps", [20, 50, 100])
def test_ddim_matches_exact_pushforward(schedule, steps):
    x_T = {}

    def grab(ctx: StepContext):
        if ctx.index == 0:
            x_T["x"] = ctx.x_t.clone()
        return ctx.eps

    x = sample(gaussian_eps, DDIMSampler(schedule, steps, eta=0.0, clip=False), (1, 8, 8), range(64), hook=grab)
    ts = song_uniform(steps)
    # eta = 0 is deterministic and affine: x_0 = C x_T + D exactly, pixel by pixel
    c, d = 1.0, 0.0
    for t, t_prev in pairs(ts):
        cx, c0, _ = affine_step(t, t_prev, "ddim")
        c, d = cx * c, cx * d + c0
    torch.testing.assert_close(x.double(), c * x_T["x"].double() + d, rtol=1e-5, atol=1e-5)
    mean, var = pushforward(ts, "ddim")
    assert (mean, var) == pytest.approx((d, c**2))
    assert_moments(x, mean, var)


def test_ddim_pushforward_std_approaches_s_with_steps():
    # Few-step DDIM is biased even with the exact predictor (docs/algorithms.md §2); the bias shrinks with steps.
    stds = [pushforward(song_uniform(n), "ddim")[1] ** 0.5 for n in (10, 20, 50, 100, 250, 500, 1000)]
    assert all(a < b < S for a, b in zip(stds, stds[1:]))
    assert abs(stds[-1] - S) < 0.002
    assert stds[0] < S - 0.1


def test_ddim_250_steps_std_is_close_to_s(schedule):
    x = sample(gaussian_eps, DDIMSampler(schedule, 250, eta=0.0, clip=False), (1, 8, 8), range(256))
    n = x.numel()  # 16384 pixels: standard error of the std ~ 0.0028; the 250-step bias is ~ 0.006
    assert abs(x.mean().item() - MU) < 5 * S / n**0.5
    assert abs(x.std().item() - S) < 0.015


# ----------------------------------------------------------------------------------------------
# 3. Per-sample seeds and noise streams


STOCHASTIC = [
    pytest.param(lambda sch: DDPMSampler(sch, steps=100), id="ddpm"),
    pytest.param(lambda sch: DDIMSampler(sch, 20, eta=1.0), id="ddim-eta1"),
]
SEEDS = [0, 1, 2, 3, 7, 123456, 2**31, 2**32 - 1]


@pytest.mark.parametrize("make", STOCHASTIC)
def test_same_seed_same_image_whatever_the_batch(schedule, make):
    sampler = make(schedule)
    shape = (2, 4, 4)
    one_batch = sample(toy_eps, sampler, shape, SEEDS)
    in_threes = torch.cat([sample(toy_eps, sampler, shape, SEEDS[i:i + 3]) for i in range(0, len(SEEDS), 3)])
    alone = torch.cat([sample(toy_eps, sampler, shape, [s]) for s in SEEDS])
    reversed_order = sample(toy_eps, sampler, shape, SEEDS[::-1]).flip(0)
    assert torch.equal(one_batch, in_threes)
    assert torch.equal(one_batch, alone)
    assert torch.equal(one_batch, reversed_order)
    flat = one_batch.flatten(1)
    distance = torch.cdist(flat, flat) + torch.eye(len(SEEDS)) * 1e9
    assert distance.min() > 1e-3  # different seeds, different images


@pytest.mark.parametrize("make", STOCHASTIC)
def test_drawing_from_another_stream_leaves_images_unchanged(schedule, make):
    sampler = make(schedule)
    shape = (1, 4, 4)

    def estimator(ctx: StepContext):
        for _ in range(3):
            ctx.noise.randn((5, *shape), stream="uncertainty")
        return ctx.eps

    plain = sample(toy_eps, sampler, shape, SEEDS[:4])
    assert torch.equal(sample(toy_eps, sampler, shape, SEEDS[:4], hook=estimator), plain)


def test_stream_values_do_not_depend_on_which_stream_was_used_first():
    shape = (3, 4)
    a = SampleNoise([5, 9])
    a_sampler = [a.randn(shape) for _ in range(2)]
    b = SampleNoise([5, 9])
    b.randn(shape, stream="uncertainty")
    b_sampler = [b.randn(shape) for _ in range(2)]
    assert all(torch.equal(u, v) for u, v in zip(a_sampler, b_sampler))


def test_noise_streams_are_independent():
    shape = (16, 16)
    noise = SampleNoise([3, 11])
    x_T = noise.initial(shape)
    z = noise.randn(shape)
    u = noise.randn(shape, stream="uncertainty")
    for p, q in [(x_T, z), (x_T, u), (z, u)]:
        corr = torch.corrcoef(torch.stack([p.flatten(), q.flatten()]))[0, 1]
        assert abs(corr) < 0.2


def test_sample_noise_rejects_out_of_range_seeds():
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match="seeds"):
            SampleNoise([0, bad])


# ----------------------------------------------------------------------------------------------
# 4. The hook


@pytest.mark.parametrize("make", [
    pytest.param(lambda sch: DDPMSampler(sch, steps=50), id="ddpm"),
    pytest.param(lambda sch: DDIMSampler(sch, 10, spacing="quadratic"), id="ddim-quad"),
])
def test_hook_sees_the_sampler_steps(schedule, make):
    sampler = make(schedule)
    seen = []

    def hook(ctx: StepContext):
        seen.append((ctx.index, ctx.num_steps, ctx.t, ctx.t_prev, ctx.sampler is sampler, ctx.eps_model is toy_eps))
        assert ctx.x_t.shape == ctx.eps.shape == (2, 1, 4, 4)
        torch.testing.assert_close(ctx.eps, toy_eps(ctx.x_t, torch.full((2,), ctx.t)))
        return ctx.eps

    sample(toy_eps, sampler, (1, 4, 4), [0, 1], hook=hook)
    n = len(sampler.timesteps)
    assert seen == [(i, n, t, tp, True, True) for i, (t, tp) in enumerate(pairs(sampler.timesteps))]


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_hook_replacing_eps_acts_like_the_textbook_with_that_eps(schedule, kind):
    sampler = DDPMSampler(schedule, steps=100, clip=True) if kind == "ddpm" else DDIMSampler(schedule, 20, eta=0.5)

    def zero(ctx: StepContext):
        return ctx.eps * 0

    out, rec = run_recorded(sampler, hook=zero)
    zero_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    noises = [c["noise"] for c in rec.calls]
    x_T = rec.calls[0]["x_t"]
    if kind == "ddpm":
        ref = textbook_ddpm(zero_model, x_T, noises, song_uniform(100), "beta_tilde", True)
    else:
        ref = textbook_ddim(zero_model, x_T, noises, song_uniform(20), 0.5, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, sample(toy_eps, sampler, (1, 4, 4), [0, 1, 2]))


# ----------------------------------------------------------------------------------------------
# 5. Bad options fail at construction, naming the option


@pytest.mark.parametrize("steps", [-1, 1001])
def test_steps_out_of_range(schedule, steps):
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(schedule, steps)
    with pytest.raises(ValueError, match="steps"):
        DDPMSampler(schedule, steps=steps)
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(T, steps)


def test_zero_steps_rejected_by_ddim(schedule):
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(schedule, 0)


def test_zero_steps_rejected_by_ddpm(schedule):
    with pytest.raises(ValueError, match="steps"):
        DDPMSampler(schedule, steps=0)


def test_bad_options_are_named(schedule):
    with pytest.raises(ValueError, match="spacing"):
        DDIMSampler(schedule, 10, spacing="linear")
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eta"):
            DDIMSampler(schedule, 10, eta=eta)
    with pytest.raises(ValueError, match="sampler"):
        make_sampler(schedule, "euler")
    with pytest.raises(ValueError, match="variance"):
        DDPMSampler(schedule, variance="learned")
    # floor(linspace(0, sqrt(800), S)^2) repeats timesteps from S = 30 on (0, 0, ...)
    with pytest.raises(ValueError, match="spacing"):
        DDIMSampler(schedule, 30, spacing="quadratic")
    with pytest.raises(ValueError, match="spacing"):
        DDIMSampler(schedule, 100, spacing="quadratic")
