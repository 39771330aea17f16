"""The paper's experiments (docs/algorithms.md §6) as functions of generated images, scores and features: no
files, no Lightning. `train.py evaluate` (uncdiff/commands/evaluate.py) feeds them and
`uncdiff/evaluation/report.py` writes what they return.

- filtering: FID, and improved precision / recall, of the set kept by an estimator's scores versus
  random subsets of the same size;
- guidance: FID of guided versus unguided samples from the same starting noise, over seed groups;
- sweep: the same for a grid of guidance strengths (lam, grad_wrt, the posterior's prior precision);
- sparsification: AUSE / AURG of pixel-wise uncertainty when denoising noised real images;
- cost: network evaluations and seconds per image.

Every comparison carries its spread and a plain verdict (`compare`): a difference counts only
when it is larger than twice its standard deviation.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch_fidelity.metric_prc import prc_features_to_metric

from uncdiff.core.filtering import keep_best
from uncdiff.evaluation.metrics import ause_aurg, random_subsets, sparsification_curve
from uncdiff.core.samplers import EpsModel, SampleNoise, Sampler, StepContext

SPREAD = 2.0  # a difference is reported as real when it exceeds SPREAD standard deviations
PRC_NEIGHBOURS = 5  # k of improved precision / recall (docs/algorithms.md §6)


def compare(difference: float, std: Optional[float], better: str = "better", worse: str = "worse") -> str:
    """Verdict on a difference where lower is better (of FIDs; negate one of precisions) with
    standard deviation `std`."""
    if std is None or not std == std:
        return "no spread to judge by"
    if difference < -SPREAD * std:
        return better
    if difference > SPREAD * std:
        return worse
    return f"within the spread (difference within ±{SPREAD:g} std)"


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and (sample) standard deviation; the standard deviation is None for one value, which has
    no spread to judge by (`compare` says so)."""
    v = torch.tensor(list(values), dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(v) > 1 else None


# ------------------------------------------------------------------------------ precision / recall

class FeaturePrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019; docs/algorithms.md §6) of a feature set `[N, D]`
    against real features `[M, D]`, with torch-fidelity's implementation: each sample is the centre
    of a ball reaching its k-th nearest neighbour in its own set; precision is the share of
    generated samples inside some real ball (fidelity), recall the share of real samples inside
    some generated ball (coverage). Distances on `device`, in blocks of `batch_size` rows."""

    def __init__(self, real_features: Tensor, k: int = PRC_NEIGHBOURS, device: torch.device | str = "cpu",
                 batch_size: int = 1000):
        if len(real_features) <= k:
            raise ValueError(f"precision / recall with k = {k} needs more than {k} real features, "
                             f"got {len(real_features)}")
        self.real, self.k, self.batch_size = real_features.to(device), k, batch_size

    def __call__(self, features: Tensor) -> tuple[float, float]:
        """(precision, recall) of `features [N, D]`, N > k."""
        if len(features) <= self.k:
            raise ValueError(f"precision / recall with k = {self.k} needs more than {self.k} samples, "
                             f"got {len(features)}")
        # save_cpu_ram: the distance matrices in row blocks, never N x N at once (N = 50k in the paper)
        out = prc_features_to_metric(features.to(self.real.device, self.real.dtype), self.real,
                                     prc_neighborhood=self.k, prc_batch_size=self.batch_size, save_cpu_ram=True,
                                     verbose=False)
        return out["precision"], out["recall"]


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """`[N, D]` float64 features of float images `[N, C, H, W]` in [-1, 1], on the extractor's device."""
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    return torch.cat([extractor(b.to(device)).double().cpu() for b in images.split(batch_size)])


# ------------------------------------------------------------------------------------ filtering

def kept_versus_random(kept: float, random: Sequence[float], higher_is_better: bool = False
                       ) -> tuple[float, Optional[float], str]:
    """Mean and standard deviation of the random subsets' values, and the verdict on the kept set's."""
    mean, std = mean_std(random)
    # The kept set is judged like one more draw next to K random ones: its difference to their mean
    # has standard deviation std * sqrt(1 + 1/K) (prediction interval), not std.
    spread = std * (1 + 1 / len(random)) ** 0.5 if std is not None else None
    difference = mean - kept if higher_is_better else kept - mean
    return mean, std, compare(difference, spread, "better than random", "worse than random")


