"""A user's mistake ends in one line naming the option or file and the fix, exit status 2 (the command
can't run as given) or 1 (the run failed), before any work; `--debug` or UNCDIFF_DEBUG=1 shows the
traceback; a bug keeps its traceback. Values are checked where they enter: non-finite or negative
thresholds, NaN weights, edited run folders are refused by name, a NaN score is never kept."""

import errno
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from tiny_checkpoint import tiny_checkpoint  # noqa: F401 (fixture)
from uncdiff.__main__ import main, user_error
from uncdiff.io.files import InputError, load_torch, written_together
from uncdiff.io.sample_store import SampleStore
from uncdiff.io.tables import load_score_reference, load_threshold_table, save_score_reference, save_threshold_table

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")

FIT_CONFIG = """
trainer: {accelerator: cpu, devices: 1, max_steps: 2, logger: false, enable_progress_bar: false,
          enable_model_summary: false, limit_val_batches: 0}
model: {base_channels: 8, channel_mults: [1, 2], num_res_blocks: 1,
        attn_resolutions: [], dropout: 0.0, lr: 1.0e-3, warmup_steps: 1, sample_steps: 4}
data:
  class_path: uncdiff.lightning.data.DigitsDataModule
  init_args: {image_size: 8, batch_size: 16}
"""


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`uncdiff argv` in this process: (exit status, the stderr lines that report an error)."""
    capsys.readouterr()
    with mock.patch.object(sys, "argv", sys.argv[:1]), pytest.raises(SystemExit) as exit_:
        main(argv)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr
    return exit_.value.code, [line for line in stderr.splitlines() if line.startswith("error")]


@pytest.fixture
def fit_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fit.yaml").write_text(FIT_CONFIG)
    return tmp_path


FIT = ["fit", "--config", "fit.yaml", "--trainer.default_root_dir", "run"]


@pytest.mark.parametrize("extra, words", [
    (["--ckpt_path", "/nonexistent/x.ckpt"], ["--ckpt_path", "not found", "/nonexistent/x.ckpt"]),
    (["--ckpt_path", "."], ["--ckpt_path", "is a folder"]),
    (["--model.lr", "0"], ["--model", "lr must be > 0"]),
    (["--trainer.max_steps", "-5"], ["max_steps", "-5"]),
    (["--trainer.max_steps", "0"], ["--trainer.max_steps 0", "trains nothing"]),
])
def test_fit_mistakes_are_one_line(fit_dir, capsys, extra, words):
    status, errors = run_main([*FIT, *extra], capsys)
    assert status == 2 and len(errors) == 1, errors
    for word in words:
        assert word in errors[0]
    assert not (fit_dir / "run" / "checkpoints").exists()  # nothing trained


def test_zero_byte_checkpoint_is_an_empty_file(fit_dir, capsys):
    (fit_dir / "empty.ckpt").touch()
    status, errors = run_main([*FIT, "--ckpt_path", "empty.ckpt"], capsys)
    assert status == 2 and len(errors) == 1 and "empty file" in errors[0] and "empty.ckpt" in errors[0]
    status, errors = run_main(["sample", "--checkpoint", "empty.ckpt", "--out", "out"], capsys)
    assert status == 2 and len(errors) == 1 and "empty file" in errors[0]


def test_validate_checks_its_checkpoint_before_any_work(tmp_path, monkeypatch, capsys):
    """The quickstart config's FID callback trains a classifier into ./cache: not before the
    checkpoint is known to be there."""
    monkeypatch.chdir(tmp_path)
    status, errors = run_main(["validate", "--config", "quickstart.yaml", "--ckpt_path", "missing.ckpt"], capsys)
    assert status == 2 and len(errors) == 1 and "missing.ckpt" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_last_checkpoint_is_refused_and_interrupted_writes_are_cleared(fit_dir, capsys):
    """A kill inside the first `last.ckpt` write leaves a step checkpoint and a partial temporary file:
    `--ckpt_path last` must not start over from step 0 (Lightning only warns), and the partial file goes."""
    checkpoints = fit_dir / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "epoch=0-step=2.ckpt").write_bytes(b"whole")
    partial = checkpoints / ".last.ckpt.4194999.tmp"  # above Linux's largest pid: its writer is gone
    partial.write_bytes(b"\x00" * 1000)
    status, errors = run_main([*FIT, "--ckpt_path", "last"], capsys)
    assert status == 2 and len(errors) == 1
    assert "--ckpt_path last" in errors[0] and "epoch=0-step=2.ckpt" in errors[0]
    assert not partial.exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt"]


@pytest.mark.slow
def test_sample_mistakes_are_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    args = ["sample", "--checkpoint", str(tiny_checkpoint), "--n", "8", "--batch_size", "4", "--sampler.steps", "2",
            "--estimator.name", "none", "--progress", "false"]

    status, errors = run_main([*args, "--out", "devices", "--fabric.devices", "0"], capsys)
    assert status == 2 and len(errors) == 1 and "devices" in errors[0]

    unwritable = Path("/sys/uncdiff-test-out")  # /sys can't be written, even by root
    try:
        unwritable.mkdir()
        unwritable.rmdir()
    except OSError:
        status, errors = run_main([*args, "--out", str(unwritable)], capsys)
        assert status == 1 and len(errors) == 1 and str(unwritable) in errors[0] and "--out" in errors[0]

    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "run.json").write_text("[]")
    status, errors = run_main([*args, "--out", "listed"], capsys)
    assert status == 2 and len(errors) == 1 and "run.json" in errors[0]

    # an edited run folder: a chunk record of another chunk's seeds, then one that is not JSON
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        main([*args, "--out", "run"])
    records = tmp_path / "run" / "records"
    first = json.loads((records / "chunk-000000.json").read_text())
    (records / "chunk-000001.json").write_text(json.dumps(first))
    (tmp_path / "run" / "manifest.csv").unlink()
    status, errors = run_main([*args, "--out", "run"], capsys)
    assert status == 2 and len(errors) == 1 and "chunk-000001.json" in errors[0] and "seeds" in errors[0]
    assert not (tmp_path / "run" / "manifest.csv").exists()  # never a seed listed twice
    (records / "chunk-000001.json").write_text("{")
    status, errors = run_main([*args, "--out", "run"], capsys)
    assert status == 2 and len(errors) == 1 and "chunk-000001.json" in errors[0]


@pytest.mark.slow
def test_checkpoint_with_nan_weights_is_refused_by_name(tiny_checkpoint, tmp_path):  # noqa: F811
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    name = next(k for k, v in checkpoint["state_dict"].items() if k.startswith("ema.ema_model.") and v.is_floating_point())
    checkpoint["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(InputError, match=rf"nan.ckpt.*{name}.*NaN or inf"):
        load_torch(tmp_path / "nan.ckpt", "checkpoint")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_threshold_tables_and_references_hold_finite_nonnegative_values(tmp_path, bad):
    """A NaN threshold turns guidance off without a word (every comparison with NaN is false)."""
    table = torch.rand(4, 1, 8, 8)
    table[2, 0, 3, 3] = bad
    save_threshold_table(tmp_path / "tau.pt", table, {})
    with pytest.raises(ValueError, match="tau.pt.*thresholds are (NaN or inf|negative)"):
        load_threshold_table(tmp_path / "tau.pt")
    mean, std = torch.rand(4) + 1, torch.rand(4) + 1
    std[1] = bad
    save_score_reference(tmp_path / "ref.pt", {"mean": mean, "std": std}, {})
    with pytest.raises(ValueError, match="ref.pt.*standard deviations are (NaN or inf|negative)"):
        load_score_reference(tmp_path / "ref.pt")


def test_a_nan_score_is_never_kept(tmp_path, capsys):
    """Filtering drops the highest 1/8 of 8 scores: one sample, here one of the two NaN-scored ones. A NaN
    score says nothing of a sample's quality: the other is dropped too, and the run says so."""
    store = SampleStore(tmp_path / "out", {"seeds": {"start": 0, "count": 8}, "batch_size": 4, "save_maps": False,
                                           "estimator": {"name": "aleatoric"}, "drop_fraction": 0.125})
    store.check()
    store.create({})
    images = torch.zeros(4, 1, 8, 8)
    store.write_chunk(store.chunks[0], images, None, torch.tensor([1.0, float("nan"), 2.0, float("nan")]), 1, 0.1)
    store.write_chunk(store.chunks[1], images, None, torch.tensor([4.0, 5.0, 6.0, 7.0]), 1, 0.1)
    summary = store.finish()
    kept = {int(row["seed"]): row["kept"] for row in store.manifest()}
    assert kept == {0: "1", 1: "0", 2: "1", 3: "0", 4: "1", 5: "1", 6: "1", 7: "1"}
    assert summary["non_finite_scores"] == 2 and summary["kept"] == 6
    assert "not a finite number" in capsys.readouterr().err


