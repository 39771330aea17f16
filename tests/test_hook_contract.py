"""The contract every sampling hook keeps, checked on one tiny network for each hook (none, aleatoric,
MC-Dropout, BayesDiff, x0 trajectory, generative) under each sampler (DDPM, DDIM), with guidance off and
on (aleatoric only).

1. Estimation never changes the images when guidance is off: the images equal plain sampling of the
   same seeds. (BayesDiff is the documented exception, docs/algorithms.md §5b: on its draw steps the
   step's eps is `E[eps]` over the draws, so its trajectory is the mean; without draw steps it too
   leaves the images alone.)
2. A seed's image and map do not depend on the batch it is in: batches of 1, 2 and 3 of the same
   seeds agree (MC-Dropout seeds each image's dropout masks from its own seed, docs/algorithms.md §5a).
3. The number of network evaluations (image rows through a network) is the cost of
   docs/algorithms.md, for N images, n sampler steps:
   - the sampler's own predictions: `N n` (§2), counted once;
   - aleatoric (§3) and MC-Dropout (§5a): `+ M N |W|`, `W` the window's steps
     (`ceil(start n) <= i < ceil(stop n)`);
   - BayesDiff (§5b): `+ S N |D|`, `D` the draw steps `{1 <= i < n - 1 : i % k == 0}` (the Laplace
     variance reuses the features of the sampler's pass);
   - x0 trajectory (§6c): nothing more; generative (§6c): `+ M N n` (M whole chains);
   - guidance (§4, gradient rule, no chunking): M forward passes per image on every step where a map is
     computed, i.e. `+ M N |G ∪ E|`, `G` the guidance window's steps, `E` the estimation window's
     (M's default is 5).
4. Hooks reset between runs: after a run on other seeds, a rerun gives identical images, maps, scores
   and evaluation count.
"""

import math

import pytest
import torch
from torch import nn

from uncdiff.core.samplers import DDIMSampler, DDPMSampler
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.bayesdiff import LastLayerLaplace
from uncdiff.uncertainty.sampling import build_hook, generate
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec

STEPS = 6
SHAPE = (2, 4, 4)
SEEDS = [11, 12, 13]
M = 3  # perturbations (aleatoric, guidance) and dropout passes (MC-Dropout)
M_DEFAULT = 5  # docs/algorithms.md §3: guidance without estimator options perturbs 5 times
S, SKIP = 3, 2  # BayesDiff draws and UQ stride
WINDOW = (0.0, 0.5)  # estimation window of aleatoric and MC-Dropout (and of the x0 trajectory)
GUIDANCE_WINDOW, ESTIMATE_WINDOW = (0.0, 0.5), (0.25, 1.0)
GUIDANCE = {"window": GUIDANCE_WINDOW, "lam": 0.05, "quantile": 0.8}


