"""One run per output folder: two real processes, one folder. The second run (`sample`, `evaluate`,
`calibrate`, `restore`) is refused in one line naming the first (its pid and command), the first
ends with exactly its own files; a killed holder leaves nothing locked."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_checkpoint import tiny_checkpoint  # noqa: F401 (fixture)
from uncdiff.io.lock import LOCK_NAME, OutputInUse, lock_folder
from uncdiff.io.sample_store import check_output_dir

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")

# `uncdiff <command> ...` (argv[3:]) whose function argv[2] (`module:attribute`, e.g.
# `uncdiff.io.sample_store:SampleStore.write_chunk`) waits for the file argv[1] before it runs (and makes
# `<argv[1]>.waiting` when it starts waiting): a run that holds its folder for as long as the test needs,
# whatever the machine's speed
PAUSED = """
import importlib, sys, time
from pathlib import Path

go, (module, attribute) = Path(sys.argv[1]), sys.argv[2].split(":")
*path, name = attribute.split(".")
owner = importlib.import_module(module)
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
def paused(*args, **kwargs):
    Path(f"{go}.waiting").touch()
    while not go.exists():
        time.sleep(0.05)
    return original(*args, **kwargs)
setattr(owner, name, paused)
from uncdiff.__main__ import main
sys.argv = ["uncdiff", *sys.argv[3:]]
main()
"""
WRITE_CHUNK = "uncdiff.io.sample_store:SampleStore.write_chunk"

HOLD = """
import sys, time
from uncdiff.io.lock import lock_folder
lock = lock_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def wait_for_holder(lock: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `process` has written its pid into the lock file `lock`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            if json.loads(lock.read_text())["pid"] == process.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError("the first run never locked its folder")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:") or line.startswith("Traceback")]


@pytest.mark.slow
def test_second_run_into_a_busy_folder_is_refused_and_the_first_keeps_its_own_files(tiny_checkpoint, tmp_path):  # noqa: F811
    common = ["sample", "--checkpoint", str(tiny_checkpoint), "--out", "race", "--n", "8", "--batch_size", "4",
              "--sampler.steps", "2", "--estimator.name", "none", "--progress", "false"]
    first = subprocess.Popen([sys.executable, "-c", PAUSED, str(tmp_path / "go"), WRITE_CHUNK, *common],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_holder(tmp_path / "race" / LOCK_NAME, first)
        # another run (other seeds), and the very same command: both refused while the first runs
        for args in ([*common, "--seed", "100"], common):
            second = subprocess.run([sys.executable, TRAIN, *args], cwd=tmp_path, capture_output=True, text=True)
            assert second.returncode == 1, second.stderr[-3000:]
            errors = error_lines(second.stderr)
            assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
            assert f"pid {first.pid}" in errors[0] and "in use by another run" in errors[0]
            assert "sample" in errors[0] and "race" in errors[0]  # the holder's command line
        (tmp_path / "go").touch()
        _, stderr = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]

    root = tmp_path / "race"
    assert json.loads((root / "run.json").read_text())["settings"]["seeds"] == {"start": 0, "count": 8}
    with open(root / "manifest.csv", newline="") as f:
        assert [int(row["seed"]) for row in csv.DictReader(f)] == list(range(8))
    assert sorted(p.name for p in (root / "samples").iterdir()) == [f"{seed:06d}.png" for seed in range(8)]
    assert sorted(p.name for p in (root / "records").iterdir()) == ["chunk-000000.json", "chunk-000001.json"]


def snapshot(root: Path) -> dict:
    """Every file under `root`: its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def super_resolution_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny super-resolution checkpoint and a folder of three 8x8 condition images."""
    import numpy as np
    from PIL import Image

    from test_image_to_image import save_checkpoint, tiny_conditional

    (root / "cond").mkdir(parents=True)
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "cond" / name)
    return save_checkpoint(tiny_conditional("super_resolve"), root / "sr.ckpt"), root / "cond"


