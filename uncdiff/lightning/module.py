"""The LightningModule: DDPM training (docs/algorithms.md §1) with an EMA copy used for all sampling."""

from typing import Optional, Sequence

import lightning as L
import torch
import ema_pytorch

from uncdiff.uncertainty.bayesdiff import LastLayerLaplace, fit_last_layer_laplace
from uncdiff.core.samplers import Sampler, make_sampler
from uncdiff.core.modes import eval_mode
from uncdiff.uncertainty.sampling import SampleResult, build_hook, generate
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec, check_run, spec_from_dict
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.core.unet import UNet
from uncdiff.evaluation.fid import make_extractor
from uncdiff.io.diffusers_pipeline import (DiffusersEps, build_unet, load_pretrained, schedule_from_config,
                                           unet_config_of)
from uncdiff.lightning.progress import step_bar
from uncdiff.lightning.wandb_logger import WANDB_RUN_ID_KEY, wandb_run_id

MAX_RANKS = 2**12
MAX_STEPS = 2**28


class EMA(ema_pytorch.EMA):
    """ema-pytorch's EMA, made picklable (ddp_spawn, deepcopy): its `__new__` requires `model`,
    which unpickling doesn't pass."""

    def __new__(cls, model=None, *args, **kwargs):
        return torch.nn.Module.__new__(cls)


