"""`uncdiff calibrate` (= `python train.py calibrate`): the threshold table of guided sampling
(docs/algorithms.md §4, threshold `table`), from unguided samples of a `fit` checkpoint.

    uncdiff calibrate --checkpoint runs/quickstart/checkpoints/last.ckpt --out tau.pt \\
        --n 1000 --sampler.steps 20 --estimator.M 5 --quantile 0.95
    uncdiff sample --checkpoint runs/quickstart/checkpoints/last.ckpt --out samples/guided \\
        --sampler.steps 20 --estimator.M 5 --guidance.rule gradient --guidance_table tau.pt

`tau[step, c, h, w]` is the `--quantile` of the aleatoric map `U_t` (docs/algorithms.md §3) at that
sampler step and position over `--n` unguided samples, seeds `--seed .. --seed+n-1`
(`uncdiff.uncertainty.guidance.calibrate_threshold_table`). The file (`save_table`) also holds the
settings it was made with: use it with the same checkpoint, sampler, steps, `--estimator.M` and
`--estimator.variant`. The same samples give the per-step reference statistics of the score
variants (docs/algorithms.md §3: at each step, the mean and standard deviation of the per-image total
of `U_t`), written beside the table as `<out>.reference.pt` (`--score_reference` of `sample`
and `evaluate`). The command's full config is written beside it as `<out>.config.yaml`.

One process on one device: the quantile needs every sample's maps in one place. Every input is
checked before sampling, and an existing `--out` is never overwritten.
"""

import math
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import ArgumentParser, Namespace

from uncdiff.commands.options import add_model_arguments, add_sampler_arguments, config_yaml, new_parser, parse_options
from uncdiff.commands.runtime import ModelInputs, make_fabric, prepare_model, run_info
from uncdiff.commands.settings import build_sampler, check_seeds, input_error, spec
from uncdiff.core.samplers import EpsModel
from uncdiff.io.files import InputError, write_atomic, written_together
from uncdiff.io.lock import lock_outputs
from uncdiff.io.space import check_free_space, threshold_table_files
from uncdiff.io.tables import SETTINGS_FORMAT, save_score_reference, save_threshold_table
from uncdiff.uncertainty.calibration import calibrate_table_and_reference
from uncdiff.uncertainty.estimators import VARIANTS
from uncdiff.uncertainty.spec import EstimatorSpec, SamplerSpec


def build_parser() -> ArgumentParser:
    parser = new_parser("uncdiff calibrate", __doc__)
    add_model_arguments(parser, "the table file to write (never overwritten)")
    add_sampler_arguments(parser, n=1000)
    g = parser.add_argument_group("calibration")
    g.add_argument("--quantile", type=float, default=0.95, help="q of the q-quantile, in (0, 1)")
    g.add_argument("--estimator.M", type=int, default=5, help="perturbations per step (as the guided run's)")
    g.add_argument("--estimator.variant", type=Literal[VARIANTS], default="centered",
                   help="aleatoric map (docs/algorithms.md §3)")
    # One process, see above.
    parser.set_defaults({"fabric.devices": 1})
    return parser


def config_path(out: Path) -> Path:
    """Where the command's config is recorded: `<out>.config.yaml`."""
    return out.with_name(out.name + ".config.yaml")


def reference_path(out: Path) -> Path:
    """Where the score variants' reference statistics are written: `<out>.reference.pt`."""
    return out.with_name(out.name + ".reference.pt")


def least_samples(quantile: float) -> int:
    """The smallest n with `n q >= 1` and `n (1 - q) >= 1`: with fewer samples, none is expected above
    (or below) the q-quantile, and its estimate is an interpolation between the extreme values.
    Rounded first so that float error can't add one (1 / (1 - 0.95) is 20.000000000000004)."""
    return max(2, math.ceil(round(1 / min(quantile, 1 - quantile), 9)))


