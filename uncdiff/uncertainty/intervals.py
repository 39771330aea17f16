"""Per-pixel intervals with a distribution-free guarantee (docs/algorithms.md §8): intervals
`[f - lam l, f + lam u]` around an output from a heuristic spread, the loss of an image (the fraction of
its generated pixels whose truth falls outside), the Hoeffding-Bentkus upper confidence bound of the
mean loss, and the scan that picks the smallest lam whose bound stays <= alpha (risk-controlling
prediction sets: Bates, Angelopoulos et al. 2021; Angelopoulos et al., ICML 2022). No files, no
Lightning: the commands hand in tensors and a loss function.

n counts calibration IMAGES, never pixels: the guarantee needs i.i.d. losses, and the pixels of one
image share its input and its restoration, so they are not independent. An image's loss is one number
in [0, 1] (its fraction of missed pixels), and the n images of a calibration set are the i.i.d. draws.
"""

import math
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from scipy import special

from uncdiff.uncertainty.calibration import quantile_over_samples

QUANTILE_LEVELS = (0.25, 0.75)  # the K-sample spread's lower and upper quantiles
MIN_SAMPLES_FOR_QUANTILES = 4  # below this the quartiles are interpolations of two or three samples


def check_level(name: str, value: float) -> None:
    """Refuse a risk level or error probability outside (0, 1), naming it."""
    if not 0 < float(value) < 1:  # NaN fails too
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")


