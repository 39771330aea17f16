"""Uncertainty-guided sampling (docs/algorithms.md §4) as a sampler hook (its threshold tables are made by
`uncdiff.uncertainty.calibration.calibrate_threshold_table`, saved and loaded by `uncdiff.io.tables`).

On the steps of the guidance window the hook replaces `eps_bar` by a guided `eps_tilde` and lets
the ordinary sampler step run, so it works unchanged under DDPM, DDIM or any later sampler.
Outside the window it is the plain estimator (`AleatoricUncertainty`): it returns `eps_bar`.
"""

from typing import Optional, Sequence

import torch

from uncdiff.core.samplers import EpsModel, StepContext, predict_x0
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.uncertainty.estimators import (AleatoricUncertainty, check_window, perturbed_eps, reduce_perturbations,
                                            renoise, window_steps)

RULES = ("gradient", "posterior")
GRAD_WRT = ("eps", "x_t")
REDUCTIONS = ("sum", "mean")
ABAR_INVERSE = "abar_inverse"  # the posterior rule's prior precision 1 / abar[t] (the paper's form)


def check_grad_wrt(grad_wrt: str) -> str:
    if grad_wrt not in GRAD_WRT:
        raise ValueError(f"grad_wrt must be one of {GRAD_WRT}, got {grad_wrt!r}")
    return grad_wrt


