"""Noise schedules and the DDPM forward process (docs/algorithms.md §1)."""

import math

import torch

BETA_SCHEDULES = ("linear", "cosine")


def make_betas(schedule: str = "linear", num_timesteps: int = 1000) -> torch.Tensor:
    """Betas `[T]` in float64: linear 1e-4..0.02 (Ho et al.) or cosine (Nichol & Dhariwal)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if schedule == "linear":
        # Ho et al. define the range for T = 1000; rescale so other T keep the same abar curve.
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")


class NoiseSchedule:
    """`abar[t]` for training timesteps t in [0, T); `abar_at(-1) == 1` (the clean image).

    Stored in float64 and cast at use, so float32 rounding is the only error in the samplers.
    """

    def __init__(self, schedule: str = "linear", num_timesteps: int = 1000):
        self.name = schedule
        self.num_timesteps = num_timesteps
        self.betas = make_betas(schedule, num_timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, name: str) -> "NoiseSchedule":
        """A schedule with the given `abar[t]` `[T]` (a pretrained model's, e.g. exactly what a diffusers
        scheduler computes), kept in float64; `name` says where it came from."""
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.ndim != 1 or len(abar) < 2 or not bool(((abar > 0) & (abar < 1)).all() and (abar.diff() < 0).all()):
            raise ValueError(f"alphas_cumprod must be a decreasing 1-D tensor of >= 2 values in (0, 1), "
                             f"got shape {tuple(abar.shape)}")
        schedule = cls.__new__(cls)
        schedule.name, schedule.num_timesteps, schedule.alphas_cumprod = name, len(abar), abar
        schedule.betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        return schedule

    def abar_at(self, t: int) -> float:
        """Scalar abar for one training timestep; t = -1 means 'before the first step' (abar = 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar for a batch of timesteps `[B]` -> `[B, 1, 1, 1]` on t's device, float32."""
        return self.alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Forward process: `x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps`, shapes `[B, C, H, W]`."""
        a = self.abar(t)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps
