"""Pretrained diffusers models (docs/diffusers.md): loading a pipeline folder, refusing what uncdiff can't
honour, and parity of our schedule and samplers with diffusers' own schedulers on the same UNet.

Every model is a tiny randomly initialised `UNet2DModel` built here and saved to a temporary folder
(never a download); diffusers' `DDIMScheduler` / `DDPMScheduler` stepping that UNet is the truth."""

import json
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from uncdiff.core.samplers import SampleNoise, make_sampler, spaced_timesteps  # noqa: E402
from uncdiff.io.diffusers_pipeline import INSTALL, diffusers_betas, load_pretrained, schedule_from_config  # noqa: E402
from uncdiff.io.files import InputError  # noqa: E402
from uncdiff.lightning.module import DiffusionModule  # noqa: E402

SIZE, CHANNELS = 8, 1
# Two float32 implementations of the same chain: each step rounds differently (python-float vs
# float32 coefficients) and the network carries the difference on, so whole chains agree to ~1e-4.
CHAIN = {"rtol": 1e-4, "atol": 1e-4}


def tiny_unet(seed: int = 0, **config) -> UNet2DModel:
    torch.manual_seed(seed)
    options = dict(sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(8, 16),
                   layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    return UNet2DModel(**{**options, **config}).eval()


def save_pipeline(folder, unet=None, safe_serialization=True, **scheduler_config):
    DDPMPipeline(unet=unet or tiny_unet(), scheduler=DDPMScheduler(**scheduler_config)).save_pretrained(
        folder, safe_serialization=safe_serialization)
    return folder


def load_schedule(config):
    return schedule_from_config(config)[0]


def edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A DDPM pipeline folder on the default schedule (linear 1e-4..0.02, T = 1000, clipping on)."""
    return save_pipeline(tmp_path_factory.mktemp("pipeline"))


# ------------------------------------------------------------------------------------- loading

def test_a_pipeline_folder_loads_as_a_module(pipeline):
    module = DiffusionModule.from_diffusers(pipeline)
    unet = UNet2DModel.from_pretrained(pipeline / "unet")
    x, t = torch.randn(3, CHANNELS, SIZE, SIZE), torch.tensor([0, 500, 999])
    with torch.no_grad():
        expected = unet(x, t).sample
        torch.testing.assert_close(module.ema.ema_model(x, t), expected, rtol=0, atol=0)
        # BayesDiff's last layer: the net is head(features)
        net = module.ema.ema_model
        torch.testing.assert_close(net.head(net.features(x, t)), expected, rtol=0, atol=0)
    assert module.image_shape == (CHANNELS, SIZE, SIZE)
    assert module.sampler_defaults == {"clip": True, "variance": "beta_tilde", "spacing": "leading"}


def test_bin_weights_and_a_bare_unet_folder_load(tmp_path):
    unet = tiny_unet(seed=1)
    unet.save_pretrained(tmp_path / "bare", safe_serialization=False)
    assert (tmp_path / "bare" / "diffusion_pytorch_model.bin").is_file()
    pretrained = load_pretrained(tmp_path / "bare")
    x, t = torch.randn(2, CHANNELS, SIZE, SIZE), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(pretrained.net(x, t), unet(x, t).sample, rtol=0, atol=0)
    # a bare UNet runs on DDPMScheduler's defaults
    torch.testing.assert_close(pretrained.schedule.alphas_cumprod.float(), DDPMScheduler().alphas_cumprod)


def test_bin_weights_holding_code_are_refused(tmp_path):
    folder = tmp_path / "bare"
    tiny_unet().save_pretrained(folder, safe_serialization=False)
    torch.save({"weights": torch.zeros(1), "code": UNet2DModel}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(InputError, match="cannot load the UNet"):
        load_pretrained(folder)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(beta_schedule):
    config = {"beta_schedule": beta_schedule, "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    theirs = DDPMScheduler(**config)
    torch.testing.assert_close(diffusers_betas(config), theirs.betas, rtol=0, atol=0)
    ours = load_schedule(config)
    assert ours.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=0, atol=0)
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=0, atol=2e-7)  # from the float32 product


def test_trained_betas_are_used_as_given():
    betas = torch.linspace(0.001, 0.05, 20).tolist()
    ours = load_schedule({"trained_betas": betas, "num_train_timesteps": 20})
    theirs = DDPMScheduler(trained_betas=betas, num_train_timesteps=20)
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=0, atol=0)


SCHEDULER_REFUSALS = [
    ("prediction_type", "v_prediction"), ("prediction_type", "sample"), ("beta_schedule", "sigmoid"),
    ("timestep_spacing", "karras"), ("steps_offset", 1), ("thresholding", True), ("variance_type", "learned_range"),
    ("rescale_betas_zero_snr", True), ("_class_name", "EulerDiscreteScheduler"),
]
UNET_REFUSALS = [("_class_name", "UNet2DConditionModel"), ("class_embed_type", "timestep"),
                 ("num_class_embeds", 10), ("time_embedding_type", "fourier"), ("out_channels", 2 * CHANNELS)]


@pytest.mark.parametrize("key, value", SCHEDULER_REFUSALS + [("unet." + k, v) for k, v in UNET_REFUSALS])
def test_unsupported_configs_are_refused_naming_the_field_before_any_weights(tmp_path, key, value):
    folder = save_pipeline(tmp_path / "p")
    for weights in (folder / "unet").glob("diffusion_pytorch_model.*"):
        weights.unlink()  # the refusal must come from the config alone
    if key.startswith("unet."):
        edit_json(folder / "unet" / "config.json", **{key[5:]: value})
    else:
        edit_json(folder / "scheduler" / "scheduler_config.json", **{key: value})
    with pytest.raises(InputError) as error:
        load_pretrained(folder)
    assert f"{key.removeprefix('unet.')} = {value!r}" in str(error.value)


def test_without_diffusers_a_folder_asks_for_the_extra(pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(InputError) as error:
        load_pretrained(pipeline)
    assert INSTALL in str(error.value) and INSTALL == 'pip install -e ".[diffusers]"'


# --------------------------------------------------------------------------------------- parity

def diffusers_loop(unet, scheduler, x, steps, noise=None, **step_options):
    """diffusers' own sampling loop: `scheduler.step` on `unet`'s prediction at each of its timesteps."""
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            extra = {} if noise is None else {"variance_noise": noise[i]}
            x = scheduler.step(unet(x, t).sample, t, x, **step_options, **extra).prev_sample
    return x


def our_loop(eps_model, sampler, x, noise=None):
    """Our samplers' steps between consecutive timesteps (noise[i] at step i, as `sample()` draws it)."""
    ts = sampler.timesteps
    with torch.no_grad():
        for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1])):
            eps = eps_model(x, torch.full((x.shape[0],), t, dtype=torch.long))
            x = sampler.step(eps, t, t_prev, x, None if noise is None or t_prev < 0 else noise[i])
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip, clipped_eps", [(False, "rederive"), (True, "rederive"), (True, "keep"),
                                               (0.5, "keep"), (0.5, "rederive")])
