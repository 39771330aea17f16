"""The settings that define a sampling run: the run spec (`uncdiff.uncertainty.spec`: `SamplerSpec`,
`EstimatorSpec`, `GuidanceSpec`) built from the `sampler`, `estimator` and `guidance` options, each
checked once by the spec itself, and the JSON-able record a sample set is identified by (its run.json,
compared on resume). Threshold tables and score references are read by `uncdiff.io.tables` and handed
to the specs as values. A problem is an `InputError` naming the option, raised before anything is written.
"""

import dataclasses
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace

from uncdiff.core.samplers import MAX_SEED, make_sampler
from uncdiff.io.files import InputError
from uncdiff.io.sample_store import settings_differences
from uncdiff.io.tables import SETTINGS_FORMAT, load_score_reference, load_threshold_table
from uncdiff.lightning.loading import file_sha256
from uncdiff.uncertainty.sampling import build_hook
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec, check_run, spec_from_dict

DEFAULT_DROP_FRACTION = 1 / 6  # docs/algorithms.md §3: keep 50k of 60k


def input_error(option: str, error: Exception) -> InputError:
    return InputError(f"{option}: {error}")


def spec(cls: type, options: Any) -> Any:
    """`spec_from_dict(cls, options)`, its ValueError (which names the option) as an InputError."""
    try:
        return spec_from_dict(cls, options)
    except ValueError as error:
        raise InputError(f"--{error}") from None


def run_specs(args: Namespace, module) -> tuple[SamplerSpec, EstimatorSpec, GuidanceSpec]:
    """The run's specs from its options: the sampler resolved against the model (its own where unset),
    the score reference and threshold table files (`--score_reference`, `--guidance_table`) loaded
    into the estimator and guidance, everything checked together."""
    estimator, guidance = spec(EstimatorSpec, args.estimator), spec(GuidanceSpec, args.guidance)
    try:
        sampler = module.resolve_sampler(spec(SamplerSpec, args.sampler), estimator)
        check_run(sampler, estimator, guidance)
        make_sampler(module.schedule, sampler.name, steps=sampler.steps, **sampler.options())
    except ValueError as error:
        raise InputError(f"--{error}" if str(error).startswith(("sampler.", "estimator.", "guidance.")) else
                         f"sampler: {error}") from None
    return sampler, *with_files(args, sampler, module, estimator, guidance)


def with_files(args: Namespace, sampler: SamplerSpec, module, estimator: EstimatorSpec,
               guidance: GuidanceSpec) -> tuple[EstimatorSpec, GuidanceSpec]:
    """The specs with `--score_reference` and `--guidance_table` loaded, each checked to be made with
    this run's sampler, M and map variant (settings a file doesn't record are not checked)."""
    run = {"sampler": sampler.settings(), "M": estimator.M, "variant": estimator.variant}
    if args.score_reference is not None:
        if estimator.score == "sum":
            raise InputError("--score_reference is used only by --estimator.score step_normalized | standardized")
        try:
            reference, made = load_score_reference(args.score_reference, sampler.steps)
        except ValueError as error:
            raise input_error("--score_reference", error) from None
        check_made_with("--score_reference", args.score_reference, made, run)
        try:
            estimator = dataclasses.replace(estimator, reference=reference)
        except ValueError as error:
            raise input_error("--score_reference", error) from None
    elif estimator.needs_reference:
        raise InputError(f"--estimator.score {estimator.score} needs the per-step reference statistics of unguided "
                         f"samples: pass --score_reference <table>.reference.pt (written by `calibrate`)")
    if args.guidance_table is not None:
        if not guidance.enabled:
            raise InputError("--guidance_table is used only with a --guidance.rule")
        try:
            table, made = load_threshold_table(args.guidance_table, sampler.steps, module.image_shape)
        except ValueError as error:
            raise input_error("--guidance_table", error) from None
        check_made_with("--guidance_table", args.guidance_table, made, run)
        guidance = dataclasses.replace(guidance, table=table)
    return estimator, guidance