class TinyNet(nn.Module):
    """`net(x, t) == net.head(net.features(x, t))`, with a dropout layer (inactive in eval mode):
    every hook can run on it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(2, 6, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Conv2d(6, 2, 3, padding=1)

    def features(self, x, t):
        return self.drop(torch.tanh(self.body(x) + (t.to(x.dtype) / 1000)[:, None, None, None]))

    def forward(self, x, t):
        return self.head(self.features(x, t))


@pytest.fixture(scope="module")
def net():
    return TinyNet().eval()


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", 1000)


def make_sampler(schedule, name):
    if name == "ddpm":  # stochastic: a hook that shifted the sampler's noise would show
        return DDPMSampler(schedule, steps=STEPS)
    return DDIMSampler(schedule, steps=STEPS, eta=0.0, clip=False)  # BayesDiff's sampler


def steps_in(window, n):
    """docs/algorithms.md §3: step i is inside when ceil(start n) <= i < ceil(stop n)."""
    return set(range(math.ceil(window[0] * n), math.ceil(window[1] * n)))


def expected_nfe(hook, guided, n_images, n=STEPS):
    """The cost formula of docs/algorithms.md (the module docstring, point 3)."""
    own = n_images * n
    if guided:
        steps = steps_in(GUIDANCE_WINDOW, n) | (steps_in(ESTIMATE_WINDOW, n) if hook == "aleatoric"
                                                   else set(range(n)))
        return own + (M if hook == "aleatoric" else M_DEFAULT) * n_images * len(steps)
    if hook in ("aleatoric", "mc_dropout"):
        return own + M * n_images * len(steps_in(WINDOW, n))
    if hook == "bayesdiff":
        return own + S * n_images * len([i for i in range(1, n - 1) if i % SKIP == 0])
    if hook == "generative":
        return own + M * n_images * n
    return own


def laplace_of(net):
    """A last-layer posterior with small made-up variances (the fit is tested in test_bayesdiff.py)."""
    w, b = net.head.weight.detach(), net.head.bias.detach()
    return LastLayerLaplace(w.clone(), b.clone(), torch.full_like(w, 1e-3), torch.full_like(b, 1e-3))


def hook_and_model(net, hook, guided, skip=SKIP):
    """The hook as a run builds it (`build_hook` of the run's specs) and the eps model to sample with."""
    if guided:  # guidance estimates with the aleatoric estimator: its M and window, or the defaults
        estimator = EstimatorSpec(hook, M=M, window=ESTIMATE_WINDOW) if hook == "aleatoric" else EstimatorSpec()
    else:
        estimator = EstimatorSpec(hook, M=M, window=WINDOW, draws=S, skip=skip)
    guidance = GuidanceSpec("gradient", **GUIDANCE) if guided else None
    laplace = laplace_of(net) if hook in ("bayesdiff", "generative") else None
    est = build_hook(estimator, guidance, net=net, laplace=laplace, steps=STEPS, image_shape=SHAPE)
    return est, (est.eps_model if hook == "bayesdiff" else net)


CASES = [(hook, sampler, guided) for hook in ("none", "aleatoric", "mc_dropout", "bayesdiff", "x0_trajectory",
                                             "generative")
         for sampler in ("ddpm", "ddim") for guided in (False, True)
         if (hook != "bayesdiff" or sampler == "ddim") and (not guided or hook in ("none", "aleatoric"))]


@pytest.mark.parametrize("hook, sampler_name, guided", CASES)
def test_hook_contract(net, schedule, hook, sampler_name, guided):
    sampler = make_sampler(schedule, sampler_name)
    est, eps_model = hook_and_model(net, hook, guided)
    runs = {b: generate(eps_model, sampler, SHAPE, SEEDS, est, batch_size=b) for b in (1, 2, 3)}
    first = runs[3]

    # 1. estimation alone leaves the images as plain sampling makes them
    plain = generate(net, sampler, SHAPE, SEEDS)
    if not guided and hook != "bayesdiff":
        assert torch.equal(first.images, plain.images)

    # 2. a seed's image and map don't depend on its batch (the x0 trajectory's and the generative maps are
    # variances of nearly equal float32 images: their batch-dependent rounding shows at about 1e-5)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if hook in ("x0_trajectory", "generative") else {}
    for batch_size in (1, 2):
        torch.testing.assert_close(runs[batch_size].images, first.images)
        if hook != "none":
            torch.testing.assert_close(runs[batch_size].maps, first.maps, **tolerance)
            torch.testing.assert_close(runs[batch_size].scores, first.scores, **tolerance)

    # 3. the exact cost, whatever the batching
    for result in runs.values():
        assert result.nfe == expected_nfe(hook, guided, len(SEEDS))
    assert plain.nfe == len(SEEDS) * STEPS

    # 4. a run on other seeds in between leaves nothing behind
    generate(eps_model, sampler, SHAPE, [99], est, batch_size=1)
    again = generate(eps_model, sampler, SHAPE, SEEDS, est, batch_size=3)
    assert torch.equal(again.images, first.images) and again.nfe == first.nfe
    if est is None:  # no estimator and no guidance
        assert first.maps is None
    else:
        assert torch.equal(again.maps, first.maps) and torch.equal(again.scores, first.scores)
        assert first.maps.shape == (len(SEEDS), *SHAPE) and bool(torch.isfinite(first.maps).all())


def test_bayesdiff_without_draw_steps_leaves_the_images_alone(net, schedule):
    """With the UQ stride beyond the last step only step 0 is a UQ step, where `Var[x_T] = 0` needs
    no draws: the sampler keeps the MAP eps and the images are plain DDIM's."""
    sampler = make_sampler(schedule, "ddim")
    est, eps_model = hook_and_model(net, "bayesdiff", False, skip=STEPS)
    result = generate(eps_model, sampler, SHAPE, SEEDS, est)
    assert torch.equal(result.images, generate(net, sampler, SHAPE, SEEDS).images)
    assert result.nfe == len(SEEDS) * STEPS and bool((result.maps > 0).all())


@pytest.mark.parametrize("hook", ["mc_dropout", "bayesdiff", "x0_trajectory", "generative"])
def test_guidance_takes_only_the_aleatoric_estimator(net, hook):
    with pytest.raises(ValueError, match="guidance"):
        build_hook(EstimatorSpec(hook), GuidanceSpec("gradient"), net=net, laplace=laplace_of(net))
