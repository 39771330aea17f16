"""`uncdiff evaluate` (= `python train.py evaluate`): the paper's experiments on one checkpoint,
written as a report.

    uncdiff evaluate --checkpoint runs/quickstart/checkpoints/last.ckpt --out eval/quick --n 1000

(a) filtering: FID, and improved precision / recall (k = 5, against --filtering.prc_real training
images), of the set kept by the aleatoric, MC-Dropout and BayesDiff scores versus random subsets
(mean ± std over --filtering.subset_seeds); (b) guided versus unguided FID from the same seeds, for
the gradient rule with both signs and the posterior rule, over --guidance.seed_groups; (c) AUSE /
AURG of the aleatoric and MC-Dropout maps; (d) network evaluations and seconds per image of each
method; (e) the per-sample study (docs/algorithms.md §6b) on the filtering sets, without sampling
again: Spearman correlations of each score variant and window with |x_T|^2, realism and classifier
confidence, and kept-set FID curves over drop fractions. Not run by default, as it is expensive: `sweep`, guided versus unguided FID over a grid of
guidance strengths (--sweep.lams for each --sweep.grad_wrt, --sweep.prior_precisions), paired with the
first --sweep.n samples of the unguided set, mean ± std over --sweep.seed_groups.

Each sample set is an `uncdiff sample` run in <out>/sets/<name> (so all processes generate it,
and a re-run resumes it); then rank 0 extracts FID features once per set (cached next to it) and
once for the real images of precision / recall (cached in <out>/sets/real), computes the
experiments and writes <out>/report.md, one CSV per experiment and the plots, and logs the
tables to W&B with --wandb.enabled true. Every input is checked before <out> is created; <out>
records the full config as config.yaml.
"""

import inspect
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from jsonargparse import ArgumentParser, Namespace

from uncdiff.commands.common import (InputError, ModelInputs, add_estimator_arguments, add_guidance_arguments,
                                     add_model_arguments, add_sampler_arguments, attach_laplace, build_sampler,
                                     build_settings, config_yaml, estimator_hook, generate_run,
                                     make_fabric, new_parser, parse_options, prepare_model, record_config, run_info)
from uncdiff.io.files import load_torch, save_atomic
from uncdiff.io.sample_store import SampleStore, check_output_dir, create_output_dir
from uncdiff.lightning.data import dataset_key

EXPERIMENTS = ("filtering", "study", "guidance", "ause", "cost")  # the default ones
OPTIONAL_EXPERIMENTS = ("sweep",)  # run only when named: expensive
FILTERING_ESTIMATORS = ("aleatoric", "mc_dropout", "bayesdiff")
# sample set -> how its options differ from the command's (see `set_arguments`)
SETS = {
    "plain": {"estimator.name": "none", "filtering.drop_fraction": None, "estimator.M": None},
    "aleatoric": {"estimator.name": "aleatoric"},
    "mc_dropout": {"estimator.name": "mc_dropout"},
    "bayesdiff": {"estimator.name": "bayesdiff", "sampler.clip": False, "estimator.M": None},
    "guided-gradient-plus": {"guidance.rule": "gradient", "guidance.sign": 1},
    "guided-gradient-minus": {"guidance.rule": "gradient", "guidance.sign": -1},
    "guided-posterior": {"guidance.rule": "posterior"},
}
GUIDED = [name for name in SETS if name.startswith("guided")]