def test_files_written_together_are_all_or_none(tmp_path):
    """A full disk while writing the second of calibrate's files leaves neither (never a reference
    without its table); the next try is not refused by a leftover."""
    reference, table = tmp_path / "tau.pt.reference.pt", tmp_path / "tau.pt"
    with pytest.raises(OSError) as error:
        with written_together(reference, table) as (reference_tmp, table_tmp):
            reference_tmp.write_bytes(b"reference")
            raise OSError(errno.ENOSPC, "No space left on device", str(table))
    assert user_error(error.value) == (f"no space left on the device: {table}: free some space and repeat the "
                                       f"command (sample and restore go on where they stopped)", 1)
    assert list(tmp_path.iterdir()) == []
    with written_together(reference, table) as (reference_tmp, table_tmp):
        reference_tmp.write_bytes(b"reference")
        table_tmp.write_bytes(b"table")
    assert reference.read_bytes() == b"reference" and table.read_bytes() == b"table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tau.pt", "tau.pt.reference.pt"]


@pytest.mark.slow
def test_exit_status_and_debug(tmp_path):
    """Through the real entry point: one line and status 2; `--debug` or UNCDIFF_DEBUG=1 the traceback;
    an error of the program itself (a bug) keeps its traceback."""
    (tmp_path / "empty.ckpt").touch()
    args = [sys.executable, TRAIN, "sample", "--checkpoint", "empty.ckpt", "--out", "out"]
    plain = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [plain.stderr.strip()], plain.stderr
    assert plain.stderr.startswith("error: ") and "empty file" in plain.stderr
    debug = subprocess.run([*args, "--debug"], cwd=tmp_path, capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "InputError" in debug.stderr
    assert user_error(RuntimeError("a bug")) is None and user_error(KeyError("x")) is None
    assert user_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "x.yaml"))[1] == 2


