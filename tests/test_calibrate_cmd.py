"""`train.py calibrate` on a tiny checkpoint trained in the test: the table it writes, the settings
saved with it, `sample --guidance_table` accepting the file, and bad inputs (an existing
--out among them) failing before anything is sampled or written.

Independent truth: docs/algorithms.md §2-3 as a textbook loop (DDIM with eta 0 and clipped x0, the centered
aleatoric map from the per-sample `'uncertainty'` stream), reduced by `torch.quantile`.
"""

import hashlib
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tiny_checkpoint import tiny_checkpoint  # noqa: F401 (fixture)
from uncdiff.__main__ import COMMANDS
from uncdiff.commands import calibrate as calibrate_cmd
from uncdiff.commands.calibrate import main
from uncdiff.io.tables import load_score_reference, load_threshold_table as load_table
from uncdiff.lightning.module import DiffusionModule
from uncdiff.commands.sample import main as sample_main
from uncdiff.core.samplers import SampleNoise

REPO = Path(__file__).resolve().parent.parent
N, SEED, STEPS, M, Q = 6, 100, 4, 2, 0.7  # batches of 4 and 2 seeds; n >= 1 / (1 - q) = 3.3
ARGS = ["--n", str(N), "--seed", str(SEED), "--sampler.steps", str(STEPS), "--sampler.name", "ddim",
        "--estimator.M", str(M), "--quantile", str(Q), "--batch_size", "4", "--fabric.accelerator", "cpu",
        "--progress", "false"]


@pytest.fixture(scope="module")
def table_file(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibrate") / "tables" / "tau.pt"  # its directory is created
    main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), *ARGS])
    return out


