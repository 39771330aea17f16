"""The generative-uncertainty estimator (Jazbec et al. 2025, docs/algorithms.md §6c): checked against
what it must reduce to (a zero-variance posterior gives the MAP network's sample and score 0), its cost,
and the trace of a covariance written out here."""

import pytest
import torch
from torch import nn

from uncdiff.core.samplers import DDIMSampler, DDPMSampler, sample
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.bayesdiff import LastLayerLaplace
from uncdiff.uncertainty.generative import GenerativeUncertainty, posterior_heads

SHAPE, SEEDS, STEPS, M = (2, 4, 4), [0, 1, 2], 5, 3


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def features(self, x, t):
        return torch.tanh(self.body(x) + (t.to(x.dtype) / 1000)[:, None, None, None])

    def forward(self, x, t):
        return self.head(self.features(x, t))


def laplace_of(net: TinyNet, variance: float) -> LastLayerLaplace:
    w, b = net.head.weight.detach(), net.head.bias.detach()
    return LastLayerLaplace(weight=w, bias=b, var_W=torch.full_like(w, variance), var_b=torch.full_like(b, variance))


@pytest.fixture(params=["ddpm", "ddim"])
def sampler(request):
    schedule = NoiseSchedule("linear", 1000)
    return DDPMSampler(schedule, steps=STEPS) if request.param == "ddpm" else DDIMSampler(schedule, steps=STEPS)


def test_a_zero_variance_posterior_gives_the_map_sample_and_no_disagreement(sampler):
    net = TinyNet().eval()
    estimator = GenerativeUncertainty(net, laplace_of(net, 0.0), M=M)
    chain = sample(estimator.chain_model(0), sampler, SHAPE, SEEDS)
    torch.testing.assert_close(chain, sample(net, sampler, SHAPE, SEEDS))
    maps, scores = estimator(sampler, SHAPE, SEEDS)
    assert torch.equal(scores, torch.zeros(len(SEEDS))) and torch.equal(maps, torch.zeros(len(SEEDS), *SHAPE))


def test_costs_M_chains_and_scores_the_trace_of_the_feature_covariance(sampler):
    net = TinyNet().eval()
    projection = torch.randn(2 * 4 * 4, 3, generator=torch.Generator().manual_seed(1))

    def features(images):
        return images.flatten(1) @ projection

    estimator = GenerativeUncertainty(net, laplace_of(net, 1e-2), M=M, seed=7, features=features)
    maps, scores = estimator(sampler, SHAPE, SEEDS)
    assert estimator.nfe == M * STEPS * len(SEEDS)
    finals = [sample(GenerativeUncertainty(net, laplace_of(net, 1e-2), M=M, seed=7).chain_model(m), sampler, SHAPE,
                     SEEDS).double() for m in range(M)]
    phi = [features(x.float()).double() for x in finals]
    mean = sum(phi) / M
    trace = sum(((p - mean) ** 2).sum(1) for p in phi) / (M - 1)
    torch.testing.assert_close(scores.double(), trace, rtol=1e-4, atol=1e-6)
    assert (scores > 0).all()
    one_by_one = torch.cat([estimator(sampler, SHAPE, [s])[1] for s in SEEDS])
    torch.testing.assert_close(one_by_one, scores)  # a seed's score does not depend on its batch


def test_posterior_draws_follow_the_posterior_variance():
    w, b = torch.zeros(2, 3, 1, 1), torch.zeros(2)
    laplace = LastLayerLaplace(weight=w, bias=b, var_W=torch.full_like(w, 4.0), var_b=torch.full_like(b, 0.25))
    heads = posterior_heads(laplace, 4000, seed=0)
    weights = torch.stack([h[0] for h in heads]).double()
    biases = torch.stack([h[1] for h in heads]).double()
    assert abs(weights.var().item() - 4.0) < 0.2 and abs(biases.var().item() - 0.25) < 0.02
    with pytest.raises(ValueError, match="M must be an integer >= 2"):
        posterior_heads(laplace, 1)


def test_through_the_module_sample_it_runs_after_the_plain_chain():
    from conftest import tiny_model_kwargs
    from uncdiff.core.samplers import make_sampler
    from uncdiff.lightning.module import DiffusionModule
    from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

    torch.manual_seed(0)
    module = DiffusionModule(**tiny_model_kwargs())
    with torch.no_grad():  # give the zero-initialised layers weights so samples depend on the net
        for p in module.ema.ema_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec, n, steps, m = SamplerSpec("ddim", 4), 3, 4, 2
    with pytest.raises(ValueError, match="estimator.name generative needs a fitted Laplace posterior"):
        module.sample(n, sampler=spec, estimator=EstimatorSpec("generative", M=m))
    module.fit_laplace(torch.rand(6, 1, 8, 8) * 2 - 1, num_images=6)
    plain = module.sample(n, seed=2, sampler=spec)
    result = module.sample(n, seed=2, sampler=spec, estimator=EstimatorSpec("generative", M=m), batch_size=2)
    assert result.nfe == plain.nfe + m * steps * n
    torch.testing.assert_close(result.images, plain.images)  # the plain chain is the sample
    # the estimator run by hand on the same seeds (pixel features, the default posterior draws)
    net = module.ema.ema_model.eval()
    maps, scores = GenerativeUncertainty(net, module.laplace, M=m)(make_sampler(module.schedule, "ddim", steps=steps),
                                                                    module.image_shape, [2, 3, 4])
    torch.testing.assert_close(result.scores, scores)
    torch.testing.assert_close(result.maps, maps)
    assert (result.scores > 0).all()
    with pytest.raises(ValueError, match="guidance.rule posterior estimates with the aleatoric estimator; "
                                         "estimator.name is generative"):
        module.sample(n, sampler=spec, estimator=EstimatorSpec("generative"), guidance=GuidanceSpec("posterior"))


