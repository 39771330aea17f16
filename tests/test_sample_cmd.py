"""`train.py sample` on a tiny checkpoint trained in the test: what it writes, resuming after a
kill without regenerating, one and two processes writing identical files, and every bad input
failing before anything is written.

Independent truths: `DiffusionModule.sample` with the same seeds (the images), docs/algorithms.md §3's score
(the sum of the map), `keep_best`'s rule (the highest scores are dropped), an uninterrupted
single-process run (the resumed and the two-process runs).
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tiny_checkpoint import tiny_checkpoint  # noqa: F401 (fixture)
from uncdiff.lightning.module import DiffusionModule
from uncdiff.commands.sample import main

pytestmark = pytest.mark.slow  # train.py sample runs on a trained checkpoint

REPO = Path(__file__).resolve().parent.parent
N, BATCH, DROP = 10, 4, 0.3  # chunks of 4, 4, 2 seeds
RUN_ARGS = ["--n", str(N), "--batch_size", str(BATCH), "--sampler.steps", "4", "--estimator.M", "2",
            "--filtering.drop_fraction", str(DROP), "--fabric.accelerator", "cpu", "--progress", "false"]
RESULTS = ["manifest.csv", "grid.png", "dropped.png"]  # besides samples/; records hold timings


@pytest.fixture
def one_thread():
    """One torch thread, as each of two processes gets on this 2-core machine: CPU float reductions
    depend on the thread count, and the files are compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory):
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("sample") / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), *RUN_ARGS])
    finally:
        torch.set_num_threads(threads)
    return out


def run_command(args, env_extra=None, script=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, str(REPO / "train.py"), "sample", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def same_results(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "samples").iterdir())
    assert names == sorted(p.name for p in (b / "samples").iterdir())
    for name in [f"samples/{n}" for n in names] + RESULTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "run.json").read_text())["settings"] == json.loads((b / "run.json").read_text())["settings"]


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_writes_what_it_says(reference, tiny_checkpoint):
    rows = read_manifest(reference)
    assert [int(r["seed"]) for r in rows] == list(range(N))
    module = DiffusionModule.load_from_checkpoint(tiny_checkpoint, map_location="cpu")
    expected = module.sample(seeds=list(range(N)), sampler={"steps": 4}).images  # one batch: images don't depend on it
    expected = ((expected + 1) * 127.5).round().clamp(0, 255)
    for r in rows:
        image = torch.from_numpy(np.asarray(Image.open(reference / r["image"])).astype(np.float32))
        assert image.shape == (8, 8)
        assert (image - expected[int(r["seed"]), 0]).abs().max() <= 1  # up to rounding at a level boundary
        u = np.load(reference / r["map"])
        assert u.shape == (1, 8, 8) and u.dtype == np.float32 and (u >= 0).all()
        assert float(r["score"]) == pytest.approx(float(u.astype(np.float64).sum()), rel=1e-5)  # docs/algorithms.md §3
        assert np.asarray(Image.open(reference / r["heatmap"])).shape == (8, 8, 3)
    scores = torch.tensor([float(r["score"]) for r in rows])
    dropped = {int(r["seed"]) for r in rows if r["kept"] == "0"}
    assert dropped == set(torch.topk(scores, round(DROP * N)).indices.tolist())
    for name in ("grid.png", "dropped.png"):
        assert Image.open(reference / name).mode == "RGB"
    settings = json.loads((reference / "run.json").read_text())["settings"]
    assert settings["estimator"]["name"] == "aleatoric" and settings["estimator"]["M"] == 2
    assert settings["seeds"] == {"start": 0, "count": N} and settings["drop_fraction"] == DROP
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["dropped"] == 3 and summary["nfe_per_image"] == 4 * (1 + 2)  # steps x (1 + M)