def filtering_row(name: str, features: Tensor, scores: Tensor, drop_fraction: float, subset_seeds: Sequence[int],
                  fid: Callable[[Tensor], float],
                  precision_recall: Optional[Callable[[Tensor], tuple[float, float]]] = None) -> dict:
    """docs/algorithms.md §6 filtering for one estimator: drop the `drop_fraction` with the highest `scores [N]`,
    FID of the kept set versus random subsets of the same size (one per seed); with
    `precision_recall` (e.g. a `FeaturePrecisionRecall`), also precision and recall of the same sets."""
    keep = keep_best(scores, drop_fraction)
    kept = int(keep.sum())
    subsets = random_subsets(len(scores), kept, subset_seeds)
    kept_fid = fid(features[keep])
    mean, std, verdict = kept_versus_random(kept_fid, [fid(features[idx]) for idx in subsets])
    row = {"estimator": name, "samples": len(scores), "kept": kept, "fid_all": fid(features),
           "fid_kept": kept_fid, "fid_random_mean": mean, "fid_random_std": std, "subsets": len(subsets),
           "z": (kept_fid - mean) / std if std else None, "verdict": verdict}
    if precision_recall is not None:
        values = {"all": precision_recall(features), "kept": precision_recall(features[keep])}
        random = [precision_recall(features[idx]) for idx in subsets]
        for i, metric in enumerate(("precision", "recall")):
            mean, std, verdict = kept_versus_random(values["kept"][i], [r[i] for r in random], higher_is_better=True)
            row.update({f"{metric}_all": values["all"][i], f"{metric}_kept": values["kept"][i],
                        f"{metric}_random_mean": mean, f"{metric}_random_std": std, f"{metric}_verdict": verdict})
    return row


NEGATIVE_VARIANCES = " (scores invalid: negative variances)"


def check_variance_scores(row: dict, scores: Tensor, options: dict) -> tuple[dict, Optional[str]]:
    """BayesDiff's filtering `row` and a report note when its `scores [N]` (sums of the propagated
    Var[x0], from the estimator `options` `draws` and `moments`) include negative ones, which no
    variance can be: then the row's verdicts are marked invalid. Unchanged and None when every score
    is >= 0."""
    negative = int((scores < 0).sum())
    if negative == 0:
        return row, None
    marked = {k: v + NEGATIVE_VARIANCES if k == "verdict" or k.endswith("_verdict") else v for k, v in row.items()}
    note = (f"{negative} of {len(scores)} BayesDiff scores (sums of the propagated Var[x0]) are negative, which "
            f"no variance can be, so the BayesDiff filtering row is not meaningful.")
    if options.get("moments", "regression") == "paper":
        note += (f" The paper's Monte Carlo covariance estimator (docs/algorithms.md §5b) is dominated by noise "
                 f"at S = {options['draws']} draws; `--estimator.moments regression` gives usable variances.")
    return marked, note


# ------------------------------------------------------------------------------------- guidance

def seed_groups(n: int, groups: int) -> list[Tensor]:
    """`groups` contiguous index groups of (nearly) equal size covering 0..n-1."""
    if not 1 <= groups <= n // 2:
        raise ValueError(f"seed groups must be in [1, n/2] so that each has 2 samples or more, got {groups} for n={n}")
    return list(torch.arange(n).tensor_split(groups))


