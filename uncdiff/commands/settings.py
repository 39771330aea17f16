"""The settings that define a sampling run: the JSON-able dict a sample set is identified by (its
run.json, compared on resume), built from the parsed options with every option checked. A problem is
an `InputError` naming the option, raised before anything is written.
"""

from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace

from uncdiff.core.samplers import MAX_SEED, make_sampler
from uncdiff.io.files import InputError
from uncdiff.io.sample_store import settings_differences
from uncdiff.lightning.loading import file_sha256
from uncdiff.commands.options import ESTIMATOR_CHOICES
from uncdiff.uncertainty.sampling import build_hook, make_estimator

DEFAULT_DROP_FRACTION = 1 / 6  # docs/algorithms.md §3: keep 50k of 60k


def input_error(option: str, error: Exception) -> InputError:
    return InputError(f"{option}: {error}")


def sampler_settings(options: Namespace, module, estimator: str) -> dict:
    """The sampler of a run from the `sampler` options (the checkpoint's where unset)."""
    name = options.name or module.hparams.sampler
    s = {"name": name, "steps": module.hparams.sample_steps if options.steps is None else options.steps}
    own = module.sampler_options(name)  # a diffusers model's scheduler config; empty for ours
    clip = options.clip if options.clip is not None else estimator != "bayesdiff" and own.get("clip", True)
    if name == "ddim":
        if options.variance is not None:
            raise InputError("--sampler.variance applies to --sampler.name ddpm")
        s.update(eta=0.0 if options.eta is None else options.eta, spacing=options.spacing or own.get("spacing", "uniform"),
                 clip=clip)
        if options.clipped_eps is not None:
            s["clipped_eps"] = options.clipped_eps
    else:
        if options.eta is not None or options.spacing is not None:
            raise InputError("--sampler.eta and --sampler.spacing apply to --sampler.name ddim")
        if options.clipped_eps is not None:
            raise InputError("--sampler.clipped_eps applies to --sampler.name ddim")
        s.update(variance=options.variance or own.get("variance", "beta_tilde"), clip=clip)
    return s


def guidance_settings(guide: Namespace) -> dict:
    """The guidance options of a run from the `guidance` options with a rule (not 'none'): each rule
    records only its own options; a threshold table replaces the per-image quantile."""
    guidance = {"rule": guide.rule, "quantile": guide.quantile, "window": [float(v) for v in guide.window]}
    if guide.rule == "gradient":
        guidance.update(sign=guide.sign, lam=guide.lam, grad_wrt=guide.grad_wrt, reduce=guide.reduce)
    else:
        guidance["prior_precision"] = guide.prior_precision
    if guide.table:
        guidance.update(threshold="table", table=str(Path(guide.table).resolve()))
        del guidance["quantile"]
    return guidance


def estimator_settings(args: Namespace) -> tuple[str, dict, Optional[dict]]:
    """(estimator, its options, guidance options or None), named as the hooks' constructors name them."""
    est, m_option, guide = args.estimator.name, args.estimator.M, args.guidance
    if est not in ESTIMATOR_CHOICES:
        raise InputError(f"unknown estimator {est!r}; choose one of {', '.join(ESTIMATOR_CHOICES)}")
    m = 5 if m_option is None else m_option
    window = [float(v) for v in args.estimator.window]
    score = score_options(args)
    if score and (guide.rule != "none" or est not in ("aleatoric", "mc_dropout")):
        raise InputError(f"--estimator.score {score['score']} applies to the scores of the aleatoric (and MC-Dropout) "
                         f"estimator of an unguided run; this run is {'guided' if guide.rule != 'none' else est}")
    if guide.rule != "none":
        if est not in ("aleatoric", "none"):
            raise InputError(f"--guidance.rule uses the aleatoric estimator; got --estimator.name {est}")
        guidance = guidance_settings(guide)
        return "aleatoric", {"num_perturbations": m, "variant": args.estimator.variant,
                             "estimate_window": window}, guidance
    if est == "none":
        if m_option is not None:
            raise InputError("--estimator.M needs an estimator (--estimator.name aleatoric | mc_dropout)")
        return est, {}, None
    if est == "aleatoric":
        return est, {"num_perturbations": m, "variant": args.estimator.variant, "window": window, **score}, None
    if est == "mc_dropout":
        if score:
            raise InputError("--estimator.score_reference holds statistics of the aleatoric maps (from calibrate), "
                             "not of MC-Dropout's: score MC-Dropout with --estimator.score sum")
        return est, {"num_passes": m, "dropout": args.estimator.dropout, "window": window}, None
    if m_option is not None:
        raise InputError("BayesDiff's number of draws is --bayesdiff.draws, not --estimator.M")
    return est, {"num_draws": args.bayesdiff.draws, "skip": args.bayesdiff.skip,
                 "moments": args.bayesdiff.moments}, None


def score_options(args: Namespace) -> dict:
    """The estimator options of `--estimator.score` (none for the default `sum`, so the settings of
    runs that don't use a variant stay as they were): the variant and its reference file's absolute
    path, which must be given exactly for the normalised variants."""
    score, reference = args.estimator.score, args.estimator.score_reference
    if score == "sum":
        if reference is not None:
            raise InputError("--estimator.score_reference is used only by --estimator.score step_normalized | "
                             "standardized")
        return {}
    if reference is None:
        raise InputError(f"--estimator.score {score} needs the per-step reference statistics of unguided samples: "
                         f"pass --estimator.score_reference <table>.reference.pt (written by `calibrate`)")
    return {"score": score, "reference": str(Path(reference).resolve())}


