"""The evaluation report: Markdown, one CSV per experiment, plots, and the same tables for a logger
(W&B when the command logs). Formats what `uncdiff.evaluation.experiments` computed; computes
nothing itself."""

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from uncdiff.io.files import write_atomic  # noqa: E402


@dataclass
class Report:
    header: dict  # label -> value, shown first
    filtering: list[dict] = field(default_factory=list)
    guidance: list[dict] = field(default_factory=list)
    sign: Optional[dict] = None
    sweep: list[dict] = field(default_factory=list)  # experiments.sweep_rows
    sweep_outcome: Optional[str] = None
    sparsification: list[dict] = field(default_factory=list)
    curves: dict = field(default_factory=dict)  # estimator -> RMSE curve [F]
    cost: list[dict] = field(default_factory=list)
    study: list[dict] = field(default_factory=list)  # study.correlation_rows
    study_curves: list[dict] = field(default_factory=list)  # study.drop_curve_rows
    study_points: dict = field(default_factory=dict)  # estimator -> {"score", "noise", "realism"} [N] for scatters
    detection: list[dict] = field(default_factory=list)  # detection.detection_rows
    detection_guidance: list[dict] = field(default_factory=list)  # guided vs plain: detection.McNemar's fields
    notes: list[str] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (caption, file) shown at the end


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def table(rows: list[list[str]]) -> str:
    head, *body = rows
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in body])


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue().encode())


# ----------------------------------------------------------------------------------------- plots

def _save(fig, path: Path) -> None:
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    write_atomic(path, image.getvalue())
    plt.close(fig)


