"""`uncdiff evaluate` (= `python train.py evaluate`): the paper's experiments on one checkpoint,
written as a report.

    uncdiff evaluate --checkpoint runs/quickstart/checkpoints/last.ckpt --out eval/quick --n 1000

(a) filtering: FID, and improved precision / recall (k = 5, against --filtering.prc_real training
images), of the set kept by each of --estimators' scores versus random subsets (mean ± std over
--filtering.subset_seeds; the default estimators are aleatoric, mc_dropout and bayesdiff, and the
peers' sample-level scores x0_trajectory and generative join when named, generative scored in the
FID extractor's features, the dataset's feature space, or in pixels where no FID is computed); (b)
guided versus unguided FID from the same seeds, for the gradient rule with both signs and the
posterior rule, over --seed_groups; (c) AUSE / AURG of the aleatoric
and MC-Dropout maps; (d) network evaluations and seconds per image of each method; (e) the
per-sample study (docs/algorithms.md §6b) on the filtering sets, without sampling again: Spearman
correlations of each score variant and window with |x_T|^2, realism and classifier confidence, and
kept-set FID curves over drop fractions. Not run by default, as it is expensive: `sweep`, guided
versus unguided FID over a grid of guidance strengths (--sweep.lams for each --sweep.grad_wrt,
--sweep.prior_precisions), paired with the first --sweep.n samples of the unguided set, mean ± std
over --sweep.seed_groups. Not run by default, for a model trained on the shapes testbed only:
`detection` (docs/algorithms.md §6c), each estimator's samples (aleatoric, MC-Dropout, BayesDiff,
x0_trajectory, generative) labelled by the shapes checker, with AUROC / AUPRC of its score at
finding the invalid ones, the fractions removed and kept at 90 % and 95 % retention, and its cost,
beside a random score; and the invalid rates of the plain and guided sets (and of the sweep's, with
`sweep`) on the same seeds, by the exact McNemar test; alone it computes no FID. The sets and sections are
`uncdiff.evaluation.sample_sets` and `uncdiff.evaluation.sections`.

Each sample set is an `uncdiff sample` run in <out>/sets/<name> (so all processes generate it,
and a re-run resumes it); then rank 0 extracts FID features once per set (cached next to it) and
once for the real images of precision / recall (cached in <out>/sets/real), computes the
experiments and writes <out>/report.md, one CSV per experiment and the plots, and logs the
tables to W&B with --wandb.enabled true. Every input is checked before <out> is created; <out>
records the full config as config.yaml.
"""

import sys
from pathlib import Path
from typing import Literal, Optional, Union

from jsonargparse import ArgumentParser, Namespace

from uncdiff.commands.options import (add_estimator_arguments, add_guidance_arguments, add_model_arguments,
                                      add_sampler_arguments, config_yaml, new_parser, parse_options, record_config)
from uncdiff.commands.runtime import (ModelInputs, attach_laplace, generate_run, make_fabric, prepare_model,
                                      run_info)
from uncdiff.commands.settings import build_sampler, build_settings, estimator_hook
from uncdiff.evaluation.evaluate_report import build_report
from uncdiff.evaluation.experiments import PRC_NEIGHBOURS
from uncdiff.evaluation.fid import datamodule_images, make_extractor, real_feature_stats
from uncdiff.evaluation.option_checks import check_ause_window, check_options
from uncdiff.evaluation.report import Report, log_report, write_report
from uncdiff.evaluation.sample_sets import (DETECTION_ESTIMATORS, EXPERIMENTS, FILTERING_ESTIMATORS,
                                           OPTIONAL_EXPERIMENTS, Plan, needs_fid, needs_laplace, set_names,
                                           set_overrides)
from uncdiff.evaluation.sections import drop_fraction
from uncdiff.io.files import InputError
from uncdiff.io.lock import lock_and_check
from uncdiff.io.sample_store import SampleStore, check_output_dir, create_output_dir
from uncdiff.io.space import check_free_space, evaluation_files
from uncdiff.lightning.data import DigitsDataModule, ShapesDataModule, dataset_key
from uncdiff.uncertainty.spec import LAPLACE_ESTIMATORS, EstimatorSpec