def test_features_put_the_score_in_the_datasets_feature_space():
    """`estimator.features digits-classifier` scores the chains' disagreement in the shipped digits
    classifier's features: what the estimator gives with that extractor passed by hand, not the pixel
    score; a setting that cannot apply fails before sampling."""
    from conftest import tiny_model_kwargs
    from uncdiff.core.samplers import make_sampler
    from uncdiff.evaluation.fid import ClassifierFeatures
    from uncdiff.lightning.module import DiffusionModule
    from uncdiff.uncertainty.sampling import build_hook
    from uncdiff.uncertainty.spec import EstimatorSpec, SamplerSpec

    torch.manual_seed(0)
    module = DiffusionModule(**tiny_model_kwargs())
    with torch.no_grad():
        for p in module.ema.ema_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module.fit_laplace(torch.rand(6, 1, 8, 8) * 2 - 1, num_images=6)
    spec, seeds = SamplerSpec("ddim", 4), [2, 3, 4]
    result = module.sample(seeds=seeds, sampler=spec, estimator=EstimatorSpec("generative", M=2,
                                                                             features="digits-classifier"))
    classifier = ClassifierFeatures("digits", image_size=8)
    maps, scores = GenerativeUncertainty(module.ema.ema_model.eval(), module.laplace, M=2, features=classifier)(
        make_sampler(module.schedule, "ddim", steps=4), module.image_shape, seeds)
    torch.testing.assert_close(result.scores, scores)
    torch.testing.assert_close(result.maps, maps)  # the map stays the pixels' variance
    pixels = module.sample(seeds=seeds, sampler=spec, estimator=EstimatorSpec("generative", M=2)).scores
    torch.testing.assert_close(pixels, maps.flatten(1).sum(1))
    assert not torch.allclose(scores, pixels)
    with pytest.raises(ValueError, match="estimator.features digits-classifier applies to the generative "
                                         "estimator"):
        EstimatorSpec("aleatoric", features="digits-classifier")
    with pytest.raises(ValueError, match="estimator.features digits-classifier needs its feature extractor"):
        build_hook(EstimatorSpec("generative", features="digits-classifier"), net=module.ema.ema_model,
                   laplace=module.laplace)
    rgb = DiffusionModule(**tiny_model_kwargs(in_channels=3))
    with pytest.raises(ValueError, match="reads 1-channel images; this model makes 3-channel ones"):
        rgb.generative_features(EstimatorSpec("generative", features="digits-classifier"))
    large = DiffusionModule(**tiny_model_kwargs(image_size=32, attn_resolutions=()))
    with pytest.raises(ValueError, match="no digits classifier ships for 32x32 images"):
        large.generative_features(EstimatorSpec("generative", features="digits-classifier"))


def test_an_image_to_image_model_scores_only_the_generated_pixels():
    from conftest import tiny_model_kwargs
    from uncdiff.data.masks import box_mask
    from uncdiff.lightning.image_to_image import ImageToImageModule
    from uncdiff.uncertainty.spec import EstimatorSpec, SamplerSpec

    torch.manual_seed(0)
    module = ImageToImageModule(task="inpaint", **tiny_model_kwargs()).eval()
    with torch.no_grad():
        for p in module.ema.ema_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    condition, mask = torch.rand(3, 1, 8, 8) * 2 - 1, box_mask(8)[None].repeat(3, 1, 1, 1)
    module.fit_laplace(condition, num_images=3, conditions=condition)
    spec = SamplerSpec("ddim", 4)
    plain = module.sample(condition, mask, sampler=spec)
    result = module.sample(condition, mask, sampler=spec, estimator=EstimatorSpec("generative", M=2))
    assert result.nfe == plain.nfe + 2 * 4 * 3 and torch.equal(result.images, plain.images)
    assert torch.equal(result.maps * (1 - mask), torch.zeros_like(result.maps))  # the known pixels never vary
    torch.testing.assert_close(result.scores, result.maps.flatten(1).sum(1))
    assert (result.scores > 0).all()
    with pytest.raises(ValueError, match="estimator.features digits-classifier: an image-to-image model's"):
        module.sample(condition, mask, sampler=spec,
                      estimator=EstimatorSpec("generative", features="digits-classifier"))
