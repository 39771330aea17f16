"""The sample sets `evaluate`'s experiments need (docs/algorithms.md §6), each an `uncdiff sample` run
in <out>/sets/<name>: which sets, and how each one's options differ from the command's. `options` is
the command's parsed options (`--experiments`, `--estimators`, `--sweep.*`,
`--n`, `--estimator.moments`)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uncdiff.io.sample_store import SampleStore
from uncdiff.uncertainty.bayesdiff import MOMENT_ESTIMATORS

EXPERIMENTS = ("filtering", "study", "guidance", "ause", "cost")  # the default ones
OPTIONAL_EXPERIMENTS = ("sweep", "detection")  # run only when named: expensive, or for shapes models only
FID_EXPERIMENTS = ("filtering", "study", "guidance", "sweep")  # the ones that compute FID features
FILTERING_ESTIMATORS = ("aleatoric", "mc_dropout", "bayesdiff")
PEER_ESTIMATORS = ("x0_trajectory", "generative")  # sampled for detection, or when --estimators names them
DETECTION_ESTIMATORS = (*FILTERING_ESTIMATORS, *PEER_ESTIMATORS)
GUIDED = ["guided-gradient-plus", "guided-gradient-minus", "guided-posterior"]  # the guidance experiment's sets
# sample set -> how its options differ from the command's (see `set_overrides`)
SETS = {
    "plain": {"estimator.name": "none", "filtering.drop_fraction": None},
    "aleatoric": {"estimator.name": "aleatoric"},
    "mc_dropout": {"estimator.name": "mc_dropout"},
    "bayesdiff": {"estimator.name": "bayesdiff", "sampler.clip": False},
    "x0_trajectory": {"estimator.name": "x0_trajectory", "estimator.window": None},  # its own last fifth
    "generative": {"estimator.name": "generative"},
    GUIDED[0]: {"guidance.rule": "gradient", "guidance.sign": 1},
    GUIDED[1]: {"guidance.rule": "gradient", "guidance.sign": -1},
    GUIDED[2]: {"guidance.rule": "posterior"},
}


@dataclass
class Plan:
    """Everything `evaluate` runs, checked: the report folder, its settings and the sample sets."""

    root: Path
    settings: dict
    stores: dict[str, SampleStore]
    extractor: str
    dataset: str
    notes: list[str] = field(default_factory=list)
    ause: dict[str, dict] = field(default_factory=dict)  # estimator -> sampling settings of its AUSE maps
    ause_hooks: dict = field(default_factory=dict)  # estimator -> its sampler hook, for the AUSE denoising
    ause_sampler: Any = None  # the sampler of the AUSE denoising
    lock: Any = None  # <out>'s lock (uncdiff.io.lock), held as long as the plan (the run)


def moments_sets(options) -> dict[str, dict]:
    """The filtering experiment's second BayesDiff set: the same seeds with the other covariance
    estimator (docs/algorithms.md §5b), so that the report counts the negative scores of both."""
    if "filtering" not in options.experiments or "bayesdiff" not in options.estimators:
        return {}
    other = next(m for m in MOMENT_ESTIMATORS if m != options.estimator.moments)
    return {f"bayesdiff-{other}": {**SETS["bayesdiff"], "estimator.moments": other}}


def sweep_sets(options) -> dict[str, dict]:
    """The sample sets of the guidance sweep -> how their options differ from the command's: the
    gradient rule at each lam for each grad_wrt, the posterior rule at each prior precision."""
    if "sweep" not in options.experiments:
        return {}
    sweep = options.sweep
    common = {"n": sweep.n or options.n, "guidance.sign": sweep.sign}
    sets = {f"sweep-gradient-{wrt}-lam{lam:g}": {**common, "guidance.rule": "gradient", "guidance.grad_wrt": wrt,
                                                  "guidance.lam": float(lam)}
            for wrt in sweep.grad_wrt for lam in sweep.lams}
    sets.update({f"sweep-posterior-prior{p if isinstance(p, str) else format(p, 'g')}":
                 {**common, "guidance.rule": "posterior", "guidance.prior_precision": p}
                 for p in sweep.prior_precisions})
    return sets


def set_names(options) -> list[str]:
    """The names of the sets to sample, in a fixed order."""
    names = []
    if "filtering" in options.experiments or "study" in options.experiments:  # the study scores the same sets
        names += list(options.estimators)
    if "detection" in options.experiments:  # and the invalid rates of guided and plain samples
        names += [*DETECTION_ESTIMATORS, "plain", *GUIDED]
    if "guidance" in options.experiments:
        names += ["plain", *GUIDED]
    if "cost" in options.experiments:
        names = ["plain", *names] if names else [n for n in SETS if n not in PEER_ESTIMATORS]
    if "sweep" in options.experiments:
        names.append("plain")
    return [n for n in SETS if n in names] + list(moments_sets(options)) + list(sweep_sets(options))


def needs_laplace(options) -> bool:
    """Whether any set to sample is a BayesDiff or generative set (the cost experiment alone samples
    them too)."""
    return any(name.startswith("bayesdiff") or name == "generative" for name in set_names(options))


def needs_fid(options, shapes: bool = False) -> bool:
    """Whether an experiment to run computes FID features (the detection, AUSE and cost ones don't; on the
    shapes testbed the checker judges the sweep's sets instead, within detection)."""
    return any(name in FID_EXPERIMENTS and not (shapes and name == "sweep") for name in options.experiments)


def set_overrides(options, name: str, dropout: float, features: str = "pixels") -> dict:
    """`{option: value}` of the set `name` that differ from the command's options; the generative set
    scores in `features` (the run's FID extractor, the dataset's feature space, or pixels)."""
    overrides = {"estimator.name": "aleatoric", "guidance.rule": "none", "guidance.sign": 1,
                 **({**SETS, **moments_sets(options)}[name] if name in SETS or name.startswith("bayesdiff")
                    else sweep_sets(options)[name])}
    if name != "aleatoric":  # --estimator.score (docs/algorithms.md §3) scores the aleatoric set only
        overrides.update({"estimator.score": "sum", "score_reference": None})
    if name == "mc_dropout":
        overrides["estimator.dropout"] = dropout
    if name == "generative":
        overrides["estimator.features"] = features
    return overrides