def build_parser() -> ArgumentParser:
    parser = new_parser("uncdiff evaluate", __doc__)
    add_model_arguments(parser, "output directory of the report and its sample sets (a re-run resumes)")
    g = parser.add_argument_group("experiments")
    g.add_argument("--experiments", type=Literal[EXPERIMENTS + OPTIONAL_EXPERIMENTS], nargs="+",
                   default=list(EXPERIMENTS), help=f"which to run (not by default: {', '.join(OPTIONAL_EXPERIMENTS)})")
    g.add_argument("--filtering.estimators", type=Literal[FILTERING_ESTIMATORS], nargs="+",
                   default=list(FILTERING_ESTIMATORS), help="estimators of the filtering experiment")
    g.add_argument("--filtering.subset_seeds", type=int, default=20,
                   help="random subsets per filtering FID and precision / recall")
    g.add_argument("--filtering.prc_real", type=Optional[int], default=None,
                   help="real training images (a random subset) that filtering's precision / recall compare with "
                        "(null: min(n, 10000); 0 skips precision / recall)")
    g.add_argument("--study.resamples", type=int, default=1000,
                   help="bootstrap resamples of each Spearman interval of the per-sample study (>= 1000)")
    g.add_argument("--guidance.seed_groups", type=int, default=3,
                   help="seed groups the guided/unguided FIDs are repeated over")
    g = parser.add_argument_group("guidance sweep (--experiments sweep; docs/algorithms.md §4, strength)")
    g.add_argument("--sweep.n", type=Optional[int], default=None,
                   help="samples per setting, paired with the first ones of the unguided set (null: --n)")
    g.add_argument("--sweep.lams", type=list[float], default=[1e-3, 1e-2, 1e-1, 1.0, 10.0],
                   help="gradient rule: the lam values")
    g.add_argument("--sweep.grad_wrt", type=list[Literal["eps", "x_t"]], default=["eps", "x_t"],
                   help="gradient rule: each lam with each of these (--guidance.reduce applies)")
    g.add_argument("--sweep.sign", type=int, default=1, help="gradient rule: the sign of every setting")
    g.add_argument("--sweep.prior_precisions", type=list[Union[float, Literal["abar_inverse"]]],
                   default=[0.01, 1.0, 100.0, "abar_inverse"], help="posterior rule: the prior precisions")
    g.add_argument("--sweep.seed_groups", type=int, default=3, help="seed groups of the spread")
    g.add_argument("--ause.images", type=int, default=100, help="held-out images for AUSE / AURG")
    g.add_argument("--ause.fractions", type=int, default=50, help="points of the sparsification curves")
    g.add_argument("--save_maps", type=bool, default=False, help="also write every sample's map and heatmap")
    g = parser.add_argument_group("FID")
    g.add_argument("--fid.extractor", type=Literal["auto", "inception", "digits-classifier"], default="auto",
                   help="FID features (auto: digits-classifier for digits, inception otherwise)")
    g.add_argument("--fid.inception_weights", type=Optional[str], default=None,
                   help="local copy of the FID Inception weights (pt_inception-2015-12-05)")
    g.add_argument("--fid.cache", type=str, default="cache", help="cache of real statistics and classifiers")
    g = parser.add_argument_group("logging")
    g.add_argument("--wandb.enabled", type=bool, default=False, help="also log the report's tables and plots to W&B")
    g.add_argument("--wandb.project", type=str, default="uncdiff-evaluate", help="W&B project")
    add_sampler_arguments(parser, n=1000, steps=20)
    add_estimator_arguments(parser, choose=False)
    add_guidance_arguments(parser, choose=False)
    return parser


# ------------------------------------------------------------------------------------------ plan

@dataclass
class Plan:
    """Everything `_run` needs, checked."""

    root: Path
    settings: dict
    stores: dict[str, SampleStore]
    extractor: str
    dataset: str
    notes: list[str] = field(default_factory=list)
    ause: dict[str, dict] = field(default_factory=dict)  # estimator -> sampling settings of its AUSE maps


def moments_sets(args: Namespace) -> dict[str, dict]:
    """The filtering experiment's second BayesDiff set: the same seeds with the other covariance
    estimator (docs/algorithms.md §5b), so that the report counts the negative scores of both."""
    if "filtering" not in args.experiments or "bayesdiff" not in args.filtering.estimators:
        return {}
    from uncdiff.uncertainty.bayesdiff import MOMENT_ESTIMATORS, OLD_MOMENT_NAMES

    mine = OLD_MOMENT_NAMES.get(args.bayesdiff.moments, args.bayesdiff.moments)
    other = next(m for m in MOMENT_ESTIMATORS if m != mine)
    return {f"bayesdiff-{other}": {**SETS["bayesdiff"], "bayesdiff.moments": other}}


def set_names(args: Namespace) -> list[str]:
    names = []
    if "filtering" in args.experiments or "study" in args.experiments:  # the study scores the same sets
        names += list(args.filtering.estimators)
    if "guidance" in args.experiments:
        names += ["plain", *GUIDED]
    if "cost" in args.experiments:
        names = ["plain", *names] if names else list(SETS)
    if "sweep" in args.experiments:
        names.append("plain")
    return [n for n in SETS if n in names] + list(moments_sets(args)) + list(sweep_sets(args))


def needs_laplace(args: Namespace) -> bool:
    """Whether any set to sample is a BayesDiff set (the cost experiment alone samples one too)."""
    return any(name.startswith("bayesdiff") for name in set_names(args))