def build_parser() -> ArgumentParser:
    parser = new_parser("uncdiff evaluate", __doc__)
    add_model_arguments(parser, "output directory of the report and its sample sets (a re-run resumes)")
    g = parser.add_argument_group("experiments")
    g.add_argument("--experiments", type=Literal[EXPERIMENTS + OPTIONAL_EXPERIMENTS], nargs="+",
                   default=list(EXPERIMENTS), help=f"which to run (not by default: {', '.join(OPTIONAL_EXPERIMENTS)})")
    g.add_argument("--estimators", type=list[Literal[DETECTION_ESTIMATORS]], default=list(FILTERING_ESTIMATORS),
                   help="estimators whose scores the filtering experiment and the study rank (the peers' "
                        "sample-level scores, x0_trajectory and generative, when named; generative in the FID "
                        "features)")
    g.add_argument("--filtering.subset_seeds", type=int, default=20,
                   help="random subsets per filtering FID and precision / recall")
    g.add_argument("--filtering.prc_real", type=Optional[int], default=None,
                   help="real training images (a random subset) that filtering's precision / recall compare with "
                        "(null: min(n, 10000); 0 skips precision / recall)")
    g.add_argument("--study.resamples", type=int, default=1000,
                   help="bootstrap resamples of each Spearman interval of the per-sample study and of each "
                        "detection interval (>= 1000)")
    g.add_argument("--seed_groups", type=int, default=3, help="seed groups the guided/unguided FIDs are repeated over")
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
    g.add_argument("--fid.cache", type=str, default="cache", help="cache of real statistics")
    g = parser.add_argument_group("logging")
    g.add_argument("--wandb.enabled", type=bool, default=False, help="also log the report's tables and plots to W&B")
    g.add_argument("--wandb.project", type=str, default="uncdiff-evaluate", help="W&B project")
    add_sampler_arguments(parser, n=1000, steps=20)
    add_estimator_arguments(parser, choose=False)
    add_guidance_arguments(parser, choose=False)
    return parser


# ------------------------------------------------------------------------------------------ plan

def set_arguments(args: Namespace, name: str, dropout: float, features: str = "pixels") -> Namespace:
    """The options of a `sample` run of the set `name` (`features`: the generative set's)."""
    set_args = args.clone()
    for key, value in set_overrides(args, name, dropout, features).items():
        set_args[key] = value
    return set_args