def plot_filtering(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = range(len(rows))
    ax.errorbar(x, [r["fid_random_mean"] for r in rows], yerr=[2 * (r["fid_random_std"] or 0) for r in rows],
                fmt="o", color="grey", capsize=4, label="random subsets (mean ± 2 std)")
    ax.plot(x, [r["fid_kept"] for r in rows], "D", color="C3", label="kept by score")
    ax.set_xticks(list(x), [r["estimator"] for r in rows])
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"Filtering: drop {rows[0]['samples'] - rows[0]['kept']} of {rows[0]['samples']}")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_guidance(rows: list[dict], path: Path) -> None:
    """The differences to the unguided FID: whole sets (bars) and per seed group (mean ± 2 std)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = range(len(rows))
    ax.axhline(0, color="grey", lw=1)
    ax.bar(x, [r["difference"] for r in rows], color="C0", label="all seeds")
    ax.errorbar(x, [r["group_difference_mean"] for r in rows], yerr=[2 * (r["group_difference_std"] or 0) for r in rows],
                fmt="o", color="k", capsize=4, label=f"per seed group (mean ± 2 std, {rows[0]['groups']} groups)")
    ax.set_xticks(list(x), [r["set"].replace("guided-", "") for r in rows], fontsize=8)
    ax.set_ylabel("FID guided - unguided\n(negative is better)")
    ax.set_title(f"Guided vs unguided (unguided FID {rows[0]['fid_unguided']:.3g}), same noise", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_sweep(rows: list[dict], path: Path) -> None:
    """FID guided - unguided per seed group (mean ± 2 std) against the gradient rule's lam (log axis;
    symmetric-log when lam = 0 is a point), one line per grad_wrt, and against the posterior rule's
    prior precision."""
    gradient = [r for r in rows if r["rule"] == "gradient"]
    posterior = [r for r in rows if r["rule"] == "posterior"]
    panels = [p for p in (gradient, posterior) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, part in zip(axes[0], panels):
        ax.axhline(0, color="grey", lw=1)
        if part is gradient:
            for i, wrt in enumerate(dict.fromkeys(r["grad_wrt"] for r in part)):
                line = sorted((r for r in part if r["grad_wrt"] == wrt), key=lambda r: r["lam"])
                ax.errorbar([r["lam"] for r in line], [r["group_difference_mean"] for r in line],
                            yerr=[2 * (r["group_difference_std"] or 0) for r in line], fmt="o-", capsize=4,
                            color=f"C{i}", label=f"d/d {wrt}")
            lams = [r["lam"] for r in part]
            if min(lams) > 0:
                ax.set_xscale("log")
            else:
                ax.set_xscale("symlog", linthresh=min([v for v in lams if v > 0], default=1.0))
            ax.set_xlabel(f"lam (gradient rule, sign {part[0]['sign']:+d}, reduce {part[0]['reduce']})")
            ax.legend(fontsize=8)
        else:
            x = range(len(part))
            ax.errorbar(x, [r["group_difference_mean"] for r in part],
                        yerr=[2 * (r["group_difference_std"] or 0) for r in part], fmt="o", capsize=4, color="C3")
            ax.set_xticks(list(x), [p if isinstance(p := r["prior_precision"], str) else f"{p:g}" for r in part],
                          fontsize=8)
            ax.set_xlabel("prior precision (posterior rule)")
        ax.set_ylabel("FID guided - unguided\n(negative is better)")
    fig.suptitle(f"Guidance sweep: {rows[0]['samples']} samples per point, mean ± 2 std over "
                 f"{rows[0]['groups']} seed groups", fontsize=10)
    _save(fig, path)


def plot_sparsification(curves: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, curve in curves.items():
        fractions = torch.arange(len(curve)) / len(curve)
        ax.plot(fractions, curve, ls="--" if name in ("oracle", "random") else "-", label=name)
    ax.set_xlabel("fraction of pixels removed (most uncertain first)")
    ax.set_ylabel("RMSE of the rest")
    ax.set_title("Sparsification curves")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_cost(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    names = [r["method"].replace("guided-", "g-") for r in rows]
    for ax, key, label in zip(axes, ("nfe_per_image", "seconds_per_image"),
                              ("network evaluations / image", "seconds / image")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color="C2")
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    _save(fig, path)


# -------------------------------------------------------------------------------------- markdown

def markdown(report: Report) -> str:
    """report.md: the header, then each experiment's section, the notes and the figures."""
    out = ["# uncdiff evaluation report", "", table([["", ""]] + [[k, fmt(v)] for k, v in report.header.items()]), ""]
    for section in (filtering_markdown, guidance_markdown, sweep_markdown, sparsification_markdown, cost_markdown,
                    study_markdown, detection_markdown):
        out += section(report)
    if report.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    for caption, name in report.images:
        out += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    return "\n".join(out)


def filtering_markdown(report: Report) -> list[str]:
    """Section (a), filtering; empty without its rows."""
    if not report.filtering:
        return []
    out = []
    r0 = report.filtering[0]
    out += ["## (a) Filtering (paper Table 1)", "",
            f"Each estimator scores its own {r0['samples']} samples; the {r0['samples'] - r0['kept']} with the "
            f"highest score are dropped and the FID of the {r0['kept']} kept is compared with random subsets of "
            f"the same size (mean ± std over {report.header.get('random subsets (seeds)', '?')} seeds). "
            f"z = (kept - random mean) / random std.", "",
            table([["estimator", "FID all", "FID kept", "FID random subsets", "z", "verdict"]]
                  + [[r["estimator"], fmt(r["fid_all"]), fmt(r["fid_kept"]),
                      f"{fmt(r['fid_random_mean'])} ± {fmt(r['fid_random_std'])}", fmt(r["z"], 2), r["verdict"]]
                     for r in report.filtering]), ""]
    if "precision_kept" in r0:
        out += ["**Precision / recall** (Kynkäänniemi et al. 2019) of the same sets against real training "
                "images: precision is the share of samples inside some real image's k-nearest-neighbour ball "
                "(fidelity), recall the share of real images inside some sample's ball (coverage). Higher is "
                "better; recall grows with the number of samples, so compare kept with random, not with all. "
                f"Real images and k: {report.header.get('precision / recall', '?')}.", "",
                table([["estimator", "metric", "all", "kept", "random subsets", "verdict"]]
                      + [[r["estimator"], metric, fmt(r[f"{metric}_all"]), fmt(r[f"{metric}_kept"]),
                          f"{fmt(r[f'{metric}_random_mean'])} ± {fmt(r[f'{metric}_random_std'])}",
                          r[f"{metric}_verdict"]]
                         for r in report.filtering for metric in ("precision", "recall")]), ""]
    out += ["![filtering](filtering.png)", ""]
    return out


