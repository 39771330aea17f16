"""Training throughput: the LightningModule under a Trainer against a plain PyTorch loop.

Both do the same work per step on the same U-Net, in-memory data and batch: seed, flips, forward,
loss, backward, clipping at 1.0, Adam, warm-up LR, EMA update; from the same initial weights they
end with the same weights (tests/test_benchmarks.py). The Lightning side is `DiffusionModule`'s own
step, so its overhead includes what the module adds (the all-ranks finiteness check of the loss and
its logging); the plain loop is the textbook one.

A round times one Lightning run and one plain run of `--steps` steps each (after `--warmup` untimed
steps), in alternating order, in this one process: a slow spell of a shared machine hits both sides
of a round alike, so the per-round ratio Lightning / plain is far steadier than either throughput.
Printed: the median and spread of each side's images/s and of the ratio (goal: <= 1.03), peak memory.

    python benchmarks/train_throughput.py --config quickstart --steps 20 --rounds 15 \\
        --out benchmarks/results/train_throughput_cpu.txt
    python benchmarks/train_throughput.py --config cifar --steps 50 --rounds 10 --precision bf16-mixed   # GPU
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


def model_kwargs(config: str) -> dict:
    """The config's model options with the image shape of its data (which the CLI links to the model)."""
    options = load_config(config)
    module, name = options["data"]["class_path"].rsplit(".", 1)
    data = getattr(importlib.import_module(module), name)(**options["data"].get("init_args", {}))  # reads no files
    channels, size, _ = data.image_shape
    return {**options["model"], "image_size": size, "in_channels": channels}


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


def run_lightning(kwargs, loader, steps, warmup, precision, device) -> tuple[float, DiffusionModule]:
    """Seconds of the timed steps under `L.Trainer`, and the trained module."""
    model, timer = new_model(kwargs), Timer(warmup)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=warmup + steps, precision=precision,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], log_every_n_steps=50)
    trainer.fit(model, loader)
    return timer.seconds, model


def run_plain(kwargs, loader, steps, warmup, precision, device) -> tuple[float, DiffusionModule]:
    """The same steps as a plain loop: seconds of the timed steps, and the trained module."""
    model = new_model(kwargs).to(device).train()
    net, configured = model.net, model.configure_optimizers()
    optimizer, warmup_lr = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    start = None
    for step, (x0,) in enumerate(loader):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        if step == warmup + steps:
            break
        torch.manual_seed(step_seed(model.hparams.seed, step, step, 0))  # timesteps, noise, flips, dropout
        with autocast:
            loss = model.loss([x0.to(device, non_blocking=True)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        warmup_lr.step()
        model.ema.update()
    sync(device)
    return time.perf_counter() - start, model


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"


def measure(kwargs: dict, batch_size: int, steps: int, warmup: int, rounds: int, precision: str,
            device: torch.device) -> dict[str, list[float]]:
    """Seconds of `rounds` Lightning and plain runs, alternating which goes first."""
    loader = make_loader(kwargs, batch_size, n_batches=warmup + steps + 1)
    seconds = {"lightning": [], "plain": []}
    runs = {"lightning": run_lightning, "plain": run_plain}
    for r in range(rounds):
        for name in (("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")):
            seconds[name].append(runs[name](kwargs, loader, steps, warmup, precision, device)[0])
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quickstart", choices=["quickstart", "cifar"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (64 / 128)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of one Lightning and one plain run")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--note", default="", help="a line for the results file (e.g. what else ran)")
    parser.add_argument("--out", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.rounds < 2 or args.steps < 1:
        parser.error("--rounds must be >= 2 (a spread needs two) and --steps >= 1")

    kwargs = model_kwargs(args.config)
    batch_size = args.batch_size or config_batch_size(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds = measure(kwargs, batch_size, args.steps, args.warmup, args.rounds, args.precision, device)
    images = batch_size * args.steps
    ratios = [a / b for a, b in zip(seconds["lightning"], seconds["plain"])]  # > 1: Lightning is slower
    params = sum(p.numel() for p in new_model(kwargs).net.parameters()) / 1e6
    low, median, high = quartiles(ratios)
    lines = header(device) + ([f"note: {args.note}"] if args.note else []) + [
        f"config={args.config} ({params:.1f}M parameters) batch={batch_size} steps={args.steps} "
        f"warmup={args.warmup} precision={args.precision}",
        f"lightning images/s: {summary([images / s for s in seconds['lightning']], 1)}",
        f"plain     images/s: {summary([images / s for s in seconds['plain']], 1)}",
        f"ratio lightning/plain time per round: {summary(ratios)}",
        f"overhead: median {100 * (median - 1):+.1f}%, IQR {100 * (low - 1):+.1f}% to {100 * (high - 1):+.1f}% "
        f"(goal <= +3%)",
        f"peak memory: {peak_memory(device)}",
        "rounds (lightning s, plain s): " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in
                                                      zip(seconds["lightning"], seconds["plain"]))]
    write(lines, args.out)


if __name__ == "__main__":
    main()
