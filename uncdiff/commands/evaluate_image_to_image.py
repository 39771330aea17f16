"""`uncdiff evaluate_image_to_image` (= `python train.py evaluate_image_to_image`): is an image-to-image model's pixel
uncertainty calibrated against its real error? A report on held-out images (docs/algorithms.md §7).

    uncdiff evaluate_image_to_image --checkpoint runs/inpaint_quickstart/checkpoints/last.ckpt --out eval/inpaint \\
        --n 64 --seed_groups 3 --estimator.M 5

The held-out images are the first `--n` of the run's validation split, with the conditions and masks
its validation builds (the run's saved config says which data and task). For each of `--seed_groups`
groups, each image is restored once (the output) and K = `--samples` more times with other seeds
(default M: beyond the output, what the aleatoric estimator with M perturbations on every step costs),
so the baseline's spread never sees the output it is judged against. The report
(`uncdiff.evaluation.image_to_image.calibration_study`) gives, as mean ± standard deviation over
the groups:

- AUSE / AURG of each estimator's map (`--estimators`: aleatoric with M perturbations, MC-Dropout
  with M passes, BayesDiff with `--estimator.draws`, `skip`, `moments`) against the real squared error over the generated
  pixels of the output it came with, with the baseline users would try (the per-pixel variance of the
  K independent samples), a random map and the oracle (the error itself); the differences to the baseline and to
  random, paired by group. BayesDiff runs on the study's DDIM (eta 0) without x0 clipping, with the
  checkpoint's Laplace posterior or one fitted on the first `--bayesdiff.laplace_images` training
  pairs of the run (cached beside the checkpoint, as `sample` caches it);
- L1 and PSNR of the outputs to the ground truth, FID of the outputs against the ground truth
  (`--fid.extractor`), and diversity (mean pairwise SSIM of the K samples of one input);
- guaranteed intervals (`--intervals.*`, docs/algorithms.md §8): each heuristic (the spread of K = 2, 4,
  8 of the K samples, each estimator's map, a constant map) calibrated at the same (alpha, delta) on
  random calibration/test splits of the held-out images: test risk, violations, interval length, cost;
- with `--guidance.rule gradient | posterior` (and the other `--guidance.*` options): guided versus
  unguided outputs from the same seeds and inputs, L1, PSNR and FID, the guided-minus-unguided
  difference paired by group, with a verdict only beyond 2 standard deviations.

Writes `<out>/report.md`, `<out>/calibration.csv`, `<out>/intervals.csv`, `<out>/guidance.csv` (with guidance), `<out>/study.json`, `<out>/panels.png` (condition,
output, ground truth, error and every map for the first `--examples` images) and `<out>/config.yaml`.
One process on one device. Every input is checked before `<out>` is created, and an existing `<out>`
that isn't empty is refused: nothing is overwritten.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ArgumentParser, Namespace

from uncdiff.commands.options import (add_guidance_arguments, add_laplace_arguments, add_sampler_arguments,
                                      config_yaml, new_parser, parse_options, record_config)
from uncdiff.commands.runtime import make_fabric, typed_command
from uncdiff.commands.settings import build_sampler, estimator_hook, input_error, spec
from uncdiff.core.samplers import MAX_SEED
from uncdiff.evaluation.image_to_image import calibration_study, guidance_study
from uncdiff.evaluation.image_to_image_report import write_study_report
from uncdiff.evaluation.intervals import interval_settings, interval_study, study_heuristics
from uncdiff.io.files import InputError
from uncdiff.io.lock import holds_files, lock_new_folder
from uncdiff.io.space import check_free_space, image_to_image_report_files
from uncdiff.lightning.loading import (file_sha256, image_to_image_data, laplace_source, load_module,
                                       load_or_fit_laplace)
from uncdiff.lightning.image_to_image import restorer
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

ESTIMATORS = ("aleatoric", "mc_dropout", "bayesdiff")
ROW_NAMES = {"aleatoric": "aleatoric", "mc_dropout": "MC-Dropout", "bayesdiff": "BayesDiff"}


def build_parser() -> ArgumentParser:
    parser = new_parser("uncdiff evaluate_image_to_image", __doc__)
    parser.add_argument("--checkpoint", type=str, required=True, help="an image-to-image checkpoint written by `fit`")
    parser.add_argument("--out", type=str, required=True, help="output directory (created; must not hold anything)")
    parser.add_argument("--data.run_config", type=Optional[str], default=None,
                        help="the training run's config (default: the newest config-*.yaml in the checkpoint's run "
                             "directory)")
    add_sampler_arguments(parser, n=64, n_help="held-out images: the first n of the validation split")
    g = parser.add_argument_group("study (docs/algorithms.md §7)")
    g.add_argument("--seed_groups", type=int, default=3, help="seed groups (seed .. seed+groups-1) of the spreads")
    g.add_argument("--samples", type=Optional[int], default=None,
                   help="K samples per input, besides the output, for the variance baseline and diversity (null: M, "
                        "the same cost)")
    g.add_argument("--estimators", type=list[Literal[ESTIMATORS]], default=list(ESTIMATORS), help="maps to rank")
    g.add_argument("--examples", type=int, default=8, help="rows of panels.png")
    g.add_argument("--fid.extractor", type=Literal["auto", "digits-classifier", "inception", "none"], default="auto",
                   help="FID features (auto: the digits classifier for digits, else Inception; none: no FID)")
    g.add_argument("--fid.inception_weights", type=Optional[str], default=None,
                   help="local Inception weights (torchmetrics' FID network); null: its download cache")
    g.add_argument("--fid.cache", type=str, default="cache", help="where the digits classifier is cached")
    g.add_argument("--fabric.accelerator", type=str, default="auto", help="auto | cpu | gpu | cuda | mps (one device)")
    g.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    g = parser.add_argument_group("guaranteed intervals (docs/algorithms.md §8), on the first seed group")
    g.add_argument("--intervals.splits", type=int, default=20, help="random calibration/test splits (0: no study)")
    g.add_argument("--intervals.alpha", type=float, default=0.1, help="risk level: the fraction of missed pixels")
    g.add_argument("--intervals.delta", type=float, default=0.1, help="error probability of the guarantee")
    g.add_argument("--intervals.calibration_images", type=Optional[int], default=None,
                   help="calibration images per split (null: half of --n; the rest are test images)")
    g.add_argument("--intervals.spread_sizes", type=Optional[list[int]], default=None,
                   help="the K of the K-sample spreads (null: 2, 4, 8 up to --samples)")
    parser.add_class_arguments(EstimatorSpec, "estimator", skip={"name", "reference", "score", "keep_maps"},
                               help="the estimators of --estimators (docs/algorithms.md §3, §5)")
    parser.set_defaults({"estimator.dropout": 0.1})  # MC-Dropout's rate at sampling time
    add_laplace_arguments(parser)
    add_guidance_arguments(parser)  # rule 'none' (the default): no guidance rows
    return parser


def study_estimators(args: Namespace, sampler: SamplerSpec) -> dict:
    """`{row name: EstimatorSpec}` of the maps to rank, each checked."""
    if not args.estimators:
        raise InputError("--estimators: name at least one of " + ", ".join(ESTIMATORS))
    if "bayesdiff" in args.estimators and not (sampler.name == "ddim" and sampler.eta == 0):
        raise InputError("--estimators bayesdiff propagates moments through deterministic DDIM steps: it needs "
                         "--sampler.name ddim with --sampler.eta 0 (it runs without x0 clipping), or drop it from "
                         "--estimators")
    return {ROW_NAMES[name]: spec(EstimatorSpec, {**args.estimator.as_dict(), "name": name})
            for name in args.estimators}


def study_guidance(args: Namespace) -> dict:
    """`{row name: (EstimatorSpec, GuidanceSpec)}` of `--guidance.rule` (empty for 'none'), checked."""
    guidance = spec(GuidanceSpec, args.guidance)
    if not guidance.enabled:
        return {}
    if args.guidance_table is not None:
        raise InputError("--guidance_table: threshold tables are calibrated on unconditional models; use the "
                         "per-image --guidance.quantile")
    name = f"gradient, sign {guidance.sign:+d}, lam {guidance.lam:g}" if guidance.rule == "gradient" else \
        f"posterior, prior precision {guidance.prior_precision}"
    return {name: (spec(EstimatorSpec, {**args.estimator.as_dict(), "name": "aleatoric"}), guidance)}


def study_plan(args: Namespace) -> dict:
    """Everything the study runs with (recorded in study.json), every option checked; loads the
    checkpoint and builds the held-out pairs. Writes nothing."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or holds_files(out)):
        raise InputError(f"--out {out} exists and is not an empty folder; evaluate_image_to_image never overwrites (choose "
                         f"another --out)")
    checkpoint = Path(args.checkpoint)
    module = load_module(checkpoint, image_to_image=True)
    data, config = image_to_image_data(module, checkpoint, args.data.run_config)
    m = spec(EstimatorSpec, {**args.estimator.as_dict(), "name": "aleatoric"}).M
    k = m if args.samples is None else args.samples
    if k < 2:
        raise InputError(f"--samples must be >= 2 (the baseline's variance, the diversity), got {k}")
    if args.seed_groups < 1 or args.examples < 0:
        raise InputError("--seed_groups must be >= 1 and --examples >= 0")
    if args.seed < 0 or (args.seed + args.seed_groups) * (k + 1) * args.n > MAX_SEED or args.batch_size < 1:
        raise InputError(f"group g's restoration j of image i has seed (g (K + 1) + j) n + i: --seed {args.seed} with "
                         f"--seed_groups {args.seed_groups} needs seeds beyond [0, 2**32), or --batch_size < 1")
    try:
        sampler = module.resolve_sampler(spec(SamplerSpec, args.sampler))
        build_sampler(module, sampler.settings())
    except ValueError as error:
        raise input_error("sampler", error) from None
    estimators, guided = study_estimators(args, sampler), study_guidance(args)
    for name, (estimator, *guidance) in [*((n, (e,)) for n, e in estimators.items()), *guided.items()]:
        try:
            estimator_hook(module, estimator, guidance[0] if guidance else None, sampler.steps)
        except ValueError as error:
            raise input_error(name, error) from None
    try:
        intervals = None if args.intervals.splits == 0 else interval_settings(
            args.intervals.alpha, args.intervals.delta, args.intervals.splits, args.n,
            args.intervals.calibration_images, args.intervals.spread_sizes, k)
    except ValueError as error:
        raise InputError(str(error)) from None
    laplace = laplace_source(module, args.bayesdiff.laplace_images) if "BayesDiff" in estimators \
        else None
    try:
        data.prepare_data()
        data.setup("fit")
        x0, condition, mask = data.held_out(args.n)
    except ValueError as error:
        raise input_error("--n", error) from None
    digits = type(data.data).__name__ == "DigitsDataModule"
    extractor = args.fid.extractor if args.fid.extractor != "auto" else ("digits-classifier" if digits else "inception")
    if extractor == "digits-classifier" and not digits:
        raise InputError("--fid.extractor digits-classifier is for models of the digits data")
    return {"module": module, "data": data, "x0": x0, "condition": condition,
            "mask": mask if module.task.masked else None, "estimators": estimators, "guided": guided,
            "record": {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint),
                       "run_config": str(config.resolve()), "task": module.task.name, "held_out": args.n,
                       "samples": k, "M": m, "estimators": {name: e.settings() for name, e in estimators.items()},
                       "guidance": {name: g.settings() for name, (_, g) in guided.items()}, "laplace": laplace,
                       "sampler": sampler.settings(),
                       "seed_groups": list(range(args.seed, args.seed + args.seed_groups)),
                       "fid_extractor": extractor, "batch_size": args.batch_size, "intervals": intervals}}