def sweep_sets(args: Namespace) -> dict[str, dict]:
    """The sample sets of the guidance sweep -> how their options differ from the command's: the
    gradient rule at each lam for each grad_wrt, the posterior rule at each prior precision."""
    if "sweep" not in args.experiments:
        return {}
    sweep = args.sweep
    common = {"n": sweep.n or args.n, "guidance.sign": sweep.sign}
    sets = {f"sweep-gradient-{wrt}-lam{lam:g}": {**common, "guidance.rule": "gradient", "guidance.grad_wrt": wrt,
                                                  "guidance.lam": float(lam)}
            for wrt in sweep.grad_wrt for lam in sweep.lams}
    sets.update({f"sweep-posterior-prior{p if isinstance(p, str) else format(p, 'g')}":
                 {**common, "guidance.rule": "posterior", "guidance.prior_precision": p}
                 for p in sweep.prior_precisions})
    return sets


def sweep_point(settings: dict) -> dict:
    """The columns of a sweep set's row: its guidance settings (those of the other rule empty)."""
    g = settings["guidance"]
    gradient = g["rule"] == "gradient"
    prior = g.get("prior_precision")
    label = (f"gradient d/d{g['grad_wrt']} lam={g['lam']:g}" if gradient
             else f"posterior prior={prior if isinstance(prior, str) else format(prior, 'g')}")
    return {"point": label, "rule": g["rule"], "grad_wrt": g.get("grad_wrt"), "reduce": g.get("reduce"),
            "sign": g.get("sign"), "lam": g.get("lam"), "prior_precision": prior}


def check_sweep(args: Namespace) -> None:
    sweep = args.sweep
    n = sweep.n or args.n
    if not 1 <= n <= args.n:
        raise InputError(f"--sweep.n must lie in [1, --n] (its samples pair with the first ones of the unguided "
                         f"set), got {sweep.n} with --n {args.n}")
    if not 2 <= sweep.seed_groups <= n // 2:
        raise InputError(f"--sweep.seed_groups must lie in [2, sweep n / 2] (a spread needs two groups of two "
                         f"samples or more), got {sweep.seed_groups} with {n} samples per setting")
    if not sweep.lams and not sweep.prior_precisions:
        raise InputError("the sweep has no setting: give --sweep.lams or --sweep.prior_precisions")
    if sweep.lams and not sweep.grad_wrt:
        raise InputError("--sweep.lams needs at least one --sweep.grad_wrt")
    for option, values in (("--sweep.lams", sweep.lams), ("--sweep.grad_wrt", sweep.grad_wrt),
                           ("--sweep.prior_precisions", sweep.prior_precisions)):
        if len(set(values)) != len(values):
            raise InputError(f"{option} lists a value twice: {values}")


def set_arguments(args: Namespace, name: str, dropout: float) -> Namespace:
    """The options of a `sample` run of the set `name`."""
    options = {"estimator.name": "aleatoric", "guidance.rule": "none", "guidance.sign": 1,
               **({**SETS, **moments_sets(args)}[name] if name in SETS or name.startswith("bayesdiff")
                  else sweep_sets(args)[name])}
    if name != "aleatoric":  # --estimator.score (docs/algorithms.md §3) scores the aleatoric set only
        options.update({"estimator.score": "sum", "estimator.score_reference": None})
    if name == "mc_dropout":
        options["estimator.dropout"] = dropout
    set_args = args.clone()
    for key, value in options.items():
        set_args[key] = value
    return set_args


