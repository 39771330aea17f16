"""The interval study (docs/algorithms.md §8): every heuristic turned into guaranteed intervals at the
same (alpha, delta), judged on held-out images over many random calibration/test splits. What each
pays for the guarantee is the width of its intervals; the risk on the test images checks the
guarantee. Tensors in, numbers out: no sampling here (the caller restores the images), no files."""

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from scipy import stats

from uncdiff.evaluation import experiments
from uncdiff.uncertainty.intervals import (DEFAULT_GRID, calibrate_lambda, check_level, hoeffding_bentkus_ucb,
                                           interval_maps, k_sample_spread, losses_on_grid, min_calibration_size,
                                           miss_thresholds, spread_from_map, spread_seeds)


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
    y, f = x0[t].double(), h.output[t].double()
    maps = interval_maps(f, h.lower[t], h.upper[t], lam)  # cut to [-1, 1], where the truth lies
    width = (maps["width"] / 2)[region]  # interval length on the [0, 1] scale
    missed = ((y < maps["lower"]) | (y > maps["upper"]))[region]
    return {"lambda": lam, "risk": float(table[index[lam], test].mean()), "width": float(width.mean()),
            **pixel_metrics(width, missed, ((y - f).abs() / 2)[region])}


def interval_study(x0: torch.Tensor, mask: Optional[torch.Tensor], heuristics: dict, alpha: float = 0.1,
                   delta: float = 0.1, splits: int = 20, calibration_size: Optional[int] = None,
                   seed: int = 0, grid: Sequence[float] = DEFAULT_GRID) -> dict:
    """For each of `heuristics` (`{name: Heuristic}`) on the same N held-out images (`x0 [N, C, H, W]`,
    `mask [N, 1, H, W]` or None): over `splits` random splits into `calibration_size` calibration
    images (default half) and the rest for testing, lam_hat at (alpha, delta) on the calibration images
    (`calibrate_lambda`, n counting images) and on the test images its risk (mean fraction of missed
    generated values), mean interval length (the [0, 1] scale, the interval cut to the images' range
    [-1, 1], where `x0` must lie), risk by quartile of width, Spearman
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
               spearman=None if any(np.isnan(r["spearman"]) for r in passed)  # a constant width ranks nothing
               else experiments.mean_std([r["spearman"] for r in passed]),
               risk_by_width_quartile=[experiments.mean_std([r["risk_by_width_quartile"][q] for r in passed])
                                       for q in range(4)],
               violations=violations, violation_fraction=violations / len(passed),
               violation_interval=clopper_pearson(violations, len(passed)))
    return row


def study_heuristics(first_group: dict, spread_sizes: Sequence[int], mask: Optional[torch.Tensor]) -> dict:
    """`{name: Heuristic}` from `calibration_study`'s first group (`keep_first_group`): the spread of the
    first K independent samples for each K of `spread_sizes` (the standard deviation, and the quartile
    distances from K = 4 on), each estimator's map (its square root, around its own output), and a
    constant map (the same spread at every generated pixel), all around the output except the
    estimators'. Costs: network evaluations per image, the output's included."""
    output, samples, nfe = first_group["output"], first_group["samples"], first_group["output_nfe"]
    region = torch.ones_like(output, dtype=torch.float64) if mask is None else \
        mask.to(torch.float64).expand_as(output)
    rows = {}
    for k in spread_sizes:
        spread = k_sample_spread(samples[:k], judged=output)
        rows[f"K = {k} samples, std"] = Heuristic(output, spread.std, spread.std, (k + 1) * nfe)
        if spread.lower is not None:
            rows[f"K = {k} samples, quartiles"] = Heuristic(output, spread.lower, spread.upper, (k + 1) * nfe)
    for name, (images, maps, cost) in first_group["runs"].items():
        rows[name] = Heuristic(images, spread_from_map(maps), spread_from_map(maps), cost)
    rows["constant"] = Heuristic(output, region, region, nfe)
    return rows


HEURISTICS = ("samples", "aleatoric", "mc_dropout", "bayesdiff", "constant")


def restore_with_heuristic(restore, condition: torch.Tensor, mask: Optional[torch.Tensor], seeds: Sequence[int],
                           heuristic: dict, estimator=None) -> tuple[object, Heuristic]:
    """Restore the inputs with `seeds` and build one heuristic's spread for them: `(result, Heuristic)`.
    `restore(condition, mask, seeds, estimator) -> SampleResult`; `heuristic` is a calibration file's
    record: `{'name': 'samples', 'K', 'spread': 'std' | 'quartiles'}` (K more restorations with
    `spread_seeds`, never the output's), an estimator's name (the square root of its map; `estimator`
    is then its spec), or `{'name': 'constant'}` (1 at every generated pixel). The output is the run
    with `estimator` (for samples and constant, any estimator that keeps the plain trajectory)."""
    result = restore(condition, mask, list(seeds), estimator)
    n, name = len(seeds), heuristic["name"]
    nfe = result.nfe / n
    if name == "samples":
        runs = [restore(condition, mask, spread_seeds(seeds, k), None) for k in range(1, heuristic["K"] + 1)]
        spread = k_sample_spread(torch.stack([r.images for r in runs]), judged=result.images)
        lower, upper = (spread.std, spread.std) if heuristic["spread"] == "std" else (spread.lower, spread.upper)
        nfe += sum(r.nfe for r in runs) / n
    elif name == "constant":
        lower = torch.ones_like(result.images, dtype=torch.float64) if mask is None else \
            mask.to(torch.float64).expand_as(result.images).clone()
        upper = lower
    else:
        lower = upper = spread_from_map(result.maps)
    return result, Heuristic(result.images, lower, upper, nfe)


def interval_markdown(study: dict) -> str:
    """The interval study as a Markdown table, with what it ran on."""
    s = study["settings"]
    pm = lambda pair, digits=4: "—" if pair is None or pair[0] != pair[0] else \
        f"{pair[0]:.{digits}f}" + ("" if pair[1] is None else f" ± {pair[1]:.{digits}f}")
    lines = [f"| heuristic | test risk | splits with risk > {s['alpha']:g} (95 % interval) | interval length "
             f"| risk by width quartile (narrowest first) | Spearman(width, abs error) | lam_hat | network "
             f"evaluations per image |", "|---|---|---|---|---|---|---|---|"]
    for name, r in study["rows"].items():
        if "risk" not in r:
            lines.append(f"| {name} | no lam passed in any split | — | — | — | — | — | {r['nfe']:.0f} |")
            continue
        lo, hi = r["violation_interval"]
        failed = f"; no lam passed in {r['failed_splits']}" if r["failed_splits"] else ""
        quartiles = " / ".join(f"{q[0]:.3f}" for q in r["risk_by_width_quartile"])
        lines.append(f"| {name} | {pm(r['risk'])} | {r['violations']} of {r['splits'] - r['failed_splits']} = "
                     f"{r['violation_fraction']:.2f} [{lo:.2f}, {hi:.2f}]{failed} | {pm(r['width'])} | {quartiles} | "
                     f"{pm(r['spearman'], 3)} | {pm(r['lambda'], 3)} | {r['nfe']:.0f} |")
    lines += ["", f"alpha = {s['alpha']:g}, delta = {s['delta']:g}: each of {s['splits']} random splits of the "
                  f"{s['images']} held-out images calibrates lam_hat on {s['calibration_images']} images (n counts "
                  f"images) and tests it on the other {s['test_images']}. Mean ± standard deviation over the splits. "
                  f"Risk: the fraction of generated pixels whose truth falls outside its interval. Interval length: "
                  f"the mean of lam_hat (l + u) over the test images' generated pixels, cut to the images' range, on the "
                  f"[0, 1] scale. "
                  f"The guarantee asks the violation fraction to be <= delta up to its interval."]
    return "\n".join(lines)


def interval_csv_rows(study: dict) -> list[dict]:
    """The interval study as CSV rows, one per heuristic."""
    rows = []
    for name, r in study["rows"].items():
        row = {"heuristic": name, "nfe_per_image": r["nfe"], "splits": r["splits"], "failed_splits": r["failed_splits"]}
        if "risk" in r:
            for key in ("risk", "width", "lambda", "spearman"):
                row[f"{key}_mean"], row[f"{key}_std"] = ("", "") if r[key] is None else r[key]
            row.update({f"risk_width_q{q + 1}": r["risk_by_width_quartile"][q][0] for q in range(4)})
            row.update(violations=r["violations"], violation_fraction=r["violation_fraction"],
                       violation_low=r["violation_interval"][0], violation_high=r["violation_interval"][1])
        rows.append(row)
    return rows


def interval_settings(alpha: float, delta: float, splits: int, images: int, calibration_images: Optional[int],
                      spread_sizes: Optional[Sequence[int]], samples: int) -> dict:
    """The interval study's settings for `images` held-out images and K = `samples` spread samples,
    checked before any sampling (ValueError naming the option): calibration images default to half,
    spread sizes to 2, 4, 8 up to K."""
    check_level("--intervals.alpha", alpha)
    check_level("--intervals.delta", delta)
    if splits < 1:
        raise ValueError(f"--intervals.splits must be >= 1 (or 0 for no interval study), got {splits}")
    size = images // 2 if calibration_images is None else int(calibration_images)
    smallest = min_calibration_size(alpha, delta)
    if size < smallest:
        raise ValueError(f"--intervals.calibration_images: {size} calibration images are too few for alpha = {alpha}, "
                         f"delta = {delta}; use at least {smallest} (a larger --n, or a larger alpha or delta)")
    if size >= images:
        raise ValueError(f"--intervals.calibration_images {size} leaves no test image of the {images} held out (--n)")
    sizes = [k for k in (2, 4, 8) if k <= samples] if spread_sizes is None else list(spread_sizes)
    if any(not 2 <= k <= samples for k in sizes):
        raise ValueError(f"--intervals.spread_sizes {sizes}: each K must lie in [2, --samples = {samples}]")
    return {"alpha": alpha, "delta": delta, "splits": splits, "calibration_images": size, "spread_sizes": sizes}


def calibrate_heuristic(x0: torch.Tensor, mask: Optional[torch.Tensor], h: Heuristic, alpha: float, delta: float,
                        grid: Sequence[float] = DEFAULT_GRID) -> dict:
    """lam_hat of one heuristic on all the given calibration images (`calibrate_lambda`; its ValueError
    when no lam passes), with the empirical risk there and its Hoeffding-Bentkus upper bound."""
    grid = np.asarray(grid, dtype=np.float64)
    table = losses_on_grid(miss_thresholds(x0, h.output, h.lower, h.upper), mask, grid)
    index = {float(lam): i for i, lam in enumerate(grid)}
    n = x0.shape[0]
    lam = calibrate_lambda(lambda l: table[index[l]], grid, n, alpha, delta)
    risk = float(table[index[lam]].mean())
    return {"lambda_hat": lam, "risk": risk, "upper_bound": hoeffding_bentkus_ucb(risk, n, delta)}
