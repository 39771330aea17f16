"""The guidance switches of docs/algorithms.md §4 against independent truths: `grad_wrt` (eps_bar or
x_t) x `reduce` (sum or mean) against central finite differences of the uncertainty as a plain
function, and the posterior rule's `prior_precision` (1, a number, or the paper's 1 / abar[t])
against its closed form on a model whose perturbed predictions are known by hand."""

import pytest
import torch
import torch.nn.functional as F

from uncdiff.core.samplers import DDIMSampler, SampleNoise, StepContext
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.estimators import AleatoricUncertainty, aleatoric_map
from uncdiff.uncertainty.guidance import UncertaintyGuidance, posterior_eps, uncertainty_gradient

KERNEL = torch.tensor([[0.2, -0.1, 0.3], [-0.4, 0.8, 0.1], [0.15, -0.25, 0.05]], dtype=torch.float64)
T = 700  # a training timestep with abar well inside (0, 1)


def smooth_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Nonlinear, spatially mixing, t-dependent predictor (single channel, any float dtype)."""
    scale = 0.6 + t.to(x.dtype)[:, None, None, None] / 2000
    return torch.tanh(F.conv2d(x, KERNEL.to(x)[None, None], padding=1)) * scale + 0.15 * x**2


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", 1000)


def central_difference(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """d f / d x for a scalar function `f` of a float64 tensor, one element at a time."""
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        d = torch.zeros_like(x).view(-1)
        d[i] = h
        d = d.view_as(x)
        grad.view(-1)[i] = (f(x + d) - f(x - d)) / (2 * h)
    return grad


def scalar_u(schedule, z, variant, reduce):
    """U of docs/algorithms.md §4 as a plain function of (x_t, eps_bar): the per-image pixel sums of
    the map, then summed (`sum`) or averaged (`mean`) over the batch."""
    def u(x_t, eps_bar):
        per_image = aleatoric_map(smooth_eps, x_t, eps_bar, T, schedule, False, z, variant).sum((1, 2, 3))
        return per_image.sum() if reduce == "sum" else per_image.mean()
    return u


def inputs(seed=0, b=2, m=3):
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, 1, 3, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(b, m, 1, 3, 3, generator=gen, dtype=torch.float64)
    return x_t, z


@pytest.mark.parametrize("variant", ["centered", "sample"])
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("grad_wrt", ["eps", "x_t"])
def test_gradient_matches_finite_differences(schedule, grad_wrt, reduce, chunk_size, variant):
    x_t, z = inputs()
    b, m = z.shape[:2]
    eps_bar = smooth_eps(x_t, torch.full((b,), T))
    u = scalar_u(schedule, z, variant, reduce)
    if grad_wrt == "eps":  # x_t held fixed
        fd = central_difference(lambda e: u(x_t, e), eps_bar)
    else:  # eps_bar = eps_theta(x_t) follows x_t
        fd = central_difference(lambda x: u(x, smooth_eps(x, torch.full((b,), T))), x_t)
    maps, grad, rows = uncertainty_gradient(smooth_eps, x_t, eps_bar, T, schedule, False, z, variant, chunk_size,
                                            grad_wrt, reduce)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(maps, aleatoric_map(smooth_eps, x_t, eps_bar, T, schedule, False, z, variant))
    # M forward passes (2M chunked), and for x_t one more pass of the B images through eps_theta
    assert rows == (1 if chunk_size is None else 2) * b * m + (b if grad_wrt == "x_t" else 0)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("grad_wrt", ["eps", "x_t"])
@pytest.mark.parametrize("sign, lam", [(1, 0.3), (-1, 2.0)])
def test_guided_eps_is_eps_bar_plus_masked_finite_difference_step(schedule, grad_wrt, reduce, sign, lam):
    """The hook on one guided step: eps_tilde = eps_bar + sign * lam * m * dU, with U's derivative by
    finite differences and m = 1[U_t > the image's 0.6-quantile] (between two of its 9 values)."""
    sampler = DDIMSampler(schedule, steps=10, clip=False)
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = sampler.timesteps[0]
    noise = SampleNoise([7, 8])
    eps = smooth_eps(x, torch.full((2,), t))
    ctx = StepContext(0, 10, t, sampler.timesteps[1], x, eps, smooth_eps, sampler, noise)
    guide = UncertaintyGuidance(AleatoricUncertainty(M=3, keep_maps=True), window=(0.0, 0.1), quantile=0.6, sign=sign,
                                lam=lam, grad_wrt=grad_wrt, reduce=reduce)
    out = guide(ctx)

    z = SampleNoise([7, 8]).randn((3, 1, 3, 3), stream="uncertainty").double()  # the same draws, again
    u_map = aleatoric_map(smooth_eps, x, eps, t, schedule, False, z)
    mask = u_map > torch.quantile(u_map.flatten(1), 0.6, dim=1).view(-1, 1, 1, 1)
    assert mask.any() and not mask.all()
    u = lambda x_t, e: aleatoric_map(smooth_eps, x_t, e, t, schedule, False, z).sum((1, 2, 3))  # noqa: E731
    total = (lambda v: v.sum()) if reduce == "sum" else (lambda v: v.mean())
    if grad_wrt == "eps":
        fd = central_difference(lambda e: total(u(x, e)), eps)
    else:
        fd = central_difference(lambda xx: total(u(xx, smooth_eps(xx, torch.full((2,), t)))), x)
    torch.testing.assert_close(out, eps + sign * lam * mask * fd, rtol=1e-6, atol=1e-9)


def test_mean_is_the_sum_over_the_batch_size(schedule):
    """reduce='mean' (the released code) divides each image's gradient by the batch size: its
    strength depends on how many images share the batch."""
    x_t, z = inputs(seed=1, b=3)
    eps_bar = smooth_eps(x_t, torch.full((3,), T))
    for grad_wrt in ("eps", "x_t"):
        _, alone, _ = uncertainty_gradient(smooth_eps, x_t[:1], eps_bar[:1], T, schedule, False, z[:1],
                                           grad_wrt=grad_wrt, reduce="mean")
        _, batch, _ = uncertainty_gradient(smooth_eps, x_t, eps_bar, T, schedule, False, z, grad_wrt=grad_wrt,
                                           reduce="mean")
        torch.testing.assert_close(batch[:1], alone / 3)


def test_x_t_gradient_chunked_equals_whole_and_leaves_the_network_alone(schedule):
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    model = lambda x, t: torch.tanh(net(x))  # noqa: E731
    x_t, z = inputs(seed=2, b=3)
    eps = model(x_t, None).detach()
    _, whole, _ = uncertainty_gradient(model, x_t, eps, 300, schedule, True, z, grad_wrt="x_t")
    _, chunked, rows = uncertainty_gradient(model, x_t, eps, 300, schedule, True, z, chunk_size=2, grad_wrt="x_t")
    torch.testing.assert_close(chunked, whole)
    assert rows == 2 * 3 * 3 + 3
    assert net.weight.grad is None and net.bias.grad is None


# --------------------------------------------------------------------------------- posterior rule

def test_posterior_closed_form_on_constructed_predictions():
    """eps_i = 1, 2, 3 and eps_bar = 2: sigma2 = unbiased variance of {1, 2, 3, 2} = 2/3, and
    mu = (6 / sigma2) / (3 / sigma2 + p) = 9 / (4.5 + p)."""
    eps_i = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    eps_bar = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    on, off = torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.zeros(1, 1, 1, 1, dtype=torch.bool)
    for p in (0.0, 1.0, 4.0, 1e4):
        assert posterior_eps(eps_i, eps_bar, p, on).item() == pytest.approx(9 / (4.5 + p), rel=1e-12)
        assert posterior_eps(eps_i, eps_bar, p, off).item() == 2.0
    # equal predictions: sigma2 = 0, mu is their mean whatever the prior
    same = torch.full((1, 3, 1, 1, 1), 0.7, dtype=torch.float64)
    assert posterior_eps(same, torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64), 1e4, on).item() == \
        pytest.approx(0.7, rel=1e-12)


