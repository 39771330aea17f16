"""The x0-trajectory detector (docs/algorithms.md §6c) against a direct computation from a recorded
trajectory: the textbook x0 formula and variance written out here, on the same sampling run."""

import pytest
import torch

from tiny_checkpoint import tiny_checkpoint  # noqa: F401 (fixture)
from uncdiff.core.samplers import DDIMSampler, DDPMSampler, sample
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.sampling import generate
from uncdiff.uncertainty.trajectory import X0TrajectoryUncertainty

SHAPE, SEEDS, STEPS = (1, 4, 4), [3, 4, 5], 10


def eps_model(x, t):
    """A smooth stand-in for a network: any deterministic function of (x, t) serves."""
    return torch.tanh(0.7 * x + (t.to(x.dtype) / 1000)[:, None, None, None]) * 0.5


@pytest.fixture(params=["ddpm", "ddim"])
def sampler(request):
    schedule = NoiseSchedule("linear", 1000)
    if request.param == "ddpm":
        return DDPMSampler(schedule, steps=STEPS, clip=True)
    return DDIMSampler(schedule, steps=STEPS, eta=0.0, clip=False)


def recorded_trajectory(sampler):
    """(x_t, eps, t) of every step of one run, recorded by a hook that changes nothing."""
    steps = []

    def record(ctx):
        steps.append((ctx.index, ctx.x_t.clone(), ctx.eps.clone(), ctx.t))
        return ctx.eps

    images = sample(eps_model, sampler, SHAPE, SEEDS, hook=record)
    return images, steps


def test_map_and_score_equal_the_variance_of_the_recorded_x0_estimates(sampler):
    images, steps = recorded_trajectory(sampler)
    window = (0.6, 1.0)  # steps 6..9 of 10
    x0 = []
    for index, x_t, eps, t in steps:
        if 6 <= index < 10:
            abar = float(sampler.schedule.alphas_cumprod[t])
            estimate = (x_t.double() - (1 - abar) ** 0.5 * eps.double()) / abar**0.5
            x0.append(estimate.clamp(-1, 1) if sampler.clip else estimate)
    k = len(x0)
    mean = sum(x0) / k
    expected = sum((e - mean) ** 2 for e in x0) / (k - 1)

    hook = X0TrajectoryUncertainty(window=window)
    result = generate(eps_model, sampler, SHAPE, SEEDS, estimator=hook)
    torch.testing.assert_close(result.images, images)  # detection alone never changes a sample
    torch.testing.assert_close(result.maps.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.scores.double(), expected.flatten(1).sum(1), rtol=1e-5, atol=1e-7)
    assert hook.step_indices == [6, 7, 8, 9]


def test_costs_no_network_evaluation_beyond_plain_sampling(sampler):
    plain = generate(eps_model, sampler, SHAPE, SEEDS)
    detected = generate(eps_model, sampler, SHAPE, SEEDS, estimator=X0TrajectoryUncertainty(), batch_size=2)
    assert plain.nfe == detected.nfe == len(SEEDS) * STEPS
    again = generate(eps_model, sampler, SHAPE, SEEDS, estimator=X0TrajectoryUncertainty(), batch_size=1)
    torch.testing.assert_close(again.scores, detected.scores)  # a seed's score does not depend on its batch


def test_a_window_of_fewer_than_two_steps_is_refused(sampler):
    with pytest.raises(ValueError, match="at least 2"):
        generate(eps_model, sampler, SHAPE, SEEDS, estimator=X0TrajectoryUncertainty(window=(0.9, 1.0)))
    with pytest.raises(ValueError, match="window"):
        X0TrajectoryUncertainty(window=(0.5, 0.2))


def tiny_module():
    from conftest import tiny_model_kwargs
    from uncdiff.lightning.module import DiffusionModule

    torch.manual_seed(0)
    module = DiffusionModule(**tiny_model_kwargs())
    with torch.no_grad():  # give the zero-initialised layers weights so samples depend on the net
        for p in module.ema.ema_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def test_through_the_module_sample_it_is_the_hook_on_the_plain_run():
    from uncdiff.core.samplers import make_sampler
    from uncdiff.uncertainty.spec import EstimatorSpec, SamplerSpec

    module, spec = tiny_module(), SamplerSpec("ddim", 10)
    plain = module.sample(3, seed=4, sampler=spec)
    detected = module.sample(3, seed=4, sampler=spec, estimator=EstimatorSpec("x0_trajectory"), batch_size=2)
    assert detected.nfe == plain.nfe == 3 * 10
    torch.testing.assert_close(detected.images, plain.images)
    # window null: the last fifth of the steps (docs/algorithms.md §6c), as the hook on the plain loop
    hook = X0TrajectoryUncertainty(window=(0.8, 1.0))
    sample(module.ema.ema_model.eval(), make_sampler(module.schedule, "ddim", steps=10), module.image_shape,
           [4, 5, 6], hook=hook)
    assert hook.step_indices == [8, 9]
    torch.testing.assert_close(detected.scores, hook.scores)
    with pytest.raises(ValueError, match=r"estimator.window \[0.8, 1.0\] holds 0 of the 4 sampler steps"):
        module.sample(2, sampler=SamplerSpec("ddim", 4), estimator=EstimatorSpec("x0_trajectory"))


@pytest.mark.slow  # trains the tiny checkpoint (once per session), then runs train.py sample
def test_the_sample_command_scores_with_it(tiny_checkpoint, tmp_path):
    import csv
    import json

    import numpy as np

    from uncdiff.commands.sample import main
    from uncdiff.lightning.module import DiffusionModule

    out = tmp_path / "run"
    main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--n", "4", "--batch_size", "2",
          "--sampler.steps", "10", "--estimator.name", "x0_trajectory", "--fabric.accelerator", "cpu",
          "--progress", "false"])
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    module = DiffusionModule.load_from_checkpoint(tiny_checkpoint, map_location="cpu")
    expected = module.sample(seeds=[0, 1, 2, 3], sampler={"steps": 10}, estimator={"name": "x0_trajectory"})
    for r in rows:
        u = np.load(out / r["map"])
        torch.testing.assert_close(torch.from_numpy(u), expected.maps[int(r["seed"])], rtol=1e-4, atol=1e-7)
        assert float(r["score"]) == pytest.approx(float(expected.scores[int(r["seed"])]), rel=1e-4)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["estimator"] == {"name": "x0_trajectory", "window": [0.8, 1.0]}
    assert json.loads((out / "summary.json").read_text())["nfe_per_image"] == 10  # plain sampling's
