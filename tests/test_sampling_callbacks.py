"""The sampling callbacks (UncertaintySampling, FIDTrajectory) inside a tiny fit, in one process and
in two CPU processes (ddp_spawn).

Truths used: what reached the offline W&B run is read back from its files (the media folder and
the `.wandb` record log); the FIDs also land in a CSV log; the same seeds give the same images,
hence the same three sets and FIDs, whatever the number of processes; a cache hit computes
nothing; options are checked before any training.
"""

import csv
import json
import math
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import uncdiff.evaluation.fid as fid
from uncdiff.callbacks import FIDTrajectory, UncertaintySampling
from uncdiff.callbacks.fid_trajectory import dataset_key
from uncdiff.callbacks.uncertainty_sampling import FIGURES
from conftest import tiny_model_kwargs
from uncdiff.lightning.data import CIFAR10DataModule, DigitsDataModule
from uncdiff.lightning.module import DiffusionModule
from uncdiff.lightning.wandb_logger import WandbLogger
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec, spec_from_dict

FID_KEYS = ("val/fid/unguided", "val/fid/guided", "val/fid/filtered")
N_FID = 12


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One FID cache for the file: the real statistics are computed once."""
    return tmp_path_factory.mktemp("cache")


def fid_callback(cache: Path) -> FIDTrajectory:
    return FIDTrajectory(num_samples=N_FID, sampler=SamplerSpec("ddim", 3), extractor="digits-classifier",
                         cache_dir=str(cache), batch_size=5, save_images=True, progress=False)


def fit(root: Path, cache: Path, devices: int) -> L.Trainer:
    """Two epochs of two steps, validating after each: FID both times, figures at epoch 2 only."""
    figures = UncertaintySampling(num_samples=6, every_n_epochs=2, sampler=SamplerSpec("ddim", 3), batch_size=4,
                                  num_extremes=2, progress=False)
    best = ModelCheckpoint(dirpath=root / "best", monitor="val/fid/filtered", save_top_k=1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=4,
        limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=root,
        logger=[WandbLogger(save_dir=str(root)), CSVLogger(root)], callbacks=[fid_callback(cache), figures, best],
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    cwd = os.getcwd()
    # Under ddp_spawn, rank 0 logs through the W&B run the main process created, and wandb 0.31 then
    # writes the media under ./wandb/<run>/files, not under save_dir: run where the run lives.
    os.chdir(root)
    try:
        trainer.fit(DiffusionModule(**tiny_model_kwargs()), DigitsDataModule(image_size=8, batch_size=8))
    finally:
        os.chdir(cwd)
    return trainer


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("one")
    return root, fit(root, cache, devices=1)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("two")
    return root, fit(root, cache, devices=2)


# ---------------------------------------------------------------------- reading a run's outputs

def wandb_records(run_dir: Path):
    """The records of an offline run's `.wandb` file (wandb's LevelDB-style log: 32 KiB blocks of
    chunks with a 7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last),
    parsed as wandb's protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_history_and_config(run_dir: Path) -> tuple[list[dict], dict]:
    history, config = [], {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    return history, config


def csv_metrics(root: Path) -> list[dict]:
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def rank_files(root: Path, step: int) -> dict:
    """The images, scores and kept flags of all ranks at `step`, concatenated in seed order."""
    parts = [torch.load(p) for p in sorted((root / "fid" / f"step_{step:08d}").glob("rank*.pt"))]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} | {"ranks": len(parts)}


def figures_once(root):
    """The figures are PNGs under the run dir at the second validation only (every_n_epochs=2), each
    logged once to the run's one W&B run; returns that run's history and config."""
    assert sorted(p.name for p in (root / "uncertainty").iterdir()) == ["step_00000004"]
    assert sorted(p.stem for p in (root / "uncertainty" / "step_00000004").glob("*.png")) == sorted(FIGURES)
    (run,) = (root / "wandb").glob("offline-run-*")
    for name in FIGURES:
        assert len(list(run.glob(f"files/media/images/val/uncertainty/{name}_*.png"))) == 1, name
    return wandb_history_and_config(run)


