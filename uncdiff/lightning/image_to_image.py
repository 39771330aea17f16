"""Image-to-image diffusion in the manner of Palette (Saharia et al. 2022; docs/algorithms.md §7): the
LightningModule of `DiffusionModule` (EMA, optimizer, warm-up, clipping, NaN stop, resume) with a
network that reads the condition concatenated to x_t, and sampling with uncertainty through
`uncdiff.uncertainty.image_to_image`."""

import inspect
from typing import Optional, Sequence

import torch

from uncdiff.core.image_to_image import ConditionedNet
from uncdiff.core.modes import eval_mode
from uncdiff.core.samplers import SampleNoise
from uncdiff.core.unet import UNet
from uncdiff.data.degradations import Task, check_task
from uncdiff.data.masks import check_mask
from uncdiff.io.images import from_uint8
from uncdiff.lightning.module import DiffusionModule
from uncdiff.lightning.progress import step_bar
from uncdiff.uncertainty.bayesdiff import fit_last_layer_laplace
from uncdiff.uncertainty.image_to_image import generate_conditional
from uncdiff.uncertainty.sampling import SampleResult, build_hook
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

UNET_OPTIONS = ("image_size", "in_channels", "base_channels", "channel_mults", "num_res_blocks", "attn_resolutions",
                "dropout")
