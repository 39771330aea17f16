"""What a score ranks: the per-sample study of docs/algorithms.md §6b, as functions of one sampling
pass's per-sample values (no files, no Lightning; `train.py evaluate --experiments study` feeds it).

For each estimator, score variant and score window, all computed from the same samples' per-step
totals of `U_t` (docs/algorithms.md §3; no re-sampling per variant):
- the Spearman correlation of the score with `|x_T|^2` (the starting noise), with a realism measure
  (the mean distance of a sample's FID features to its 5 nearest real images) and, where the FID
  extractor is a classifier, with its confidence (the largest softmax probability), each with a
  seeded percentile-bootstrap 95% interval;
- the FID of the set kept after dropping the highest scores, at several drop fractions, against
  random subsets of the same size (mean ± std).

The normalised variants need per-step reference statistics of other samples. The study takes them
by two-fold cross-fitting on its own samples: the samples at even positions are scored with the
statistics of those at odd positions and vice versa, so no score uses its own totals and no
calibration file is needed.
"""

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from uncdiff.core.filtering import keep_best
from uncdiff.evaluation.experiments import kept_versus_random, mean_std
from uncdiff.evaluation.metrics import random_subsets
from uncdiff.uncertainty.estimators import SCORES, variant_scores, window_totals
from uncdiff.uncertainty.calibration import reference_statistics

WINDOWS = {"all steps": (0.0, 1.0), "first 15%": (0.0, 0.15), "last half": (0.5, 1.0)}
DROP_FRACTIONS = (0.05, 1 / 6, 0.3, 0.5)
NEIGHBOURS = 5  # k of the realism measure
RESAMPLES = 1000  # bootstrap resamples of each interval
TARGETS = {"noise": "|x_T|^2", "realism": "5-NN distance to real", "confidence": "classifier confidence"}


# ------------------------------------------------------------------------------- correlations

def spearman_statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho of paired samples along `axis` (vectorised: the Pearson correlation of their
    ranks, ties given their average rank), as `scipy.stats.spearmanr` computes it."""
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis) / np.sqrt((rx * rx).sum(axis) * (ry * ry).sum(axis))


def spearman_interval(x: Tensor, y: Tensor, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """`(rho, low, high)`: Spearman's rho of `x [N]` and `y [N]` (`scipy.stats.spearmanr`) and its
    percentile-bootstrap interval at `level` over `resamples` paired resamples (seeded)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"a rank correlation needs two paired series of >= 3 values, got {len(x)} and {len(y)}")
    rho = float(stats.spearmanr(x, y).statistic)
    result = stats.bootstrap((x, y), spearman_statistic, paired=True, vectorized=True, n_resamples=resamples,
                             confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return rho, float(result.confidence_interval.low), float(result.confidence_interval.high)


def correlation_verdict(low: float, high: float) -> str:
    """A sign only when the 95% interval (about ±2 standard deviations) excludes 0."""
    if low > 0:
        return "positive"
    if high < 0:
        return "negative"
    return "no sign (interval contains 0)"


# ---------------------------------------------------------------------- per-sample measures

def nearest_real_distance(features: Tensor, real: Tensor, k: int = NEIGHBOURS, batch_size: int = 1000) -> Tensor:
    """`[N]`: the mean Euclidean distance of each row of `features [N, D]` to its `k` nearest rows of
    `real [M, D]` (a per-sample realism measure: lower is more realistic)."""
    if len(real) < k:
        raise ValueError(f"the realism measure needs at least {k} real images, got {len(real)}")
    real = real.double()
    return torch.cat([torch.cdist(b.double(), real).topk(k, dim=1, largest=False).values.mean(1)
                      for b in features.split(batch_size)])


def classifier_confidence(extractor: nn.Module, features: Tensor) -> Optional[Tensor]:
    """`[N]`: the largest softmax probability of a classifier extractor's `head` on its features
    `[N, D]` (`uncdiff.evaluation.fid.ClassifierFeatures`); None for an extractor without one."""
    head = getattr(extractor, "head", None)
    if not isinstance(head, nn.Module):
        return None
    device = next(iter(head.parameters())).device
    with torch.no_grad():
        logits = head(features.to(device, next(iter(head.parameters())).dtype))
    return logits.softmax(1).max(1).values.double().cpu()


# ------------------------------------------------------------------------------------ scores

def cross_fitted_scores(totals: Tensor, score: str) -> Tensor:
    """The `score` variant `[N]` of per-step totals `totals [N, S]` (every column one step of the
    window), with reference statistics from the other fold: rows at even positions are scored
    with the statistics of the odd ones and vice versa. `sum` needs none."""
    steps = range(totals.shape[1])
    if score == "sum":
        return variant_scores(totals, steps)
    folds = [torch.arange(0, len(totals), 2), torch.arange(1, len(totals), 2)]
    out = torch.empty(len(totals), dtype=torch.float64)
    for mine, other in (folds, folds[::-1]):
        out[mine] = variant_scores(totals[mine], steps, score, reference_statistics(totals[other]))
    return out


def study_scores(totals: Tensor, steps: Sequence[int], num_steps: int,
                 windows: dict = WINDOWS, scores: Sequence[str] = SCORES) -> dict[tuple[str, str], Tensor]:
    """`{(score, window): [N]}` for every variant and window, from the per-step totals
    `totals [N, S]` at the sampler steps `steps` of one run. A window without a recorded step is
    left out."""
    out = {}
    for window_name, window in windows.items():
        cols, kept = window_totals(totals, list(steps), window, num_steps)
        if not kept:
            continue
        for score in scores:
            out[(score, window_name)] = cross_fitted_scores(cols, score)
    return out


# ----------------------------------------------------------------------------------- tables

def correlation_rows(estimator: str, scores: dict[tuple[str, str], Tensor], targets: dict[str, Tensor],
                     resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """One row per (score, window): Spearman's rho of the score with each target (`TARGETS` keys ->
    `[N]`), its bootstrap interval and sign verdict."""
    rows = []
    for (score, window), values in scores.items():
        row = {"estimator": estimator, "score": score, "window": window, "samples": len(values)}
        for key, target in targets.items():
            rho, low, high = spearman_interval(values, target, resamples, seed)
            row.update({f"rho_{key}": rho, f"rho_{key}_low": low, f"rho_{key}_high": high,
                        f"sign_{key}": correlation_verdict(low, high)})
        rows.append(row)
    return rows


def drop_curve_rows(estimator: str, features: Tensor, scores: dict[tuple[str, str], Tensor],
                    fractions: Sequence[float], subset_seeds: Sequence[int],
                    fid: Callable[[Tensor], float]) -> list[dict]:
    """For each drop fraction: the FID of the set kept by each (score, window) against random
    subsets of the same size (one per seed; the same subsets for every score, so they are computed
    once), with the verdict of `kept_versus_random`."""
    rows = []
    n = len(features)
    for fraction in fractions:
        kept_count = n - round(fraction * n)
        random = [fid(features[idx]) for idx in random_subsets(n, kept_count, subset_seeds)]
        mean, std = mean_std(random)
        for (score, window), values in scores.items():
            keep = keep_best(values, fraction)
            kept = fid(features[keep])
            _, _, verdict = kept_versus_random(kept, random)
            rows.append({"estimator": estimator, "score": score, "window": window, "drop_fraction": fraction,
                         "kept": int(keep.sum()), "fid_kept": kept, "fid_random_mean": mean, "fid_random_std": std,
                         "subsets": len(random), "z": (kept - mean) / std if std else None, "verdict": verdict})
    return rows
