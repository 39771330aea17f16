"""The LightningModule: learning on real data, the user-facing sample() entry point, checkpoints."""

import lightning as L
import pytest
import torch

from conftest import tiny_model_kwargs
from uncdiff.lightning.data import DigitsDataModule
from uncdiff.core.samplers import make_sampler, sample
from uncdiff.lightning.module import DiffusionModule
from uncdiff.uncertainty.bayesdiff import BayesDiffUncertainty
from uncdiff.uncertainty.estimators import AleatoricUncertainty, MCDropoutUncertainty
from uncdiff.uncertainty.guidance import UncertaintyGuidance
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec


class LossHistory(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
def test_loss_falls_on_digits_within_a_few_hundred_steps():
    torch.manual_seed(0)
    model = DiffusionModule(**tiny_model_kwargs(image_size=16, base_channels=16, attn_resolutions=(), dropout=0.0, lr=2e-3,
                                                warmup_steps=20, random_flip=False))
    history = LossHistory()
    trainer = L.Trainer(accelerator="cpu", max_steps=200, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[history])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32))
    first, last = sum(history.losses[:20]) / 20, sum(history.losses[-40:]) / 40
    assert first > 0.5  # an untrained zero-output net has loss E[eps^2] = 1
    assert last < 0.6 * first, (first, last)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiffusionModule(**tiny_model_kwargs())
    with torch.no_grad():  # give the zero-initialised layers weights so samples depend on the net
        for p in m.ema.ema_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_sample_is_seeded_per_image_and_estimation_does_not_change_images(model):
    plain = model.sample(5, seed=10, sampler=SamplerSpec("ddpm", 6), batch_size=2)
    assert plain.images.shape == (5, 1, 8, 8) and plain.maps is None and plain.nfe == 5 * 6
    again = model.sample(n=3, seeds=[12, 13, 14], sampler=SamplerSpec("ddpm", 6), batch_size=3)
    torch.testing.assert_close(again.images, plain.images[2:])
    est = model.sample(5, seed=10, sampler=SamplerSpec("ddpm", 6), estimator=EstimatorSpec("aleatoric", M=3))
    torch.testing.assert_close(est.images, plain.images)
    assert est.maps.shape == (5, 1, 8, 8) and est.scores.shape == (5,) and (est.scores > 0).all()
    assert est.nfe == 5 * 6 * (1 + 3)
    model.ema.ema_model.train()
    mc = model.sample(2, sampler=SamplerSpec("ddim", 4), estimator=EstimatorSpec("mc_dropout"))
    assert (mc.scores > 0).all()
    assert model.ema.ema_model.training  # the network's mode is restored
    # the same as the plain sampling loop with the estimator as its hook, on the network in eval mode
    net = model.ema.ema_model.eval()
    loop = MCDropoutUncertainty(net)
    images = sample(net, make_sampler(model.schedule, "ddim", steps=4), model.image_shape, [0, 1], hook=loop)
    torch.testing.assert_close(mc.images, images)
    torch.testing.assert_close(mc.scores, loop.scores)


def test_guided_sampling_changes_images_and_reports_cost(model):
    plain = model.sample(3, sampler=SamplerSpec("ddim", 10))
    guided = model.sample(3, sampler=SamplerSpec("ddim", 10), guidance=GuidanceSpec("posterior", window=(0.0, 0.3)))
    assert not torch.allclose(guided.images, plain.images)
    assert guided.nfe > plain.nfe and guided.scores.shape == (3,)


def test_bad_estimator_options_name_the_option(model):
    with pytest.raises(ValueError, match="estimator.name"):
        model.sample(2, estimator={"name": "dropout"})
    with pytest.raises(ValueError, match="estimator.M"):
        model.sample(2, estimator={"name": "aleatoric", "M": 1})
    with pytest.raises(ValueError, match="unknown option.*estimator.num_perturbations"):
        model.sample(2, estimator={"name": "aleatoric", "num_perturbations": 3})
    with pytest.raises(ValueError, match="fit_laplace"):
        model.sample(2, estimator=EstimatorSpec("bayesdiff"))
    with pytest.raises(ValueError, match="bayesdiff .*needs sampler.clip false"):
        model.sample(2, sampler=SamplerSpec(clip=True), estimator=EstimatorSpec("bayesdiff"))