def guidance_markdown(report: Report) -> list[str]:
    """Section (b), guided versus unguided sampling; empty without its rows."""
    if not report.guidance:
        return []
    out = []
    g = report.guidance[0]
    out += ["## (b) Guided versus unguided sampling", "",
            f"Every set uses the same seeds, hence the same starting noise, as the unguided set. The per-group "
            f"columns split the {g['samples']} seeds into {g['groups']} groups and pair each group's guided and "
            f"unguided FID: difference = guided - unguided (negative is better), mean ± standard deviation over the groups.", "",
            table([["set", "FID", "unguided FID", "difference", "per-group difference", "verdict",
                    "samples identical to unguided"]]
                  + [[r["set"], fmt(r["fid"]), fmt(r["fid_unguided"]), fmt(r["difference"]),
                      f"{fmt(r['group_difference_mean'])} ± {fmt(r['group_difference_std'])}", r["verdict"],
                      fmt(r.get("identical_to_unguided"))] for r in report.guidance]), ""]
    if report.sign:
        s = report.sign
        out += [f"**Gradient sign.** +1: FID {fmt(s['fid_plus'])}, -1: FID {fmt(s['fid_minus'])}; "
                f"**{s['better_sign']} measured better** (per-group difference +1 minus -1: "
                f"{fmt(s['group_difference_mean'])} ± {fmt(s['group_difference_std'])}; verdict: {s['verdict']}). "
                f"docs/algorithms.md §4 asks for the better-measured sign as the default; the default is "
                f"{report.header.get('default gradient sign', '+1')}.", ""]
    out += ["![guidance](guidance.png)", ""]
    return out


def sweep_markdown(report: Report) -> list[str]:
    """Section the guidance sweep; empty without its rows."""
    if not report.sweep:
        return []
    out = []
    r0 = report.sweep[0]
    out += ["## Guidance sweep (strength)", "",
            f"Each setting guides {r0['samples']} samples from the seeds of the unguided set (the same starting "
            f"noise; the unguided samples are generated once for all settings). Difference = guided - unguided "
            f"FID (negative is better), per seed group over {r0['groups']} groups: mean ± standard deviation. "
            f"A verdict is given only beyond 2 standard deviations of the group-to-group spread.", "",
            table([["setting", "FID", "unguided FID", "difference", "per-group difference (mean ± std)",
                    "verdict", "samples identical to unguided"]]
                  + [[r["point"], fmt(r["fid"]), fmt(r["fid_unguided"]), fmt(r["difference"]),
                      f"{fmt(r['group_difference_mean'])} ± {fmt(r['group_difference_std'])}", r["verdict"],
                      fmt(r.get("identical_to_unguided"))] for r in report.sweep]), ""]
    if report.sweep_outcome:
        out += [f"**{report.sweep_outcome}**", ""]
    out += ["![sweep](sweep.png)", ""]
    return out


