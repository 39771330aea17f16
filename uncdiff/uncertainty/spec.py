"""A sampling run as typed values: the sampler, the uncertainty estimator, guidance and the score variant
(docs/algorithms.md §2-5). One name per knob, checked once in `__post_init__` with a message that names
the option as a config spells it (`estimator.M must be an integer >= 2, got 1`).

The same objects configure every entry point:
- `DiffusionModule.sample(n, seed, seeds, sampler=SamplerSpec(...), estimator=EstimatorSpec(...),
  guidance=GuidanceSpec(...))` and `ImageToImageModule.sample(condition, mask, ...)` (the same
  arguments plus the condition);
- the callbacks, whose `sampler`, `estimator` and `guidance` init arguments are these dataclasses, so
  LightningCLI checks a YAML's `init_args` against them;
- the commands: `parser.add_class_arguments(SamplerSpec, "sampler")` (likewise `EstimatorSpec` as
  "estimator", `GuidanceSpec` as "guidance") gives `--sampler.steps`, `--estimator.M`, `--guidance.lam`;
  pass `skip={"reference"}` / `skip={"table"}` and add a path option for the file that `uncdiff.io.tables`
  loads into those fields (`dataclasses.replace(spec, table=...)`). `spec_from_dict(EstimatorSpec, d)`
  builds one from a plain dict or jsonargparse Namespace, refusing unknown keys by name.

Fields holding loaded values (`EstimatorSpec.reference`, `GuidanceSpec.table`) are values, never paths:
nothing here reads a file. `settings()` gives each spec's JSON-able record (what a run directory's
run.json, a threshold table and a score reference keep, numbered `uncdiff.io.tables.SETTINGS_FORMAT`), with
only the options that apply (BayesDiff records no M, an unguided run no guidance).

`None` in `SamplerSpec` means "the model's own" (its `sampler`/`sample_steps` hyperparameters, a
diffusers scheduler's clipping, spacing and variance); `SamplerSpec.resolve` fills them in.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

import torch

from uncdiff.core.samplers import CLIPPED_EPS, DDPM_VARIANCES, SPACINGS
from uncdiff.uncertainty.bayesdiff import MOMENT_ESTIMATORS
from uncdiff.uncertainty.estimators import SCORES, VARIANTS, check_score, check_window
from uncdiff.uncertainty.guidance import ABAR_INVERSE, GRAD_WRT, REDUCTIONS, RULES
from uncdiff.uncertainty.trajectory import DEFAULT_WINDOW as TRAJECTORY_WINDOW

SAMPLER_NAMES = ("ddim", "ddpm")
ESTIMATOR_NAMES = ("none", "aleatoric", "mc_dropout", "bayesdiff", "x0_trajectory", "generative")
LAPLACE_ESTIMATORS = ("bayesdiff", "generative")  # the estimators that need the last-layer Laplace posterior
GENERATIVE_FEATURES = ("pixels", "digits-classifier", "inception")  # the feature spaces of the generative score
GUIDANCE_RULES = ("none", *RULES)


def _one_of(option: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _integer(option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(option: str, value: Any, low: float, high: float, low_open: bool = False,
            high_open: bool = False, what: str = "") -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    inside = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if isinstance(value, bool) or not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{option} must be {what or 'a number'} in {interval}, got {value!r}")
    return x


def _window(option: str, window: Any) -> tuple[float, float]:
    try:
        return check_window(option, window)
    except ValueError as error:
        raise ValueError(str(error)) from None


def _set(spec: Any, name: str, value: Any) -> None:
    object.__setattr__(spec, name, value)  # the specs are frozen; __post_init__ stores normalised values


# ------------------------------------------------------------------------------------------ sampler

@dataclass(frozen=True)
class SamplerSpec:
    """The sampler (docs/algorithms.md §2). `None`: the model's own (see `resolve`).

    - `name`: ddim | ddpm; `steps`: sampler steps (>= 1);
    - DDIM only: `eta` (in [0, 1]; null: 0), `spacing` of the timesteps (null: uniform, or a diffusers
      model's), `clipped_eps` (with clipping: eps re-derived from the clipped x0, or the network's kept);
    - DDPM only: `variance` (beta_tilde | beta; null: beta_tilde, or a diffusers model's);
    - `clip`: clip x0 to [-1, 1], or a number: to [-clip, clip] (null: on, or a diffusers model's;
      off for BayesDiff, whose moments need affine steps).
    """

    name: Optional[Literal["ddim", "ddpm"]] = None
    steps: Optional[int] = None
    eta: Optional[float] = None
    spacing: Optional[Literal["uniform", "quadratic", "leading", "trailing", "linspace"]] = None
    clip: Optional[Union[bool, float]] = None
    clipped_eps: Optional[Literal["rederive", "keep"]] = None
    variance: Optional[Literal["beta_tilde", "beta"]] = None

    def __post_init__(self):
        if self.name is not None:
            _one_of("sampler.name", self.name, SAMPLER_NAMES)
        if self.steps is not None:
            _set(self, "steps", _integer("sampler.steps", self.steps, 1))
        if self.eta is not None:
            _set(self, "eta", _number("sampler.eta", self.eta, 0.0, 1.0))
        if self.spacing is not None:
            _one_of("sampler.spacing", self.spacing, SPACINGS)
        if self.clipped_eps is not None:
            _one_of("sampler.clipped_eps", self.clipped_eps, CLIPPED_EPS)
        if self.variance is not None:
            _one_of("sampler.variance", self.variance, DDPM_VARIANCES)
        if self.clip is not None and not isinstance(self.clip, bool):
            _set(self, "clip", _number("sampler.clip", self.clip, 0.0, math.inf, high_open=True,
                                       what="true, false or a clipping range"))
        ddim_only = [f"sampler.{k}" for k in ("eta", "spacing", "clipped_eps") if getattr(self, k) is not None]
        if self.name == "ddpm" and ddim_only:
            raise ValueError(f"{', '.join(ddim_only)} {'applies' if len(ddim_only) == 1 else 'apply'} to sampler.name "
                             f"ddim, not ddpm")
        if self.name == "ddim" and self.variance is not None:
            raise ValueError("sampler.variance applies to sampler.name ddpm, not ddim")

    def resolve(self, name: str, steps: int, own: Optional[Mapping] = None, clip: bool = True) -> "SamplerSpec":
        """Every unset option filled in: `name` and `steps` (a model's `sampler`, `sample_steps`), then
        `own` (a diffusers model's clip, spacing, variance), then the samplers' defaults; `clip` is the
        default clipping where neither this spec nor `own` sets it (False for BayesDiff)."""
        own = dict(own or {})
        name = self.name or name
        filled = {"name": name, "steps": self.steps if self.steps is not None else steps,
                  "clip": self.clip if self.clip is not None else (own.get("clip", True) if clip else False)}
        if name == "ddim":
            filled.update(eta=0.0 if self.eta is None else self.eta,
                          spacing=self.spacing or own.get("spacing", "uniform"), clipped_eps=self.clipped_eps)
        else:
            filled["variance"] = self.variance or own.get("variance", "beta_tilde")
        return SamplerSpec(**filled)

    def options(self) -> dict:
        """`make_sampler` keyword arguments beyond name and steps: the options that are set."""
        return {k: v for k, v in self.settings().items() if k not in ("name", "steps")}

    def settings(self) -> dict:
        """The set options as plain values (for a resolved spec, the run's sampler record)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


# ---------------------------------------------------------------------------------------- estimator

@dataclass(frozen=True)
class EstimatorSpec:
    """The uncertainty estimator (docs/algorithms.md §3, §5), one dataclass tagged by `name`:

    - `none`: no estimation (no maps, no scores);
    - `aleatoric`: `M` re-noised perturbations per step, map `variant`, summed over the step `window`
      (fractions of the steps), per-sample `score` variant (`sum`, or `step_normalized` /
      `standardized` with `reference`, the per-step statistics `{'mean': [n], 'std': [n]}` that
      `uncdiff.io.tables.load_score_reference` loads from calibrate's file; they may be set after the
      rest, `needs_reference`, but must be there when sampling);
    - `mc_dropout`: `M` dropout passes per step at rate `dropout` (null: the model's own), over `window`;
    - `bayesdiff`: last-layer Laplace propagated through DDIM, `draws` per UQ step, UQ every `skip`-th
      step, covariance estimator `moments` (regression | paper);
    - `x0_trajectory` (§6c, Aithal et al.): the variance of the sampler's x0 estimate over the steps of
      `window`; no network evaluations beyond sampling;
    - `generative` (§6c, Jazbec et al.): `M` more chains from the same x_T under last-layer weights drawn
      from BayesDiff's Laplace posterior, scored by the disagreement of their final samples in the
      feature space `features`: `pixels`, or an FID feature extractor's (`digits-classifier`,
      `inception`; `uncdiff.evaluation.fid.make_extractor`), the dataset's own feature space.
    `window` null means the estimator's own default (`default_window`): every step, `(0, 1)`, for
    `aleatoric` and `mc_dropout`; the last fifth, `(0.8, 1)`, for `x0_trajectory`; `estimation_window`
    is the one the run uses.
    `chunk_size` caps the rows of one network call (null: all at once); `keep_maps` keeps every step's
    map (`SampleResult.step_maps`). Guided runs use the aleatoric estimator with `M`, `variant` and
    `window` (the estimation window; guidance's own is `GuidanceSpec.window`).
    """

    name: Literal["none", "aleatoric", "mc_dropout", "bayesdiff", "x0_trajectory", "generative"] = "none"
    M: int = 5
    variant: Literal["centered", "sample"] = "centered"
    window: Optional[tuple[float, float]] = None
    score: Literal["sum", "step_normalized", "standardized"] = "sum"
    reference: Optional[dict] = None
    dropout: Optional[float] = None
    draws: int = 10
    skip: int = 5
    moments: Literal["regression", "paper"] = "regression"
    features: Literal["pixels", "digits-classifier", "inception"] = "pixels"
    chunk_size: Optional[int] = None
    keep_maps: bool = False

    def __post_init__(self):
        _one_of("estimator.name", self.name, ESTIMATOR_NAMES)
        _set(self, "M", _integer("estimator.M", self.M, 2))
        _one_of("estimator.variant", self.variant, VARIANTS)
        if self.window is not None:
            _set(self, "window", _window("estimator.window", self.window))
        _one_of("estimator.score", self.score, SCORES)
        if self.reference is not None:  # a normalised score's statistics may come later (`needs_reference`)
            try:
                _, reference = check_score(self.score, self.reference)
            except ValueError as error:
                raise ValueError(f"estimator.reference: {error}") from None
            _set(self, "reference", reference)
        if self.score != "sum" and self.name != "aleatoric":
            raise ValueError(f"estimator.score {self.score} applies to the aleatoric estimator (its reference "
                             f"statistics are of aleatoric maps, from calibrate); estimator.name is {self.name}")
        if self.dropout is not None:
            _set(self, "dropout", _number("estimator.dropout", self.dropout, 0.0, 1.0, high_open=True,
                                          what="null (the model's own rate) or a rate"))
        _set(self, "draws", _integer("estimator.draws", self.draws, 2))
        _set(self, "skip", _integer("estimator.skip", self.skip, 1))
        _one_of("estimator.moments", self.moments, MOMENT_ESTIMATORS)
        _one_of("estimator.features", self.features, GENERATIVE_FEATURES)
        if self.features != "pixels" and self.name != "generative":
            raise ValueError(f"estimator.features {self.features} applies to the generative estimator (the space "
                             f"its chains' disagreement is measured in); estimator.name is {self.name}")
        if self.chunk_size is not None:
            _set(self, "chunk_size", _integer("estimator.chunk_size", self.chunk_size, 1))
        _set(self, "keep_maps", bool(self.keep_maps))

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def default_window(self) -> tuple[float, float]:
        """The window of this estimator when `window` is null (docs/algorithms.md §3, §6c)."""
        return TRAJECTORY_WINDOW if self.name == "x0_trajectory" else (0.0, 1.0)

    @property
    def estimation_window(self) -> tuple[float, float]:
        """The window this run estimates over: `window`, or the estimator's default."""
        return self.default_window if self.window is None else self.window

    @property
    def needs_laplace(self) -> bool:
        """Whether the estimator draws on the last-layer Laplace posterior (fit or load it first)."""
        return self.name in LAPLACE_ESTIMATORS

    @property
    def needs_reference(self) -> bool:
        """Whether the score variant divides by reference statistics not given yet: load calibrate's file
        (`uncdiff.io.tables.load_score_reference`) into `reference` before sampling."""
        return self.score != "sum" and self.reference is None

    def settings(self) -> dict:
        """The options of this estimator as plain values (a run's `estimator` record): name and what
        applies to it; the score variant only when it is not `sum` (its statistics are recorded by
        the file's hash, not here), the generative feature space only when it is not `pixels`."""
        own = {"none": (), "aleatoric": ("M", "variant", "window"), "mc_dropout": ("M", "dropout", "window"),
               "bayesdiff": ("draws", "skip", "moments"), "x0_trajectory": ("window",),
               "generative": ("M",)}[self.name]
        record = {"name": self.name, **{k: getattr(self, k) for k in own}}
        if "window" in record:
            record["window"] = list(self.estimation_window)
        if self.score != "sum":
            record["score"] = self.score
        if self.features != "pixels":
            record["features"] = self.features
        return record


# ----------------------------------------------------------------------------------------- guidance

@dataclass(frozen=True)
class GuidanceSpec:
    """Uncertainty guidance (docs/algorithms.md §4); it estimates with the aleatoric estimator.

    - `rule`: none | gradient | posterior;
    - gradient rule: `sign` (+1 or -1), step size `lam` (>= 0), `grad_wrt` (differentiate U with respect
      to eps_bar, or x_t as the released code), `reduce` (U per image, or averaged over the batch);
    - posterior rule: `prior_precision` of the N(0, 1/p) prior on eps, a number >= 0 or `abar_inverse`;
    - threshold: per image the `quantile` of its own map, or, when `table` is given, `table[step]`
      (`[steps, C, H, W]`, loaded by `uncdiff.io.tables.load_threshold_table`);
    - `window`: the guided steps, as fractions of the steps (default: the first 3 of 20).
    """

    rule: Literal["none", "gradient", "posterior"] = "none"
    sign: int = 1
    lam: float = 1.0
    grad_wrt: Literal["eps", "x_t"] = "eps"
    reduce: Literal["sum", "mean"] = "sum"
    prior_precision: Union[float, Literal["abar_inverse"]] = 1.0
    quantile: float = 0.95
    table: Optional[torch.Tensor] = None
    window: tuple[float, float] = (0.0, 0.15)

    def __post_init__(self):
        _one_of("guidance.rule", self.rule, GUIDANCE_RULES)
        if isinstance(self.sign, bool) or self.sign not in (1, -1):
            raise ValueError(f"guidance.sign must be +1 or -1, got {self.sign!r}")
        _set(self, "sign", int(self.sign))
        _set(self, "lam", _number("guidance.lam", self.lam, 0.0, math.inf, high_open=True))
        _one_of("guidance.grad_wrt", self.grad_wrt, GRAD_WRT)
        _one_of("guidance.reduce", self.reduce, REDUCTIONS)
        if self.prior_precision != ABAR_INVERSE:
            try:
                _set(self, "prior_precision", _number("guidance.prior_precision", self.prior_precision, 0.0,
                                                      math.inf, high_open=True))
            except ValueError:
                raise ValueError(f"guidance.prior_precision must be a finite number >= 0 or {ABAR_INVERSE!r}, "
                                 f"got {self.prior_precision!r}") from None
        _set(self, "quantile", _number("guidance.quantile", self.quantile, 0.0, 1.0, True, True))
        if self.table is not None and (not isinstance(self.table, torch.Tensor) or self.table.dim() != 4):
            got = getattr(self.table, "shape", self.table)
            raise ValueError(f"guidance.table must be a threshold table tensor [steps, C, H, W] (load the file with "
                             f"uncdiff.io.tables.load_threshold_table), got {got!r}")
        _set(self, "window", _window("guidance.window", self.window))

    @property
    def enabled(self) -> bool:
        return self.rule != "none"

    def settings(self) -> Optional[dict]:
        """The options of this rule as plain values (a run's `guidance` record), None without guidance; a
        threshold table is recorded as `threshold: table` (the file by its hash, not here)."""
        if not self.enabled:
            return None
        record: dict = {"rule": self.rule, "window": list(self.window)}
        if self.rule == "gradient":
            record.update(sign=self.sign, lam=self.lam, grad_wrt=self.grad_wrt, reduce=self.reduce)
        else:
            record["prior_precision"] = self.prior_precision
        if self.table is None:
            record["quantile"] = self.quantile
        else:
            record["threshold"] = "table"
        return record


# --------------------------------------------------------------------------------------- a whole run

def check_run(sampler: SamplerSpec, estimator: EstimatorSpec, guidance: GuidanceSpec) -> None:
    """The checks that involve more than one spec: a ValueError naming the options that don't go together.
    A sampler option left unset (the model's own) is checked once `resolve`d."""
    if guidance.enabled:
        if estimator.name not in ("none", "aleatoric"):
            raise ValueError(f"guidance.rule {guidance.rule} estimates with the aleatoric estimator; estimator.name "
                             f"is {estimator.name}")
        if estimator.score != "sum":
            raise ValueError(f"estimator.score {estimator.score} applies to unguided runs (its reference statistics "
                             f"are of unguided samples); this run is guided")
    if estimator.name == "bayesdiff":
        bad = [text for text, wrong in (("sampler.name ddim", sampler.name not in (None, "ddim")),
                                        ("sampler.eta 0", sampler.eta not in (None, 0.0)),
                                        ("sampler.clip false", sampler.clip not in (None, False, 0.0)))
               if wrong]
        if bad:
            raise ValueError(f"estimator.name bayesdiff propagates moments through deterministic DDIM steps: it needs "
                             f"{', '.join(bad)}")


def spec_from_dict(cls: type, options: Any) -> Any:
    """A spec of dataclass `cls` from a plain dict, a jsonargparse Namespace, None (the defaults) or an
    instance of `cls` (returned as is); a key `cls` doesn't have is a ValueError naming it."""
    if isinstance(options, cls):
        return options
    if options is None:
        return cls()
    if hasattr(options, "as_dict"):  # a jsonargparse Namespace
        options = options.as_dict()
    if not isinstance(options, Mapping):
        raise TypeError(f"{cls.__name__} options must be a mapping, got {type(options).__name__}")
    prefix = {SamplerSpec: "sampler", EstimatorSpec: "estimator", GuidanceSpec: "guidance"}.get(cls, cls.__name__)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; {prefix} takes "
                         f"{', '.join(names)}")
    return cls(**options)
