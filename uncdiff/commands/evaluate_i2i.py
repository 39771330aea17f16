"""`uncdiff evaluate_i2i` (= `python train.py evaluate_i2i`): is an image-to-image model's pixel
uncertainty calibrated against its real error? A report on held-out images (docs/algorithms.md §7).

    uncdiff evaluate_i2i --checkpoint runs/inpaint_quickstart/checkpoints/last.ckpt --out eval/inpaint \\
        --n 64 --seed_groups 3 --estimator.M 5

The held-out images are the first `--n` of the run's validation split, with the conditions and masks
its validation builds (the run's saved config says which data and task). For each of `--seed_groups`
groups, each image is restored K = `--samples` times (default M + 1, what the aleatoric estimator with
M perturbations on every step costs); the first sample is the output. The report
(`uncdiff.evaluation.image_to_image.calibration_study`) gives, as mean ± standard deviation over
the groups:

- AUSE / AURG of each estimator's map (`--estimators`: aleatoric with M perturbations, MC-Dropout
  with M passes, BayesDiff with `--bayesdiff.*`) against the real squared error over the generated
  pixels of the output it came with, with the baseline users would try (the per-pixel variance of the
  K samples), a random map and the oracle (the error itself); the differences to the baseline and to
  random, paired by group. BayesDiff runs on the study's DDIM (eta 0) without x0 clipping, with the
  checkpoint's Laplace posterior or one fitted on the first `--bayesdiff.laplace_images` training
  pairs of the run (cached beside the checkpoint, as `sample` caches it);
- L1 and PSNR of the outputs to the ground truth, FID of the outputs against the ground truth
  (`--fid.extractor`), and diversity (mean pairwise SSIM of the K samples of one input);
- with `--guidance.rule gradient | posterior` (and the other `--guidance.*` options): guided versus
  unguided outputs from the same seeds and inputs, L1, PSNR and FID, the guided-minus-unguided
  difference paired by group, with a verdict only beyond 2 standard deviations.

Writes `<out>/report.md`, `<out>/calibration.csv`, `<out>/guidance.csv` (with guidance), `<out>/study.json`, `<out>/panels.png` (condition,
output, ground truth, error and every map for the first `--examples` images) and `<out>/config.yaml`.
One process on one device. Every input is checked before `<out>` is created, and an existing `<out>`
that isn't empty is refused: nothing is overwritten.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ArgumentParser, Namespace

from uncdiff.commands.options import (add_bayesdiff_arguments, add_guidance_arguments, add_sampler_arguments,
                                      config_yaml, new_parser, parse_options, record_config)
from uncdiff.commands.runtime import make_fabric, typed_command
from uncdiff.commands.settings import build_sampler, estimator_hook, guidance_settings, input_error, sampler_settings
from uncdiff.core.samplers import MAX_SEED
from uncdiff.evaluation.image_to_image import calibration_study, guidance_study
from uncdiff.evaluation.image_to_image_report import write_study_report
from uncdiff.io.files import InputError
from uncdiff.io.lock import holds_files, lock_new_folder
from uncdiff.lightning.loading import (file_sha256, image_to_image_data, laplace_source, load_module,
                                       load_or_fit_laplace)
from uncdiff.lightning.palette import restorer
from uncdiff.uncertainty.estimators import VARIANTS, check_count

ESTIMATORS = ("aleatoric", "mc_dropout", "bayesdiff")
ROW_NAMES = {"aleatoric": "aleatoric", "mc_dropout": "MC-Dropout", "bayesdiff": "BayesDiff"}


def build_parser() -> ArgumentParser:
    parser = new_parser("uncdiff evaluate_i2i", __doc__)
    parser.add_argument("--checkpoint", type=str, required=True, help="an image-to-image checkpoint written by `fit`")
    parser.add_argument("--out", type=str, required=True, help="output directory (created; must not hold anything)")
    parser.add_argument("--data.run_config", type=Optional[str], default=None,
                        help="the training run's config (default: the newest config-*.yaml in the checkpoint's run "
                             "directory)")
    add_sampler_arguments(parser, n=64, n_help="held-out images: the first n of the validation split")
    g = parser.add_argument_group("study (docs/algorithms.md §7)")
    g.add_argument("--seed_groups", type=int, default=3, help="seed groups (seed .. seed+groups-1) of the spreads")
    g.add_argument("--samples", type=Optional[int], default=None,
                   help="K samples per input for the variance baseline and diversity (null: M + 1, the same cost)")
    g.add_argument("--estimators", type=list[Literal[ESTIMATORS]], default=list(ESTIMATORS), help="maps to rank")
    g.add_argument("--estimator.M", type=int, default=5, help="perturbations (aleatoric) and passes (MC-Dropout)")
    g.add_argument("--estimator.variant", type=Literal[VARIANTS], default="centered", help="aleatoric map (§3)")
    g.add_argument("--estimator.dropout", type=float, default=0.1, help="MC-Dropout's rate at sampling time")
    g.add_argument("--examples", type=int, default=8, help="rows of panels.png")
    g.add_argument("--fid.extractor", type=Literal["auto", "digits-classifier", "inception", "none"], default="auto",
                   help="FID features (auto: the digits classifier for digits, else Inception; none: no FID)")
    g.add_argument("--fid.inception_weights", type=Optional[str], default=None,
                   help="local Inception weights (torchmetrics' FID network); null: its download cache")
    g.add_argument("--fid.cache", type=str, default="cache", help="where the digits classifier is cached")
    g.add_argument("--fabric.accelerator", type=str, default="auto", help="auto | cpu | gpu | cuda | mps (one device)")
    g.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    add_bayesdiff_arguments(parser)
    add_guidance_arguments(parser)  # rule 'none' (the default): no guidance rows
    return parser


def study_estimators(args: Namespace, m: int, sampler: dict) -> dict:
    """`{row name: (estimator, options)}` of the maps to rank, each checked."""
    if not args.estimators:
        raise InputError("--estimators: name at least one of " + ", ".join(ESTIMATORS))
    if "mc_dropout" in args.estimators and not 0.0 < args.estimator.dropout < 1.0:
        raise InputError(f"--estimator.dropout must lie in (0, 1), got {args.estimator.dropout}")
    if "bayesdiff" in args.estimators and not (sampler["name"] == "ddim" and sampler["eta"] == 0):
        raise InputError("--estimators bayesdiff propagates moments through deterministic DDIM steps: it needs "
                         "--sampler.name ddim with --sampler.eta 0 (it runs without x0 clipping), or drop it from "
                         "--estimators")
    estimators = {}
    for name in args.estimators:
        if name == "aleatoric":
            options = {"num_perturbations": m, "variant": args.estimator.variant}
        elif name == "mc_dropout":
            options = {"num_passes": m, "dropout": args.estimator.dropout}
        else:
            options = {"num_draws": args.bayesdiff.draws, "skip": args.bayesdiff.skip,
                       "moments": args.bayesdiff.moments}
        estimators[ROW_NAMES[name]] = (name, options)
    return estimators


def study_guidance(args: Namespace, m: int) -> dict:
    """`{row name: ('aleatoric', options, guidance)}` of `--guidance.rule` (empty for 'none'), checked."""
    guide = args.guidance
    if guide.rule == "none":
        return {}
    if guide.table is not None:
        raise InputError("--guidance.table: threshold tables are calibrated on unconditional models; use the "
                         "per-image --guidance.quantile")
    guidance = guidance_settings(guide)
    name = f"gradient, sign {guide.sign:+d}, lam {guide.lam:g}" if guide.rule == "gradient" else \
        f"posterior, prior precision {guide.prior_precision}"
    return {name: ("aleatoric", {"num_perturbations": m, "variant": args.estimator.variant}, guidance)}


def study_plan(args: Namespace) -> dict:
    """Everything the study runs with (recorded in study.json), every option checked; loads the
    checkpoint and builds the held-out pairs. Writes nothing."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or holds_files(out)):
        raise InputError(f"--out {out} exists and is not an empty folder; evaluate_i2i never overwrites (choose "
                         f"another --out)")
    checkpoint = Path(args.checkpoint)
    module = load_module(checkpoint, image_to_image=True)
    data, config = image_to_image_data(module, checkpoint, args.data.run_config)
    try:
        m = check_count("--estimator.M", args.estimator.M, 2)
    except ValueError as error:
        raise InputError(str(error)) from None
    k = m + 1 if args.samples is None else args.samples
    if k < 2:
        raise InputError(f"--samples must be >= 2 (the baseline's variance, the diversity), got {k}")
    if args.seed_groups < 1 or args.examples < 0:
        raise InputError("--seed_groups must be >= 1 and --examples >= 0")
    if args.seed < 0 or (args.seed + args.seed_groups) * k * args.n > MAX_SEED or args.batch_size < 1:
        raise InputError(f"group g's sample j of image i has seed (g K + j) n + i: --seed {args.seed} with "
                         f"--seed_groups {args.seed_groups} needs seeds beyond [0, 2**32), or --batch_size < 1")
    sampler = sampler_settings(args.sampler, module, "aleatoric")
    try:
        build_sampler(module, sampler)
    except ValueError as error:
        raise input_error("sampler", error) from None
    estimators = study_estimators(args, m, sampler)
    guided = study_guidance(args, m)
    for name, (estimator, options, *guidance) in [*estimators.items(), *guided.items()]:
        try:
            estimator_hook(module, estimator, options, guidance[0] if guidance else None)
        except ValueError as error:
            raise input_error(name, error) from None
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
            "mask": mask if module.task.masked else None,
            "record": {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint),
                       "run_config": str(config.resolve()), "task": module.task.name, "held_out": args.n,
                       "samples": k, "M": m, "estimators": estimators, "guidance": guided, "laplace": laplace,
                       "sampler": sampler,
                       "seed_groups": list(range(args.seed, args.seed + args.seed_groups)),
                       "fid_extractor": extractor, "batch_size": args.batch_size}}


