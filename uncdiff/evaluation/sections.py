"""The sections of `evaluate`'s report (docs/algorithms.md §6, §6b), one function per experiment: each
reads the finished sample sets (`SampleStore`s) and their FID features, computes its experiment with
`uncdiff.evaluation.experiments` / `study` and fills its part of a `Report` (rows, header lines, notes).
Features are extracted once per set and cached beside it."""

import dataclasses
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from uncdiff.evaluation.experiments import (check_variance_scores, denoised_steps, extract_features, filtering_row,
                                            guidance_row, sign_outcome, sparsification_inputs, sparsification_row,
                                            sweep_outcome, sweep_rows)
from uncdiff.data.shapes import invalid_mask
from uncdiff.evaluation.detection import detection_rows, mcnemar
from uncdiff.evaluation.fid import datamodule_images
from uncdiff.evaluation.report import Report
from uncdiff.evaluation.sample_sets import GUIDED
from uncdiff.evaluation.study import (DROP_FRACTIONS, classifier_confidence, correlation_rows, drop_curve_rows,
                                     nearest_real_distance, study_scores)
from uncdiff.io.files import load_torch, save_atomic
from uncdiff.io.sample_store import SampleStore
from uncdiff.uncertainty.estimators import window_steps

Fid = Callable[[Tensor], float]

# --------------------------------------------------------------------------------------- features


def cached_features(path: Path, images, extractor) -> Tensor:
    """FID features `[N, D]` of `images()` (float `[N, C, H, W]`), extracted once and cached at `path`."""
    if path.is_file():
        return load_torch(path, "feature cache")
    features = extract_features(extractor, images())
    save_atomic(features, path)
    return features


def set_features(store: SampleStore, extractor) -> Tensor:
    """FID features of a finished set, cached as <set>/features-<extractor>.pt."""
    return cached_features(store.root / f"features-{extractor.name}.pt", store.load_images, extractor)


def real_features(root: Path, datamodule, count: int, extractor) -> Tensor:
    """FID features of `count` training images (the split of the FID statistics) drawn at random
    (seed 0), all of them if there are fewer; cached as <root>/sets/real/features-<extractor>-<count>.pt."""
    def images() -> Tensor:
        images = torch.cat(list(datamodule_images(datamodule, "train")()))
        return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:count].sort().values]

    return cached_features(root / "sets" / "real" / f"features-{extractor.name}-{count}.pt", images, extractor)


def held_out_images(datamodule, count: int) -> Tensor:
    """The first `count` validation images, float `[count, C, H, W]` in [-1, 1]."""
    return torch.cat(list(datamodule_images(datamodule, "val")()))[:count]


def drop_fraction(stores: dict[str, SampleStore]) -> float:
    """The filtering experiment's drop fraction: the sample sets' (all the same), else 1/6."""
    return next((s.settings["drop_fraction"] for s in stores.values() if s.settings["drop_fraction"]), 1 / 6)


# -------------------------------------------------------------------------------------- filtering

def filtering_section(report: Report, stores: dict[str, SampleStore], features: dict, fid: Fid,
                      names: Sequence[str], drop: float, subset_seeds: int,
                      precision_recall: Optional[Callable] = None) -> None:
    """Filtering (§6) of each set in `names` (estimators, then BayesDiff with the other covariance
    estimator on the same seeds) against `subset_seeds` random subsets; negative BayesDiff scores noted."""
    for name in names:
        store = stores[name]
        scores = store.load_scores()
        row = filtering_row(name, features[name], scores, drop, range(subset_seeds), fid, precision_recall)
        if name == "bayesdiff":
            report.notes.append("BayesDiff's set is sampled without x0 clipping (its variance propagation needs "
                                "affine DDIM steps) and follows E[x_t], so its images differ from the others'; "
                                "its random baseline is drawn from its own set.")
        if name.startswith("bayesdiff"):
            row, invalid = check_variance_scores(row, scores, store.settings["estimator"])
            if invalid:
                report.notes.append(invalid if name == "bayesdiff" else f"{name}: {invalid}")
        report.filtering.append(row)
    note_negative_variances(report, stores)


