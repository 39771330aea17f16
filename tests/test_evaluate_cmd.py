"""`train.py evaluate` end to end on a tiny checkpoint trained in the test, with tiny counts: the
report and its tables, the cost in network evaluations against the formulas of docs/algorithms.md, resuming
without generating anything, and bad inputs (a missing FID extractor included) failing before
anything is written.

(The experiments' numbers are tested against known truths in test_evaluation.py.)
"""

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from tiny_checkpoint import tiny_checkpoint  # noqa: F401 (fixture)
from uncdiff.commands.evaluate import main
from uncdiff.core.samplers import make_sampler
from uncdiff.evaluation.fid import ClassifierFeatures
from uncdiff.lightning.loading import laplace_cache_path, load_module
from uncdiff.lightning.module import DiffusionModule
from uncdiff.uncertainty.bayesdiff import LastLayerLaplace
from uncdiff.uncertainty.generative import GenerativeUncertainty

STEPS, M, N = 4, 2, 12
ARGS = ["--n", str(N), "--batch_size", "6", "--sampler.steps", str(STEPS), "--estimator.M", str(M),
        "--bayesdiff.laplace_images", "32", "--estimator.skip", "2", "--estimator.draws", "3", "--ause.images", "8",
        "--filtering.subset_seeds", "3", "--seed_groups", "2", "--fabric.accelerator", "cpu",
        "--progress", "false"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluation(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    argv = ["--checkpoint", str(tiny_checkpoint), "--out", str(root / "eval"), "--fid.cache", str(root / "cache"),
            *ARGS]
    main([*argv, "--wandb.enabled", "true"])
    return root / "eval", argv


@pytest.mark.slow
def test_report_has_every_experiment(evaluation, tiny_checkpoint):
    out, _ = evaluation
    report = (out / "report.md").read_text()
    for heading in ("## (a) Filtering", "## (b) Guided versus unguided", "## (c) Pixel-wise uncertainty",
                    "## (d) Cost", "measured better"):
        assert heading in report
    for plot in ("filtering.png", "guidance.png", "sparsification.png", "cost.png", "aleatoric_dropped.png"):
        assert (out / plot).stat().st_size > 0 and f"]({plot})" in report
    filtering = read_csv(out / "filtering.csv")
    # the second BayesDiff set: the other covariance estimator on the same seeds (docs/algorithms.md §5b)
    assert [r["estimator"] for r in filtering] == ["aleatoric", "mc_dropout", "bayesdiff", "bayesdiff-paper"]
    assert [r.get("moments") for r in filtering[2:]] == ["regression", "paper"]
    assert all(int(r["kept"]) == N - round(N / 6) and float(r["fid_random_std"]) > 0 for r in filtering)
    for metric in ("precision", "recall"):  # improved precision / recall (docs/algorithms.md §6) of the same sets
        for r in filtering:
            assert all(0 <= float(r[f"{metric}_{c}"]) <= 1 for c in ("all", "kept", "random_mean"))
            assert float(r[f"{metric}_random_std"]) >= 0 and r[f"{metric}_verdict"]
    assert "| precision / recall | k = 5 nearest neighbours, against 12 real training images" in report
    assert "| estimator | metric | all | kept | random subsets | verdict |" in report
    assert report.count("| aleatoric | precision |") == report.count("| bayesdiff | recall |") == 1
    assert list((out / "sets" / "real").glob(f"features-*-{N}.pt"))  # default --prc-real: min(n, 10000)
    guidance = read_csv(out / "guidance.csv")
    assert [r["set"] for r in guidance] == ["guided-gradient-plus", "guided-gradient-minus", "guided-posterior",
                                            "sign +1 vs -1"]
    assert guidance[-1]["better_sign"] in ("+1", "-1")
    assert [r["estimator"] for r in read_csv(out / "sparsification.csv")] == ["aleatoric", "mc_dropout", "random",
                                                                               "oracle"]
    assert list((out / "wandb").glob("offline-run-*"))  # logged (offline in tests)
    # BayesDiff's row is marked invalid exactly when its scores (sums of Var[x0]) include negative ones
    records = (out / "sets" / "bayesdiff" / "records").glob("*.json")
    negative = sum(s < 0 for r in records for s in json.loads(r.read_text())["scores"])
    assert ("(scores invalid: negative variances)" in filtering[2]["verdict"]) == (negative > 0)
    assert (f"{negative} of {N} BayesDiff scores (sums of the propagated Var[x0]) are negative" in report) \
        == (negative > 0)
    assert tiny_checkpoint.with_name("last.ckpt.laplace-32.pt").is_file()  # fitted once, next to the checkpoint


@pytest.mark.slow
def test_recorded_config_is_the_resolved_one(evaluation, capsys):
    """<out>/config.yaml is what --print_config prints for the same command line, and parses back to
    the same options."""
    from uncdiff.commands.evaluate import build_parser
    from uncdiff.commands.options import parse_options

    out, argv = evaluation
    with pytest.raises(SystemExit) as done:
        main([*argv, "--wandb.enabled", "true", "--print_config"])
    assert not done.value.code
    printed = capsys.readouterr().out
    assert (out / "config.yaml").read_text() == printed
    config = yaml.safe_load(printed)
    assert config["wandb"]["enabled"] is True and config["filtering"]["subset_seeds"] == 3
    assert config["bayesdiff"] == {"laplace_images": 32}
    assert (config["estimator"]["draws"], config["estimator"]["skip"], config["estimator"]["moments"]) == (3, 2, "regression")
    parser = build_parser()
    options = lambda argv: {k: v for k, v in parse_options(parser, argv).as_dict().items() if k != "config"}  # noqa: E731
    assert options(["--config", str(out / "config.yaml")]) == options([*argv, "--wandb.enabled", "true"])


@pytest.mark.slow
def test_cost_follows_the_spec(evaluation):
    out, _ = evaluation
    nfe = {r["method"]: float(r["nfe_per_image"]) for r in read_csv(out / "cost.csv")}
    assert nfe["plain"] == STEPS
    assert nfe["aleatoric"] == nfe["mc_dropout"] == STEPS * (1 + M)  # M extra passes on every step (§3, §5a)
    # guided: window (0, 0.15) of 4 steps = step 0: M forward passes for U and its gradient, estimation elsewhere
    assert nfe["guided-gradient-plus"] == nfe["guided-posterior"] == STEPS * (1 + M)
    # BayesDiff (§5b): UQ on steps 0 and 2 (every 2nd, not the last); draws (3) on those after the first
    assert nfe["bayesdiff"] == STEPS + 3


@pytest.mark.slow
def test_rerun_generates_nothing(evaluation, monkeypatch, capsys):
    out, argv = evaluation
    calls = []
    monkeypatch.setattr(DiffusionModule, "sample", lambda self, *a, **k: calls.append(k))
    before = json.loads((out / "run.json").read_text())
    features = tree(out / "sets" / "real")
    main(argv)
    assert calls == []
    assert tree(out / "sets" / "real") == features != {}  # real features extracted once
    assert capsys.readouterr().out.count(f"{N} already written, 0 to generate") == 8
    assert json.loads((out / "run.json").read_text()) == before


@pytest.mark.slow
def test_negative_bayesdiff_variances_are_flagged_in_the_report(evaluation, tmp_path, monkeypatch):
    """Negative sums of Var[x0] (what the paper's Monte Carlo moment estimator gives at S draws) are no
    variances: the report says so and marks BayesDiff's filtering verdicts, not a clean result."""
    import shutil

    from uncdiff.io.sample_store import SampleStore

    out, argv = evaluation
    copy = tmp_path / "eval"
    shutil.copytree(out, copy)  # resumes: generates nothing, rewrites the report
    scores = SampleStore.load_scores
    # both BayesDiff sets (regression, the default, and paper): all negative
    shifted = lambda self: scores(self) - 1e9 * self.root.name.startswith("bayesdiff")  # noqa: E731
    monkeypatch.setattr(SampleStore, "load_scores", shifted)
    main([*argv[:argv.index("--out") + 1], str(copy), *argv[argv.index("--out") + 2:]])
    rows = {r["estimator"]: r for r in read_csv(copy / "filtering.csv")}
    for metric in ("verdict", "precision_verdict", "recall_verdict"):
        assert rows["bayesdiff"][metric].endswith(" (scores invalid: negative variances)")
        assert "invalid" not in rows["aleatoric"][metric]
    report = (copy / "report.md").read_text()
    assert f"{N} of {N} BayesDiff scores (sums of the propagated Var[x0]) are negative" in report
    assert "`--estimator.moments regression` gives usable variances" in report


@pytest.mark.slow
def test_prc_real_zero_skips_precision_recall(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fid.cache", str(tmp_path / "cache"), *ARGS,
          "--experiments", "filtering", "--estimators", "[aleatoric]", "--filtering.prc_real", "0"])
    (row,) = read_csv(out / "filtering.csv")
    assert row["fid_kept"] and "precision_kept" not in row
    assert "Precision / recall" not in (out / "report.md").read_text() and not (out / "sets" / "real").exists()


def tree(path):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.rglob("*"))} if path.exists() else {}


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (["--filtering.subset_seeds", "1"], "--filtering.subset_seeds must be >= 2"),
    (["--estimator.M", "1"], "--estimator.M must be an integer >= 2"),
    (["--filtering.drop_fraction", "1.0"], "--filtering.drop_fraction must lie in (0, 1)"),
    (["--filtering.prc_real", "5"], "--filtering.prc_real must be > 5"),
    (["--filtering.prc_real", "-1"], "--filtering.prc_real must be > 5"),
    (["--filtering.drop_fraction", "0.6"], "precision / recall need more than 5"),
    (["--n", "10"], "holds another run"),
    # AUSE denoises steps 2..3 of 4: a window of steps 0..1 would give it no map
    (["--estimator.window", "[0, 0.5]"],
     "--estimator.window 0 0.5 has no step among steps 2..3 of 4: AUSE denoises only the second half"),
    (["--fid.extractor", "inception", "--fid.inception_weights", "/nonexistent.pth"],
     "--fid.inception_weights: no file at /nonexistent.pth"),
])
def test_bad_input_fails_before_writing(evaluation, change, message):
    out, argv = evaluation
    before = tree(out.parent)
    with pytest.raises(SystemExit) as error:
        main([*argv, *change])
    assert message in str(error.value.code)
    assert tree(out.parent) == before