def plan_evaluation(args: Namespace, inputs: ModelInputs) -> Plan:
    """Check every option and build the settings of the run and of each sample set. Writes nothing."""
    from uncdiff.evaluation.experiments import PRC_NEIGHBOURS

    filtering, fid = args.filtering, args.fid
    if filtering.subset_seeds < 2:
        raise InputError(f"--filtering.subset_seeds must be >= 2 (a spread needs two subsets), got "
                         f"{filtering.subset_seeds}")
    if not 1 <= args.guidance.seed_groups <= args.n // 2:
        raise InputError(f"--guidance.seed_groups must lie in [1, n/2], got {args.guidance.seed_groups} with "
                         f"--n {args.n}")
    if "sweep" in args.experiments:
        check_sweep(args)
    if "study" in args.experiments and args.study.resamples < 1000:
        raise InputError(f"--study.resamples must be >= 1000 (the bootstrap intervals' percentiles), got "
                         f"{args.study.resamples}")
    prc_real = min(args.n, 10000) if filtering.prc_real is None else filtering.prc_real
    if prc_real != 0 and not prc_real > PRC_NEIGHBOURS:
        raise InputError(f"--filtering.prc_real must be > {PRC_NEIGHBOURS} (precision / recall use "
                         f"{PRC_NEIGHBOURS} nearest neighbours), or 0 to skip them, got {prc_real}")
    if args.ause.images < 1 or args.ause.fractions < 2:
        raise InputError("--ause.images must be >= 1 and --ause.fractions >= 2")
    if filtering.drop_fraction is not None and not 0.0 < filtering.drop_fraction < 1.0:
        raise InputError(f"--filtering.drop_fraction must lie in (0, 1), got {filtering.drop_fraction}")
    if fid.inception_weights is not None and not Path(fid.inception_weights).is_file():
        raise InputError(f"--fid.inception_weights: no file at {fid.inception_weights}")
    from uncdiff.lightning.data import DigitsDataModule

    digits = isinstance(inputs.datamodule, DigitsDataModule)
    extractor = fid.extractor if fid.extractor != "auto" else ("digits-classifier" if digits else "inception")
    if extractor == "digits-classifier" and not digits:
        raise InputError("--fid.extractor digits-classifier is for models of the digits data")
    notes = []
    dropout = args.estimator.dropout
    if dropout is None:
        dropout = inputs.module.hparams.dropout or 0.1
        if not inputs.module.hparams.dropout:
            notes.append("The model was trained without dropout; MC-Dropout ran with rate 0.1 (set "
                         "--estimator.dropout).")
    root = Path(args.out)
    stores = {}
    for name in set_names(args):
        set_args = set_arguments(args, name, dropout)
        settings = build_settings(set_args, inputs.module, inputs.sha256,
                                  inputs.laplace if name == "bayesdiff" else None, save_maps=args.save_maps)
        stores[name] = SampleStore(root / "sets" / name, settings)
    ause = {}
    if "ause" in args.experiments:
        for name in ("aleatoric", "mc_dropout"):
            ause[name] = stores[name].settings if name in stores else \
                build_settings(set_arguments(args, name, dropout), inputs.module, inputs.sha256, None)
            check_ause_window(ause[name])
    kept = args.n - round(drop_fraction(stores) * args.n)
    if "filtering" in args.experiments and prc_real and kept <= PRC_NEIGHBOURS:
        raise InputError(f"filtering keeps {kept} of --n {args.n} samples; precision / recall need more than "
                         f"{PRC_NEIGHBOURS}")
    settings = {"format": 1, "checkpoint_sha256": inputs.sha256, "experiments": sorted(args.experiments),
                "sets": {name: s.settings for name, s in stores.items()},
                "subset_seeds": filtering.subset_seeds, "seed_groups": args.guidance.seed_groups,
                "precision_recall": {"real_images": prc_real, "k": PRC_NEIGHBOURS} if prc_real else None,
                "ause": {"images": args.ause.images, "fractions": args.ause.fractions},
                "fid": {"extractor": extractor, "dataset": dataset_key(inputs.datamodule, inputs.module.image_shape, "train")}}
    if "sweep" in args.experiments:
        settings["sweep_seed_groups"] = args.sweep.seed_groups
    check_output_dir(root, settings)
    for store in stores.values():
        store.check()
    return Plan(root, settings, stores, extractor, dataset_key(inputs.datamodule, inputs.module.image_shape, "train"), notes, ause)


def ause_map_steps(settings: dict) -> list[int]:
    """The steps an AUSE map sums over: those of the estimator's window that AUSE's denoising runs,
    the second half of the sampler's steps (docs/algorithms.md §6)."""
    from uncdiff.evaluation.experiments import denoised_steps
    from uncdiff.uncertainty.estimators import window_steps

    steps = settings["sampler"]["steps"]
    return sorted(set(window_steps(settings["estimator_options"]["window"], steps)) & set(denoised_steps(steps)))


def check_ause_window(settings: dict) -> None:
    """An --estimator.window without any of AUSE's steps would leave it no map to score."""
    from uncdiff.evaluation.experiments import denoised_steps

    steps = settings["sampler"]["steps"]
    window = settings["estimator_options"]["window"]
    denoised = denoised_steps(steps)
    if not ause_map_steps(settings):
        raise InputError(f"--estimator.window {window[0]:g} {window[1]:g} has no step among steps "
                         f"{denoised.start}..{steps - 1} of {steps}: AUSE denoises only the second half of the steps "
                         f"and needs the window to overlap it (e.g. --estimator.window 0.5 1), or leave ause out of "
                         f"--experiments")