def test_ddim_matches_diffusers(tmp_path, eta, clip, clipped_eps):
    clip_config = {"clip_sample": bool(clip), "clip_sample_range": 1.0 if clip is True else float(clip)}
    folder = save_pipeline(tmp_path / "p", **clip_config)
    module = DiffusionModule.from_diffusers(folder)
    assert module.sampler_defaults["clip"] == clip
    steps, shape = 10, (3, CHANNELS, SIZE, SIZE)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn((steps, *shape), generator=torch.Generator().manual_seed(2))
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    theirs = diffusers_loop(unet, scheduler, x_T, steps, noise if eta else None, eta=eta,
                            use_clipped_model_output=clipped_eps == "rederive")
    sampler = make_sampler(module.schedule, "ddim", steps=steps, eta=eta, clipped_eps=clipped_eps,
                           **module.sampler_options("ddim"))
    ours = our_loop(module.ema.ema_model, sampler, x_T, noise if eta else None)
    torch.testing.assert_close(ours, theirs, **CHAIN)
    if clip:  # the two meanings of clipping really differ here: the comparison above is not vacuous
        other = make_sampler(module.schedule, "ddim", steps=steps, eta=eta, clip=clip,
                             clipped_eps="keep" if clipped_eps == "rederive" else "rederive")
        assert (our_loop(module.ema.ema_model, other, x_T, noise if eta else None) - ours).abs().max() > 1e-2


@pytest.mark.parametrize("variance_type, steps", [("fixed_small", 50), ("fixed_large", 50), ("fixed_small", 10)])
def test_ddpm_matches_diffusers_with_the_same_noise_draws(tmp_path, variance_type, steps):
    folder = save_pipeline(tmp_path / "p", num_train_timesteps=50, variance_type=variance_type)
    module = DiffusionModule.from_diffusers(folder)
    shape = (2, CHANNELS, SIZE, SIZE)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    theirs = diffusers_loop(unet, scheduler, x_T, steps, generator=torch.Generator().manual_seed(3))
    # diffusers draws each step's noise inside step() from the generator, for t > 0: the same draws here
    draws = torch.Generator().manual_seed(3)
    sampler = make_sampler(module.schedule, "ddpm", steps=steps, **module.sampler_options("ddpm"))
    noise = [torch.randn(shape, generator=draws) if t > 0 else None for t in sampler.timesteps]
    ours = our_loop(module.ema.ema_model, sampler, x_T, noise)
    torch.testing.assert_close(ours, theirs, **CHAIN)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T, steps", [(1000, 50), (1000, 30), (1000, 7), (100, 100), (50, 1)])