@pytest.mark.slow
def test_failed_inception_download_fails_before_writing(tiny_checkpoint, tmp_path, monkeypatch):
    """Offline without --inception-weights: the download fails, and says which option to give,
    before <out> exists."""
    import urllib.error

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as error:
        main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fid.cache", str(tmp_path / "cache"), *ARGS,
              "--experiments", "guidance", "--fid.extractor", "inception"])  # an experiment that needs FID
    assert "could not be downloaded" in str(error.value.code) and "--fid.inception_weights PATH" in str(error.value.code)
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_guidance_sweep_end_to_end(tiny_checkpoint, tmp_path):
    """`--experiments sweep`: every setting is a row of sweep.csv, paired with the unguided set (sampled
    once for all settings) on the same seeds: lam = 0 gives exactly the unguided images."""
    out = tmp_path / "eval"
    lams, wrts, priors = [0.0, 1.0, 100.0], ["eps", "x_t"], ["1", "abar_inverse"]
    main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fid.cache", str(tmp_path / "cache"), *ARGS,
          "--experiments", "sweep", "--sweep.n", "8", "--sweep.seed_groups", "2", "--sweep.lams", str(lams),
          "--sweep.grad_wrt", str(wrts), "--sweep.prior_precisions", f"[{', '.join(priors)}]",
          # guide every step, unclipped: on the first step alone, x0 clipping would cancel the guidance here
          "--guidance.window", "[0, 1]", "--sampler.clip", "false"])
    rows = read_csv(out / "sweep.csv")
    assert [(r["rule"], r["grad_wrt"], r["lam"], r["prior_precision"]) for r in rows] == \
        [("gradient", w, str(lam), "") for w in wrts for lam in lams] + \
        [("posterior", "", "", p) for p in ("1.0", "abar_inverse")]
    assert all(int(r["samples"]) == 8 and int(r["groups"]) == 2 and r["verdict"] for r in rows)
    assert sorted(p.name for p in (out / "sets").iterdir()) == sorted(
        ["plain"] + [f"sweep-gradient-{w}-lam{lam:g}" for w in wrts for lam in lams]
        + ["sweep-posterior-prior1", "sweep-posterior-priorabar_inverse"])
    for row in rows:
        if row["lam"] == "0.0":  # no step at all: the unguided images of the same seeds, so FID differences 0
            assert int(row["identical_to_unguided"]) == 8
            assert float(row["difference"]) == float(row["group_difference_mean"]) == 0.0
        assert float(row["fid_unguided"]) == float(rows[0]["fid_unguided"])  # one unguided set for all
    report = (out / "report.md").read_text()
    assert "## Guidance sweep (strength)" in report and "](sweep.png)" in report
    assert (out / "sweep.png").stat().st_size > 0
    run = json.loads((out / "run.json").read_text())
    sets = run["settings"]["sets"]
    assert sets["sweep-posterior-priorabar_inverse"]["guidance"]["prior_precision"] == "abar_inverse"
    assert sets["sweep-gradient-x_t-lam100"]["guidance"] | {"window": None} == {
        "rule": "gradient", "sign": 1, "lam": 100.0, "grad_wrt": "x_t", "reduce": "sum", "quantile": 0.95,
        "window": None}
    assert sets["sweep-gradient-x_t-lam100"]["seeds"] == sets["plain"]["seeds"] | {"count": 8}


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (["--sweep.n", "13"], "--sweep.n must lie in [1, --n]"),
    (["--sweep.seed_groups", "7"], "--sweep.seed_groups must lie in [2, sweep n / 2]"),
    (["--sweep.lams", "[1, 1]"], "--sweep.lams lists a value twice"),
])
def test_bad_sweep_input_fails_before_writing(tiny_checkpoint, tmp_path, change, message):
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as error:
        main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fid.cache", str(tmp_path / "cache"), *ARGS,
              "--experiments", "sweep", *change])
    assert message in str(error.value.code)
    assert not out.exists()


