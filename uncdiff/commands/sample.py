"""`python train.py sample`: N samples from a `fit` checkpoint, with uncertainty maps, scores and
filtering, on every process of the machine or cluster, resumable.

    python train.py sample --checkpoint runs/quickstart/checkpoints/last.ckpt --out samples/quick \\
        --n 1000 --steps 20 --estimator aleatoric --drop-fraction 0.1667

Lightning Fabric runs one process per device (all GPUs by default; torchrun and SLURM work the
same way). The seeds are cut into chunks of `--batch-size` (see `uncdiff.io.sample_store`); the
chunks still missing are dealt round-robin to the processes, each writes its own samples' files,
and rank 0 writes the manifest and grids at the end. Every input is checked before the output
directory is created; a re-run of the same command resumes, a different one is refused.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from uncdiff.commands.common import (InputError, file_sha256, laplace_cache_path, laplace_source, load_module,
                                load_or_fit_laplace, make_datamodule)
from uncdiff.io.sample_store import SampleStore, settings_differences
from uncdiff.core.samplers import MAX_SEED, make_sampler
from uncdiff.uncertainty.sampling import make_estimator

ESTIMATOR_CHOICES = ("none", "aleatoric", "mc_dropout", "bayesdiff")
GUIDANCE_CHOICES = ("none", "gradient", "posterior")
DEFAULT_DROP_FRACTION = 1 / 6  # docs/algorithms.md §3: keep 50k of 60k


# ------------------------------------------------------------------------------------ arguments

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint, its data (for BayesDiff's Laplace fit) and the processes: both commands."""
    g = parser.add_argument_group("checkpoint and data")
    g.add_argument("--checkpoint", required=True, help="a checkpoint written by `train.py fit`")
    g.add_argument("--out", required=True, help="output directory (created; a re-run of the same command resumes)")
    g.add_argument("--config", help="the run's config (default: the newest config-*.yaml in its run directory)")
    g.add_argument("--data", choices=("digits", "cifar10"), help="the training data, instead of the run's config")
    g.add_argument("--data-root", default="data", help="where CIFAR-10 lies (with --data cifar10; default data)")
    g.add_argument("--laplace-images", type=int,
                   help="BayesDiff: fit the Laplace posterior on this many training images (default: the "
                        "checkpoint's own posterior if it holds one, else 1000), cached as <checkpoint>.laplace-N.pt")
    g = parser.add_argument_group("processes (Lightning Fabric)")
    g.add_argument("--accelerator", default="auto", help="auto | cpu | gpu | cuda | mps")
    g.add_argument("--devices", default="auto", help="number of devices per node, or 'auto' (all GPUs)")
    g.add_argument("--num-nodes", type=int, default=1)
    g.add_argument("--strategy", default="auto", help="auto | ddp | ddp_spawn ...")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_sampler_arguments(parser: argparse.ArgumentParser, n: int = 64, steps: Optional[int] = None) -> None:
    """Seeds, batch and sampler: both commands."""
    g = parser.add_argument_group("samples and sampler")
    g.add_argument("--n", type=int, default=n, help=f"number of samples, seeds seed..seed+n-1 (default {n})")
    g.add_argument("--seed", type=int, default=0, help="seed of the first sample (default 0)")
    g.add_argument("--batch-size", type=int, default=256,
                   help="samples per batch (default 256); also the unit of work and of resuming, so part of the "
                        "run's settings")
    g.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: the checkpoint's")
    g.add_argument("--steps", type=int, default=steps, help=f"sampler steps (default {steps or 'the checkpoint sample_steps'})")
    g.add_argument("--eta", type=float, help="DDIM eta (default 0)")
    g.add_argument("--spacing", choices=("uniform", "quadratic"), help="DDIM timestep spacing (default uniform)")
    g.add_argument("--variance", choices=("beta_tilde", "beta"), help="DDPM variance (default beta_tilde)")
    g.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip x0 to [-1, 1] (default on; off for BayesDiff, which needs affine steps)")


def add_estimator_arguments(parser: argparse.ArgumentParser, choose: bool = True) -> None:
    """Estimator options; `choose` adds --estimator (evaluate runs them all)."""
    g = parser.add_argument_group("uncertainty")
    if choose:
        g.add_argument("--estimator", default="aleatoric", help=f"one of {', '.join(ESTIMATOR_CHOICES)} (default aleatoric)")
    g.add_argument("--M", type=int, help="perturbations (aleatoric, guided) or dropout passes (mc_dropout); default 5")
    g.add_argument("--variant", choices=("centered", "sample"), default="centered", help="aleatoric map (docs/algorithms.md §3; default centered)")
    g.add_argument("--window", type=float, nargs=2, default=(0.0, 1.0), metavar=("START", "STOP"),
                   help="steps whose maps are summed into the score, as fractions of the steps (default 0 1)")
    g.add_argument("--dropout", type=float, help="MC-Dropout rate (default: the model's own)")
    g.add_argument("--bayesdiff-draws", type=int, default=10, help="BayesDiff: draws S per UQ step (default 10)")
    g.add_argument("--bayesdiff-skip", type=int, default=5, help="BayesDiff: UQ every k-th step (default 5)")
    g.add_argument("--bayesdiff-moments", choices=("spec", "regression"), default="spec")
    g.add_argument("--drop-fraction", type=float,
                   help="filtering: mark the fraction p with the highest scores as dropped (default 1/6)")