def guidance_row(name: str, guided: Tensor, unguided: Tensor, groups: int, fid: Callable[[Tensor], float]) -> dict:
    """Guided versus unguided FID from the same seeds (`[N, D]` features, row i = seed i in both):
    the whole set, and per seed group the paired difference, its mean ± standard deviation over the
    groups, and a verdict only beyond 2 standard deviations of that spread (as in `sweep_rows`)."""
    parts = seed_groups(len(guided), groups)
    g = [fid(guided[idx]) for idx in parts]
    u = [fid(unguided[idx]) for idx in parts]
    diff_mean, diff_std = mean_std([a - b for a, b in zip(g, u)])
    full_g, full_u = fid(guided), fid(unguided)
    return {"set": name, "samples": len(guided), "fid": full_g, "fid_unguided": full_u,
            "difference": full_g - full_u, "group_fid_mean": mean_std(g)[0], "group_fid_std": mean_std(g)[1],
            "group_difference_mean": diff_mean, "group_difference_std": diff_std, "groups": len(parts),
            "verdict": compare(diff_mean, diff_std, "better than unguided", "worse than unguided")}


def sign_outcome(plus: dict, minus: dict, plus_features: Tensor, minus_features: Tensor, groups: int,
                 fid: Callable[[Tensor], float]) -> dict:
    """Which gradient sign measured better (docs/algorithms.md §4: the default must be that one): paired over
    the seed groups like `guidance_row`, `minus` taking the place of the unguided set."""
    row = guidance_row("+1 vs -1", plus_features, minus_features, groups, fid)
    better = "+1" if plus["fid"] < minus["fid"] else "-1"
    return {"better_sign": better, "fid_plus": plus["fid"], "fid_minus": minus["fid"],
            "difference": row["difference"], "group_difference_mean": row["group_difference_mean"],
            "group_difference_std": row["group_difference_std"],
            "verdict": compare(row["group_difference_mean"], row["group_difference_std"],
                               "+1 better", "-1 better")}


def sweep_rows(points: Sequence[tuple[dict, Tensor]], unguided: Tensor, groups: int,
               fid: Callable[[Tensor], float]) -> list[dict]:
    """The guidance sweep (docs/algorithms.md §4, strength): for each point `(settings, guided
    features [N, D])`, guided versus unguided FID from the same seeds (row i = seed i in both; the
    unguided `[N', D]` may hold more rows, its first N are paired). Per seed group the paired
    difference guided - unguided; the row gives their mean ± standard deviation over the groups and
    a verdict only beyond 2 standard deviations of that spread (the group-to-group spread, not
    the standard error of the mean: with many points, a point must stand out from the noise
    between groups). The unguided FIDs are computed once for all points."""
    rows, plain = [], {}
    for settings, guided in points:
        n = len(guided)
        if n not in plain:
            parts = seed_groups(n, groups)
            plain[n] = (parts, [fid(unguided[idx]) for idx in parts], fid(unguided[:n]))
        parts, u, full_u = plain[n]
        differences = [fid(guided[idx]) - b for idx, b in zip(parts, u)]
        mean, std = mean_std(differences)
        full_g = fid(guided)
        rows.append({**settings, "samples": n, "fid": full_g, "fid_unguided": full_u, "difference": full_g - full_u,
                     "group_difference_mean": mean, "group_difference_std": std, "groups": len(parts),
                     "verdict": compare(mean, std, "better than unguided", "worse than unguided")})
    return rows


def sweep_outcome(rows: Sequence[dict]) -> str:
    """One line on the sweep: the point that beats unguided by the most among those judged better
    (beyond 2 standard deviations), or that none does."""
    better = [r for r in rows if r["verdict"] == "better than unguided"]
    if not better:
        return f"No setting of the {len(rows)} beats unguided sampling beyond {SPREAD:g} standard deviations."
    best = min(better, key=lambda r: r["group_difference_mean"])
    return (f"Best: {best['point']}, FID {best['group_difference_mean']:+.3g} ± {best['group_difference_std']:.2g} "
            f"against unguided per seed group ({len(better)} of {len(rows)} settings better beyond {SPREAD:g} std).")


# ------------------------------------------------------------------------------- sparsification

