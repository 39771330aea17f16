"""DDPM ancestral and DDIM samplers over a plain `eps_model(x, t)` callable (docs/algorithms.md §2).

A sampler is a descending list of training timesteps plus a pure `step(eps, t, t_prev, x_t,
noise)`. The noise prediction is made by `sample()`, outside the step, and passed through an
optional `hook(ctx) -> eps` first: that is where uncertainty estimation and guidance inspect or
replace `eps` without knowing which sampler runs.
"""

import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch

from uncdiff.core.schedule import NoiseSchedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int], None]  # told the number of sampler steps just taken (a tqdm bar's `update`)
SPACINGS = ("uniform", "quadratic", "leading", "trailing", "linspace")
CLIPPED_EPS = ("rederive", "keep")
DDPM_VARIANCES = ("beta_tilde", "beta")
MAX_SEED = 2**32


class SampleNoise:
    """Per-sample random streams: sample i with seed s draws the same numbers whatever the
    batch it is in, the device, or the process that generates it.

    Each named stream (`"initial"`, `"sampler"`, `"uncertainty"`, ...) is independent of the
    others and of the order in which they are first used, so an estimator that draws
    perturbations never shifts the sampler's noise (estimation alone can't change images).
    Streams are numpy Philox generators keyed by (stream name, seed) through SeedSequence, so
    distinct (seed, stream) pairs never share numbers (torch's CPU generator keeps only 32 bits
    of its seed, which would make offset seeds collide).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        seeds = [int(s) for s in seeds]
        bad = [s for s in seeds if not 0 <= s < MAX_SEED]
        if bad:
            raise ValueError(f"seeds must lie in [0, 2**32), got {bad[:3]}")
        self.seeds = seeds
        self.device = torch.device(device)
        self._streams: dict[str, list[np.random.Generator]] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], stream: str = "sampler") -> torch.Tensor:
        """Standard normal float32 `[B, *shape]`, row b drawn from sample b's own stream."""
        if stream not in self._streams:
            key = zlib.crc32(stream.encode())
            self._streams[stream] = [np.random.Generator(np.random.Philox(np.random.SeedSequence([key, s])))
                                     for s in self.seeds]
        rows = np.stack([g.standard_normal(tuple(shape), dtype=np.float32) for g in self._streams[stream]])
        return torch.from_numpy(rows).to(self.device)

    def initial(self, shape: Sequence[int]) -> torch.Tensor:
        """x_T for every sample (`[B, *shape]`), from the stream "initial"."""
        return self.randn(shape, stream="initial")


