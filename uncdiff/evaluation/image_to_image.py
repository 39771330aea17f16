"""Image-to-image metrics (docs/algorithms.md §7): distance of outputs to the ground truth, and how well a
pixel uncertainty map ranks the real per-pixel error (sparsification, restricted to the generated
pixels). Images are `[N, C, H, W]` in [-1, 1]; masks `[N, 1, H, W]` with 1 at the generated pixels."""

from typing import Any, Callable, Optional, Sequence

import torch

from uncdiff.evaluation import experiments
from uncdiff.evaluation.metrics import ause_aurg


def generated(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The entries of `values [N, C, H, W]` at generated pixels (all of them without a mask), flat."""
    if mask is None:
        return values.flatten()
    return values[mask.to(values.device).expand_as(values) > 0.5]


def l1_psnr(outputs: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """`(L1, PSNR)` on the [0, 1] scale over the generated pixels: the mean absolute error, and
    `10 log10(1 / MSE)` of each image's generated pixels, averaged over images (dB)."""
    diff = (outputs.double() - targets.double()) / 2
    l1 = float(generated(diff.abs(), mask).mean())
    psnrs = []
    for i in range(len(diff)):
        mse = generated(diff[i:i + 1].pow(2), None if mask is None else mask[i:i + 1]).mean()
        psnrs.append(float(10 * torch.log10(1 / mse.clamp_min(1e-10))))
    return l1, sum(psnrs) / len(psnrs)


def error_calibration(maps: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, num_fractions: int = 50) -> tuple[float, float]:
    """`(AUSE, AURG)` of the uncertainty `maps [N, C, H, W]` against the squared error of `outputs` to
    `targets`, over the generated pixels (docs/algorithms.md §6's sparsification)."""
    error = (outputs.double() - targets.double()).pow(2)
    return ause_aurg(generated(maps.double(), mask), generated(error, mask), num_fractions)


# ---------------------------------------------------------------------------------------------
# Calibration against the true error, with the K-sample baseline (docs/algorithms.md §7)

# restore(condition, mask, seeds, estimator: EstimatorSpec | None, guidance: GuidanceSpec | None = None) -> SampleResult
Restore = Callable[..., Any]


def group_seeds(group: int, sample: int, num_samples: int, n: int) -> list[int]:
    """The seeds of restoration j of the n held-out inputs in seed group g, for K = `num_samples`
    spread samples: j = 0 is the judged output, j = 1..K the K samples of the spread, independent of it.
    Seed `(g (K + 1) + j) n + i`, so that no two (group, restoration, input) share one."""
    if not 0 <= sample <= num_samples:
        raise ValueError(f"restoration {sample} of a group with K = {num_samples} spread samples: it lies in [0, K]")
    return [(int(group) * (num_samples + 1) + sample) * n + i for i in range(n)]


def sample_variance(samples: torch.Tensor) -> torch.Tensor:
    """The baseline map: the unbiased per-pixel variance over K independent samples of each input,
    `samples [K, N, C, H, W]` -> `[N, C, H, W]`."""
    if samples.shape[0] < 2:
        raise ValueError(f"the sample-variance baseline needs K >= 2 samples per input, got {samples.shape[0]}")
    return samples.double().var(0, correction=1)


def mean_pairwise_ssim(samples: torch.Tensor) -> float:
    """Sample diversity: SSIM (torchmetrics, data range 2 for [-1, 1]) averaged over all pairs of the
    K samples of each input and over inputs; `samples [K, N, C, H, W]`. Lower is more diverse."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    k = samples.shape[0]
    if k < 2:
        raise ValueError(f"diversity needs K >= 2 samples per input, got {k}")
    size = min(samples.shape[-2:])
    # the standard Gaussian window (sigma 1.5, 11 wide) from 16 pixels on; below, a uniform odd window
    # narrower than the image (torchmetrics pads by half the window)
    window = {} if size >= 16 else {"gaussian_kernel": False, "kernel_size": size - 1 if size % 2 == 0 else size - 2}
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    values = [float(ssim(samples[i].float(), samples[j].float(), data_range=2.0, **window)) for i, j in pairs]
    return sum(values) / len(values)


def calibration_study(restore: Restore, x0: torch.Tensor, condition: torch.Tensor, mask: Optional[torch.Tensor],
                      estimators: dict, num_samples: int = 6, seed_groups: Sequence[int] = (0, 1, 2),
                      fid: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
                      num_fractions: int = 50, keep_examples: int = 0, keep_first_group: bool = False,
                      progress: Optional[Callable[[str], None]] = None) -> dict:
    """How well each pixel uncertainty ranks the real error of the restored images (docs/algorithms.md §7).

    For each seed group g, every held-out input (`x0`, `condition [N, C, H, W]`, `mask [N, 1, H, W]` or
    None) is restored once as *the* output, and `num_samples` (K) more times with other seeds for the
    baseline's spread, which therefore never sees the output it is judged against.
    Rows (`AUSE`, `AURG` of a map against the output's squared error over the generated pixels):

    - each of `estimators` (`{row name: EstimatorSpec}`, run by `restore` with the output's
      seeds), against the error of the output of its own run: the output itself for
      the aleatoric and MC-Dropout estimators, which keep the plain trajectory; BayesDiff's mean
      trajectory (DDIM without clipping, docs/algorithms.md §5b) from the same starting noise;
    - `K-sample variance`: the per-pixel variance over the K independent samples (K = M costs, beyond
      the output, what the aleatoric estimator with M perturbations on every step costs);
    - `random` (a uniform random map, seeded by g) and `oracle` (the error itself: AUSE 0).

    Quality of the outputs: L1 and PSNR to the ground truth, diversity (mean pairwise SSIM of the K
    samples of one input), and `fid(outputs, x0)` when given. Returns `{'rows': {name: {'ause': (mean,
    std), 'aurg': (mean, std)}}, 'quality': {name: (mean, std)}, 'groups': len(seed_groups)}`, means
    and standard deviations over the seed groups, with `'per_group': {name: {'ause': [...], 'aurg':
    [...]}}` (one value per group, for paired comparisons: `paired_difference`) and, for
    `keep_examples > 0`, `'examples'`: the first group's first `keep_examples` inputs (`x0`, `condition`,
    `mask`, `output`, the `maps` of every row but random and oracle, and the squared `error`). With
    `keep_first_group`, `'first_group'` holds the first group's restorations for the interval study
    (`uncdiff.evaluation.intervals.study_heuristics`): `output`, its `output_nfe` per image, the K
    spread `samples [K, N, C, H, W]` and `runs`: `{estimator row: (images, maps, nfe per image)}`.
    `progress(message)` is told as each group starts.
    """
    n = x0.shape[0]
    k = int(num_samples)
    if k < 2:
        raise ValueError(f"num_samples must be >= 2 (the baseline's variance and the diversity), got {num_samples}")
    per_row: dict[str, dict[str, list]] = {}
    quality: dict[str, list] = {"l1": [], "psnr": [], "diversity_ssim": []}
    if fid is not None:
        quality["fid"] = []

    def add(name: str, values: tuple[float, float]) -> None:
        row = per_row.setdefault(name, {"ause": [], "aurg": []})
        row["ause"].append(values[0])
        row["aurg"].append(values[1])

    examples = None
    for number, g in enumerate(seed_groups):
        if progress is not None:
            progress(f"seed group {g} ({number + 1} of {len(seed_groups)})")
        seeds = [group_seeds(g, j, k, n) for j in range(k + 1)]
        plain = restore(condition, mask, seeds[0], None)
        output = plain.images
        samples = torch.stack([restore(condition, mask, seeds[j], None).images for j in range(1, k + 1)])
        error = (output.double() - x0.double()).pow(2)
        maps, runs = {}, {}
        for name, estimator in estimators.items():
            result = restore(condition, mask, seeds[0], estimator)
            maps[name] = result.maps
            runs[name] = result
            add(name, error_calibration(result.maps, result.images, x0, mask, num_fractions))
        if number == 0 and keep_first_group:
            first_group = {"output": output, "output_nfe": plain.nfe / n, "samples": samples,
                           "runs": {name: (r.images, r.maps, r.nfe / n) for name, r in runs.items()}}
        maps["K-sample variance"] = sample_variance(samples)
        add("K-sample variance", error_calibration(maps["K-sample variance"], output, x0, mask, num_fractions))
        if examples is None and keep_examples > 0:
            examples = first_examples(keep_examples, x0, condition, mask, output, maps, error)
        noise = torch.rand(error.shape, generator=torch.Generator().manual_seed(int(g)), dtype=torch.float64)
        add("random", error_calibration(noise, output, x0, mask, num_fractions))
        add("oracle", error_calibration(error, output, x0, mask, num_fractions))
        l1, psnr = l1_psnr(output, x0, mask)
        quality["l1"].append(l1)
        quality["psnr"].append(psnr)
        quality["diversity_ssim"].append(mean_pairwise_ssim(samples))
        if fid is not None:
            quality["fid"].append(float(fid(output, x0)))
    study = {"rows": {name: {m: experiments.mean_std(v) for m, v in row.items()} for name, row in per_row.items()},
             "quality": {name: experiments.mean_std(v) for name, v in quality.items()}, "groups": len(seed_groups),
             "per_group": per_row}
    if examples is not None:
        study["examples"] = examples
    if keep_first_group:
        study["first_group"] = first_group
    return study


def first_examples(count: int, x0, condition, mask, output, maps: dict, error) -> dict:
    """The first `count` inputs of a group for the panels: images, and the maps and squared error
    zeroed at the known pixels."""
    e = slice(0, count)
    region = torch.ones_like(error) if mask is None else mask.to(error).expand_as(error)
    return {"x0": x0[e], "condition": condition[e], "mask": None if mask is None else mask[e], "output": output[e],
            "maps": {name: m[e] * region[e].to(m) for name, m in maps.items()}, "error": (error * region)[e]}


QUALITY_METRICS = {"l1": "lower", "psnr": "higher", "fid": "lower"}  # which way is better


def guidance_study(restore: Restore, x0: torch.Tensor, condition: torch.Tensor, mask: Optional[torch.Tensor],
                   guided: dict, num_samples: int = 6, seed_groups: Sequence[int] = (0, 1, 2),
                   fid: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
                   progress: Optional[Callable[[str], None]] = None) -> dict:
    """Does uncertainty guidance (docs/algorithms.md §4) restore better? Guided versus unguided outputs
    from the same seeds and inputs (docs/algorithms.md §7).

    For each seed group g, every held-out input is restored unguided and with each of `guided`
    (`{row name: (EstimatorSpec, GuidanceSpec)}`), all with the seeds of `calibration_study`'s output
    (`group_seeds(g, 0, K, n)`, so the unguided output is that study's output). Per group: L1 and PSNR
    to the ground truth over the generated pixels, and `fid(outputs, x0)` when given. Each row pairs
    the groups: the guided-minus-unguided difference's mean ± standard deviation over the groups and
    a verdict only beyond 2 standard deviations (`uncdiff.evaluation.experiments.compare`; none with
    one group). Returns `{'rows': [{'guidance', 'metric', 'unguided', 'guided', 'difference': (mean, std),
    'verdict', 'per_group': {'unguided': [...], 'guided': [...]}}], 'groups': len(seed_groups)}`."""
    n = x0.shape[0]
    metrics = [m for m in QUALITY_METRICS if m != "fid" or fid is not None]
    values = {name: {m: ([], []) for m in metrics} for name in guided}  # (unguided, guided) per group

    def measure(output: torch.Tensor) -> dict[str, float]:
        l1, psnr = l1_psnr(output, x0, mask)
        return {"l1": l1, "psnr": psnr, **({"fid": float(fid(output, x0))} if fid is not None else {})}

    for number, g in enumerate(seed_groups):
        if progress is not None:
            progress(f"guidance, seed group {g} ({number + 1} of {len(seed_groups)})")
        seeds = group_seeds(g, 0, num_samples, n)
        plain = measure(restore(condition, mask, seeds, None).images)
        for name, (estimator, guidance) in guided.items():
            ours = measure(restore(condition, mask, seeds, estimator, guidance=guidance).images)
            for m in metrics:
                values[name][m][0].append(plain[m])
                values[name][m][1].append(ours[m])
    rows = []
    for name in guided:
        for m in metrics:
            unguided, ours = values[name][m]
            mean, std = experiments.mean_std([a - b for a, b in zip(ours, unguided)])
            lower = mean if QUALITY_METRICS[m] == "lower" else -mean  # compare judges differences where lower is better
            rows.append({"guidance": name, "metric": m, "unguided": experiments.mean_std(unguided),
                         "guided": experiments.mean_std(ours), "difference": (mean, std),
                         "verdict": experiments.compare(lower, std, "better than unguided", "worse than unguided"),
                         "per_group": {"unguided": unguided, "guided": ours}})
    return {"rows": rows, "groups": len(seed_groups)}


def guidance_markdown(study: dict) -> str:
    """The rows of `guidance_study` as a Markdown table."""
    fmt = lambda pair: f"{pair[0]:.4f}" + ("" if pair[1] is None else f" ± {pair[1]:.4f}")
    sign = lambda pair: f"{pair[0]:+.4f}" + ("" if pair[1] is None else f" ± {pair[1]:.4f}")
    lines = ["| guidance | metric | unguided | guided | guided minus unguided | verdict (beyond 2 std) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['guidance']} | {r['metric']} ({QUALITY_METRICS[r['metric']]} is better) | {fmt(r['unguided'])} | "
              f"{fmt(r['guided'])} | {sign(r['difference'])} | {r['verdict']} |" for r in study["rows"]]
    lines += ["", f"Mean ± standard deviation over {study['groups']} seed groups; the difference is paired group "
                  f"by group (the same seeds and inputs)."]
    return "\n".join(lines)


def guidance_csv_rows(study: dict) -> list[dict]:
    """The rows of `guidance_study` for a CSV: means, standard deviations (empty with one group) and
    each group's values."""
    blank = lambda v: "" if v is None else v
    return [{"guidance": r["guidance"], "metric": r["metric"], "unguided_mean": r["unguided"][0],
             "unguided_std": blank(r["unguided"][1]), "guided_mean": r["guided"][0], "guided_std": blank(r["guided"][1]),
             "difference_mean": r["difference"][0], "difference_std": blank(r["difference"][1]),
             "verdict": r["verdict"], "unguided_per_group": " ".join(f"{v:.6g}" for v in r["per_group"]["unguided"]),
             "guided_per_group": " ".join(f"{v:.6g}" for v in r["per_group"]["guided"])} for r in study["rows"]]


def paired_difference(study: dict, row: str, baseline: str, metric: str = "ause") -> tuple[float, Optional[float]]:
    """`(mean, std)` over the seed groups of `row`'s `metric` minus `baseline`'s, group by group (both
    maps rank the errors of the same outputs, so the groups pair up); std None with one group."""
    a, b = study["per_group"][row][metric], study["per_group"][baseline][metric]
    return experiments.mean_std([x - y for x, y in zip(a, b)])


def calibration_markdown(study: dict) -> str:
    """The study of `calibration_study` as two Markdown tables (mean ± std over seed groups; the mean
    alone with one group)."""
    fmt = lambda pair: f"{pair[0]:.4f}" + ("" if pair[1] is None else f" ± {pair[1]:.4f}")
    lines = [f"| map | AUSE (lower is better) | AURG (higher is better) |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(row['ause'])} | {fmt(row['aurg'])} |" for name, row in study["rows"].items()]
    lines += ["", "| output quality | value |", "|---|---|"]
    lines += [f"| {name} | {fmt(pair)} |" for name, pair in study["quality"].items()]
    lines += ["", f"Mean ± standard deviation over {study['groups']} seed groups."]
    return "\n".join(lines)


def calibration_rows(study: dict) -> list[dict]:
    """The study as CSV rows: one per map and metric (mean, std, and each group's value), then one per
    quality measure."""
    rows = []
    for name, row in study["rows"].items():
        for metric in ("ause", "aurg"):
            mean, std = row[metric]
            rows.append({"kind": "map", "name": name, "metric": metric, "mean": mean, "std": std,
                         "per_group": " ".join(f"{v:.6g}" for v in study["per_group"][name][metric])})
    for name, (mean, std) in study["quality"].items():
        rows.append({"kind": "quality", "name": name, "metric": name, "mean": mean, "std": std, "per_group": ""})
    return rows


def draw_panels(examples: dict, path, cmap: str = "magma") -> None:
    """The study's examples as a figure at `path`: one row per input; condition, output, ground truth, the
    squared error, then each map (summed over channels; every map and the error on its own scale in each
    row, zero at the known pixels)."""
    import numpy as np
    from matplotlib.figure import Figure

    images = [("condition", examples["condition"]), ("output", examples["output"]), ("ground truth", examples["x0"])]
    heats = [("squared error", examples["error"])] + list(examples["maps"].items())
    n, cols = len(examples["output"]), len(images) + len(heats)
    fig = Figure(figsize=(1.5 * cols, 1.5 * n + 0.5))
    axes = np.asarray(fig.subplots(n, cols, squeeze=False))
    show = lambda x: ((x.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1).numpy()
    for i in range(n):
        for j, (title, values) in enumerate(images):
            axes[i, j].imshow(show(values[i]), cmap="gray" if values.shape[1] == 1 else None, vmin=0, vmax=1)
        for j, (title, values) in enumerate(heats, start=len(images)):
            axes[i, j].imshow(values[i].double().sum(0).numpy(), cmap=cmap)
        for j, (title, _) in enumerate(images + heats):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
