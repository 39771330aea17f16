"""Uncertainty guidance (docs/algorithms.md §4) against independent truths: finite differences for the gradient
rule, the posterior formula evaluated by hand, and trajectory properties of the hook."""

import math

import pytest
import torch
import torch.nn.functional as F

from uncdiff.uncertainty.calibration import calibrate_threshold_table
from uncdiff.io.tables import load_threshold_table, save_threshold_table
from uncdiff.uncertainty.guidance import UncertaintyGuidance, posterior_eps, uncertainty_gradient
from uncdiff.core.samplers import DDIMSampler, DDPMSampler, SampleNoise, StepContext, sample
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.estimators import AleatoricUncertainty, aleatoric_map

def guided_hook(M: int = 5, estimate_window=(0.0, 1.0), keep_maps: bool = False, **options) -> UncertaintyGuidance:
    """Guidance estimating with M perturbations over `estimate_window`; `options` are the guidance's."""
    return UncertaintyGuidance(AleatoricUncertainty(M, window=estimate_window, keep_maps=keep_maps), **options)


KERNEL = torch.tensor([[0.1, -0.3, 0.2], [0.4, 0.9, -0.2], [0.05, 0.3, -0.1]], dtype=torch.float64)


def smooth_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Nonlinear, spatially mixing, t-dependent predictor (single channel, any float dtype)."""
    k = KERNEL.to(x)[None, None]
    scale = 0.5 + t.to(x.dtype)[:, None, None, None] / 1000
    return torch.tanh(F.conv2d(x, k, padding=1)) * scale + 0.2 * x**2


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", 1000)


@pytest.mark.parametrize("variant", ["centered", "sample"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradient_matches_central_differences(schedule, variant, chunk_size):
    gen = torch.Generator().manual_seed(0)
    b, m, t = 2, 3, 600
    x_t = torch.randn(b, 1, 3, 3, generator=gen, dtype=torch.float64)
    eps_bar = smooth_eps(x_t, torch.full((b,), t))
    z = torch.randn(b, m, 1, 3, 3, generator=gen, dtype=torch.float64)

    def total_u(e):  # U summed over pixels, per image, as a function of eps_bar alone (z, x_t fixed)
        return aleatoric_map(smooth_eps, x_t, e, t, schedule, False, z, variant).sum((1, 2, 3))

    u, grad, rows = uncertainty_gradient(smooth_eps, x_t, eps_bar, t, schedule, False, z, variant, chunk_size)
    torch.testing.assert_close(u, aleatoric_map(smooth_eps, x_t, eps_bar, t, schedule, False, z, variant))
    assert rows == (b * m if chunk_size is None else 2 * b * m)
    h = 1e-6
    fd = torch.zeros_like(eps_bar)
    for idx in range(eps_bar.numel()):
        d = torch.zeros(eps_bar.numel(), dtype=torch.float64)
        d[idx] = h
        d = d.view_as(eps_bar)
        img = idx // eps_bar[0].numel()  # images are independent: d U_img / d eps_bar[img]
        fd.view(-1)[idx] = (total_u(eps_bar + d)[img] - total_u(eps_bar - d)[img]) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_gradient_needs_a_differentiable_model(schedule):
    no_grad_eps = torch.no_grad()(smooth_eps)
    x = torch.randn(1, 1, 3, 3)
    with pytest.raises(RuntimeError, match="no_grad"):
        uncertainty_gradient(no_grad_eps, x, smooth_eps(x, torch.full((1,), 500)), 500, schedule, False,
                             torch.randn(1, 2, 1, 3, 3))


def test_posterior_rule_by_hand():
    gen = torch.Generator().manual_seed(3)
    b, m = 2, 3
    eps_i = torch.randn(b, m, 1, 2, 2, generator=gen, dtype=torch.float64)
    eps_bar = torch.randn(b, 1, 2, 2, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[[[1, 0], [1, 1]]], [[[0, 1], [1, 0]]]], dtype=torch.bool)
    abar = 0.37
    out = posterior_eps(eps_i, eps_bar, 1 / abar, mask)  # the paper's prior precision 1 / abar[t]
    for bi in range(b):
        for h in range(2):
            for w in range(2):
                values = [eps_i[bi, i, 0, h, w].item() for i in range(m)] + [eps_bar[bi, 0, h, w].item()]
                mean = sum(values) / len(values)
                sigma2 = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                mu = (sum(values[:m]) / sigma2) / (m / sigma2 + 1 / abar)  # sum over the M perturbations
                expected = mu if mask[bi, 0, h, w] else eps_bar[bi, 0, h, w].item()
                assert out[bi, 0, h, w].item() == pytest.approx(expected, rel=1e-12)


class Recorder:
    """Wraps a hook and records, per step, x_t, the network's eps and the eps the hook returned."""

    def __init__(self, hook=None):
        self.hook, self.steps = hook, []

    def __call__(self, ctx):
        out = ctx.eps if self.hook is None else self.hook(ctx)
        self.steps.append((ctx.x_t.clone(), ctx.eps.clone(), out.clone()))
        return out