def denoised_steps(num_steps: int) -> range:
    """The step indices (of `num_steps`) that the AUSE set-up runs: the second half of the schedule,
    from the middle step on (docs/algorithms.md §6). An estimator's maps cover only its window's steps among these."""
    return range(num_steps // 2, num_steps)


@torch.no_grad()
def denoise_from(eps_model: EpsModel, sampler: Sampler, x0: Tensor, seeds: Sequence[int], hook=None,
                 start: Optional[int] = None) -> Tensor:
    """docs/algorithms.md §6 AUSE set-up: noise real images `x0 [B, C, H, W]` to the sampler's step `start`
    (default the middle, `denoised_steps`) with per-sample noise (stream 'initial'), then run the
    remaining steps, calling `hook` as `uncdiff.core.samplers.sample` does (same step indices, so
    estimator windows mean the same). Returns the denoised `[B, C, H, W]`."""
    steps = sampler.timesteps
    pairs = list(zip(steps, steps[1:] + [-1]))
    start = denoised_steps(len(pairs)).start if start is None else start
    noise = SampleNoise(seeds, x0.device)
    t_start = torch.full((len(x0),), pairs[start][0], device=x0.device, dtype=torch.long)
    x = sampler.schedule.q_sample(x0, t_start, noise.initial(x0.shape[1:]))
    for i in range(start, len(pairs)):
        t, t_prev = pairs[i]
        eps = eps_model(x, torch.full((len(x0),), t, device=x0.device, dtype=torch.long))
        if hook is not None:
            eps = hook(StepContext(i, len(pairs), t, t_prev, x, eps, eps_model, sampler, noise))
        z = noise.randn(x0.shape[1:]) if sampler.stochastic and t_prev >= 0 else None
        x = sampler.step(eps, t, t_prev, x, z)
    return x


@dataclass
class Sparsification:
    """Per-pixel uncertainty maps and squared errors of denoised real images, `[N, C, H, W]`."""

    maps: Tensor
    errors: Tensor
    nfe: int


def sparsification_inputs(eps_model: EpsModel, sampler: Sampler, images: Tensor, seeds: Sequence[int], hook,
                          batch_size: int = 256) -> Sparsification:
    """Denoise `images` from the middle of the schedule with the estimator `hook`, whose maps are
    summed over the steps of its window that run (`denoised_steps`); error = `(denoised - image)^2`
    per pixel. A window with none of those steps gives no map: a ValueError."""
    maps, errors, nfe = [], [], 0
    for i in range(0, len(images), batch_size):
        x0 = images[i:i + batch_size]
        hook.reset()  # the run starts mid-schedule, where hooks don't reset themselves
        x = denoise_from(eps_model, sampler, x0, seeds[i:i + batch_size], hook)
        if hook.maps is None:
            run = denoised_steps(len(sampler.timesteps))
            raise ValueError(f"the estimator's window {hook.window} has no step among the denoised steps "
                             f"{run.start}..{run.stop - 1} of {run.stop}, so it recorded no uncertainty map")
        maps.append(hook.maps.cpu())
        errors.append((x - x0).pow(2).cpu())
        nfe += hook.nfe
    return Sparsification(torch.cat(maps), torch.cat(errors), nfe)


def sparsification_row(name: str, maps: Tensor, errors: Tensor, num_fractions: int = 50) -> tuple[dict, Tensor]:
    """AUSE / AURG (docs/algorithms.md §6) and the sparsification curve `[num_fractions]`."""
    ause, aurg = ause_aurg(maps, errors, num_fractions)
    _, curve = sparsification_curve(maps, errors, num_fractions)
    return {"estimator": name, "pixels": maps.numel(), "rmse_all": float(curve[0]), "ause": ause, "aurg": aurg}, curve


# ----------------------------------------------------------------------------------------- cost

def cost_rows(summaries: dict[str, dict], reference: str = "plain") -> list[dict]:
    """Network evaluations and seconds per image of each sample set, and their ratios to `reference`."""
    base = summaries.get(reference)
    rows = []
    for name, s in summaries.items():
        row = {"method": name, "nfe_per_image": s["nfe_per_image"], "seconds_per_image": s["seconds_per_image"]}
        if base:
            row["nfe_ratio"] = s["nfe_per_image"] / base["nfe_per_image"]
            row["time_ratio"] = s["seconds_per_image"] / base["seconds_per_image"]
        rows.append(row)
    return rows
