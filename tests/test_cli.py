"""The train.py CLI, run as users run it (subprocesses): both configs' first steps, run-directory
safety, resume, offline W&B, DDP through the CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_data import write_cifar_fixture
from uncdiff.lightning.cli import main, resolve_config_args

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.check_val_every_n_epoch", "1", "--model.sample_steps", "3",
         "--data.init_args.batch_size", "16", "--trainer.max_steps", "4"]


def train(args, cwd, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}, **(extra_env or {}))
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quickstart_first_steps_offline_wandb_and_no_overwrite(tmp_path):
    args = ["--config", "quickstart.yaml", *QUICK]  # bare name: resolved in configs/
    first = train(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert len(list(run.glob("config-*.yaml"))) == 1
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_00000002.png", "step_00000004.png"]
    # offline by itself (no API key, no WANDB_MODE), said once, with the sync command
    assert (first.stdout + first.stderr).count("wandb sync runs/quickstart/wandb/offline-run-*") == 1
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("files/media/images/val/ema_samples_*.png"))

    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    run_id = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["uncdiff_wandb_run_id"]
    assert offline_runs[0].name.endswith(f"-{run_id}")
    again = train(args, tmp_path)  # the same command again must not overwrite the run
    assert again.returncode != 0 and "--ckpt_path last" in again.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1

    resumed = train([*args, "--trainer.max_steps", "6", "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert len(list(run.glob("config-*.yaml"))) == 2
    # the resumed fit continues the first W&B run: a folder of its own (the first one untouched) under
    # the same run id, which `wandb sync` uploads as one run whose charts go on from step 4
    resumed_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(resumed_runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in resumed_runs)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["uncdiff_wandb_run_id"] == run_id


@pytest.mark.slow
def test_user_wandb_mode_wins(tmp_path):
    result = train(["--config", "quickstart.yaml", *QUICK, "--trainer.max_steps", "1"], tmp_path,
                   {"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb sync" not in result.stdout + result.stderr
    assert not list((tmp_path / "runs" / "quickstart").glob("wandb/offline-run-*"))


@pytest.mark.slow
def test_ddp_through_the_cli(tmp_path):
    result = train(["--config", "quickstart.yaml", *QUICK, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--trainer.accelerator", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


@pytest.mark.slow
def test_cifar_recipe_first_steps(tmp_path, monkeypatch):
    """The real config, full-size model, on a CIFAR-10-format fixture (in-process: the fixture's
    md5 sums differ from the real files', which torchvision checks)."""
    write_cifar_fixture(tmp_path / "data", n_per_batch=4)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "cifar.yaml", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.logger", "false", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
          "--data.init_args.download", "false"])
    ckpt = torch.load(tmp_path / "runs" / "cifar" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    n_params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("net."))
    assert abs(n_params - 35.7e6) < 0.3e6
    assert ckpt["hyper_parameters"]["dropout"] == 0.1 and ckpt["hyper_parameters"]["lr"] == 2e-4


def test_config_names_resolve_in_configs_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_args(["fit", "--config", "cifar.yaml"])[2] == str(REPO / "configs" / "cifar.yaml")
    assert resolve_config_args(["--config=quickstart.yaml"])[0] == f"--config={REPO / 'configs' / 'quickstart.yaml'}"
    (tmp_path / "mine.yaml").write_text("{}")
    assert resolve_config_args(["--config", "mine.yaml"])[1] == "mine.yaml"


@pytest.mark.slow
def test_bad_config_value_fails_before_training(tmp_path):
    result = train(["--config", "quickstart.yaml", "--model.image_size", "18"], tmp_path)
    assert result.returncode != 0 and "image_size" in result.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


# ------------------------------------------------------------------ the uncdiff entry point

def installed_uncdiff() -> list[str]:
    """The installed console script, else the package's `python -m uncdiff`."""
    script = shutil.which("uncdiff", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "uncdiff"]


