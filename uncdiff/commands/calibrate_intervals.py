"""`uncdiff calibrate_intervals` (= `python train.py calibrate_intervals`): per-pixel intervals with a
distribution-free guarantee for an image-to-image model (docs/algorithms.md §8), calibrated on held-out
pairs, for `restore --intervals`.

    uncdiff calibrate_intervals --checkpoint runs/inpaint_quickstart/checkpoints/last.ckpt \\
        --out intervals.json --heuristic.name samples --heuristic.K 8 --alpha 0.1 --delta 0.1
    uncdiff restore --checkpoint runs/inpaint_quickstart/checkpoints/last.ckpt --out restored/digits \\
        --conditions my_digits/ --masks my_masks/ --intervals intervals.json

The calibration images are the first `--n` (default: all) of the run's validation split with the
pairs its validation builds (the run's saved config, or `--data.run_config`); image i is restored
with seed `--seed + i`. The heuristic (`--heuristic.name`) gives each generated pixel a lower and
upper spread around the output: `samples` (K = `--heuristic.K` more restorations with other seeds;
their standard deviation, or with `--heuristic.spread quartiles` the quartile distances from the
median), `aleatoric`, `mc_dropout` or `bayesdiff` (the square root of the map, `--estimator.*`), or
`constant` (the same at every generated pixel). lam_hat is the smallest lam of a fixed grid such that
it and every larger lam keep the Hoeffding-Bentkus upper bound of the mean fraction of missed pixels
<= `--alpha` at error probability `--delta`: then a new image's expected fraction of missed pixels
is <= alpha with probability >= 1 - delta over the calibration set. n counts images.

Writes the calibration file `--out` (JSON: alpha, delta, n, lambda_hat, the grid, the heuristic,
estimator and sampler, the task and the checkpoint's SHA-256; never overwritten) and its config as
`<out>.config.yaml`. Every input is checked before any sampling; one process on one device.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import ArgumentParser, Namespace

from uncdiff.commands.options import add_laplace_arguments, add_sampler_arguments, config_yaml, new_parser, parse_options
from uncdiff.commands.runtime import make_fabric, run_info
from uncdiff.commands.settings import build_sampler, estimator_hook, input_error, spec
from uncdiff.evaluation.intervals import HEURISTICS, calibrate_heuristic, restore_with_heuristic
from uncdiff.io.files import InputError, write_atomic, written_together
from uncdiff.io.interval_calibration import write_calibration
from uncdiff.io.lock import lock_outputs
from uncdiff.io.space import check_free_space, interval_calibration_files
from uncdiff.lightning.image_to_image import restorer
from uncdiff.lightning.loading import (file_sha256, image_to_image_data, laplace_source, load_module,
                                       load_or_fit_laplace)
from uncdiff.uncertainty.intervals import (GRID_RANGE, MAX_SPREAD_SAMPLES, SPREAD_SEED_STRIDE, check_level,
                                           min_calibration_size)
from uncdiff.uncertainty.spec import EstimatorSpec, SamplerSpec


def build_parser() -> ArgumentParser:
    parser = new_parser("uncdiff calibrate_intervals", __doc__)
    parser.add_argument("--checkpoint", type=str, required=True, help="an image-to-image checkpoint written by `fit`")
    parser.add_argument("--out", type=str, required=True, help="the calibration file to write (JSON; never "
                                                               "overwritten)")
    parser.add_argument("--data.run_config", type=Optional[str], default=None,
                        help="the training run's config (default: the newest config-*.yaml in the checkpoint's run "
                             "directory)")
    add_sampler_arguments(parser, n=None, n_help="calibration images: the first n of the validation split (null: all)")
    g = parser.add_argument_group("guaranteed intervals (docs/algorithms.md §8)")
    g.add_argument("--alpha", type=float, default=0.1, help="risk level: the expected fraction of missed pixels")
    g.add_argument("--delta", type=float, default=0.1, help="error probability of the guarantee")
    g.add_argument("--heuristic.name", type=Literal[HEURISTICS], default="samples", help="the per-pixel spread")
    g.add_argument("--heuristic.K", type=int, default=8, help="samples: restorations besides the output")
    g.add_argument("--heuristic.spread", type=Literal["std", "quartiles"], default="std",
                   help="samples: their standard deviation, or the quartile distances from the median (K >= 4)")
    g.add_argument("--fabric.accelerator", type=str, default="auto", help="auto | cpu | gpu | cuda | mps (one device)")
    g.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    parser.add_class_arguments(EstimatorSpec, "estimator", skip={"name", "reference", "score", "keep_maps"},
                               help="the estimator of --heuristic.name aleatoric | mc_dropout | bayesdiff")
    add_laplace_arguments(parser)
    return parser


def heuristic_specs(args: Namespace) -> tuple[dict, Optional[EstimatorSpec]]:
    """The heuristic's record and the estimator its output runs with (None for samples and constant)."""
    name = args.heuristic.name
    if name == "samples":
        k = args.heuristic.K
        if not 2 <= k <= MAX_SPREAD_SAMPLES or (args.heuristic.spread == "quartiles" and k < 4):
            raise InputError(f"--heuristic.K must lie in [2, {MAX_SPREAD_SAMPLES}] (in [4, {MAX_SPREAD_SAMPLES}] for "
                             f"--heuristic.spread quartiles), got {k}")
        return {"name": name, "K": k, "spread": args.heuristic.spread}, None
    if name == "constant":
        return {"name": name}, None
    return {"name": name}, spec(EstimatorSpec, {**args.estimator.as_dict(), "name": name})