def test_laplace_travels_with_the_checkpoint(model, tmp_path):
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    model.fit_laplace(images, num_images=6)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = DiffusionModule.load_from_checkpoint(tmp_path / "m.ckpt")
    torch.testing.assert_close(loaded.laplace.var_W, model.laplace.var_W)
    options = {"skip": 1, "draws": 2, "moments": "regression"}
    # BayesDiff's sampler is unclipped by default (its moments need affine steps)
    result = loaded.sample(2, sampler=SamplerSpec("ddim", 5), estimator=EstimatorSpec("bayesdiff", **options))
    assert result.scores.shape == (2,) and (result.scores > 0).all()
    # what the checkpoint's posterior gives through the plain loop (features cached by the hook's eps_model)
    hook = BayesDiffUncertainty(net=loaded.ema.ema_model.eval(), laplace=loaded.laplace, **options)
    images = sample(hook.eps_model, make_sampler(loaded.schedule, "ddim", steps=5, clip=False), loaded.image_shape,
                    [0, 1], hook=hook)
    torch.testing.assert_close(result.images, images)
    torch.testing.assert_close(result.maps, hook.maps)


@pytest.mark.slow
def test_gradient_guidance_works_under_inference_mode(model):
    """Lightning runs validation (and so the callbacks) under inference_mode."""
    with torch.inference_mode():
        guided = model.sample(2, sampler=SamplerSpec("ddim", 10), guidance=GuidanceSpec("gradient"))
    # the guided images of the plain loop, outside inference mode
    images = sample(model.ema.ema_model.eval(), make_sampler(model.schedule, "ddim", steps=10), model.image_shape,
                    [0, 1], hook=UncertaintyGuidance(AleatoricUncertainty(), rule="gradient"))
    torch.testing.assert_close(guided.images, images)
    assert not torch.allclose(guided.images, model.sample(2, sampler=SamplerSpec("ddim", 10)).images)


def test_table_threshold_from_a_calibration_file(model, tmp_path):
    from uncdiff.io.tables import load_threshold_table, save_threshold_table
    from uncdiff.uncertainty.calibration import calibrate_threshold_table

    sampler = make_sampler(model.schedule, "ddim", steps=6)
    table = calibrate_threshold_table(model.ema.ema_model.eval(), sampler, model.image_shape, range(8),
                                      quantile=0.9, M=2)
    assert table.shape == (6, 1, 8, 8)
    save_threshold_table(tmp_path / "tau.pt", table, {"steps": 6, "quantile": 0.9})
    loaded, _ = load_threshold_table(tmp_path / "tau.pt", 6, model.image_shape)
    guidance = GuidanceSpec("posterior", table=loaded)
    guided = model.sample(2, sampler=SamplerSpec("ddim", 6), guidance=guidance)
    # the file's table, used by the plain loop
    hook = UncertaintyGuidance(AleatoricUncertainty(), table=table, rule="posterior")
    torch.testing.assert_close(guided.images, sample(model.ema.ema_model.eval(), sampler, model.image_shape, [0, 1],
                                                     hook=hook))
    with pytest.raises(ValueError, match="guidance.table has shape .*calibrate it"):
        model.sample(2, sampler=SamplerSpec("ddim", 5), guidance=guidance)


def test_estimator_window_with_guidance_is_the_estimation_window(model):
    """With guidance, the estimator's window is where U_t is recorded, not the guidance window:
    docs/algorithms.md §3-4, M extra evaluations on each estimated or guided step."""
    n, steps, m = 2, 10, 2
    guided = model.sample(n, sampler=SamplerSpec("ddim", steps), guidance=GuidanceSpec("posterior"),  # steps 0, 1
                          estimator=EstimatorSpec(window=(0.5, 1.0), M=m, keep_maps=True))
    estimated, guided_steps = range(5, 10), range(0, 2)  # the second half; the first 15% of 10 steps
    assert guided.step_indices == list(estimated)
    assert guided.nfe == n * steps + n * m * (len(estimated) + len(guided_steps))


def test_guidance_refuses_another_estimator_by_name(model):
    with pytest.raises(ValueError, match="guidance.rule gradient estimates with the aleatoric estimator"):
        model.sample(2, guidance=GuidanceSpec("gradient"), estimator=EstimatorSpec("mc_dropout"))


def test_mc_dropout_on_a_model_trained_without_dropout_needs_a_rate():
    model = DiffusionModule(**tiny_model_kwargs(dropout=0.0))
    with pytest.raises(ValueError, match="trained without dropout.*dropout="):
        model.sample(2, sampler=SamplerSpec(steps=2), estimator=EstimatorSpec("mc_dropout"))
    result = model.sample(2, sampler=SamplerSpec(steps=2), estimator=EstimatorSpec("mc_dropout", dropout=0.1))
    assert result.scores.shape == (2,)