def note_negative_variances(report: Report, stores: dict[str, SampleStore]) -> None:
    """How many BayesDiff scores (sums of Var[x0], which no variance can make negative) are negative
    with each covariance estimator that ran (docs/algorithms.md §5b), as a column and a note."""
    counts = []
    for row in report.filtering:
        if row["estimator"].startswith("bayesdiff"):
            store = stores[row["estimator"]]
            scores = store.load_scores()
            row["moments"] = store.settings["estimator"]["moments"]
            row["negative_scores"] = int((scores < 0).sum())
            counts.append(f"{row['negative_scores']} of {len(scores)} with moments {row['moments']}")
    if counts:
        report.notes.append("Negative BayesDiff scores (docs/algorithms.md §5b; both covariance estimators ran on the "
                            "same seeds, each its own set): " + "; ".join(counts) + ".")


# ------------------------------------------------------------------------------ per-sample study

# the estimators whose score is one number per sample, not a sum of per-step totals -> its "window"
SAMPLE_LEVEL_SCORES = {"bayesdiff": "final Var[x0]", "x0_trajectory": "x0 variance, its window",
                       "generative": "final disagreement"}


def study_section(report: Report, stores: dict[str, SampleStore], features: dict, real: Tensor, extractor, fid: Fid,
                  names: Sequence[str], resamples: int, subset_seeds: int) -> None:
    """docs/algorithms.md §6b on the filtering sets: every score variant and window from their recorded
    per-step totals, correlated with |x_T|^2, the 5-NN realism distance to `real` features and the
    classifier's confidence; kept-set FID against random subsets at several drop fractions."""
    confidence_note = None
    for name in names:
        store = stores[name]
        noise = store.record_values("noise_norm")
        if noise is None:
            report.notes.append(f"The study skipped {name}: its set was sampled before |x_T|^2 and the per-step "
                                f"totals were recorded; sample it again in a new --out.")
            continue
        targets = {"noise": torch.tensor(noise, dtype=torch.float64),
                   "realism": nearest_real_distance(features[name], real)}
        confidence = classifier_confidence(extractor, features[name])
        if confidence is not None:
            targets["confidence"] = confidence
        else:
            confidence_note = f"The FID extractor {extractor.name} is no classifier: the study has no confidence column."
        if name in SAMPLE_LEVEL_SCORES:  # no per-step totals: one score per sample
            scores = {("sum", SAMPLE_LEVEL_SCORES[name]): store.load_scores()}
        else:
            totals = torch.tensor(store.record_values("step_totals"), dtype=torch.float64)
            steps = store.record_values("total_steps")[0]
            scores = study_scores(totals, steps, store.settings["sampler"]["steps"])
        report.study += correlation_rows(name, scores, targets, resamples, seed=0)
        report.study_curves += drop_curve_rows(name, features[name], scores, DROP_FRACTIONS, range(subset_seeds), fid)
        default = scores.get(("sum", "all steps"), next(iter(scores.values())))
        report.study_points[name] = {"score": default, "noise": targets["noise"], "realism": targets["realism"]}
    if confidence_note:
        report.notes.append(confidence_note)
    report.header["study"] = (f"Spearman with {resamples} bootstrap resamples (seed 0); realism = mean distance to "
                              f"the 5 nearest of {len(real)} real training images in FID feature space; drop "
                              f"fractions {', '.join(f'{f:.3g}' for f in DROP_FRACTIONS)} against {subset_seeds} "
                              f"random subsets each")


# --------------------------------------------------------------------------------------- guidance

def identical_count(a: Tensor, b: Tensor) -> int:
    """How many images of `a` are bit-identical to the one of `b` at the same index (same seed)."""
    return int((a == b[:len(a)]).flatten(1).all(1).sum())


