"""BayesDiff (Kou et al., ICLR 2024; docs/algorithms.md §5b): last-layer Laplace on the final conv `head` of a
network exposing `features(x, t)` (so that `net(x, t) == net.head(net.features(x, t))`), and the
propagation of its variance through deterministic DDIM steps as a sampler hook.
"""

from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from uncdiff.core.image_to_image import ConditionedNet
from uncdiff.core.modes import eval_mode
from uncdiff.core.samplers import DDIMSampler, StepContext
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.estimators import StepwiseUncertainty, check_chunk_size, check_count, evaluate_in_chunks

MOMENT_ESTIMATORS = ("regression", "paper")  # docs/algorithms.md §5b; the first is the default


def check_moments(moments: str) -> str:
    """A covariance estimator of `MOMENT_ESTIMATORS`, or a ValueError."""
    if moments not in MOMENT_ESTIMATORS:
        raise ValueError(f"moments must be one of {MOMENT_ESTIMATORS}, got {moments!r}")
    return moments


# ----------------------------------------------------------------------------------------------
# Last-layer Laplace


@dataclass
class LastLayerLaplace:
    """Diagonal Gaussian posterior over the final conv: MAP `weight [O, C, kh, kw]`, `bias [O]`
    and their variances `var_W`, `var_b`, plus the conv geometry and the fit's settings."""

    weight: torch.Tensor
    bias: torch.Tensor
    var_W: torch.Tensor
    var_b: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    prior_precision: float = 1.0
    sigma_noise: float = 1.0
    num_images: int = 0
    seed: int = 0

    def head_conv(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The head conv with this posterior's geometry and the given `weight`, `bias` (a MAP or a draw)."""
        return F.conv2d(h, weight.to(h), bias.to(h), self.stride, self.padding, self.dilation)

    def predictive_variance(self, h: torch.Tensor) -> torch.Tensor:
        """Per-pixel variance of `head(h)` for features `h [B, C, H, W]`, in closed form:
        `conv(h^2, var_W) + var_b` (exact for independent weights, docs/algorithms.md §5b)."""
        return self.head_conv(h.pow(2), self.var_W, self.var_b)

    def sampled_variance(self, h: torch.Tensor, num_heads: int = 100, generator: Optional[torch.Generator] = None,
                         heads_per_chunk: int = 256) -> torch.Tensor:
        """The same variance by Monte Carlo: unbiased variance of `head(h)` over `num_heads` heads
        drawn from the posterior (what the released code does), for comparison."""
        check_count("num_heads", num_heads, 2)
        total = total_sq = 0.0
        for s in range(0, num_heads, heads_per_chunk):
            k = min(heads_per_chunk, num_heads - s)
            z_w = torch.randn((k, *self.weight.shape), generator=generator).to(self.weight)
            z_b = torch.randn((k, *self.bias.shape), generator=generator).to(self.bias)
            w, b = self.weight + self.var_W.sqrt() * z_w, self.bias + self.var_b.sqrt() * z_b
            out = self.head_conv(h, w.flatten(0, 1), b.flatten()).double()  # heads stacked as output channels
            out = out.view(h.shape[0], k, self.weight.shape[0], *out.shape[2:])
            total = total + out.sum(1)
            total_sq = total_sq + out.pow(2).sum(1)
        return ((total_sq - total.pow(2) / num_heads) / (num_heads - 1)).to(h.dtype)

    def to(self, device) -> "LastLayerLaplace":
        return LastLayerLaplace(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                   for k, v in asdict(self).items()})

    def state_dict(self) -> dict:
        """Plain tensors (on the CPU) and settings; `torch.save` it, rebuild with `from_state_dict`."""
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in asdict(self).items()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LastLayerLaplace":
        return cls(**{k: tuple(v) if k in ("stride", "padding", "dilation") else v for k, v in state.items()})


def check_head(net: nn.Module) -> nn.Conv2d:
    head = getattr(net, "head", None)
    if not isinstance(head, nn.Conv2d) or not callable(getattr(net, "features", None)):
        raise ValueError("BayesDiff needs a net with features(x, t) and a final nn.Conv2d `head`")
    if head.groups != 1 or head.padding_mode != "zeros" or isinstance(head.padding, str) or head.bias is None:
        raise ValueError("the head conv must have groups=1, zero padding given as numbers, and a bias")
    return head