def run_study(args: Namespace, plan: dict, fabric) -> tuple[dict, Optional[dict], float]:
    """The calibration study and, with a guidance rule, the guidance study, on `fabric`'s device:
    `(study, guided study or None, seconds)`."""
    record, module = plan["record"], plan["module"]
    fid = None
    if record["fid_extractor"] != "none":
        from uncdiff.evaluation.fid import fid_between, make_extractor

        options = ({"image_size": module.hparams.image_size, "cache_dir": args.fid.cache}
                   if record["fid_extractor"] == "digits-classifier" else {"weights_path": args.fid.inception_weights})
        extractor = make_extractor(record["fid_extractor"], **options).to(fabric.device)
        fid = lambda a, b: fid_between(a.to(fabric.device), b.to(fabric.device), extractor)
    sampler = dict(record["sampler"])
    restore = restorer(module, sampler=sampler.pop("name"), steps=sampler.pop("steps"),
                       batch_size=args.batch_size, progress=args.progress, **sampler)
    progress = lambda message: print(f"evaluate_i2i: {message}", flush=True)
    inputs = (restore, plan["x0"], plan["condition"], plan["mask"])
    start = time.perf_counter()
    study = calibration_study(*inputs, record["estimators"], num_samples=record["samples"],
                              seed_groups=record["seed_groups"], fid=fid, keep_examples=min(args.examples, args.n),
                              progress=progress)
    guided = None
    if record["guidance"]:
        guided = guidance_study(*inputs, record["guidance"], num_samples=record["samples"],
                                seed_groups=record["seed_groups"], fid=fid, progress=progress)
    return study, guided, time.perf_counter() - start


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_options(parser, argv)
    try:
        plan = study_plan(args)
        lock = lock_new_folder(args.out)  # held until main returns: no other run writes there meanwhile
        fabric = make_fabric(Namespace(accelerator=args.fabric.accelerator, devices=1, num_nodes=1, strategy="auto"))
    except InputError as error:
        sys.exit(f"error: {error}")
    record = {**plan["record"], "command": typed_command(["evaluate_i2i", *argv])}
    module = plan["module"].to(fabric.device)
    if record["laplace"] is not None:  # BayesDiff: the checkpoint's posterior, its cache, or a fit on training pairs
        load_or_fit_laplace(module, Path(args.checkpoint), record["checkpoint_sha256"], record["laplace"],
                            plan["data"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_config(out, config_yaml(parser, args))
    study, guided, seconds = run_study(args, plan, fabric)
    written = write_study_report(out, study, record, seconds, str(fabric.device), guided)
    print(f"wrote {out / 'report.md'} ({seconds / 60:.1f} minutes): {', '.join(written[:-1])}")


if __name__ == "__main__":
    main()