def guidance_section(report: Report, stores: dict[str, SampleStore], features: dict, fid: Fid, seed_groups: int) -> None:
    """Guided versus unguided FID from the same seeds (§6), the gradient sign that measured better, and
    how many guided samples are identical to the unguided ones: guidance on early steps can vanish in
    x0 clipping."""
    for name in GUIDED:
        report.guidance.append(guidance_row(name, features[name], features["plain"], seed_groups, fid))
    plus, minus = report.guidance[0], report.guidance[1]
    report.sign = sign_outcome(plus, minus, features["guided-gradient-plus"], features["guided-gradient-minus"],
                               seed_groups, fid)
    images = {name: stores[name].load_images() for name in ["plain", *GUIDED]}
    for row in report.guidance:
        row["identical_to_unguided"] = identical_count(images[row["set"]], images["plain"])
    for i, a in enumerate(GUIDED):
        for b in GUIDED[i + 1:]:
            k = identical_count(images[a], images[b])
            if k > len(images[a]) // 2:
                report.notes.append(f"{k} of {len(images[a])} samples of {a} and {b} are identical: these two "
                                    f"rules act alike here. With x0 clipping, a change of eps on the early, "
                                    f"high-noise steps acts only through the clipped x0, which both can leave "
                                    f"the same.")


def sweep_point(settings: dict) -> dict:
    """The columns of a sweep set's row: its guidance settings (those of the other rule empty)."""
    g = settings["guidance"]
    gradient = g["rule"] == "gradient"
    prior = g.get("prior_precision")
    label = (f"gradient d/d{g['grad_wrt']} lam={g['lam']:g}" if gradient
             else f"posterior prior={prior if isinstance(prior, str) else format(prior, 'g')}")
    return {"point": label, "rule": g["rule"], "grad_wrt": g.get("grad_wrt"), "reduce": g.get("reduce"),
            "sign": g.get("sign"), "lam": g.get("lam"), "prior_precision": prior}


def sweep_section(report: Report, stores: dict[str, SampleStore], features: dict, fid: Fid, names: Sequence[str],
                  seed_groups: int, reduce: str, sign: int) -> None:
    """The guidance sweep (§4, strength): the rows of the sets `names`, paired with the first seeds of
    the unguided set, with how many of each setting's samples are identical to the unguided ones."""
    points = [(sweep_point(stores[name].settings), features[name]) for name in names]
    report.sweep = sweep_rows(points, features["plain"], seed_groups, fid)
    plain = stores["plain"].load_images()
    for row, name in zip(report.sweep, names):
        row["identical_to_unguided"] = identical_count(stores[name].load_images(), plain)
    report.sweep_outcome = sweep_outcome(report.sweep)
    report.header["sweep"] = (f"{report.sweep[0]['samples']} samples per setting (the first seeds of the unguided "
                              f"set), {seed_groups} seed groups; gradient rule with reduce {reduce}, sign {sign:+d}")


# --------------------------------------------------------------------------------- sparsification

def ause_map_steps(settings: dict) -> list[int]:
    """The steps an AUSE map sums over: those of the estimator's window that AUSE's denoising runs,
    the second half of the sampler's steps (docs/algorithms.md §6)."""
    steps = settings["sampler"]["steps"]
    return sorted(set(window_steps(settings["estimator"]["window"], steps)) & set(denoised_steps(steps)))