@torch.no_grad()
def textbook_maps(net, schedule, seeds: list[int], steps: int, m: int) -> torch.Tensor:
    """`U_t [N, steps, C, H, W]` along unguided DDIM trajectories (eta 0, uniform spacing, x0
    clipped and eps re-derived from it): `mean_i (eps_theta(x_t^i, t) - eps_bar)^2` with
    `x_t^i = sqrt(abar) x0_hat + sqrt(1 - abar) z_i` (docs/algorithms.md §3, centered variant)."""
    noise = SampleNoise(seeds)
    x = noise.initial((1, 8, 8))
    ts = [i * schedule.num_timesteps // steps for i in range(steps)][::-1]
    maps = []
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        a, a_prev = schedule.abar_at(t), schedule.abar_at(t_prev)
        t_batch = torch.full((len(seeds),), t)
        eps = net(x, t_batch)
        x0 = ((x - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
        z = noise.randn((m, 1, 8, 8), stream="uncertainty")
        eps_i = torch.stack([net(a**0.5 * x0 + (1 - a) ** 0.5 * z[:, i], t_batch) for i in range(m)], 1)
        maps.append((eps_i - eps[:, None]).pow(2).mean(1))
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return torch.stack(maps, 1)


@pytest.mark.slow
def test_table_is_the_quantile_of_the_maps(table_file, tiny_checkpoint):
    module = DiffusionModule.load_from_checkpoint(tiny_checkpoint, map_location="cpu").eval()
    maps = textbook_maps(module.ema.ema_model, module.schedule, list(range(SEED, SEED + N)), STEPS, M)
    table, _ = load_table(table_file)
    assert table.shape == (STEPS, 1, 8, 8) and table.dtype == torch.float32
    atol = 1e-5 * maps.max().item()  # this barely trained model's maps are ~1e-6: tolerances at their scale
    torch.testing.assert_close(table, torch.quantile(maps, Q, dim=0), rtol=1e-4, atol=atol)
    assert not torch.allclose(table, torch.quantile(maps, Q - 0.1, dim=0), rtol=1e-4, atol=atol)  # it can tell


@pytest.mark.slow
def test_settings_say_what_the_table_was_made_for(table_file, tiny_checkpoint):
    _, settings = load_table(table_file)
    assert settings["sampler"] == {"name": "ddim", "steps": STEPS, "eta": 0.0, "spacing": "uniform", "clip": True}
    assert settings["quantile"] == Q and settings["M"] == M and settings["variant"] == "centered"
    assert settings["seeds"] == {"start": SEED, "count": N}
    assert settings["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert "calibrate" in settings["run"]["command"]  # after the program as typed (test below)


@pytest.mark.slow
def test_sample_accepts_the_table(table_file, tiny_checkpoint, tmp_path):
    out = tmp_path / "guided"
    sample_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--n", "2", "--sampler.steps", str(STEPS),
                 "--sampler.name", "ddim", "--estimator.M", str(M), "--guidance.rule", "gradient",
                 "--guidance_table", str(table_file), "--fabric.accelerator", "cpu", "--progress", "false"])
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["guidance"]["threshold"] == "table"
    assert settings["files"]["guidance_table"]["sha256"] == hashlib.sha256(table_file.read_bytes()).hexdigest()
    assert sorted(p.name for p in (out / "samples").glob("*.png") if "_map" not in p.name) == \
        ["000000.png", "000001.png"]


@pytest.mark.slow
@pytest.mark.parametrize("option, value, named", [
    ("--estimator.M", "3", "M: 2 there, 3 here"),
    ("--estimator.variant", "sample", "variant: 'centered' there, 'sample' here"),
    ("--sampler.eta", "0.5", "sampler.eta: 0.0 there, 0.5 here")])
def test_sample_refuses_a_table_made_for_other_settings(table_file, tiny_checkpoint, tmp_path, option, value, named):
    out = tmp_path / "guided"
    argv = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--n", "2", "--sampler.steps", str(STEPS),
            "--sampler.name", "ddim", "--estimator.M", str(M), "--guidance.rule", "gradient",
            "--guidance_table", str(table_file), "--fabric.accelerator", "cpu", "--progress", "false", option, value]
    with pytest.raises(SystemExit) as error:
        sample_main(argv)
    assert named in str(error.value.code) and not out.exists()


@pytest.mark.slow
def test_reference_statistics_are_the_per_step_mean_and_std_of_the_map_totals(table_file, tiny_checkpoint):
    module = DiffusionModule.load_from_checkpoint(tiny_checkpoint, map_location="cpu").eval()
    totals = textbook_maps(module.ema.ema_model, module.schedule, list(range(SEED, SEED + N)), STEPS, M)
    totals = totals.double().flatten(2).sum(2)  # [N, steps]
    reference, settings = load_score_reference(table_file.with_name("tau.pt.reference.pt"), steps=STEPS)
    torch.testing.assert_close(reference["mean"], totals.mean(0), rtol=1e-4, atol=0)
    torch.testing.assert_close(reference["std"], totals.std(0), rtol=1e-3, atol=0)
    assert settings["M"] == M and settings["sampler"]["steps"] == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("score", ["step_normalized", "standardized"])
def test_sample_scores_with_the_reference(table_file, tiny_checkpoint, tmp_path, score):
    """`sample --estimator.score` on other seeds: each score is the variant of that sample's
    textbook per-step totals with the calibrated statistics."""

    reference_file = table_file.with_name("tau.pt.reference.pt")
    out = tmp_path / "scored"
    sample_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--n", "3", "--sampler.steps", str(STEPS),
                 "--sampler.name", "ddim", "--estimator.M", str(M), "--estimator.score", score,
                 "--score_reference", str(reference_file), "--fabric.accelerator", "cpu",
                 "--progress", "false"])
    module = DiffusionModule.load_from_checkpoint(tiny_checkpoint, map_location="cpu").eval()
    totals = textbook_maps(module.ema.ema_model, module.schedule, [0, 1, 2], STEPS, M).double().flatten(2).sum(2)
    ref, _ = load_score_reference(reference_file)
    want = (totals / ref["mean"]).sum(1) if score == "step_normalized" else ((totals - ref["mean"]) / ref["std"]).sum(1)
    got = torch.tensor([float(r["score"]) for r in json_manifest(out)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["estimator"]["score"] == score
    assert settings["files"]["score_reference"]["sha256"] == hashlib.sha256(reference_file.read_bytes()).hexdigest()


def json_manifest(out: Path) -> list[dict]:
    import csv

    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("extra, named", [
    (["--estimator.score", "standardized"], "needs the per-step reference statistics"),
    (["--estimator.score", "standardized", "--score_reference", "REF", "--sampler.steps", "5"],
     "calibrated for 4 sampler steps; this run has 5"),
    (["--estimator.score", "standardized", "--score_reference", "REF", "--estimator.M", "3"],
     "M: 2 there, 3 here"),
    (["--score_reference", "REF"], "used only by --estimator.score"),
    (["--estimator.score", "standardized", "--score_reference", "REF", "--guidance.rule", "posterior"],
     "unguided run"),
])
def test_sample_refuses_bad_score_options_before_sampling(table_file, tiny_checkpoint, tmp_path, extra, named):
    out = tmp_path / "scored"
    reference_file = str(table_file.with_name("tau.pt.reference.pt"))
    argv = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--n", "2", "--sampler.name", "ddim",
            "--sampler.steps", str(STEPS), "--estimator.M", str(M), "--fabric.accelerator", "cpu",
            "--progress", "false", *[reference_file if a == "REF" else a for a in extra]]
    with pytest.raises(SystemExit) as error:
        sample_main(argv)
    assert named in str(error.value.code) and not out.exists()


@pytest.mark.parametrize("argv0, program", [("/venv/bin/uncdiff", ["uncdiff"]), ("train.py", ["python", "train.py"]),
                                            ("/src/uncdiff/__main__.py", ["python", "-m", "uncdiff"])])
def test_a_run_records_the_command_as_typed(argv0, program, monkeypatch):
    from uncdiff.commands.runtime import typed_command

    monkeypatch.setattr(sys, "argv", [argv0, "calibrate", "--n", "4"])
    assert typed_command(["calibrate", "--n", "4"]) == [*program, "calibrate", "--n", "4"]


def test_train_py_dispatches_calibrate():
    main_of_train_py = runpy.run_path(str(REPO / "train.py"), run_name="train")["main"]
    assert main_of_train_py.__module__ == "uncdiff.__main__"
    assert COMMANDS["calibrate"] == "uncdiff.commands.calibrate"


@pytest.mark.slow
def test_print_config_round_trip_and_recorded_config(table_file, tiny_checkpoint, tmp_path, capsys):
    """`--print_config > s.yaml`, then `--config s.yaml`: the same table as the fixture's (same
    settings), and `<table>.config.yaml` is exactly s.yaml."""
    out = tmp_path / "tau.pt"
    with pytest.raises(SystemExit) as done:
        main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), *ARGS, "--print_config"])
    assert not done.value.code
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["quantile"] == Q and config["estimator"] == {"M": M, "variant": "centered"}
    assert config["sampler"]["steps"] == STEPS and config["seed"] == SEED and config["fabric"]["devices"] == 1
    (tmp_path / "s.yaml").write_text(printed)
    main(["--config", str(tmp_path / "s.yaml")])
    torch.testing.assert_close(load_table(out)[0], load_table(table_file)[0], rtol=0, atol=0)
    assert (tmp_path / "tau.pt.config.yaml").read_text() == printed
    recorded = yaml.safe_load(table_file.with_name("tau.pt.config.yaml").read_text())
    assert {**recorded, "out": None} == {**config, "out": None}