def test_two_processes_write_the_same_files(reference, tiny_checkpoint, tmp_path):
    out = tmp_path / "two"
    result = run_command(["--checkpoint", str(tiny_checkpoint), "--out", str(out), *RUN_ARGS, "--fabric.devices", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    same_results(reference, out)


KILL_SCRIPT = """
import os, signal, sys
import uncdiff.io.sample_store as store
calls, original = [0], store.write_atomic
def write_atomic(path, data):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_WRITE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    original(path, data)
store.write_atomic = write_atomic
from uncdiff.commands.sample import main
main(sys.argv[1:])
"""


def test_killed_run_resumes_without_regenerating(reference, tiny_checkpoint, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "killed"
    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), *RUN_ARGS]
    # writes: run.json, then per chunk 3 files a sample and its record: killed after the first sample of chunk 2
    killed = run_command(args, {"KILL_AT_WRITE": str(1 + 13 + 13 + 4)}, script=KILL_SCRIPT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in (out / "records").iterdir()) == ["chunk-000000.json", "chunk-000001.json"]
    assert not (out / "manifest.csv").exists()
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "samples").iterdir()
                if int(p.name[:6]) < 8}
    assert len(finished) == 8 * 3

    generated = []
    original = DiffusionModule.sample

    def spy(self, *a, **k):
        generated.extend(k["seeds"])
        return original(self, *a, **k)

    monkeypatch.setattr(DiffusionModule, "sample", spy)
    main(args)
    assert generated == [8, 9]  # only the unfinished chunk
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == finished  # not rewritten
    same_results(reference, out)

    generated.clear()
    main(args)  # once more: everything is there
    assert generated == []
    same_results(reference, out)


def test_print_config_round_trip_reproduces_the_run(reference, tiny_checkpoint, tmp_path, capsys, one_thread):
    """`--print_config > s.yaml`, then `--config s.yaml` alone: the same run, byte for byte; the run
    directory's config.yaml is exactly that file."""
    argv = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "again"), *RUN_ARGS]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--print_config"])
    assert not done.value.code
    printed = capsys.readouterr().out
    (tmp_path / "s.yaml").write_text(printed)
    config = yaml.safe_load(printed)  # the options given, under their groups
    assert config["estimator"]["M"] == 2 and config["sampler"]["steps"] == 4 and config["progress"] is False
    assert config["filtering"]["drop_fraction"] == DROP and config["batch_size"] == BATCH and config["n"] == N
    main(["--config", str(tmp_path / "s.yaml")])
    same_results(reference, tmp_path / "again")
    assert (tmp_path / "again" / "config.yaml").read_text() == printed
    reference_config = yaml.safe_load((reference / "config.yaml").read_text())
    assert {**reference_config, "out": None} == {**config, "out": None}


def test_resume_with_other_processes_keeps_the_first_config(reference, tmp_path, tiny_checkpoint):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    first = (out / "config.yaml").read_bytes()
    main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), *RUN_ARGS, "--fabric.accelerator", "auto"])
    assert (out / "config.yaml").read_bytes() == first
    (extra,) = out.glob("config-*.yaml")
    assert yaml.safe_load(extra.read_text())["fabric"]["accelerator"] == "auto"
    assert yaml.safe_load(first)["fabric"]["accelerator"] == "cpu"


def tree(path: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.rglob("*"))} if path.exists() else {}