# --------------------------------------------------------------------------------------- running

def make_fid_extractor(args, plan: Plan, module, device):
    from uncdiff.evaluation.fid import make_extractor

    if plan.extractor == "inception":
        try:
            extractor = make_extractor("inception", weights_path=args.fid.inception_weights)
        except FileNotFoundError as error:
            raise InputError(f"{error} For `uncdiff evaluate`, pass the file as --fid.inception_weights PATH.") \
                from None
    else:
        extractor = make_extractor("digits-classifier", image_size=module.hparams.image_size,
                                   cache_dir=args.fid.cache)
    return extractor.to(device)


def drop_fraction(stores: dict[str, SampleStore]) -> float:
    """The filtering experiment's drop fraction: the sample sets' (all the same), else 1/6."""
    return next((s.settings["drop_fraction"] for s in stores.values() if s.settings["drop_fraction"]), 1 / 6)


def cached_features(path: Path, images, extractor) -> torch.Tensor:
    """FID features `[N, D]` of `images()` (float `[N, C, H, W]`), extracted once and cached at `path`."""
    from uncdiff.evaluation.experiments import extract_features

    if path.is_file():
        return load_torch(path, "feature cache")
    features = extract_features(extractor, images())
    save_atomic(features, path)
    return features


def set_features(store: SampleStore, extractor) -> torch.Tensor:
    """FID features of a finished set, cached as <set>/features-<extractor>.pt."""
    return cached_features(store.root / f"features-{extractor.name}.pt", store.load_images, extractor)


def real_features(root: Path, datamodule, count: int, extractor) -> torch.Tensor:
    """FID features of `count` training images (the split of the FID statistics) drawn at random
    (seed 0), all of them if there are fewer; cached as <root>/sets/real/features-<extractor>-<count>.pt."""
    from uncdiff.evaluation.fid import datamodule_images

    def images() -> torch.Tensor:
        images = torch.cat(list(datamodule_images(datamodule, "train")()))
        return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:count].sort().values]

    return cached_features(root / "sets" / "real" / f"features-{extractor.name}-{count}.pt", images, extractor)


def held_out_images(datamodule, count: int) -> torch.Tensor:
    from uncdiff.evaluation.fid import datamodule_images

    images = torch.cat(list(datamodule_images(datamodule, "val")()))
    return images[:count]


def run_sparsification(args, plan: Plan, module, datamodule, report) -> None:
    from uncdiff.evaluation.experiments import denoised_steps, sparsification_inputs, sparsification_row
    sampler = build_sampler(module, plan.ause["aleatoric"]["sampler"])
    images = held_out_images(datamodule, args.ause.images).to(module.device)
    seeds = list(range(len(images)))
    model = module.ema.ema_model.eval()
    errors = None
    for name, settings in plan.ause.items():
        hook = estimator_hook(module, name, settings["estimator_options"], None)
        result = sparsification_inputs(model, sampler, images, seeds, hook, batch_size=args.batch_size)
        row, curve = sparsification_row(name, result.maps, result.errors, args.ause.fractions)
        report.sparsification.append(row)
        report.curves[name] = curve
        errors = result.errors  # the same for both: estimation never changes the denoised image
    random = torch.rand(errors.shape, generator=torch.Generator().manual_seed(0))
    for name, maps in (("random", random), ("oracle", errors)):
        row, curve = sparsification_row(name, maps, errors, args.ause.fractions)
        report.sparsification.append(row)
        report.curves[name] = curve
    n, steps = len(sampler.timesteps), ause_map_steps(plan.ause["aleatoric"])
    report.header["AUSE images"] = f"{len(images)} held-out images, denoised from step {denoised_steps(n).start} of " \
                                   f"{n}; maps summed over steps {steps[0]}..{steps[-1]} (the --estimator.window's part)"


