"""The interval study (docs/algorithms.md §8): every heuristic turned into guaranteed intervals at the
same (alpha, delta), judged on held-out images over many random calibration/test splits. What each
pays for the guarantee is the width of its intervals; the risk on the test images checks the
guarantee. Tensors in, numbers out: no sampling here (the caller restores the images), no files."""

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from scipy import stats

from uncdiff.evaluation import experiments
from uncdiff.uncertainty.intervals import (DEFAULT_GRID, calibrate_lambda, check_level, losses_on_grid,
                                           min_calibration_size, miss_thresholds)


class Heuristic(NamedTuple):
    """One heuristic on the N held-out images: the output its intervals sit around, its lower and upper
    spreads (the same tensor twice for a symmetric one), all `[N, C, H, W]`, and its cost in network
    evaluations per image (the output's included)."""
    output: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    nfe: float


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) `level` interval of a binomial proportion after k successes in n
    trials: Beta quantiles, 0 and 1 at the ends."""
    tail = (1 - level) / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - tail, k + 1, n - k))
    return lo, hi


def calibration_split(n: int, calibration_size: int, split: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `split`'s (calibration, test) image indices: a random permutation of the n images from a
    Philox generator keyed by (seed, split), the first `calibration_size` for calibration."""
    order = np.random.Generator(np.random.Philox(key=[int(seed), int(split)])).permutation(n)
    return np.sort(order[:calibration_size]), np.sort(order[calibration_size:])


def pixel_metrics(width: torch.Tensor, missed: torch.Tensor, error: torch.Tensor) -> dict:
    """On the generated values of the test images (flat): the miss rate in each quartile of interval
    width (ranked, ties in pixel order) and Spearman's correlation of width with |error| (nan for a
    constant width)."""
    order = torch.argsort(width, stable=True)
    quartiles = [float(part.double().mean()) for part in torch.tensor_split(missed[order], 4)]
    rho = float("nan") if torch.all(width == width[0]) else float(stats.spearmanr(width, error).statistic)
    return {"risk_by_width_quartile": quartiles, "spearman": rho}


def split_result(h: Heuristic, table: np.ndarray, x0: torch.Tensor, mask: Optional[torch.Tensor],
                 cal: np.ndarray, test: np.ndarray, alpha: float, delta: float, grid: np.ndarray) -> dict:
    """lam_hat from the calibration images and what it gives on the test images (None when even the
    grid's largest lam does not pass)."""
    index = {float(lam): i for i, lam in enumerate(grid)}
    try:
        lam = calibrate_lambda(lambda l: table[index[l], cal], grid, len(cal), alpha, delta)
    except ValueError:
        return {"lambda": None}
    t = torch.as_tensor(test)
    region = torch.ones_like(x0[t], dtype=torch.bool) if mask is None else mask[t].expand_as(x0[t]) > 0.5
    width = (lam * (h.lower[t] + h.upper[t]).double() / 2)[region]  # interval length on the [0, 1] scale
    y, f = x0[t].double(), h.output[t].double()
    missed = ((y < f - lam * h.lower[t]) | (y > f + lam * h.upper[t]))[region]
    return {"lambda": lam, "risk": float(table[index[lam], test].mean()), "width": float(width.mean()),
            **pixel_metrics(width, missed, ((y - f).abs() / 2)[region])}


def interval_study(x0: torch.Tensor, mask: Optional[torch.Tensor], heuristics: dict, alpha: float = 0.1,
                   delta: float = 0.1, splits: int = 20, calibration_size: Optional[int] = None,
                   seed: int = 0, grid: Sequence[float] = DEFAULT_GRID) -> dict:
    """For each of `heuristics` (`{name: Heuristic}`) on the same N held-out images (`x0 [N, C, H, W]`,
    `mask [N, 1, H, W]` or None): over `splits` random splits into `calibration_size` calibration
    images (default half) and the rest for testing, lam_hat at (alpha, delta) on the calibration images
    (`calibrate_lambda`, n counting images) and on the test images its risk (mean fraction of missed
    generated values), mean interval length (the [0, 1] scale), risk by quartile of width, Spearman
    (width, |error|). Returns `{'rows': {name: {...}}, 'settings': {...}}`; each row holds the means
    and standard deviations over the splits, the fraction of splits whose test risk exceeds alpha with
    its 95 % Clopper-Pearson interval, the splits where no lam passed, and the cost."""
    check_level("alpha", alpha)
    check_level("delta", delta)
    n = x0.shape[0]
    size = n // 2 if calibration_size is None else int(calibration_size)
    smallest = min_calibration_size(alpha, delta)
    if size < smallest or size >= n or splits < 1:
        raise ValueError(f"{size} calibration images of {n}: at alpha = {alpha}, delta = {delta} calibration needs "
                         f"at least {smallest} images and the test set one, and splits >= 1")
    grid = np.asarray(grid, dtype=np.float64)
    rows = {}
    for name, h in heuristics.items():
        table = losses_on_grid(miss_thresholds(x0, h.output, h.lower, h.upper), mask, grid)
        results = [split_result(h, table, x0, mask, *calibration_split(n, size, s, seed), alpha, delta, grid)
                   for s in range(splits)]
        rows[name] = summarize(results, alpha, h.nfe)
    return {"rows": rows, "settings": {"alpha": alpha, "delta": delta, "splits": splits, "images": n,
                                       "calibration_images": size, "test_images": n - size, "seed": seed,
                                       "grid": {"size": len(grid), "min": float(grid[0]), "max": float(grid[-1])}}}


def summarize(results: list[dict], alpha: float, nfe: float) -> dict:
    """One heuristic's splits: means and standard deviations, the violation fraction and its interval."""
    passed = [r for r in results if r["lambda"] is not None]
    row = {"splits": len(results), "failed_splits": len(results) - len(passed), "nfe": nfe}
    if not passed:
        return row
    violations = sum(r["risk"] > alpha for r in passed)
    row.update({key: experiments.mean_std([r[key] for r in passed]) for key in ("risk", "width", "lambda")},
               spearman=experiments.mean_std([r["spearman"] for r in passed]),
               risk_by_width_quartile=[experiments.mean_std([r["risk_by_width_quartile"][q] for r in passed])
                                       for q in range(4)],
               violations=violations, violation_fraction=violations / len(passed),
               violation_interval=clopper_pearson(violations, len(passed)))
    return row