def add_guidance_arguments(parser: argparse.ArgumentParser, choose: bool = True) -> None:
    """Guidance options; `choose` adds --guidance and --guidance-sign (evaluate runs them all)."""
    g = parser.add_argument_group("guidance (docs/algorithms.md §4; uses the aleatoric estimator)")
    if choose:
        g.add_argument("--guidance", choices=GUIDANCE_CHOICES, default="none", help="update rule (default none)")
        g.add_argument("--guidance-sign", type=int, default=1, help="gradient rule: +1 or -1 (default +1)")
    g.add_argument("--guidance-lam", type=float, default=1.0, help="gradient rule: step size lambda (default 1)")
    g.add_argument("--guidance-quantile", type=float, default=0.95, help="percentile threshold q (default 0.95)")
    g.add_argument("--guidance-table", help="threshold table file from calibrate_threshold_table/save_table "
                                            "(threshold 'table' instead of the per-image percentile)")
    g.add_argument("--guidance-window", type=float, nargs=2, default=(0.0, 0.15), metavar=("START", "STOP"),
                   help="guided steps, as fractions of the steps (default: the first 3 of 20)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_sampler_arguments(parser)
    add_estimator_arguments(parser)
    add_guidance_arguments(parser)
    return parser


# ------------------------------------------------------------------------------------- settings

def _error(option: str, error: Exception) -> InputError:
    return InputError(f"{option}: {error}")


def sampler_settings(args, module) -> dict:
    name = args.sampler or module.hparams.sampler
    s = {"name": name, "steps": module.hparams.sample_steps if args.steps is None else args.steps}
    clip = args.clip if args.clip is not None else args.estimator != "bayesdiff"
    if name == "ddim":
        if args.variance is not None:
            raise InputError("--variance applies to --sampler ddpm")
        s.update(eta=0.0 if args.eta is None else args.eta, spacing=args.spacing or "uniform", clip=clip)
    else:
        if args.eta is not None or args.spacing is not None:
            raise InputError("--eta and --spacing apply to --sampler ddim")
        s.update(variance=args.variance or "beta_tilde", clip=clip)
    return s


def estimator_settings(args) -> tuple[str, dict, Optional[dict]]:
    """(estimator, its options, guidance options or None), named as the hooks' constructors name them."""
    est = args.estimator
    if est not in ESTIMATOR_CHOICES:
        raise InputError(f"unknown estimator {est!r}; choose one of {', '.join(ESTIMATOR_CHOICES)}")
    m = 5 if args.M is None else args.M
    window = [float(v) for v in args.window]
    if args.guidance != "none":
        if est not in ("aleatoric", "none"):
            raise InputError(f"--guidance uses the aleatoric estimator; got --estimator {est}")
        guidance = {"rule": args.guidance, "sign": args.guidance_sign, "lam": args.guidance_lam,
                    "quantile": args.guidance_quantile, "window": [float(v) for v in args.guidance_window]}
        if args.guidance != "gradient":
            del guidance["sign"], guidance["lam"]  # the posterior rule has neither
        if getattr(args, "guidance_table", None):
            guidance.update(threshold="table", table=str(Path(args.guidance_table).resolve()))
            del guidance["quantile"]
        return "aleatoric", {"num_perturbations": m, "variant": args.variant, "estimate_window": window}, guidance
    if est == "none":
        if args.M is not None:
            raise InputError("--M needs an estimator (--estimator aleatoric | mc_dropout)")
        return est, {}, None
    if est == "aleatoric":
        return est, {"num_perturbations": m, "variant": args.variant, "window": window}, None
    if est == "mc_dropout":
        return est, {"num_passes": m, "dropout": args.dropout, "window": window}, None
    if args.M is not None:
        raise InputError("BayesDiff's number of draws is --bayesdiff-draws, not --M")
    return est, {"num_draws": args.bayesdiff_draws, "skip": args.bayesdiff_skip,
                 "moments": args.bayesdiff_moments}, None


def estimator_hook(module, estimator: str, options: dict, guidance: Optional[dict]) -> Any:
    """The sampler hook `DiffusionModule.sample` builds for these settings (built here to check
    them before sampling, and for the AUSE experiment, which denoises outside `sample`)."""
    if guidance is not None:
        if "table" in guidance:
            guidance = {**guidance, "table": threshold_table(guidance["table"], module)}
        return make_estimator("guided", **options, **guidance)
    if estimator == "mc_dropout":
        return make_estimator("mc_dropout", model=module.ema.ema_model, **options)
    if estimator == "bayesdiff":
        return make_estimator("bayesdiff", net=module.ema.ema_model, laplace=module.laplace, **options)
    return make_estimator(estimator, **options)


def threshold_table(path: str, module):
    """The `[steps, C, H, W]` threshold table saved at `path`, checked against the model's image shape
    (`build_settings` checks its step count against the run's)."""
    from uncdiff.uncertainty.guidance import table_from_file

    try:
        return table_from_file(path, image_shape=module.image_shape)
    except ValueError as error:
        raise InputError(f"--guidance-table: {error}") from None


def check_table_settings(path: str, sampler: dict, options: dict) -> None:
    """Refuse a threshold table calibrated with another sampler, M or map variant than this run's:
    its quantiles would describe other maps. Settings the file doesn't record are not checked."""
    from uncdiff.uncertainty.guidance import load_table

    run = {"sampler": sampler, "num_perturbations": options["num_perturbations"], "variant": options["variant"]}
    made = {key: value for key, value in load_table(path)[1].items() if key in run}
    differ = settings_differences(made, {key: run[key] for key in made})
    if differ:
        raise InputError(f"--guidance-table {path} was calibrated with other settings (the table's there, this "
                         f"run's here: {'; '.join(differ)}): calibrate a table for this run, or match its options")


def build_settings(args, module, checkpoint_sha256: str, laplace: Optional[dict], save_maps: bool = True) -> dict:
    """The JSON-able settings that define a sampling run (its run.json), every option checked.
    Options that don't change what is written (processes, progress bar) are not part of them."""
    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    if not 0 <= args.seed <= MAX_SEED - args.n:
        raise InputError(f"seeds must lie in [0, 2**32): --seed {args.seed} with --n {args.n} does not")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampler = sampler_settings(args, module)
    try:
        build_sampler(module, sampler)
    except ValueError as error:
        raise _error("sampler", error) from None
    estimator, options, guidance = estimator_settings(args)
    try:
        estimator_hook(module, estimator, options, guidance)
    except ValueError as error:
        raise _error(f"estimator {estimator}" + (" (guided)" if guidance else ""), error) from None
    if estimator == "bayesdiff" and not (sampler["name"] == "ddim" and sampler["eta"] == 0 and not sampler["clip"]):
        raise InputError("--estimator bayesdiff propagates moments through deterministic DDIM steps: it needs "
                         "--sampler ddim, --eta 0 and --no-clip")
    if guidance is not None and "table" in guidance:
        steps = threshold_table(guidance["table"], module).shape[0]
        if steps != sampler["steps"]:
            raise InputError(f"--guidance-table was calibrated for {steps} steps; this run has {sampler['steps']}")
        check_table_settings(guidance["table"], sampler, options)
    p = args.drop_fraction
    if p is not None:
        if estimator == "none":
            raise InputError("--drop-fraction needs an estimator's scores; --estimator none gives none")
        if not 0.0 < p < 1.0:
            raise InputError(f"--drop-fraction must lie in (0, 1), got {p}")
    elif estimator != "none":
        p = DEFAULT_DROP_FRACTION
    return {"format": 1, "checkpoint_sha256": checkpoint_sha256,
            "seeds": {"start": args.seed, "count": args.n}, "batch_size": args.batch_size,
            "sampler": sampler, "estimator": estimator, "estimator_options": options, "guidance": guidance,
            "laplace": laplace, "drop_fraction": p, "save_maps": save_maps,
            "guidance_table_sha256": file_sha256(Path(guidance["table"])) if guidance and "table" in guidance else None}


def build_sampler(module, sampler: dict):
    """The sampler of a `sampler_settings` dict (name, steps and the sampler's own options)."""
    return make_sampler(module.schedule, sampler["name"], **{k: v for k, v in sampler.items() if k != "name"})


def sample_kwargs(settings: dict) -> dict:
    """`DiffusionModule.sample` arguments of a run (all but the seeds)."""
    sampler = dict(settings["sampler"])
    return {"sampler": sampler.pop("name"), "steps": sampler.pop("steps"), "estimator": settings["estimator"],
            "estimator_options": settings["estimator_options"], "guidance": settings["guidance"], **sampler}


# ---------------------------------------------------------------------------------- preparation

@dataclass
class ModelInputs:
    """The checked checkpoint, and the data to fit a Laplace posterior on when one is needed."""

    module: Any
    checkpoint: Path
    sha256: str
    laplace: Optional[dict] = None
    datamodule: Any = None


def prepare_model(args, needs_laplace: bool, needs_data: bool = False) -> ModelInputs:
    """Load and check the checkpoint; when BayesDiff runs, decide its Laplace posterior and make sure
    either its cache or the training data is there. Writes nothing."""
    checkpoint = Path(args.checkpoint)
    module = load_module(checkpoint)
    sha = file_sha256(checkpoint)
    laplace = laplace_source(module, checkpoint, args.laplace_images) if needs_laplace else None
    datamodule = None
    if needs_data or (laplace is not None and laplace["source"] == "fit"
                      and not laplace_cached(checkpoint, sha, laplace)):
        datamodule = make_datamodule(module, checkpoint, args.data, args.data_root, args.config)
    return ModelInputs(module, checkpoint, sha, laplace, datamodule)


def laplace_cached(checkpoint: Path, sha: str, laplace: dict) -> bool:
    import torch

    path = laplace_cache_path(checkpoint, laplace["num_images"])
    return path.is_file() and torch.load(path, map_location="cpu", weights_only=True).get("checkpoint_sha256") == sha


def attach_laplace(fabric, inputs: ModelInputs) -> None:
    """Rank 0 loads or fits (and caches) the Laplace posterior, then the others read the cache."""
    if inputs.laplace is None:
        return
    if fabric.is_global_zero:
        load_or_fit_laplace(inputs.module, inputs.checkpoint, inputs.sha256, inputs.laplace, inputs.datamodule)
    fabric.barrier()
    if not fabric.is_global_zero:
        load_or_fit_laplace(inputs.module, inputs.checkpoint, inputs.sha256, inputs.laplace, is_writer=False)


def make_fabric(args):
    from lightning.fabric import Fabric

    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    return Fabric(accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, strategy=args.strategy)


def run_info(command: list[str], inputs: ModelInputs) -> dict:
    """What ran the run, for the record (not compared on resume)."""
    return {"checkpoint": str(inputs.checkpoint.resolve()), "command": ["train.py", *command],
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------------------------ generation

def generate_run(fabric, module, store: SampleStore, info: dict, progress: bool = True, desc: str = "sampling",
                 warm_up: bool = False) -> Optional[dict]:
    """Generate the missing chunks of `store` on all processes; rank 0 then writes the manifest and
    grids and returns the run's summary (the other ranks return None). `warm_up` first samples one
    image untimed (lazy initialisation), so that seconds per image compare across runs."""
    from tqdm.auto import tqdm

    rank, world = fabric.global_rank, fabric.world_size
    if fabric.is_global_zero:
        store.create(info)
    fabric.barrier()
    todo = store.missing()
    fabric.barrier()  # every rank has listed the work before anyone writes
    total = store.settings["seeds"]["count"]
    left = sum(len(c.seeds) for c in todo)
    if fabric.is_global_zero:
        print(f"{desc}: {total} samples in {store.root}: {total - left} already written, {left} to generate "
              f"on {world} process(es)", flush=True)
    bar = tqdm(total=total, initial=total - left, desc=desc, unit="img", disable=not (progress and rank == 0))
    kwargs = sample_kwargs(store.settings)
    mine = todo[rank::world]
    if mine and warm_up:
        module.sample(seeds=mine[0].seeds[:1], **kwargs)
    for chunk in mine:
        start = time.perf_counter()
        result = module.sample(seeds=chunk.seeds, batch_size=len(chunk.seeds), **kwargs)
        store.write_chunk(chunk, result.images, result.maps, result.scores, result.nfe, time.perf_counter() - start)
        bar.update(store.done_samples() - bar.n)  # all ranks' finished chunks, as seen on disk
    fabric.barrier()
    bar.update(total - bar.n)
    bar.close()
    return store.finish() if fabric.is_global_zero else None


def _run(fabric, args, inputs: ModelInputs, store: SampleStore, info: dict) -> None:
    inputs.module.to(fabric.device)
    attach_laplace(fabric, inputs)
    summary = generate_run(fabric, inputs.module, store, info, progress=not args.no_progress)
    if summary is not None:
        kept = f", {summary['dropped']} marked dropped (dropped.png)" if summary["dropped"] else ""
        print(f"wrote {summary['samples']} samples to {store.root} (manifest.csv, grid.png{kept}); "
              f"{summary['nfe_per_image']:.0f} network evaluations and {summary['seconds_per_image']:.3g} s per image")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        inputs = prepare_model(args, needs_laplace=args.estimator == "bayesdiff")
        settings = build_settings(args, inputs.module, inputs.sha256, inputs.laplace)
        store = SampleStore(args.out, settings)
        store.check()
    except InputError as error:
        sys.exit(f"error: {error}")
    make_fabric(args).launch(_run, args, inputs, store, run_info(["sample", *argv], inputs))


if __name__ == "__main__":
    main()