def run_sweep(args: Namespace, plan: Plan, features: dict, fid, report) -> None:
    """The guidance sweep's rows, with how many of each setting's samples are identical (as PNGs) to
    the unguided sample of the same seed."""
    from uncdiff.evaluation.experiments import sweep_outcome, sweep_rows

    names = list(sweep_sets(args))
    points = [(sweep_point(plan.stores[name].settings), features[name]) for name in names]
    report.sweep = sweep_rows(points, features["plain"], args.sweep.seed_groups, fid)
    plain = plan.stores["plain"].load_images()
    for row, name in zip(report.sweep, names):
        images = plan.stores[name].load_images()
        row["identical_to_unguided"] = int((images == plain[:len(images)]).flatten(1).all(1).sum())
    report.sweep_outcome = sweep_outcome(report.sweep)
    report.header["sweep"] = (f"{report.sweep[0]['samples']} samples per setting (the first seeds of the unguided "
                              f"set), {args.sweep.seed_groups} seed groups; gradient rule with reduce "
                              f"{args.guidance.reduce}, sign {args.sweep.sign:+d}")


def note_negative_variances(plan: Plan, report) -> None:
    """How many BayesDiff scores (sums of Var[x0], which no variance can make negative) are negative
    with each covariance estimator that ran (docs/algorithms.md §5b), as a column and a note."""
    counts = []
    for row in report.filtering:
        if row["estimator"].startswith("bayesdiff"):
            store = plan.stores[row["estimator"]]
            scores = store.load_scores()
            row["moments"] = store.settings["estimator_options"]["moments"]
            row["negative_scores"] = int((scores < 0).sum())
            counts.append(f"{row['negative_scores']} of {len(scores)} with moments {row['moments']}")
    if counts:
        report.notes.append("Negative BayesDiff scores (docs/algorithms.md §5b; both covariance estimators ran on the "
                            "same seeds, each its own set): " + "; ".join(counts) + ".")


def run_study(args: Namespace, plan: Plan, inputs: ModelInputs, features: dict, extractor, fid, report) -> None:
    """docs/algorithms.md §6b on the filtering sets: every score variant and window from their recorded
    per-step totals, correlated with |x_T|^2, the 5-NN realism distance and the classifier's
    confidence; kept-set FID against random subsets at several drop fractions."""
    from uncdiff.evaluation.study import (DROP_FRACTIONS, classifier_confidence, correlation_rows, drop_curve_rows,
                                          nearest_real_distance, study_scores)

    prc = plan.settings["precision_recall"]
    real = real_features(plan.root, inputs.datamodule, prc["real_images"] if prc else min(args.n, 10000), extractor)
    confidence_note = None
    for name in args.filtering.estimators:
        store = plan.stores[name]
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
        if name == "bayesdiff":  # Var[x0] of the final state: no per-step totals, one score
            scores = {("sum", "final Var[x0]"): store.load_scores()}
        else:
            totals = torch.tensor(store.record_values("step_totals"), dtype=torch.float64)
            steps = store.record_values("total_steps")[0]
            scores = study_scores(totals, steps, store.settings["sampler"]["steps"])
        report.study += correlation_rows(name, scores, targets, args.study.resamples, seed=0)
        report.study_curves += drop_curve_rows(name, features[name], scores, DROP_FRACTIONS,
                                               range(args.filtering.subset_seeds), fid)
        default = scores.get(("sum", "all steps"), next(iter(scores.values())))
        report.study_points[name] = {"score": default, "noise": targets["noise"], "realism": targets["realism"]}
    if confidence_note:
        report.notes.append(confidence_note)
    report.header["study"] = (f"Spearman with {args.study.resamples} bootstrap resamples (seed 0); realism = mean "
                              f"distance to the 5 nearest of {len(real)} real training images in FID feature space; "
                              f"drop fractions {', '.join(f'{f:.3g}' for f in DROP_FRACTIONS)} against "
                              f"{args.filtering.subset_seeds} random subsets each")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def note_identical_images(plan: Plan, report) -> None:
    """How many guided samples are bit-identical (as PNGs) to the unguided one of the same seed, and
    which guided sets mostly coincide: guidance on early steps can vanish in x0 clipping."""
    images = {name: plan.stores[name].load_images() for name in ["plain", *GUIDED]}
    same = lambda a, b: int((images[a] == images[b]).flatten(1).all(1).sum())
    for row in report.guidance:
        row["identical_to_unguided"] = same(row["set"], "plain")
    for i, a in enumerate(GUIDED):
        for b in GUIDED[i + 1:]:
            k = same(a, b)
            if k > len(images[a]) // 2:
                report.notes.append(f"{k} of {len(images[a])} samples of {a} and {b} are identical: these two "
                                    f"rules act alike here. With x0 clipping, a change of eps on the early, "
                                    f"high-noise steps acts only through the clipped x0, which both can leave "
                                    f"the same.")