def clean_env() -> dict:
    """The environment of a user: no PYTHONPATH into the repository, W&B off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "PYTHONPATH"}
    env.update(WANDB_MODE="disabled", WANDB_SILENT="true")
    return env


@pytest.mark.slow
def test_bundled_config_by_bare_name_from_another_directory(tmp_path):
    """`uncdiff fit --config quickstart.yaml` from a directory that is not the repository: the
    installed package finds its bundled config."""
    root = tmp_path / "run"
    result = subprocess.run([*installed_uncdiff(), "fit", "--config", "quickstart.yaml", *QUICK,
                             "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root)],
                            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["fit", "--config", "quickstart.yaml", "--print_config"],
    ["sample", "--checkpoint", "c.ckpt", "--out", "o", "--sampler.steps", "3", "--print_config"],
    ["calibrate", "--checkpoint", "c.ckpt", "--out", "t.pt", "--print_config"],
    ["evaluate", "--checkpoint", "c.ckpt", "--out", "o", "--experiments", "cost", "--print_config"],
])
def test_console_script_is_train_py(argv, tmp_path):
    """`uncdiff ...`, `python -m uncdiff ...` and `python train.py ...` resolve the same config."""
    runs = [subprocess.run(command + argv, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                           timeout=600)
            for command in (installed_uncdiff(), [sys.executable, "-m", "uncdiff"],
                            [sys.executable, str(REPO / "train.py")])]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout


def test_help_lists_every_command(capsys):
    from uncdiff.__main__ import main as uncdiff_main

    uncdiff_main(["--help"])
    listed = capsys.readouterr().out
    for command in ("fit", "validate", "sample", "calibrate", "evaluate", "export", "restore", "evaluate_image_to_image",
                    "calibrate_intervals"):
        assert f"\n  {command} " in listed


def test_every_command_takes_the_run_spec_s_keys():
    """sample, calibrate, evaluate, restore and evaluate_image_to_image name the sampler, estimator and guidance
    knobs as the run spec's dataclasses do, so one YAML configures them all."""
    import dataclasses

    from uncdiff.commands import calibrate, calibrate_intervals, evaluate, evaluate_image_to_image, restore, sample
    from uncdiff.commands.options import parse_options
    from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

    fields = {name: {f.name for f in dataclasses.fields(cls)}
              for name, cls in (("sampler", SamplerSpec), ("estimator", EstimatorSpec), ("guidance", GuidanceSpec))}
    for command in (sample, calibrate, evaluate, restore, evaluate_image_to_image, calibrate_intervals):
        parser = command.build_parser()
        argv = ["--checkpoint", "c", "--out", "o", *(["--conditions", "d"] if command is restore else [])]
        parsed = parse_options(parser, [*argv, "--sampler.steps", "4", "--estimator.M", "3"])
        assert parsed.sampler.steps == 4 and parsed.estimator.M == 3, command.__name__
        for group, names in fields.items():
            if group in parsed:
                assert set(vars(parsed[group])) <= names, (command.__name__, group)
        assert "bayesdiff" not in parsed or set(vars(parsed.bayesdiff)) == {"laplace_images"}


@pytest.mark.parametrize("old", [["--steps", "4"], ["--drop-fraction", "0.2"], ["--bayesdiff.draws", "4"],
                                 ["--guidance.seed_groups", "2"]])
def test_earlier_spellings_are_refused(old, capsys):
    from uncdiff.commands import evaluate
    from uncdiff.commands.options import parse_options

    with pytest.raises(SystemExit) as error:
        parse_options(evaluate.build_parser(), ["--checkpoint", "c", "--out", "o", *old])
    assert error.value.code == 2 and old[0].lstrip("-").split(".")[0] in capsys.readouterr().err

def test_a_resumed_fit_logs_to_the_checkpoint_s_wandb_run_unless_given_an_id(tmp_path):
    """`continue_wandb_run` on the parsed config: a checkpoint file's recorded run id goes to each
    WandbLogger without an id of its own; none is set without a resume or without a recorded id."""
    from jsonargparse import Namespace

    from uncdiff.lightning.cli import continue_wandb_run

    recorded, bare = tmp_path / "recorded.ckpt", tmp_path / "bare.ckpt"
    torch.save({"global_step": 4, "uncdiff_wandb_run_id": "abc123"}, recorded)
    torch.save({"global_step": 4}, bare)

    def config(ckpt_path, logger_id=None):
        logger = Namespace(class_path="uncdiff.lightning.wandb_logger.WandbLogger",
                           init_args=Namespace(project="p", id=logger_id))
        return Namespace(ckpt_path=ckpt_path, trainer=Namespace(logger=[logger], callbacks=[]))

    for ckpt_path, given, expected in [(str(recorded), None, "abc123"), (str(recorded), "mine", "mine"),
                                       (str(bare), None, None), (None, None, None)]:
        c = config(ckpt_path, given)
        continue_wandb_run(c)
        assert c.trainer.logger[0].init_args.id == expected, (ckpt_path, given)