def sparsification_markdown(report: Report) -> list[str]:
    """Section (c), AUSE / AURG; empty without its rows."""
    if not report.sparsification:
        return []
    out = []
    out += ["## (c) Pixel-wise uncertainty versus error: AUSE / AURG (paper Table 2)", "",
            "Real held-out images noised to the middle of the sampler's schedule and denoised, the uncertainty "
            "summed over the remaining steps; error = squared difference to the original. Lower AUSE and higher "
            "AURG are better; `random` is a uniformly random uncertainty for scale.", "",
            table([["estimator", "pixels", "RMSE (all)", "AUSE", "AURG"]]
                  + [[r["estimator"], fmt(r["pixels"]), fmt(r["rmse_all"], 4), fmt(r["ause"], 4),
                      fmt(r["aurg"], 4)] for r in report.sparsification]), "",
            "![sparsification](sparsification.png)", ""]
    return out


def cost_markdown(report: Report) -> list[str]:
    """Section (d), cost; empty without its rows."""
    if not report.cost:
        return []
    out = []
    out += ["## (d) Cost", "",
            "Network evaluations (image rows through the network, forward passes; the gradient rule's "
            "backward pass shows only in the time) and device-seconds per image, summed over all processes "
            "and interruptions; ratios to plain sampling.", "",
            table([["method", "evaluations / image", "× plain", "seconds / image", "× plain"]]
                  + [[r["method"], fmt(r["nfe_per_image"], 1), fmt(r.get("nfe_ratio"), 2),
                      fmt(r["seconds_per_image"], 4), fmt(r.get("time_ratio"), 2)] for r in report.cost]), "",
            "![cost](cost.png)", ""]
    return out


# ---------------------------------------------------------------------------------- detection

def detection_markdown(report: Report) -> list[str]:
    """Section (f): finding the invalid samples of the shapes testbed (docs/algorithms.md §6c)."""
    if not report.detection:
        return []
    interval = lambda r, k: f"{fmt(r[k])} [{fmt(r[f'{k}_low'])}, {fmt(r[f'{k}_high'])}]"  # noqa: E731
    return ["## (f) Detecting invalid samples (shapes checker)", "",
            "Each estimator's samples are labelled by the shapes checker; its score (higher = more likely "
            "invalid) is judged at finding the invalid ones: AUROC and AUPRC [stratified bootstrap 95 % interval], "
            "and, keeping the 90 % / 95 % with the lowest scores, the fraction of invalid samples removed and of "
            "valid samples kept. detectable: the smallest distance of AUROC from 1/2 these counts detect at alpha "
            "0.05 with 80 % power (docs/algorithms.md §6c). `random` is a uniform random score on the first "
            "set's labels (its AUPRC expectation is the invalid rate).", "",
            table([["estimator", "samples", "invalid", "AUROC", "detectable", "AUPRC", "removed / kept at 90 %",
                    "removed / kept at 95 %", "evaluations / image", "seconds / image"]]
                  + [[r["estimator"], str(r["n"]), str(r["invalid"]), interval(r, "auroc"),
                      f"± {fmt(r['detectable_auroc'])}", interval(r, "auprc"),
                      f"{fmt(r['removed_at_90'])} / {fmt(r['kept_at_90'])}",
                      f"{fmt(r['removed_at_95'])} / {fmt(r['kept_at_95'])}", fmt(r["nfe_per_image"], 1),
                      fmt(r["seconds_per_image"], 4)] for r in report.detection]), ""] + detection_guidance_markdown(report)


def detection_guidance_markdown(report: Report) -> list[str]:
    """Guided against plain invalid rates on the same seeds, with the exact McNemar test."""
    if not report.detection_guidance:
        return []
    verdict = lambda r: "differs (p < 0.05)" if r["p_value"] < 0.05 else "not detectable at this precision"  # noqa: E731
    return ["**Guidance and the invalid rate.** Each guided set against the plain set on the same seeds: "
            "`only plain` / `only guided` count the seeds invalid in one of the two; p: the exact two-sided "
            "McNemar test; detectable: the smallest difference in invalid rate this many pairs find at alpha "
            "0.05 with 80 % power (docs/algorithms.md §6c).", "",
            table([["set", "pairs", "invalid plain", "invalid guided", "only plain", "only guided", "p", "detectable",
                    "verdict"]]
                  + [[r["set"], str(r["n"]), fmt(r["rate_first"]), fmt(r["rate_second"]), str(r["only_first"]),
                      str(r["only_second"]), fmt(r["p_value"]), fmt(r["detectable"]), verdict(r)]
                     for r in report.detection_guidance]), ""]