def tree(path: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.rglob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    ({"--checkpoint": "nowhere.ckpt"}, "checkpoint not found"),
    ({"--checkpoint": "text"}, "not a checkpoint torch can read"),
    ({"--checkpoint": "other"}, "not a uncdiff DiffusionModule checkpoint"),
    ({"--out": "existing.pt"}, "exists; calibrate never overwrites it"),
    ({"--out": "new/its.pt"}, "its.pt.config.yaml exists; calibrate never overwrites it"),
    ({"--out": "new/ref.pt"}, "ref.pt.reference.pt exists; calibrate never overwrites it"),
    ({"--quantile": "0"}, "--quantile must lie in (0, 1)"),
    ({"--quantile": "1"}, "--quantile must lie in (0, 1)"),
    ({"--quantile": "95"}, "--quantile must lie in (0, 1)"),
    ({"--estimator.M": "1"}, "--estimator.M must be an integer >= 2"),
    ({"--n": "19"}, "--n must be >= 20 for --quantile 0.95"),
    ({"--n": "1", "--quantile": "0.5"}, "--n must be >= 2"),
    ({"--seed": str(2**32 - 10)}, "seeds must lie in [0, 2**32)"),
    ({"--batch_size": "0"}, "--batch_size must be >= 1"),
    ({"--sampler.steps": "5000"}, "sampler: steps must be in [1, 1000]"),
    ({"--sampler.eta": "0.5", "--sampler.name": "ddpm"}, "--sampler.eta applies to sampler.name ddim"),
    ({"--data.name": "digits"}, "--data.name: calibrate reads no training data"),
    ({"--fabric.devices": "2"}, "calibrate runs in one process, not 2"),
])
def test_bad_input_fails_before_sampling(change, message, tiny_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "text").write_text("not a checkpoint")
    torch.save({"state_dict": {"layer.weight": torch.zeros(1)}, "hyper_parameters": {}}, tmp_path / "other")
    (tmp_path / "existing.pt").write_bytes(b"an earlier table")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "its.pt.config.yaml").write_text("an earlier table's config")
    (tmp_path / "new" / "ref.pt.reference.pt").write_text("an earlier table's reference statistics")
    monkeypatch.setattr(calibrate_cmd, "calibrate_table_and_reference",
                        lambda *a, **k: pytest.fail("sampled despite a bad input"))
    options = {"--checkpoint": str(tiny_checkpoint), "--out": str(tmp_path / "new" / "tau.pt"), "--n": "20",
               "--sampler.steps": "4", "--estimator.M": "2", "--fabric.accelerator": "cpu"}
    for key, value in change.items():
        options[key] = str(tmp_path / value) if key in ("--checkpoint", "--out") else value
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as error:
        main([a for item in options.items() for a in item])
    assert message in str(error.value.code), error.value.code
    assert tree(tmp_path) == before  # nothing written, nothing touched
    assert (tmp_path / "existing.pt").read_bytes() == b"an earlier table"