def calibration_plan(args: Namespace) -> dict:
    """Every option checked, the checkpoint loaded and the calibration pairs built. Writes nothing."""
    out = Path(args.out)
    for path in (out, config_path(out)):
        if path.exists():
            raise InputError(f"--out: {path} exists; calibrate_intervals never overwrites it (choose another --out)")
    try:
        check_level("--alpha", args.alpha)
        check_level("--delta", args.delta)
    except ValueError as error:
        raise InputError(str(error)) from None
    heuristic, estimator = heuristic_specs(args)
    checkpoint = Path(args.checkpoint)
    module = load_module(checkpoint, image_to_image=True)
    data, config = image_to_image_data(module, checkpoint, args.data.run_config)
    try:
        sampler = module.resolve_sampler(spec(SamplerSpec, args.sampler), estimator)
        build_sampler(module, sampler.settings())
        if estimator is not None:
            estimator_hook(module, estimator, None, sampler.steps)
    except ValueError as error:
        raise input_error("sampler" if estimator is None else f"estimator {estimator.name}", error) from None
    data.prepare_data()
    data.setup("fit")
    n = len(data.val_set) if args.n is None else args.n
    smallest = min_calibration_size(args.alpha, args.delta)
    if n < smallest:
        raise InputError(f"--n: {n} calibration images are too few for --alpha {args.alpha}, --delta {args.delta}: "
                         f"even zero misses cannot pass; use at least {smallest} (or a larger alpha or delta)")
    if args.seed < 0 or args.seed + n > SPREAD_SEED_STRIDE or args.batch_size < 1:
        raise InputError(f"--seed must lie in [0, 2**28 - n] (the spread samples' seeds lie above) and --batch_size "
                         f">= 1; got {args.seed} and {args.batch_size}")
    try:
        x0, condition, mask = data.held_out(n)
    except ValueError as error:
        raise input_error("--n", error) from None
    laplace = laplace_source(module, args.bayesdiff.laplace_images) if heuristic["name"] == "bayesdiff" else None
    return {"module": module, "data": data, "x0": x0, "condition": condition, "estimator": estimator,
            "mask": mask if module.task.masked else None, "sampler": sampler, "laplace": laplace,
            "record": {"alpha": args.alpha, "delta": args.delta, "n": n, "heuristic": heuristic,
                       "estimator": (estimator or EstimatorSpec("none")).settings(), "sampler": sampler.settings(),
                       "task": module.task.name, "checkpoint_sha256": file_sha256(checkpoint),
                       "grid": {"zero": True, "min": GRID_RANGE[0], "max": GRID_RANGE[1], "points": GRID_RANGE[2]},
                       "calibration_images": {"split": "validation", "first": n, "run_config": str(config.resolve()),
                                              "seeds": {"start": args.seed, "count": n}}}}


def config_path(out: Path) -> Path:
    """Where the command's config is recorded: `<out>.config.yaml`."""
    return out.with_name(out.name + ".config.yaml")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_options(parser, argv)
    try:
        plan = calibration_plan(args)
        check_free_space(args.out, interval_calibration_files(plan["record"]))
        lock = lock_outputs(args.out)  # held until main returns
        fabric = make_fabric(Namespace(accelerator=args.fabric.accelerator, devices=1, num_nodes=1, strategy="auto"))
    except InputError as error:
        sys.exit(f"error: {error}")
    record, module = plan["record"], plan["module"].to(fabric.device)
    if plan["laplace"] is not None:  # BayesDiff: the checkpoint's posterior, its cache, or a fit on training pairs
        load_or_fit_laplace(module, Path(args.checkpoint), record["checkpoint_sha256"], plan["laplace"], plan["data"])
    start = time.perf_counter()
    restore = restorer(module, sampler=plan["sampler"], batch_size=args.batch_size, progress=args.progress)
    seeds = range(args.seed, args.seed + record["n"])
    with torch.no_grad():
        result, heuristic = restore_with_heuristic(restore, plan["condition"], plan["mask"], seeds,
                                                   record["heuristic"], plan["estimator"])
    try:
        fit = calibrate_heuristic(plan["x0"], plan["mask"], heuristic, record["alpha"], record["delta"])
    except ValueError as error:
        sys.exit(f"error: {error}")
    seconds = time.perf_counter() - start
    info = {**run_info(["calibrate_intervals", *argv], Path(args.checkpoint)), "seconds": round(seconds, 1),
            "nfe_per_image": heuristic.nfe}
    out = Path(args.out)
    with written_together(out, config_path(out)) as (calibration_file, config_file):
        write_calibration(calibration_file, {**record, **fit, "run": info})
        write_atomic(config_file, config_yaml(parser, args).encode())
    print(f"wrote {out}: lambda_hat {fit['lambda_hat']:.4g} for {record['heuristic']['name']} on {record['n']} "
          f"calibration images (risk {fit['risk']:.4f}, upper bound {fit['upper_bound']:.4f} <= alpha "
          f"{record['alpha']}) in {seconds:.1f} s, {heuristic.nfe:.0f} network evaluations per image")


if __name__ == "__main__":
    main()