class Sampler(Protocol):
    schedule: NoiseSchedule
    timesteps: list[int]
    clip: bool | float
    stochastic: bool

    def step(self, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor: ...


def clip_range(clip: bool | float) -> float:
    """The half-width r of the x0 clipping interval [-r, r] that `clip` asks for: True means 1 (pixel
    models in [-1, 1]), a number > 0 is r itself (diffusers' `clip_sample_range`), False/0 is none (0)."""
    if isinstance(clip, bool):
        return 1.0 if clip else 0.0
    if not clip >= 0:
        raise ValueError(f"clip must be a bool or a range >= 0, got {clip}")
    return float(clip)


def predict_x0(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int,
               clip: bool | float) -> torch.Tensor:
    """Clean-image estimate `(x_t - sqrt(1 - abar[t]) eps) / sqrt(abar[t])`, clipped to [-r, r]
    with `r = clip_range(clip)` when clipping is on."""
    a = schedule.abar_at(t)
    x0 = (x_t - (1 - a) ** 0.5 * eps) / a**0.5
    r = clip_range(clip)
    return x0.clamp(-r, r) if r > 0 else x0


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """`steps` training timesteps, descending. `uniform`: floor(i T / S); `quadratic`:
    floor(linspace(0, sqrt(0.8 T), S)^2), both as in Song et al.'s DDIM code. `leading`
    (i floor(T / S)), `trailing` (round(T - i T / S) - 1) and `linspace` (round(linspace(0, T - 1, S)))
    are diffusers' `timestep_spacing` values with `steps_offset = 0`; `leading` equals `uniform`
    when S divides T (docs/diffusers.md, "Timestep spacing")."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "uniform":
        ts = [i * num_timesteps // steps for i in range(steps)]
    elif spacing == "leading":
        ts = [i * (num_timesteps // steps) for i in range(steps)]
    elif spacing == "trailing":
        ts = (np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1).tolist()[::-1]
    elif spacing == "linspace":
        ts = np.linspace(0, num_timesteps - 1, steps).round().astype(np.int64).tolist()
    elif spacing == "quadratic":
        ts = [int(v) for v in np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2]
        if len(set(ts)) != steps:
            raise ValueError(f"quadratic spacing repeats timesteps at {steps} steps; use fewer steps or 'uniform'")
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return ts[::-1]


class DDPMSampler:
    """Ancestral sampling (Ho et al.), respaced uniformly when `steps < T`.

    Step from t to t_prev with `beta = 1 - abar[t] / abar[t_prev]`: posterior mean of
    q(x_{t_prev} | x_t, x0_hat) plus noise of variance `beta_tilde` (default) or `beta`.
    """

    def __init__(self, schedule: NoiseSchedule, steps: Optional[int] = None,
                 variance: str = "beta_tilde", clip: bool | float = True):
        if variance not in DDPM_VARIANCES:
            raise ValueError(f"variance must be one of {DDPM_VARIANCES}, got {variance!r}")
        self.schedule = schedule
        self.timesteps = spaced_timesteps(schedule.num_timesteps,
                                          schedule.num_timesteps if steps is None else steps)
        self.variance = variance
        clip_range(clip)  # fail now on a bad range
        self.clip = clip
        self.stochastic = True

    def step(self, eps, t, t_prev, x_t, noise=None):
        a_t, a_prev = self.schedule.abar_at(t), self.schedule.abar_at(t_prev)
        beta = 1 - a_t / a_prev
        x0 = predict_x0(self.schedule, x_t, eps, t, self.clip)
        mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x_t
        if t_prev < 0:
            return mean
        var = beta * (1 - a_prev) / (1 - a_t) if self.variance == "beta_tilde" else beta
        return mean + var**0.5 * noise


class DDIMSampler:
    """DDIM (Song et al.): `x_prev = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z`,
    `sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')`.

    With clipping, `clipped_eps` says which eps the direction term uses (docs/algorithms.md §2):
    `rederive` (default) re-derives it from the clipped x0, so that the step stays on the line
    through x_t and x0 (as in guided-diffusion; diffusers' `use_clipped_model_output=True`);
    `keep` uses the network's eps unchanged (diffusers' default).
    """

    def __init__(self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0,
                 spacing: str = "uniform", clip: bool | float = True, clipped_eps: str = "rederive"):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if clipped_eps not in CLIPPED_EPS:
            raise ValueError(f"clipped_eps must be one of {CLIPPED_EPS}, got {clipped_eps!r}")
        self.schedule = schedule
        self.timesteps = spaced_timesteps(schedule.num_timesteps, steps, spacing)
        self.eta = eta
        clip_range(clip)  # fail now on a bad range
        self.clip = clip
        self.clipped_eps = clipped_eps
        self.stochastic = eta > 0

    def step(self, eps, t, t_prev, x_t, noise=None):
        a_t, a_prev = self.schedule.abar_at(t), self.schedule.abar_at(t_prev)
        x0 = predict_x0(self.schedule, x_t, eps, t, self.clip)
        if clip_range(self.clip) > 0 and self.clipped_eps == "rederive":
            eps = (x_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        return x_prev + sigma * noise if sigma > 0 else x_prev


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}


def make_sampler(schedule: NoiseSchedule, name: str = "ddim", **kwargs) -> Sampler:
    """Build a sampler by name ('ddpm' or 'ddim'); kwargs go to its constructor."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](schedule, **kwargs)


@dataclass
class StepContext:
    """What a hook sees before sampler step `index` (of `num_steps`) takes x_t from t to t_prev."""

    index: int
    num_steps: int
    t: int
    t_prev: int
    x_t: torch.Tensor  # [B, C, H, W]
    eps: torch.Tensor  # [B, C, H, W], the network's prediction at (x_t, t)
    eps_model: EpsModel
    sampler: Sampler
    noise: SampleNoise


Hook = Callable[[StepContext], torch.Tensor]


@torch.no_grad()
def sample(eps_model: EpsModel, sampler: Sampler, shape: Sequence[int], seeds: Sequence[int],
           hook: Optional[Hook] = None, device: torch.device | str = "cpu",
           progress: Optional[Progress] = None) -> torch.Tensor:
    """Run `sampler` from x_T ~ N(0, I) for one image per seed; returns x_0 `[len(seeds), *shape]`.

    `eps_model(x [B, C, H, W], t [B] long) -> eps [B, C, H, W]`. `hook(ctx) -> eps` may replace
    the prediction before each step (it runs under no_grad; enable grad inside if needed).
    `progress(1)` is called after every step (the caller draws any progress bar).
    """
    noise = SampleNoise(seeds, device)
    x = noise.initial(shape)
    steps = sampler.timesteps
    pairs = list(zip(steps, steps[1:] + [-1]))
    for i, (t, t_prev) in enumerate(pairs):
        t_batch = torch.full((len(noise),), t, device=x.device, dtype=torch.long)
        eps = eps_model(x, t_batch)
        if hook is not None:
            eps = hook(StepContext(i, len(pairs), t, t_prev, x, eps, eps_model, sampler, noise))
        z = noise.randn(shape) if sampler.stochastic and t_prev >= 0 else None
        x = sampler.step(eps, t, t_prev, x, z)
        if progress is not None:
            progress(1)
    return x