# ---------------------------------------------------------------------------- per-sample study

def study_markdown(report: Report) -> list[str]:
    """Section (e): what each score ranks (docs/algorithms.md §6b)."""
    if not report.study:
        return []
    keys = [k for k in ("noise", "realism", "confidence") if f"rho_{k}" in report.study[0]]
    names = {"noise": "|x_T|^2", "realism": "5-NN distance to real (lower = more realistic)",
             "confidence": "classifier confidence"}
    cell = lambda r, k: f"{fmt(r[f'rho_{k}'], 2)} [{fmt(r[f'rho_{k}_low'], 2)}, {fmt(r[f'rho_{k}_high'], 2)}]"  # noqa: E731
    out = ["## (e) What the scores rank (per-sample study)", "",
           f"Spearman correlation of each score with per-sample measures, on the filtering sets' own "
           f"{report.study[0]['samples']} samples, [95% bootstrap interval]. Every score variant and window is computed "
           f"from the same samples' per-step totals (no re-sampling). A positive correlation with the 5-NN distance "
           f"means a high score marks a *less* realistic sample (what filtering assumes). Signs are stated only where "
           f"the interval excludes 0. The normalised variants' per-step statistics are cross-fitted: each half of "
           f"the samples is scored with the other half's.", "",
           table([["estimator", "score", "window", *[names[k] for k in keys]]]
                 + [[r["estimator"], r["score"], r["window"], *[cell(r, k) for k in keys]] for r in report.study]), ""]
    if report.study_curves:
        fractions = list(dict.fromkeys(r["drop_fraction"] for r in report.study_curves))
        by = {}
        for r in report.study_curves:
            by.setdefault((r["estimator"], r["score"], r["window"]), {})[r["drop_fraction"]] = r
        out += ["**Kept-set FID against random subsets, by drop fraction** (z = (kept - random mean) / random std; "
                "negative is better; the verdict needs 2 std; study_curves.csv has every number).", "",
                table([["estimator", "score", "window", *[f"drop {f:.3g}" for f in fractions]]]
                      + [[*key, *[f"{fmt(row[f]['z'], 2)} ({short(row[f]['verdict'])})" for f in fractions]]
                         for key, row in by.items()]), "",
                "![study curves](study_curves.png)", ""]
    if report.study_points:
        out += ["![study scatter](study_scatter.png)", ""]
    return out


def short(verdict: str) -> str:
    return {"better than random": "better", "worse than random": "worse"}.get(verdict, "–")


def plot_study_curves(rows: list[dict], path: Path) -> None:
    """Kept-set FID minus the random subsets' mean against the drop fraction, one panel per
    estimator, one line per (score, window); the grey band is ± 2 std of the random subsets."""
    estimators = list(dict.fromkeys(r["estimator"] for r in rows))
    fig, axes = plt.subplots(1, len(estimators), figsize=(4.6 * len(estimators), 3.6), squeeze=False)
    for ax, name in zip(axes[0], estimators):
        mine = [r for r in rows if r["estimator"] == name]
        band = {r["drop_fraction"]: 2 * (r["fid_random_std"] or 0) for r in mine}
        xs = sorted(band)
        ax.fill_between(xs, [-band[x] for x in xs], [band[x] for x in xs], color="grey", alpha=0.3,
                        label="random ± 2 std")
        for i, key in enumerate(dict.fromkeys((r["score"], r["window"]) for r in mine)):
            line = sorted((r for r in mine if (r["score"], r["window"]) == key), key=lambda r: r["drop_fraction"])
            ax.plot([r["drop_fraction"] for r in line], [r["fid_kept"] - r["fid_random_mean"] for r in line],
                    "o-", color=f"C{i % 10}", ms=3, lw=1, label=f"{key[0]}, {key[1]}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("fraction dropped (highest scores first)")
        ax.set_ylabel("FID kept - random mean")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=6)
    _save(fig, path)