@pytest.mark.slow
def test_study_end_to_end(evaluation):
    """The per-sample study (docs/algorithms.md §6b) on the filtering sets: every estimator x score
    variant x window, each correlation inside its bootstrap interval; the |x_T|^2 correlation of the
    default score equals scipy's on the seeds' own starting noise, drawn here independently."""
    import torch
    from scipy import stats

    from uncdiff.core.samplers import SampleNoise

    out, _ = evaluation
    rows = read_csv(out / "study.csv")
    keys = [(r["estimator"], r["score"], r["window"]) for r in rows]
    variants = [(s, w) for w in ("all steps", "first 15%", "last half")
                for s in ("sum", "step_normalized", "standardized")]
    assert keys == [("aleatoric", *v) for v in variants] + [("mc_dropout", *v) for v in variants] + \
        [("bayesdiff", "sum", "final Var[x0]")]
    for r in rows:
        for target in ("noise", "realism", "confidence"):  # the digits extractor is a classifier
            rho, low, high = (float(r[f"rho_{target}{s}"]) for s in ("", "_low", "_high"))
            assert -1 <= low <= rho <= high <= 1
    scores = [s for p in sorted((out / "sets" / "aleatoric" / "records").glob("*.json"))
              for s in json.loads(p.read_text())["scores"]]
    noise = SampleNoise(range(N)).initial((1, 8, 8)).double().pow(2).flatten(1).sum(1)
    assert float(rows[0]["rho_noise"]) == pytest.approx(stats.spearmanr(scores, noise.numpy()).statistic)
    curves = read_csv(out / "study_curves.csv")
    assert len(curves) == 4 * len(rows)
    assert {round(float(r["drop_fraction"]), 4) for r in curves} == {0.05, 0.1667, 0.3, 0.5}
    report = (out / "report.md").read_text()
    assert "## (e) What the scores rank" in report and "| aleatoric | standardized | last half |" in report
    for plot in ("study_curves.png", "study_scatter.png"):
        assert (out / plot).stat().st_size > 0 and f"]({plot})" in report
    assert "with moments regression" in report and "with moments paper" in report


