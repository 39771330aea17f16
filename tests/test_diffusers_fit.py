"""diffusers networks in `fit` and out of it (docs/diffusers.md): a `UNet2DModel` trained from a YAML
config through `train.py fit` (with EMA, callbacks and resume), fine-tuned from a pipeline folder,
sampled from its checkpoint, exported with `train.py export` as a pipeline folder that diffusers'
own `DDPMPipeline` loads; `calibrate` and `evaluate` on a pipeline folder.

Every model is tiny and built here (never a download). The truths are diffusers': its pipeline's
UNet and `DDPMScheduler`, stepped by its own loop, against ours on the same noise."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from test_diffusers import CHAIN, diffusers_loop, our_loop, save_pipeline, tiny_unet  # noqa: E402
from tiny_checkpoint import tiny_checkpoint  # noqa: E402, F401 (fixture)
from uncdiff.lightning.loading import load_module  # noqa: E402
from uncdiff.core.samplers import make_sampler  # noqa: E402
from uncdiff.io.diffusers_pipeline import ddpm_scheduler_config  # noqa: E402
from uncdiff.io.files import InputError  # noqa: E402
from uncdiff.lightning.cli import main as cli_main  # noqa: E402
from uncdiff.lightning.module import DiffusionModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE, CHANNELS, T = 8, 1, 100
UNET = dict(sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=[8, 16],
            layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, attention_head_dim=4)
FIT = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1,
                "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False,
                "callbacks": [
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                     "init_args": {"save_last": True, "save_top_k": -1, "every_n_train_steps": 2}},
                    {"class_path": "uncdiff.callbacks.SampleGrid",
                     "init_args": {"num_samples": 4, "sampler": {"name": "ddpm", "steps": 3}}},
                    {"class_path": "uncdiff.callbacks.UncertaintySampling",
                     "init_args": {"num_samples": 2, "sampler": {"name": "ddim", "steps": 3}, "progress": False}}]},
    "model": {"diffusers_unet": UNET, "num_timesteps": T, "lr": 1.0e-3, "warmup_steps": 2, "ema_decay": 0.9,
              "sample_steps": 4},
    "data": {"class_path": "uncdiff.lightning.data.DigitsDataModule",
             "init_args": {"image_size": SIZE, "batch_size": 16}},
}


def train_py(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_cli(*args):
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # LightningCLI warns when argv and sys.argv both have args
        cli_main(list(args))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`train.py fit` of the YAML UNet2DModel for 4 steps, then resumed to 6: `<run>/checkpoints`."""
    root = tmp_path_factory.mktemp("fit")
    (root / "fit.yaml").write_text(yaml.safe_dump(FIT))
    args = ["fit", "--config", "fit.yaml", "--trainer.default_root_dir", "run"]
    train_py(*args, cwd=root)
    checkpoints = root / "run" / "checkpoints"
    (checkpoints / "step4.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes())
    train_py(*args, "--trainer.max_steps", "6", "--ckpt_path", "last", cwd=root)
    return checkpoints


def net_output(net, seed=0):
    x = torch.randn(3, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return net(x, torch.tensor([0, 37, T - 1]))


# ------------------------------------------------------------------------------------------- fit

@pytest.mark.slow
def test_fit_trains_and_resumes_a_yaml_unet2dmodel(trained):
    step4 = torch.load(trained / "step4.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=True)  # plain types only
    assert (step4["global_step"], last["global_step"]) == (4, 6)
    hparams = last["hyper_parameters"]
    assert {k: hparams["diffusers_unet"][k] for k in UNET} == UNET and hparams["pretrained"] is None
    assert (hparams["image_size"], hparams["in_channels"]) == (SIZE, CHANNELS)
    # the resumed steps trained the network and its EMA copy
    for prefix in ("net.unet.conv_in.weight", "ema.ema_model.unet.conv_in.weight"):
        assert not torch.equal(step4["state_dict"][prefix], last["state_dict"][prefix])
    # the callbacks ran at each validation (steps 2, 4, 6)
    run = trained.parent
    assert len(list((run / "samples").glob("*.png"))) == 3
    assert (run / "uncertainty").is_dir()


@pytest.mark.slow
def test_checkpoint_reloads_as_the_same_network(trained):
    module = load_module(trained / "last.ckpt")
    state = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    unet = UNet2DModel(**UNET).eval()  # diffusers' own network, given the checkpoint's EMA weights
    unet.load_state_dict({k.removeprefix("ema.ema_model.unet."): v for k, v in state.items()
                          if k.startswith("ema.ema_model.unet.")})
    torch.testing.assert_close(net_output(module.ema.ema_model), net_output(lambda x, t: unet(x, t).sample),
                               rtol=0, atol=0)
    assert module.schedule.num_timesteps == T and module.sampler_defaults == {}


@pytest.mark.slow
def test_sample_command_on_the_checkpoint(trained, tmp_path):
    from uncdiff.commands.sample import main

    out = tmp_path / "out"
    main(["--checkpoint", str(trained / "last.ckpt"), "--out", str(out), "--n", "4", "--estimator.name", "aleatoric",
          "--sampler.steps", "3", "--estimator.M", "2", "--fabric.accelerator", "cpu", "--progress", "false"])
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all((out / r["map"]).is_file() for r in rows)


@pytest.mark.slow
def test_a_mismatched_data_size_is_refused_at_the_first_step(tmp_path):
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(FIT))
    with pytest.raises(ValueError, match=r"the data's images are \(1, 16, 16\).*model's are \(1, 8, 8\)"):
        run_cli("fit", "--config", str(tmp_path / "fit.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
                "--data.init_args.image_size", "16")


@pytest.mark.parametrize("change, message", [
    ({"foo": 1}, "'foo' is not an option of UNet2DModel"),
    ({"out_channels": 2}, "out_channels = 2 is not supported"),
    ({"num_class_embeds": 10}, "num_class_embeds = 10 is not supported"),
])
def test_bad_unet_configs_are_refused_naming_the_option(change, message):
    with pytest.raises(InputError, match=message):
        DiffusionModule(diffusers_unet={**UNET, **change})


def test_one_network_at_a_time(tmp_path):
    with pytest.raises(ValueError, match="diffusers_unet and pretrained are both set"):
        DiffusionModule(diffusers_unet=UNET, pretrained=str(tmp_path))


# ------------------------------------------------------------------------------------- fine-tune

@pytest.mark.slow
def test_fine_tuning_a_pipeline_folder_keeps_its_schedule_and_starts_from_its_weights(tmp_path):
    scheduler = {"num_train_timesteps": 60, "beta_schedule": "scaled_linear", "clip_sample_range": 0.8,
                 "variance_type": "fixed_large"}
    folder = save_pipeline(tmp_path / "pretrained", unet=tiny_unet(seed=3, sample_size=SIZE), **scheduler)
    lr = 1e-4
    run_cli("fit", "--config", str(write_fit(tmp_path, diffusers_unet=None)), "--model.pretrained", str(folder),
            "--model.lr", str(lr), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.limit_val_batches", "0")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["pretrained"] is None  # the checkpoint holds the configs, not the folder
    assert hparams["diffusers_scheduler"] == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # reloads without the folder's weights
    module = load_module(checkpoint)
    torch.testing.assert_close(module.schedule.alphas_cumprod.float(),
                               DDPMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod, rtol=0, atol=0)
    assert module.sampler_defaults == {"clip": 0.8, "variance": "beta", "spacing": "leading"}
    # two Adam steps (warm-up: lr/2, then lr) move each weight by about lr each: it started from the folder's
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    before = tiny_unet(seed=3, sample_size=SIZE).state_dict()
    moved = max((state[f"net.unet.{k}"] - v).abs().max().item() for k, v in before.items())
    assert 0 < moved <= 3 * lr


def write_fit(folder: Path, **model) -> Path:
    """FIT with `model` changed (None: removed), checkpoints only (no sampling callbacks)."""
    trainer = {**FIT["trainer"], "callbacks": FIT["trainer"]["callbacks"][:1]}
    config = {**FIT, "trainer": trainer,
              "model": {k: v for k, v in {**FIT["model"], **model}.items() if v is not None}}
    (folder / "fit.yaml").write_text(yaml.safe_dump(config))
    return folder / "fit.yaml"


# ---------------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "pipeline"
    train_py("export", "--checkpoint", str(trained / "last.ckpt"), "--out", str(out), cwd=out.parent)
    return out


@pytest.mark.slow
def test_export_writes_a_pipeline_diffusers_loads_with_the_ema_weights(trained, exported):
    assert (exported / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = DDPMPipeline.from_pretrained(exported)
    module = load_module(trained / "last.ckpt")
    theirs = net_output(lambda x, t: pipe.unet(x, t).sample)
    torch.testing.assert_close(net_output(module.ema.ema_model), theirs, rtol=0, atol=0)
    assert not torch.allclose(net_output(module.net), theirs)  # the EMA weights, not the online ones
    # the scheduler's schedule is ours (uncdiff's linear over T = 100), to float32 rounding
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, module.schedule.alphas_cumprod.float())
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, SIZE, SIZE, CHANNELS) and ((images >= 0) & (images <= 1)).all()


@pytest.mark.slow
def test_exported_pipeline_samples_as_our_ddpm_with_the_same_noise(trained, exported):
    pipe = DDPMPipeline.from_pretrained(exported)
    module = load_module(trained / "last.ckpt")
    shape = (2, CHANNELS, SIZE, SIZE)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    theirs = diffusers_loop(pipe.unet.eval(), pipe.scheduler, x_T, T, generator=torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)  # diffusers draws each step's noise inside step(), for t > 0
    sampler = make_sampler(module.schedule, "ddpm", steps=T)  # our defaults: clip, beta_tilde
    noise = [torch.randn(shape, generator=draws) if t > 0 else None for t in sampler.timesteps]
    torch.testing.assert_close(our_loop(module.ema.ema_model, sampler, x_T, noise), theirs, **CHAIN)


@pytest.mark.slow
def test_export_refuses_an_existing_folder_and_our_own_unet(exported, tiny_checkpoint, tmp_path):
    from uncdiff.commands.export import main

    before = sorted(p.relative_to(exported) for p in exported.rglob("*"))
    with pytest.raises(SystemExit, match="exists; export never writes over it"):
        main(["--checkpoint", str(tiny_checkpoint), "--out", str(exported)])
    assert sorted(p.relative_to(exported) for p in exported.rglob("*")) == before
    with pytest.raises(SystemExit, match="uncdiff's own U-Net .* can't be exported"):
        main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "ours")])
    assert not any(tmp_path.iterdir())


