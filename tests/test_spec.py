"""The run spec (uncdiff/uncertainty/spec.py): every bad value is refused by the option's name as a config
spells it, the defaults are the documented ones (docs/uncertainty.md, docs/algorithms.md), `settings()`
records only what applies, and a sampler resolves to the model's defaults."""

import dataclasses

import pytest
import torch

from uncdiff.uncertainty.spec import (EstimatorSpec, GuidanceSpec, SamplerSpec, check_run, spec_from_dict)


@pytest.mark.parametrize("cls, options, message", [
    (SamplerSpec, {"name": "euler"}, "sampler.name must be one of ddim, ddpm, got 'euler'"),
    (SamplerSpec, {"steps": 0}, "sampler.steps must be an integer >= 1, got 0"),
    (SamplerSpec, {"steps": 2.5}, "sampler.steps must be an integer >= 1, got 2.5"),
    (SamplerSpec, {"steps": True}, "sampler.steps must be an integer"),
    (SamplerSpec, {"eta": 1.5}, r"sampler.eta must be a number in \[0, 1\], got 1.5"),
    (SamplerSpec, {"spacing": "cosine"}, "sampler.spacing must be one of"),
    (SamplerSpec, {"clipped_eps": "drop"}, "sampler.clipped_eps must be one of rederive, keep"),
    (SamplerSpec, {"variance": "learned"}, "sampler.variance must be one of beta_tilde, beta"),
    (SamplerSpec, {"clip": -1.0}, "sampler.clip must be true, false or a clipping range"),
    (SamplerSpec, {"name": "ddpm", "eta": 0.0}, "sampler.eta applies to sampler.name ddim, not ddpm"),
    (SamplerSpec, {"name": "ddpm", "eta": 0.0, "spacing": "uniform"}, "sampler.eta, sampler.spacing apply to"),
    (SamplerSpec, {"name": "ddim", "variance": "beta"}, "sampler.variance applies to sampler.name ddpm"),
    (EstimatorSpec, {"name": "ensemble"}, "estimator.name must be one of none, aleatoric, mc_dropout, bayesdiff, "
                                            "x0_trajectory, generative, got 'ensemble'"),
    (EstimatorSpec, {"name": "generative", "M": 1}, "estimator.M must be an integer >= 2, got 1"),
    (EstimatorSpec, {"name": "x0_trajectory", "window": (0.9, 0.8)}, "estimator.window must satisfy"),
    (EstimatorSpec, {"name": "x0_trajectory", "score": "standardized"}, "estimator.score standardized applies to "
                                                                          "the aleatoric estimator"),
    (EstimatorSpec, {"M": 0}, "estimator.M must be an integer >= 2, got 0"),
    (EstimatorSpec, {"M": 1}, "estimator.M must be an integer >= 2, got 1"),
    (EstimatorSpec, {"variant": "biased"}, "estimator.variant must be one of centered, sample"),
    (EstimatorSpec, {"window": (0.5, 0.5)}, "estimator.window must satisfy 0 <= start < stop <= 1"),
    (EstimatorSpec, {"window": (0.0,)}, "estimator.window must be a pair"),
    (EstimatorSpec, {"score": "mean"}, "estimator.score must be one of sum, step_normalized, standardized"),
    (EstimatorSpec, {"name": "mc_dropout", "score": "standardized"}, "estimator.score standardized applies to the "
                                                                     "aleatoric estimator"),
    (EstimatorSpec, {"name": "aleatoric", "reference": {"mean": torch.ones(2), "std": torch.ones(2)}},
     "estimator.reference: score='sum' uses no reference"),
    (EstimatorSpec, {"name": "aleatoric", "score": "standardized", "reference": {"mean": torch.ones(2)}},
     "estimator.reference: reference must hold"),
    (EstimatorSpec, {"dropout": 1.0}, r"estimator.dropout must be null \(the model's own rate\) or a rate in"),
    (EstimatorSpec, {"draws": 1}, "estimator.draws must be an integer >= 2, got 1"),
    (EstimatorSpec, {"skip": 0}, "estimator.skip must be an integer >= 1, got 0"),
    (EstimatorSpec, {"moments": "spec"}, "estimator.moments must be one of regression, paper, got 'spec'"),
    (EstimatorSpec, {"chunk_size": 0}, "estimator.chunk_size must be an integer >= 1, got 0"),
    (GuidanceSpec, {"rule": "momentum"}, "guidance.rule must be one of none, gradient, posterior"),
    (GuidanceSpec, {"sign": 0}, r"guidance.sign must be \+1 or -1, got 0"),
    (GuidanceSpec, {"sign": True}, r"guidance.sign must be \+1 or -1"),
    (GuidanceSpec, {"lam": -1.0}, "guidance.lam must be a number in"),
    (GuidanceSpec, {"lam": float("inf")}, "guidance.lam must be a number in"),
    (GuidanceSpec, {"grad_wrt": "x0"}, "guidance.grad_wrt must be one of eps, x_t"),
    (GuidanceSpec, {"reduce": "max"}, "guidance.reduce must be one of sum, mean"),
    (GuidanceSpec, {"prior_precision": -1.0}, "guidance.prior_precision must be a finite number >= 0 or "
                                              "'abar_inverse'"),
    (GuidanceSpec, {"prior_precision": "abar"}, "guidance.prior_precision must be"),
    (GuidanceSpec, {"quantile": 1.0}, r"guidance.quantile must be a number in \(0, 1\), got 1.0"),
    (GuidanceSpec, {"table": torch.zeros(4, 4)}, r"guidance.table must be a threshold table tensor \[steps, C, H, W\]"),
    (GuidanceSpec, {"table": "tau.pt"}, "guidance.table must be a threshold table tensor .*load_threshold_table"),
    (GuidanceSpec, {"window": (0.2, 0.1)}, "guidance.window must satisfy"),
])
def test_each_bad_value_is_refused_by_its_option_name(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_defaults_are_the_documented_ones():
    sampler, estimator, guidance = SamplerSpec(), EstimatorSpec(), GuidanceSpec()
    # every sampler option unset: the model's own (resolve)
    assert all(getattr(sampler, f.name) is None for f in dataclasses.fields(sampler))
    # docs/algorithms.md §3, §5: M 5 (perturbations or dropout passes), the whole window, sum score,
    # the model's own dropout rate, BayesDiff's S = 10 draws every 5th step with the regression moments
    assert (estimator.name, estimator.M, estimator.variant, estimator.window, estimator.score) == \
        ("none", 5, "centered", None, "sum")
    # window null: the estimator's own (docs/algorithms.md §3: every step; §6c: the last fifth for x0_trajectory)
    assert EstimatorSpec("aleatoric").estimation_window == EstimatorSpec("mc_dropout").estimation_window == (0.0, 1.0)
    assert EstimatorSpec("x0_trajectory").estimation_window == (0.8, 1.0)
    assert EstimatorSpec("x0_trajectory", window=(0.5, 1)).estimation_window == (0.5, 1.0)
    assert [EstimatorSpec(n).needs_laplace for n in ("aleatoric", "bayesdiff", "x0_trajectory", "generative")] == \
        [False, True, False, True]
    assert (estimator.dropout, estimator.draws, estimator.skip, estimator.moments) == (None, 10, 5, "regression")
    # docs/algorithms.md §4: off; the first 15% of the steps, quantile 0.95, lam 1, sign +1, prior precision 1
    assert not guidance.enabled
    assert (guidance.window, guidance.quantile, guidance.lam, guidance.sign, guidance.prior_precision) == \
        ((0.0, 0.15), 0.95, 1.0, 1, 1.0)


def test_values_are_normalised():
    spec = EstimatorSpec("aleatoric", M=3.0, window=[0, 0.5], reference=None)
    assert spec.M == 3 and isinstance(spec.M, int) and spec.window == (0.0, 0.5)
    assert GuidanceSpec("posterior", prior_precision="2").prior_precision == 2.0
    reference = EstimatorSpec("aleatoric", score="standardized", reference={"mean": [1.0, 2.0], "std": [1.0, 1.0]})
    assert reference.reference["mean"].dtype == torch.float64 and not reference.needs_reference
    assert EstimatorSpec("aleatoric", score="standardized").needs_reference


def test_settings_record_only_what_applies():
    assert EstimatorSpec().settings() == {"name": "none"}
    assert EstimatorSpec("aleatoric", M=3, draws=7).settings() == {"name": "aleatoric", "M": 3, "variant": "centered",
                                                                    "window": [0.0, 1.0]}
    assert EstimatorSpec("mc_dropout", dropout=0.1).settings() == {"name": "mc_dropout", "M": 5, "dropout": 0.1,
                                                                   "window": [0.0, 1.0]}
    assert EstimatorSpec("bayesdiff", M=9).settings() == {"name": "bayesdiff", "draws": 10, "skip": 5,
                                                          "moments": "regression"}
    assert EstimatorSpec("aleatoric", score="standardized").settings()["score"] == "standardized"
    assert EstimatorSpec("x0_trajectory", M=3).settings() == {"name": "x0_trajectory", "window": [0.8, 1.0]}
    assert EstimatorSpec("generative", M=3, window=(0, 1)).settings() == {"name": "generative", "M": 3}
    assert GuidanceSpec().settings() is None
    assert GuidanceSpec("posterior", lam=3.0).settings() == {"rule": "posterior", "window": [0.0, 0.15],
                                                             "prior_precision": 1.0, "quantile": 0.95}
    table = GuidanceSpec("gradient", table=torch.zeros(2, 1, 4, 4)).settings()
    assert table["threshold"] == "table" and "quantile" not in table and table["lam"] == 1.0


def test_a_sampler_resolves_to_the_models_defaults():
    assert SamplerSpec().resolve("ddim", 50).settings() == {"name": "ddim", "steps": 50, "eta": 0.0,
                                                            "spacing": "uniform", "clip": True}
    assert SamplerSpec(name="ddpm", steps=7).resolve("ddim", 50).settings() == {
        "name": "ddpm", "steps": 7, "variance": "beta_tilde", "clip": True}
    # a diffusers model's own clipping range and spacing, under what the spec sets
    own = {"clip": 2.0, "spacing": "trailing"}
    assert SamplerSpec().resolve("ddim", 10, own).settings()["clip"] == 2.0
    assert SamplerSpec(spacing="leading").resolve("ddim", 10, own).spacing == "leading"
    # BayesDiff's default is unclipped; an explicit clip stays (and check_run refuses it)
    assert SamplerSpec().resolve("ddim", 10, own, clip=False).clip is False
    assert SamplerSpec(clip=True).resolve("ddim", 10, clip=False).clip is True
    assert SamplerSpec(name="ddim", eta=0.5).resolve("ddim", 10).options() == {"eta": 0.5, "spacing": "uniform",
                                                                              "clip": True}


def test_options_that_do_not_go_together_are_named():
    bayesdiff = EstimatorSpec("bayesdiff")
    with pytest.raises(ValueError, match="bayesdiff .*needs sampler.name ddim, sampler.clip false$"):
        check_run(SamplerSpec("ddpm", clip=True), bayesdiff, GuidanceSpec())
    with pytest.raises(ValueError, match="bayesdiff .*needs sampler.eta 0$"):
        check_run(SamplerSpec("ddim", eta=0.5, clip=False), bayesdiff, GuidanceSpec())
    check_run(SamplerSpec(), bayesdiff, GuidanceSpec())  # unset: resolved later to ddim, eta 0, unclipped
    for name in ("mc_dropout", "x0_trajectory", "generative"):
        with pytest.raises(ValueError, match=f"guidance.rule gradient estimates with the aleatoric estimator; "
                                             f"estimator.name is {name}"):
            check_run(SamplerSpec(), EstimatorSpec(name), GuidanceSpec("gradient"))
    with pytest.raises(ValueError, match="estimator.score standardized applies to unguided runs"):
        check_run(SamplerSpec(), EstimatorSpec("aleatoric", score="standardized"), GuidanceSpec("posterior"))


def test_specs_from_plain_dicts_and_namespaces():
    from jsonargparse import Namespace

    assert spec_from_dict(EstimatorSpec, None) == EstimatorSpec()
    spec = EstimatorSpec("aleatoric", M=3)
    assert spec_from_dict(EstimatorSpec, spec) is spec
    assert spec_from_dict(EstimatorSpec, {"name": "aleatoric", "M": 3}) == spec
    assert spec_from_dict(SamplerSpec, Namespace(name="ddpm", steps=4)) == SamplerSpec("ddpm", 4)
    with pytest.raises(ValueError, match="unknown option.*estimator.num_perturbations; estimator takes name, M"):
        spec_from_dict(EstimatorSpec, {"num_perturbations": 3})
    with pytest.raises(TypeError, match="GuidanceSpec options must be a mapping"):
        spec_from_dict(GuidanceSpec, "gradient")


def test_a_command_line_builds_the_same_specs():
    """`add_class_arguments` as the commands use it: the options parse into the specs, and a bad value is
    refused by the spec's own message."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SamplerSpec, "sampler")
    parser.add_class_arguments(EstimatorSpec, "estimator", skip={"reference"})
    parser.add_class_arguments(GuidanceSpec, "guidance", skip={"table"})
    specs = parser.instantiate_classes(parser.parse_args(
        ["--sampler.steps", "10", "--estimator.name", "aleatoric", "--estimator.M", "3", "--estimator.window",
         "[0.0, 0.5]", "--guidance.rule", "posterior", "--guidance.prior_precision", "abar_inverse"]))
    assert specs.sampler == SamplerSpec(steps=10)
    assert specs.estimator == EstimatorSpec("aleatoric", M=3, window=(0.0, 0.5))
    assert specs.guidance == GuidanceSpec("posterior", prior_precision="abar_inverse")
    with pytest.raises(Exception, match="estimator.M must be an integer >= 2, got 1"):
        parser.instantiate_classes(parser.parse_args(["--estimator.M", "1"]))