@pytest.mark.parametrize("experiments, estimators, needed", [
    (["cost"], ["aleatoric"], True),  # cost times every method, BayesDiff included
    (["filtering"], ["aleatoric"], False),
    (["study"], ["aleatoric", "bayesdiff"], True),
    (["guidance", "ause"], ["aleatoric", "mc_dropout", "bayesdiff"], False),
    (["filtering"], ["x0_trajectory"], False),
    (["filtering"], ["generative"], True),  # its chains draw their weights from the posterior
])
def test_laplace_is_fitted_exactly_when_a_bayesdiff_set_is_sampled(experiments, estimators, needed):
    from uncdiff.commands.evaluate import build_parser
    from uncdiff.commands.options import parse_options
    from uncdiff.evaluation.sample_sets import needs_laplace

    args = parse_options(build_parser(), ["--checkpoint", "c.ckpt", "--out", "o", "--experiments", *experiments,
                                          "--estimators", str(estimators)])
    assert needs_laplace(args) is needed


@pytest.mark.slow
def test_ause_alone_samples_no_set_and_writes_its_section(tiny_checkpoint, tmp_path):
    """AUSE denoises held-out images, so `--experiments ause` alone has no sample set: the report's header
    takes its sampler from the AUSE settings (it once indexed an empty list of sets)."""
    out = tmp_path / "eval"
    main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--experiments", "ause", *ARGS])
    report = (out / "report.md").read_text()
    assert "## (c) Pixel-wise uncertainty" in report and not (out / "sets").exists()
    assert f"steps={STEPS}" in report