# ------------------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_one_process_fit_writes_figures_fids_and_wandb_run(one_process, cache):
    root, trainer = one_process
    history, config = figures_once(root)
    for key in (*FID_KEYS, "val/fid/seconds", "val/fid/sampling_seconds", "val/fid/feature_seconds"):
        values = [h[key] for h in history if key in h]
        assert len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values), (key, values)
    seconds = [h["val/uncertainty/seconds"] for h in history if "val/uncertainty/seconds" in h]
    assert len(seconds) == 1 and math.isfinite(seconds[0]) and seconds[0] > 0, seconds  # with the figures
    assert [h["val/uncertainty/grids/_type"] for h in history if "val/uncertainty/grids/_type" in h] == [
        "images/separated"]
    # every FID says which features it used
    classifier = fid.ClassifierFeatures(cache_dir=str(cache), image_size=8)
    assert config["fid"]["extractor"] == classifier.name
    assert config["fid"]["dataset"] == "digits-8x8-train"

    rows = csv_metrics(root)
    for key in FID_KEYS:
        assert len(logged(rows, key)) == 2, key
        assert trainer.callback_metrics[key] == logged(rows, key)[-1]
    # the cost is logged, and sampling is most of it
    seconds = logged(rows, "val/fid/seconds")[-1]
    assert logged(rows, "val/fid/sampling_seconds")[-1] + logged(rows, "val/fid/feature_seconds")[-1] <= seconds
    # ModelCheckpoint can monitor a FID: it kept the epoch with the lower filtered FID
    (best,) = (root / "best").glob("epoch=*.ckpt")
    epochs = [int(r["epoch"]) for r in rows if r.get("val/fid/filtered")]
    best_epoch = epochs[min(range(2), key=lambda i: logged(rows, "val/fid/filtered")[i])]
    assert best.name.startswith(f"epoch={best_epoch}-")

    saved = rank_files(root, 4)
    assert saved["seeds"].tolist() == list(range(N_FID)) and saved["ranks"] == 1
    assert saved["kept"].sum() == N_FID - round(N_FID / 6)
    assert saved["scores"][~saved["kept"]].min() >= saved["scores"][saved["kept"]].max()  # the highest dropped