@pytest.mark.parametrize("rule", ["gradient", "posterior"])
def test_guidance_changes_only_its_window(schedule, rule):
    sampler = DDIMSampler(schedule, steps=10)
    seeds, shape = [0, 1, 2], (1, 4, 4)
    plain, guided = Recorder(), Recorder(guided_hook(M=3, rule=rule, lam=5.0,
                                                             window=(0.4, 0.6), quantile=0.5))
    sample(smooth_eps, sampler, shape, seeds, hook=plain)
    sample(smooth_eps, sampler, shape, seeds, hook=guided)
    for i, ((x_p, _, out_p), (x_g, eps_g, out_g)) in enumerate(zip(plain.steps, guided.steps)):
        if i <= 4:  # before the first guided step's update x_t is the same
            assert torch.equal(x_p, x_g), i
        else:
            assert not torch.equal(x_p, x_g), i
        if i in (4, 5):  # the guidance window: steps 0.4*10 <= i < 0.6*10
            assert not torch.equal(out_g, eps_g), i
        else:
            assert torch.equal(out_g, eps_g), i


def test_percentile_mask_guides_the_most_uncertain_pixels(schedule):
    sampler = DDIMSampler(schedule, steps=10, clip=False)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    ctx = StepContext(0, 10, sampler.timesteps[0], sampler.timesteps[1], x, smooth_eps(x, torch.full((2,), 900)),
                      smooth_eps, sampler, SampleNoise([0, 1]))
    guide = guided_hook(M=4, window=(0.0, 0.5), keep_maps=True)
    out = guide(ctx)
    changed = out != ctx.eps
    u = guide.step_maps[:, 0]
    # q = 0.95 of 16 values interpolates between the two largest: only each image's maximum is above it
    assert changed.flatten(1).sum(1).tolist() == [1, 1]
    assert torch.equal(changed.flatten(1).float().argmax(1), u.flatten(1).argmax(1))
    z = SampleNoise([0, 1]).randn((4, 1, 4, 4), stream="uncertainty")  # the same draws, independently
    _, grad, _ = uncertainty_gradient(smooth_eps, x, ctx.eps, ctx.t, schedule, False, z)
    torch.testing.assert_close(out, ctx.eps + changed * grad)


def test_guided_run_reports_the_unguided_maps_up_to_its_first_update(schedule):
    sampler = DDIMSampler(schedule, steps=10)
    est = AleatoricUncertainty(M=3, keep_maps=True)
    guide = guided_hook(M=3, window=(0.3, 0.6), keep_maps=True)
    sample(smooth_eps, sampler, (1, 4, 4), [4, 5], hook=est)
    sample(smooth_eps, sampler, (1, 4, 4), [4, 5], hook=guide)
    assert guide.step_indices == list(range(10))
    torch.testing.assert_close(guide.step_maps[:, :4], est.step_maps[:, :4])  # same x_t, same z
    assert not torch.allclose(guide.step_maps[:, 5:], est.step_maps[:, 5:])
    assert guide.nfe == est.nfe == 10 * 2 * 3


