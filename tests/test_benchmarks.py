"""The benchmarks measure what they say: the Lightning step and the plain loop of train_throughput.py do
the same work (from the same weights they end with the same weights), the spread is the textbook
quartiles, and benchmarks/gpu_check.sh checks its options and rehearses its plan on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_kwargs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import each other as top-level modules

import report  # noqa: E402
import train_throughput  # noqa: E402


def test_lightning_step_and_plain_loop_do_the_same_work():
    kwargs = tiny_model_kwargs(image_size=8, in_channels=1)  # dropout and flips on: both must draw them alike
    seconds, lightning, plain = train_throughput.measure_steps(kwargs, batch_size=4, steps=4, warmup=1, block=2,
                                                               precision="32-true", device=torch.device("cpu"))
    assert [len(seconds["lightning"]), len(seconds["plain"])] == [2, 2]  # rounds of 2 of the 4 timed steps
    assert lightning.global_step == plain.ema.step.item() == 5  # both trained warm-up and timed steps
    for name, value in lightning.state_dict().items():  # online and EMA weights
        torch.testing.assert_close(plain.state_dict()[name], value, msg=name)


def test_model_kwargs_take_the_image_shape_from_the_config_s_data():
    assert {k: train_throughput.model_kwargs("cifar")[k] for k in ("image_size", "in_channels")} == \
           {"image_size": 32, "in_channels": 3}
    assert {k: train_throughput.model_kwargs("quickstart")[k] for k in ("image_size", "in_channels")} == \
           {"image_size": 16, "in_channels": 1}


def test_quartiles_are_the_textbook_ones():
    # 1..9: the median is 5, the lower half's median 3, the upper half's 7
    assert report.quartiles([9, 1, 8, 2, 7, 3, 6, 4, 5]) == (3, 5, 7)
    assert report.summary([1.0, 2.0, 3.0]).startswith("2.000 [IQR 1.500, 2.500] (range 1.000-3.000, 3 rounds)")


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # the rehearsal runs on the CPU even where a GPU is
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True)


def test_gpu_check_refuses_an_unknown_option_and_a_machine_without_cuda():
    unknown = gpu_check("--fast")
    assert unknown.returncode == 2 and "unknown option --fast" in unknown.stderr
    no_gpu = gpu_check()
    assert no_gpu.returncode == 1 and "no CUDA device" in no_gpu.stderr and "--dry-run" in no_gpu.stderr


@pytest.mark.slow  # runs every step of the plan, shrunk: four interpreters, two of them training
def test_gpu_check_dry_run_prints_its_plan_and_runs_it_on_the_cpu(tmp_path):
    pytest.importorskip("diffusers")
    result = gpu_check("--dry-run", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plan = result.stdout.split("== tests")[0]
    for step in ("tests", "train_throughput", "sampling_throughput", "sampling_throughput_bf16"):
        assert f"  {step} (on a GPU <= " in plan
    steps = [line for line in (tmp_path / "gpu_check.txt").read_text().splitlines() if ": exit " in line]
    assert [line.split(":")[0] for line in steps] == ["tests", "train_throughput", "sampling_throughput",
                                                      "sampling_throughput_bf16"]
    assert all(": exit 0, " in line for line in steps)
    assert "6 skipped" in (tmp_path / "gpu_tests.txt").read_text()  # no CUDA here: every CUDA test skips
    for name in ("gpu_train_throughput.txt", "gpu_sampling_throughput.txt", "gpu_sampling_throughput_bf16.txt"):
        text = (tmp_path / name).read_text()
        assert text.startswith("command: python benchmarks/") and "\ncommit: " in text and "\nmachine: " in text
    assert "ratio lightning/plain time per round:" in (tmp_path / "gpu_train_throughput.txt").read_text()
    assert "(e) BayesDiff k=5" in (tmp_path / "gpu_sampling_throughput.txt").read_text()