def plan_evaluation(args: Namespace, inputs: ModelInputs) -> Plan:
    """Check every option and build the settings of the run and of each sample set. Writes nothing."""
    prc_real = check_options(args)
    digits = isinstance(inputs.datamodule, DigitsDataModule)
    extractor = args.fid.extractor if args.fid.extractor != "auto" else ("digits-classifier" if digits else "inception")
    if extractor == "digits-classifier" and not digits:
        raise InputError("--fid.extractor digits-classifier is for models of the digits data")
    shapes = isinstance(inputs.datamodule, ShapesDataModule)
    if "detection" in args.experiments and not shapes:
        raise InputError(f"--experiments detection labels samples with the shapes checker: it needs a model trained on "
                         f"the shapes data (configs/shapes.yaml), not {type(inputs.datamodule).__name__}")
    if shapes and needs_fid(args, shapes):
        raise InputError(f"--experiments {' '.join(args.experiments)}: the shapes testbed has no FID features, its "
                         f"samples are judged by the checker: run detection (with sweep for the guidance strength "
                         f"sweep), ause or cost")
    if shapes and "sweep" in args.experiments and "detection" not in args.experiments:
        raise InputError("--experiments sweep: on the shapes testbed the checker judges the sweep's sets within "
                         "detection: add detection")
    notes, dropout = [], args.estimator.dropout
    if dropout is None:
        dropout = inputs.module.hparams.dropout or 0.1
        if not inputs.module.hparams.dropout:
            notes.append("The model was trained without dropout; MC-Dropout ran with rate 0.1 (set "
                         "--estimator.dropout).")
    root = Path(args.out)
    features = extractor if needs_fid(args, shapes) else "pixels"  # the generative score's feature space
    stores = {name: SampleStore(root / "sets" / name, build_settings(
        set_arguments(args, name, dropout, features), inputs.module, inputs.sha256,
        inputs.laplace if name in LAPLACE_ESTIMATORS else None, save_maps=args.save_maps)) for name in set_names(args)}
    ause = {}
    if "ause" in args.experiments:
        for name in ("aleatoric", "mc_dropout"):
            ause[name] = stores[name].settings if name in stores else \
                build_settings(set_arguments(args, name, dropout), inputs.module, inputs.sha256, None)
            check_ause_window(ause[name])
    hooks = {name: estimator_hook(inputs.module, EstimatorSpec(**s["estimator"])) for name, s in ause.items()}
    sampler = build_sampler(inputs.module, ause["aleatoric"]["sampler"]) if ause else None
    kept = args.n - round(drop_fraction(stores) * args.n)
    if "filtering" in args.experiments and prc_real and kept <= PRC_NEIGHBOURS:
        raise InputError(f"filtering keeps {kept} of --n {args.n} samples; precision / recall need more than "
                         f"{PRC_NEIGHBOURS}")
    dataset = dataset_key(inputs.datamodule, inputs.module.image_shape, "train")
    settings = {"format": 1, "checkpoint_sha256": inputs.sha256, "experiments": sorted(args.experiments),
                "sets": {name: s.settings for name, s in stores.items()},
                "subset_seeds": args.filtering.subset_seeds, "seed_groups": args.seed_groups,
                "precision_recall": {"real_images": prc_real, "k": PRC_NEIGHBOURS} if prc_real else None,
                "ause": {"images": args.ause.images, "fractions": args.ause.fractions},
                "fid": {"extractor": extractor, "dataset": dataset} if needs_fid(args, shapes) else None}
    if "sweep" in args.experiments:
        settings["sweep_seed_groups"] = args.sweep.seed_groups
    check_free_space(root, evaluation_files(stores, inputs.module.image_shape, prc_real))
    lock, _ = lock_and_check(root, lambda: check_output_dir(root, settings))  # no other run writes there now
    for store in stores.values():
        store.check(lock=False)  # inside the locked <out>
    return Plan(root, settings, stores, extractor, dataset, notes, ause, hooks, sampler, lock)


# --------------------------------------------------------------------------------------- running

def make_fid_extractor(args: Namespace, plan: Plan, module, device):
    if plan.extractor == "inception":
        try:
            extractor = make_extractor("inception", weights_path=args.fid.inception_weights)
        except FileNotFoundError as error:
            raise InputError(f"{error} For `uncdiff evaluate`, pass the file as --fid.inception_weights PATH.") \
                from None
    else:
        extractor = make_extractor("digits-classifier", image_size=module.hparams.image_size)  # shipped weights
    return extractor.to(device)


def _run(fabric, args: Namespace, inputs: ModelInputs, plan: Plan, info: dict, config: str) -> None:
    module = inputs.module.to(fabric.device)
    # the extractor before <out>: a missing Inception download fails with nothing written (it writes
    # only to torch hub's cache; the digits classifier's weights ship with the package)
    try:
        extractor = make_fid_extractor(args, plan, module, fabric.device) if plan.settings["fid"] else None
    except InputError:
        if plan.lock is not None:
            plan.lock.abandon()  # nothing is written yet: leave no <out> behind
        raise
    if fabric.is_global_zero:
        create_output_dir(plan.root, plan.settings, info)
        record_config(plan.root, config)
    fabric.barrier()
    if any(name in plan.stores for name in LAPLACE_ESTIMATORS):
        attach_laplace(fabric, inputs)
    # the real statistics first: rank 0 makes them, the others wait and read them
    real_stats = None if extractor is None else \
        real_feature_stats(extractor, plan.dataset, datamodule_images(inputs.datamodule), args.fid.cache)[0]
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


def log_to_wandb(out: Path, project: str, report: Report) -> str:
    """The report's tables and plots in a W&B run (offline when W&B can't be reached; see
    uncdiff.lightning.wandb_logger). Returns the run's directory."""
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
        make_fabric(args.fabric).launch(_run, args, inputs, plan, run_info(["evaluate", *argv], inputs.checkpoint),
                                        config_yaml(parser, args))
    except InputError as error:  # the checks', and the FID extractor's, which comes before <out> is created
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
