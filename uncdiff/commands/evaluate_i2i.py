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

import csv
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import ArgumentParser, Namespace

from uncdiff.commands.common import (InputError, _error, add_bayesdiff_arguments, add_guidance_arguments,
                                     add_sampler_arguments, build_sampler, config_yaml, estimator_hook, file_sha256,
                                     guidance_settings, image_to_image_data, laplace_source, load_or_fit_laplace,
                                     make_fabric, new_parser, parse_options, sampler_settings)
from uncdiff.core.samplers import MAX_SEED
from uncdiff.evaluation.image_to_image import (calibration_markdown, calibration_rows, calibration_study, draw_panels,
                                               guidance_csv_rows, guidance_markdown, guidance_study, paired_difference)
from uncdiff.io.files import write_atomic
from uncdiff.lightning.palette import load_conditional, restorer
from uncdiff.uncertainty.bayesdiff import OLD_MOMENT_NAMES
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
                       "moments": OLD_MOMENT_NAMES.get(args.bayesdiff.moments, args.bayesdiff.moments)}
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
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty folder; evaluate_i2i never overwrites (choose "
                         f"another --out)")
    checkpoint = Path(args.checkpoint)
    module = load_conditional(checkpoint)
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
        raise _error("sampler", error) from None
    estimators = study_estimators(args, m, sampler)
    guided = study_guidance(args, m)
    for name, (estimator, options, *guidance) in [*estimators.items(), *guided.items()]:
        try:
            estimator_hook(module, estimator, options, guidance[0] if guidance else None)
        except ValueError as error:
            raise _error(name, error) from None
    laplace = laplace_source(module, checkpoint, args.bayesdiff.laplace_images) if "BayesDiff" in estimators \
        else None
    try:
        data.prepare_data()
        data.setup("fit")
        x0, condition, mask = data.held_out(args.n)
    except ValueError as error:
        raise _error("--n", error) from None
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


def machine() -> str:
    cpu = " ".join(part for part in (platform.machine(), platform.processor()) if part)
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s)"


def report_markdown(study: dict, record: dict, seconds: float, device: str, guided: Optional[dict] = None) -> str:
    """report.md: what ran, the tables, the paired differences, guidance (`guided`: `guidance_study`'s) and
    the panels."""
    sampler = record["sampler"]
    lines = ["# Image-to-image: uncertainty against the real error", "",
             f"Checkpoint `{record['checkpoint']}` (task `{record['task']}`), {record['held_out']} held-out "
             f"validation images with the pairs of the run's validation, {sampler['steps']} {sampler['name']} "
             f"steps, K = {record['samples']} samples per input, M = {record['M']}, seed groups "
             f"{record['seed_groups']}. {seconds / 60:.1f} minutes on {device} ({machine()}).", "",
             f"Command: `{' '.join(record['command'])}`", "",
             "AUSE / AURG rank the output's squared error over the generated pixels by each map "
             "(docs/algorithms.md §6, §7); the output is the first of the K samples"
             + (" (BayesDiff's: its own mean trajectory from the same noise, DDIM without x0 clipping, "
                f"Laplace posterior from {laplace_text(record['laplace'])})" if record.get("laplace") else "")
             + ".", "",
             calibration_markdown(study), "", "## Paired differences (per seed group, same outputs)", "",
             "| map | AUSE minus K-sample variance's | AUSE minus random's | beats the baseline by > 2 std | "
             "beats random by > 2 std |", "|---|---|---|---|---|"]
    fmt = lambda pair: f"{pair[0]:+.4f} ± {pair[1]:.4f}"
    if study["groups"] < 2:
        beats = lambda pair: "n/a (one group)"
    else:
        beats = lambda pair: "yes" if pair[0] + 2 * pair[1] < 0 else "no"
    for name in [*record["estimators"], "K-sample variance"]:
        vs_k = paired_difference(study, name, "K-sample variance")
        vs_random = paired_difference(study, name, "random")
        k_cells = ("—", "—") if name == "K-sample variance" else (fmt(vs_k), beats(vs_k))
        lines.append(f"| {name} | {k_cells[0]} | {fmt(vs_random)} | {k_cells[1]} | {beats(vs_random)} |")
    lines += ["", "With few seed groups the standard deviations are rough; lower AUSE is better.", ""]
    if guided is not None:
        lines += ["## Guidance (guided versus unguided, same seeds and inputs)", "",
                  "The unguided output is the study's output; the guided one starts from the same noise "
                  "(docs/algorithms.md §4). A verdict needs the paired difference beyond 2 standard deviations.", "",
                  guidance_markdown(guided), ""]
    if "examples" in study:
        lines += ["## Panels", "", "Condition, output, ground truth, squared error, then each map (summed over "
                  "channels, each on its own scale, zero at the known pixels); first seed group.", "",
                  "![panels](panels.png)", ""]
    return "\n".join(lines)


def laplace_text(laplace: dict) -> str:
    if laplace["source"] == "checkpoint":
        return f"the checkpoint ({laplace['num_images']} images)"
    return f"the first {laplace['num_images']} training pairs"


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue().encode())


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_options(parser, argv)
    try:
        plan = study_plan(args)
        fabric = make_fabric(Namespace(accelerator=args.fabric.accelerator, devices=1, num_nodes=1, strategy="auto"))
    except InputError as error:
        sys.exit(f"error: {error}")
    record = {**plan["record"], "command": ["train.py", "evaluate_i2i", *argv]}
    module = plan["module"].to(fabric.device)
    if record["laplace"] is not None:  # BayesDiff: the checkpoint's posterior, its cache, or a fit on training pairs
        checkpoint = Path(args.checkpoint)
        load_or_fit_laplace(module, checkpoint, record["checkpoint_sha256"], record["laplace"], plan["data"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", config_yaml(parser, args).encode())
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
    start = time.perf_counter()
    study = calibration_study(restore, plan["x0"], plan["condition"], plan["mask"], record["estimators"],
                              num_samples=record["samples"], seed_groups=record["seed_groups"], fid=fid,
                              keep_examples=min(args.examples, args.n),
                              progress=lambda message: print(f"evaluate_i2i: {message}", flush=True))
    guided = None
    if record["guidance"]:
        guided = guidance_study(restore, plan["x0"], plan["condition"], plan["mask"], record["guidance"],
                                num_samples=record["samples"], seed_groups=record["seed_groups"], fid=fid,
                                progress=lambda message: print(f"evaluate_i2i: {message}", flush=True))
        write_csv(out / "guidance.csv", guidance_csv_rows(guided))
    seconds = time.perf_counter() - start
    if "examples" in study:
        draw_panels(study["examples"], out / "panels.png")
    write_csv(out / "calibration.csv", calibration_rows(study))
    summary = {key: value for key, value in study.items() if key != "examples"}
    write_atomic(out / "study.json", json.dumps({**record, "seconds": round(seconds, 1), "study": summary,
                                                 "guidance_study": guided}, indent=2).encode())
    write_atomic(out / "report.md", report_markdown(study, record, seconds, str(fabric.device), guided).encode())
    written = ["calibration.csv", "study.json"] + (["panels.png"] if "examples" in study else []) + \
        (["guidance.csv"] if guided else [])
    print(f"wrote {out / 'report.md'} ({seconds / 60:.1f} minutes): {', '.join(written)}")


if __name__ == "__main__":
    main()