def step_seed(seed: int, step: int, batch_idx: int, rank: int) -> int:
    """One RNG seed per (run seed, optimizer step, micro-batch, rank): training randomness is a
    function of where the run is, not of its history, so a resumed run repeats it exactly."""
    return ((seed * MAX_STEPS + step) * 4096 + batch_idx % 4096) * MAX_RANKS + rank


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss: `fit` stops before the optimizer applies it."""


def check_finite_loss(strategy, loss: torch.Tensor, step: int) -> None:
    """Stop training at once when `loss` is not finite, before its gradients reach the weights, so
    every checkpoint written so far (and none after) holds the last good weights. All ranks decide
    together (a rank that raised alone would leave the others waiting in their next all-reduce);
    the check costs one device sync per step."""
    finite = strategy.reduce_boolean_decision(bool(torch.isfinite(loss.detach())), all=True)
    if not finite:
        raise NonFiniteLossError(
            f"non-finite training loss {loss.item()} at global step {step} (on this or another rank): "
            f"training stopped before this step's update; the checkpoints written so far hold finite weights "
            f"(resume from one with --ckpt_path and a lower model.lr or trainer.gradient_clip_val)")


class DiffusionModule(L.LightningModule):
    """Trains `UNet` to predict the noise of the DDPM forward process.

    Args (the U-Net's are passed to `UNet`): `lr`/`warmup_steps` give Adam with linear warm-up;
    `ema_*` configure ema-pytorch (decay, warm-up power, update cadence); `random_flip`
    flips images horizontally on the device; `seed` fixes all training randomness per step.
    `sampler`, `sample_steps` configure `sample()`'s defaults.

    The network is uncdiff's `UNet` unless one of these is given (the U-Net options are then unused;
    docs/diffusers.md):
    - `diffusers_unet`: the options of a diffusers `UNet2DModel` (its `config.json` fields), built
      randomly initialised; `image_size`, `in_channels` and `dropout` are its own.
    - `pretrained`: a diffusers pipeline or UNet2DModel folder to fine-tune: its UNet, weights and
      scheduler config (schedule and sampler defaults). Checkpoints store the UNet's and scheduler's
      configs (`diffusers_unet`, `diffusers_scheduler`), not the folder, and reload without it.
    - `network`: a module `network(x [B, C, H, W], t [B]) -> eps` for images of `in_channels` x
      `image_size`^2 (in Python only: a checkpoint can't rebuild it).
    `diffusers_scheduler`, a diffusers scheduler config, replaces `num_timesteps` and `beta_schedule`
    (the schedule it defines; its clipping, variance and spacing become the sampler defaults).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        lr: float = 2e-4,
        warmup_steps: int = 5000,
        ema_decay: float = 0.9999,
        ema_warmup_power: float = 1.0,
        ema_update_every: int = 1,
        random_flip: bool = True,
        seed: int = 0,
        sampler: str = "ddim",
        sample_steps: int = 50,
        network: Optional[torch.nn.Module] = None,
        diffusers_unet: Optional[dict] = None,
        diffusers_scheduler: Optional[dict] = None,
        pretrained: Optional[str] = None,
    ):
        super().__init__()
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if lr <= 0 or warmup_steps < 0:
            raise ValueError(f"lr must be > 0 and warmup_steps >= 0, got {lr}, {warmup_steps}")
        given = [name for name, value in (("network", network), ("diffusers_unet", diffusers_unet),
                                          ("pretrained", pretrained)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"give one network: {' and '.join(given)} are both set")
        self.save_hyperparameters(ignore=["network"])
        self.pretrained_source: Optional[dict] = None  # the folder a pretrained network came from
        if pretrained is not None:
            if diffusers_scheduler is not None:
                raise ValueError("pretrained brings its own scheduler config: leave diffusers_scheduler unset")
            loaded = load_pretrained(pretrained)
            network, diffusers_scheduler = loaded.net.train(), loaded.scheduler_config  # loaded in eval mode
            self.pretrained_source = loaded.source
        elif diffusers_unet is not None:
            network = build_unet(diffusers_unet, "model.diffusers_unet")
        if isinstance(network, DiffusersEps):
            config = unet_config_of(network)
            # a checkpoint's hyperparameters rebuild the model without the folder: the configs, not the path
            self.hparams.update(diffusers_unet=config, pretrained=None, image_size=network.image_size,
                                in_channels=config["in_channels"], dropout=float(config.get("dropout", 0.0)))
        self.net = network if network is not None else UNet(image_size, in_channels, base_channels, channel_mults,
                                                            num_res_blocks, attn_resolutions, dropout)
        self.sampler_defaults: dict = {}  # a diffusers scheduler config's sampler options, under explicit ones
        if diffusers_scheduler is not None:
            self.schedule, self.sampler_defaults = schedule_from_config(diffusers_scheduler, "model.diffusers_scheduler")
            self.hparams.update(diffusers_scheduler=dict(diffusers_scheduler), num_timesteps=self.schedule.num_timesteps)
        else:
            self.schedule = NoiseSchedule(beta_schedule, num_timesteps)
        make_sampler(self.schedule, sampler, steps=sample_steps)  # fail now on a bad sampler option
        # include_online_model=False: the checkpoint holds the online weights once, under `net`.
        self.laplace: Optional[LastLayerLaplace] = None  # BayesDiff's posterior, once fitted
        self._feature_extractors: dict[str, torch.nn.Module] = {}  # generative_features' (not in the state)
        self.ema = EMA(self.net, beta=ema_decay, power=ema_warmup_power, update_every=ema_update_every,
                       update_after_step=0, include_online_model=False, use_foreach=True)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)

    def diffusion_loss(self, net, x0: torch.Tensor) -> torch.Tensor:
        """`mean((eps_theta(x_t, t) - eps)^2)`, t ~ U{0..T-1}, from the current global RNG."""
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return (net(self.schedule.q_sample(x0, t, eps), t) - eps).pow(2).mean()

    def loss(self, batch) -> torch.Tensor:
        """The training objective on `batch` (docs/algorithms.md §1), drawn from the global RNG, which the
        caller seeds: in training mode the online network on images flipped by `random_flips`; in eval
        mode (validation) the EMA network on the images as they are. The one hook a subclass with other
        batches or another objective overrides (`ImageToImageModule`)."""
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        if tuple(x0.shape[1:]) != self.image_shape:  # a convolutional network would train on them regardless
            raise ValueError(f"the data's images are {tuple(x0.shape[1:])} (C, H, W) but the model's are "
                             f"{self.image_shape}: set the data's image size or the model's to match")
        (x0,) = self.random_flips(x0)
        return self.diffusion_loss(self.net if self.training else self.ema.ema_model, x0)

    def random_flips(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`images` (`[B, ...]` each) flipped horizontally together, sample by sample with probability 1/2,
        in training mode with `random_flip`; else as they are."""
        if not (self.training and self.hparams.random_flip):
            return images
        flip = (torch.rand(images[0].shape[0], device=images[0].device) < 0.5)[:, None, None, None]
        return tuple(torch.where(flip, v.flip(-1), v) for v in images)

    def training_step(self, batch, batch_idx):
        torch.manual_seed(step_seed(self.hparams.seed, self.global_step, batch_idx, self.global_rank))
        loss = self.loss(batch)
        check_finite_loss(self.trainer.strategy, loss, self.global_step)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)  # the same (t, eps) every validation: comparable losses
            loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # clip_grad_norm_ returns the pre-clip norm: logging it costs nothing extra.
        max_norm = float("inf") if gradient_clip_val is None else gradient_clip_val
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError("only gradient_clip_algorithm='norm' is supported")
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm)
        self.log("train/grad_norm", norm)

    def optimizer_step(self, *args, **kwargs):
        # Here, not in on_train_batch_end: ModelCheckpoint saves in its on_train_batch_end, which
        # runs before the module's, and must see this step's EMA update.
        super().optimizer_step(*args, **kwargs)
        self.ema.update()

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
        warmup = max(self.hparams.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def sample(self, n: int = 64, seed: int = 0, seeds: Optional[Sequence[int]] = None,
               sampler: Optional[SamplerSpec] = None, estimator: Optional[EstimatorSpec] = None,
               guidance: Optional[GuidanceSpec] = None, batch_size: int = 256, progress: bool = False) -> SampleResult:
        """Generate with the EMA network, optionally estimating pixel-wise uncertainty and guiding.

        - sample i uses seed `seed + i`, or `seeds[i]` when given (then `n` is unused): the same image
          whatever the batch size or process count;
        - `sampler`, `estimator`, `guidance`: the run's specs (`uncdiff.uncertainty.spec`, or plain dicts
          of their fields); the sampler's unset options are the model's (`resolve_sampler`); guided
          sampling estimates with the aleatoric estimator of `estimator`'s M, variant and window;
        - `bayesdiff` and `generative` need the Laplace posterior (`fit_laplace`); `generative` samples
          each batch plainly, then its M posterior chains (`nfe` counts both), scored in the feature
          space of `estimator.features` (`generative_features`).

        Returns `SampleResult` (images in [-1, 1], maps, scores, network evaluations `nfe`).
        """
        sampler_obj, estimator, guidance = self.sampling_run(sampler, estimator, guidance)
        hook = build_hook(estimator, guidance, net=self.ema.ema_model, laplace=self.laplace,
                          steps=len(sampler_obj.timesteps), image_shape=self.image_shape, device=self.device,
                          features=self.generative_features(estimator))
        seeds = list(range(seed, seed + n)) if seeds is None else list(seeds)
        model = self.ema.ema_model
        with eval_mode(model):
            eps_model = hook.eps_model if estimator.name == "bayesdiff" else model
            # Lightning validates under inference_mode, where the gradient guidance rule can't
            # re-enable autograd: leave it here (generate itself runs under no_grad).
            with torch.inference_mode(False), step_bar(progress, len(sampler_obj.timesteps), len(seeds),
                                                       batch_size) as bar:
                return generate(eps_model, sampler_obj, self.image_shape, seeds, hook, self.device, batch_size, bar)

    def generative_features(self, estimator: EstimatorSpec) -> Optional[torch.nn.Module]:
        """The feature extractor the generative estimator scores in, on this model's device: None for
        `estimator.features` pixels (or another estimator), else that FID extractor
        (`uncdiff.evaluation.fid.make_extractor`: the digits classifier's shipped weights at this image
        size; Inception from torch hub's cache), built once per name."""
        name = estimator.features
        if estimator.name != "generative" or name == "pixels":
            return None
        if name not in self._feature_extractors:
            extractor = make_extractor(name, **({"image_size": self.image_shape[-1]} if name == "digits-classifier"
                                                else {}))
            channels = getattr(extractor, "in_channels", self.image_shape[0])
            if channels != self.image_shape[0]:
                raise ValueError(f"estimator.features {name} reads {channels}-channel images; this model makes "
                                 f"{self.image_shape[0]}-channel ones")
            self._feature_extractors[name] = extractor
        return self._feature_extractors[name].to(self.device)

    def sampling_run(self, sampler=None, estimator=None, guidance=None) -> tuple[Sampler, EstimatorSpec, GuidanceSpec]:
        """The sampler of `sampler` (resolved by `resolve_sampler`) and the estimator and guidance specs,
        checked together (`check_run`): what `sample` runs."""
        estimator, guidance = spec_from_dict(EstimatorSpec, estimator), spec_from_dict(GuidanceSpec, guidance)
        sampler = self.resolve_sampler(sampler, estimator)
        check_run(sampler, estimator, guidance)
        return make_sampler(self.schedule, sampler.name, steps=sampler.steps, **sampler.options()), estimator, guidance

    def resolve_sampler(self, sampler: Optional[SamplerSpec] = None,
                        estimator: Optional[EstimatorSpec] = None) -> SamplerSpec:
        """`sampler` with every unset option filled in: the model's `sampler` and `sample_steps`, its own
        defaults (`sampler_options`), then the samplers'; x0 clipping is on unless the estimator is
        BayesDiff (its moments need affine steps, docs/algorithms.md §5b)."""
        sampler = spec_from_dict(SamplerSpec, sampler)
        name = sampler.name or self.hparams.sampler
        bayesdiff = estimator is not None and spec_from_dict(EstimatorSpec, estimator).name == "bayesdiff"
        return sampler.resolve(name, self.hparams.sample_steps, self.sampler_options(name), clip=not bayesdiff)

    def sampler_options(self, sampler: str) -> dict:
        """The model's own defaults among `sampler`'s options (a diffusers scheduler config's clipping,
        DDPM variance, DDIM timestep spacing); empty for a model trained here."""
        names = {"ddpm": ("clip", "variance"), "ddim": ("clip", "spacing")}.get(sampler, ())
        return {k: v for k, v in self.sampler_defaults.items() if k in names}

    @classmethod
    def from_diffusers(cls, path, sampler: str = "ddim", sample_steps: int = 50) -> "DiffusionModule":
        """A diffusers pipeline folder or bare `UNet2DModel` folder (docs/diffusers.md) as a module for
        sampling, estimation, guidance and evaluation: its UNet is the (EMA) network, its scheduler
        config the schedule and sampler defaults. On the CPU, in eval mode."""
        return cls(pretrained=str(path), sampler=sampler, sample_steps=sample_steps).eval()

    def fit_laplace(self, images, num_images: int = 1000, **options) -> None:
        """Fit BayesDiff's last-layer Laplace posterior (docs/algorithms.md §5b) on the EMA network from training
        images (`[N, C, H, W]` in [-1, 1] or an iterable of such batches); stored in checkpoints."""
        # fit_last_layer_laplace runs the network in eval mode itself
        self.laplace = fit_last_layer_laplace(self.ema.ema_model, images, self.schedule, num_images=num_images,
                                              **options)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # LightningCLI records how it built the module (`_instantiator`, an import path that
        # load_from_checkpoint would call) and, for a model given by class_path, `_class_path`; our
        # arguments are plain values, so drop both: a checkpoint holds tensors and plain values only.
        for key in ("_instantiator", "_class_path"):
            checkpoint.get("hyper_parameters", {}).pop(key, None)
        if self.laplace is not None:
            checkpoint["bayesdiff_laplace"] = self.laplace.state_dict()
        run_id = wandb_run_id(self._trainer.loggers if self._trainer is not None else [])
        if run_id is not None:  # `fit --ckpt_path` continues this W&B run (uncdiff.lightning.cli)
            checkpoint[WANDB_RUN_ID_KEY] = run_id

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "bayesdiff_laplace" in checkpoint:
            self.laplace = LastLayerLaplace.from_state_dict(checkpoint["bayesdiff_laplace"])