def identity_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps_theta(x) = x: with eps_bar = x_t and no clipping, x0_hat = x_t (1 - sqrt(1 - abar)) / sqrt(abar),
    so the perturbed predictions are known in closed form: eps_i = x_t (1 - sqrt(1 - abar)) + sqrt(1 - abar) z_i."""
    return x


@pytest.mark.parametrize("prior_precision", [None, 1.0, 0.25, "abar_inverse"])
def test_posterior_hook_against_its_closed_form(schedule, prior_precision):
    """The default prior precision is 1 (docs/algorithms.md §4); 'abar_inverse' is the paper's 1 / abar[t]."""
    sampler = DDIMSampler(schedule, steps=10, clip=False)
    t = sampler.timesteps[2]
    abar = schedule.abar_at(t)
    x = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ctx = StepContext(2, 10, t, sampler.timesteps[3], x, x.clone(), identity_eps, sampler, SampleNoise([3, 4]))
    options = {} if prior_precision is None else {"prior_precision": prior_precision}
    every_pixel = torch.full((10, 1, 2, 3), -float("inf"))  # threshold table -inf: the mask is all ones
    guide = UncertaintyGuidance(AleatoricUncertainty(M=4), rule="posterior", window=(0.2, 0.3), table=every_pixel,
                                **options)
    out = guide(ctx)

    z = SampleNoise([3, 4]).randn((4, 1, 2, 3), stream="uncertainty").double()
    s = (1 - abar) ** 0.5
    eps_i = x[:, None] * (1 - s) + s * z
    precision = {None: 1.0, 1.0: 1.0, 0.25: 0.25, "abar_inverse": 1 / abar}[prior_precision]
    values = torch.cat([eps_i, x[:, None]], 1)
    sigma2 = ((values - values.mean(1, keepdim=True)) ** 2).sum(1) / 4  # unbiased over the M + 1 = 5 values
    mu = (eps_i.sum(1) / sigma2) / (4 / sigma2 + precision)
    torch.testing.assert_close(out, mu, rtol=1e-10, atol=1e-12)
    if prior_precision == "abar_inverse":
        assert 1 / abar > 10  # the paper's prior is strong here: mu is pulled towards 0 ...
        assert out.abs().mean() < 0.5 * eps_i.mean(1).abs().mean()  # ... well below the predictions' mean