NOT_HERE = ("network", "diffusers_unet", "diffusers_scheduler", "pretrained")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels where `mask [B, 1, H, W]` is 1 (all pixels for an all-ones mask)."""
    weight = mask.expand_as(pred)
    return ((pred - target).pow(2) * weight).sum() / weight.sum().clamp_min(1)


class ImageToImageModule(DiffusionModule):
    """Trains `eps_theta(concat(y, x_t), t)` with the L2 loss on eps, restricted to the generated
    pixels for `inpaint` and `uncrop` (docs/algorithms.md §7). `task` is one of
    `uncdiff.data.degradations.TASKS`; it must be the data's (`ImageToImageDataModule`; `train.py fit`
    takes it, with the image size and channels, from the data), and decides whether sampling takes a
    mask. `in_channels` are the image's; the U-Net reads `in_channels` more (the condition) and
    predicts `in_channels`. Every other option is `DiffusionModule`'s (uncdiff's U-Net only: no
    diffusers network).
    """

    def __init__(self, task: str = "inpaint", **kwargs):
        given = [name for name in NOT_HERE if kwargs.get(name) is not None]
        if given:
            raise ValueError(f"the image-to-image model builds uncdiff's U-Net; {', '.join(given)} can't be set")
        kwargs = {k: v for k, v in kwargs.items() if k not in NOT_HERE}
        defaults = {k: p.default for k, p in inspect.signature(DiffusionModule.__init__).parameters.items()
                    if k in UNET_OPTIONS}
        unet = {**defaults, **{k: v for k, v in kwargs.items() if k in UNET_OPTIONS}}
        self_task = Task(check_task(task))
        channels = self_task.condition_channels(unet["in_channels"])
        network = UNet(unet["image_size"], unet["in_channels"] + channels, unet["base_channels"], unet["channel_mults"],
                       unet["num_res_blocks"], unet["attn_resolutions"], unet["dropout"], out_channels=unet["in_channels"])
        super().__init__(network=network, **kwargs)
        self.task = self_task

    @property
    def condition_shape(self) -> tuple[int, int, int]:
        return self.image_shape  # every task's condition has the image's channels (colorize: RGB gray)

    def conditional_loss(self, net, x0: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`mean over mask of (eps_theta(concat(y, x_t), t) - eps)^2`, `t ~ U{0..T-1}`, from the global RNG."""
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        pred = net(torch.cat([y, self.schedule.q_sample(x0, t, eps)], dim=1), t)
        return masked_mse(pred, eps, mask)

    def unpack(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (list, tuple)) or len(batch) != 3:
            raise ValueError("the image-to-image model trains on (image, condition, mask) batches: use "
                             "uncdiff.lightning.image_to_image_data.ImageToImageDataModule as the data")
        x0, y, mask = batch
        if tuple(x0.shape[1:]) != self.image_shape or tuple(y.shape[1:]) != self.condition_shape:
            raise ValueError(f"the data's images {tuple(x0.shape[1:])} and conditions {tuple(y.shape[1:])} (C, H, W) "
                             f"don't match the model's {self.image_shape}: set the data's image size or the model's")
        return x0, y, mask

    def loss(self, batch) -> torch.Tensor:
        """`conditional_loss` of an `(image, condition, mask)` batch, with `DiffusionModule.loss`'s network
        and flips (the image, its condition and its mask flipped together)."""
        x0, y, mask = self.random_flips(*self.unpack(batch))
        return self.conditional_loss(self.net if self.training else self.ema.ema_model, x0, y, mask)

    def check_inputs(self, condition, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The condition `[N, C, H, W]` and mask (`[N or 1, 1, H, W]`, masked tasks only) checked against
        the model: a ValueError naming what doesn't fit, before anything is sampled. Returns the mask
        as `[N, 1, H, W]` (None for tasks without one)."""
        if not isinstance(condition, torch.Tensor):
            raise TypeError(f"this is an image-to-image model ({self.task.name}): sample(condition [N, C, H, W], "
                            f"mask, ...) takes condition images, not {type(condition).__name__}")
        if condition.dim() != 4 or tuple(condition.shape[1:]) != self.condition_shape:
            raise ValueError(f"condition images of shape {tuple(condition.shape)} don't fit this {self.task.name} model, "
                             f"which takes [N, {', '.join(map(str, self.condition_shape))}] (C, H, W)")
        if not bool(torch.isfinite(condition).all()):
            raise ValueError("condition images hold NaN or infinite values")
        if not self.task.masked:
            if mask is not None:
                raise ValueError(f"task {self.task.name!r} takes no mask (only inpaint and uncrop do)")
            return None
        return check_mask(mask, (condition.shape[0], *self.image_shape))

    def conditions_from_pixels(self, pixels: torch.Tensor, mask: Optional[torch.Tensor],
                               seeds: Sequence[int]) -> torch.Tensor:
        """The conditions `[N, C, H, W]` of uint8 condition images `pixels [N, C, H, W]` (e.g. read from
        files): in [-1, 1], and for `inpaint` and `uncrop` the pixels to generate (`mask [N, 1, H, W]`
        is 1) replaced by standard normal noise, as in training (docs/algorithms.md §7), drawn from
        each sample's seed (`seeds[i]`, stream `'condition'`), so whatever a file holds there is ignored."""
        y = from_uint8(pixels)
        if not self.task.masked:
            return y
        noise = SampleNoise(seeds).randn(y.shape[1:], stream="condition")
        return torch.where(mask.expand_as(y) > 0.5, noise, y)

    def sample(self, condition: torch.Tensor, mask: Optional[torch.Tensor] = None, n: Optional[int] = None,
               seed: int = 0, seeds: Optional[Sequence[int]] = None, sampler: Optional[SamplerSpec] = None,
               estimator: Optional[EstimatorSpec] = None, guidance: Optional[GuidanceSpec] = None,
               batch_size: int = 256, progress: bool = False) -> SampleResult:
        """`DiffusionModule.sample` (the same arguments) with one output per condition image
        `condition [N, C, H, W]` (in [-1, 1]); `n`, when given, must be N.

        For `inpaint` and `uncrop`, `mask [N or 1, 1, H, W]` (1 = generate) is required: the known
        pixels are the condition's, kept exactly, and the maps and scores cover the generated pixels
        only (so the score is their sum: `estimator.score` sum). `estimator.chunk_size` is not supported.
        """
        mask = self.check_inputs(condition, mask)
        if n is not None and n != condition.shape[0]:
            raise ValueError(f"n={n} but {condition.shape[0]} condition images: one output per condition")
        sampler_obj, estimator, guidance = self.sampling_run(sampler, estimator, guidance)
        if estimator.chunk_size is not None:
            raise ValueError("estimator.chunk_size is not supported for image-to-image sampling: lower batch_size")
        if estimator.features != "pixels":
            raise ValueError(f"estimator.features {estimator.features}: an image-to-image model's generative score "
                             f"is measured in its generated pixels (features pixels)")
        if mask is not None and estimator.score != "sum":  # restrict_to_generated sums the masked map
            raise ValueError(f"estimator.score {estimator.score}: with a mask the per-sample score is the sum of the "
                             f"map over the generated pixels (score sum)")
        seeds = list(range(seed, seed + condition.shape[0])) if seeds is None else list(seeds)

        def make_hook(eps_model):
            return build_hook(estimator, guidance, net=eps_model, laplace=self.laplace,
                              steps=len(sampler_obj.timesteps), image_shape=self.image_shape, device=self.device)

        make_hook(ConditionedNet(self.ema.ema_model, condition[:1]))  # a bad setting fails before sampling
        model = self.ema.ema_model
        bar = step_bar(progress, len(sampler_obj.timesteps), len(seeds), batch_size)
        with eval_mode(model), torch.inference_mode(False), bar as bar:  # see DiffusionModule.sample
            return generate_conditional(model, sampler_obj, condition, seeds, self.image_shape, mask, make_hook,
                                        self.device, batch_size, bar)

    def fit_laplace(self, images, num_images: int = 1000, conditions=None, **options) -> None:
        """BayesDiff's last-layer Laplace posterior (docs/algorithms.md §5b) of the conditional EMA network,
        from training pairs: `images [N, C, H, W]` and their `conditions [N, C, H, W]` (tensors, or batches
        of each in the same order), each batch through its conditional eps model; `options` are
        `fit_last_layer_laplace`'s. Stored in checkpoints, as for unconditional models."""
        if conditions is None:
            raise ValueError("the image-to-image model's Laplace fit needs the conditions of the training images "
                             "(conditions=, [N, C, H, W] beside images [N, C, H, W])")
        for name, value, shape in (("images", images, self.image_shape), ("conditions", conditions, self.condition_shape)):
            if isinstance(value, torch.Tensor) and (value.dim() != 4 or tuple(value.shape[1:]) != shape):
                raise ValueError(f"{name} of shape {tuple(value.shape)} don't fit this {self.task.name} model: give "
                                 f"[N, {', '.join(map(str, shape))}]")
        self.laplace = fit_last_layer_laplace(self.ema.ema_model, images, self.schedule, num_images=num_images,
                                              conditions=conditions, **options)


def restorer(module: ImageToImageModule, **sample_options):
    """`restore(condition, mask, seeds, estimator, guidance=None) -> SampleResult` of `module` with
    `sample_options` (sampler, batch_size, ...; `estimator` and `guidance` are specs): what
    `uncdiff.evaluation.image_to_image.calibration_study` and `guidance_study` call. BayesDiff runs on the
    same sampler, whose clipping `resolve_sampler` turns off (its moments need affine steps, docs/algorithms.md §5b)."""
    def restore(condition, mask, seeds, estimator, guidance=None):
        return module.sample(condition, mask if module.task.masked else None, seeds=seeds, estimator=estimator,
                             guidance=guidance, **sample_options)

    return restore
