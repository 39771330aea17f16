"""`python train.py calibrate`: the threshold table of guided sampling (docs/algorithms.md §4, threshold `table`),
from unguided samples of a `fit` checkpoint.

    python train.py calibrate --checkpoint runs/quickstart/checkpoints/last.ckpt --out tau.pt \\
        --n 1000 --steps 20 --M 5 --quantile 0.95
    python train.py sample --checkpoint runs/quickstart/checkpoints/last.ckpt --out samples/guided \\
        --steps 20 --M 5 --guidance gradient --guidance-table tau.pt

`tau[step, c, h, w]` is the `--quantile` of the aleatoric map `U_t` (docs/algorithms.md §3) at that sampler step
and position over `--n` unguided samples, seeds `--seed .. --seed+n-1`
(`uncdiff.uncertainty.guidance.calibrate_threshold_table`). The file (`save_table`) also holds the settings it
was made with: use it with the same checkpoint, sampler, steps, `--M` and `--variant`.

One process on one device: the quantile needs every sample's maps in one place. Every input is
checked before sampling, and an existing `--out` is never overwritten.
"""

import argparse
import io
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from uncdiff.uncertainty.guidance import calibrate_threshold_table, save_table
from uncdiff.commands.common import InputError
from uncdiff.commands.sample import (ModelInputs, _error, add_model_arguments, add_sampler_arguments, build_sampler,
                                make_fabric, prepare_model, run_info, sampler_settings)
from uncdiff.io.sample_store import write_atomic
from uncdiff.core.samplers import MAX_SEED, EpsModel
from uncdiff.uncertainty.estimators import VARIANTS, check_count


def build_parser() -> argparse.ArgumentParser:
    # "resolve": --out below replaces add_model_arguments' --out, which names a sample directory
    parser = argparse.ArgumentParser(prog="train.py calibrate", description=__doc__, conflict_handler="resolve",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_sampler_arguments(parser, n=1000)
    g = parser.add_argument_group("calibration")
    g.add_argument("--out", required=True, help="the table file to write (never overwritten)")
    g.add_argument("--quantile", type=float, default=0.95, help="q of the q-quantile, in (0, 1) (default 0.95)")
    g.add_argument("--M", type=int, default=5, help="perturbations per step (default 5; as the guided run's --M)")
    g.add_argument("--variant", choices=VARIANTS, default="centered", help="aleatoric map (docs/algorithms.md §3; default centered)")
    # The maps are those of a guided `sample` run's aleatoric estimator: its sampler defaults
    # (`sampler_settings` clips x0 unless the estimator is BayesDiff). One process, see above.
    parser.set_defaults(estimator="aleatoric", devices="1")
    return parser


def least_samples(quantile: float) -> int:
    """The smallest n with `n q >= 1` and `n (1 - q) >= 1`: with fewer samples, none is expected above
    (or below) the q-quantile, and its estimate is an interpolation between the extreme values.
    Rounded first so that float error can't add one (1 / (1 - 0.95) is 20.000000000000004)."""
    return max(2, math.ceil(round(1 / min(quantile, 1 - quantile), 9)))


def calibration_settings(args, inputs: ModelInputs) -> dict:
    """The settings a table is made with (saved in it, plain Python values), every option checked.
    Writes nothing."""
    out = Path(args.out)
    if out.exists():
        raise InputError(f"--out: {out} exists; calibrate never overwrites it (delete it or choose another --out)")
    unused = [option for option, value in (("--config", args.config), ("--data", args.data),
                                           ("--laplace-images", args.laplace_images)) if value is not None]
    if unused:
        raise InputError(f"{', '.join(unused)}: calibrate reads no training data (the table comes from samples)")
    if not 0.0 < args.quantile < 1.0:
        raise InputError(f"--quantile must lie in (0, 1), got {args.quantile}")
    try:
        m = check_count("num_perturbations", args.M, 2)
    except ValueError as error:
        raise _error("--M", error) from None
    least = least_samples(args.quantile)
    if args.n < least:
        raise InputError(f"--n must be >= {least} for --quantile {args.quantile} (at least one sample on each side "
                         f"of the quantile), got {args.n}")
    if not 0 <= args.seed <= MAX_SEED - args.n:
        raise InputError(f"seeds must lie in [0, 2**32): --seed {args.seed} with --n {args.n} does not")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampler = sampler_settings(args, inputs.module)
    try:
        build_sampler(inputs.module, sampler)
    except ValueError as error:
        raise _error("sampler", error) from None
    return {"format": 1, "checkpoint_sha256": inputs.sha256, "sampler": sampler, "quantile": args.quantile,
            "num_perturbations": m, "variant": args.variant, "seeds": {"start": args.seed, "count": args.n},
            "batch_size": args.batch_size}


class ProgressEps:
    """`eps_model` that advances a progress bar by the image rows it evaluates."""

    def __init__(self, eps_model: EpsModel, bar):
        self.eps_model, self.bar = eps_model, bar

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.bar.update(x.shape[0])
        return self.eps_model(x, t)


def _run(fabric, args, inputs: ModelInputs, settings: dict, info: dict) -> None:
    from tqdm.auto import tqdm

    module = inputs.module.to(fabric.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # before sampling: a bad path fails now
    sampler, seeds = settings["sampler"], settings["seeds"]
    m, n = settings["num_perturbations"], seeds["count"]
    print(f"calibrating: {n} unguided samples (seeds {seeds['start']}..{seeds['start'] + n - 1}), "
          f"{sampler['steps']} {sampler['name']} steps, M={m}, q={settings['quantile']}, on {fabric.device}",
          flush=True)
    start = time.perf_counter()
    # every step: the sampler's prediction and the M perturbed ones, for every sample
    with tqdm(total=n * sampler["steps"] * (1 + m), desc="calibrating", unit="eval", unit_scale=True,
              disable=args.no_progress) as bar:
        table = calibrate_threshold_table(ProgressEps(module.ema.ema_model, bar), build_sampler(module, sampler),
                                          module.image_shape, range(seeds["start"], seeds["start"] + n),
                                          settings["quantile"], m, settings["variant"],
                                          batch_size=settings["batch_size"], device=fabric.device)
    seconds = time.perf_counter() - start
    if out.exists():
        sys.exit(f"error: --out: {out} appeared while calibrating; not overwritten, nothing written")
    buffer = io.BytesIO()
    save_table(buffer, table, {**settings, "run": {**info, "seconds": round(seconds, 3)}})
    write_atomic(out, buffer.getvalue())
    print(f"wrote {out}: the {settings['quantile']}-quantile of U_t, {list(table.shape)} (steps, C, H, W), "
          f"over {n} samples in {seconds:.1f} s")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        inputs = prepare_model(args, needs_laplace=False)
        settings = calibration_settings(args, inputs)
        fabric = make_fabric(args)
        if fabric.world_size > 1:
            raise InputError(f"--devices/--num-nodes: calibrate runs in one process, not {fabric.world_size}")
    except InputError as error:
        sys.exit(f"error: {error}")
    fabric.launch(_run, args, inputs, settings, run_info(["calibrate", *argv], inputs))


if __name__ == "__main__":
    main()