def ause_section(report: Report, model, sampler, hooks: dict, images: Tensor, settings: dict, fractions: int,
                 batch_size: int) -> None:
    """AUSE / AURG (§6) of each estimator's maps (`hooks`: name -> sampler hook) when denoising the real
    `images` from the middle step with `model`, against a random map and the oracle (the error
    itself); `settings` are the aleatoric set's (its window decides the map's steps)."""
    seeds = list(range(len(images)))
    errors = None
    for name, hook in hooks.items():
        result = sparsification_inputs(model, sampler, images, seeds, hook, batch_size=batch_size)
        row, report.curves[name] = sparsification_row(name, result.maps, result.errors, fractions)
        report.sparsification.append(row)
        errors = result.errors  # the same for all: estimation never changes the denoised image
    random = torch.rand(errors.shape, generator=torch.Generator().manual_seed(0))
    for name, maps in (("random", random), ("oracle", errors)):
        row, report.curves[name] = sparsification_row(name, maps, errors, fractions)
        report.sparsification.append(row)
    n, steps = len(sampler.timesteps), ause_map_steps(settings)
    report.header["AUSE images"] = f"{len(images)} held-out images, denoised from step {denoised_steps(n).start} of " \
                                   f"{n}; maps summed over steps {steps[0]}..{steps[-1]} (the --estimator.window's part)"


# -------------------------------------------------------------------------------------- detection

def detection_section(report: Report, stores: dict[str, SampleStore], summaries: dict, names: Sequence[str],
                      resamples: int, guided: Sequence[str] = ()) -> None:
    """docs/algorithms.md §6c: each estimator's set (of `names`) labelled by the shapes checker, how well its
    score finds the invalid samples, its cost (`summaries`), and a random score's row. A score that is not
    a finite number counts as the highest (as filtering drops it), with a note. Each guided set of
    `guided` that ran: its invalid labels against the plain set's on the same seeds (its first ones), by
    the exact McNemar test."""
    sets = {}
    for name in names:
        scores = stores[name].load_scores()
        bad = ~torch.isfinite(scores)
        if bad.any():
            scores = torch.where(bad, scores[~bad].max() + 1 if (~bad).any() else 0.0, scores)
            report.notes.append(f"detection: {int(bad.sum())} {name} scores are not finite numbers; they count as "
                                f"the highest.")
        sets[name] = (scores, invalid_mask(stores[name].load_images()))
    report.detection = detection_rows(sets, summaries, resamples)
    if "plain" in stores:
        plain = invalid_mask(stores["plain"].load_images())
        for name in (n for n in guided if n in stores):
            labels = invalid_mask(stores[name].load_images())
            report.detection_guidance.append({"set": name, **dataclasses.asdict(mcnemar(plain[:len(labels)], labels))})


# ----------------------------------------------------------------------------------------- closing

def closing_notes(report: Report, stores: dict[str, SampleStore], features: dict) -> None:
    """Whether estimation left the images alone, and how to read the FIDs and verdicts."""
    for name in ("aleatoric", "mc_dropout"):
        if name in features and "plain" in features:
            identical = torch.equal(stores[name].load_images(), stores["plain"].load_images())
            report.notes.append(f"The {name} set's images are {'identical to' if identical else 'NOT identical to'} "
                                f"the plain set's (estimation alone never changes a sample).")
    if not features:  # no FID experiment ran
        return
    report.notes.append("FIDs of a few hundred or thousand samples are biased upwards: compare numbers within "
                        "one table, not with published 50k-sample FIDs.")
    report.notes.append("Verdicts: a difference counts when it exceeds 2 standard deviations. Filtering: the kept "
                        "set's difference to the random subsets' mean, against 2 std x sqrt(1 + 1/K) of the K "
                        "random subsets' FIDs (the kept set is one more draw), and likewise for precision and "
                        "recall (higher is better); guidance and the sweep: the paired per-group differences' mean "
                        "against 2 standard deviations of those differences. With few groups or subsets the spread "
                        "is itself uncertain: read the verdicts as rough.")


def copy_figures(report: Report, stores: dict[str, SampleStore], root: Path) -> None:
    """The aleatoric set's grid and dropped samples, copied into the report folder and shown in it."""
    captions = {"dropped.png": "Samples dropped by the aleatoric score (highest first)",
                "grid.png": "The first samples of the aleatoric set"}
    for file, caption in captions.items():
        if "aleatoric" in stores and (stores["aleatoric"].root / file).is_file():
            shutil.copyfile(stores["aleatoric"].root / file, root / f"aleatoric_{file}")
            report.images.append((caption, f"aleatoric_{file}"))