def interval(f: torch.Tensor, lower_spread: torch.Tensor, upper_spread: torch.Tensor,
             lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lo, hi) = (f - lam l, f + lam u)` per pixel, for an output `f [N, C, H, W]` and non-negative
    spreads `l`, `u` broadcastable to it (a symmetric heuristic passes its map twice)."""
    return f - lam * lower_spread, f + lam * upper_spread


def image_losses(truth: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`[N]` float64: per image, the fraction of its generated values whose truth lies outside
    `[lo, hi]` (`truth`, `lo`, `hi` `[N, C, H, W]`). `mask [N, 1, H, W]` is 1 at the generated pixels
    (None: every pixel); each (pixel, channel) value counts once."""
    outside = ((truth < lo) | (truth > hi)).double()
    region = torch.ones_like(outside) if mask is None else mask.to(outside).expand_as(outside)
    counts = region.flatten(1).sum(1)
    if (counts == 0).any():
        empty = int((counts == 0).nonzero()[0])
        raise ValueError(f"image {empty} has no generated pixels (its mask is all 0): its loss is undefined")
    return (outside * region).flatten(1).sum(1) / counts


def kl_bernoulli(a: float, mu: float) -> float:
    """`h(a, mu) = a log(a / mu) + (1 - a) log((1 - a) / (1 - mu))`, with 0 log 0 = 0."""
    return float(special.rel_entr(a, mu) + special.rel_entr(1 - a, 1 - mu))


def hb_p_value(risk_hat: float, n: int, mu: float) -> float:
    """The Hoeffding-Bentkus p-value of "the mean loss is >= mu" after n i.i.d. losses in [0, 1] with
    empirical mean `risk_hat`: `min(exp(-n h(min(risk_hat, mu), mu)), e P(Binom(n, mu) <= ceil(n risk_hat)))`.

    Bentkus' term uses the ceiling: Bates et al. 2021 (Proposition 3) and Learn then Test
    (Angelopoulos et al. 2021, the HB p-value) state P(R_hat <= t) <= e P(Binom(n, R) <= ceil(n t)).
    The floor, which some public RCPS code uses, makes the tail smaller for non-integer n R_hat and is
    not covered by the theorem. A sum within 1e-9 of an integer counts as that integer, so float
    round-off in a mean (0.07 * 100 = 7.000000000000001) does not cost a whole image."""
    hoeffding = math.exp(-n * kl_bernoulli(min(risk_hat, mu), mu))
    k = math.ceil(n * risk_hat - 1e-9)
    bentkus = math.e * float(special.bdtr(k, n, mu)) if k < n else math.e
    return min(hoeffding, bentkus)


def hoeffding_bentkus_ucb(risk_hat: float, n: int, delta: float) -> float:
    """R+: the upper confidence bound of the mean of a [0, 1]-bounded loss from n i.i.d. images with
    empirical mean `risk_hat`, at error probability `delta`: the smallest mu >= risk_hat whose
    `hb_p_value` is <= delta (so P(mean > R+) <= delta). The p-value falls as mu grows, so bisection
    finds it; the returned end of the bracket always satisfies the bound."""
    check_level("delta", delta)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive whole number of calibration images, got {n!r}")
    if not 0 <= risk_hat <= 1:
        raise ValueError(f"risk_hat must lie in [0, 1] (a mean of [0, 1] losses), got {risk_hat!r}")
    if risk_hat == 1:
        return 1.0
    # p(risk_hat) = 1 (P(Binom(n, mu) <= ceil(n mu)) >= 1/2, the binomial median), p(1) = 0
    lo, hi = risk_hat, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if hb_p_value(risk_hat, n, mid) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def min_calibration_size(alpha: float, delta: float) -> int:
    """The smallest number of calibration images for which a zero empirical risk passes at
    (alpha, delta). With zero risk the HB p-value at alpha is (1 - alpha)^n, so this is the smallest
    n with (1 - alpha)^n <= delta; fewer images cannot certify any lam."""
    check_level("alpha", alpha)
    check_level("delta", delta)
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    while n > 1 and hb_p_value(0.0, n - 1, alpha) <= delta:  # float round-off in the logarithms
        n -= 1
    while hb_p_value(0.0, n, alpha) > delta:
        n += 1
    return n


def calibrate_lambda(losses_fn: Callable[[float], torch.Tensor | np.ndarray], lambdas: Sequence[float], n: int,
                     alpha: float, delta: float) -> float:
    """lam_hat: the smallest lam of the ascending grid `lambdas` such that it and every larger lam pass,
    where lam passes when the HB bound of its mean loss is <= alpha (equivalently `hb_p_value(risk,
    n, alpha) <= delta`, as the p-value falls in mu). `losses_fn(lam)` returns the n calibration
    images' losses `[n]` in [0, 1]. Then P(E[L(lam_hat)] <= alpha) >= 1 - delta over calibration sets.

    The scan starts at the largest lam and stops at the first that fails, so it evaluates the losses
    only as far down as needed. Refuses, before calling `losses_fn`, a bad alpha or delta, a grid that
    is empty, unsorted or negative, and fewer images than `min_calibration_size(alpha, delta)`."""
    check_level("alpha", alpha)
    check_level("delta", delta)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive whole number of calibration images, got {n!r}")
    grid = np.asarray(lambdas, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all() or (grid < 0).any():
        raise ValueError(f"lambdas must be a non-empty list of finite lam >= 0, got {lambdas!r}")
    if (np.diff(grid) <= 0).any():
        raise ValueError("lambdas must be strictly ascending")
    smallest = min_calibration_size(alpha, delta)
    if n < smallest:
        raise ValueError(f"{n} calibration images are too few for alpha = {alpha}, delta = {delta}: even a zero "
                         f"empirical risk cannot pass; use at least {smallest} images (or a larger alpha or delta)")
    lam_hat = None
    for lam in grid[::-1]:
        losses = losses_fn(float(lam))
        if isinstance(losses, torch.Tensor):
            losses = losses.detach().cpu().double().numpy()
        losses = np.asarray(losses, dtype=np.float64).ravel()
        if losses.size != n:
            raise ValueError(f"losses_fn({lam:g}) gave {losses.size} losses for n = {n} calibration images")
        if not ((losses >= 0) & (losses <= 1)).all():
            raise ValueError(f"losses_fn({lam:g}) gave losses outside [0, 1]; the bound needs bounded losses")
        risk = float(losses.mean())
        if hb_p_value(risk, n, alpha) > delta:
            break
        lam_hat = float(lam)
    if lam_hat is None:
        raise ValueError(f"even the largest lam {grid[-1]:g} fails: its risk {risk:.4f} over {n} images has the "
                         f"upper bound {hoeffding_bentkus_ucb(risk, n, delta):.4f} > alpha = {alpha}; extend the "
                         f"lambda grid upward, or use more calibration images, or a larger alpha or delta")
    return lam_hat


class Spread(NamedTuple):
    """The K-sample heuristic, each `[N, C, H, W]`: `std` (symmetric), and where K allows the distances
    `lower = median - q_25` and `upper = q_75 - median` (non-negative, None when K < 4)."""
    std: torch.Tensor
    lower: Optional[torch.Tensor]
    upper: Optional[torch.Tensor]


def k_sample_spread(samples: torch.Tensor, judged: Optional[torch.Tensor] = None) -> Spread:
    """The spread of K restorations `samples [K, N, C, H, W]` of the same inputs: the unbiased standard
    deviation over K (K >= 2), and for K >= 4 the lower and upper quartile distances from the median,
    which the interval applies around the judged output.

    The K samples must be INDEPENDENT of the output being judged (other seeds): a spread that
    includes the judged output itself is biased towards it, so samples[0] must not be that output.
    Given `judged [N, C, H, W]`, a sample equal to it is refused."""
    if samples.dim() != 5 or samples.shape[0] < 2:
        raise ValueError(f"samples must be [K >= 2, N, C, H, W], got {tuple(samples.shape)}")
    if judged is not None:
        for k in range(samples.shape[0]):
            if torch.equal(samples[k], judged):
                raise ValueError(f"samples[{k}] is the judged output itself; the spread must come from K "
                                 f"restorations with other seeds")
    x = samples.double()
    std = x.std(dim=0)
    if samples.shape[0] < MIN_SAMPLES_FOR_QUANTILES:
        return Spread(std, None, None)
    median = quantile_over_samples(x, 0.5)
    lower = median - quantile_over_samples(x, QUANTILE_LEVELS[0])
    upper = quantile_over_samples(x, QUANTILE_LEVELS[1]) - median
    return Spread(std, lower, upper)


def miss_thresholds(truth: torch.Tensor, f: torch.Tensor, lower_spread: torch.Tensor,
                    upper_spread: torch.Tensor) -> torch.Tensor:
    """`[N, C, H, W]` float64: per value, the smallest lam whose interval `[f - lam l, f + lam u]`
    holds the truth, so the value is missed at lam exactly when its threshold exceeds lam: `(f - y) / l`
    below the output, `(y - f) / u` above it, 0 at the output, and inf where the needed spread is 0."""
    y, f = truth.double(), f.double()
    l, u = lower_spread.double().expand_as(f), upper_spread.double().expand_as(f)
    below, above = (f - y).clamp_min(0), (y - f).clamp_min(0)
    need = torch.where(y < f, below, above)
    spread = torch.where(y < f, l, u)
    out = torch.where(spread > 0, need / spread.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    return torch.where(need == 0, torch.zeros_like(out), out)


def losses_on_grid(thresholds: torch.Tensor, mask: Optional[torch.Tensor], lambdas: Sequence[float]) -> np.ndarray:
    """`[G, N]` float64: `image_losses` of the N images at every lam of the grid at once, from their
    `miss_thresholds [N, C, H, W]` (a value is missed at lam when its threshold exceeds lam)."""
    n = thresholds.shape[0]
    region = torch.ones_like(thresholds, dtype=torch.bool) if mask is None else \
        (mask.to(thresholds.device).expand_as(thresholds) > 0.5)
    counts = region.flatten(1).sum(1)
    if (counts == 0).any():
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no generated pixels: its loss is undefined")
    values = torch.where(region, thresholds, -torch.inf).flatten(1).sort(dim=1).values  # known values never miss
    grid = torch.as_tensor(np.asarray(lambdas, dtype=np.float64)).expand(n, -1).contiguous()
    covered = torch.searchsorted(values, grid, right=True)  # values with threshold <= lam, known ones included
    missed = values.shape[1] - covered
    return (missed.double() / counts[:, None].double()).T.numpy()


GRID_RANGE = (1e-5, 1e5, 2001)  # the default lam grid: 0, then log-spaced steps of 1.2 %, fixed before any data
DEFAULT_GRID = np.concatenate([[0.0], np.geomspace(*GRID_RANGE)])
SPREAD_SEED_STRIDE = 2 ** 28  # spread sample k of the image with seed s has seed s + k * stride
MAX_SPREAD_SAMPLES = 15  # so that every spread seed stays below 2**32


def spread_seeds(seeds: Sequence[int], k: int) -> list[int]:
    """The seeds of spread sample k (1..K) of the images restored with `seeds`: `s + k 2^28`, never one
    of the outputs' seeds (each below 2^28), so the spread is independent of the outputs it is judged
    against."""
    if not 1 <= k <= MAX_SPREAD_SAMPLES or any(not 0 <= s < SPREAD_SEED_STRIDE for s in seeds):
        raise ValueError(f"spread samples k = 1..{MAX_SPREAD_SAMPLES} of images with seeds in [0, 2**28)")
    return [int(s) + k * SPREAD_SEED_STRIDE for s in seeds]


VALUE_RANGE = (-1.0, 1.0)  # where images live: an interval is cut to it, which changes no image's loss


def interval_maps(f: torch.Tensor, lower_spread: torch.Tensor, upper_spread: torch.Tensor,
                  lam: float) -> dict[str, torch.Tensor]:
    """`{'lower', 'upper', 'width'}` maps `[N, C, H, W]` of the calibrated intervals around `f`, cut to
    the images' range [-1, 1]: the truth lies in it, so the cut misses nothing the interval held (the
    same losses, the same lam_hat and guarantee) and the width is what the interval says."""
    lo, hi = interval(f.double(), lower_spread.double(), upper_spread.double(), lam)
    lo, hi = lo.clamp(*VALUE_RANGE), hi.clamp(*VALUE_RANGE)
    return {"lower": lo, "upper": hi, "width": hi - lo}


def spread_from_map(variance_map: torch.Tensor) -> torch.Tensor:
    """A symmetric spread from an estimator's map (a sum of variances, docs/algorithms.md §3, §5): its
    square root, so that lam scales a standard deviation."""
    return variance_map.double().clamp_min(0).sqrt()