def calibration_settings(args: Namespace, inputs: ModelInputs) -> dict:
    """The settings a table is made with (saved in it, plain Python values), every option checked.
    Writes nothing."""
    out = Path(args.out)
    for path in (out, config_path(out), reference_path(out)):
        if path.exists():
            raise InputError(f"--out: {path} exists; calibrate never overwrites it (delete it or choose another "
                             f"--out)")
    unused = [option for option, value in (("--data.name", args.data.name),
                                           ("--data.run_config", args.data.run_config)) if value is not None]
    if unused:
        raise InputError(f"{', '.join(unused)}: calibrate reads no training data (the table comes from samples)")
    if not 0.0 < args.quantile < 1.0:
        raise InputError(f"--quantile must lie in (0, 1), got {args.quantile}")
    estimator = spec(EstimatorSpec, {"name": "aleatoric", "M": args.estimator.M, "variant": args.estimator.variant})
    least = least_samples(args.quantile)
    if args.n < least:
        raise InputError(f"--n must be >= {least} for --quantile {args.quantile} (at least one sample on each side "
                         f"of the quantile), got {args.n}")
    check_seeds(args)
    # the maps of a guided `sample` run's aleatoric estimator: its sampler defaults (x0 clipped)
    try:
        sampler = inputs.module.resolve_sampler(spec(SamplerSpec, args.sampler), estimator)
        build_sampler(inputs.module, sampler.settings())
    except ValueError as error:
        raise input_error("sampler", error) from None
    return {"format": SETTINGS_FORMAT, "checkpoint_sha256": inputs.sha256, "sampler": sampler.settings(),
            "quantile": args.quantile, "M": estimator.M, "variant": estimator.variant,
            "seeds": {"start": args.seed, "count": args.n}, "batch_size": args.batch_size}

class ProgressEps:
    """`eps_model` that advances a progress bar by the image rows it evaluates."""

    def __init__(self, eps_model: EpsModel, bar):
        self.eps_model, self.bar = eps_model, bar

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.bar.update(x.shape[0])
        return self.eps_model(x, t)


def _run(fabric, args: Namespace, inputs: ModelInputs, settings: dict, info: dict, config: str) -> None:
    from tqdm.auto import tqdm

    module = inputs.module.to(fabric.device)
    out = Path(args.out)
    sampler, seeds = settings["sampler"], settings["seeds"]
    m, n = settings["M"], seeds["count"]
    print(f"calibrating: {n} unguided samples (seeds {seeds['start']}..{seeds['start'] + n - 1}), "
          f"{sampler['steps']} {sampler['name']} steps, M={m}, q={settings['quantile']}, on {fabric.device}",
          flush=True)
    start = time.perf_counter()
    # every step: the sampler's prediction and the M perturbed ones, for every sample
    with tqdm(total=n * sampler["steps"] * (1 + m), desc="calibrating", unit="eval", unit_scale=True,
              disable=not args.progress) as bar:
        table, reference = calibrate_table_and_reference(ProgressEps(module.ema.ema_model, bar), build_sampler(module, sampler),
                                          module.image_shape, range(seeds["start"], seeds["start"] + n),
                                          settings["quantile"], m, settings["variant"],
                                          batch_size=settings["batch_size"], device=fabric.device)
    seconds = time.perf_counter() - start
    if out.exists() or config_path(out).exists() or reference_path(out).exists():
        sys.exit(f"error: --out: {out} appeared while calibrating; not overwritten, nothing written")
    record = {**settings, "run": {**info, "seconds": round(seconds, 3)}}
    # all three files or none (a full disk): never a reference without its table
    with written_together(reference_path(out), out, config_path(out)) as (reference_file, table_file, config_file):
        save_score_reference(reference_file, reference, record)
        save_threshold_table(table_file, table, record)
        write_atomic(config_file, config.encode())
    print(f"wrote {out}: the {settings['quantile']}-quantile of U_t, {list(table.shape)} (steps, C, H, W), "
          f"over {n} samples in {seconds:.1f} s; the score reference statistics in {reference_path(out)}; its "
          f"config in {config_path(out)}")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_options(parser, argv)
    try:
        inputs = prepare_model(args, needs_laplace=False)
        settings = calibration_settings(args, inputs)
        fabric = make_fabric(args.fabric)
        if fabric.world_size > 1:
            raise InputError(f"--fabric.devices/--fabric.num_nodes: calibrate runs in one process, not "
                             f"{fabric.world_size}")
        check_free_space(args.out, threshold_table_files(settings, inputs.module.image_shape))
        lock = lock_outputs(args.out)  # held until main returns; its file is the first write: an unwritable folder fails now
    except InputError as error:
        sys.exit(f"error: {error}")
    fabric.launch(_run, args, inputs, settings, run_info(["calibrate", *argv], inputs.checkpoint), config_yaml(parser, args))


if __name__ == "__main__":
    main()