@pytest.mark.parametrize("key, value, words", [
    ("sample_size", 100000, "GiB of memory"), ("sample_size", -3, "sample_size"),
    ("layers_per_block", 100000, "layers_per_block"), ("layers_per_block", -1, "layers_per_block"),
    ("block_out_channels", "x", "block_out_channels"), ("in_channels", "3", "in_channels"),
])
def test_absurd_unet_configs_are_refused_before_anything_is_built(tmp_path, key, value, words):
    from uncdiff.io.diffusers_pipeline import check_unet_config

    config = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
              "block_out_channels": [8, 16], "layers_per_block": 1, key: value}
    if key == "in_channels":
        config["out_channels"] = value
    with pytest.raises(InputError, match=words):
        check_unet_config(config, tmp_path / "config.json")


@pytest.mark.parametrize("config, words", [
    ({"num_train_timesteps": 2_000_000_000}, "GiB of memory"), ({"num_train_timesteps": 2.5}, "num_train_timesteps"),
    ({"beta_start": "x"}, "beta_start"), ({"trained_betas": "abc", "num_train_timesteps": 3}, "trained_betas"),
    ({"variance_type": ["x"]}, "variance_type"), ({"timestep_spacing": {"a": 1}}, "timestep_spacing"),
])
def test_scheduler_configs_of_wrong_types_or_sizes_are_refused(config, words):
    from uncdiff.io.diffusers_pipeline import schedule_from_config

    with pytest.raises(InputError, match=words):
        schedule_from_config(config, "scheduler_config.json")


def test_an_image_too_large_to_decode_is_an_input_error(tmp_path):
    """A condition image of 20000x10000 pixels (PIL's decompression-bomb limit) is refused by name."""
    import struct
    import zlib

    from uncdiff.io.image_to_image import read_conditions

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0))  # only the header: 8-bit grey
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b""))
    with pytest.raises(InputError, match="huge.png is not a readable image"):
        read_conditions(tmp_path, 1, 8)


@pytest.mark.slow
def test_calibrate_checks_its_folder_before_sampling_and_writes_all_or_nothing(tiny_checkpoint, tmp_path,  # noqa: F811
                                                                                monkeypatch, capsys):
    """An unwritable folder is found before any sampling; a full disk while writing the table leaves
    neither it nor its reference (a rerun is then not refused by an orphan)."""
    import uncdiff.commands.calibrate as calibrate

    monkeypatch.chdir(tmp_path)
    args = ["calibrate", "--checkpoint", str(tiny_checkpoint), "--n", "20", "--batch_size", "20",
            "--sampler.steps", "2", "--estimator.M", "2", "--progress", "false"]
    sample = calibrate.calibrate_table_and_reference
    try:
        Path("/sys/uncdiff-test-out").mkdir()
    except OSError:
        monkeypatch.setattr(calibrate, "calibrate_table_and_reference", mock.Mock(side_effect=AssertionError("sampled")))
        status, errors = run_main([*args, "--out", "/sys/uncdiff-test-out/tau.pt"], capsys)
        assert status == 1 and len(errors) == 1 and "/sys/uncdiff-test-out" in errors[0]
        monkeypatch.setattr(calibrate, "calibrate_table_and_reference", sample)

    def disk_full(path, *_):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(calibrate, "save_threshold_table", disk_full)
        status, errors = run_main([*args, "--out", "tau.pt"], capsys)
    assert status == 1 and len(errors) == 1 and "no space left" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tau.pt.lock"]
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        main([*args, "--out", "tau.pt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tau.pt", "tau.pt.config.yaml", "tau.pt.lock",
                                                          "tau.pt.reference.pt"]
