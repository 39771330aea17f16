"""Image-to-image (docs/algorithms.md §7): masks and task transforms, the known-pixel sampler, the
conditional path against closed forms, every estimator on the conditional model against the plain
code on the closure, and bad input."""

import io
import math

import lightning
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import tiny_model_kwargs
from uncdiff.core.image_to_image import ConditionedNet, with_known_pixels
from uncdiff.core.samplers import DDIMSampler, DDPMSampler, SampleNoise, make_sampler
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.data.degradations import Task, jpeg_roundtrip, task_rng
from uncdiff.data.masks import box_mask, check_mask, uncrop_mask
from uncdiff.io.files import InputError
from uncdiff.io.images import from_uint8
from uncdiff.lightning.loading import load_module
from uncdiff.lightning.module import DiffusionModule
from uncdiff.lightning.image_to_image import ImageToImageModule
from uncdiff.uncertainty.bayesdiff import BayesDiffUncertainty
from uncdiff.uncertainty.estimators import AleatoricUncertainty, MCDropoutUncertainty
from uncdiff.uncertainty.guidance import UncertaintyGuidance
from uncdiff.uncertainty.image_to_image import generate_conditional
from uncdiff.uncertainty.sampling import generate
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec


def digit_pixels(n: int = 4, channels: int = 1, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


# ------------------------------------------------------------------------------ masks and tasks


def test_box_and_uncrop_masks_cover_the_stated_areas():
    assert box_mask(16).mean() == 0.25 and box_mask(16)[0, 4:12, 4:12].all()
    sides = set()
    for seed in range(12):
        mask = uncrop_mask(16, task_rng("uncrop", (seed,)), "one")
        assert mask.mean() == 0.5
        sides.add(tuple(mask[0, [0, 15, 8, 8], [8, 8, 0, 15]].tolist()))
    assert len(sides) == 4  # left, right, top and bottom halves all occur
    border = uncrop_mask(16, task_rng("uncrop", (0,)), "all")
    assert abs(float(border.mean()) - 0.5) < 0.05 and border[0, 0].all() and not border[0, 8, 8]


@pytest.mark.parametrize("name", ["inpaint", "uncrop", "super_resolve", "jpeg"])
def test_tasks_are_deterministic_per_key(name):
    task, pixels = Task(name), digit_pixels(1)[0]
    y1, m1 = task(pixels, (0, 1, 5))
    y2, m2 = task(pixels, (0, 1, 5))
    assert torch.equal(y1, y2) and torch.equal(m1, m2)
    others = [task(pixels, (0, 1, k)) for k in range(6, 12)]
    if name in ("inpaint", "uncrop", "jpeg"):  # drawn: some other key gives another pair
        assert any(not torch.equal(y, y1) for y, _ in others)


def test_inpaint_condition_is_the_image_at_known_pixels_and_noise_elsewhere():
    pixels = digit_pixels(1)[0]
    masks = []
    for k in range(20):
        y, mask = Task("inpaint", mask="strokes")(pixels, (k,))
        x0 = from_uint8(pixels)
        assert torch.equal(y[:, mask[0] == 0], x0[:, mask[0] == 0])
        assert 0 < mask.mean() < 1
        masks.append(mask)
    noise = torch.cat([Task("inpaint", mask="box")(pixels, (k,))[0][:, 4:12, 4:12].flatten() for k in range(20)])
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 10  # free-form: new strokes per key


def test_colorize_is_the_luma_of_pillow():
    pixels = digit_pixels(2, channels=3)
    y, mask = Task("colorize")(pixels[0], (0,))
    luma = np.asarray(Image.fromarray(pixels[0].permute(1, 2, 0).numpy(), "RGB").convert("L"), dtype=np.float32)
    assert torch.allclose((y[0] + 1) * 127.5, torch.from_numpy(luma), atol=1.0)  # Pillow rounds in integers
    assert torch.equal(y[0], y[1]) and torch.equal(y[0], y[2]) and mask.all()
    with pytest.raises(ValueError, match="super_resolve"):
        Task("colorize")(digit_pixels(1)[0], (0,))


def test_super_resolve_condition_is_block_means():
    pixels = digit_pixels(1)[0]
    y, _ = Task("super_resolve", factor=4)(pixels, (0,))
    x0 = from_uint8(pixels)[0]
    for i in range(4):
        for j in range(4):
            block = x0[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            assert torch.allclose(y[0, 4 * i:4 * i + 4, 4 * j:4 * j + 4], block.mean().expand(4, 4), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_condition_is_pillows_encoder_at_a_quality_in_range(channels):
    pixels = digit_pixels(1, channels)[0]
    mode = "L" if channels == 1 else "RGB"
    array = pixels.permute(1, 2, 0).numpy()
    by_quality = {}
    for q in range(1, 96):
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if channels == 1 else array, mode).save(buffer, format="JPEG", quality=q)
        by_quality[q] = np.asarray(Image.open(buffer)).reshape(16, 16, channels)
    used = set()
    for k in range(12):
        y, _ = Task("jpeg", quality=(5, 30))(pixels, (k,))
        decoded = ((y + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        matches = {q for q, d in by_quality.items() if np.array_equal(d, decoded)}
        assert matches & set(range(5, 31)), f"key {k}: no quality in 5..30 gives this image"
        used |= matches & set(range(5, 31))
    assert len(used) > 1
    smooth = (torch.arange(16)[None, :] * 8 + torch.arange(16)[:, None] * 4).to(torch.uint8).expand(channels, 16, 16)
    assert jpeg_roundtrip(smooth.contiguous(), 95).float().sub(smooth.float()).abs().max() <= 4  # a round trip


def test_bad_task_options_are_errors():
    for kwargs, match in ((dict(name="sharpen"), "task"), (dict(mask="circle"), "mask"), (dict(sides="two"), "sides"),
                          (dict(quality=(0, 30)), "quality"), (dict(factor=1), "factor")):
        with pytest.raises(ValueError, match=match):
            Task(**kwargs)


# ------------------------------------------------------------------------ known pixels, batching


class LinearConditionalNet(nn.Module):
    """A conditional eps model with random weights: `eps = W [y, x]` per pixel plus a t term."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        torch.manual_seed(0)
        nn.init.normal_(self.conv.weight, std=0.3)

    def forward(self, x, t):
        return self.drop(self.conv(x)) * (1 + t[:, None, None, None] / 1000)


@pytest.mark.parametrize("sampler", [DDPMSampler(NoiseSchedule(), 10), DDIMSampler(NoiseSchedule(), 10, eta=0.5)])
def test_known_pixels_come_out_exactly_and_batching_changes_nothing(sampler):
    y = torch.randn(5, 1, 8, 8)
    mask = torch.stack([uncrop_mask(8, task_rng("uncrop", (k,)), "mixed") for k in range(5)])
    net = LinearConditionalNet().eval()
    whole = generate_conditional(net, sampler, y, range(5), (1, 8, 8), mask, batch_size=5)
    known = mask.expand_as(y) == 0
    assert torch.equal(whole.images[known], y[known])
    assert not torch.equal(whole.images[~known], y[~known])
    single = generate_conditional(net, sampler, y, range(5), (1, 8, 8), mask, batch_size=2)
    assert torch.allclose(whole.images, single.images, atol=1e-5)  # float rounding of another batch size at most


def test_known_pixel_sampler_keeps_the_sampler_class_and_noises_known_pixels_to_the_step_level():
    schedule = NoiseSchedule()
    sampler = DDIMSampler(schedule, 4, clip=False)
    known = torch.full((2, 1, 4, 4), 0.5)
    mask = torch.zeros(2, 1, 4, 4)
    wrapped = with_known_pixels(sampler, known, mask, SampleNoise([3, 4]))
    assert isinstance(wrapped, DDIMSampler) and wrapped.timesteps == sampler.timesteps
    t, t_prev = sampler.timesteps[0], sampler.timesteps[1]
    out = wrapped.step(torch.zeros_like(known), t, t_prev, torch.zeros_like(known))
    z = SampleNoise([3, 4]).randn((1, 4, 4), stream="known")
    a = float(schedule.alphas_cumprod[t_prev])
    assert torch.allclose(out, a**0.5 * known + (1 - a) ** 0.5 * z, atol=1e-6)


# ------------------------------------------------------------------------------ closed forms


class GaussianConditionalEps(nn.Module):
    """The exact `E[eps | x_t, y]` for `x0 ~ N(mu, s^2)` per pixel observed as `y = A x0 + N(0, r^2)`,
    by Gaussian regression of eps on the pair (x_t, y): input channel 0 is y, channel 1 is x_t."""

    def __init__(self, schedule, mu, s, A, r):
        super().__init__()
        self.abar = schedule.alphas_cumprod.float()
        self.mu, self.s, self.A, self.r = mu, s, A, r

    def forward(self, z, t):
        y, x = z[:, :1], z[:, 1:]
        a = self.abar[t][:, None, None, None]
        s2 = self.s**2
        c_xx, c_yy, c_xy = a * s2 + 1 - a, self.A**2 * s2 + self.r**2, a.sqrt() * self.A * s2
        dx, dy = x - a.sqrt() * self.mu, y - self.A * self.mu
        det = c_xx * c_yy - c_xy**2
        # Cov(eps, (x_t, y)) = (sqrt(1 - a), 0): eps_hat = sqrt(1 - a) [C^-1 (dx, dy)]_x
        return (1 - a).sqrt() * (c_yy * dx - c_xy * dy) / det


def test_conditional_sampling_matches_the_gaussian_posterior_of_a_linear_observation():
    mu, s, A, r = 0.2, 0.5, 1.5, 0.3
    schedule = NoiseSchedule()
    n = 400
    gen = torch.Generator().manual_seed(0)
    x_true = mu + s * torch.randn(n, 1, 4, 4, generator=gen)
    y = A * x_true + r * torch.randn(n, 1, 4, 4, generator=gen)
    out = generate_conditional(GaussianConditionalEps(schedule, mu, s, A, r), DDIMSampler(schedule, 1000, clip=False),
                               y, range(n), (1, 4, 4)).images
    # Bayes' rule for a Gaussian prior and likelihood: precision adds, mean is precision-weighted
    var = 1 / (1 / s**2 + A**2 / r**2)
    mean = var * (mu / s**2 + A * y / r**2)
    z = (out - mean) / math.sqrt(var)
    assert abs(float(z.mean())) < 0.06 and abs(float(z.var()) - 1) < 0.08


class GaussianInpaintingEps(nn.Module):
    """Exact `E[eps | x_t, y]` for `x0 ~ N(mu, Sigma)` on 4 pixels (1x2x2) when y reveals the known
    pixels `known` exactly: known pixels' eps from x_t alone, the others' from the conditional law,
    written with the precision matrix `Lambda = Sigma^-1`."""

    def __init__(self, schedule, mu, sigma, known):
        super().__init__()
        self.abar, self.mu, self.known = schedule.alphas_cumprod.double(), mu.double(), known
        lam = torch.linalg.inv(sigma.double())
        u, k = ~known, known
        self.cov_u = torch.linalg.inv(lam[u][:, u])
        self.gain = -self.cov_u @ lam[u][:, k]

    def forward(self, z, t):
        y, x = z[:, :1].flatten(1).double(), z[:, 1:].flatten(1).double()
        a = self.abar[t][:, None]
        eps = torch.empty_like(x)
        k, u = self.known, ~self.known
        eps[:, k] = (x[:, k] - a.sqrt() * y[:, k]) / (1 - a).sqrt()
        m = self.mu[u] + (y[:, k] - self.mu[k]) @ self.gain.T
        for i in range(len(x)):
            cov_xt = a[i] * self.cov_u + (1 - a[i]) * torch.eye(int(u.sum()), dtype=torch.float64)
            eps[i, u] = (1 - a[i]).sqrt() * torch.linalg.solve(cov_xt, x[i, u] - a[i].sqrt() * m[i])
        return eps.float().view(-1, 1, 2, 2)


@pytest.mark.slow
def test_inpainting_samples_the_gaussian_conditional_law_and_keeps_the_known_pixels():
    schedule = NoiseSchedule()
    mu = torch.tensor([0.1, -0.2, 0.3, 0.0])
    root = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.3, 0.4, 0.0, 0.0], [0.2, -0.1, 0.3, 0.0], [0.1, 0.2, 0.1, 0.2]])
    sigma = root @ root.T
    known = torch.tensor([True, False, True, False])
    n = 600
    x_true = torch.distributions.MultivariateNormal(mu, sigma).sample((1,)).repeat(n, 1)  # one image, n seeds
    mask = (~known).float().view(1, 1, 2, 2).repeat(n, 1, 1, 1)
    y = torch.where(mask > 0, torch.randn(n, 1, 2, 2), x_true.view(n, 1, 2, 2))
    net = GaussianInpaintingEps(schedule, mu, sigma, known)
    out = generate_conditional(net, DDIMSampler(schedule, 250, clip=False), y, range(n), (1, 2, 2), mask).images
    flat = out.flatten(1).double()
    assert torch.equal(flat[:, known], x_true[:, known].double())
    # Schur complement: the law of the unknown pixels given the known ones
    s_uu, s_uk, s_kk = sigma[~known][:, ~known], sigma[~known][:, known], sigma[known][:, known]
    cond_mean = mu[~known] + s_uk @ torch.linalg.solve(s_kk, x_true[0, known] - mu[known])
    cond_cov = s_uu - s_uk @ torch.linalg.solve(s_kk, s_uk.T)
    assert torch.allclose(flat[:, ~known].mean(0).float(), cond_mean, atol=0.03)
    assert torch.allclose(torch.cov(flat[:, ~known].T).float(), cond_cov, atol=0.012, rtol=0.1)


# ------------------------------------------------------------------- the module and estimators


def tiny_conditional(task: str = "super_resolve", **overrides) -> ImageToImageModule:
    module = ImageToImageModule(task=task, **tiny_model_kwargs(**overrides)).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # the head starts at zero: give it weights so that maps are not all zero
        for p in module.ema.ema_model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module


def closure(net, y):
    """The conditional eps model written out: each row's condition, image-major."""
    return lambda x, t: net(torch.cat([y.repeat_interleave(x.shape[0] // y.shape[0], 0), x], 1), t)


@pytest.mark.parametrize("estimator", ["none", "aleatoric", "guided", "mc_dropout", "bayesdiff"])
def test_every_estimator_on_the_conditional_model_equals_the_plain_code_on_the_closure(estimator):
    module = tiny_conditional()
    y = torch.randn(3, 1, 8, 8)
    net = module.ema.ema_model
    clip = estimator != "bayesdiff"  # BayesDiff's sampler is unclipped by default
    kwargs, hook = {}, None
    if estimator == "aleatoric":
        kwargs = dict(estimator=EstimatorSpec("aleatoric", M=3))
        hook = AleatoricUncertainty(M=3)
    elif estimator == "guided":
        kwargs = dict(estimator=EstimatorSpec("aleatoric", M=3), guidance=GuidanceSpec("gradient", lam=1.0))
        hook = UncertaintyGuidance(AleatoricUncertainty(M=3), rule="gradient", lam=1.0)
    elif estimator == "mc_dropout":
        kwargs = dict(estimator=EstimatorSpec("mc_dropout", M=3))
        hook = MCDropoutUncertainty(ConditionedNet(net, y), M=3)
    elif estimator == "bayesdiff":
        module.fit_laplace(torch.randn(8, 1, 8, 8), conditions=torch.randn(8, 1, 8, 8))
        kwargs = dict(estimator=EstimatorSpec("bayesdiff", draws=2, skip=2))
        hook = BayesDiffUncertainty(ConditionedNet(net, y), module.laplace, draws=2, skip=2)
    ours = module.sample(y, seed=7, sampler=SamplerSpec("ddim", 4), **kwargs)
    eps_model = hook.eps_model if estimator == "bayesdiff" else closure(net, y)
    with torch.inference_mode(False):
        plain = generate(eps_model, make_sampler(module.schedule, "ddim", steps=4, clip=clip),
                         (1, 8, 8), range(7, 10), hook)
    assert torch.allclose(ours.images, plain.images, atol=1e-6)
    if estimator != "none":
        assert torch.allclose(ours.maps, plain.maps, atol=1e-6) and plain.maps.abs().sum() > 0
        assert ours.nfe == plain.nfe


def test_inpainting_maps_cover_only_the_generated_pixels():
    module = tiny_conditional("inpaint")
    y = torch.randn(2, 1, 8, 8)
    mask = box_mask(8)[None].repeat(2, 1, 1, 1)
    result = module.sample(y, mask, estimator=EstimatorSpec("aleatoric", M=2, keep_maps=True))
    known = mask.expand_as(y) == 0
    assert torch.equal(result.images[known], y[known])
    assert (result.maps[known] == 0).all() and (result.maps[~known] > 0).all()
    assert torch.allclose(result.scores, result.maps.flatten(1).sum(1))
    assert torch.allclose(result.step_totals.sum(1).float(), result.scores, rtol=1e-5)


def test_training_step_loss_is_the_masked_l2():
    module = tiny_conditional("inpaint", random_flip=False)
    x0, y = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    mask = box_mask(8)[None].repeat(2, 1, 1, 1)
    torch.manual_seed(3)
    loss = module.conditional_loss(module.net, x0, y, mask)
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (2,))
    eps = torch.randn_like(x0)
    x_t = module.schedule.alphas_cumprod[t].float().sqrt()[:, None, None, None] * x0 \
        + (1 - module.schedule.alphas_cumprod[t].float())[:, None, None, None].sqrt() * eps
    pred = module.net(torch.cat([y, x_t], 1), t)
    inside = mask.expand_as(x0) > 0
    assert torch.allclose(loss, (pred - eps)[inside].pow(2).mean(), atol=1e-6)


# ------------------------------------------------------------------------------------ bad input


def test_bad_conditions_and_masks_are_clear_errors_before_sampling():
    inpaint, sr = tiny_conditional("inpaint"), tiny_conditional("super_resolve")
    mask = box_mask(8)[None]
    with pytest.raises(TypeError, match="condition images"):
        inpaint.sample(4)
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        inpaint.sample(torch.randn(2, 1, 16, 16), mask)
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        inpaint.sample(torch.randn(2, 3, 8, 8), mask)
    with pytest.raises(ValueError, match="mask is missing"):
        inpaint.sample(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="doesn't match"):
        inpaint.sample(torch.randn(2, 1, 8, 8), torch.ones(3, 1, 8, 8))
    with pytest.raises(ValueError, match="only 0"):
        inpaint.sample(torch.randn(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match="takes no mask"):
        sr.sample(torch.randn(2, 1, 8, 8), mask)
    with pytest.raises(ValueError, match="chunk_size"):
        sr.sample(torch.randn(2, 1, 8, 8), estimator=EstimatorSpec("aleatoric", chunk_size=2))
    with pytest.raises(ValueError, match="generated pixels"):
        inpaint.sample(torch.randn(2, 1, 8, 8), mask, estimator=EstimatorSpec("aleatoric", score="standardized"))
    with pytest.raises(ValueError, match="n=3 but 2 condition images"):
        sr.sample(torch.randn(2, 1, 8, 8), n=3)
    with pytest.raises(ValueError, match="colorize"):
        ImageToImageModule(task="colorize", **tiny_model_kwargs())
    with pytest.raises(ValueError, match="diffusers_unet"):
        ImageToImageModule(task="inpaint", diffusers_unet={"sample_size": 8})
    assert check_mask(mask, (2, 1, 8, 8)).shape == (2, 1, 8, 8)


def save_checkpoint(module, path):
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_checkpoints_go_to_their_own_sampler_only(tmp_path):
    module = tiny_conditional("inpaint")
    conditional = save_checkpoint(module, tmp_path / "i2i.ckpt")
    plain = save_checkpoint(DiffusionModule(**tiny_model_kwargs()), tmp_path / "plain.ckpt")
    loaded = load_module(conditional, image_to_image=True)
    assert loaded.task.name == "inpaint" and not loaded.training
    y = torch.randn(1, 1, 8, 8)
    assert torch.equal(loaded.sample(y, box_mask(8)[None]).images,
                       module.sample(y, box_mask(8)[None]).images)
    with pytest.raises(InputError, match="unconditional"):
        load_module(plain, image_to_image=True)
    with pytest.raises(InputError, match="image-to-image"):
        load_module(conditional)


def test_an_image_to_image_mc_dropout_map_does_not_depend_on_its_batch():
    """docs/algorithms.md §5a: each image's dropout masks come from its own seed, and its passes see only
    its own condition, so sampled alone (its seed, its condition) it gets the same map."""
    module = tiny_conditional(dropout=0.1)
    y = torch.randn(3, 1, 8, 8)
    spec = dict(sampler=SamplerSpec("ddim", 4), estimator=EstimatorSpec("mc_dropout", M=3))
    together = module.sample(y, seed=7, **spec)
    alone = torch.cat([module.sample(y[i:i + 1], seed=7 + i, **spec).maps for i in range(3)])
    assert together.maps.abs().sum() > 0
    torch.testing.assert_close(alone, together.maps)