@torch.no_grad()
def last_layer_fisher(net: nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                      schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal empirical Fisher of `net.head` over one batch (docs/algorithms.md §5b):
    `sum_b 0.5 * (grad_{W,b} sum r_b^2)^2` with `r_b = head(features(x_t, t)) - eps` for
    `x_t = q_sample(x0, t, eps)`. Per-sample gradients in closed form (the head is linear):
    `dL_b/dW = 2 sum_pixels r_b (x) unfold(h_b)`, `dL_b/db = 2 sum_pixels r_b`.
    Returns `(H_W [O, C, kh, kw], H_b [O])` in float64."""
    head = check_head(net)
    h = net.features(schedule.q_sample(x0, t, eps), t)
    r = (head(h) - eps).flatten(2).double()  # [B, O, L]
    cols = F.unfold(h, head.kernel_size, head.dilation, head.padding, head.stride).double()  # [B, C*kh*kw, L]
    grad_w = 2 * torch.einsum("bol,bkl->bok", r, cols)
    grad_b = 2 * r.sum(2)
    return 0.5 * grad_w.pow(2).sum(0).view(head.weight.shape), 0.5 * grad_b.pow(2).sum(0)


def image_batches(images: Iterable | torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches `[b, C, H, W]` from a tensor `[N, C, H, W]`, or from an iterable of images, batches,
    or `(images, labels)` tuples (a Dataset or a DataLoader)."""
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
        return
    buffer, count = [], 0
    for item in images:
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = x[None] if x.dim() == 3 else x
        buffer.append(x)
        count += x.shape[0]
        if count >= batch_size:
            yield torch.cat(buffer)
            buffer, count = [], 0
    if buffer:
        yield torch.cat(buffer)


def training_batches(images: Iterable | torch.Tensor, conditions: Optional[Iterable | torch.Tensor],
                     batch_size: int) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """`(x0 [b, C, H, W], y [b, C_y, H, W] or None)`: `images` batched by `image_batches`, and, for a
    conditional net, `conditions` (y of each image, in the same order) batched alike beside them."""
    if conditions is None:
        for x0 in image_batches(images, batch_size):
            yield x0, None
        return
    paired = zip(image_batches(images, batch_size), image_batches(conditions, batch_size))
    for x0, y in paired:
        if y.shape[0] != x0.shape[0] or y.shape[2:] != x0.shape[2:]:
            raise ValueError(f"conditions {tuple(y.shape)} don't pair up with the images {tuple(x0.shape)}: give one "
                             f"condition of the images' height and width per image, in the same batches")
        yield x0, y


def fit_last_layer_laplace(net: nn.Module, images: Iterable | torch.Tensor, schedule: NoiseSchedule,
                           num_images: int = 1000, prior_precision: float = 1.0, sigma_noise: float = 1.0,
                           seed: int = 0, batch_size: int = 64,
                           conditions: Optional[Iterable | torch.Tensor] = None) -> LastLayerLaplace:
    """Fit the diagonal last-layer Laplace on `num_images` training images, one pass (docs/algorithms.md §5b):
    per image one `t ~ U{0..T-1}` and fresh `eps` (from a CPU generator seeded with `seed`),
    `H = sum of last_layer_fisher`, `v = 1 / (H / sigma_noise^2 + prior_precision)`.
    The network runs in eval mode (no dropout); fewer images than asked is allowed and recorded.

    For an image-to-image net `net(concat(y, x_t), t)` (docs/algorithms.md §7), `conditions` holds the
    condition y of each training image (a tensor `[N, C_y, H, W]`, or batches like `images`'); each
    batch is fitted through its conditional eps model `ConditionedNet(net, y)`, with the same draws of
    `t` and `eps` as without conditions."""
    check_count("num_images", num_images, 1)
    check_count("batch_size", batch_size, 1)
    if not prior_precision > 0 or not sigma_noise > 0:
        raise ValueError(f"prior_precision and sigma_noise must be > 0, got {prior_precision}, {sigma_noise}")
    head = check_head(net)
    device = head.weight.device
    gen = torch.Generator().manual_seed(seed)
    h_w = torch.zeros(head.weight.shape, dtype=torch.float64, device=device)
    h_b = torch.zeros(head.bias.shape, dtype=torch.float64, device=device)
    seen = 0
    with eval_mode(net):
        for x0, y in training_batches(images, conditions, batch_size):
            x0 = x0[:num_images - seen].to(device, head.weight.dtype)
            model = net if y is None else ConditionedNet(net, y[:x0.shape[0]].to(device, head.weight.dtype))
            t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=gen).to(device)
            eps = torch.randn(x0.shape, generator=gen).to(x0)
            fw, fb = last_layer_fisher(model, x0, t, eps, schedule)
            h_w += fw
            h_b += fb
            seen += x0.shape[0]
            if seen >= num_images:
                break
    if seen == 0:
        raise ValueError("no images to fit the Laplace approximation on")
    precision = lambda fisher: (fisher / sigma_noise**2 + prior_precision).reciprocal().to(head.weight.dtype)
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return LastLayerLaplace(head.weight.detach().clone(), head.bias.detach().clone(), precision(h_w), precision(h_b),
                            pair(head.stride), pair(head.padding), pair(head.dilation), float(prior_precision),
                            float(sigma_noise), seen, seed)