def test_timestep_spacings_are_diffusers(spacing, T, steps):
    scheduler = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert spaced_timesteps(T, steps, spacing) == scheduler.timesteps.tolist()


def test_leading_is_uniform_when_steps_divide_T():
    assert spaced_timesteps(1000, 50, "leading") == spaced_timesteps(1000, 50, "uniform")
    assert spaced_timesteps(1000, 30, "leading") != spaced_timesteps(1000, 30, "uniform")


def test_trailing_ddim_matches_diffusers(tmp_path):
    """diffusers' DDIM steps from t to t - T // S: consecutive trailing timesteps when S divides T."""
    folder = save_pipeline(tmp_path / "p", timestep_spacing="trailing")
    module = DiffusionModule.from_diffusers(folder)
    x_T = torch.randn((2, CHANNELS, SIZE, SIZE), generator=torch.Generator().manual_seed(1))
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    theirs = diffusers_loop(unet, DDIMScheduler.from_pretrained(folder / "scheduler"), x_T, 10,
                            use_clipped_model_output=True)
    sampler = make_sampler(module.schedule, "ddim", steps=10, **module.sampler_options("ddim"))
    assert sampler.timesteps[-1] == 99
    torch.testing.assert_close(our_loop(module.ema.ema_model, sampler, x_T), theirs, **CHAIN)


def test_module_sample_matches_diffusers_from_the_same_initial_noise(pipeline):
    """`DiffusionModule.sample` (its per-sample noise, batching, the config's sampler defaults)
    against diffusers' loop started from the same x_T."""
    module = DiffusionModule.from_diffusers(pipeline)
    seeds = [5, 6, 7]
    result = module.sample(seeds=seeds, sampler={"name": "ddim", "steps": 10, "clipped_eps": "keep"}, batch_size=2)
    x_T = SampleNoise(seeds).initial((CHANNELS, SIZE, SIZE))
    unet = UNet2DModel.from_pretrained(pipeline / "unet").eval()
    theirs = diffusers_loop(unet, DDIMScheduler.from_pretrained(pipeline / "scheduler"), x_T, 10)
    torch.testing.assert_close(result.images, theirs, **CHAIN)


# ------------------------------------------------------------------------------------- commands

@pytest.mark.slow
def test_train_py_sample_on_a_pipeline_folder(tmp_path):
    """The issue's command on a pipeline folder: 8 samples with maps and scores, images equal to the
    module's own sampling of the same seeds with the config's defaults."""
    import csv
    import os
    import subprocess
    from pathlib import Path

    import numpy as np
    from PIL import Image

    repo = Path(__file__).resolve().parent.parent
    folder = save_pipeline(tmp_path / "pipeline", num_train_timesteps=100)
    out = tmp_path / "out"
    command = [sys.executable, str(repo / "train.py"), "sample", "--checkpoint", str(folder), "--n", "8",
               "--estimator.name", "aleatoric", "--out", str(out), "--sampler.steps", "5", "--estimator.M", "2",
               "--fabric.accelerator", "cpu", "--progress", "false"]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    expected = DiffusionModule.from_diffusers(folder).sample(seeds=list(range(8)), sampler={"steps": 5}).images
    expected = ((expected + 1) * 127.5).round().clamp(0, 255)
    for r in rows:
        image = torch.from_numpy(np.asarray(Image.open(out / r["image"])).astype(np.float32))
        assert (image - expected[int(r["seed"]), 0]).abs().max() <= 1  # up to rounding at a level boundary
        u = np.load(out / r["map"])
        assert u.shape == (CHANNELS, SIZE, SIZE) and (u >= 0).all()
        assert float(r["score"]) == pytest.approx(float(u.astype(np.float64).sum()), rel=1e-5)


def test_a_folder_that_does_not_match_the_data_is_refused(pipeline):
    from uncdiff.lightning.loading import check_data_matches, load_module
    from uncdiff.lightning.data import CIFAR10DataModule

    module = load_module(pipeline)
    with pytest.raises(InputError, match="does not match"):
        check_data_matches(CIFAR10DataModule(root="nowhere", download=False), module)
