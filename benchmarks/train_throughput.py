"""Training throughput: the LightningModule under a Trainer against a plain PyTorch loop.

Both do the same work per step on the same U-Net, in-memory data and batch: seed, flips, forward,
loss, backward, clipping at 1.0, Adam, warm-up LR, EMA update; from the same initial weights they
end with the same weights (tests/test_benchmarks.py). The Lightning side is `DiffusionModule`'s own
step, so its overhead includes what the module adds (the all-ranks finiteness check of the loss and
its logging); the plain loop is the textbook one.

Both sides run in this one process, interleaved so that a slow spell of a shared machine hits both
alike: by default (`--interleave step`) each Lightning step is followed by one plain step, timed at
the step boundaries (a Lightning step is everything the Trainer does between two plain steps: loop,
hooks, data, the module's step); a round is `--steps` consecutive steps of each side. With
`--interleave run`, a round is one whole Lightning run and one whole plain run, alternating which
goes first, with no synchronisation between steps (on a GPU the per-step synchronisation of the step
mode would hide what asynchronous execution saves). Printed: the median and spread of each side's
images/s and of the per-round ratio Lightning / plain (goal: <= 1.03), peak memory.

    python benchmarks/train_throughput.py --config quickstart --steps 5 --rounds 20 \\
        --out benchmarks/results/train_throughput_cpu.txt
    python benchmarks/train_throughput.py --config cifar --precision bf16-mixed --interleave run \\
        --steps 20 --rounds 10                                                                # a GPU
"""

import argparse
import contextlib
import importlib
import resource
import time

import lightning as L
import torch
import yaml

from report import header, quartiles, summary, write
from uncdiff.lightning.cli import CONFIG_DIR
from uncdiff.lightning.module import DiffusionModule, step_seed


def load_config(name: str) -> dict:
    with open(CONFIG_DIR / f"{name}.yaml") as f:
        return yaml.safe_load(f)