def run_study(args: Namespace, plan: dict, fabric) -> tuple[dict, Optional[dict], Optional[dict], float]:
    """The calibration study, the interval study on its first group, and with a guidance rule the
    guidance study, on `fabric`'s device: `(study, interval study or None, guided study or None, seconds)`."""
    record, module = plan["record"], plan["module"]
    fid = None
    if record["fid_extractor"] != "none":
        from uncdiff.evaluation.fid import fid_between, make_extractor

        options = ({"image_size": module.hparams.image_size, "cache_dir": args.fid.cache}
                   if record["fid_extractor"] == "digits-classifier" else {"weights_path": args.fid.inception_weights})
        extractor = make_extractor(record["fid_extractor"], **options).to(fabric.device)
        fid = lambda a, b: fid_between(a.to(fabric.device), b.to(fabric.device), extractor)
    # the options as given, not the record's resolved sampler: BayesDiff's row resolves them without clipping
    restore = restorer(module, sampler=spec(SamplerSpec, args.sampler), batch_size=args.batch_size,
                       progress=args.progress)
    progress = lambda message: print(f"evaluate_image_to_image: {message}", flush=True)
    inputs = (restore, plan["x0"], plan["condition"], plan["mask"])
    start = time.perf_counter()
    study = calibration_study(*inputs, plan["estimators"], num_samples=record["samples"],
                              seed_groups=record["seed_groups"], fid=fid, keep_examples=min(args.examples, args.n),
                              keep_first_group=record["intervals"] is not None, progress=progress)
    intervals = None
    if record["intervals"] is not None:
        settings = record["intervals"]
        heuristics = study_heuristics(study.pop("first_group"), settings["spread_sizes"], plan["mask"])
        intervals = interval_study(plan["x0"], plan["mask"], heuristics, settings["alpha"], settings["delta"],
                                   settings["splits"], settings["calibration_images"], seed=record["seed_groups"][0])
    guided = None
    if plan["guided"]:
        guided = guidance_study(*inputs, plan["guided"], num_samples=record["samples"],
                                seed_groups=record["seed_groups"], fid=fid, progress=progress)
    return study, intervals, guided, time.perf_counter() - start


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_options(parser, argv)
    try:
        plan = study_plan(args)
        check_free_space(args.out, image_to_image_report_files(min(args.examples, args.n), len(plan["estimators"])))
        lock = lock_new_folder(args.out)  # held until main returns: no other run writes there meanwhile
        fabric = make_fabric(Namespace(accelerator=args.fabric.accelerator, devices=1, num_nodes=1, strategy="auto"))
    except InputError as error:
        sys.exit(f"error: {error}")
    record = {**plan["record"], "command": typed_command(["evaluate_image_to_image", *argv])}
    module = plan["module"].to(fabric.device)
    if record["laplace"] is not None:  # BayesDiff: the checkpoint's posterior, its cache, or a fit on training pairs
        load_or_fit_laplace(module, Path(args.checkpoint), record["checkpoint_sha256"], record["laplace"],
                            plan["data"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_config(out, config_yaml(parser, args))
    study, intervals, guided, seconds = run_study(args, plan, fabric)
    written = write_study_report(out, study, record, seconds, str(fabric.device), guided, intervals)
    print(f"wrote {out / 'report.md'} ({seconds / 60:.1f} minutes): {', '.join(written[:-1])}")


if __name__ == "__main__":
    main()