@pytest.mark.parametrize("case, change, message", [
    ("missing checkpoint", {"--checkpoint": "nowhere.ckpt"}, "checkpoint not found"),
    ("not a checkpoint", {"--checkpoint": "text"}, "not a checkpoint torch can read"),
    ("another model's checkpoint", {"--checkpoint": "other"}, "not a uncdiff DiffusionModule checkpoint"),
    ("fraction 0", {"--filtering.drop_fraction": "0"}, "--filtering.drop_fraction must lie in (0, 1)"),
    ("fraction 1", {"--filtering.drop_fraction": "1"}, "--filtering.drop_fraction must lie in (0, 1)"),
    ("fraction above 1", {"--filtering.drop_fraction": "1.5"}, "--filtering.drop_fraction must lie in (0, 1)"),
    ("M < 2", {"--estimator.M": "1"}, "estimator.M must be an integer >= 2"),
    ("M < 2, MC-Dropout", {"--estimator.M": "1", "--estimator.name": "mc_dropout"},
     "estimator.M must be an integer >= 2"),
    ("another run", {"--estimator.M": "3", "--out": "reference"}, "holds another run"),
    ("BayesDiff with clipping", {"--estimator.name": "bayesdiff", "--estimator.M": None, "--sampler.clip": "true"},
     "sampler.clip false"),
])
def test_bad_input_fails_before_writing(case, change, message, reference, tiny_checkpoint, tmp_path):
    (tmp_path / "text").write_text("not a checkpoint")
    torch.save({"state_dict": {"layer.weight": torch.zeros(1)}, "hyper_parameters": {}}, tmp_path / "other")
    other_run = tmp_path / "reference"
    shutil.copytree(reference, other_run)
    options = {"--checkpoint": str(tiny_checkpoint), "--out": str(tmp_path / "new"), "--n": "4",
               "--sampler.steps": "4", "--estimator.M": "2", "--fabric.accelerator": "cpu"}
    for key, value in change.items():
        options[key] = str(tmp_path / value) if key in ("--checkpoint", "--out") and value != "nowhere.ckpt" else value
    argv = [a for k, v in options.items() if v is not None for a in (k, v)]
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert message in str(error.value.code), error.value.code
    assert tree(tmp_path) == before  # nothing written, nothing touched
    if case == "another run":
        assert "estimator.M: 2 there, 3 here" in str(error.value.code)


def test_an_unknown_estimator_is_refused_by_the_parser(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "new"), "--estimator.name", "ensemble"])
    assert error.value.code == 2 and "estimator.name" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_guided_with_a_calibrated_threshold_table(tiny_checkpoint, tmp_path):
    from uncdiff.uncertainty.calibration import calibrate_threshold_table
    from uncdiff.io.tables import save_threshold_table
    from uncdiff.core.samplers import make_sampler

    module = DiffusionModule.load_from_checkpoint(tiny_checkpoint, map_location="cpu").eval()
    table = calibrate_threshold_table(module.ema.ema_model, make_sampler(module.schedule, "ddim", steps=4),
                                      module.image_shape, range(100, 108), M=2)
    save_threshold_table(tmp_path / "table.pt", table, {})
    args = ["--checkpoint", str(tiny_checkpoint), "--n", "4", "--batch_size", "4", "--sampler.steps", "4",
            "--estimator.M", "2", "--guidance.rule", "gradient", "--guidance.sign", "-1", "--guidance.window", "[0, 0.5]",
            "--guidance_table", str(tmp_path / "table.pt"), "--fabric.accelerator", "cpu", "--progress", "false"]
    with pytest.raises(SystemExit) as error:  # a table of 4 steps for a 5-step run
        main([*args, "--out", str(tmp_path / "wrong"), "--sampler.steps", "5"])
    assert "this run needs (5, 1, 8, 8)" in str(error.value.code) and not (tmp_path / "wrong").exists()

    main([*args, "--out", str(tmp_path / "guided")])
    settings = json.loads((tmp_path / "guided" / "run.json").read_text())["settings"]
    assert settings["guidance"]["threshold"] == "table" and settings["guidance"]["sign"] == -1
    assert len(settings["files"]["guidance_table"]["sha256"]) == 64
    expected = module.sample(seeds=range(4), sampler={"steps": 4}, estimator={"M": 2},
                             guidance={"rule": "gradient", "sign": -1, "window": (0, 0.5), "table": table}).images
    written = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "guided" / "samples" / f"{s:06d}.png")))
                           for s in range(4)]).float()
    assert (written - ((expected[:, 0] + 1) * 127.5).round().clamp(0, 255)).abs().max() <= 1