@pytest.mark.parametrize("make", [lambda s: DDPMSampler(s, steps=8), lambda s: DDIMSampler(s, steps=8, eta=1.0)])
def test_guidance_works_under_any_sampler(schedule, make):
    sampler = make(schedule)
    plain = sample(smooth_eps, sampler, (1, 4, 4), [0, 1])
    guided = sample(smooth_eps, sampler, (1, 4, 4), [0, 1], hook=guided_hook(M=2, lam=3.0))
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)


def test_table_threshold(schedule, tmp_path):
    sampler = DDIMSampler(schedule, steps=5)
    shape, seeds = (1, 4, 4), list(range(40))
    table = calibrate_threshold_table(smooth_eps, sampler, shape, seeds, quantile=0.8, M=3,
                                      batch_size=16)
    assert table.shape == (5, 1, 4, 4)
    maps = AleatoricUncertainty(M=3, keep_maps=True)
    sample(smooth_eps, sampler, shape, seeds, hook=maps)
    above = (maps.step_maps > table[None]).float().mean(0)  # per step and position, over the samples
    assert above.mean().item() == pytest.approx(0.2, abs=0.02)
    torch.testing.assert_close(table[1, 0, 2, 3], torch.quantile(maps.step_maps[:, 1, 0, 2, 3], 0.8))

    save_threshold_table(tmp_path / "tau.pt", table, {"quantile": 0.8, "steps": 5, "M": 3})
    loaded, settings = load_threshold_table(tmp_path / "tau.pt", steps=5, image_shape=shape)
    assert torch.equal(loaded, table) and settings == {"quantile": 0.8, "steps": 5, "M": 3}
    with pytest.raises(ValueError, match="shape"):
        load_threshold_table(tmp_path / "tau.pt", steps=4)
    # a table of the first format (no kind, settings with the old names) is refused by name, not mis-read
    torch.save({"table": table, "settings": {"num_perturbations": 3}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="earlier uncdiff .*format 1.*calibrate it again"):
        load_threshold_table(tmp_path / "old.pt")

    plain = sample(smooth_eps, sampler, shape, [0, 1])
    never = guided_hook(table=torch.full((5, 1, 4, 4), math.inf), window=(0, 1))
    assert torch.equal(sample(smooth_eps, sampler, shape, [0, 1], hook=never), plain)
    guided = guided_hook(table=table, window=(0, 1), lam=3.0)
    assert not torch.equal(sample(smooth_eps, sampler, shape, [0, 1], hook=guided), plain)
    wrong = guided_hook(table=table[:3])
    with pytest.raises(ValueError, match="table"):
        sample(smooth_eps, sampler, shape, [0], hook=wrong)


@pytest.mark.parametrize("kwargs, option", [
    (dict(rule="momentum"), "rule"),
    (dict(sign=0), "sign"),
    (dict(sign=2), "sign"),
    (dict(lam=-1.0), "lam"),
    (dict(quantile=1.0), "quantile"),
    (dict(quantile=0.0), "quantile"),
    (dict(table=torch.zeros(4, 4)), "table"),
    (dict(window=(0.2, 0.1)), "window"),
])
def test_validation_names_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        guided_hook(**kwargs)


def test_gradient_leaves_the_network_parameters_alone(schedule):
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    model = lambda x, t: torch.tanh(net(x))
    z = torch.randn(2, 3, 1, 3, 3, dtype=torch.float64)
    eps = model(x, None).detach()
    _, one, _ = uncertainty_gradient(model, x, eps, 300, schedule, False, z)
    _, chunked, _ = uncertainty_gradient(model, x, eps, 300, schedule, False, z, chunk_size=2)
    torch.testing.assert_close(chunked, one)
    assert net.weight.grad is None and net.bias.grad is None