def command_case(name: str, checkpoint: Path, root: Path) -> tuple[list[str], Path, str]:
    """`(arguments, lock file, the function that pauses it)` of a tiny run of the command `name` in `root`."""
    common = ["--sampler.steps", "2", "--estimator.M", "2", "--progress", "false", "--fabric.accelerator", "cpu"]
    if name == "evaluate":  # the cost experiment: tiny sets, no FID; paused before its report
        return (["evaluate", "--checkpoint", str(checkpoint), "--out", "race", "--experiments", "cost", "--n", "4",
                 "--batch_size", "4", "--bayesdiff.laplace_images", "32", "--seed_groups", "1",
                 "--filtering.prc_real", "0", *common],
                root / "race" / LOCK_NAME, "uncdiff.commands.evaluate:build_report")
    if name == "calibrate":  # paused before its sampling; its files lie beside tau.pt
        return (["calibrate", "--checkpoint", str(checkpoint), "--out", "tau.pt", "--n", "4", "--quantile", "0.5",
                 "--batch_size", "4", *common], root / "tau.pt.lock",
                "uncdiff.commands.calibrate:calibrate_table_and_reference")
    checkpoint, conditions = super_resolution_inputs(root)
    return (["restore", "--checkpoint", str(checkpoint), "--out", "race", "--conditions", str(conditions),
             "--estimator.name", "none", "--batch_size", "3", "--fabric.devices", "1", *common],
            root / "race" / LOCK_NAME, WRITE_CHUNK)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["evaluate", "calibrate", "restore"])
def test_another_run_of_evaluate_calibrate_or_restore_is_refused_while_the_first_holds_its_outputs(
        name, tiny_checkpoint, tmp_path):  # noqa: F811
    """Another run (other seeds) into the outputs of a running `evaluate`, `calibrate` or `restore`: refused
    in one line naming the first, writing nothing; the first then finishes with its own files."""
    args, lock, pause = command_case(name, tiny_checkpoint, tmp_path)
    go = tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED, str(go), pause, *args], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_holder(lock, first)
        while not Path(f"{go}.waiting").exists():  # everything before the pause is written
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.1)
        before = snapshot(tmp_path)
        second = subprocess.run([sys.executable, "-m", "uncdiff", *args, "--seed", "100"], cwd=tmp_path,
                                capture_output=True, text=True)
        assert second.returncode == 1, second.stderr[-3000:]
        errors = error_lines(second.stderr)
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"pid {first.pid}" in errors[0] and "in use by another run" in errors[0] and name in errors[0]
        assert snapshot(tmp_path) == before  # the second wrote nothing
        go.touch()
        _, stderr = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]

    if name == "calibrate":
        assert sorted(p.name for p in tmp_path.glob("tau.pt*")) == ["tau.pt", "tau.pt.config.yaml", "tau.pt.lock",
                                                                    "tau.pt.reference.pt"]
        table = torch.load(tmp_path / "tau.pt", map_location="cpu", weights_only=True)
        assert table["settings"]["seeds"] == {"start": 0, "count": 4}
        return
    run = json.loads((tmp_path / "race" / "run.json").read_text())
    assert "--seed" not in run["command"] and run["command"][1] == name
    if name == "evaluate":
        assert (tmp_path / "race" / "report.md").is_file() and (tmp_path / "race" / "cost.csv").is_file()
    else:
        with open(tmp_path / "race" / "manifest.csv", newline="") as f:
            assert [int(row["seed"]) for row in csv.DictReader(f)] == [0, 1, 2]
        assert sorted(p.name for p in (tmp_path / "race" / "records").iterdir()) == ["chunk-000000.json"]


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUse, match=rf"pid {holder.pid}, started .*: -c {tmp_path / 'out'}"):
            lock_folder(tmp_path / "out")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = lock_folder(tmp_path / "out")  # a killed holder holds nothing: its .lock file is stale
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lock_folder(tmp_path / "out") is lock  # re-entrant within one process


def test_a_folder_holding_only_a_lock_is_a_new_run(tmp_path):
    """A run that stopped before writing anything (a bad model, a kill) leaves only its .lock: the next
    run starts there, it is not refused as a folder of something else."""
    (tmp_path / LOCK_NAME).write_text("{}")
    assert check_output_dir(tmp_path, {"seeds": {"start": 0, "count": 1}}) == "new"
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        check_output_dir(tmp_path, {})


def test_fit_into_a_run_directory_in_use_is_refused(tmp_path, monkeypatch, capsys):
    from test_errors import FIT, FIT_CONFIG, run_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fit.yaml").write_text(FIT_CONFIG)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "run"], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, errors = run_main(FIT, capsys)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert status == 1 and len(errors) == 1, errors
    assert "--trainer.default_root_dir run is in use" in errors[0] and f"pid {holder.pid}" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_command_that_never_overwrites_locks_then_checks_the_folder_is_empty(tmp_path):
    from uncdiff.io.lock import holds_files, lock_new_folder

    assert lock_new_folder(tmp_path / "new") is not None and not holds_files(tmp_path / "new")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "report.md").write_text("an earlier report")
    with pytest.raises(ValueError, match="not an empty folder"):
        lock_new_folder(tmp_path / "full")
