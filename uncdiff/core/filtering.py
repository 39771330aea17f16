"""Which samples a per-sample score keeps (docs/algorithms.md §3, §6): plain tensor math, shared by
the sample store, the evaluation experiments and the training callbacks."""

import torch


def keep_best(scores: torch.Tensor, fraction_dropped: float) -> torch.Tensor:
    """Bool mask `[N]` keeping all but the `round(p N)` samples with the highest score (filtering,
    docs/algorithms.md §3/§6). Ties are broken by position; NaN scores count as highest."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    if not 0.0 <= fraction_dropped < 1.0:
        raise ValueError(f"fraction_dropped must be in [0, 1), got {fraction_dropped!r}")
    n_drop = round(fraction_dropped * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores.cpu(), descending=True, stable=True)[:n_drop]] = False
    return keep
