"""Two nodes x one process on localhost, started the way docs/configs.md starts a cluster run: one
`torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1} ... -- train.py <command>` per node, gloo on
the CPU. Lightning (`fit`) and Fabric (`sample`, `evaluate`) find the nodes through torchrun's environment.

Independent truths:
- `fit`: a plain PyTorch loop in this process on the combined batch: at each step every rank's share
  (the epoch's permutation cut into one contiguous shard per rank, docs/configs.md), each drawn with
  that rank's seed (timesteps, noise, flips and dropout come from `(seed, step, batch, rank)`), the
  mean of their losses (what DDP's averaged gradients are the gradient of), clipping, Adam, warm-up,
  EMA. An uninterrupted run (the run whose node 1 is killed, then resumed).
- `sample`: a one-process run of the same command (same files, byte for byte); the seeds each rank
  sampled (every seed once, none twice).
- `evaluate` (the filtering experiment): a one-process run (the same samples, scores and FIDs).
- `restore` (inpainting, with calibrated intervals): a one-process run of the same command (same files,
  byte for byte).
- SLURM: `fit` and `sample` started as `srun` starts one task per node (SLURM's environment, no
  torchrun), found by Lightning's and Fabric's own SLURM detection: the torchrun run's weights and the
  one-process run's samples.
"""

import csv
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
import yaml

from test_image_to_image_cmd import checkpoints, folders  # noqa: F401 (fixtures)
from uncdiff.__main__ import main as uncdiff_main
from uncdiff.commands.evaluate import main as evaluate_main
from uncdiff.commands.sample import main as sample_main
from uncdiff.io.images import from_uint8
from uncdiff.lightning.data import DigitsDataModule, ResumableSampler
from uncdiff.lightning.module import DiffusionModule, step_seed

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
NODES, BATCH, STEPS, KILL_STEP = 2, 8, 4, 3  # per-node batch; node 1 dies before step 3 (after step 2's checkpoint)
MODEL = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.1, lr=1e-3,
             warmup_steps=3, ema_decay=0.9, random_flip=True, sample_steps=4)
CONFIG = {  # the quickstart's layout, tiny; dropout and flips on, so that their per-rank draws are tested
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "max_steps": STEPS, "gradient_clip_val": 1.0, "limit_val_batches": 0,
                "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False,
                "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"save_last": True, "save_top_k": -1, "every_n_train_steps": 2,
                                             "filename": "step{step}", "auto_insert_metric_name": False}}]},
    "model": MODEL,
    "data": {"class_path": "uncdiff.lightning.data.DigitsDataModule", "init_args": {"image_size": 8, "batch_size": BATCH}},
}
SAMPLE_ARGS = ["--n", "10", "--batch_size", "4", "--sampler.steps", "4", "--estimator.name", "aleatoric",
               "--estimator.M", "2", "--filtering.drop_fraction", "0.3", "--fabric.accelerator", "cpu",
               "--progress", "false"]  # chunks of 4, 4, 2 seeds: rank 0 samples chunks 0 and 2, rank 1 chunk 1
SAMPLE_NODES = ["--fabric.devices", "1", "--fabric.num_nodes", str(NODES), "--fabric.strategy", "ddp"]
SAMPLE_RESULTS = ["manifest.csv", "grid.png", "dropped.png"]  # besides samples/; records hold timings
EVALUATE_ARGS = ["--n", "12", "--batch_size", "4", "--sampler.steps", "4", "--estimator.M", "2",
                 "--experiments", "filtering", "--estimators", "[aleatoric]", "--filtering.subset_seeds", "3",
                 "--filtering.prc_real", "0", "--fabric.accelerator", "cpu", "--progress", "false"]

