"""Detection of invalid samples from exact labels (docs/algorithms.md §6c): how well a per-sample score
finds the samples the shapes checker marks invalid, and whether guidance changes the invalid rate.

Plain functions of `scores [N]` (higher = more likely invalid) and `invalid [N]` (bool labels); nothing
here samples or reads files. Undefined values (AUROC without both classes, a fraction of an empty
class) are NaN.
"""

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from uncdiff.core.filtering import keep_best

RETENTIONS = (0.9, 0.95)
Metric = Callable[[np.ndarray, np.ndarray], float]


def _arrays(scores, invalid) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    y = np.asarray(invalid.cpu() if isinstance(invalid, torch.Tensor) else invalid)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores and invalid labels must be 1-D of one length, got {s.shape} and {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y.astype(bool)


def auroc(scores, invalid) -> float:
    """Area under the ROC curve: the probability that an invalid sample scores above a valid one, ties
    counting one half (the Mann-Whitney U statistic over `n_invalid * n_valid`)."""
    s, y = _arrays(scores, invalid)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks: a tie adds one half to U
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(scores, invalid) -> float:
    """Area under the precision-recall curve as average precision: `sum_k (R_k - R_{k-1}) P_k` over the
    distinct score thresholds from the highest down, a threshold flagging every sample scoring at least
    it (tied samples enter together). A random score's expected value is the invalid rate."""
    s, y = _arrays(scores, invalid)
    if not y.any():
        return math.nan
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last sample of each group of tied scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def bootstrap_interval(metric: Metric, scores, invalid, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(scores, invalid)` at `level`: the invalid and the valid
    samples are resampled separately, with replacement (a stratified bootstrap: every resample keeps the
    class counts, so AUROC stays defined), `resamples` times from a generator seeded with `seed`."""
    if resamples < 1000:
        raise ValueError(f"resamples must be >= 1000 for a 95% percentile interval, got {resamples}")
    s, y = _arrays(scores, invalid)
    pos, neg = np.nonzero(y)[0], np.nonzero(~y)[0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    for i in range(resamples):
        index = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        values[i] = metric(s[index], labels)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def retention(scores, invalid, keep: float) -> tuple[float, float]:
    """Keep the fraction `keep` with the lowest scores (`uncdiff.core.filtering.keep_best`: `round((1 -
    keep) N)` highest dropped, ties by position): `(fraction of the invalid samples removed, fraction of
    the valid samples kept)`, the peers' headline form."""
    s, y = _arrays(scores, invalid)
    kept = keep_best(torch.from_numpy(s), 1.0 - keep).numpy()
    removed = float((~kept & y).sum() / y.sum()) if y.any() else math.nan
    kept_valid = float((kept & ~y).sum() / (~y).sum()) if (~y).any() else math.nan
    return removed, kept_valid


def random_scores(n: int, seed: int = 0) -> torch.Tensor:
    """`[n]` uniform scores from a generator seeded with `seed`: the baseline no detector should lose to."""
    return torch.from_numpy(np.random.default_rng(seed).random(n))


def detectable_auroc(invalid: int, valid: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest distance of a score's AUROC from 1/2 that `invalid` and `valid` samples detect: the
    two-sided test of AUROC = 1/2 at `alpha` rejects with probability `power` (normal approximation with
    the Mann-Whitney statistic's null variance, `Var = (n1 + n0 + 1) / (12 n1 n0)` for untied scores):
    `(z_{1-alpha/2} + z_power) sqrt(Var)`. NaN without both kinds."""
    if invalid < 1 or valid < 1:
        return math.nan
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return z * math.sqrt((invalid + valid + 1) / (12 * invalid * valid))


def detection_row(scores, invalid, resamples: int = 1000, seed: int = 0) -> dict:
    """One row of the detection table: counts, AUROC and AUPRC with their bootstrap 95% intervals, the
    detectable distance of AUROC from 1/2 (`detectable_auroc`), and at each retention of `RETENTIONS`
    the fractions of invalid samples removed and valid samples kept."""
    s, y = _arrays(scores, invalid)
    row: dict = {"n": len(s), "invalid": int(y.sum()), "detectable_auroc": detectable_auroc(int(y.sum()),
                                                                                           int((~y).sum()))}
    for name, metric in (("auroc", auroc), ("auprc", auprc)):
        low, high = bootstrap_interval(metric, s, y, resamples, seed)
        row.update({name: metric(s, y), f"{name}_low": low, f"{name}_high": high})
    for keep in RETENTIONS:
        removed, kept = retention(s, y, keep)
        row.update({f"removed_at_{round(keep * 100)}": removed, f"kept_at_{round(keep * 100)}": kept})
    return row


# ------------------------------------------------------------------------------------- guidance

@dataclass(frozen=True)
class McNemar:
    """Paired invalid labels on the same seeds. `only_first`: pairs invalid in the first set only (e.g.
    unguided), `only_second`: in the second only; `p_value`: the exact two-sided test; `detectable`:
    the smallest difference in invalid rate the test finds at `alpha` with `power` for these `n` pairs
    (NaN without discordant pairs)."""

    n: int
    only_first: int
    only_second: int
    rate_first: float
    rate_second: float
    p_value: float
    detectable: float


def mcnemar(first: Sequence[bool], second: Sequence[bool], alpha: float = 0.05, power: float = 0.8) -> McNemar:
    """Exact McNemar test of the invalid labels `first [N]` and `second [N]` of the same seeds.

    Under no effect each discordant pair is invalid in either set with probability 1/2, so with `b` and
    `c` the two kinds of discordant pairs and `m = b + c`, the two-sided p-value is
    `min(1, 2 P(X <= min(b, c)))`, `X ~ Binomial(m, 1/2)` (the binomial is symmetric).

    Minimum detectable difference: Connor's (1987) power formula for paired proportions, with the
    discordant proportion `psi` estimated by `m / n`, solved for the difference `delta` of the invalid
    rates: `n delta^2 = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2` (a normal
    approximation of the exact test; `delta <= psi`).
    """
    a, b = (np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v).astype(bool) for v in (first, second))
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"the paired labels must be 1-D of one length, got {a.shape} and {b.shape}")
    n = len(a)
    only_first, only_second = int((a & ~b).sum()), int((~a & b).sum())
    m = only_first + only_second
    p_value = min(1.0, 2 * sum(math.comb(m, k) for k in range(min(only_first, only_second) + 1)) / 2**m)
    return McNemar(n, only_first, only_second, float(a.mean()) if n else math.nan,
                   float(b.mean()) if n else math.nan, p_value, detectable_difference(n, m / n if n else 0.0,
                                                                                      alpha, power))


def detectable_difference(n: int, discordant: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The `delta` of `mcnemar`'s power formula for `n` pairs with discordant proportion `discordant`
    (bisection; the right side falls and the left rises in `delta`). NaN when `discordant` is 0."""
    if n < 1 or discordant <= 0:
        return math.nan
    z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)

    def gap(delta: float) -> float:
        return n * delta**2 - (z_a * math.sqrt(discordant) + z_b * math.sqrt(discordant - delta**2)) ** 2

    low, high = 0.0, discordant
    if gap(high) < 0:  # no difference the discordant pairs allow is detectable with n pairs
        return math.nan
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if gap(mid) < 0 else (low, mid)
    return high


# ---------------------------------------------------------------------------------------- table

def detection_rows(sets: dict, costs: Optional[dict] = None, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """The detection table: a `detection_row` per estimator of `sets` (`name -> (scores [N], invalid
    [N])`) with its network evaluations and seconds per image from `costs[name]` (a sample run's
    summary) where given, then the `random` baseline's (`random_scores(N, seed)`) on the first set's
    labels (no cost of its own: None)."""
    rows = []
    for name, (scores, invalid) in sets.items():
        cost = (costs or {}).get(name, {})
        rows.append({"estimator": name, **detection_row(scores, invalid, resamples, seed),
                     "nfe_per_image": cost.get("nfe_per_image"), "seconds_per_image": cost.get("seconds_per_image")})
    if sets:
        _, invalid = next(iter(sets.values()))
        rows.append({"estimator": "random", **detection_row(random_scores(len(invalid), seed), invalid, resamples, seed),
                     "nfe_per_image": None, "seconds_per_image": None})
    return rows