@pytest.mark.parametrize("kwargs, option", [
    (dict(grad_wrt="z"), "grad_wrt"),
    (dict(reduce="max"), "reduce"),
    (dict(prior_precision=-1.0), "prior_precision"),
    (dict(prior_precision=float("inf")), "prior_precision"),
    (dict(prior_precision=float("nan")), "prior_precision"),
    (dict(prior_precision="abar"), "prior_precision"),
    (dict(prior_precision=True), "prior_precision"),
])
def test_switch_validation_names_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        UncertaintyGuidance(AleatoricUncertainty(), **kwargs)


# ----------------------------------------------------------------------------------- the run spec

@pytest.mark.parametrize("argv, expected", [
    (["--guidance.rule", "gradient"], {"sign": 1, "lam": 1.0, "grad_wrt": "eps", "reduce": "sum"}),
    (["--guidance.rule", "gradient", "--guidance.grad_wrt", "x_t", "--guidance.reduce", "mean", "--guidance.lam",
      "0.1"], {"sign": 1, "lam": 0.1, "grad_wrt": "x_t", "reduce": "mean"}),
    (["--guidance.rule", "posterior"], {"prior_precision": 1.0}),
    (["--guidance.rule", "posterior", "--guidance.prior_precision", "abar_inverse"],
     {"prior_precision": "abar_inverse"}),
    (["--guidance.rule", "posterior", "--guidance.prior_precision", "3"], {"prior_precision": 3.0}),
])
def test_command_line_options_reach_the_hook(argv, expected):
    """`--guidance.*` parsed into a GuidanceSpec as a command parses it: each rule records only its own
    options, and the hook gets them."""
    from jsonargparse import ArgumentParser

    from uncdiff.uncertainty.sampling import build_hook
    from uncdiff.uncertainty.spec import GuidanceSpec

    parser = ArgumentParser()
    parser.add_class_arguments(GuidanceSpec, "guidance", skip={"table"})
    spec = parser.instantiate_classes(parser.parse_args(argv)).guidance
    assert {k: v for k, v in spec.settings().items() if k not in ("rule", "quantile", "window")} == expected
    hook = build_hook(guidance=spec)
    assert all(getattr(hook, k) == v for k, v in expected.items())


def test_spec_refuses_a_bad_switch_by_its_option_name():
    from uncdiff.uncertainty.spec import GuidanceSpec

    with pytest.raises(ValueError, match="guidance.grad_wrt"):
        GuidanceSpec("gradient", grad_wrt="x0")
    with pytest.raises(ValueError, match="guidance.prior_precision"):
        GuidanceSpec("posterior", prior_precision="abar")