# Kills this process (SIGKILL, as a node that fails) when global rank KILL_RANK reaches KILL_AT_STEP of
# `fit` or its KILL_AT_WRITE-th file of `sample`; records the seeds each rank samples in SEEN_DIR.
DRIVER = """
import os, signal, sys
from pathlib import Path
import uncdiff.io.sample_store as store
from uncdiff.lightning.module import DiffusionModule
rank, kill_rank = os.environ["RANK"], os.environ.get("KILL_RANK")
training_step, sample, write_atomic, writes = DiffusionModule.training_step, DiffusionModule.sample, store.write_atomic, [0]
def killing_training_step(self, batch, batch_idx):
    if rank == kill_rank and self.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return training_step(self, batch, batch_idx)
def recording_sample(self, *args, **kwargs):
    with open(Path(os.environ["SEEN_DIR"]) / f"rank{rank}.txt", "a") as f:
        f.write(" ".join(map(str, kwargs["seeds"])) + chr(10))
    return sample(self, *args, **kwargs)
def killing_write_atomic(path, data):
    writes[0] += 1
    if rank == kill_rank and writes[0] == int(os.environ["KILL_AT_WRITE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    write_atomic(path, data)
DiffusionModule.training_step, DiffusionModule.sample = killing_training_step, recording_sample
store.write_atomic = killing_write_atomic
command, *args = sys.argv[1:]
if command == "fit":
    from uncdiff.lightning.cli import main
    main([command, *args])
else:
    from uncdiff.commands.sample import main
    main(args)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(node_rank: int, port: int, script: str) -> list[str]:
    """docs/configs.md's torchrun line for this node (`--` ends torchrun's options: `sample --n` would
    otherwise be read as an abbreviation of its `--nnodes`)."""
    return [TORCHRUN, "--nnodes", str(NODES), "--nproc_per_node", "1", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--", script]


def slurm_task_environment(node_rank: int, port: int) -> dict:
    """What `srun` gives the one task of node `node_rank` of an sbatch job of NODES nodes x 1 task
    (the variables Lightning's SLURMEnvironment reads), the master on this machine."""
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "uncdiff-test", "SLURM_NODELIST": "127.0.0.1",
            "SLURM_NNODES": str(NODES), "SLURM_NTASKS": str(NODES), "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": str(node_rank), "SLURM_NODEID": str(node_rank), "SLURM_LOCALID": "0",
            "MASTER_PORT": str(port)}


def run_nodes(args: list[str], cwd: Path, script: str = str(REPO / "train.py"), slurm: bool = False,
              **env_extra) -> list[subprocess.CompletedProcess]:
    """Both nodes of one run, started together, by torchrun (or, with `slurm`, as the tasks `srun`
    starts: `python train.py ...` in SLURM's environment, no torchrun); their exit codes and output
    once both have ended."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **env_extra}
    port = free_port()
    commands = [[sys.executable, script] if slurm else node_command(rank, port, script) for rank in range(NODES)]
    nodes = [subprocess.Popen([*command, *args], cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, **(slurm_task_environment(rank, port) if slurm else {})},
                              start_new_session=True)
             for rank, command in enumerate(commands)]
    try:
        outputs = [node.communicate(timeout=900)[0] for node in nodes]  # a guard against a hang, not a speed limit
    finally:  # a node left waiting (for a peer that never came) takes its worker with it
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    return [subprocess.CompletedProcess(node.args, node.returncode, output) for node, output in zip(nodes, outputs)]


def ok(results: list[subprocess.CompletedProcess], what: str) -> None:
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"{what}, node {rank} exited {result.returncode}:\n{result.stdout[-4000:]}"


def fit_args(run: Path, config: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), "--trainer.num_nodes", str(NODES), "--trainer.devices", "1",
            "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(run), *extra]


def state(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in checkpoint["optimizer_states"][0]["state"].values()]
    return {"step": checkpoint["global_step"], "weights": checkpoint["state_dict"], "adam": moments}


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-node `fit` of STEPS steps; its folder holds the config and run/checkpoints/."""
    root = tmp_path_factory.mktemp("multinode")
    (root / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    (root / "driver.py").write_text(DRIVER)
    ok(run_nodes(fit_args(root / "run", root / "tiny.yaml"), cwd=root), "fit")
    return root


def plain_loop_on_the_combined_batch() -> DiffusionModule:
    """CONFIG's training as one process: each step's loss is the mean of the ranks' losses, each on its
    rank's shard and drawn from its rank's seed (the documented sharding and seeding)."""
    torch.set_num_threads(1)
    L.seed_everything(CONFIG["seed_everything"])  # as the CLI does before building the data and the model
    data = DigitsDataModule(**CONFIG["data"]["init_args"])
    model = DiffusionModule(image_size=8, in_channels=1, **MODEL).train()
    data.setup("fit")
    images = data.train_set.tensors[0]
    shards = []
    for rank in range(NODES):
        with mock.patch("uncdiff.lightning.data.rank_and_world", return_value=(rank, NODES)):
            shards.append(list(ResumableSampler(len(images), seed=0)))  # epoch 0
    optimizer = torch.optim.Adam(model.net.parameters(), lr=MODEL["lr"])
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / MODEL["warmup_steps"]))
    for step in range(STEPS):  # all in epoch 0: the batch index is the step
        losses = []
        for rank in range(NODES):
            torch.manual_seed(step_seed(0, step, step, rank))
            losses.append(model.loss([from_uint8(images[shards[rank][step * BATCH:(step + 1) * BATCH]])]))
        optimizer.zero_grad()
        (sum(losses) / NODES).backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), CONFIG["trainer"]["gradient_clip_val"])
        optimizer.step()
        warmup.step()
        model.ema.update()
    return model