def check_made_with(option: str, path: str, made: dict, run: dict) -> None:
    """Refuse a file calibrated with other settings than this run's: its statistics would describe
    other maps."""
    made = {key: value for key, value in made.items() if key in run}
    differ = settings_differences(made, {key: run[key] for key in made})
    if differ:
        raise InputError(f"{option} {path} was calibrated with other settings (the file's there, this run's here: "
                         f"{'; '.join(differ)}): calibrate it for this run, or match its options")


def estimator_hook(module, estimator: EstimatorSpec, guidance: Optional[GuidanceSpec] = None, steps=None) -> Any:
    """The sampler hook `sample` builds for these specs (built here to check them before sampling,
    and for the AUSE experiment, which denoises outside `sample`); BayesDiff's and the generative
    estimator's are checked only by their spec until the posterior is there (the generative feature
    extractor is built first: one that doesn't fit the model fails here)."""
    features = module.generative_features(estimator)
    if estimator.needs_laplace and module.laplace is None:
        return None
    return build_hook(estimator, guidance, net=module.ema.ema_model, laplace=module.laplace, steps=steps,
                      image_shape=module.image_shape, features=features)


def check_seeds(args: Namespace) -> None:
    if not 0 <= args.seed <= MAX_SEED - args.n:
        raise InputError(f"seeds must lie in [0, 2**32): --seed {args.seed} with --n {args.n} does not")
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {args.batch_size}")


def drop_fraction(args: Namespace, estimator: EstimatorSpec) -> Optional[float]:
    p = args.filtering.drop_fraction
    if p is None:
        return DEFAULT_DROP_FRACTION if estimator.enabled else None
    if not estimator.enabled:
        raise InputError("--filtering.drop_fraction needs an estimator's scores; --estimator.name none gives none")
    if not 0.0 < p < 1.0:
        raise InputError(f"--filtering.drop_fraction must lie in (0, 1), got {p}")
    return p


def build_settings(args: Namespace, module, checkpoint_sha256: str, laplace: Optional[dict],
                   save_maps: bool = True) -> dict:
    """The JSON-able settings that define a sampling run (its run.json), every option checked. The
    files it reads are recorded by path and hash. Options that don't change what is written
    (processes, progress bar) are not part of them."""
    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    check_seeds(args)
    sampler, estimator, guidance = run_specs(args, module)
    try:
        estimator_hook(module, estimator, guidance, sampler.steps)
    except (ValueError, FileNotFoundError) as error:  # FileNotFoundError: Inception weights, for features
        raise input_error(f"estimator {estimator.name}" + (" (guided)" if guidance.enabled else ""), error) from None
    files = {}
    for name, path in (("score_reference", args.score_reference), ("guidance_table", args.guidance_table)):
        if path is not None:
            files[name] = {"path": str(Path(path).resolve()), "sha256": file_sha256(Path(path))}
    return {"format": SETTINGS_FORMAT, "checkpoint_sha256": checkpoint_sha256,
            "seeds": {"start": args.seed, "count": args.n}, "batch_size": args.batch_size,
            "sampler": sampler.settings(), "estimator": estimator.settings(), "guidance": guidance.settings(),
            "files": files, "laplace": laplace, "drop_fraction": drop_fraction(args, estimator),
            "save_maps": save_maps}


def build_sampler(module, sampler: dict):
    """The sampler of a run's `sampler` record (name, steps and the sampler's own options)."""
    return make_sampler(module.schedule, sampler["name"], **{k: v for k, v in sampler.items() if k != "name"})


def sample_kwargs(settings: dict) -> dict:
    """`sample` arguments of a run's record (all but the seeds): its specs, with the files it names loaded."""
    files, steps = settings.get("files", {}), settings["sampler"]["steps"]
    estimator = dict(settings["estimator"])
    if "score_reference" in files:
        estimator["reference"] = load_score_reference(files["score_reference"]["path"], steps)[0]
    guidance = GuidanceSpec(**{k: v for k, v in (settings["guidance"] or {}).items() if k != "threshold"})
    if "guidance_table" in files:
        guidance = dataclasses.replace(guidance, table=load_threshold_table(files["guidance_table"]["path"], steps)[0])
    return {"sampler": SamplerSpec(**settings["sampler"]), "estimator": EstimatorSpec(**estimator),
            "guidance": guidance}
