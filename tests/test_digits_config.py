"""configs/digits.yaml holds together: early stopping and the best-FID checkpoint see an FID at every
validation, the data are the quickstart's, and the network trains with dropout (MC-Dropout's rate)."""

import yaml

from uncdiff.lightning.cli import CONFIG_DIR


def load(name: str) -> dict:
    with open(CONFIG_DIR / f"{name}.yaml") as f:
        return yaml.safe_load(f)


def callbacks(config: dict, name: str) -> list[dict]:
    return [c.get("init_args") or {} for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name)]


def test_every_validation_has_the_fid_that_early_stopping_and_the_best_checkpoint_monitor():
    config = load("digits")
    every = config["trainer"]["check_val_every_n_epoch"]
    (fid,) = callbacks(config, "FIDTrajectory")
    (stop,) = callbacks(config, "EarlyStopping")
    best = [c for c in callbacks(config, "ModelCheckpoint") if c.get("monitor")]
    assert fid["every_n_epochs"] == every  # EarlyStopping fails on a validation without its metric
    assert stop["monitor"] == "val/fid/unguided" and stop["mode"] == "min"
    assert [c["monitor"] for c in best] == ["val/fid/unguided"]
    assert best[0]["every_n_epochs"] == every and best[0].get("mode", "min") == "min"
    assert config["trainer"]["max_steps"] % (every * 25) == 0  # the cap falls on an FID (25 steps an epoch)


def test_same_data_and_fid_features_as_the_quickstart_and_trained_with_dropout():
    digits, quickstart = load("digits"), load("quickstart")
    assert digits["data"] == quickstart["data"]  # one dataset key: the real FID statistics are shared
    (fid,), (quick_fid,) = callbacks(digits, "FIDTrajectory"), callbacks(quickstart, "FIDTrajectory")
    for key in ("extractor", "sampler", "cache_dir"):
        assert fid[key] == quick_fid[key]
    assert fid["sampler"] == {"name": "ddim", "steps": 20}
    assert digits["model"]["dropout"] > 0
    assert digits["model"]["base_channels"] > quickstart["model"]["base_channels"]