def test_a_pipeline_folder_re_exports_with_its_own_scheduler(tmp_path):
    from uncdiff.commands.export import main

    scheduler = {"num_train_timesteps": 60, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False,
                 "variance_type": "fixed_large"}
    folder = save_pipeline(tmp_path / "p", safe_serialization=False, **scheduler)
    main(["--checkpoint", str(folder), "--out", str(tmp_path / "again")])
    config = json.loads((tmp_path / "again" / "scheduler" / "scheduler_config.json").read_text())
    assert {k: config[k] for k in scheduler} == scheduler
    assert (tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [1000, 60])
def test_our_schedules_map_onto_diffusers_schedulers(name, num_timesteps):
    from uncdiff.core.schedule import NoiseSchedule

    ours = NoiseSchedule(name, num_timesteps)
    theirs = DDPMScheduler.from_config(ddpm_scheduler_config(ours))
    torch.testing.assert_close(theirs.betas, ours.betas.float())
    torch.testing.assert_close(theirs.alphas_cumprod, ours.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- calibrate and evaluate

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("pipeline") / "p", num_train_timesteps=T)


@pytest.mark.slow
def test_calibrate_on_a_pipeline_folder(pipeline, tmp_path):
    from uncdiff.commands.calibrate import main

    out = tmp_path / "tau.pt"
    main(["--checkpoint", str(pipeline), "--out", str(out), "--n", "4", "--quantile", "0.5", "--sampler.steps", "3",
          "--estimator.M", "2", "--fabric.accelerator", "cpu", "--progress", "false"])
    tau = torch.load(out, map_location="cpu", weights_only=True)["table"]
    assert tau.shape == (3, CHANNELS, SIZE, SIZE) and bool((tau >= 0).all())