def build_report(args: Namespace, plan: Plan, inputs: ModelInputs, summaries: dict, extractor, real_stats, fabric,
                 command: list[str]):
    from uncdiff.evaluation.experiments import (FeatureFID, FeaturePrecisionRecall, check_variance_scores, cost_rows,
                                    filtering_row, guidance_row, sign_outcome)
    from uncdiff.uncertainty.guidance import UncertaintyGuidance
    from uncdiff.evaluation.report import Report

    module = inputs.module
    clipped = [s.settings for n, s in plan.stores.items() if n != "bayesdiff"]
    any_set = (clipped or [s.settings for s in plan.stores.values()])[0]
    default_sign = inspect.signature(UncertaintyGuidance).parameters["sign"].default
    # a diffusers folder has no training step
    checkpoint = {} if Path(inputs.checkpoint).is_dir() else load_torch(inputs.checkpoint, "checkpoint", mmap=True)
    report = Report(header={
        "checkpoint": f"{inputs.checkpoint} (step {checkpoint.get('global_step', '?')}, sha256 {inputs.sha256[:12]})",
        "data": plan.dataset,
        "FID features": f"{extractor.name}" + (f" (held-out accuracy {extractor.val_accuracy:.3f})"
                                               if hasattr(extractor, "val_accuracy") else ""),
        "sampler": ", ".join(f"{k}={v}" for k, v in any_set["sampler"].items() if k != "clip")
        + " (x0 clipped, except BayesDiff's)",
        "samples per set": f"{args.n} (seeds {args.seed}..{args.seed + args.n - 1}), batch {args.batch_size}",
        "random subsets (seeds)": args.filtering.subset_seeds, "seed groups": args.guidance.seed_groups,
        "M (perturbations / passes)": 5 if args.estimator.M is None else args.estimator.M,
        "default gradient sign": f"{default_sign:+d} (UncertaintyGuidance)",
        "device": f"{device_name(fabric.device)} x {fabric.world_size} process(es)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", *command]),
    }, notes=list(plan.notes))
    fid = FeatureFID(real_stats, fabric.device)
    features = {name: set_features(store, extractor) for name, store in plan.stores.items()}
    drop = drop_fraction(plan.stores)
    report.header["drop fraction"] = f"{drop:.4g}"

    if "filtering" in args.experiments:
        prc, precision_recall = plan.settings["precision_recall"], None
        if prc is not None:
            real = real_features(plan.root, inputs.datamodule, prc["real_images"], extractor)
            report.header["precision / recall"] = f"k = {prc['k']} nearest neighbours, against {len(real)} real " \
                                                  f"training images (random, seed 0), FID features"
            precision_recall = FeaturePrecisionRecall(real, prc["k"], fabric.device)
        for name in args.filtering.estimators:
            store = plan.stores[name]
            scores = store.load_scores()
            row = filtering_row(name, features[name], scores, drop, range(args.filtering.subset_seeds), fid,
                                precision_recall)
            if name == "bayesdiff":
                report.notes.append("BayesDiff's set is sampled without x0 clipping (its variance propagation needs "
                                    "affine DDIM steps) and follows E[x_t], so its images differ from the others'; "
                                    "its random baseline is drawn from its own set.")
                row, invalid = check_variance_scores(row, scores, store.settings["estimator_options"])
                if invalid:
                    report.notes.append(invalid)
            report.filtering.append(row)
        for name in moments_sets(args):  # BayesDiff with the other covariance estimator, same seeds
            scores = plan.stores[name].load_scores()
            row = filtering_row(name, features[name], scores, drop, range(args.filtering.subset_seeds), fid,
                                precision_recall)
            row, invalid = check_variance_scores(row, scores, plan.stores[name].settings["estimator_options"])
            if invalid:
                report.notes.append(f"{name}: {invalid}")
            report.filtering.append(row)
        note_negative_variances(plan, report)
    if "study" in args.experiments:
        run_study(args, plan, inputs, features, extractor, fid, report)
    if "guidance" in args.experiments:
        for name in GUIDED:
            report.guidance.append(guidance_row(name, features[name], features["plain"], args.guidance.seed_groups, fid))
        note_identical_images(plan, report)
        plus, minus = report.guidance[0], report.guidance[1]
        report.sign = sign_outcome(plus, minus, features["guided-gradient-plus"], features["guided-gradient-minus"],
                                   args.guidance.seed_groups, fid)
    if "sweep" in args.experiments:
        run_sweep(args, plan, features, fid, report)
    if "ause" in args.experiments:
        run_sparsification(args, plan, module, inputs.datamodule, report)
    if "cost" in args.experiments:
        sweep = sweep_sets(args)
        report.cost = cost_rows({name: s for name, s in summaries.items() if name not in sweep})
    same = [n for n in ("aleatoric", "mc_dropout") if n in features and "plain" in features]
    for name in same:
        identical = torch.equal(plan.stores[name].load_images(), plan.stores["plain"].load_images())
        report.notes.append(f"The {name} set's images are {'identical to' if identical else 'NOT identical to'} "
                            f"the plain set's (estimation alone never changes a sample).")
    report.notes.append("FIDs of a few hundred or thousand samples are biased upwards: compare numbers within "
                        "one table, not with published 50k-sample FIDs.")
    report.notes.append("Verdicts: a difference counts when it exceeds 2 standard deviations. Filtering: the kept "
                        "set's difference to the random subsets' mean, against 2 std x sqrt(1 + 1/K) of the K "
                        "random subsets' FIDs (the kept set is one more draw), and likewise for precision and "
                        "recall (higher is better); guidance and the sweep: the paired per-group differences' mean "
                        "against 2 standard deviations of those differences. With few groups or subsets the spread is itself uncertain: read the "
                        "verdicts as rough.")
    for name, file in (("aleatoric", "dropped.png"), ("aleatoric", "grid.png")):
        if name in plan.stores and (plan.stores[name].root / file).is_file():
            target = f"{name}_{file}"
            shutil.copyfile(plan.stores[name].root / file, plan.root / target)
            caption = {"dropped.png": "Samples dropped by the aleatoric score (highest first)",
                       "grid.png": "The first samples of the aleatoric set"}[file]
            report.images.append((caption, target))
    return report


