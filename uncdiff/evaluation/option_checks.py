"""`uncdiff evaluate`'s own options (the experiments'), checked before anything is sampled or written;
the sampling options are checked where every command's are, `uncdiff.commands.settings`."""

from pathlib import Path

from jsonargparse import Namespace

from uncdiff.evaluation.experiments import PRC_NEIGHBOURS, denoised_steps
from uncdiff.evaluation.sample_sets import DETECTION_ESTIMATORS
from uncdiff.evaluation.sections import ause_map_steps
from uncdiff.io.files import InputError


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


def check_options(args: Namespace) -> int:
    """The experiments' own options, checked; returns the real images of precision / recall (0: none)."""
    filtering, fid = args.filtering, args.fid
    if filtering.subset_seeds < 2:
        raise InputError(f"--filtering.subset_seeds must be >= 2 (a spread needs two subsets), got "
                         f"{filtering.subset_seeds}")
    if not 1 <= args.seed_groups <= args.n // 2:
        raise InputError(f"--seed_groups must lie in [1, n/2], got {args.seed_groups} with --n {args.n}")
    if not args.estimators:
        raise InputError("--estimators: name at least one of " + ", ".join(DETECTION_ESTIMATORS))
    if "sweep" in args.experiments:
        check_sweep(args)
    if {"study", "detection"} & set(args.experiments) and args.study.resamples < 1000:
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
    return prc_real


def check_ause_window(settings: dict) -> None:
    """An --estimator.window without any of AUSE's steps would leave it no map to score."""
    steps = settings["sampler"]["steps"]
    window = settings["estimator"]["window"]
    if not ause_map_steps(settings):
        raise InputError(f"--estimator.window {window[0]:g} {window[1]:g} has no step among steps "
                         f"{denoised_steps(steps).start}..{steps - 1} of {steps}: AUSE denoises only the second half "
                         f"of the steps and needs the window to overlap it (e.g. --estimator.window 0.5 1), or leave "
                         f"ause out of --experiments")