def check_score_reference(path: str, sampler: dict, options: dict) -> None:
    """Refuse a score reference file of another step count, sampler, M or map variant than this
    run's (settings the file doesn't record are not checked)."""
    from uncdiff.uncertainty.score_reference import load_score_reference

    try:
        _, made = load_score_reference(path, sampler["steps"])
    except ValueError as error:
        raise InputError(f"--estimator.score_reference: {error}") from None
    run = {"sampler": sampler, "num_perturbations": options["num_perturbations"], "variant": options["variant"]}
    made = {key: value for key, value in made.items() if key in run}
    differ = settings_differences(made, {key: run[key] for key in made})
    if differ:
        raise InputError(f"--estimator.score_reference {path} was calibrated with other settings (the file's there, "
                         f"this run's here: {'; '.join(differ)}): calibrate it for this run, or match its options")


def estimator_hook(module, estimator: str, options: dict, guidance: Optional[dict]) -> Any:
    """The sampler hook `DiffusionModule.sample` builds for these settings (built here to check
    them before sampling, and for the AUSE experiment, which denoises outside `sample`)."""
    if estimator == "bayesdiff" and module.laplace is None:  # options checked before the Laplace fit
        return make_estimator("bayesdiff", net=module.ema.ema_model, laplace=None, **options)
    return build_hook(estimator, options, guidance, net=module.ema.ema_model, laplace=module.laplace,
                      image_shape=module.image_shape)


def threshold_table(path: str, module):
    """The `[steps, C, H, W]` threshold table saved at `path`, checked against the model's image shape
    (`build_settings` checks its step count against the run's)."""
    from uncdiff.uncertainty.guidance import table_from_file

    try:
        return table_from_file(path, image_shape=module.image_shape)
    except ValueError as error:
        raise InputError(f"--guidance.table: {error}") from None


def check_table_settings(path: str, sampler: dict, options: dict) -> None:
    """Refuse a threshold table calibrated with another sampler, M or map variant than this run's:
    its quantiles would describe other maps. Settings the file doesn't record are not checked."""
    from uncdiff.uncertainty.guidance import load_table

    run = {"sampler": sampler, "num_perturbations": options["num_perturbations"], "variant": options["variant"]}
    made = {key: value for key, value in load_table(path)[1].items() if key in run}
    differ = settings_differences(made, {key: run[key] for key in made})
    if differ:
        raise InputError(f"--guidance.table {path} was calibrated with other settings (the table's there, this "
                         f"run's here: {'; '.join(differ)}): calibrate a table for this run, or match its options")


def check_seeds(args: Namespace) -> None:
    if not 0 <= args.seed <= MAX_SEED - args.n:
        raise InputError(f"seeds must lie in [0, 2**32): --seed {args.seed} with --n {args.n} does not")
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {args.batch_size}")


def build_settings(args: Namespace, module, checkpoint_sha256: str, laplace: Optional[dict],
                   save_maps: bool = True) -> dict:
    """The JSON-able settings that define a sampling run (its run.json), every option checked.
    Options that don't change what is written (processes, progress bar) are not part of them."""
    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    check_seeds(args)
    sampler = sampler_settings(args.sampler, module, args.estimator.name)
    try:
        build_sampler(module, sampler)
    except ValueError as error:
        raise input_error("sampler", error) from None
    estimator, options, guidance = estimator_settings(args)
    try:
        estimator_hook(module, estimator, options, guidance)
    except ValueError as error:
        raise input_error(f"estimator {estimator}" + (" (guided)" if guidance else ""), error) from None
    if estimator == "bayesdiff" and not (sampler["name"] == "ddim" and sampler["eta"] == 0 and not sampler["clip"]):
        raise InputError("--estimator.name bayesdiff propagates moments through deterministic DDIM steps: it needs "
                         "--sampler.name ddim, --sampler.eta 0 and --sampler.clip false")
    if "reference" in options:
        check_score_reference(options["reference"], sampler, options)
    if guidance is not None and "table" in guidance:
        steps = threshold_table(guidance["table"], module).shape[0]
        if steps != sampler["steps"]:
            raise InputError(f"--guidance.table was calibrated for {steps} steps; this run has {sampler['steps']}")
        check_table_settings(guidance["table"], sampler, options)
    p = args.filtering.drop_fraction
    if p is not None:
        if estimator == "none":
            raise InputError("--filtering.drop_fraction needs an estimator's scores; --estimator.name none gives none")
        if not 0.0 < p < 1.0:
            raise InputError(f"--filtering.drop_fraction must lie in (0, 1), got {p}")
    elif estimator != "none":
        p = DEFAULT_DROP_FRACTION
    settings = {"format": 1, "checkpoint_sha256": checkpoint_sha256,
                "seeds": {"start": args.seed, "count": args.n}, "batch_size": args.batch_size,
                "sampler": sampler, "estimator": estimator, "estimator_options": options, "guidance": guidance,
                "laplace": laplace, "drop_fraction": p, "save_maps": save_maps,
                "guidance_table_sha256": file_sha256(Path(guidance["table"])) if guidance and "table" in guidance
                else None}
    if "reference" in options:  # only then: the settings of runs without a score variant stay as they were
        settings["score_reference_sha256"] = file_sha256(Path(options["reference"]))
    return settings


def build_sampler(module, sampler: dict):
    """The sampler of a `sampler_settings` dict (name, steps and the sampler's own options)."""
    return make_sampler(module.schedule, sampler["name"], **{k: v for k, v in sampler.items() if k != "name"})


def sample_kwargs(settings: dict) -> dict:
    """`DiffusionModule.sample` arguments of a run (all but the seeds)."""
    sampler = dict(settings["sampler"])
    return {"sampler": sampler.pop("name"), "steps": sampler.pop("steps"), "estimator": settings["estimator"],
            "estimator_options": settings["estimator_options"], "guidance": settings["guidance"], **sampler}


