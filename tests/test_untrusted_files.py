"""No file a user passes runs code: a checkpoint whose pickle would create a file is refused by every
command that reads one, with an error naming it, and the file is not created. The same for a
threshold table and for the data module named in a run's saved config."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_checkpoint import TINY_FIT, tiny_checkpoint  # noqa: F401 (fixture)
from uncdiff.io.files import InputError
from uncdiff.io.tables import load_threshold_table
from uncdiff.lightning.loading import datamodule_from_config

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")


class Touch:
    """Unpickling this calls `Path.touch(marker)`: creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def crafted(path: Path, payload: dict, marker: Path) -> Path:
    torch.save({**payload, "note": Touch(marker)}, path)
    return path


def test_the_crafted_file_does_run_code_when_fully_unpickled(tmp_path):
    # the control: what the commands must never do
    path = crafted(tmp_path / "evil.pt", {}, tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.fixture
def evil_checkpoint(tiny_checkpoint, tmp_path):  # noqa: F811
    """The tiny checkpoint, all of it, plus one object whose unpickling creates `tmp_path/marker`."""
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    return crafted(tmp_path / "evil.ckpt", checkpoint, tmp_path / "marker")


FIT_OPTIONS = ["--config", "quickstart.yaml", *TINY_FIT]
COMMANDS = {
    "sample": lambda ckpt, tmp: ["sample", "--checkpoint", ckpt, "--out", str(tmp / "out")],
    "evaluate": lambda ckpt, tmp: ["evaluate", "--checkpoint", ckpt, "--out", str(tmp / "out")],
    "calibrate": lambda ckpt, tmp: ["calibrate", "--checkpoint", ckpt, "--out", str(tmp / "out")],
    "validate": lambda ckpt, tmp: ["validate", *FIT_OPTIONS, "--trainer.default_root_dir", str(tmp / "out"),
                                   "--trainer.limit_val_batches", "1", "--ckpt_path", ckpt],
    "fit --ckpt_path": lambda ckpt, tmp: ["fit", *FIT_OPTIONS, "--trainer.default_root_dir", str(tmp / "out"),
                                          "--ckpt_path", ckpt],
    "export": lambda ckpt, tmp: ["export", "--checkpoint", ckpt, "--out", str(tmp / "out")],
    "restore": lambda ckpt, tmp: ["restore", "--checkpoint", ckpt, "--conditions", str(conditions(tmp)),
                                  "--out", str(tmp / "out")],
    "evaluate_image_to_image": lambda ckpt, tmp: ["evaluate_image_to_image", "--checkpoint", ckpt, "--out", str(tmp / "out")],
    "calibrate_intervals": lambda ckpt, tmp: ["calibrate_intervals", "--checkpoint", ckpt, "--out", str(tmp / "out.json")],
}


def conditions(tmp: Path) -> Path:
    """A folder with one condition image, for `restore`."""
    from PIL import Image

    folder = tmp / "conditions"
    folder.mkdir(exist_ok=True)
    Image.new("L", (8, 8)).save(folder / "0.png")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_crafted_checkpoint_is_refused_without_running(command, evil_checkpoint, tmp_path):
    args = COMMANDS[command](str(evil_checkpoint), tmp_path)
    result = subprocess.run([sys.executable, TRAIN, *args], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert not (tmp_path / "marker").exists(), "the checkpoint's pickle ran"
    assert str(evil_checkpoint) in result.stderr and "weights_only=True" in result.stderr, result.stderr[-3000:]
    assert not list((tmp_path / "out").rglob("*.ckpt")) if (tmp_path / "out").exists() else True


def test_crafted_threshold_table_is_refused(tmp_path):
    path = crafted(tmp_path / "tau.pt", {"table": torch.zeros(4, 1, 8, 8), "settings": {}}, tmp_path / "marker")
    with pytest.raises(ValueError, match="tau.pt"):
        load_threshold_table(path, 4, (1, 8, 8))
    assert not (tmp_path / "marker").exists()


def test_saved_config_cannot_import_a_module(tmp_path, monkeypatch):
    """A run's config-*.yaml names its data module; only uncdiff's own are built, nothing is imported."""
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w').close()\nclass Data: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "config-1.yaml"
    config.write_text("data:\n  class_path: planted.Data\n  init_args: {}\n")
    with pytest.raises(InputError, match="planted.Data"):
        datamodule_from_config(config)
    assert not (tmp_path / "marker").exists()
    assert "planted" not in sys.modules