# ----------------------------------------------------------------------------------------------
# Propagation through DDIM


class FeatureCachingEps:
    """`eps_model(x, t) = net.head(net.features(x, t))` with the net in eval mode, remembering the
    features of its latest call, so that BayesDiff's Laplace variance at the sampler's state costs
    no extra network pass."""

    def __init__(self, net: nn.Module):
        check_head(net)
        self.net = net
        self._x: Optional[torch.Tensor] = None
        self._t: Optional[torch.Tensor] = None
        self._features: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.net):
            h = self.net.features(x, t)
        self._x, self._t, self._features = x, t, h
        return self.net.head(h)

    def cached_features(self, x: torch.Tensor, t: int) -> Optional[torch.Tensor]:
        """The features of the latest call if it was on this very tensor `x` at timestep `t`."""
        if self._x is x and bool((self._t == t).all()):
            return self._features
        return None


class BayesDiffUncertainty(StepwiseUncertainty):
    """docs/algorithms.md §5b as a hook for DDIM with `eta = 0` and `clip=False` (clipping x0 makes the step
    non-affine, so the moment propagation below would not describe it; other samplers are errors).

    Per pixel, with `kx = sqrt(abar[t'] / abar[t])`, `ke = sqrt(1 - abar[t']) - kx sqrt(1 - abar[t])`
    (the DDIM step is `x_t' = kx x_t + ke eps`):
    - UQ steps (`i % skip == 0` and `i < n - 1`): `Var[x_t'] = kx^2 Var[x_t] + 2 kx ke Cov(x_t, eps_t)
      + ke^2 Var(eps_t)`, with the Laplace variance at the sampler's state (features cached by the
      MAP pass) in `Var(eps_t)`. On UQ steps after the first, `draws` (S) states
      `x^(j) ~ N(x_t, max(Var[x_t], 0))` (per-sample stream `'bayesdiff'`) give `E[eps]`, returned
      as the step's eps (so the trajectory is the mean `E[x_t]`), and `Cov`. At step 0
      `Var[x_T] = 0`: the draws would all equal x_T, so `E[eps]` is the MAP eps and `Cov = 0`
      without them.
    - Other steps: `Var[x_t'] = kx^2 Var[x_t]` and the MAP eps.
    This is the released code's rule (`uq_array` at every k-th step from x_T, none at the final
    step): 50 steps cost 50 + 10 * 9 = 140 passes per image with k = 5, 50 + 10 * 48 = 530 with k = 1.

    `moments` picks the estimator of `Cov` and `Var(eps_t)` from the draws:
    - `'paper'` (the paper and its released code): `Cov = mean_j(x^(j) eps^(j)) - E[x_t] E[eps]`,
      `Var(eps_t)` = the Laplace variance alone. Its Monte Carlo error, about
      `|E[eps]| sd(x_t) / sqrt(S)`, usually exceeds the covariance itself (`~ eps' Var[x_t]`), and
      the variance of the MAP eps over x_t is left out, so `Var` can turn negative.
    - `'regression'` (default): statistical linearisation `eps(x) ~ E[eps] + g (x - E[x_t]) + residual` per
      pixel with the slope `g = s_xe / s_xx` from the draws' sample moments: `Cov = g Var[x_t]`,
      `Var(eps_t)` = Laplace + `g^2 Var[x_t]` + the residual variance. Then
      `Var[x_t'] = (kx + ke g)^2 Var[x_t] + ke^2 (residual + Laplace) >= 0`, exact for a linear
      eps, and it matches brute-force trajectories (tests/test_bayesdiff.py).

    `maps [B, C, H, W]` = `Var[x_0]` after the run (the variance after the latest step during it),
    `scores` its sum over c, h, w; with `keep_maps`, `step_maps [B, n, C, H, W]` holds `Var` after
    each step (the bookkeeping of `StepwiseUncertainty`, whose window is every step here). Sample with `self.eps_model` so its features are reused; with any other eps_model
    the features are recomputed (one extra pass per UQ step, counted in `nfe`).
    """

    def __init__(self, net: nn.Module, laplace: LastLayerLaplace, draws: int = 10, skip: int = 5,
                 moments: str = "regression", keep_maps: bool = False, chunk_size: Optional[int] = None):
        self.moments = check_moments(moments)
        self.draws = check_count("draws", draws, 2)
        self.skip = check_count("skip", skip, 1)
        self.chunk_size = check_chunk_size(chunk_size)
        self.eps_model = FeatureCachingEps(net)
        self.laplace = laplace
        super().__init__((0.0, 1.0), keep_maps)

    def is_uq_step(self, index: int, num_steps: int) -> bool:
        return index % self.skip == 0 and index < num_steps - 1

    def draw_steps(self, num_steps: int) -> list[int]:
        """The step indices that run the block of `draws`."""
        return [i for i in range(1, num_steps) if self.is_uq_step(i, num_steps)]

    @staticmethod
    def check_sampler(ctx: StepContext) -> None:
        sampler = ctx.sampler
        if not isinstance(sampler, DDIMSampler) or sampler.eta != 0:
            raise ValueError(f"BayesDiffUncertainty propagates moments through deterministic DDIM steps: it needs "
                             f"sampler 'ddim' with eta=0, got {type(sampler).__name__}"
                             f"{'' if not hasattr(sampler, 'eta') else f' with eta={sampler.eta}'}")
        if sampler.clip:
            raise ValueError("BayesDiffUncertainty needs clip=False: clipping x0 makes the DDIM step non-affine, "
                             "so the variance propagation of docs/algorithms.md §5b would not describe it")

    def _features(self, ctx: StepContext) -> torch.Tensor:
        h = self.eps_model.cached_features(ctx.x_t, ctx.t)
        if h is None:
            self.eps_model(ctx.x_t, torch.full((ctx.x_t.shape[0],), ctx.t, device=ctx.x_t.device))
            self.nfe += ctx.x_t.shape[0]
            h = self.eps_model.cached_features(ctx.x_t, ctx.t)
        return h

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        self.check_sampler(ctx)
        if ctx.index == 0:
            self._start_run()
            self._var = torch.zeros_like(ctx.x_t)
        schedule = ctx.sampler.schedule
        a, a_prev = schedule.abar_at(ctx.t), schedule.abar_at(ctx.t_prev)
        kx = (a_prev / a) ** 0.5
        ke = (1 - a_prev) ** 0.5 - kx * (1 - a) ** 0.5
        eps = ctx.eps
        if self.is_uq_step(ctx.index, ctx.num_steps):
            var_eps = self.laplace.predictive_variance(self._features(ctx))  # before the draws reuse the cache
            cov = spread = torch.zeros_like(ctx.x_t)
            if ctx.index > 0:
                eps, cov, spread = self._draw_moments(ctx)
            self._var = kx**2 * self._var + 2 * kx * ke * cov + ke**2 * (var_eps + spread)
        else:
            self._var = kx**2 * self._var
        self.maps = self._var  # not a sum over steps: the variance of the latest state
        if self.keep_maps:
            self._step_maps.append(self._var)
            self.step_indices.append(ctx.index)
        return eps

    def _draw_moments(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From `draws` states `x^(j) ~ N(x_t, max(Var[x_t], 0))`: `E[eps]`, `Cov(x_t, eps_t)`
        and the variance of the MAP eps over x_t that the Laplace variance doesn't hold (zero for
        `'paper'`); see the class docstring for the two estimators."""
        b, s = ctx.x_t.shape[0], self.draws
        var = self._var.clamp(min=0)
        z = ctx.noise.randn((s, *ctx.x_t.shape[1:]), stream="bayesdiff").to(ctx.x_t)
        x_j = ctx.x_t[:, None] + var.sqrt()[:, None] * z  # [B, S, C, H, W]
        eps_j = evaluate_in_chunks(ctx.eps_model, x_j.flatten(0, 1), ctx.t, self.chunk_size).view(x_j.shape)
        self.nfe += b * s
        mean_eps = eps_j.mean(1)
        if self.moments == "paper":
            return mean_eps, (x_j * eps_j).mean(1) - ctx.x_t * mean_eps, torch.zeros_like(mean_eps)
        dx, de = x_j - x_j.mean(1, keepdim=True), eps_j - mean_eps[:, None]
        s_xx, s_xe, s_ee = (dx * dx).sum(1) / (s - 1), (dx * de).sum(1) / (s - 1), (de * de).sum(1) / (s - 1)
        slope = torch.where(s_xx > 0, s_xe / s_xx.clamp(min=torch.finfo(s_xx.dtype).tiny), torch.zeros_like(s_xx))
        residual = (s_ee - slope * s_xe).clamp(min=0)
        return mean_eps, slope * var, slope**2 * var + residual