@pytest.mark.slow  # torchrun process trees that import Lightning, one per node
def test_two_node_fit_equals_one_process_on_the_combined_batch(fit_run):
    trained = state(fit_run / "run" / "checkpoints" / f"step{STEPS}.ckpt")
    assert trained["step"] == STEPS
    threads = torch.get_num_threads()
    try:
        expected = plain_loop_on_the_combined_batch().state_dict()
    finally:
        torch.set_num_threads(threads)
    assert trained["weights"].keys() == expected.keys()
    for name, value in expected.items():  # the online and the EMA weights
        torch.testing.assert_close(trained["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # torchrun process trees that import Lightning, one per node
def test_a_killed_node_s_fit_resumes_exactly(fit_run):
    run = fit_run / "killed"
    killed = run_nodes(fit_args(run, fit_run / "tiny.yaml"), cwd=fit_run, script=str(fit_run / "driver.py"),
                       KILL_RANK="1", KILL_AT_STEP=str(KILL_STEP))
    assert [r.returncode != 0 for r in killed] == [True, True], "node 0 must fail when node 1 dies"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step2.ckpt"]

    ok(run_nodes(fit_args(run, fit_run / "tiny.yaml", "--ckpt_path", "last"), cwd=fit_run), "fit --ckpt_path last")
    resumed, uninterrupted = (state(r / "checkpoints" / f"step{STEPS}.ckpt") for r in (run, fit_run / "run"))
    assert resumed["step"] == uninterrupted["step"] == STEPS
    for name, value in uninterrupted["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, msg=name)
    for a, b in zip(resumed["adam"], uninterrupted["adam"], strict=True):
        torch.testing.assert_close(a, b)



@pytest.mark.slow  # two processes that import Lightning
def test_fit_and_sample_under_slurm_s_environment_equal_the_torchrun_runs(fit_run, one_process_samples, tmp_path):
    """`srun python train.py ...` with one task per node: Lightning's and Fabric's own SLURM detection
    number the processes, and the run is the torchrun run's (weights) and one process's (samples)."""
    run = tmp_path / "slurm"
    results = run_nodes(fit_args(run, fit_run / "tiny.yaml"), cwd=fit_run, slurm=True)
    ok(results, "fit under SLURM")
    slurm, torchrun = (state(r / "checkpoints" / f"step{STEPS}.ckpt") for r in (run, fit_run / "run"))
    assert slurm["step"] == STEPS
    for name, value in torchrun["weights"].items():
        torch.testing.assert_close(slurm["weights"][name], value, msg=name)
    out = tmp_path / "samples"
    results = run_nodes(sample_args(fit_run, out), cwd=fit_run, slurm=True)
    ok(results, "sample under SLURM")
    assert "on 2 process(es)" in results[0].stdout
    same_samples(one_process_samples, out)

@pytest.fixture(scope="module")
def one_process_samples(fit_run) -> Path:
    """`sample` in this process, one thread as each node has (CPU reductions depend on the thread count)."""
    out = fit_run / "samples-one-process"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample_main(["--checkpoint", str(fit_run / "run" / "checkpoints" / "last.ckpt"), "--out", str(out), *SAMPLE_ARGS])
    finally:
        torch.set_num_threads(threads)
    return out


def same_samples(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "samples").iterdir())
    assert names == sorted(p.name for p in (b / "samples").iterdir())
    for name in [f"samples/{n}" for n in names] + SAMPLE_RESULTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def seen_seeds(folder: Path) -> dict[int, list[int]]:
    """rank -> the seeds it sampled, in order."""
    return {int(p.stem.removeprefix("rank")): [int(s) for s in p.read_text().split()] for p in folder.glob("rank*.txt")}


def sample_args(fit_run: Path, out: Path) -> list[str]:
    return ["sample", "--checkpoint", str(fit_run / "run" / "checkpoints" / "last.ckpt"), "--out", str(out),
            *SAMPLE_ARGS, *SAMPLE_NODES]


@pytest.mark.slow  # torchrun process trees that import Lightning, one per node
def test_two_node_sample_equals_one_process(fit_run, one_process_samples, tmp_path):
    out = tmp_path / "two-nodes"
    results = run_nodes(sample_args(fit_run, out), cwd=fit_run, script=str(fit_run / "driver.py"), SEEN_DIR=str(tmp_path))
    ok(results, "sample")
    assert "on 2 process(es)" in results[0].stdout
    same_samples(one_process_samples, out)
    seen = seen_seeds(tmp_path)
    assert seen == {0: [0, 1, 2, 3, 8, 9], 1: [4, 5, 6, 7]}  # chunks dealt round-robin over the global ranks
    with open(out / "manifest.csv", newline="") as f:
        assert [int(row["seed"]) for row in csv.DictReader(f)] == list(range(10))


@pytest.mark.slow  # torchrun process trees that import Lightning, one per node
def test_a_killed_node_s_sample_resumes_without_regenerating(fit_run, one_process_samples, tmp_path):
    out, first, second = tmp_path / "killed", tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    # node 1 dies after the first of its chunk's files (one PNG): its chunk is unfinished
    killed = run_nodes(sample_args(fit_run, out), cwd=fit_run, script=str(fit_run / "driver.py"), SEEN_DIR=str(first),
                       KILL_RANK="1", KILL_AT_WRITE="2")
    assert [r.returncode != 0 for r in killed] == [True, True], "node 0 must fail when node 1 dies"
    assert not (out / "manifest.csv").exists()
    assert sorted(p.name for p in (out / "records").iterdir()) == ["chunk-000000.json", "chunk-000002.json"]

    ok(run_nodes(sample_args(fit_run, out), cwd=fit_run, script=str(fit_run / "driver.py"), SEEN_DIR=str(second)),
       "sample, rerun")
    assert seen_seeds(second) == {0: [4, 5, 6, 7]}  # only the unfinished chunk, dealt to rank 0; rank 1 idles
    same_samples(one_process_samples, out)


@pytest.mark.slow  # torchrun process trees that import Lightning, one per node
def test_two_node_evaluate_equals_one_process(fit_run, tmp_path):
    checkpoint = str(fit_run / "run" / "checkpoints" / "last.ckpt")
    one, two = tmp_path / "one-process", tmp_path / "two-nodes"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate_main(["--checkpoint", checkpoint, "--out", str(one), "--fid.cache", str(tmp_path / "cache1"),
                       *EVALUATE_ARGS])
    finally:
        torch.set_num_threads(threads)
    ok(run_nodes(["evaluate", "--checkpoint", checkpoint, "--out", str(two), "--fid.cache", str(tmp_path / "cache2"),
                  *EVALUATE_ARGS, *SAMPLE_NODES], cwd=fit_run), "evaluate")
    samples = sorted(p.relative_to(one) for p in (one / "sets").rglob("samples/*"))
    assert len(samples) == 12  # one image per seed
    assert samples == sorted(p.relative_to(two) for p in (two / "sets").rglob("samples/*"))
    for name in [*samples, Path("sets/aleatoric/manifest.csv")]:  # the manifest holds the seeds' scores
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    with open(one / "filtering.csv", newline="") as a, open(two / "filtering.csv", newline="") as b:
        rows_one, rows_two = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert len(rows_one) == len(rows_two) == 1 and rows_one[0].keys() == rows_two[0].keys()
    for key, value in rows_one[0].items():  # the FIDs of the whole, kept and random sets, and their spreads
        try:
            assert float(rows_two[0][key]) == pytest.approx(float(value), rel=1e-6), key
        except ValueError:
            assert rows_two[0][key] == value, key




@pytest.mark.slow  # torchrun process trees that import Lightning, one per node
def test_two_node_restore_equals_one_process(checkpoints, folders, tmp_path):
    """An inpainting checkpoint restores 3 conditions with calibrated interval maps on two nodes, file
    for file what one process writes."""
    conditions, masks = folders
    calibration = tmp_path / "aleatoric.json"
    common = ["--checkpoint", str(checkpoints["inpaint"]), "--sampler.steps", "2", "--estimator.M", "2",
              "--fabric.accelerator", "cpu", "--progress", "false"]
    args = [*common, "--conditions", str(conditions), "--masks", str(masks), "--intervals", str(calibration),
            "--batch_size", "1"]  # chunks 0 and 2 on rank 0, chunk 1 on rank 1
    one, two = tmp_path / "one-process", tmp_path / "two-nodes"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uncdiff_main(["calibrate_intervals", "--out", str(calibration), "--n", "30", "--heuristic.name", "aleatoric",
                      *common])
        uncdiff_main(["restore", "--out", str(one), *args])
    finally:
        torch.set_num_threads(threads)
    results = run_nodes(["restore", "--out", str(two), *args, *SAMPLE_NODES], cwd=tmp_path)
    ok(results, "restore")
    assert "on 2 process(es)" in results[0].stdout
    names = sorted(p.name for p in (one / "samples").iterdir())
    assert {name[:6] for name in names} == {f"{seed:06d}" for seed in range(3)}
    assert {name[6:] for name in names} >= {".png", "_map.npy", "_lower.npy", "_upper.npy", "_width.npy"}
    assert names == sorted(p.name for p in (two / "samples").iterdir())
    for name in [f"samples/{n}" for n in names] + ["manifest.csv", "grid.png", "inputs.csv"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name

def docs_torchrun_recipe() -> list[list[str]]:
    """The torchrun commands of docs/configs.md (the sbatch script's too), as argument lists."""
    text = (REPO / "docs" / "configs.md").read_text()
    commands = re.findall(r"\b(torchrun --.*)$", text.replace("\\\n", " "), flags=re.M)
    return [command.split() for command in commands]


def test_the_docs_torchrun_recipe_is_the_one_tested():
    """docs/configs.md starts each node as this test does (torchrun alone and in the sbatch script): the
    same torchrun options, `--` before train.py, and the command's node count, devices per node and ddp
    strategy."""
    recipes = docs_torchrun_recipe()
    assert [recipe[recipe.index("--") + 2] for recipe in recipes] == ["fit", "sample", "fit"]
    tested = node_command(0, 0, "train.py")
    for recipe in recipes:
        assert [a for a in recipe[:recipe.index("--")] if a.startswith("--")] == \
               [a for a in tested[:tested.index("--")] if a.startswith("--")]
        assert recipe[recipe.index("--") + 1] == "train.py"
        flags = [a for a in recipe if a.startswith(("--trainer.", "--fabric."))]
        if "fit" in recipe:
            assert flags[:3] == [a for a in fit_args(Path(), Path()) if a.startswith("--trainer.")][:3]
        else:
            assert flags == [a for a in SAMPLE_NODES if a.startswith("--")]