def make_datamodule(config: dict) -> L.LightningDataModule:
    """The config's data module, built (not set up: no file is read yet)."""
    module, name = config["data"]["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config["data"].get("init_args", {}))


def model_options(config: dict) -> dict:
    """The config's model options with the image shape of its data (which the CLI links to the model)."""
    channels, size, _ = make_datamodule(config).image_shape
    return {**config["model"], "image_size": size, "in_channels": channels}


def model_kwargs(config: str) -> dict:
    """`model_options` of the bundled config named `config`."""
    return model_options(load_config(config))


def config_batch_size(config: str) -> int:
    return load_config(config)["data"]["init_args"]["batch_size"]


def make_loader(kwargs: dict, batch_size: int, n_batches: int) -> torch.utils.data.DataLoader:
    """`n_batches` batches of random images in [-1, 1], in a fixed order (the same for both sides)."""
    shape = (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    images = torch.randint(0, 256, (batch_size * n_batches, *shape), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    data = torch.utils.data.TensorDataset(images.float() / 127.5 - 1)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True)


def new_model(kwargs: dict) -> DiffusionModule:
    torch.manual_seed(0)  # the same initial weights for both sides
    return DiffusionModule(**kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """The textbook loop, one `step()` at a time over its own pass through `loader`."""

    def __init__(self, kwargs: dict, loader, precision: str, device: torch.device):
        self.model, self.device = new_model(kwargs).to(device).train(), device
        configured = self.model.configure_optimizers()
        self.optimizer, self.warmup_lr = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                         else contextlib.nullcontext())
        self.batches, self.count = iter(loader), 0

    def step(self) -> None:
        (x0,) = next(self.batches)
        torch.manual_seed(step_seed(self.model.hparams.seed, self.count, self.count, 0))  # t, noise, flips, dropout
        with self.autocast:
            loss = self.model.loss([x0.to(self.device, non_blocking=True)])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.net.parameters(), 1.0)
        self.optimizer.step()
        self.warmup_lr.step()
        self.model.ema.update()
        self.count += 1


def trainer(precision: str, device: torch.device, max_steps: int, callback: L.Callback) -> L.Trainer:
    return L.Trainer(accelerator=device.type, devices=1, max_steps=max_steps, precision=precision,
                     gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, callbacks=[callback], log_every_n_steps=50)


class Interleaved(L.Callback):
    """After each Lightning step, one plain step. A Lightning step's time is everything the Trainer does
    from the end of one plain step to the start of the next (its loop, hooks, data and the module's
    step); the device is synchronised at each boundary."""

    def __init__(self, plain: PlainLoop, warmup: int):
        self.plain, self.warmup, self.mark = plain, warmup, None
        self.seconds: dict[str, list[float]] = {"lightning": [], "plain": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.mark is None:  # the first step: its data fetch isn't timed, nor is the step (warm-up)
            self.mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        start = time.perf_counter()
        self.plain.step()
        sync(pl_module.device)
        end = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.seconds["lightning"].append(start - self.mark)
            self.seconds["plain"].append(end - start)
        self.mark = time.perf_counter()


def measure_steps(kwargs, batch_size, steps, warmup, block, precision, device):
    """Lightning and plain steps alternating one by one; seconds of each side per block of `block` steps
    (a round), and the two trained modules."""
    loader = make_loader(kwargs, batch_size, n_batches=warmup + steps + 1)
    model, interleaved = new_model(kwargs), Interleaved(PlainLoop(kwargs, loader, precision, device), warmup)
    trainer(precision, device, warmup + steps, interleaved).fit(model, loader)
    rounds = {name: [sum(times[i:i + block]) for i in range(0, len(times) - block + 1, block)]
              for name, times in interleaved.seconds.items()}
    return rounds, model, interleaved.plain.model


class Timer(L.Callback):
    """Seconds from the start of step `warmup` to the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.seconds = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(pl_module.device)
        self.seconds = time.perf_counter() - self.start


def measure_runs(kwargs, batch_size, steps, warmup, rounds, precision, device) -> dict[str, list[float]]:
    """Seconds of `rounds` whole Lightning and plain runs of `steps` steps, alternating which goes first:
    no synchronisation between steps, so a GPU's queue stays full as in real training."""
    loader = make_loader(kwargs, batch_size, n_batches=warmup + steps + 1)
    seconds = {"lightning": [], "plain": []}
    for r in range(rounds):
        for name in (("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")):
            if name == "lightning":
                timer = Timer(warmup)
                trainer(precision, device, warmup + steps, timer).fit(new_model(kwargs), loader)
                seconds[name].append(timer.seconds)
            else:
                plain = PlainLoop(kwargs, loader, precision, device)
                for _ in range(warmup):
                    plain.step()
                sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    plain.step()
                sync(device)
                seconds[name].append(time.perf_counter() - start)
    return seconds


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quickstart", choices=["quickstart", "cifar"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (64 / 128)")
    parser.add_argument("--interleave", default="step", choices=["step", "run"],
                        help="step: one Lightning step, then one plain step, in one run (a shared CPU); "
                             "run: whole runs alternate, unsynchronised between steps (a GPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each side per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each side (per run)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds (ratios) to take the median of")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--note", default="", help="a line for the results file (e.g. what else ran)")
    parser.add_argument("--out", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.rounds < 2 or args.steps < 1:
        parser.error("--rounds must be >= 2 (a spread needs two) and --steps >= 1")

    kwargs = model_kwargs(args.config)
    batch_size = args.batch_size or config_batch_size(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.interleave == "step":
        seconds = measure_steps(kwargs, batch_size, args.rounds * args.steps, args.warmup, args.steps,
                                args.precision, device)[0]
    else:
        seconds = measure_runs(kwargs, batch_size, args.steps, args.warmup, args.rounds, args.precision, device)
    images = batch_size * args.steps
    ratios = [a / b for a, b in zip(seconds["lightning"], seconds["plain"])]  # > 1: Lightning is slower
    params = sum(p.numel() for p in new_model(kwargs).net.parameters()) / 1e6
    low, median, high = quartiles(ratios)
    lines = header(device) + ([f"note: {args.note}"] if args.note else []) + [
        f"config={args.config} ({params:.1f}M parameters) batch={batch_size} precision={args.precision}, "
        f"interleaved by {args.interleave}: {args.rounds} rounds of {args.steps} timed steps of each side, "
        f"after {args.warmup} untimed",
        f"lightning images/s: {summary([images / s for s in seconds['lightning']], 1)}",
        f"plain     images/s: {summary([images / s for s in seconds['plain']], 1)}",
        f"ratio lightning/plain time per round: {summary(ratios)}",
        f"overhead: median {100 * (median - 1):+.1f}%, IQR {100 * (low - 1):+.1f}% to {100 * (high - 1):+.1f}% "
        f"(goal <= +3%)",
        f"peak memory: {peak_memory(device)}",
        "seconds per round (lightning/plain): " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in
                                                      zip(seconds["lightning"], seconds["plain"]))]
    write(lines, args.out)


if __name__ == "__main__":
    main()