def _run(fabric, args: Namespace, inputs: ModelInputs, plan: Plan, info: dict, config: str) -> None:
    from uncdiff.evaluation.fid import datamodule_images, real_feature_stats
    from uncdiff.evaluation.report import write_report

    module = inputs.module.to(fabric.device)
    # the extractor before <out>: a missing Inception download fails with nothing written (it writes
    # only to torch hub's cache, the digits classifier only to --fid.cache)
    extractor = make_fid_extractor(args, plan, module, fabric.device)
    if fabric.is_global_zero:
        create_output_dir(plan.root, plan.settings, info)
        record_config(plan.root, config)
    fabric.barrier()
    if "bayesdiff" in plan.stores:
        attach_laplace(fabric, inputs)
    # the real statistics first: rank 0 makes them, the others wait and read them
    real_stats, _ = real_feature_stats(extractor, plan.dataset, datamodule_images(inputs.datamodule), args.fid.cache)
    summaries = {}
    for name, store in plan.stores.items():
        summaries[name] = generate_run(fabric, module, store, info, progress=args.progress, desc=name, warm_up=True)
    if not fabric.is_global_zero:
        return
    report = build_report(args, plan, inputs, summaries, extractor, real_stats, fabric, info["command"])
    written = write_report(plan.root, report)
    print(f"report: {plan.root / 'report.md'} ({', '.join(p.name for p in written[:-1])} and plots)")
    if args.wandb.enabled:
        print(f"W&B run: {log_to_wandb(plan.root, args.wandb.project, report)}")


def log_to_wandb(out: Path, project: str, report) -> str:
    """The report's tables and plots in a W&B run (offline when W&B can't be reached; see
    uncdiff.lightning.wandb_logger). Returns the run's directory."""
    from uncdiff.evaluation.report import log_report
    from uncdiff.lightning.wandb_logger import WandbLogger

    logger = WandbLogger(save_dir=str(out), project=project, name=f"evaluate-{out.name}")
    log_report(logger, out, report)
    directory = logger.experiment.dir
    logger.finalize("success")
    return directory


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_options(parser, argv)
    try:
        inputs = prepare_model(args, needs_laplace=needs_laplace(args), needs_data=True)
        plan = plan_evaluation(args, inputs)
        make_fabric(args.fabric).launch(_run, args, inputs, plan, run_info(["evaluate", *argv], inputs),
                                        config_yaml(parser, args))
    except InputError as error:  # the checks', and the FID extractor's, which comes before <out> is created
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