@pytest.mark.slow
def test_two_processes_log_once_and_see_what_one_process_sees(two_processes, cache, tmp_path):
    root, trainer = two_processes
    history, _ = figures_once(root)  # rank 1 wrote nothing a logger or a figure would show twice
    rows = csv_metrics(root)
    for key in FID_KEYS:
        assert len([h for h in history if key in h]) == 2 and len(logged(rows, key)) == 2, key
        assert float(trainer.callback_metrics[key]) == logged(rows, key)[-1]  # rank 0's, back in the main process
    assert len(list((root / "best").glob("epoch=*.ckpt"))) == 1  # ModelCheckpoint monitored the FID under DDP

    # each rank generated its half of the seeds; one process, from the same weights, generates the same set
    two = rank_files(root, 4)
    assert two["ranks"] == 2 and two["seeds"].tolist() == list(range(N_FID))
    assert torch.load(root / "fid" / "step_00000004" / "rank1.pt")["seeds"].tolist() == list(range(6, N_FID))
    model = DiffusionModule.load_from_checkpoint(root / "best" / "last.ckpt")
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                       callbacks=[fid_callback(cache)], limit_val_batches=1, enable_progress_bar=False,
                       enable_model_summary=False)
    (metrics,) = single.validate(model, DigitsDataModule(image_size=8, batch_size=8))
    (step_dir,) = (tmp_path / "fid").iterdir()
    one = rank_files(tmp_path, int(step_dir.name.removeprefix("step_")))
    assert one["ranks"] == 1 and one["seeds"].tolist() == list(range(N_FID))
    for key in ("unguided", "guided", "scores"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(two["kept"], one["kept"])  # the same filtered set, decided over both ranks' scores
    for key in FID_KEYS:
        assert metrics[key] == pytest.approx(logged(rows, key)[-1], rel=1e-4), key


def test_real_stats_are_cached_per_dataset_and_extractor(one_process, two_processes, cache, monkeypatch):
    # three processes over two fits computed the digits statistics once
    assert [p.name for p in (cache / "fid_stats").iterdir()] == [
        f"digits-8x8-train-{fid.ClassifierFeatures(cache_dir=str(cache), image_size=8).name}.pt"]
    computed = []
    real_compute = fid.compute_real_stats
    monkeypatch.setattr(fid, "compute_real_stats", lambda *a: computed.append(1) or real_compute(*a))
    module = DiffusionModule(**tiny_model_kwargs())

    def set_up(**options):
        callback = FIDTrajectory(num_samples=4, extractor="digits-classifier", cache_dir=str(cache), **options)
        trainer = SimpleNamespace(datamodule=DigitsDataModule(image_size=8), loggers=[], limit_val_batches=1)
        callback.setup(trainer, module, "fit")
        return callback

    assert set_up().config["dataset"] == "digits-8x8-train" and computed == []  # read, not recomputed
    other_extractor = set_up(extractor_options={"retrain": True, "epochs": 1})
    other_split = set_up(real_split="val")
    assert len(computed) == 2
    names = sorted(p.name for p in (cache / "fid_stats").iterdir())
    assert len(names) == 3
    assert f"digits-8x8-train-{other_extractor.evaluators['filtered'].name}.pt" in names
    assert other_split.config["dataset"] == "digits-8x8-val" and any(n.startswith("digits-8x8-val-") for n in names)
    assert dataset_key(CIFAR10DataModule(), (3, 32, 32), "train") == "cifar10-32x32-train"


def from_config(cls, init_args: dict):
    """The callback as LightningCLI builds it from a YAML's `init_args` (the specs parsed and checked)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "callback")
    return parser.instantiate_classes(parser.parse_object({"callback": init_args})).callback


def test_configs_run_both_callbacks_on_validation_epochs():
    """The issue's schedules: quickstart at validations with a small N and the digits
    classifier; CIFAR-10 with Inception, 10k samples of 20-step DDIM, on some validations, and a
    checkpoint of the best FID that runs when the FID does."""
    import yaml

    from uncdiff import callbacks
    from uncdiff.lightning.cli import CONFIG_DIR

    for name in ("quickstart", "cifar"):
        config = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        every_val = config["trainer"]["check_val_every_n_epoch"]
        built = {c["class_path"].split(".")[-1]: (c, from_config(getattr(callbacks, c["class_path"].split(".")[-1]),
                                                                 c["init_args"]))
                 for c in config["trainer"]["callbacks"] if c["class_path"].startswith("uncdiff.callbacks.")}
        fid_callback, figures = built["FIDTrajectory"][1], built["UncertaintySampling"][1]
        assert fid_callback.sampler == SamplerSpec("ddim", 20)
        assert fid_callback.every_n_epochs % every_val == 0 and figures.every_n_epochs % every_val == 0
        if name == "quickstart":
            assert fid_callback.extractor == "digits-classifier" and 200 <= fid_callback.num_samples <= 300
            assert figures.every_n_epochs == every_val  # figures at every validation, FID at some
        else:
            assert fid_callback.extractor == "inception" and fid_callback.num_samples == 10_000
            (best,) = [c["init_args"] for c in config["trainer"]["callbacks"]
                       if c["init_args"].get("monitor", "").startswith("val/fid/")]
            assert best["every_n_epochs"] == fid_callback.every_n_epochs


@pytest.mark.parametrize("cls, options, option", [
    (FIDTrajectory, lambda: {"fraction_dropped": 0.0}, "fraction_dropped"),
    (FIDTrajectory, lambda: {"fraction_dropped": 1.0}, "fraction_dropped"),
    (FIDTrajectory, lambda: {"every_n_epochs": 0}, "every_n_epochs"),
    (FIDTrajectory, lambda: {"num_samples": 1}, "num_samples"),
    (FIDTrajectory, lambda: {"sampler": SamplerSpec(steps=0)}, "sampler.steps"),
    (FIDTrajectory, lambda: {"sampler": SamplerSpec("euler")}, "sampler.name"),
    (FIDTrajectory, lambda: {"sampler": SamplerSpec(eta=2.0)}, "sampler.eta"),
    (FIDTrajectory, lambda: {"sampler": spec_from_dict(SamplerSpec, {"etta": 0.0})}, "sampler.etta"),
    (FIDTrajectory, lambda: {"estimator": EstimatorSpec()}, "estimator.name"),
    (FIDTrajectory, lambda: {"estimator": EstimatorSpec("aleatoric", M=1)}, "estimator.M"),
    (FIDTrajectory, lambda: {"estimator": EstimatorSpec("mc_dropout", M=1)}, "estimator.M"),
    (FIDTrajectory, lambda: {"estimator": EstimatorSpec("bayesdiff")},
     "estimator.name bayesdiff .*Laplace posterior fitted after training"),
    (FIDTrajectory, lambda: {"guidance_table": "/nowhere/tau.pt"}, "guidance_table: no threshold table"),
    (UncertaintySampling, lambda: {"guidance_table": "/nowhere/tau.pt"}, "guidance_table: no threshold table"),
    (FIDTrajectory, lambda: {"guidance": GuidanceSpec("gradient", sign=2)}, "guidance.sign"),
    (FIDTrajectory, lambda: {"guidance": spec_from_dict(GuidanceSpec, {"lambda": 1.0})}, "guidance.lambda"),
    (FIDTrajectory, lambda: {"extractor": "vgg"}, "extractor"),
    (FIDTrajectory, lambda: {"extractor_options": {"weights_path": "/nowhere/inception.pth"}}, "weights_path"),
    (FIDTrajectory, lambda: {"real_split": "test"}, "real_split"),
    (FIDTrajectory, lambda: {"batch_size": 0}, "batch_size"),
    (UncertaintySampling, lambda: {"every_n_epochs": 0}, "every_n_epochs"),
    (UncertaintySampling, lambda: {"fraction_dropped": 1.5}, "fraction_dropped"),
    (UncertaintySampling, lambda: {"num_samples": 0}, "num_samples"),
    (UncertaintySampling, lambda: {"num_extremes": 0}, "num_extremes"),
    (UncertaintySampling, lambda: {"estimator": EstimatorSpec("aleatoric", window=(0.5, 0.2))}, "estimator.window"),
    (UncertaintySampling, lambda: {"estimator": EstimatorSpec("mc_dropout")}, "estimator.name"),
    (UncertaintySampling, lambda: {"guidance": GuidanceSpec("magic")}, "guidance.rule"),
    (UncertaintySampling, lambda: {"cmap": "rainbowish"}, "cmap"),
])
def test_bad_options_fail_at_construction_naming_the_option(cls, options, option):
    with pytest.raises((ValueError, FileNotFoundError), match=option):
        cls(**options())


def test_a_yaml_config_is_checked_against_the_specs_when_parsed():
    """LightningCLI parses a callback's `init_args` into the specs: a bad value is refused by its name."""
    with pytest.raises(Exception, match="estimator.M must be an integer >= 2"):
        from_config(FIDTrajectory, {"estimator": {"name": "aleatoric", "M": 1}})
    callback = from_config(UncertaintySampling, {"sampler": {"name": "ddim", "steps": 3},
                                                 "estimator": {"name": "aleatoric", "M": 3}})
    assert callback.estimator == EstimatorSpec("aleatoric", M=3) and callback.sampler.steps == 3


def test_a_threshold_table_file_is_checked_at_construction_and_used_when_sampling(tmp_path, monkeypatch):
    from uncdiff.core.samplers import make_sampler, sample
    from uncdiff.io.tables import save_threshold_table
    from uncdiff.uncertainty.calibration import calibrate_threshold_table
    from uncdiff.uncertainty.estimators import AleatoricUncertainty
    from uncdiff.uncertainty.guidance import UncertaintyGuidance

    torch.manual_seed(0)
    module = DiffusionModule(**tiny_model_kwargs())
    sampler = make_sampler(module.schedule, "ddim", steps=3)
    table = calibrate_threshold_table(module.ema.ema_model.eval(), sampler, module.image_shape, range(4),
                                      quantile=0.9, M=2)
    save_threshold_table(tmp_path / "tau.pt", table, {"sampler": {"name": "ddim", "steps": 3}, "quantile": 0.9})
    monkeypatch.chdir(tmp_path)
    options = dict(sampler=SamplerSpec("ddim", 3), guidance=GuidanceSpec("posterior"), guidance_table="tau.pt",
                   progress=False)
    figures = UncertaintySampling(num_samples=2, **options)
    fid_trajectory = FIDTrajectory(num_samples=2, **options)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the table was loaded at construction: the run may change directory
    assert torch.equal(figures.guidance.table, table) and torch.equal(fid_trajectory.guidance.table, table)
    trainer = SimpleNamespace(global_rank=0, world_size=1, is_global_zero=True)
    results = figures.generate(trainer, module)
    assert results["guided"]["scores"].shape == (2,)
    # the file's table in the plain sampling loop gives the same images (the default 5 perturbations)
    hook = UncertaintyGuidance(AleatoricUncertainty(), rule="posterior", table=table)
    loop = sample(module.ema.ema_model.eval(), sampler, module.image_shape, [0, 1], hook=hook)
    torch.testing.assert_close(results["guided"]["images"], loop)
    with pytest.raises(ValueError, match="guidance_table: .*shape"):  # 3 steps in the table, 4 here
        UncertaintySampling(sampler=SamplerSpec("ddim", 4), guidance=GuidanceSpec("posterior"),
                            guidance_table="../tau.pt")


def test_mc_dropout_scores_on_a_model_trained_without_dropout_fail_when_the_run_starts(cache):
    callback = FIDTrajectory(num_samples=4, estimator=EstimatorSpec("mc_dropout"), extractor="digits-classifier",
                             cache_dir=str(cache))
    trainer = SimpleNamespace(datamodule=DigitsDataModule(image_size=8), loggers=[], limit_val_batches=1)
    with pytest.raises(ValueError, match="estimator.dropout: the model was trained without dropout"):
        callback.setup(trainer, DiffusionModule(**tiny_model_kwargs(dropout=0.0)), "fit")


def test_filtered_set_takes_a_score_variant_with_a_checked_reference_file(tmp_path, monkeypatch):
    """FIDTrajectory's filtered set scores with estimator.score (docs/algorithms.md §3): the reference
    file is loaded and checked against its steps at construction and reaches the estimator that
    `sample` builds, which scores with it."""
    from uncdiff.io.tables import save_score_reference
    from uncdiff.uncertainty.estimators import variant_scores

    path = tmp_path / "tau.pt.reference.pt"
    reference = {"mean": torch.tensor([4.0, 3.0, 2.0]), "std": torch.tensor([1.0, 2.0, 0.5])}
    save_score_reference(path, reference, {})
    standardized = EstimatorSpec("aleatoric", score="standardized")
    with pytest.raises(ValueError, match="needs score_reference"):
        FIDTrajectory(sampler=SamplerSpec("ddim", 3), estimator=standardized)
    with pytest.raises(ValueError, match="score_reference: .*calibrated for 3 sampler steps; this run has 4"):
        FIDTrajectory(sampler=SamplerSpec("ddim", 4), estimator=standardized, score_reference=str(path))
    callback = FIDTrajectory(sampler=SamplerSpec("ddim", 3), estimator=standardized, score_reference=str(path))
    module = DiffusionModule(**tiny_model_kwargs())
    result = module.sample(n=3, sampler=callback.sampler, estimator=callback.estimator)
    want = variant_scores(result.step_totals, result.total_steps, "standardized", reference)
    torch.testing.assert_close(result.scores.double(), want, rtol=1e-5, atol=1e-5)
