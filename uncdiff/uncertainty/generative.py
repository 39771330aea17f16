"""Generative uncertainty of Jazbec et al. (UAI 2025, "Generative Uncertainty in Diffusion Models";
docs/algorithms.md §6c): how much a sample changes when the network's weights are redrawn from their
posterior.

For a sample's seed, M further chains start from the same x_T and draw the same sampler noise, each
under last-layer weights `(W_m, b_m)` drawn from BayesDiff's last-layer Laplace posterior
(`LastLayerLaplace`, docs/algorithms.md §5b): `eps_m(x, t) = conv(features(x, t); W_m, b_m)`. The sample's
score is the disagreement of the M final samples in a feature space: the trace of their covariance,
`sum_d Var_m[phi_d(x0^m)]` (unbiased over m), with `phi` the dataset's feature extractor (the pixels
themselves when none is given). The map is the per-pixel variance of the M final samples. The same M
weight draws serve every sample (seeded by `seed`), so a seed's score does not depend on its batch.

Cost: M full chains per sample, `M * steps` network evaluations beyond plain sampling.
"""

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from uncdiff.core.samplers import Sampler, sample
from uncdiff.uncertainty.bayesdiff import LastLayerLaplace, check_head
from uncdiff.uncertainty.estimators import check_count

Features = Callable[[torch.Tensor], torch.Tensor]  # images [N, C, H, W] in [-1, 1] -> [N, D]


def posterior_heads(laplace: LastLayerLaplace, M: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """M draws `(W [O, C, kh, kw], b [O])` from the diagonal Gaussian posterior, from a generator seeded
    with `seed` (on the CPU, so they do not depend on the device)."""
    generator = torch.Generator().manual_seed(seed)
    heads = []
    for _ in range(check_count("M", M, 2)):
        z_w = torch.randn(laplace.weight.shape, generator=generator, dtype=torch.float64)
        z_b = torch.randn(laplace.bias.shape, generator=generator, dtype=torch.float64)
        heads.append((laplace.weight + laplace.var_W.sqrt() * z_w.to(laplace.var_W),
                      laplace.bias + laplace.var_b.sqrt() * z_b.to(laplace.var_b)))
    return heads


class GenerativeUncertainty:
    """Scores samples by the disagreement of M posterior chains (the module docstring). `net` exposes
    `features(x, t)` and a conv `head` (BayesDiff's requirement), `laplace` its fitted posterior."""

    def __init__(self, net: nn.Module, laplace: LastLayerLaplace, M: int = 5, seed: int = 0,
                 features: Optional[Features] = None):
        check_head(net)
        if laplace is None:
            raise ValueError("the generative estimator draws weights from a last-layer Laplace posterior: fit one "
                             "first (as BayesDiff does)")
        self.net, self.laplace, self.features = net, laplace, features
        self.heads = posterior_heads(laplace, M, seed)
        self.reset()

    def reset(self) -> None:
        """Start counting network evaluations afresh (`nfe`: image rows through the M chains)."""
        self.nfe = 0

    def chain_model(self, m: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        weight, bias = self.heads[m]

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.nfe += x.shape[0]
            return self.laplace.head_conv(self.net.features(x, t), weight, bias)

        return eps

    @torch.no_grad()
    def __call__(self, sampler: Sampler, shape: Sequence[int], seeds: Sequence[int],
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """`(maps [N, C, H, W], scores [N])` for the samples of `seeds`."""
        finals = torch.stack([sample(self.chain_model(m), sampler, shape, seeds, device=device).double()
                              for m in range(len(self.heads))])  # [M, N, C, H, W]
        maps = finals.var(0, correction=1)
        if self.features is None:
            return maps.float(), maps.flatten(1).sum(1).float()
        phi = torch.stack([self.features(x.float()).double() for x in finals])  # [M, N, D]
        return maps.float(), phi.var(0, correction=1).sum(1).float()
