"""`evaluate`'s report (docs/algorithms.md §6): what ran, then each experiment's section
(`uncdiff.evaluation.sections`) from the finished sample sets, assembled into a `Report` that
`uncdiff.evaluation.report` writes."""

import inspect
import time
from pathlib import Path

import torch

from uncdiff.evaluation import sections
from uncdiff.evaluation.experiments import FeaturePrecisionRecall, cost_rows
from uncdiff.evaluation.fid import FIDEvaluator
from uncdiff.evaluation.report import Report
from uncdiff.evaluation.sample_sets import DETECTION_ESTIMATORS, GUIDED, Plan, moments_sets, sweep_sets
from uncdiff.io.files import load_torch
from uncdiff.uncertainty.guidance import UncertaintyGuidance


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def report_header(args, plan: Plan, inputs, extractor, fabric, command: list[str]) -> dict:
    """What ran: the checkpoint, data, features, sampler, sizes, machine and command."""
    clipped = [s.settings for n, s in plan.stores.items() if n != "bayesdiff"]
    any_set = (clipped or [s.settings for s in plan.stores.values()] or list(plan.ause.values()))[0]  # ause alone
    default_sign = inspect.signature(UncertaintyGuidance).parameters["sign"].default
    # a diffusers folder has no training step
    checkpoint = {} if Path(inputs.checkpoint).is_dir() else load_torch(inputs.checkpoint, "checkpoint", mmap=True)
    classifier = (f" (weights sha256 {extractor.sha256}, held-out accuracy {extractor.val_accuracy:.3f})"
                  if hasattr(extractor, "sha256") else "")  # the digits classifier
    return {
        "checkpoint": f"{inputs.checkpoint} (step {checkpoint.get('global_step', '?')}, sha256 {inputs.sha256[:12]})",
        "data": plan.dataset,
        "FID features": f"{extractor.name}{classifier}" if extractor is not None else "none (no FID experiment)",
        "sampler": ", ".join(f"{k}={v}" for k, v in any_set["sampler"].items() if k != "clip")
        + " (x0 clipped, except BayesDiff's)",
        "samples per set": f"{args.n} (seeds {args.seed}..{args.seed + args.n - 1}), batch {args.batch_size}",
        "random subsets (seeds)": args.filtering.subset_seeds, "seed groups": args.seed_groups,
        "M (perturbations / passes)": args.estimator.M,
        "default gradient sign": f"{default_sign:+d} (UncertaintyGuidance)",
        "device": f"{device_name(fabric.device)} x {fabric.world_size} process(es)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(command),
        "drop fraction": f"{sections.drop_fraction(plan.stores):.4g}",
    }


def build_report(args, plan: Plan, inputs, summaries: dict, extractor, real_stats, fabric, command: list[str]) -> Report:
    """Each experiment's section of the report, from the finished sample sets (on rank 0). `args` are
    the command's options, `inputs` its checked model inputs (module, checkpoint, sha256, data)."""
    report = Report(header=report_header(args, plan, inputs, extractor, fabric, command), notes=list(plan.notes))
    fid = None if extractor is None else FIDEvaluator.from_features(real_stats, fabric.device).score
    features = {} if extractor is None else {name: sections.set_features(store, extractor)
                                             for name, store in plan.stores.items()}
    prc = plan.settings["precision_recall"]
    real = None
    if prc is not None and "filtering" in args.experiments or "study" in args.experiments:
        real = sections.real_features(plan.root, inputs.datamodule, prc["real_images"] if prc else min(args.n, 10000),
                                      extractor)
    if "filtering" in args.experiments:
        precision_recall = None
        if prc is not None:
            report.header["precision / recall"] = f"k = {prc['k']} nearest neighbours, against {len(real)} real " \
                                                  f"training images (random, seed 0), FID features"
            precision_recall = FeaturePrecisionRecall(real, prc["k"], fabric.device)
        sections.filtering_section(report, plan.stores, features, fid, [*args.estimators, *moments_sets(args)],
                                   sections.drop_fraction(plan.stores), args.filtering.subset_seeds, precision_recall)
    if "study" in args.experiments:
        sections.study_section(report, plan.stores, features, real, extractor, fid, args.estimators,
                               args.study.resamples, args.filtering.subset_seeds)
    if "guidance" in args.experiments:
        sections.guidance_section(report, plan.stores, features, fid, args.seed_groups)
    if "sweep" in args.experiments and fid is not None:  # on shapes, the checker judges the sweep (detection)
        sections.sweep_section(report, plan.stores, features, fid, list(sweep_sets(args)), args.sweep.seed_groups,
                               args.guidance.reduce, args.sweep.sign)
    if "ause" in args.experiments:
        module = inputs.module
        images = sections.held_out_images(inputs.datamodule, args.ause.images).to(module.device)
        sections.ause_section(report, module.ema.ema_model.eval(), plan.ause_sampler, plan.ause_hooks, images,
                              plan.ause["aleatoric"], args.ause.fractions, args.batch_size)
    if "detection" in args.experiments:
        sections.detection_section(report, plan.stores, summaries, DETECTION_ESTIMATORS, args.study.resamples,
                                   [*GUIDED, *sweep_sets(args)])
    if "cost" in args.experiments:
        report.cost = cost_rows({name: s for name, s in summaries.items() if name not in sweep_sets(args)})
    sections.closing_notes(report, plan.stores, features)
    sections.copy_figures(report, plan.stores, plan.root)
    return report