@pytest.mark.slow
def test_evaluate_on_a_pipeline_folder(pipeline, tmp_path):
    from uncdiff.commands.evaluate import main

    out = tmp_path / "eval"
    main(["--checkpoint", str(pipeline), "--out", str(out), "--data.name", "digits", "--experiments", "filtering",
          "--estimators", "[aleatoric]", "--filtering.prc_real", "0", "--filtering.subset_seeds", "2",
          "--fid.cache", str(tmp_path / "cache"), "--n", "12", "--batch_size", "6", "--sampler.steps", "3",
          "--estimator.M", "2", "--fabric.accelerator", "cpu", "--progress", "false"])
    with open(out / "filtering.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["fid_kept"]) >= 0 and (out / "report.md").is_file()


def test_bundled_diffusers_digits_config_builds_a_16x16_unet2dmodel():
    model = yaml.safe_load((REPO / "configs" / "diffusers_digits.yaml").read_text())["model"]
    module = DiffusionModule(**model)
    assert module.image_shape == (1, 16, 16) and isinstance(module.net.unet, UNet2DModel)
    with torch.no_grad():
        assert module(torch.zeros(2, 1, 16, 16), torch.tensor([0, 999])).shape == (2, 1, 16, 16)


@pytest.mark.slow
def test_ddp_trains_a_unet2dmodel_with_identical_weights_on_both_ranks(tmp_path):
    import lightning as L

    from test_ddp import RecordRank
    from uncdiff.lightning.data import DigitsDataModule

    model = DiffusionModule(diffusers_unet=UNET, num_timesteps=T, lr=1e-3, warmup_steps=2, ema_decay=0.9)
    before = model.net.unet.conv_in.weight.detach().clone()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[RecordRank(tmp_path)])
    trainer.fit(model, DigitsDataModule(image_size=SIZE, batch_size=8))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["seen"], r1["seen"])  # different data, the same weights (gradients all-reduced)
    for key in ("net", "ema"):
        for name, value in r0[key].items():
            torch.testing.assert_close(r1[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    assert not torch.equal(r0["net"]["unet.conv_in.weight"], before)  # it trained