def plot_study_scatter(points: dict, path: Path) -> None:
    """Score against |x_T|^2 and against the 5-NN realism distance, one row per estimator."""
    fig, axes = plt.subplots(len(points), 2, figsize=(7, 2.8 * len(points)), squeeze=False)
    for row, (name, p) in zip(axes, points.items()):
        for ax, key, label in zip(row, ("noise", "realism"), ("|x_T|^2", "5-NN distance to real images")):
            ax.scatter(p[key].numpy(), p["score"].numpy(), s=3, alpha=0.5)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel(f"{name} score", fontsize=8)
    fig.suptitle("Default score (sum over all steps) per sample", fontsize=10)
    _save(fig, path)


def write_report(out: Path, report: Report) -> list[Path]:
    """report.md, filtering.csv, guidance.csv, sweep.csv, sparsification.csv, cost.csv and their plots in
    `out`."""
    written = []
    for name, rows, plot in (("filtering", report.filtering, plot_filtering),
                             ("guidance", report.guidance + ([{"set": "sign +1 vs -1", **report.sign}]
                                                             if report.sign else []), None),
                             ("sweep", report.sweep, None),
                             ("sparsification", report.sparsification, None), ("cost", report.cost, plot_cost)):
        if rows:
            write_csv(out / f"{name}.csv", rows)
            written.append(out / f"{name}.csv")
    if report.filtering:
        plot_filtering(report.filtering, out / "filtering.png")
    if report.guidance:
        plot_guidance(report.guidance, out / "guidance.png")
    if report.sweep:
        plot_sweep(report.sweep, out / "sweep.png")
    if report.curves:
        plot_sparsification(report.curves, out / "sparsification.png")
    if report.cost:
        plot_cost(report.cost, out / "cost.png")
    for name, rows in (("study", report.study), ("study_curves", report.study_curves),
                       ("detection", report.detection), ("detection_guidance", report.detection_guidance)):
        if rows:
            write_csv(out / f"{name}.csv", rows)
            written.append(out / f"{name}.csv")
    if report.study_curves:
        plot_study_curves(report.study_curves, out / "study_curves.png")
    if report.study_points:
        plot_study_scatter(report.study_points, out / "study_scatter.png")
    write_atomic(out / "report.md", markdown(report).encode())
    return written + [out / "report.md"]


def log_report(logger, out: Path, report: Report) -> None:
    """The report's tables (NaN as empty cells), the plots written in `out` and its header, into a
    Lightning logger with `log_table`, `log_image` and `log_hyperparams` (the W&B logger that the
    `evaluate` command makes: `uncdiff.lightning.wandb_logger.WandbLogger`)."""
    for name, rows in (("filtering", report.filtering), ("guidance", report.guidance), ("sweep", report.sweep),
                       ("sparsification", report.sparsification), ("cost", report.cost), ("study", report.study),
                       ("study_curves", report.study_curves), ("detection", report.detection),
                       ("detection_guidance", report.detection_guidance)):
        if rows:
            columns = list(rows[0])
            logger.log_table(key=f"evaluate/{name}", columns=columns,
                             data=[[r.get(c) if not isinstance(r.get(c), float) or r.get(c) == r.get(c) else None
                                    for c in columns] for r in rows])
            if (out / f"{name}.png").is_file():
                logger.log_image(key=f"evaluate/{name}_plot", images=[str(out / f"{name}.png")])
    logger.log_hyperparams({k: str(v) for k, v in report.header.items()})