@pytest.mark.slow
def test_the_peers_sample_level_scores_filter_and_enter_the_study(tiny_checkpoint, tmp_path):
    """--estimators names the peers' scores (docs/algorithms.md §6c) on a model without a checker: each
    set's kept-set FID against random subsets, and one study row per score (no per-step totals); the
    generative score in the FID extractor's features, as the estimator computes it by hand."""
    out = tmp_path / "eval"
    main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fid.cache", str(tmp_path / "cache"),
          "--experiments", "filtering", "study", "--estimators", "[x0_trajectory,generative]", *ARGS,
          "--sampler.steps", "10"])  # the x0 trajectory's last fifth: 2 steps
    assert [r["estimator"] for r in read_csv(out / "filtering.csv")] == ["x0_trajectory", "generative"]
    rows = read_csv(out / "study.csv")
    assert [(r["estimator"], r["score"], r["window"]) for r in rows] == [
        ("x0_trajectory", "sum", "x0 variance, its window"), ("generative", "sum", "final disagreement")]
    for name in ("x0_trajectory", "generative"):  # variances, not all alike
        scores = np.array([float(r["score"]) for r in read_csv(out / "sets" / name / "manifest.csv")])
        assert len(scores) == N and (scores >= 0).all() and scores.std() > 0
    # the generative set scores in the digits classifier's features (the run's FID extractor): its scores
    # are those of the estimator run by hand on the set's seeds, sampler and cached posterior
    settings = json.loads((out / "sets" / "generative" / "run.json").read_text())["settings"]
    assert settings["estimator"] == {"name": "generative", "M": M, "features": "digits-classifier"}
    module = load_module(tiny_checkpoint)
    cached = torch.load(laplace_cache_path(tiny_checkpoint, 32), weights_only=True)
    module.laplace = LastLayerLaplace.from_state_dict(cached["laplace"])
    sampler = settings["sampler"]
    _, expected = GenerativeUncertainty(module.ema.ema_model, module.laplace, M=M,
                                        features=ClassifierFeatures("digits", image_size=8))(
        make_sampler(module.schedule, sampler.pop("name"), **sampler), module.image_shape, range(N))
    scores = [float(r["score"]) for r in read_csv(out / "sets" / "generative" / "manifest.csv")]
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5)