def check_reduce(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return reduce


def check_prior_precision(prior_precision: float | str) -> float | str:
    """A finite number >= 0, or `'abar_inverse'` (1 / abar[t] of the step)."""
    if prior_precision == ABAR_INVERSE:
        return ABAR_INVERSE
    try:
        value = float(prior_precision)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(prior_precision, bool) or not 0.0 <= value < float("inf"):
        raise ValueError(f"prior_precision must be a finite number >= 0 or {ABAR_INVERSE!r}, got {prior_precision!r}")
    return value


def uncertainty_gradient(eps_model: EpsModel, x_t: torch.Tensor, eps_bar: torch.Tensor, t: int,
                         schedule: NoiseSchedule, clip: bool, z: torch.Tensor, variant: str = "centered",
                         chunk_size: Optional[int] = None, grad_wrt: str = "eps",
                         reduce: str = "sum") -> tuple[torch.Tensor, torch.Tensor, int]:
    """`U_t [B, C, H, W]` and the guidance gradient `[B, C, H, W]` of docs/algorithms.md §4.

    The scalar differentiated is `U = sum over pixels of U_t` of each image (`reduce='sum'`; images
    are independent, so the gradient of the batch sum is every image's own), or that divided by
    the batch size B (`reduce='mean'`: the pixel maps averaged over the B images, then summed over
    pixels), with the draws `z` held fixed. `grad_wrt` says with respect to what:
    - `'eps'`: `eps_bar` alone, `x_t` fixed. The derivative flows through
      `x0_hat -> x_t^i -> eps_theta` *and*, for the `centered` variant, through the direct
      `- eps_bar` in `(eps_i - eps_bar)^2` (the total derivative);
    - `'x_t'`: `x_t`, with `eps_bar = eps_theta(x_t, t)` following it: the partial derivatives in
      `x_t` and `eps_bar` are taken first, then the one in `eps_bar` is carried back through
      `eps_theta` at `x_t` (one more forward and backward pass of the B images).

    With all B*M perturbed rows in one chunk this is M forward passes and one backward. With
    smaller chunks, only one chunk's graph is held at a time: a first pass without graph gives
    `eps_i` and `dU/d eps_i`, and each chunk is then recomputed with its graph and
    back-propagated (2M forward passes). Returns `(U, gradient, rows evaluated)`.

    `eps_model` must be differentiable (not wrapped in `torch.no_grad`).
    """
    check_grad_wrt(grad_wrt)
    check_reduce(reduce)
    b, m = z.shape[:2]
    rows = b * m
    wrt_x = grad_wrt == "x_t"
    eps_bar, x_t = eps_bar.detach(), x_t.detach()
    with torch.enable_grad():
        # leaves: eps_bar always (its partial is needed either way), x_t only when differentiating in it
        e = eps_bar.clone().requires_grad_(True)
        x = x_t.clone().requires_grad_(wrt_x)
        leaves = (e, x) if wrt_x else (e,)
        if chunk_size is None or chunk_size >= rows:
            eps_i = perturbed_eps(eps_model, x, e, t, schedule, clip, z)
            require_grad(eps_i)
            u = reduce_perturbations(eps_i, e, variant)
            partials = list(torch.autograd.grad(u.sum(), leaves))
        else:
            with torch.no_grad():
                eps_i = perturbed_eps(eps_model, x_t, eps_bar, t, schedule, clip, z, chunk_size)
            eps_i.requires_grad_(True)
            u = reduce_perturbations(eps_i, e, variant)
            # dU/d eps_i, and the direct term of the centered variant (None for `sample`)
            g_rows, direct = torch.autograd.grad(u.sum(), (eps_i, e), allow_unused=True)
            g_rows = g_rows.flatten(0, 1)
            t_batch = torch.full((rows,), t, device=x_t.device, dtype=torch.long)
            partials = [torch.zeros_like(eps_bar) if direct is None else direct] + ([torch.zeros_like(x_t)]
                                                                                     if wrt_x else [])
            for s in range(0, rows, chunk_size):
                # x0_hat and the re-noising are cheap: rebuilt per chunk so each chunk's graph is freed.
                # autograd.grad, not backward: the network's parameters get no .grad as a side effect.
                e = eps_bar.clone().requires_grad_(True)
                x = x_t.clone().requires_grad_(wrt_x)
                x_i = renoise(predict_x0(schedule, x, e, t, clip), z, schedule.abar_at(t))[s:s + chunk_size]
                out = eps_model(x_i, t_batch[s:s + chunk_size])
                require_grad(out)
                chunk = torch.autograd.grad(out, (e, x) if wrt_x else (e,), grad_outputs=g_rows[s:s + chunk_size])
                partials = [p + c for p, c in zip(partials, chunk)]
            rows *= 2
        grad = partials[0]
        if wrt_x:  # dU/dx_t = (partial in x_t) + J_eps_theta(x_t)^T (partial in eps_bar)
            grad = partials[1] + eps_vjp(eps_model, x_t, t, partials[0], chunk_size)
            rows += b
    if reduce == "mean":
        grad = grad / b
    return u.detach(), grad, rows


def eps_vjp(eps_model: EpsModel, x_t: torch.Tensor, t: int, v: torch.Tensor,
            chunk_size: Optional[int] = None) -> torch.Tensor:
    """`J^T v [B, C, H, W]`, with J the Jacobian of `eps_theta(., t)` at `x_t [B, C, H, W]` (image by
    image), evaluated `chunk_size` images at a time (all at once when None)."""
    step = len(x_t) if chunk_size is None else chunk_size
    t_batch = torch.full((len(x_t),), t, device=x_t.device, dtype=torch.long)
    parts = []
    with torch.enable_grad():
        for s in range(0, len(x_t), step):
            x = x_t[s:s + step].detach().requires_grad_(True)
            out = eps_model(x, t_batch[s:s + step])
            require_grad(out)
            parts.append(torch.autograd.grad(out, x, grad_outputs=v[s:s + step])[0])
    return torch.cat(parts)


def require_grad(eps: torch.Tensor) -> None:
    if not eps.requires_grad:
        raise RuntimeError("rule='gradient' needs a differentiable eps_model, but it returned a tensor without "
                           "a graph: is it wrapped in torch.no_grad() (as DiffusionModule.ema_eps is)? Pass the "
                           "network itself in eval mode.")


def posterior_eps(eps_i: torch.Tensor, eps_bar: torch.Tensor, prior_precision: float,
                  mask: torch.Tensor) -> torch.Tensor:
    """docs/algorithms.md §4 `posterior` rule: `eps_tilde = m * mu + (1 - m) * eps_bar` with
    `sigma2` = unbiased variance over `{eps_1..eps_M, eps_bar}` and
    `mu = (sum_i eps_i / sigma2) / (M / sigma2 + prior_precision)`, the sum over the M perturbations
    of each image (not over the batch). Computed as `sum_i eps_i / (M + sigma2 * prior_precision)`,
    the same value multiplied through by `sigma2`, which stays finite where `sigma2 = 0`.
    `eps_i [B, M, C, H, W]`, `eps_bar` and `mask` `[B, C, H, W]`."""
    m = eps_i.shape[1]
    sigma2 = torch.cat([eps_i, eps_bar[:, None]], dim=1).var(1, correction=1)
    mu = eps_i.sum(1) / (m + sigma2 * prior_precision)
    mask = mask.to(eps_bar.dtype)
    return mask * mu + (1 - mask) * eps_bar


def percentile_threshold(u: torch.Tensor, quantile: float) -> torch.Tensor:
    """`tau_b [B, 1, 1, 1]`: the `quantile` of image b's own C*H*W values of `u [B, C, H, W]`."""
    return torch.quantile(u.flatten(1).float(), quantile, dim=1).view(-1, 1, 1, 1).to(u.dtype)


class UncertaintyGuidance:
    """docs/algorithms.md §4 as a sampler hook; also reports scores and maps like `AleatoricUncertainty`.

    `estimator` is the aleatoric estimator it computes `U_t` with (its `M` draws z from the per-sample
    `'uncertainty'` stream are reused inside the gradient; its variant and chunk size apply) and
    records with: on the steps of the estimator's own window it records `U_t` into `scores`/`maps`
    (on guided steps the map computed for guidance, at `eps_bar`, before the update).
    On the steps of `window` (fractions of the sampler's steps; default the first 3 of 20): compute
    `U_t`, the mask `m = 1[U_t > tau]` (`tau_b` the `quantile` of image b's own values, or, when a
    `table` is given, `tau = table[step]`, a `[steps, C, H, W]` tensor from
    `calibration.calibrate_threshold_table`), and return
    - `rule='gradient'`: `eps_bar + sign * lam * m * dU`, `dU` the derivative of `U` (summed over
      pixels; `reduce='mean'`: also averaged over the batch) with respect to `grad_wrt`, `eps_bar`
      or `x_t` (see `uncertainty_gradient`);
    - `rule='posterior'`: `posterior_eps` with `prior_precision`, a number or `'abar_inverse'`
      (1 / abar[t], the paper's form).
    Outside the guidance window `eps_bar` is returned unchanged.
    """

    def __init__(self, estimator: AleatoricUncertainty, rule: str = "gradient", sign: int = 1, lam: float = 1.0,
                 quantile: float = 0.95, table: Optional[torch.Tensor] = None,
                 window: Sequence[float] = (0.0, 0.15), grad_wrt: str = "eps", reduce: str = "sum",
                 prior_precision: float | str = 1.0):
        if not isinstance(estimator, AleatoricUncertainty):
            raise TypeError(f"estimator must be an AleatoricUncertainty, got {type(estimator).__name__}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        if not float(lam) >= 0 or float(lam) == float("inf"):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
        if table is not None and (not isinstance(table, torch.Tensor) or table.dim() != 4):
            raise ValueError(f"table must be a tensor [steps, C, H, W], got {getattr(table, 'shape', table)!r}")
        self.window = check_window("window", window)
        self.rule, self.sign, self.lam = rule, int(sign), float(lam)
        self.grad_wrt, self.reduce = check_grad_wrt(grad_wrt), check_reduce(reduce)
        self.prior_precision = check_prior_precision(prior_precision)
        self.quantile, self.table = float(quantile), table
        self.estimator = estimator

    # the estimator's results, so this hook reads like any other estimator
    def reset(self) -> None:
        self.estimator.reset()

    @property
    def nfe(self) -> int:
        return self.estimator.nfe

    @property
    def scores(self) -> Optional[torch.Tensor]:
        return self.estimator.scores

    @property
    def maps(self) -> Optional[torch.Tensor]:
        return self.estimator.maps

    @property
    def step_maps(self) -> Optional[torch.Tensor]:
        return self.estimator.step_maps

    @property
    def step_indices(self) -> list[int]:
        return self.estimator.step_indices

    def in_window(self, ctx: StepContext) -> bool:
        return ctx.index in window_steps(self.window, ctx.num_steps)

    def mask(self, u: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """`m = 1[U_t > tau]`, `[B, C, H, W]` bool."""
        if self.table is None:
            return u > percentile_threshold(u, self.quantile)
        if self.table.shape[0] != ctx.num_steps or self.table.shape[1:] != u.shape[1:]:
            raise ValueError(f"threshold table has shape {tuple(self.table.shape)} but this run needs "
                             f"[{ctx.num_steps}, {', '.join(map(str, u.shape[1:]))}] (steps, C, H, W)")
        return u > self.table[ctx.index].to(u)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        est = self.estimator
        if not self.in_window(ctx):
            return est(ctx)
        est.start(ctx)
        z = est.draw_perturbations(ctx)
        schedule, clip = ctx.sampler.schedule, ctx.sampler.clip
        if self.rule == "gradient":
            u, grad, rows = uncertainty_gradient(ctx.eps_model, ctx.x_t, ctx.eps, ctx.t, schedule, clip, z,
                                                 est.variant, est.chunk_size, self.grad_wrt, self.reduce)
        else:
            eps_i = perturbed_eps(ctx.eps_model, ctx.x_t, ctx.eps, ctx.t, schedule, clip, z, est.chunk_size)
            u, rows = reduce_perturbations(eps_i, ctx.eps, est.variant), eps_i.shape[0] * eps_i.shape[1]
        est.nfe += rows
        if est.in_window(ctx):
            est.record(ctx, u)
        m = self.mask(u, ctx)
        if self.rule == "gradient":
            return ctx.eps + (self.sign * self.lam) * m.to(grad.dtype) * grad
        precision = self.prior_precision
        if precision == ABAR_INVERSE:
            precision = 1.0 / schedule.abar_at(ctx.t)
        return posterior_eps(eps_i, ctx.eps, precision, m)

